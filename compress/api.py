"""The public verbs for use from Python: train, prune, finetune. The CLI is a thin layer over these."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from compress import artifact, distributed
from compress.config import ConfigBase, FinetuneConfig
from compress.data import Splits, load_dataset
from compress.errors import AuditError, ExportError, UsageError
from compress.finetune import Evaluation, default_device, evaluate, evaluate_tasks, recalibrate_batchnorm, train
from compress.measure import count_macs, count_params, measure_latency_pair, model_sizes
from compress.measure.backends import LatencySettings, measure_backends
from compress.measure.conditions import environment
from compress.methods import METHODS, Context, Result, method_for_config
from compress.methods.base import AuditOutcome
from compress.models import LoadedModel, load_model
from compress.models.loader import baseline_paths
from compress.report import render_html, render_markdown
from compress.report.schema import SCHEMA_VERSION  # noqa: F401 - re-exported as api.SCHEMA_VERSION
from compress.report.schema import dry_run_report, new_report
from compress.ship import ExportSettings, export_all, export_failures, format_bytes
from compress.tasks import Tasks, is_multitask

CHECKPOINT_FILE = "finetune.ckpt"
CALIBRATION_ITEMS = 256  # calibration items for int8 quantisation
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Where the model comes from (the `--model` family of options)."""

    spec: str | None = None
    weights: str | None = None
    num_classes: int | None = None
    trust_pickle: bool = False

    def load(self) -> LoadedModel:
        return load_model(self.spec, weights=self.weights, num_classes=self.num_classes,
                          trust_pickle=self.trust_pickle)


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What every run shares."""

    out: Path
    data: str | None = None
    seed: int = 0
    force: bool = False
    latency: bool = True
    latency_threads: int = 1
    latency_runs: int = 30
    recalibrate_bn: bool = True  # re-estimate BatchNorm statistics on the calibration split after compressing
    measure: LatencySettings | None = None  # every backend against the original, and bytes of every format
    export: ExportSettings | None = None  # write and verify model.onnx (and .ort, int8) into the run
    command: str = field(default_factory=lambda: shlex.join(["compress", *sys.argv[1:]]))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def input_channels(model: nn.Module) -> int | None:
    """in_channels of the first convolution, if any (to widen grayscale data for RGB architectures)."""
    for module in model.modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            return module.in_channels
    return None


def load_data_for(loaded: LoadedModel, data: str | None, seed: int) -> Splits:
    """The data set asked for, or the model's own, shaped for the model's first layer."""
    splits = load_dataset(data or loaded.dataset or "fashion-mnist", seed)
    channels = input_channels(loaded.model)
    return splits.with_channels(channels) if channels else splits


def _task_row(before: Evaluation | None, after_compression: Evaluation | None,
              after_finetune: Evaluation | None) -> dict[str, Any]:
    def acc(e: Evaluation | None) -> float | None:
        return None if e is None else round(e.accuracy, 4)

    return {"metric": "accuracy", "higher_is_better": True, "split": "test", "before": acc(before),
            "after_compression": acc(after_compression), "after_finetune": acc(after_finetune)}


def _task_rows(tasks: Tasks, before: Evaluation | None, after_compression: Evaluation | None,
               after_finetune: Evaluation | None) -> dict[str, dict[str, Any]]:
    """The report's `tasks` section: one row per task (the classification row alone for a classifier)."""
    if not is_multitask(tasks):
        return {"classification": _task_row(before, after_compression, after_finetune)}

    def value(e: Evaluation | None, name: str) -> float | None:
        return None if e is None or name not in e.metrics else round(e.metrics[name], 4)

    return {t.name: {"metric": t.metric, "higher_is_better": t.higher_is_better, "split": "test",
                     "before": value(before, t.name), "after_compression": value(after_compression, t.name),
                     "after_finetune": value(after_finetune, t.name)} for t in tasks}


def describe_model(model: nn.Module, example: torch.Tensor, *, cross_check: bool = False) -> dict[str, Any]:
    """Params, MACs (dense and effective), FLOPs and bytes of one model; with `cross_check`, Torch-Pruning's
    MAC count beside ours (a warning is raised when they disagree by more than 2%)."""
    params, macs = count_params(model), count_macs(model, example, cross_check=cross_check)
    described = {"params_total": params.total, "params_nonzero": params.nonzero, "buffers": params.buffers,
                 "macs": macs.macs, "flops": macs.flops, "macs_effective": macs.macs_effective,
                 "bytes": model_sizes(model).bytes}
    if macs.cross_check is not None:
        described["macs_cross_check"] = macs.cross_check
    return described


def audit(method_cfg: ConfigBase, result: Result, shipped: nn.Module, original: nn.Module,
          ctx: Context) -> AuditOutcome:
    """The method's own audit of what it promised (target, floors, bounds), checked on the model that ships."""
    spec = method_for_config(method_cfg)
    return spec.audit(result, method_cfg, shipped, original, ctx) if spec.audit else AuditOutcome()


def method_context(splits: Splits, example: torch.Tensor, options: RunOptions,
                   finetune_cfg: FinetuneConfig | None = None, progress: Progress | None = None) -> Context:
    """What a method may use from the run: data and tasks, how the run finalizes a model before shipping
    (BatchNorm re-estimation), a short fine-tune for methods that prune in rounds, and the run's evaluation."""
    finalize = (lambda m: recalibrate_batchnorm(m, splits.calibration)) if options.recalibrate_bn else None

    def short_finetune(model: nn.Module, epochs: int, items: int | None) -> None:
        data = dataclasses.replace(splits, train=splits.train.subset(items)) if items else splits
        train(model, data, dataclasses.replace(finetune_cfg or FinetuneConfig(), epochs=epochs), seed=options.seed)

    return Context(example, splits, example.device, options.seed, progress, tasks=splits.tasks, finalize=finalize,
                   finetune=short_finetune, task_losses=lambda m, split: evaluate_tasks(m, split, splits.tasks).losses)


def _finetune(model: nn.Module, splits: Splits, cfg: FinetuneConfig, *, result: Result, teacher: nn.Module | None,
              seed: int, run: artifact.RunDir, progress: Progress | None, run_key: str) -> dict[str, Any]:
    """Fine-tune with masks kept, checkpointing into the partial run directory so a rerun resumes."""
    log = train(model, splits, cfg, masks=result.masks, teacher=teacher if cfg.distill else None,
                step_hook=result.step_hook, seed=seed, checkpoint=run.path(CHECKPOINT_FILE), run_key=run_key,
                progress=progress)
    return {"config": cfg.to_dict(), "epochs": log.epochs, "resumed_from_epoch": log.resumed_from_epoch,
            "epoch_losses": [round(v, 5) for v in log.epoch_losses]}


@dataclass
class _Prepared:
    """What every verb starts from: the output directory, the model, its data and an example input."""

    run: artifact.RunDir
    loaded: LoadedModel
    splits: Splits
    model: nn.Module
    example: torch.Tensor


def _prepare(source: ModelSource, options: RunOptions) -> _Prepared:
    """Claim the output directory, seed, load the model and its data, and move the model to the device."""
    run = artifact.RunDir(options.out, force=options.force, inputs=_input_paths(source),
                          writer=distributed.current().is_main)
    seed_everything(options.seed)
    loaded = source.load()
    splits = load_data_for(loaded, options.data, options.seed)
    device = default_device()
    return _Prepared(run, loaded, splits, loaded.model.to(device), splits.test.x[:1].to(device))


def _result_sections(result: Result) -> dict[str, Any]:
    """The report's method-specific sections: sparsity or keep, summary, layers."""
    sections: dict[str, Any] = {"summary": result.summary, "layers": result.layers}
    if "target_pruned" in result.summary:
        sections["sparsity"] = {k: result.summary[k] for k in ("requested", "achieved", "counted_over")}
    if "keep" in result.summary:
        sections["keep"] = result.summary["keep"]
    return sections


def _audit_failure(problems: list[str], report: dict[str, Any], out: Path) -> AuditError:
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return AuditError(f"compression audit failed: {problems[0]}{more}; see {out / 'report.md'}", report)


def prune(source: ModelSource, method_cfg: ConfigBase, options: RunOptions, finetune_cfg: FinetuneConfig | None = None,
          progress: Progress | None = None) -> dict[str, Any]:
    """Compress a model with the method its config names, fine-tune, measure, save the run and report.

    Returns the report (the dict written as report.json). Raises `AuditError` (exit 6) after writing the run
    when the result misses its target or a floor.
    """
    job = _prepare(source, options)
    model, splits, example = job.model, job.splits, job.example
    original = copy.deepcopy(model).eval()
    before = evaluate(model, splits.test)
    spec = method_for_config(method_cfg)
    started = time.perf_counter()
    ctx = method_context(splits, example, options, finetune_cfg, progress)
    result = spec.apply(model, method_cfg, ctx)
    timings = {"compress_seconds": round(time.perf_counter() - started, 4)}
    raw = evaluate(model, splits.test) if options.recalibrate_bn else None
    recalibrated = recalibrate_batchnorm(model, splits.calibration) if options.recalibrate_bn else 0
    after_compression = evaluate(model, splits.test)
    report: dict[str, Any] = {}
    after_finetune = None
    if finetune_cfg is not None and finetune_cfg.epochs > 0:
        key = _run_key(source, method_cfg, finetune_cfg, options, splits)
        report["finetune"] = _finetune(model, splits, finetune_cfg, result=result, teacher=original,
                                       seed=options.seed, run=job.run, progress=progress, run_key=key)
        after_finetune = evaluate(model, splits.test)
        result = result.refresh() if result.refresh is not None else result
    report.update(_base_report(options, spec.name, method_cfg, job.loaded), **_result_sections(result))
    report["model"].update(before=describe_model(original, example), after=describe_model(model, example))
    report.update(tasks=_task_rows(splits.tasks, before, after_compression, after_finetune), timings=timings,
                  bn_recalibration={"layers": recalibrated, "split": "calibration",
                                    "accuracy_before": None if raw is None else round(raw.accuracy, 4)})
    audited = audit(method_cfg, result, model.eval(), original, ctx)
    problems = audited.problems
    report.update(audit={"ok": not problems, "problems": problems, "figures": audited.figures},
                  status="audit_failed" if problems else "ok", exit_code=AuditError.exit_code if problems else 0)
    if distributed.current().is_main:
        shape = options.measure.input_shape if options.measure else None
        _measure_into(report, model.cpu(), original.cpu(), *_measurement_data(splits, shape), options)
    arch = dict(job.loaded.arch, transforms=[*job.loaded.arch.get("transforms", []), *result.transforms])
    report["model"]["arch"] = arch
    manifest = _manifest(job.loaded, splits, options, source)
    artifact.save_model_files(job.run, model.cpu(), arch, manifest, result.masks)
    failures = _export_into(report, job.run, model, splits, options)
    _write_reports(job.run, report, method_cfg, finetune_cfg, options)
    job.run.commit()
    if problems:
        raise _audit_failure(problems, report, options.out)
    if failures:
        raise ExportError(f"export verification failed: {failures[0]}; see {options.out / 'report.md'}", report)
    return report


def _measure_into(report: dict[str, Any], candidate: nn.Module, baseline: nn.Module | None, inputs: torch.Tensor,
                  calibration: torch.Tensor, options: RunOptions) -> None:
    """The report's latency rows, and with `options.measure` every backend and the bytes of every format."""
    example = inputs[:1]
    if options.measure is None:
        if options.latency and baseline is not None:
            report["latency"] = [measure_latency_pair(candidate, baseline, example, batch=1,
                                                      threads=options.latency_threads,
                                                      runs=options.latency_runs).to_dict()]
        return
    with tempfile.TemporaryDirectory(prefix="compress-latency-") as tmp:
        rows = measure_backends(candidate, baseline if baseline is not None else candidate, inputs, calibration,
                                options.measure, Path(tmp))
    report["latency"] = [row.to_dict() for row in rows]
    if baseline is None:  # timed beside itself only to share the code path: no ratio to report
        for row in report["latency"]:
            row.update(baseline_p50_ms=None, baseline_p90_ms=None, speedup=None, speedup_spread=None)
    for role, model in (("after", candidate), ("before", baseline)):
        if model is not None:
            report["model"][role]["bytes"].update(format_bytes(model, example, calibration))


def _measurement_data(splits: Splits, input_shape: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Test items to time and calibration items for int8, resized when another input size is asked for."""
    inputs, calibration = splits.test.x[:64], splits.calibration.x[:CALIBRATION_ITEMS]
    if input_shape is None or tuple(input_shape) == tuple(inputs.shape[1:]):
        return inputs, calibration
    if len(input_shape) != 3 or input_shape[0] != inputs.shape[1]:
        raise UsageError(f"--input-shape {','.join(map(str, input_shape))} must be C,H,W with C = "
                         f"{inputs.shape[1]}, the model's input channels")
    resize = lambda x: torch.nn.functional.interpolate(x, size=tuple(input_shape[1:]), mode="bilinear")  # noqa: E731
    return resize(inputs), resize(calibration)


def _export_into(report: dict[str, Any], run: artifact.RunDir, model: nn.Module, splits: Splits,
                 options: RunOptions) -> list[str]:
    """Export and verify the model into the run directory; the problems found (exit 4 when any)."""
    if options.export is None or not distributed.current().is_main:
        return []
    report["export"] = export_all(model, splits.test, splits.calibration, options.export, run.path("."))
    failures = export_failures(report["export"])
    if failures and not report.get("audit", {}).get("problems"):
        report.update(status="export_failed", exit_code=ExportError.exit_code)
    return failures


def _run_key(source: ModelSource, method_cfg: ConfigBase | None, finetune_cfg: FinetuneConfig,
             options: RunOptions, splits: Splits) -> str:
    """What a resumable checkpoint must agree on: model, method, fine-tuning, seed and data."""
    settings = {"source": [source.spec, source.weights, source.num_classes], "seed": options.seed,
                "method": method_cfg.to_dict() if method_cfg else None, "finetune": finetune_cfg.to_dict(),
                "data": splits.fingerprint}
    return artifact.sha256_bytes(artifact.to_json(settings).encode())


def _input_paths(source: ModelSource) -> tuple[Path, ...]:
    return tuple(Path(p) for p in (source.spec, source.weights) if p)


def _base_report(options: RunOptions, method: str, cfg: Any, loaded: LoadedModel) -> dict[str, Any]:
    """The keys every run's report starts with (compress.report.schema owns the layout)."""
    return new_report(command=options.command, method=method, config=cfg if isinstance(cfg, dict) else cfg.to_dict(),
                      seed=options.seed, env=environment(), model={"source": loaded.source, "arch": loaded.arch},
                      out=str(options.out))


def _manifest(loaded: LoadedModel, splits: Splits, options: RunOptions, source: ModelSource) -> dict[str, Any]:
    inputs = {str(p): artifact.sha256_file(p) for p in _input_paths(source) if p.exists()}
    return {"source": loaded.source, "dataset": splits.name, "data_fingerprint": splits.fingerprint,
            "input_shape": list(splits.input_shape), "num_classes": splits.num_classes, "seed": options.seed,
            "command": options.command, "inputs": inputs, "versions": environment()["versions"]}


def _write_reports(run: artifact.RunDir, report: dict[str, Any], method_cfg: ConfigBase | None,
                   finetune_cfg: FinetuneConfig | None, options: RunOptions) -> None:
    recipe = {"method": report.get("method"), "model": report["model"]["source"], "data": options.data,
              "seed": options.seed,
              "config": method_cfg.to_dict() if method_cfg else None,
              "finetune": finetune_cfg.to_dict() if finetune_cfg else None}
    run.write("recipe.resolved.yaml", yaml.safe_dump(recipe, sort_keys=False))
    run.write("report.json", artifact.to_json(report))
    run.write("report.md", render_markdown(report))
    run.write("report.html", render_html(report))


def finetune(source: ModelSource, cfg: FinetuneConfig, options: RunOptions, teacher: ModelSource | None = None,
             progress: Progress | None = None) -> dict[str, Any]:
    """Fine-tune a compress run directory (or any model), keeping its pruned weights at zero."""
    job = _prepare(source, options)
    model, splits = job.model, job.splits
    example = splits.test.x[:1]
    masks = artifact.masks_from_manifest(model, job.loaded.manifest)
    original = copy.deepcopy(model).cpu().eval()
    teacher_model = teacher.load().model if teacher is not None else None
    before = evaluate(model, splits.test)
    key = _run_key(source, None, cfg, options, splits)
    report: dict[str, Any] = {"finetune": _finetune(model, splits, cfg, result=Result(model, masks),
                                                    teacher=teacher_model, seed=options.seed, run=job.run,
                                                    progress=progress, run_key=key)}
    after = evaluate(model, splits.test)
    report.update(_base_report(options, "finetune", cfg, job.loaded))
    report["model"].update(before=describe_model(original, example), after=describe_model(model.cpu(), example))
    report["tasks"] = _task_rows(splits.tasks, before, None, after)
    report.update(status="ok", exit_code=0, layers=[], audit={"ok": True, "problems": []})
    artifact.save_model_files(job.run, model.cpu(), job.loaded.arch, _manifest(job.loaded, splits, options, source),
                              masks)
    _write_reports(job.run, report, None, cfg, options)
    job.run.commit()
    return report


def train_model(source: ModelSource, cfg: FinetuneConfig, options: RunOptions, *, install_baseline: bool = False,
                progress: Progress | None = None) -> dict[str, Any]:
    """Train a model from scratch (random init) and save it as a run; optionally as the shipped baseline."""
    job = _prepare(source, options)
    run, loaded, splits, model = job.run, job.loaded, job.splits, job.model
    log = train(model, splits, cfg, seed=options.seed, checkpoint=run.path(CHECKPOINT_FILE),
                run_key=_run_key(source, None, cfg, options, splits), progress=progress)
    test = evaluate(model, splits.test)
    calibration = evaluate(model, splits.calibration)
    report = _base_report(options, "train", cfg, loaded)
    report["model"].update(after=describe_model(model.cpu(), splits.test.x[:1]))
    report["tasks"] = _task_rows(splits.tasks, None, None, test)
    report.update(status="ok", exit_code=0, layers=[], audit={"ok": True, "problems": []},
                  finetune={"config": cfg.to_dict(), "epochs": log.epochs,
                            "epoch_losses": [round(v, 5) for v in log.epoch_losses]})
    manifest = _manifest(loaded, splits, options, source)
    manifest.update(recipe=cfg.to_dict(), test_accuracy=round(test.accuracy, 4),
                    calibration_accuracy=round(calibration.accuracy, 4), arch=loaded.arch)
    if is_multitask(splits.tasks):
        manifest.update(test_metrics={k: round(v, 4) for k, v in test.metrics.items()},
                        calibration_metrics={k: round(v, 4) for k, v in calibration.metrics.items()})
    manifest = artifact.save_model_files(run, model.cpu(), loaded.arch, manifest)
    _write_reports(run, report, None, cfg, options)
    out = run.commit()
    if install_baseline and loaded.arch.get("kind") == "builtin" and distributed.current().is_main:
        weights, manifest_path = baseline_paths(loaded.arch["name"])
        weights.parent.mkdir(parents=True, exist_ok=True)
        artifact.write_atomic(weights, (out / artifact.WEIGHTS_FILE).read_bytes())
        artifact.write_atomic(manifest_path, artifact.to_json(manifest))
    return report


def _origin_of(loaded: LoadedModel) -> ModelSource | None:
    """The model a compress run directory was made from, as its manifest records it (None for anything else)."""
    manifest = loaded.manifest or {}
    source = manifest.get("source")
    if not Path(loaded.source).is_dir() or not source or source == loaded.source:
        return None
    weights = next((p for p in manifest.get("inputs", {}) if p != source and Path(p).is_file()), None)
    # a built-in name loads its shipped weights only when no class count is given
    classes = manifest.get("num_classes") if ":" in source else None
    return ModelSource(spec=source, weights=weights, num_classes=classes)


def _captured_warnings(fn: Callable[[], Any]) -> tuple[Any, list[str]]:
    """fn's result and the messages of the warnings it raised (they go into the report, not on stderr)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = fn()
    return result, sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)})


def measure(source: ModelSource, baseline: ModelSource | None, options: RunOptions,
            settings: LatencySettings | None = None) -> dict[str, Any]:
    """Measure a model, beside a baseline when there is one, and write the report into `options.out`.

    Parameters (total, nonzero, buffers), MACs and FLOPs (cross-checked against Torch-Pruning's counter),
    bytes of every format, and latency on every backend in `settings` (default: all this machine has, batch 1
    and 32). Without `baseline`, a compress run is compared with the model its manifest names. Returns the report.
    """
    settings = settings or LatencySettings()
    job = _prepare(source, options)
    candidate = job.model.cpu().eval()
    baseline = baseline or _origin_of(job.loaded)
    reference = baseline.load().model.cpu().eval() if baseline is not None else None
    inputs, calibration = _measurement_data(job.splits, settings.input_shape)
    report = _base_report(options, "measure", dataclasses.asdict(settings), job.loaded)
    report["input_shape"] = list(inputs.shape[1:])
    report["model"]["baseline_source"] = baseline.spec if baseline is not None else None
    measured_options = dataclasses.replace(options, measure=settings)

    def describe_all() -> None:
        report["model"]["after"] = describe_model(candidate, inputs[:1], cross_check=True)
        if reference is not None:
            report["model"]["before"] = describe_model(reference, inputs[:1], cross_check=True)
        _measure_into(report, candidate, reference, inputs, calibration, measured_options)

    report["warnings"] = _captured_warnings(describe_all)[1]
    report.update(status="ok", exit_code=0, layers=[], audit={"ok": True, "problems": []})
    _write_reports(job.run, report, None, None, options)
    job.run.commit()
    return report


def export_model(source: ModelSource, options: RunOptions, settings: ExportSettings) -> dict[str, Any]:
    """Export a model to ONNX (and ORT format, int8 as asked) into `options.out`, verify each file against the
    PyTorch model, and write the report. Raises `ExportError` (exit 4) after writing when a file does not match.
    """
    job = _prepare(source, options)
    report = _base_report(options, "export", dataclasses.asdict(settings), job.loaded)
    report["model"]["after"] = describe_model(job.model.cpu(), job.example.cpu())
    report.update(status="ok", exit_code=0, layers=[], audit={"ok": True, "problems": []})
    failures = _export_into(report, job.run, job.model.cpu(), job.splits,
                            dataclasses.replace(options, export=settings))
    _write_reports(job.run, report, None, None, options)
    job.run.commit()
    if failures:
        raise ExportError(f"export verification failed: {failures[0]}; see {options.out / 'report.md'}", report)
    return report


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
    """`--dry-run`: what a channel-pruning method would work on (units, heads, ignored), before any probing.

    Loads the model and its data like `prune` but writes nothing (the --out directory is not claimed).
    """
    spec = method_for_config(method_cfg)
    if spec.plan is None:
        with_plans = ", ".join(sorted(name for name, s in METHODS.items() if s.plan is not None))
        raise UsageError(f"--dry-run lists what a method would work on; --method {spec.name} has no dry-run plan "
                         f"(methods with one: {with_plans})")
    seed_everything(options.seed)
    loaded = source.load()
    splits = load_data_for(loaded, options.data, options.seed)
    model = loaded.model.cpu().eval()
    listing = spec.plan(model, method_cfg, Context(splits.test.x[:1], splits, tasks=splits.tasks))
    return dry_run_report(command=options.command, method=spec.name, config=method_cfg.to_dict(),
                          model={"source": loaded.source},
                          listing={"data": splits.name, "tasks": [t.to_dict() for t in splits.tasks], **listing})


def method_names() -> list[str]:
    """Registered method names (the CLI's --method choices)."""
    return sorted(METHODS)
