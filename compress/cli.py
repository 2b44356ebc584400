"""The `compress` command line: thin commands that build configs, call compress.api, and print the report.

Exit codes: 0 ok · 1 unexpected failure · 2 bad usage, config or recipe · 3 budget or regression exceeded ·
4 export verification failed · 5 unsafe checkpoint refused · 6 compression audit failed (target or floor missed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from typer.core import TyperCommand

from compress.errors import EXIT_CODES, CompressError, UsageError

EXIT_HELP = "Exit codes: " + " · ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()) + "."
app = typer.Typer(help=f"Make trained PyTorch models smaller and faster, and prove it. {EXIT_HELP}",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
T = TypeVar("T")

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Built-in name, torchvision:NAME, "
                     "package.module:function, or a compress output directory. Default: the built-in baseline.")]
WeightsOpt = Annotated[Path | None, typer.Option(help="Weights file (.safetensors or a .pt state dict).")]
ClassesOpt = Annotated[int | None, typer.Option("--num-classes", help="Classes of the model's head.")]
TrustOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow unpickling code from checkpoints (unsafe).")]
DataOpt = Annotated[str | None, typer.Option(help="fashion-mnist, digits, fashion-mnist-canvas, digits-canvas (multitask) "
                   "or folder:PATH. Default: the model's own.")]
SeedOpt = Annotated[int, typer.Option(help="Seeds torch, NumPy and Python.")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Output directory (refused if it exists "
                   "unless --force). Default: runs/<command>-<time>.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing --out directory.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print only the JSON report on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No summary tables.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="torch intra-op threads for the run.")]


class Session:
    """Per-command console handling: results on stdout, progress on stderr only at a terminal."""

    def __init__(self, *, as_json: bool, quiet: bool, debug: bool) -> None:
        self.as_json, self.quiet, self.debug = as_json, quiet, debug
        # a log or pipe gets rich's 80 columns, too narrow for the latency table
        self.out = Console(no_color=bool(os.environ.get("NO_COLOR")) or None,
                           width=None if sys.stdout.isatty() else 132)
        self.err = Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")) or None)

    @property
    def show_progress(self) -> bool:
        return not self.quiet and not self.as_json and sys.stderr.isatty() and not os.environ.get("CI")

    @contextmanager
    def progress(self) -> Iterator[Callable[[str, int, int], None] | None]:
        """A progress callback drawing a bar on stderr, or None when bars are hidden."""
        if not self.show_progress:
            yield None
            return
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=self.err, transient=True) as bar:
            tasks: dict[str, Any] = {}

            def update(description: str, done: int, total: int) -> None:
                if description not in tasks:
                    tasks[description] = bar.add_task(description, total=total)
                bar.update(tasks[description], completed=done)

            yield update

    def run(self, fn: Callable[[], T]) -> T:
        """Call fn, turning domain errors into one line on stderr and their exit code."""
        try:
            return fn()
        except CompressError as exc:
            if self.debug:
                raise
            report = getattr(exc, "report", None)
            if report is not None:  # the run was written; show what it found, then fail
                self.emit(report)
                self.err.print(f"error: {exc}", highlight=False, soft_wrap=True)
                raise typer.Exit(exc.exit_code) from None
            self.fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            self.err.print("interrupted; rerun the same command to resume from the last finished epoch")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
            if self.debug:
                raise
            self.fail(f"unexpected error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback and "
                      "report it with the output of `compress env`)", 1, prefix="")

    def fail(self, message: str, code: int, prefix: str = "error: ") -> None:
        """One line on stderr (and, with --json, a JSON error object on stdout), then exit with `code`."""
        self.err.print(f"{prefix}{message}", highlight=False, soft_wrap=True)
        if self.as_json:
            from compress.report.schema import error_report

            sys.stdout.write(json.dumps(error_report(message, code)) + "\n")
        raise typer.Exit(code) from None

    def emit(self, report: dict[str, Any]) -> None:
        """The report as JSON or as tables (once: under torchrun only rank 0 prints)."""
        if int(os.environ.get("RANK", "0")) != 0:
            return
        if self.as_json:
            sys.stdout.write(json.dumps(report, default=str) + "\n")
        elif not self.quiet:
            from compress.report import print_summary

            print_summary(report, self.out)


def _default_out(command: str, out: Path | None) -> Path:
    return out or Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads {threads} must be >= 1")
        import torch

        torch.set_num_threads(threads)


def _split_patterns(values: list[str] | None) -> tuple[str, ...]:
    return tuple(p.strip() for v in values or [] for p in v.split(",") if p.strip())


METHOD_OPTIONS = {"sparsity": "sparsity", "min_threshold": "min_threshold", "min_keep": "min_keep",
                  "include": "include", "exclude": "exclude", "schedule": "schedule", "keep": "keep",
                  "macs_keep": "macs_keep", "min_group_channels": "min_group_channels", "delta0": "delta0",
                  "tau": "tau", "task_tau": "task_tau", "max_tau": "max_tau", "zero_loss_atol": "zero_loss_atol",
                  "top_p": "top_p", "exp": "exp", "macs_target": "macs_target", "macs_tolerance": "macs_tolerance",
                  "rounds": "rounds", "round_epochs": "round_epochs", "round_items": "round_items",
                  "round_to": "round_to", "ignore": "ignore"}
OPTION_OF = {"task_tau": "tau"}  # config keys filled from another option (--tau NAME=TAU gives task_tau)
FINETUNE_OPTIONS = {"finetune_epochs": "epochs", "optimizer": "optimizer", "lr": "lr", "distill": "distill"}


def _explicit(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option `name` on the command line (so it overrides the recipe)."""
    source = ctx.get_parameter_source(OPTION_OF.get(name, name))
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _merge(ctx: typer.Context, recipe_part: dict[str, Any] | None, options: dict[str, str],
           values: dict[str, Any]) -> dict[str, Any]:
    """Recipe values, overridden by options given explicitly; CLI defaults fill the rest."""
    merged = {key: values[opt] for opt, key in options.items()}
    for key, value in (recipe_part or {}).items():
        opt = next((o for o, k in options.items() if k == key), None)
        if opt is None or not _explicit(ctx, opt):
            merged[key] = value
    return merged


def _method_config(ctx: typer.Context, chosen: str, recipe_config: dict[str, Any] | None,
                   values: dict[str, Any]) -> Any:
    """The chosen method's config from the recipe and the options it accepts; an option given for another
    method's config is refused."""
    from compress import api

    config_type = api.METHODS[chosen].config_type
    accepted = {f.name for f in dataclasses.fields(config_type)}
    for opt, key in METHOD_OPTIONS.items():
        if key not in accepted and _explicit(ctx, opt):
            takes = ", ".join("--" + o.replace("_", "-") for o, k in METHOD_OPTIONS.items() if k in accepted)
            raise UsageError(f"--{opt.replace('_', '-')} does not apply to --method {chosen}; it takes {takes}")
    if _explicit(ctx, "keep") and _explicit(ctx, "macs_keep"):
        raise UsageError("give --keep (a parameter budget) or --macs-keep (a MACs budget), not both")
    merged = _merge(ctx, recipe_config, METHOD_OPTIONS, values)
    # recipe keys stay, so that a wrong one is reported by the config; unused CLI defaults go
    merged = {k: v for k, v in merged.items() if k in accepted or k in (recipe_config or {})}
    return config_type.from_dict(merged)


ExportFormatOpt = Annotated[str | None, typer.Option("--export", help="Also write and verify model.onnx (onnx) or "
                            "model.onnx + model.ort (ort) in the run directory.")]
Int8Opt = Annotated[bool, typer.Option("--int8", help="Also an int8 static (QDQ) model calibrated on the data set, "
                    "with its test accuracy.")]
StaticOpt = Annotated[bool, typer.Option("--static-shapes", help="Fix every shape, batch 1 (NNAPI and CoreML want "
                      "static shapes).")]


def _export_settings(fmt: str | None, int8: bool, static_shapes: bool) -> Any:
    """ExportSettings when --export is given; --int8 or --static-shapes without it is a usage error."""
    from compress.ship import ExportSettings

    if fmt is None:
        if int8 or static_shapes:
            raise UsageError("--int8 and --static-shapes apply to an export; add --export onnx or --export ort")
        return None
    return ExportSettings(format=fmt, int8=int8, static_shapes=static_shapes)


class _PruneCommand(TyperCommand):
    """`prune` whose --method help lists the registry, imported only when help is shown."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from compress.api import method_names

        for param in self.params:
            if param.name == "method":
                param.help = f"Compression method: {', '.join(method_names())}."
        super().format_help(ctx, formatter)


@app.command(cls=_PruneCommand)
def prune(
    ctx: typer.Context,
    method: Annotated[str, typer.Option(help="Compression method.")] = "globalmp",
    sparsity: Annotated[float, typer.Option(help="Fraction of conv/linear weights to prune.")] = 0.9,
    keep: Annotated[float, typer.Option(help="Low-rank methods (alds, svd, svd-energy): fraction of all "
                                        "parameters to keep.")] = 0.5,
    macs_keep: Annotated[float | None, typer.Option(help="Low-rank methods: fraction of MACs to keep instead of "
                                                    "--keep.")] = None,
    min_group_channels: Annotated[int, typer.Option(help="ALDS: input channels each group keeps at least "
                                                    "(e.g. 16 for speed on dense runtimes; 1: any k).")] = 1,
    min_threshold: Annotated[float, typer.Option(help="Floor: percent of all prunable weights every layer keeps "
                                                 "(the paper's MT, e.g. 0.05).")] = 0.0,
    min_keep: Annotated[float, typer.Option(help="Floor: fraction of its own weights every layer keeps.")] = 0.0,
    include: Annotated[list[str] | None, typer.Option(help="Prune only modules matching (glob or re:REGEX).")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Never prune modules matching (glob or re:REGEX).")] = None,
    schedule: Annotated[str, typer.Option(help="oneshot, or gradual (cubic, during fine-tuning).")] = "oneshot",
    delta0: Annotated[float, typer.Option(help="PAGCP: allowed relative rise of each task's calibration loss for "
                                          "the first unit.")] = 0.05,
    tau: Annotated[list[str] | None, typer.Option(help="PAGCP: bound on each task's calibration loss in the model "
                                                  "that ships, as a multiple of the original (default 5); NAME=TAU "
                                                  "(repeat) bounds one task, e.g. position=2.")] = None,
    max_tau: Annotated[float | None, typer.Option(help="PAGCP: a --macs-target may loosen tau up to this ceiling "
                                                  "(reported as tau_used); default: never.")] = None,
    zero_loss_atol: Annotated[float, typer.Option(help="PAGCP: the loss a task with zero original loss may reach "
                                                  "(an absolute bound instead of a ratio).")] = 1e-6,
    top_p: Annotated[float, typer.Option(help="PAGCP: share of units whose pruning is kept (smallest loss rise per "
                                         "MAC removed).")] = 1.0,
    exp: Annotated[bool, typer.Option("--exp/--no-exp", help="PAGCP: geometric schedule of the allowed rise "
                                      "(lambda from delta0, tau and the unit count).")] = False,
    macs_target: Annotated[float | None, typer.Option(help="PAGCP: fraction of the original MACs to keep; the search "
                                                      "varies delta0 (never tau) to meet it, else exits 6.")] = None,
    macs_tolerance: Annotated[float, typer.Option(help="PAGCP: |kept - target| allowed, as a fraction of the "
                                                  "original MACs.")] = 0.02,
    rounds: Annotated[str, typer.Option(help="PAGCP: rounds of pruning under the bound with a short fine-tune "
                                        "between them; auto: until --macs-target is met.")] = "1",
    round_epochs: Annotated[int, typer.Option(help="PAGCP: fine-tuning epochs between rounds.")] = 1,
    round_items: Annotated[int | None, typer.Option(help="PAGCP: training items each between-round fine-tune "
                                                    "uses (default: all).")] = None,
    round_to: Annotated[int, typer.Option(help="PAGCP: kept channel counts are multiples of this (units narrower "
                                          "than twice it are left alone).")] = 1,
    ignore: Annotated[list[str] | None, typer.Option(help="PAGCP: never prune the output channels of modules "
                                                     "matching (glob or re:REGEX); task heads are left alone "
                                                     "anyway.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="PAGCP: list the units (channels, coupled members) and "
                                          "what is left alone, then exit without probing or writing a run.")] = False,
    finetune_epochs: Annotated[int, typer.Option(help="Epochs of fine-tuning after pruning.")] = 0,
    optimizer: Annotated[str, typer.Option(help="sgd or adamw.")] = "sgd",
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 0.03,
    distill: Annotated[bool, typer.Option(help="Distil from the uncompressed model while fine-tuning.")] = False,
    latency: Annotated[bool, typer.Option(help="Measure PyTorch CPU latency beside the original.")] = True,
    bn_recalibrate: Annotated[bool, typer.Option(help="Re-estimate BatchNorm statistics on the calibration split "
                                                 "after compressing.")] = True,
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe (see recipes/); options given here override "
                                                "it.")] = None,
    export: ExportFormatOpt = None, int8: Int8Opt = False, static_shapes: StaticOpt = False,
    measure: Annotated[bool, typer.Option("--measure", help="Time every backend (PyTorch, ONNX Runtime, mobile "
                                          "proxy; batch 1 and 32) against the original and size every format.")] = False,
    model: ModelOpt = None, weights: WeightsOpt = None, num_classes: ClassesOpt = None, trust_pickle: TrustOpt = False,
    data: DataOpt = None, seed: SeedOpt = 0, out: OutOpt = None, force: ForceOpt = False, as_json: JsonOpt = False,
    quiet: QuietOpt = False, debug: DebugOpt = False, threads: ThreadsOpt = None,
) -> None:
    """Compress a model, optionally fine-tune it, measure it against the original, and save the run."""
    session = Session(as_json=as_json, quiet=quiet, debug=debug)
    values = dict(locals())
    values.update(include=_split_patterns(include), exclude=_split_patterns(exclude), ignore=_split_patterns(ignore))
    values.update(_tau_values(tau), rounds=_rounds_value(rounds))

    def go() -> dict[str, Any]:
        from compress import api
        from compress.config import FinetuneConfig, load_recipe

        _set_threads(threads)
        plan = load_recipe(str(recipe)) if recipe else {}
        chosen = plan.get("method", method) if not _explicit(ctx, "method") else method
        if chosen not in api.method_names():
            raise UsageError(f"unknown method {chosen!r}; choose one of {', '.join(api.method_names())}")
        cfg = _method_config(ctx, chosen, plan.get("config"), values)
        tune = FinetuneConfig.from_dict(_merge(ctx, plan.get("finetune"), FINETUNE_OPTIONS, values))
        if getattr(cfg, "schedule", "oneshot") == "gradual" and tune.epochs < 1:
            raise UsageError("--schedule gradual prunes during fine-tuning; give --finetune-epochs 1 or more")
        pick = {key: plan.get(key, values[key]) if not _explicit(ctx, key) else values[key]
                for key in ("model", "data", "seed")}
        source = api.ModelSource(spec=pick["model"], weights=str(weights) if weights else None,
                                 num_classes=num_classes, trust_pickle=trust_pickle)
        if dry_run:
            return api.plan(source, cfg, api.RunOptions(out=_default_out("prune", out), data=pick["data"],
                                                        seed=pick["seed"]))
        options = api.RunOptions(out=_default_out("prune", out), data=pick["data"], seed=pick["seed"], force=force,
                                 latency=latency, recalibrate_bn=bn_recalibrate,
                                 measure=api.LatencySettings() if measure else None,
                                 export=_export_settings(export, int8, static_shapes))
        with session.progress() as progress:
            return api.prune(source, cfg, options, tune, progress)

    report = session.run(go)
    if report.get("dry_run"):
        _print_plan(session, report)
        return
    session.emit(report)


def _tau_values(given: list[str] | None) -> dict[str, Any]:
    """`--tau 5 --tau position=2` as tau and task_tau (one plain number at most)."""
    plain = [v for v in given or [] if "=" not in v]
    if len(plain) > 1:
        raise typer.BadParameter(f"give one plain --tau (got {', '.join(plain)}); bound single tasks with NAME=TAU")
    try:
        tau = float(plain[0]) if plain else 5.0
    except ValueError:
        raise typer.BadParameter(f"--tau {plain[0]!r} must be a number or NAME=TAU, e.g. 5 or position=2") from None
    return {"tau": tau, "task_tau": tuple(v for v in given or [] if "=" in v)}


def _rounds_value(text: str) -> int | str:
    """`--rounds 3` or `--rounds auto`."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise typer.BadParameter(f"--rounds {text!r} must be a whole number or auto") from None


def _print_plan(session: Session, listing: dict[str, Any]) -> None:
    """The `prune --dry-run` listing: JSON with --json, else one line per unit and what is left alone."""
    if session.as_json:
        sys.stdout.write(json.dumps(listing, default=str) + "\n")
        return
    from rich.table import Table

    table = Table(title=f"PAGCP units of {listing['model']['source']} ({len(listing['units'])})")
    for column in ("unit", "kind", "channels", "coupled members", "input channels of"):
        table.add_column(column)
    for unit in listing["units"]:
        table.add_row(unit["name"], unit["kind"], str(unit["channels"]), ", ".join(unit["members"]),
                      ", ".join(unit["consumers"]))
    session.out.print(table)
    session.out.print(f"heads (never pruned): {', '.join(listing['heads']) or '-'}")
    session.out.print(f"ignored (--ignore {' '.join(listing['ignore_patterns']) or '-'}): "
                      f"{', '.join(listing['ignored']) or '-'}")
    for skipped in listing["skipped"]:
        session.out.print(f"skipped {skipped['name']}: {skipped['reason']}")


@app.command()
def finetune(
    model: Annotated[str, typer.Argument(help="A compress output directory (or any --model spec).")],
    epochs: Annotated[int, typer.Option(help="Epochs of fine-tuning.")] = 1,
    optimizer: Annotated[str, typer.Option(help="sgd or adamw.")] = "sgd",
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 0.03,
    teacher: Annotated[str | None, typer.Option(help="Model spec to distil from (e.g. the original).")] = None,
    weights: WeightsOpt = None, num_classes: ClassesOpt = None, trust_pickle: TrustOpt = False, data: DataOpt = None,
    seed: SeedOpt = 0, out: OutOpt = None, force: ForceOpt = False, as_json: JsonOpt = False, quiet: QuietOpt = False,
    debug: DebugOpt = False, threads: ThreadsOpt = None,
) -> None:
    """Fine-tune a compressed run; its pruned weights stay zero. An interrupted run resumes when rerun."""
    session = Session(as_json=as_json, quiet=quiet, debug=debug)

    def go() -> dict[str, Any]:
        from compress import api
        from compress.config import FinetuneConfig

        _set_threads(threads)
        cfg = FinetuneConfig(epochs=epochs, optimizer=optimizer, lr=lr, distill=teacher is not None)
        source = api.ModelSource(spec=model, weights=str(weights) if weights else None, num_classes=num_classes,
                                 trust_pickle=trust_pickle)
        teacher_source = api.ModelSource(spec=teacher, trust_pickle=trust_pickle) if teacher else None
        options = api.RunOptions(out=_default_out("finetune", out), data=data, seed=seed, force=force, latency=False)
        with session.progress() as progress:
            return api.finetune(source, cfg, options, teacher_source, progress)

    session.emit(session.run(go))


@app.command()
def train(
    model: ModelOpt = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 10,
    optimizer: Annotated[str, typer.Option(help="sgd or adamw.")] = "sgd",
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 0.1,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 128,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 200,
    install_baseline: Annotated[bool, typer.Option(help="Also install the result as the shipped baseline of a "
                                                   "built-in model.")] = False,
    num_classes: ClassesOpt = None, data: DataOpt = None, seed: SeedOpt = 0, out: OutOpt = None,
    force: ForceOpt = False, as_json: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Train a model from random initialisation (how the built-in baselines are made)."""
    session = Session(as_json=as_json, quiet=quiet, debug=debug)

    def go() -> dict[str, Any]:
        from compress import api
        from compress.config import FinetuneConfig
        from compress.models import DEFAULT_MODEL

        _set_threads(threads)
        cfg = FinetuneConfig(epochs=epochs, optimizer=optimizer, lr=lr, batch_size=batch_size,
                             warmup_steps=warmup_steps)
        spec = model or DEFAULT_MODEL
        # a built-in name alone would load its shipped weights; training starts from random ones
        source = api.ModelSource(spec=spec, num_classes=num_classes or 10) if ":" not in spec else \
            api.ModelSource(spec=spec, num_classes=num_classes)
        options = api.RunOptions(out=_default_out("train", out), data=data, seed=seed, force=force, latency=False)
        with session.progress() as progress:
            return api.train_model(source, cfg, options, install_baseline=install_baseline, progress=progress)

    session.emit(session.run(go))


@app.command()
def measure(
    model: Annotated[str, typer.Argument(help="Model to measure: a compress output directory or any --model spec.")],
    baseline: Annotated[str | None, typer.Option(help="Model to compare with, timed interleaved in one process. "
                                                 "Default: for a compress run, the model it was made from.")] = None,
    backend: Annotated[list[str] | None, typer.Option(help="pytorch-cpu, pytorch-cuda, onnxruntime-cpu or "
                                                      "mobile-proxy (repeat). Default: all this machine has.")] = None,
    batch: Annotated[list[int] | None, typer.Option(help="Batch sizes (repeat). Default: 1 and 32.")] = None,
    runs: Annotated[int, typer.Option(help="Timed runs per backend and batch, after warm-up.")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 3,
    input_shape: Annotated[str | None, typer.Option(help="C,H,W to measure at (e.g. 3,224,224); data are resized. "
                                                    "Default: the data set's.")] = None,
    weights: WeightsOpt = None, num_classes: ClassesOpt = None, trust_pickle: TrustOpt = False, data: DataOpt = None,
    seed: SeedOpt = 0, out: OutOpt = None, force: ForceOpt = False, as_json: JsonOpt = False, quiet: QuietOpt = False,
    debug: DebugOpt = False, threads: Annotated[int, typer.Option("--threads", help="Threads for PyTorch and ONNX "
                                                                 "Runtime (the mobile proxy always uses 1).")] = 1,
) -> None:
    """Parameters, MACs, bytes of every format and latency on every backend, beside a baseline."""
    session = Session(as_json=as_json, quiet=quiet, debug=debug)

    def go() -> dict[str, Any]:
        from compress import api

        _set_threads(threads)
        settings = api.LatencySettings(**({"backends": tuple(backend)} if backend else {}),
                                       batches=tuple(batch or (1, 32)), threads=threads, runs=runs, warmup=warmup,
                                       input_shape=_shape(input_shape))
        source = api.ModelSource(spec=model, weights=str(weights) if weights else None, num_classes=num_classes,
                                 trust_pickle=trust_pickle)
        reference = api.ModelSource(spec=baseline, trust_pickle=trust_pickle) if baseline else None
        options = api.RunOptions(out=_default_out("measure", out), data=data, seed=seed, force=force)
        return api.measure(source, reference, options, settings)

    report = session.run(go)
    for warning in report.get("warnings", []):
        session.err.print(f"warning: {warning}", highlight=False, soft_wrap=True)
    session.emit(report)


def _shape(text: str | None) -> tuple[int, ...] | None:
    """`3,224,224` as a tuple of ints."""
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--input-shape {text!r} must be C,H,W integers, e.g. 3,224,224") from None
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(f"--input-shape {text!r} must be three positive integers C,H,W, e.g. 3,224,224")
    return shape


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="Model to export: a compress output directory or any --model spec.")],
    format: Annotated[str, typer.Option("--format", help="onnx, or ort (ORT format for mobile, with the "
                                        "required-operators file).")] = "onnx",
    int8: Int8Opt = False, static_shapes: StaticOpt = False,
    weights: WeightsOpt = None, num_classes: ClassesOpt = None, trust_pickle: TrustOpt = False, data: DataOpt = None,
    seed: SeedOpt = 0, out: OutOpt = None, force: ForceOpt = False, as_json: JsonOpt = False, quiet: QuietOpt = False,
    debug: DebugOpt = False, threads: ThreadsOpt = None,
) -> None:
    """Export to ONNX or ORT format (optionally int8), verify it against PyTorch with ONNX Runtime (exit 4 when
    it differs), and report coverage by the mobile execution providers."""
    session = Session(as_json=as_json, quiet=quiet, debug=debug)

    def go() -> dict[str, Any]:
        from compress import api

        _set_threads(threads)
        settings = _export_settings(format, int8, static_shapes)
        source = api.ModelSource(spec=model, weights=str(weights) if weights else None, num_classes=num_classes,
                                 trust_pickle=trust_pickle)
        options = api.RunOptions(out=_default_out("export", out), data=data, seed=seed, force=force)
        return api.export_model(source, options, settings)

    session.emit(session.run(go))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A compress output directory holding report.json.")],
    as_json: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Re-render report.md and report.html of a run from its report.json (written atomically)."""
    session = Session(as_json=as_json, quiet=quiet, debug=debug)

    def go() -> dict[str, Any]:
        from compress import api

        return api.render_reports(run_dir)

    session.emit(session.run(go))


@app.command()
def env(as_json: JsonOpt = False) -> None:
    """Versions, CPU, threads and accelerator, for bug reports."""
    from compress.measure.conditions import environment

    info = environment()
    if as_json:
        sys.stdout.write(json.dumps(info) + "\n")
        return
    console = Console()
    for key, value in info.items():
        if isinstance(value, dict):
            for sub, version in value.items():
                console.print(f"{sub:>14}: {version}")
        else:
            console.print(f"{key:>14}: {value}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
