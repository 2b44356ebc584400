"""What every method shares: the context it may use, the result it returns, and the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compress.config import ConfigBase
from compress.data import Splits

Masks = dict[str, torch.Tensor]
KEEP_TOLERANCE = 0.005  # a keep budget (fraction of parameters or MACs) is met within this fraction of itself


@dataclass
class Context:
    """What a method may need beyond its config."""

    example_inputs: torch.Tensor
    splits: Splits | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    progress: Callable[[str, int, int], None] | None = None
    tasks: tuple[Any, ...] | None = None  # compress.tasks.Task per model output; None: one classification task
    # What the run does to a compressed model before it ships (BatchNorm re-estimation); None: nothing.
    finalize: Callable[[nn.Module], Any] | None = None
    # A short fine-tune (model, epochs, training items or None for all) for methods that prune in rounds.
    finetune: Callable[[nn.Module, int, int | None], Any] | None = None
    # The run's own evaluation: per-task mean loss of a model on a split (audits recompute with it, not with the
    # method's bookkeeping).
    task_losses: Callable[[nn.Module, Any], dict[str, float]] | None = None


@dataclass
class Result:
    """A compressed model, the masks that keep it compressed, per-layer stats and a summary for the report."""

    model: nn.Module
    masks: Masks = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    step_hook: Callable[[int, int], None] | None = None  # for schedules that prune during fine-tuning
    refresh: Callable[[], Result] | None = None  # recompute stats after fine-tuning changed the masks
    transforms: list[dict[str, Any]] = field(default_factory=list)  # structural edits, replayed from arch.json
    reference: nn.Module | None = None  # the model a method's bound is stated against (None: the original)
    sections: dict[str, Any] = field(default_factory=dict)  # report sections of its own (sparsity, keep)


@dataclass
class AuditOutcome:
    """What an audit found on the model that ships: problems (exit 6 when any) and the figures it measured."""

    problems: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


ApplyFn = Callable[[nn.Module, Any, Context], Result]
# (result, config, shipped model, original model, context): the method's promise checked on what ships
AuditFn = Callable[[Result, Any, nn.Module, nn.Module, Context], AuditOutcome]
PlanFn = Callable[[nn.Module, Any, Context], dict[str, Any]]


@dataclass(frozen=True)
class ReportSection:
    """A method's own table in report.md and report.html, built from report.json alone."""

    title: str
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    note: str = ""


SectionsFn = Callable[[dict[str, Any]], list[ReportSection]]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its CLI name, config type, apply function, audit and dry-run plan."""

    name: str
    config_type: type[ConfigBase]
    apply: ApplyFn
    audit: AuditFn | None = None
    plan: PlanFn | None = None
    report_sections: SectionsFn | None = None
    layer_kind: str = ""  # how report/ labels its per-layer rows: "pruning", "lowrank" or "channels"


METHODS: dict[str, MethodSpec] = {}


def register(name: str, config_type: type[ConfigBase], *, audit: AuditFn | None = None, plan: PlanFn | None = None,
             report_sections: SectionsFn | None = None, layer_kind: str = "") -> Callable[[ApplyFn], ApplyFn]:
    """Decorator: make `apply(model, cfg, ctx) -> Result` available as `--method name`, with the method's audit
    (what "target met" means for it), its dry-run plan and its own report sections."""

    def wrap(fn: ApplyFn) -> ApplyFn:
        METHODS[name] = MethodSpec(name, config_type, fn, audit, plan, report_sections, layer_kind)
        return fn

    return wrap


def layer_kind_of(report: dict[str, Any]) -> str:
    """How the per-layer rows of the method that wrote `report` are labelled ("" for other commands)."""
    spec = METHODS.get(str(report.get("method")))
    return spec.layer_kind if spec is not None else ""


def sections_for(report: dict[str, Any]) -> list[ReportSection]:
    """The report sections of the method that wrote `report` (none for other commands or unknown methods)."""
    spec = METHODS.get(str(report.get("method")))
    return spec.report_sections(report) if spec is not None and spec.report_sections is not None else []


def method_for_config(cfg: ConfigBase) -> MethodSpec:
    """The method registered for a config's type."""
    for spec in METHODS.values():
        if type(cfg) is spec.config_type:
            return spec
    raise KeyError(type(cfg).__name__)
