"""The `compress` command line: thin commands that build configs, call compress.api, and print the report.

Exit codes: 0 ok · 1 unexpected failure · 2 bad usage, config or recipe · 3 budget or regression exceeded ·
4 export verification failed · 5 unsafe checkpoint refused · 6 compression audit failed (target or floor missed).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import inspect
import json
import logging
import os
import re
import sys
import time
import typing
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, ClassVar, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from typer.core import TyperCommand, TyperGroup

from compress.errors import EXIT_CODES, BudgetError, CompressError, UsageError


class _StandIn(TyperCommand):
    """A command's placeholder in the app's group: its name and one-line help, no parameters (see _LazyGroup)."""


class _LazyGroup(TyperGroup):
    """The app's group, whose lazy commands get their parameters only when resolved (invoked or their --help shown).

    Typer builds every command's Click parameters from its callback's signature each time the app runs
    (typer.main.get_group), and prune's signature is generated from the method registry, whose import pulls in torch
    (seconds): `compress --help`, `env`, `report --help`... would all pay for it. So prune is registered as a
    _StandIn, enough for the listing, and its real command is built from its callback here."""

    lazy: ClassVar[dict[str, Callable[..., Any]]] = {}  # command name -> its real callback

    def resolve_command(self, ctx: typer.Context, args: list[str]) -> tuple[str | None, Any, list[str]]:
        name, cmd, rest = super().resolve_command(ctx, args)
        if name in self.lazy and isinstance(cmd, _StandIn):
            info = typer.models.CommandInfo(name=name, callback=self.lazy[name])
            cmd = self.commands[name] = typer.main.get_command_from_info(
                info, pretty_exceptions_short=app.pretty_exceptions_short, rich_markup_mode=self.rich_markup_mode)
        return name, cmd, rest


def _lazy_command(name: str, callback: Callable[..., Any]) -> None:
    """Register `callback` as the command `name`, its parameters built only when it is resolved (see _LazyGroup)."""

    def stand_in() -> None:
        raise AssertionError(f"{name}'s stand-in runs only if _LazyGroup did not resolve it")

    app.command(name=name, help=inspect.getdoc(callback), cls=_StandIn)(stand_in)
    _LazyGroup.lazy[name] = callback


EXIT_HELP = "Exit codes: " + " · ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()) + "."
app = typer.Typer(help=f"Make trained PyTorch models smaller and faster, and prove it. {EXIT_HELP}",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, cls=_LazyGroup)
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
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing --out that is a previous compress run "
                     "or an empty directory (a file or any other folder is refused, never deleted).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print only the JSON report on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No summary tables.")]
DebugOpt = Annotated[bool, typer.Option("--debug", "--verbose", help="Show tracebacks and libraries' warnings.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="torch intra-op threads for the run.")]
EvalItemsOpt = Annotated[int | None, typer.Option("--eval-items", help="Evaluate on the first N test items only "
                         "(recorded in the report; for large models on slow machines). Default: all.")]
ShapeOpt = Annotated[str | None, typer.Option("--input-shape", help="C,H,W the model takes (e.g. 3,48,48); the data "
                     "are brought to it (gray repeated to 3 channels, bilinear resize) and the run records it. "
                     "Default: the run's recorded shape, else the data's (a torchvision model that cannot run "
                     "there gets the smallest square input it runs at).")]
VerifyOpt = Annotated[bool, typer.Option("--verify/--no-verify", help="Check a run directory's files against the "
                      "sha256 in its manifest.json before loading it (exit 5 when one differs); --no-verify loads it "
                      "unchecked.")]


PLAIN_PROGRESS_S = 30.0


def _plain_progress(err: Console) -> Callable[[str, int, int], None]:
    """A progress callback printing `step: done/total (elapsed)` when 30 s have passed since the last line."""
    started = last = time.monotonic()

    def update(description: str, done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PLAIN_PROGRESS_S:
            last = now
            err.print(f"{description}: {done}/{total} ({now - started:.0f} s)", highlight=False, soft_wrap=True)

    return update


class _NoteHandler(logging.Handler):
    """compress's own notes (`logging.getLogger("compress")`) as `note: ...` lines on stderr."""

    def __init__(self, err: Console) -> None:
        super().__init__(logging.INFO)
        self.err = err

    def emit(self, record: logging.LogRecord) -> None:
        self.err.print(f"note: {record.getMessage()}", highlight=False, soft_wrap=True)


def _show_notes(err: Console, silent: bool) -> None:
    """Route compress's notes to this command's stderr (none with --quiet or --json)."""
    logger = logging.getLogger("compress")
    logger.handlers = [h for h in logger.handlers if not isinstance(h, _NoteHandler)]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if not silent:
        logger.addHandler(_NoteHandler(err))


class Session:
    """Per-command console handling: results on stdout, progress on stderr only at a terminal."""

    def __init__(self, *, as_json: bool, quiet: bool, debug: bool) -> None:
        self.as_json, self.quiet, self.debug = as_json, quiet, debug
        # a log or pipe gets rich's 80 columns, too narrow for the latency table
        self.out = Console(no_color=bool(os.environ.get("NO_COLOR")) or None,
                           width=None if sys.stdout.isatty() else 132)
        self.err = Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")) or None)
        _show_notes(self.err, quiet or as_json)
        if not debug:  # libraries' warnings (NumPy, ONNX, torch) are noise to a user; --debug shows them
            warnings.simplefilter("ignore")

    @property
    def show_progress(self) -> bool:
        return not self.quiet and not self.as_json and sys.stderr.isatty() and not os.environ.get("CI")

    @contextmanager
    def progress(self) -> Iterator[Callable[[str, int, int], None] | None]:
        """A progress callback drawing a bar on stderr at a terminal; elsewhere (CI, a log) a plain line at most
        every PLAIN_PROGRESS_S seconds, so that a long step never looks hung; None with --quiet or --json."""
        if self.quiet or self.as_json:
            yield None
            return
        if not self.show_progress:
            yield _plain_progress(self.err)
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
                self.err.print(f"error: {in_flags(str(exc))}", highlight=False, soft_wrap=True)
                raise typer.Exit(exc.exit_code) from None
            self.fail(in_flags(str(exc)), exc.exit_code)
        except KeyboardInterrupt:
            pipeline = sys.modules.get("compress.pipeline")  # loaded only by commands that run stages
            note = pipeline.interrupt_note() if pipeline is not None else "interrupted; nothing was saved"
            self.err.print(note, highlight=False, soft_wrap=True)
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
        elif not self.quiet and report.get("method") == "check":
            from compress.report.budgets import print_check

            print_check(report, self.out)
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


# `prune`'s options: its own (below), then one per field of the registered methods' configs and of FinetuneConfig,
# generated from the fields' metadata (see compress/config.py), grouped in --help panels.
PANEL_COMMON, PANEL_OUTPUT = "Common", "Measure and export"
OUTPUT_OPTIONS = ("latency", "export", "int8", "static_shapes", "measure")  # the rest of prune's own: Common
DEFAULT_METHOD = "globalmp"


def _prune_options(
    model: ModelOpt = None, weights: WeightsOpt = None, num_classes: ClassesOpt = None, trust_pickle: TrustOpt = False,
    verify: VerifyOpt = True, data: DataOpt = None, seed: SeedOpt = 0, input_shape: ShapeOpt = None,
    eval_items: EvalItemsOpt = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe (see recipes/); options given here override "
                                                "it.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="PAGCP: list the units (channels, coupled members) and "
                                          "what is left alone, then exit without probing or writing a run.")] = False,
    bn_recalibrate: Annotated[bool, typer.Option(help="Re-estimate BatchNorm statistics on the calibration split "
                                                 "after compressing.")] = True,
    out: OutOpt = None, force: ForceOpt = False, as_json: JsonOpt = False, quiet: QuietOpt = False,
    debug: DebugOpt = False, threads: ThreadsOpt = None,
    latency: Annotated[bool, typer.Option(help="Measure PyTorch CPU latency beside the original.")] = True,
    export: ExportFormatOpt = None, int8: Int8Opt = False, static_shapes: StaticOpt = False,
    measure: Annotated[bool, typer.Option("--measure", help="Time every backend (PyTorch, ONNX Runtime, mobile "
                                          "proxy; batch 1 and 32) against the original and size every "
                                          "format.")] = False,
) -> None:
    """The options of `prune` that are not config fields (only this signature is used)."""


@dataclasses.dataclass
class Flag:
    """An option of `prune` made from a config field; configs with a field of the same name share it."""

    field: dataclasses.Field[Any]
    hint: Any  # the field's type, resolved
    panel: str
    owners: list[str] = dataclasses.field(default_factory=list)  # the methods whose configs take it
    shared: bool = False  # its panel or the option serves several methods (the help then names them)

    @property
    def meta(self) -> Any:
        return self.field.metadata

    @property
    def decl(self) -> str:
        return self.meta.get("flag", "--" + self.field.name.replace("_", "-"))

    @property
    def name(self) -> str:
        """The parameter's name in the command (what Click reports the option's source under)."""
        return self.decl.lstrip("-").replace("-", "_")


def _flags(configs: list[tuple[type, str, str]]) -> dict[str, Flag]:
    """The options of the visible fields of `configs`, given as (config type, panel, method), by parameter name."""
    flags: dict[str, Flag] = {}
    for config_type, panel, owner in configs:
        hints = typing.get_type_hints(config_type)
        for field in dataclasses.fields(config_type):
            if field.metadata.get("hidden"):
                continue
            new = Flag(field, hints[field.name], panel)
            flag = flags.setdefault(new.name, new)
            if (flag.field.name, flag.hint) != (field.name, new.hint):
                raise TypeError(f"{config_type.__name__}.{field.name} and another config's {flag.field.name} share "
                                f"the option {flag.decl} with another field or type; give one a metadata 'flag'")
            flag.owners.append(owner)
    per_panel = collections.Counter(panel for _, panel, _ in configs)
    for flag in flags.values():
        flag.shared = len(flag.owners) > 1 or per_panel[flag.panel] > 1
    return flags


RUN_FLAGS = {"data": "--data", "model": "--model", "weights": "--weights"}


def in_flags(message: str) -> str:
    """A domain message in the CLI's words: the `setting` names methods and configs write become the flags that
    set them (the API and recipes keep the names)."""
    if "`" not in message:
        return message
    from compress.config import FinetuneConfig
    from compress.methods import METHODS

    flags = dict(RUN_FLAGS)
    for config_type in (FinetuneConfig, *(spec.config_type for spec in METHODS.values())):
        for field in dataclasses.fields(config_type):
            if not field.metadata.get("hidden"):
                flags.setdefault(field.name, field.metadata.get("flag", "--" + field.name.replace("_", "-")))
    return re.sub(r"`([a-z_]+)`", lambda m: flags.get(m.group(1), m.group(0)), message)


def _method_flags() -> dict[str, Flag]:
    """The options of every registered method's config, the default method's first."""
    from compress.methods import METHODS

    specs = sorted(METHODS.values(), key=lambda spec: spec.name != DEFAULT_METHOD)
    return _flags([(spec.config_type, spec.config_type.cli_panel or spec.name, spec.name) for spec in specs])


def _tune_flags() -> dict[str, Flag]:
    from compress.config import FinetuneConfig

    return _flags([(FinetuneConfig, FinetuneConfig.cli_panel, "")])


def _number_or_word(hint: Any) -> bool:
    """Whether a field takes a number or a word (e.g. rounds: int | str, 3 or auto)."""
    args = typing.get_args(hint)
    return str in args and len(args) > 1


def _cli_type(flag: Flag) -> tuple[Any, Any]:
    """The option's type and default: a list for a tuple field or NAME=VALUE items, text for a number or word."""
    field = flag.field
    factory = field.default_factory
    default = flag.meta.get("cli_default", field.default if factory is dataclasses.MISSING else factory())
    if "per_name" in flag.meta:
        return list[str] | None, None
    if typing.get_origin(flag.hint) is tuple:
        return list[typing.get_args(flag.hint)[0]] | None, None  # type: ignore[misc]
    if _number_or_word(flag.hint):
        return str, str(default)
    return flag.hint, default


def _help(flag: Flag) -> str:
    """The field's help, then the methods it serves when they are several, and a list option's default."""
    text = flag.meta.get("help", "")
    if flag.shared:
        text += f" For {', '.join(flag.owners)}."
    if "per_name" in flag.meta:  # a list option: its default is the field's
        text += f" Default: {flag.field.default}."
    return text


def _metavar(flag: Flag) -> str | None:
    """`oneshot|gradual` for a field with choices, `<int>|auto` for a number or a word; else Typer's."""
    choices = flag.meta.get("choices")
    if not choices:
        return None
    return "|".join([*(f"<{a.__name__}>" for a in typing.get_args(flag.hint) if a is not str), *choices])


def _parameter(flag: Flag) -> inspect.Parameter:
    """The option as a parameter of the command's signature (what Typer builds the Click option from)."""
    annotation, default = _cli_type(flag)
    decl = flag.decl + (f"/--no-{flag.decl[2:]}" if flag.hint is bool else "")
    option = typer.Option(default, decl, help=_help(flag), rich_help_panel=flag.panel, metavar=_metavar(flag))
    return inspect.Parameter(flag.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def _in_panel(param: inspect.Parameter, panel: str) -> inspect.Parameter:
    """One of prune's own options, shown in `panel` (its typer.Option copied: other commands share it)."""
    base, info = typing.get_args(param.annotation)
    info = copy.copy(info)
    info.rich_help_panel = panel
    return param.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[base, info])


def _prune_signature() -> inspect.Signature:
    """prune's signature: its own options, --method, and the generated ones of the methods registered now."""
    from compress.methods import METHODS

    own = list(inspect.signature(_prune_options, eval_str=True).parameters.values())
    method = typer.Option(DEFAULT_METHOD, "--method", help=f"Compression method: {', '.join(sorted(METHODS))}.",
                          rich_help_panel=PANEL_COMMON)
    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
              inspect.Parameter("method", inspect.Parameter.KEYWORD_ONLY, default=method, annotation=str),
              *(_in_panel(p, PANEL_COMMON) for p in own if p.name not in OUTPUT_OPTIONS),
              *(_parameter(flag) for flag in (*_method_flags().values(), *_tune_flags().values())),
              *(_in_panel(p, PANEL_OUTPUT) for p in own if p.name in OUTPUT_OPTIONS)]
    clashes = sorted(name for name, n in collections.Counter(p.name for p in params).items() if n > 1)
    if clashes:
        raise TypeError(f"config fields clash with prune's options {clashes}; give them a metadata 'flag'")
    return inspect.Signature(params)


class _LiveSignature:
    """A command callback whose signature is computed each time it is read. Typer reads it when it builds the
    command (for prune: when _LazyGroup resolves it), so `prune` offers the options of the methods registered at
    that moment."""

    def __init__(self, fn: Callable[..., None], signature: Callable[[], inspect.Signature]) -> None:
        functools.update_wrapper(self, fn)
        self._fn, self._signature = fn, signature

    @property
    def __signature__(self) -> inspect.Signature:
        return self._signature()

    def __call__(self, **values: Any) -> None:
        self._fn(**values)


def prune(ctx: typer.Context, **values: Any) -> None:
    """Compress a model, optionally fine-tune it, measure it against the original, and save the run."""
    session = Session(as_json=values["as_json"], quiet=values["quiet"], debug=values["debug"])
    report = session.run(lambda: _prune(ctx, SimpleNamespace(**values), session))
    if report.get("dry_run"):
        _print_plan(session, report)
        return
    session.emit(report)


_lazy_command("prune", _LiveSignature(prune, _prune_signature))


def _prune(ctx: typer.Context, opts: SimpleNamespace, session: Session) -> dict[str, Any]:
    """The configs from the recipe and the options, then the dry-run plan or the run."""
    from compress import api
    from compress.config import load_recipe

    _set_threads(opts.threads)
    recipe = load_recipe(str(opts.recipe)) if opts.recipe else {}
    cfg, tune = _prune_configs(ctx, recipe, vars(opts))
    pick = {key: getattr(opts, key) if _explicit(ctx, key) else recipe.get(key, getattr(opts, key))
            for key in ("model", "data", "seed")}
    source = api.ModelSource(spec=pick["model"], weights=str(opts.weights) if opts.weights else None,
                             num_classes=opts.num_classes, trust_pickle=opts.trust_pickle, verify=opts.verify)
    out = _default_out("prune", opts.out)
    if opts.dry_run:
        return api.plan(source, cfg, api.RunOptions(out=out, data=pick["data"], seed=pick["seed"],
                                                    input_shape=_shape(opts.input_shape)))
    options = api.RunOptions(out=out, data=pick["data"], seed=pick["seed"], force=opts.force, latency=opts.latency,
                             input_shape=_shape(opts.input_shape), eval_items=opts.eval_items,
                             recalibrate_bn=opts.bn_recalibrate,
                             measure=api.LatencySettings() if opts.measure else None,
                             export=_export_settings(opts.export, opts.int8, opts.static_shapes))
    with session.progress() as progress:
        return api.prune(source, cfg, options, tune, progress)


def _prune_configs(ctx: typer.Context, recipe: dict[str, Any], values: dict[str, Any]) -> tuple[Any, Any]:
    """The method's config and the fine-tuning config: the recipe's, overridden by the options given."""
    from compress import api
    from compress.config import FinetuneConfig

    chosen = values["method"] if _explicit(ctx, "method") else recipe.get("method", values["method"])
    if chosen not in api.method_names():
        raise UsageError.unknown("method", chosen, api.method_names())
    cfg = _method_config(ctx, chosen, recipe.get("config"), values)
    tune = FinetuneConfig.from_dict(_merged(ctx, _tune_flags().values(), recipe.get("finetune"), values))
    if getattr(cfg, "schedule", "oneshot") == "gradual" and tune.epochs < 1:
        raise UsageError("--schedule gradual prunes during fine-tuning; give --finetune-epochs 1 or more")
    return cfg, tune


def _explicit(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option `name` on the command line (so it overrides the recipe)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _method_config(ctx: typer.Context, chosen: str, recipe_config: dict[str, Any] | None,
                   values: dict[str, Any]) -> Any:
    """The chosen method's config from the recipe and the options it takes; an option of another method's config
    is refused."""
    from compress import api

    config_type = api.METHODS[chosen].config_type
    order = [field.name for field in dataclasses.fields(config_type)]
    flags = list(_method_flags().values())
    takes = sorted((flag for flag in flags if chosen in flag.owners), key=lambda flag: order.index(flag.field.name))
    for flag in flags:
        if chosen not in flag.owners and _explicit(ctx, flag.name):
            names = ", ".join(f.decl for f in takes) or "no method options"
            raise UsageError(f"{flag.decl} does not apply to --method {chosen}; it takes {names}")
    for flag in takes:  # e.g. --macs-keep replaces --keep: not both
        replaced = next((f for f in takes if f.field.name == flag.meta.get("replaces")), None)
        if replaced and _explicit(ctx, flag.name) and _explicit(ctx, replaced.name):
            raise UsageError(f"give {replaced.decl} or {flag.decl}, not both ({flag.decl} replaces {replaced.decl})")
    return config_type.from_dict(_merged(ctx, takes, recipe_config, values))


def _merged(ctx: typer.Context, flags: Iterable[Flag], recipe_part: dict[str, Any] | None,
            values: dict[str, Any]) -> dict[str, Any]:
    """Recipe values (every key kept, so that the config reports a wrong one), overridden by the options given;
    an option's cli_default fills a key that neither gives; the config's defaults fill the rest."""
    merged = dict(recipe_part or {})
    for flag in flags:
        if _explicit(ctx, flag.name):
            merged.update(_config_values(flag, values[flag.name]))
        elif "cli_default" in flag.meta:
            merged.setdefault(flag.field.name, flag.meta["cli_default"])
    return merged


def _config_values(flag: Flag, value: Any) -> dict[str, Any]:
    """An option's value as config keys and values (checked by the config itself)."""
    name = flag.field.name
    if "per_name" in flag.meta:
        return _per_name_values(flag, value or [])
    if typing.get_origin(flag.hint) is tuple:
        return {name: _split_patterns(value) if typing.get_args(flag.hint)[0] is str else tuple(value or ())}
    if _number_or_word(flag.hint):
        return {name: _number_or_word_value(flag, value)}
    return {name: value}


def _per_name_values(flag: Flag, given: list[str]) -> dict[str, Any]:
    """`--tau 5 --tau position=2`: one plain value for the field, NAME=VALUE items for the field its "per_name"
    metadata names (checked by the config)."""
    plain, named = [v for v in given if "=" not in v], tuple(v for v in given if "=" in v)
    word = flag.field.name.upper()
    if len(plain) > 1:
        raise UsageError(f"give one plain {flag.decl} (got {', '.join(plain)}); set single ones with NAME={word}")
    values: dict[str, Any] = {flag.meta["per_name"]: named} if named else {}
    if plain:
        try:
            values[flag.field.name] = flag.hint(plain[0])
        except ValueError:
            raise UsageError(f"{flag.decl} {plain[0]!r} must be a number or NAME={word}") from None
    return values


def _number_or_word_value(flag: Flag, text: str) -> int | float | str:
    """`--rounds 3` or `--rounds auto`: a number, or one of the field's "choices" words."""
    words = flag.meta.get("choices", ())
    if text.strip().lower() in words:
        return text.strip().lower()
    number = next(a for a in typing.get_args(flag.hint) if a is not str)
    try:
        return number(text)
    except ValueError:
        kind = "a whole number" if number is int else "a number"
        raise UsageError(f"{flag.decl} {text!r} must be {kind} or {' or '.join(words)}") from None


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
    weights: WeightsOpt = None, num_classes: ClassesOpt = None, trust_pickle: TrustOpt = False,
    verify: VerifyOpt = True, data: DataOpt = None, input_shape: ShapeOpt = None, eval_items: EvalItemsOpt = None,
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
                                 trust_pickle=trust_pickle, verify=verify)
        teacher_source = api.ModelSource(spec=teacher, trust_pickle=trust_pickle, verify=verify) if teacher else None
        options = api.RunOptions(out=_default_out("finetune", out), data=data, seed=seed, force=force, latency=False,
                                 input_shape=_shape(input_shape), eval_items=eval_items)
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
    num_classes: ClassesOpt = None, data: DataOpt = None, input_shape: ShapeOpt = None, seed: SeedOpt = 0,
    eval_items: EvalItemsOpt = None, out: OutOpt = None,
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
        options = api.RunOptions(out=_default_out("train", out), data=data, seed=seed, force=force, latency=False,
                                 input_shape=_shape(input_shape), eval_items=eval_items)
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
    input_shape: ShapeOpt = None,
    layer_table: Annotated[bool, typer.Option("--layer-table/--no-layer-table", help="Where the time goes: the "
                                              "slowest layers on every backend and batch, with their share of the "
                                              "time and of the MACs (ONNX Runtime's profiler; hooks on PyTorch).")
                           ] = True,
    weights: WeightsOpt = None, num_classes: ClassesOpt = None, trust_pickle: TrustOpt = False,
    verify: VerifyOpt = True, data: DataOpt = None,
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
                                       batches=tuple(batch or (1, 32)), threads=threads, runs=runs, warmup=warmup)
        source = api.ModelSource(spec=model, weights=str(weights) if weights else None, num_classes=num_classes,
                                 trust_pickle=trust_pickle, verify=verify)
        reference = api.ModelSource(spec=baseline, trust_pickle=trust_pickle, verify=verify) if baseline else None
        options = api.RunOptions(out=_default_out("measure", out), data=data, seed=seed, force=force,
                                 input_shape=_shape(input_shape))
        return api.measure(source, reference, options, settings, layer_table=layer_table)

    report = session.run(go)
    for warning in report.get("warnings", []):
        session.err.print(f"warning: {warning}", highlight=False, soft_wrap=True)
    session.emit(report)


def _shape(text: str | None) -> tuple[int, int, int] | None:
    """`3,224,224` as a tuple of ints (exit 2 on anything else)."""
    from compress.data.inputs import parse_shape

    return parse_shape(text)


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="Model to export: a compress output directory or any --model spec.")],
    format: Annotated[str, typer.Option("--format", help="onnx, or ort (ORT format for mobile, with the "
                                        "required-operators file).")] = "onnx",
    int8: Int8Opt = False, static_shapes: StaticOpt = False,
    weights: WeightsOpt = None, num_classes: ClassesOpt = None, trust_pickle: TrustOpt = False,
    verify: VerifyOpt = True, data: DataOpt = None, input_shape: ShapeOpt = None,
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
                                 trust_pickle=trust_pickle, verify=verify)
        options = api.RunOptions(out=_default_out("export", out), data=data, seed=seed, force=force,
                                 input_shape=_shape(input_shape))
        return api.export_model(source, options, settings)

    session.emit(session.run(go))


@app.command("verify")
def verify_command(
    run: Annotated[Path, typer.Argument(help="A compress output directory (of a prune, finetune or train run).")],
    as_json: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False, threads: ThreadsOpt = None,
) -> None:
    """Check a run: its files against manifest.json, the model rebuilt weights-only, its test metrics against
    report.json.

    Files: every file manifest.json lists (model.safetensors, arch.json) must match its sha256, else exit 5 naming
    the file; report.*, recipe.resolved.yaml and exports are written after the manifest and are not hashed.
    Metrics: the model is re-evaluated on the test split of the run's data set and seed; each task must match
    report.json's figure for the saved model (after fine-tuning, else after compression, else before) within 0.01
    points of accuracy or 1e-4 of IoU or pixel error, else exit 3 naming the metric, the recorded and the measured
    value. Exit 0 when everything matches. Writes nothing."""
    session = Session(as_json=as_json, quiet=quiet, debug=debug)

    def go() -> dict[str, Any]:
        import shlex

        from compress import api

        _set_threads(threads)
        return api.verify(run, command=shlex.join(["compress", *sys.argv[1:]]))

    session.emit(session.run(go))


@app.command()
def check(
    current: Annotated[str, typer.Argument(help="What to check: a compress run directory, its report.json, or a model "
                                           "spec (rescnn, torchvision:NAME, pkg.module:function) that check "
                                           "measures itself.")],
    baseline: Annotated[str | None, typer.Option(help="What to compare with (a run directory, report.json or model "
                                                 "spec). Default: the run's origin (model.before) when its report "
                                                 "records one, else absolute limits only.")] = None,
    budgets: Annotated[Path | None, typer.Option(help="YAML budgets file (see the README, 'Gate a model in "
                                                 "CI').")] = None,
    write_budgets: Annotated[Path | None, typer.Option("--write-budgets", help="Write a starting budgets file "
                                                       "from CURRENT's own figures, then exit.")] = None,
    warn_as_error: Annotated[bool, typer.Option("--warn-as-error", help="Exit 3 on warnings too.")] = False,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Also write a pull-request comment "
                                                  "(Markdown, first line <!-- compress-check -->).")] = None,
    benchmark_json: Annotated[Path | None, typer.Option("--benchmark-json", help="Also write "
                                                        "github-action-benchmark's customSmallerIsBetter "
                                                        "JSON.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --write-budgets file.")] = False,
    weights: Annotated[Path | None, typer.Option(help="Weights of CURRENT when it is a model spec.")] = None,
    baseline_weights: Annotated[Path | None, typer.Option(help="Weights of --baseline when it is a model "
                                                          "spec.")] = None,
    data: DataOpt = None, seed: SeedOpt = 0, verify: VerifyOpt = True,
    latency_runs: Annotated[int, typer.Option(help="Timed rounds per latency budget when check times the two "
                                              "models itself.")] = 20,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Check a model against budgets on size, MACs, accuracy and speed: exit 0 when all hold or only warn, 3 on any
    error, 2 on a wrong budgets file (naming file, line and key), 5 on a run whose files differ from its manifest.
    Runs are read from report.json; a model spec is measured here; latency budgets are timed here, the two models
    interleaved, when both are at hand (run directories or specs). Writes nothing but the files asked for."""
    session = Session(as_json=as_json, quiet=quiet, debug=debug)
    sides = CheckSides(current, baseline, weights, baseline_weights, verify)
    measuring = MeasureChoices(data, seed, latency_runs, threads)
    result = session.run(lambda: _check(session, sides, measuring, budgets, write_budgets, warn_as_error,
                                        (markdown, benchmark_json), force))
    if result is not None:
        session.emit(result)


@dataclasses.dataclass(frozen=True)
class CheckSides:
    """CURRENT and --baseline as typed, with the weights of each when it is a model spec."""

    current: str
    baseline: str | None
    weights: Path | None
    baseline_weights: Path | None
    verify: bool


@dataclasses.dataclass(frozen=True)
class MeasureChoices:
    """How check measures a model spec or times two models: data, seed, rounds, threads."""

    data: str | None
    seed: int
    latency_runs: int
    threads: int | None


def _check(session: Session, sides: CheckSides, measuring: MeasureChoices, budgets: Path | None,
           write_budgets: Path | None, warn_as_error: bool, outputs: tuple[Path | None, Path | None],
           force: bool) -> dict[str, Any] | None:
    """`compress check`'s work: write a starting budgets file, or check the runs (BudgetError, exit 3, on failure)."""
    from compress import check as checks

    if write_budgets is not None:
        if budgets is not None or sides.baseline is not None:
            raise UsageError("--write-budgets takes only the run; drop --budgets and --baseline")
        _write_budgets(checks, _check_reports(checks, sides, measuring, None)[0], sides.current, write_budgets, force)
        session.err.print(f"wrote {write_budgets}; check with: compress check {sides.current} --budgets "
                          f"{write_budgets}", highlight=False, soft_wrap=True)
        return None
    if budgets is None:
        raise UsageError("--budgets FILE is required; write a starting one with --write-budgets FILE")
    current, baseline = _check_reports(checks, sides, measuring, budgets)
    result = checks.check_runs(current, baseline, budgets, sources=(sides.current, sides.baseline),
                               warn_as_error=warn_as_error, command=_command_line())
    _write_check_files(checks, result, *outputs)
    if result["exit_code"]:
        raise BudgetError(checks.failure_message(result), report=result)
    return result


def _check_reports(checks: Any, sides: CheckSides, measuring: MeasureChoices,
                   budgets: Path | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The two reports to check: read from runs; measured (torch imported only then) for a spec or to time two
    models at hand."""
    current = checks.side_of(sides.current, verify=sides.verify)
    baseline = checks.side_of(sides.baseline, verify=sides.verify) if sides.baseline else None
    for side, weights in ((current, sides.weights), (baseline, sides.baseline_weights)):
        if weights is not None and (side is None or side.kind != "spec"):
            raise UsageError(f"--{'baseline-' if side is baseline else ''}weights {weights} applies to a model spec "
                             "only; a run directory carries its own weights")
    both_models = baseline is not None and current.has_model and baseline.has_model
    if current.kind != "spec" and (baseline is None or baseline.kind != "spec") and not (
            both_models and budgets is not None and checks.latency_requests(budgets)):
        return current.report, baseline.report if baseline is not None else None
    from compress import api, check_models

    _set_threads(measuring.threads)
    sources = tuple(api.ModelSource(spec=side.text, weights=str(w) if w else None, verify=sides.verify)
                    for side, w in ((current, sides.weights), (baseline, sides.baseline_weights)) if side is not None)
    options = check_models.MeasureOptions(data=measuring.data, seed=measuring.seed,
                                          latency_runs=measuring.latency_runs)
    return check_models.gather(current, baseline, budgets, sources, options)


def _command_line() -> str:
    import shlex

    return shlex.join(["compress", *sys.argv[1:]])


def _write_budgets(checks: Any, report: dict[str, Any], current: str, path: Path, force: bool) -> None:
    """--write-budgets: a starting file from the run's own figures (refused over an existing file unless --force)."""
    if path.exists() and not force:
        raise UsageError(f"{path} exists; choose another name or add --force to replace it")
    _write_text(path, checks.starting_budgets(report, current))


def _write_check_files(checks: Any, result: dict[str, Any], markdown: Path | None, bench: Path | None) -> None:
    """--markdown and --benchmark-json, each written to a temporary name and renamed."""
    if markdown is not None:
        from compress.report.budgets import render_check_markdown

        _write_text(markdown, render_check_markdown(result, checks.MARKER))
    if bench is not None:
        _write_text(bench, json.dumps(checks.benchmark_entries(result), indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (a temporary name in the same folder, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


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
