"""Stages and the one runner behind every verb (DESIGN.md §3).

A stage is a small frozen object with a name, a config and `run(state) -> state`; a verb is a `Pipeline`: the
label and config its report carries and its stages in order. The runner runs them over one `State` (model, data
splits, tasks, masks, the report so far), records each stage's config, wall time and outcome in the report's
`stages`, then writes the run directory atomically (report.json, report.md, report.html, recipe.resolved.yaml) and
raises what a stage deferred (a failed audit, exit 6; a failed export, exit 4) only after the run is written.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import yaml
from torch import nn

from compress import artifact, distributed
from compress.config import ConfigBase, FinetuneConfig
from compress.data import Splits
from compress.data.inputs import fit_input, with_input_shape
from compress.data.user import resolve_data
from compress.errors import AuditError, CompressError, ExportError, UsageError
from compress.finetune import Evaluation, default_device, evaluate, evaluate_tasks, recalibrate_batchnorm, train
from compress.measure import count_macs, count_params, measure_latency_pair, model_sizes
from compress.measure.backends import LatencySettings, measure_backends
from compress.measure.conditions import environment
from compress.measure.layer_times import measure_layer_times
from compress.methods import Context, Result, method_for_config
from compress.methods.base import AuditOutcome
from compress.models import LoadedModel, load_model
from compress.models.loader import baseline_paths
from compress.report import render_html, render_markdown
from compress.report.schema import new_report
from compress.ship import ExportSettings, export_all, export_failures, format_bytes
from compress.tasks import Tasks, is_multitask

CHECKPOINT_FILE = "finetune.ckpt"
CALIBRATION_ITEMS = 256  # calibration items for int8 quantisation
Progress = Callable[[str, int, int], None]


# ------------------------------------------------------------------------------------------- what a run needs


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Where the model comes from (the `--model` family of options)."""

    spec: str | None = None
    weights: str | None = None
    num_classes: int | None = None
    trust_pickle: bool = False
    verify: bool = True  # a run directory's files must match its manifest.json (--no-verify: False)

    def load(self) -> LoadedModel:
        return load_model(self.spec, weights=self.weights, num_classes=self.num_classes,
                          trust_pickle=self.trust_pickle, verify=self.verify)


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
    input_shape: tuple[int, int, int] | None = None  # C,H,W the data are brought to (compress.data.inputs)
    eval_items: int | None = None  # evaluate on the first N test items only (recorded; verify replays it)
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


def load_data_for(loaded: LoadedModel, data: str | None, seed: int,
                  input_shape: tuple[int, int, int] | None = None) -> Splits:
    """The data set asked for (or the model's own) brought to the model's input: `input_shape` when given, else the
    shape its run recorded, else the data's own with grayscale widened to the first convolution's channels; the
    model then runs once on two items, so that a shape problem stops here in one line (compress.data.inputs)."""
    splits = resolve_data(data or loaded.dataset or "fashion-mnist", seed)
    shape = input_shape or _recorded_shape(loaded)
    if shape is not None:
        splits = with_input_shape(splits, shape)[0]
    else:
        channels = input_channels(loaded.model)
        splits = splits.with_channels(channels) if channels else splits
    return fit_input(loaded.model, splits, explicit=input_shape is not None, source=loaded.source)


def cap_test_items(splits: Splits, eval_items: int | None) -> Splits:
    """The splits with the test split cut to its first `eval_items` items (None: all of it)."""
    if eval_items is None:
        return splits
    if eval_items < 1:
        raise UsageError(f"--eval-items {eval_items} must be >= 1 (the test items every evaluation uses)")
    return dataclasses.replace(splits, test=splits.test.subset(eval_items))


def _recorded_shape(loaded: LoadedModel) -> tuple[int, int, int] | None:
    """The input shape a run was made at (its manifest), for runs resized from their data's own."""
    recorded = (loaded.manifest or {}).get("input") or {}
    shape = recorded.get("shape")
    return tuple(int(v) for v in shape) if shape else None  # type: ignore[return-value]


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


def audit(method_cfg: ConfigBase, result: Result, shipped: nn.Module, original: nn.Module,
          ctx: Context) -> AuditOutcome:
    """The method's own audit of what it promised (target, floors, bounds), checked on the model that ships."""
    spec = method_for_config(method_cfg)
    return spec.audit(result, method_cfg, shipped, original, ctx) if spec.audit else AuditOutcome()


# ------------------------------------------------------------------------------------------ state and runner


@dataclass
class State:
    """What the stages of one run pass along; the report grows as they run."""

    source: ModelSource
    options: RunOptions
    progress: Progress | None = None
    run: artifact.RunDir | None = None
    loaded: LoadedModel | None = None
    splits: Splits | None = None
    model: nn.Module | None = None
    example: torch.Tensor | None = None
    original: nn.Module | None = None     # the model before compression (prune) or fine-tuning
    method_cfg: ConfigBase | None = None
    ctx: Context | None = None
    result: Result | None = None
    evaluations: dict[str, Evaluation] = field(default_factory=dict)  # before, after_compression, after_finetune
    report: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    deferred: list[CompressError] = field(default_factory=list)  # raised once the run is written


class Stage:
    """One step of a verb: `run(state) -> state`; `config` is what its report record shows."""

    name: ClassVar[str] = "stage"

    def config(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def run(self, state: State) -> State:  # pragma: no cover - every stage defines it
        raise NotImplementedError


def _plain(value: Any) -> Any:
    """A stage setting as JSON: configs by their dicts, dataclasses as dicts, sources by their spec."""
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


@dataclass(frozen=True)
class Pipeline:
    """A verb: the method label and config its report carries, the configs its recipe records, its stages."""

    method: str
    config: dict[str, Any]
    stages: tuple[Stage, ...]
    method_cfg: ConfigBase | None = None
    finetune_cfg: FinetuneConfig | None = None


def run_pipeline(pipeline: Pipeline, source: ModelSource, options: RunOptions,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Run the stages in order, record each, write the run directory atomically, then raise what was deferred."""
    state = State(source, options, progress, method_cfg=pipeline.method_cfg)
    records: list[dict[str, Any]] = []
    _RUNNING.clear()
    for stage in pipeline.stages:
        started, outcome = time.perf_counter(), "failed"
        try:
            state = stage.run(state)
            outcome = "ok"
        finally:
            records.append({"stage": stage.name, "config": stage.config(), "outcome": outcome,
                            "seconds": round(time.perf_counter() - started, 4)})
            done = [r["stage"] for r in records if r["outcome"] == "ok"]
            _RUNNING[:] = [(state.run.partial / CHECKPOINT_FILE, done)] if state.run is not None else []
        if stage.name == Load.name:
            state.report = {**_report_head(pipeline, state), **state.report}
            if options.eval_items is not None:  # every test figure of this run is on these items only
                state.report["eval_items"] = len(state.splits.test)
    state.report.setdefault("status", "ok")
    state.report.setdefault("exit_code", 0)
    state.report.setdefault("layers", [])
    state.report.setdefault("audit", {"ok": True, "problems": []})
    state.report["stages"] = records
    _write(state, pipeline)
    if state.deferred:
        raise state.deferred[0]
    return state.report


_RUNNING: list[tuple[Path, list[str]]] = []  # the run in progress: its checkpoint path and the stages done


def interrupt_note() -> str:
    """What a rerun of an interrupted command will redo and what it resumes: the fine-tune's last finished epoch
    when a checkpoint was written, else nothing (compression is redone: same seed, same result)."""
    if not _RUNNING:
        return "interrupted before any work was saved; a rerun starts over"
    checkpoint, done = _RUNNING[0]
    epoch = _checkpoint_epoch(checkpoint)
    if epoch:
        redo = " redoes the compression (same seed, same result) and" if "compress" in done else ""
        return f"interrupted; rerunning the same command{redo} resumes fine-tuning after epoch {epoch}"
    what = "the compression is redone" if "compress" in done else "it starts over"
    return f"interrupted; nothing was saved to resume from: a rerun of the same command starts over ({what})"


def _checkpoint_epoch(checkpoint: Path) -> int:
    """The last finished epoch a fine-tune checkpoint holds (0 when there is none or it is unreadable)."""
    if not checkpoint.is_file():
        return 0
    try:
        return int(torch.load(checkpoint, map_location="cpu", weights_only=True).get("epoch", 0))
    except Exception:  # noqa: BLE001 - a half-written checkpoint resumes nothing; the note says so
        return 0


def _report_head(pipeline: Pipeline, state: State) -> dict[str, Any]:
    """The keys every run's report starts with (compress.report.schema owns the layout)."""
    return new_report(command=state.options.command, method=pipeline.method, config=pipeline.config,
                      seed=state.options.seed, env=environment(),
                      model={"source": state.loaded.source, "arch": state.loaded.arch}, out=str(state.options.out))


def _write(state: State, pipeline: Pipeline) -> None:
    """report.json, report.md, report.html and recipe.resolved.yaml, then the atomic rename of the run."""
    options, report = state.options, state.report
    recipe = {"method": report.get("method"), "model": report["model"]["source"], "data": options.data,
              "seed": options.seed,
              "config": pipeline.method_cfg.to_dict() if pipeline.method_cfg else None,
              "finetune": pipeline.finetune_cfg.to_dict() if pipeline.finetune_cfg else None}
    state.run.write("recipe.resolved.yaml", yaml.safe_dump(recipe, sort_keys=False))
    state.run.write("report.json", artifact.to_json(report))
    state.run.write("report.md", render_markdown(report))
    state.run.write("report.html", render_html(report))
    state.run.commit()


# ------------------------------------------------------------------------------------------------ the stages


def _input_paths(source: ModelSource) -> tuple[Path, ...]:
    return tuple(Path(p) for p in (source.spec, source.weights) if p)


@dataclass(frozen=True)
class Load(Stage):
    """Claim the output directory, seed, load the model and its data, move the model to the device."""

    name: ClassVar[str] = "load"

    def run(self, state: State) -> State:
        options = state.options
        state.run = artifact.RunDir(options.out, force=options.force, inputs=_input_paths(state.source),
                                    writer=distributed.current().is_main)
        seed_everything(options.seed)
        state.loaded = state.source.load()
        state.splits = cap_test_items(load_data_for(state.loaded, options.data, options.seed, options.input_shape),
                                      options.eval_items)
        device = default_device()
        state.model = state.loaded.model.to(device)
        state.example = state.splits.test.x[:1].to(device)
        return state


@dataclass(frozen=True)
class Baseline(Stage):
    """Keep a copy of the model as it came and evaluate it on the test split."""

    name: ClassVar[str] = "baseline"

    def run(self, state: State) -> State:
        state.original = copy.deepcopy(state.model).eval()
        state.evaluations["before"] = evaluate(state.model, state.splits.test)
        return state


@dataclass(frozen=True)
class Compress(Stage):
    """Apply the method its config names, re-estimate BatchNorm statistics, evaluate."""

    method_cfg: ConfigBase
    finetune_cfg: FinetuneConfig | None = None  # what rounds of a method fine-tune with

    name: ClassVar[str] = "compress"

    def run(self, state: State) -> State:
        options, splits, model = state.options, state.splits, state.model
        state.ctx = method_context(splits, state.example, options, self.finetune_cfg, state.progress)
        started = time.perf_counter()
        state.result = method_for_config(self.method_cfg).apply(model, self.method_cfg, state.ctx)
        timings = {"compress_seconds": round(time.perf_counter() - started, 4)}
        raw = evaluate(model, splits.test) if options.recalibrate_bn else None
        recalibrated = recalibrate_batchnorm(model, splits.calibration) if options.recalibrate_bn else 0
        state.evaluations["after_compression"] = evaluate(model, splits.test)
        state.report.update(timings=timings, bn_recalibration={
            "layers": recalibrated, "split": "calibration",
            "accuracy_before": None if raw is None else round(raw.accuracy, 4)})
        return state


def run_key(source: ModelSource, method_cfg: ConfigBase | None, finetune_cfg: FinetuneConfig,
            options: RunOptions, splits: Splits) -> str:
    """What a resumable checkpoint must agree on: model, method, fine-tuning, seed and data."""
    settings = {"source": [source.spec, source.weights, source.num_classes], "seed": options.seed,
                "method": method_cfg.to_dict() if method_cfg else None, "finetune": finetune_cfg.to_dict(),
                "data": splits.fingerprint}
    return artifact.sha256_bytes(artifact.to_json(settings).encode())


def _train_in_run(state: State, cfg: FinetuneConfig, method_cfg: ConfigBase | None, **extra: Any) -> Any:
    """compress.finetune.train on the run's model and data, checkpointing into the partial run (a rerun of the
    same settings resumes); returns its log."""
    return train(state.model, state.splits, cfg, seed=state.options.seed, checkpoint=state.run.path(CHECKPOINT_FILE),
                 run_key=run_key(state.source, method_cfg, cfg, state.options, state.splits),
                 progress=state.progress, **extra)


def _training_section(cfg: FinetuneConfig, log: Any) -> dict[str, Any]:
    """The report's `finetune` section: the recipe, the epochs run and the mean loss of each."""
    return {"config": cfg.to_dict(), "epochs": log.epochs, "epoch_losses": [round(v, 5) for v in log.epoch_losses]}


@dataclass(frozen=True)
class Finetune(Stage):
    """Fine-tune with the masks kept, checkpointing into the partial run so a rerun resumes.

    Masks come from the compression result, or (`from_manifest`) from the run directory being fine-tuned;
    distillation (cfg.distill) learns from `teacher`, or from the model as it came."""

    cfg: FinetuneConfig
    teacher: ModelSource | None = None
    from_manifest: bool = False

    name: ClassVar[str] = "finetune"

    def run(self, state: State) -> State:
        model, splits = state.model, state.splits
        if self.from_manifest:
            state.result = Result(model, artifact.masks_from_manifest(model, state.loaded.manifest))
        result = state.result
        teacher = self.teacher.load().model if self.teacher is not None else state.original
        log = _train_in_run(state, self.cfg, state.method_cfg, masks=result.masks, step_hook=result.step_hook,
                            teacher=teacher if self.cfg.distill else None)
        section = _training_section(self.cfg, log)
        state.report["finetune"] = {**section, "resumed_from_epoch": log.resumed_from_epoch,
                                    "epoch_losses": section.pop("epoch_losses")}
        state.evaluations["after_finetune"] = evaluate(model, splits.test)
        state.result = result.refresh() if result.refresh is not None else result
        return state


@dataclass(frozen=True)
class Train(Stage):
    """Train from the model's initial weights; the manifest records the recipe and the test figures."""

    cfg: FinetuneConfig

    name: ClassVar[str] = "train"

    def run(self, state: State) -> State:
        log = _train_in_run(state, self.cfg, None)
        state.evaluations["after_finetune"] = evaluate(state.model, state.splits.test)
        state.evaluations["calibration"] = evaluate(state.model, state.splits.calibration)
        state.report["finetune"] = _training_section(self.cfg, log)
        return state


@dataclass(frozen=True)
class Audit(Stage):
    """The method's sections of the report (as fine-tuning left them) and its own audit on the model that ships;
    a failed audit is deferred until the run is written."""

    name: ClassVar[str] = "audit"

    def run(self, state: State) -> State:
        result = state.result
        state.report.update(summary=result.summary, layers=result.layers, **result.sections)
        audited = audit(state.method_cfg, result, state.model.eval(), state.original, state.ctx)
        problems = audited.problems
        state.report.update(audit={"ok": not problems, "problems": problems, "figures": audited.figures},
                            status="audit_failed" if problems else "ok",
                            exit_code=AuditError.exit_code if problems else 0)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            state.deferred.append(AuditError(f"compression audit failed: {problems[0]}{more}; see "
                                             f"{state.options.out / 'report.md'}", state.report))
        return state


def _task_row(before: Evaluation | None, after_compression: Evaluation | None,
              after_finetune: Evaluation | None) -> dict[str, Any]:
    def acc(e: Evaluation | None) -> float | None:
        return None if e is None else round(e.accuracy, 4)

    return {"metric": "accuracy", "higher_is_better": True, "split": "test", "before": acc(before),
            "after_compression": acc(after_compression), "after_finetune": acc(after_finetune)}


def task_rows(tasks: Tasks, evaluations: dict[str, Evaluation]) -> dict[str, dict[str, Any]]:
    """The report's `tasks` section: one row per task (the classification row alone for a classifier)."""
    stages = [evaluations.get(k) for k in ("before", "after_compression", "after_finetune")]
    if not is_multitask(tasks):
        return {"classification": _task_row(*stages)}

    def value(e: Evaluation | None, name: str) -> float | None:
        return None if e is None or name not in e.metrics else round(e.metrics[name], 4)

    return {t.name: {"metric": t.metric, "higher_is_better": t.higher_is_better, "split": "test",
                     "before": value(stages[0], t.name), "after_compression": value(stages[1], t.name),
                     "after_finetune": value(stages[2], t.name)} for t in tasks}


@dataclass(frozen=True)
class Describe(Stage):
    """Parameters, MACs and bytes of the model (and of the original, when the run kept one); the task table."""

    name: ClassVar[str] = "describe"

    def run(self, state: State) -> State:
        if state.original is not None:
            state.report["model"]["before"] = describe_model(state.original, state.example)
        state.report["model"]["after"] = describe_model(state.model, state.example)
        if state.evaluations:
            state.report["tasks"] = task_rows(state.splits.tasks, state.evaluations)
        return state


def measurement_data(splits: Splits) -> tuple[torch.Tensor, torch.Tensor]:
    """Test items to time and calibration items for int8, at the run's input shape (compress.data.inputs)."""
    return splits.test.x[:64], splits.calibration.x[:CALIBRATION_ITEMS]


def measure_into(report: dict[str, Any], candidate: nn.Module, baseline: nn.Module | None, inputs: torch.Tensor,
                 calibration: torch.Tensor, options: RunOptions, workdir: Path | None = None) -> None:
    """The report's latency rows, and with `options.measure` every backend and the bytes of every format; the files
    timed go under `workdir` when given (else a temporary directory)."""
    example = inputs[:1]
    if options.measure is None:
        if options.latency and baseline is not None:
            report["latency"] = [measure_latency_pair(candidate, baseline, example, batch=1,
                                                      threads=options.latency_threads,
                                                      runs=options.latency_runs).to_dict()]
        return
    folder = tempfile.TemporaryDirectory(prefix="compress-latency-") if workdir is None else nullcontext(str(workdir))
    with folder as tmp:
        rows = measure_backends(candidate, baseline if baseline is not None else candidate, inputs, calibration,
                                options.measure, Path(tmp))
    report["latency"] = [row.to_dict() for row in rows]
    if baseline is None:  # timed beside itself only to share the code path: no ratio to report
        for row in report["latency"]:
            row.update(baseline_p50_ms=None, baseline_p90_ms=None, speedup=None, speedup_spread=None)
    for role, model in (("after", candidate), ("before", baseline)):
        if model is not None:
            report["model"][role]["bytes"].update(format_bytes(model, example, calibration))


@dataclass(frozen=True)
class Measure(Stage):
    """Latency beside the original (PyTorch CPU; every backend and format bytes with `options.measure`)."""

    name: ClassVar[str] = "measure"

    def run(self, state: State) -> State:
        if distributed.current().is_main:
            measure_into(state.report, state.model.cpu(), state.original.cpu(), *measurement_data(state.splits),
                         state.options)
        return state


def _captured_warnings(fn: Callable[[], Any]) -> list[str]:
    """The messages of the warnings fn raised (they go into the report, not on stderr)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        fn()
    return sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)})


@dataclass(frozen=True)
class MeasureAgainst(Stage):
    """`compress measure`: the model beside a baseline (MACs cross-checked), on every backend in `settings`."""

    settings: LatencySettings
    baseline: ModelSource | None = None
    layer_table: bool = True  # per-layer latency (the top layers by time) on every backend and batch

    name: ClassVar[str] = "measure"

    def run(self, state: State) -> State:
        candidate = state.model.cpu().eval()
        baseline = self.baseline or origin_of(state.loaded, verify=state.source.verify)
        reference = baseline.load().model.cpu().eval() if baseline is not None else None
        inputs, calibration = measurement_data(state.splits)
        report = state.report
        report["input_shape"] = list(inputs.shape[1:])
        report["model"]["baseline_source"] = baseline.spec if baseline is not None else None
        options = dataclasses.replace(state.options, measure=self.settings)

        def describe_all() -> None:
            report["model"]["after"] = describe_model(candidate, inputs[:1], cross_check=True)
            if reference is not None:
                report["model"]["before"] = describe_model(reference, inputs[:1], cross_check=True)
            with tempfile.TemporaryDirectory(prefix="compress-latency-") as tmp:
                measure_into(report, candidate, reference, inputs, calibration, options, Path(tmp))
                if self.layer_table:  # profiles the files just timed, in the same folder
                    tables = measure_layer_times(candidate, reference, inputs, calibration, self.settings, Path(tmp))
                    report["layer_latency"] = [table.to_dict() for table in tables]

        report["warnings"] = _captured_warnings(describe_all)
        return state


def origin_of(loaded: LoadedModel, *, verify: bool = True) -> ModelSource | None:
    """The model a compress run directory was made from, as its manifest records it (None for anything else);
    `verify` applies when that model is itself a run directory."""
    manifest = loaded.manifest or {}
    source = manifest.get("source")
    if not Path(loaded.source).is_dir() or not source or source == loaded.source:
        return None
    weights = next((p for p in manifest.get("inputs", {}) if p != source and Path(p).is_file()), None)
    # a built-in name loads its shipped weights only when no class count is given
    classes = manifest.get("num_classes") if ":" in source else None
    return ModelSource(spec=source, weights=weights, num_classes=classes, verify=verify)


def _manifest(state: State) -> dict[str, Any]:
    """Where the model came from, the data it saw, the command and versions."""
    loaded, splits, options = state.loaded, state.splits, state.options
    inputs = {str(p): artifact.sha256_file(p) for p in _input_paths(state.source) if p.exists()}
    manifest = {"source": loaded.source, "dataset": splits.name, "data_fingerprint": splits.fingerprint,
                "input_shape": list(splits.input_shape), "num_classes": splits.num_classes, "seed": options.seed,
                "command": options.command, "inputs": inputs, "versions": environment()["versions"]}
    if options.eval_items is not None:
        manifest["eval_items"] = min(options.eval_items, len(splits.test))
    transform = getattr(splits.test.x, "transform", None)
    if transform is not None:  # items resized (or widened) to the model's input: replayed on every load
        manifest["input"] = transform.to_dict()
    return manifest


def _trained_figures(state: State) -> dict[str, Any]:
    """What a trained model's manifest adds: its recipe and test and calibration figures."""
    test, calibration = state.evaluations["after_finetune"], state.evaluations["calibration"]
    figures: dict[str, Any] = {"recipe": state.report["finetune"]["config"],
                               "test_accuracy": round(test.accuracy, 4),
                               "calibration_accuracy": round(calibration.accuracy, 4), "arch": state.loaded.arch}
    if is_multitask(state.splits.tasks):
        figures.update(test_metrics={k: round(v, 4) for k, v in test.metrics.items()},
                       calibration_metrics={k: round(v, 4) for k, v in calibration.metrics.items()})
    return figures


@dataclass(frozen=True)
class Save(Stage):
    """model.safetensors (sparse where masked), arch.json with the method's transforms, manifest.json."""

    trained: bool = False  # the manifest also records the training recipe and figures

    name: ClassVar[str] = "save"

    def run(self, state: State) -> State:
        result, loaded = state.result, state.loaded
        arch = loaded.arch
        if state.method_cfg is not None:  # a compressed model records its structural edits, even none
            arch = dict(arch, transforms=[*arch.get("transforms", []), *result.transforms])
        if state.method_cfg is not None:
            state.report["model"]["arch"] = arch
        manifest = _manifest(state)
        if self.trained:
            manifest.update(_trained_figures(state))
        masks = result.masks if result is not None else None
        state.manifest = artifact.save_model_files(state.run, state.model.cpu(), arch, manifest, masks)
        return state


@dataclass(frozen=True)
class InstallBaseline(Stage):
    """Install the trained weights as a built-in model's shipped baseline (rank 0 only)."""

    name: ClassVar[str] = "install_baseline"

    def run(self, state: State) -> State:
        manifest = state.manifest
        if state.loaded.arch.get("kind") != "builtin" or not distributed.current().is_main:
            return state
        weights, manifest_path = baseline_paths(state.loaded.arch["name"])
        weights.parent.mkdir(parents=True, exist_ok=True)
        artifact.write_atomic(weights, state.run.path(artifact.WEIGHTS_FILE).read_bytes())
        artifact.write_atomic(manifest_path, artifact.to_json(manifest))
        return state


@dataclass(frozen=True)
class Export(Stage):
    """Write and verify the exported files in the run; a mismatch is deferred (exit 4 once the run is written)."""

    settings: ExportSettings

    name: ClassVar[str] = "export"

    def run(self, state: State) -> State:
        if not distributed.current().is_main:
            return state
        report = state.report
        report["export"] = export_all(state.model.cpu(), state.splits.test, state.splits.calibration, self.settings,
                                      state.run.path("."))
        failures = export_failures(report["export"])
        if failures:
            if not report.get("audit", {}).get("problems"):
                report.update(status="export_failed", exit_code=ExportError.exit_code)
            state.deferred.append(ExportError(f"export verification failed: {failures[0]}; see "
                                              f"{state.options.out / 'report.md'}", report))
        return state
