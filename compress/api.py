"""The public verbs for use from Python: prune, finetune, train, measure, export, verify, check. Each run-writing
verb is a fixed list of stages (compress.pipeline) built from its options; verify and check read runs and write
nothing. The CLI is a thin layer over these."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from compress import artifact
from compress import check as checks
from compress.config import ConfigBase, FinetuneConfig
from compress.errors import UsageError
from compress.measure.backends import LatencySettings
from compress.methods import METHODS, Context, method_for_config
from compress.pipeline import (  # noqa: F401 - the run options and helpers are part of the API
    Audit,
    Baseline,
    Compress,
    Describe,
    Export,
    Finetune,
    InstallBaseline,
    Load,
    Measure,
    MeasureAgainst,
    ModelSource,
    Pipeline,
    Progress,
    RunOptions,
    Save,
    Stage,
    Train,
    audit,
    describe_model,
    load_data_for,
    method_context,
    run_pipeline,
    seed_everything,
)
from compress.report import render_html, render_markdown
from compress.report.schema import (
    SCHEMA_VERSION,  # noqa: F401 - re-exported as api.SCHEMA_VERSION
    dry_run_report,
)
from compress.ship import ExportSettings
from compress.verify import TOLERANCES, verify_run  # noqa: F401 - TOLERANCES is part of the API


def prune_stages(method_cfg: ConfigBase, options: RunOptions,
                 finetune_cfg: FinetuneConfig | None = None) -> tuple[Stage, ...]:
    """load, baseline, compress, [finetune], audit, describe, measure, save, [export]."""
    stages: list[Stage] = [Load(), Baseline(), Compress(method_cfg, finetune_cfg)]
    if finetune_cfg is not None and finetune_cfg.epochs > 0:
        stages.append(Finetune(finetune_cfg))
    stages += [Audit(), Describe(), Measure(), Save()]
    return (*stages, Export(options.export)) if options.export is not None else tuple(stages)


def prune(source: ModelSource, method_cfg: ConfigBase, options: RunOptions, finetune_cfg: FinetuneConfig | None = None,
          progress: Progress | None = None) -> dict[str, Any]:
    """Compress a model with the method its config names, fine-tune, measure, save the run and report.

    Returns the report (the dict written as report.json). Raises `AuditError` (exit 6) after writing the run
    when the result misses its target, a floor or a bound; `ExportError` (exit 4) when an export does not match.
    """
    name = method_for_config(method_cfg).name
    pipeline = Pipeline(name, method_cfg.to_dict(), prune_stages(method_cfg, options, finetune_cfg), method_cfg,
                        finetune_cfg)
    return run_pipeline(pipeline, source, options, progress)


def finetune(source: ModelSource, cfg: FinetuneConfig, options: RunOptions, teacher: ModelSource | None = None,
             progress: Progress | None = None) -> dict[str, Any]:
    """Fine-tune a compress run directory (or any model), keeping its pruned weights at zero."""
    stages = (Load(), Baseline(), Finetune(cfg, teacher=teacher, from_manifest=True), Describe(), Save())
    return run_pipeline(Pipeline("finetune", cfg.to_dict(), stages, finetune_cfg=cfg), source, options, progress)


def train_model(source: ModelSource, cfg: FinetuneConfig, options: RunOptions, *, install_baseline: bool = False,
                progress: Progress | None = None) -> dict[str, Any]:
    """Train a model from scratch (random init) and save it as a run; optionally as the shipped baseline."""
    stages: tuple[Stage, ...] = (Load(), Train(cfg), Describe(), Save(trained=True))
    stages += (InstallBaseline(),) if install_baseline else ()
    return run_pipeline(Pipeline("train", cfg.to_dict(), stages, finetune_cfg=cfg), source, options, progress)


def measure(source: ModelSource, baseline: ModelSource | None, options: RunOptions,
            settings: LatencySettings | None = None, *, layer_table: bool = True) -> dict[str, Any]:
    """Measure a model, beside a baseline when there is one, and write the report into `options.out`.

    Parameters (total, nonzero, buffers), MACs and FLOPs (cross-checked against Torch-Pruning's counter),
    bytes of every format, and latency on every backend in `settings` (default: all this machine has, batch 1
    and 32). Without `baseline`, a compress run is compared with the model its manifest names. With `layer_table`,
    also where the time goes: the slowest layers on each backend and batch, with their share of the time and of
    the MACs (`layer_latency`). Returns the report.
    """
    settings = settings or LatencySettings()
    stages = (Load(), MeasureAgainst(settings, baseline, layer_table))
    return run_pipeline(Pipeline("measure", dataclasses.asdict(settings), stages), source, options)


def export_model(source: ModelSource, options: RunOptions, settings: ExportSettings) -> dict[str, Any]:
    """Export a model to ONNX (and ORT format, int8 as asked) into `options.out`, verify each file against the
    PyTorch model, and write the report. Raises `ExportError` (exit 4) after writing when a file does not match.
    """
    stages = (Load(), Describe(), Export(settings))
    return run_pipeline(Pipeline("export", dataclasses.asdict(settings), stages), source, options)


def verify(run_dir: Path, *, command: str = "compress verify") -> dict[str, Any]:
    """Check a run: its files against manifest.json (UnsafeCheckpointError, exit 5, naming a file that differs),
    the model rebuilt weights-only, and its test metrics against report.json within `TOLERANCES` (BudgetError,
    exit 3, naming the metric, the recorded and the measured value). Returns the verify report; writes nothing."""
    return verify_run(Path(run_dir), command=command)


def render_reports(run_dir: Path) -> dict[str, Any]:
    """Re-render report.md and report.html of a run directory from its report.json; returns the report."""
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise UsageError(f"{run_dir} has no report.json; give the --out directory of a compress run")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}); rerun the command that wrote it") from None
    if not isinstance(report, dict) or "schema_version" not in report:
        raise UsageError(f"{path} is not a compress report (no schema_version); rerun the command that wrote it")
    artifact.write_atomic(Path(run_dir) / "report.md", render_markdown(report))
    artifact.write_atomic(Path(run_dir) / "report.html", render_html(report))
    return report


def plan(source: ModelSource, method_cfg: ConfigBase, options: RunOptions) -> dict[str, Any]:
    """`--dry-run`: what a method would work on (for PAGCP: units, heads, ignored), before any work.

    Loads the model and its data like `prune` but writes nothing (the --out directory is not claimed).
    """
    spec = method_for_config(method_cfg)
    if spec.plan is None:
        with_plans = ", ".join(sorted(name for name, s in METHODS.items() if s.plan is not None))
        raise UsageError(f"--dry-run lists what a method would work on; --method {spec.name} has no dry-run plan "
                         f"(methods with one: {with_plans})")
    seed_everything(options.seed)
    loaded = source.load()
    splits = load_data_for(loaded, options.data, options.seed, options.input_shape)
    model = loaded.model.cpu().eval()
    listing = spec.plan(model, method_cfg, Context(splits.test.x[:1], splits, tasks=splits.tasks))
    return dry_run_report(command=options.command, method=spec.name, config=method_cfg.to_dict(),
                          model={"source": loaded.source},
                          listing={"data": splits.name, "tasks": [t.to_dict() for t in splits.tasks], **listing})


def method_names() -> list[str]:
    """Registered method names (the CLI's --method choices)."""
    return sorted(METHODS)


def check(current: str | Path, budgets: str | Path, baseline: str | Path | None = None, *,
          warn_as_error: bool = False) -> dict[str, Any]:
    """Check a run (directory or report.json) against a budgets file; the check result (exit_code 3 when over)."""
    return checks.check_runs(checks.load_report(current), checks.load_report(baseline) if baseline else None,
                             Path(budgets), sources=(str(current), None if baseline is None else str(baseline)),
                             warn_as_error=warn_as_error, command="api.check")
