"""PAGCP: performance-aware global channel pruning for multitask CNNs (Ye et al., TPAMI 2023; METHODS.md §2).

Units are Torch-Pruning dependency groups: a convolution's output channels together with everything coupled to
them (residual adds, concats, norms, depthwise convolutions, the consumers' input channels). Layers that produce
a model output (every task's head) are found from the graph and never pruned; their inputs shrink.

The search runs on one working copy with one dependency graph: a probe prunes a unit in place, evaluates, and
puts the touched modules' tensors and attributes back (tp replaces parameters rather than editing them, so the
originals are kept by reference). Each unit is pruned by the largest ratio of the grid whose every task's
calibration loss stays within 1 + delta_i of the running baseline, and within tau of the original (which
without `exp`, where delta stays delta0, is what bounds the total). The pruning that top-P keeps is then
replayed on the caller's model with the channel indices the search chose (a unit's output-channel indices are
the original ones: units are disjoint and each is pruned once), so with top_p = 1 the result is exactly the
searched model.

`macs_target`: the search is repeated with delta0 scaled by s and tau raised to the power s (lambda recomputed),
s found by bracketing (x4 steps) then geometric bisection, until the kept MACs are within `macs_tolerance` of
the target; the run closest to the target from below (or, if none reaches it, the one pruning most) is kept and
`target_met` says whether it reached the target.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.config import PAGCPConfig, matches
from compress.errors import UsageError
from compress.measure import count_macs, count_params
from compress.methods.base import Context, Result, register
from compress.models.loader import register_transform
from compress.tasks import CLASSIFICATION, Tasks

TRANSFORM = "channels"
EVAL_BATCH = 256
SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features",
               "num_channels", "num_parameters", "normalized_shape", "embedding_dim")


# ---------------------------------------------------------------------------------------------------- lambda


def solve_lambda(delta0: float, tau: float, units: int) -> float:
    """λ > 0 with prod_{i<units} (1 + delta0 λ^i) = tau, by bisection in log space (to ~1e-12).

    One unit, or 1 + delta0 >= tau, leaves nothing to solve: λ = 1, resp. 0 (only the first unit may rise).
    """
    if units <= 1:
        return 1.0
    target = math.log(tau)
    if math.log1p(delta0) >= target:
        return 0.0

    def excess(lam: float) -> float:
        log_lam, total = math.log(lam), 0.0
        for i in range(units):
            x = math.log(delta0) + i * log_lam
            total += x + math.log1p(math.exp(-x)) if x > 30 else math.log1p(math.exp(x))
        return total - target

    lo, hi = 1e-12, 1.0
    while excess(hi) < 0:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if excess(mid) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------------------- units


@dataclass
class Unit:
    """A prunable set of coupled output channels, rooted at one Conv/Linear."""

    index: int                   # discovery order
    name: str                    # root module name
    kind: str
    channels: int
    members: list[str]           # modules whose output channels go (conv, linear, norms)
    consumers: list[str]         # modules whose input channels go
    chunks: int = 1              # grouped convolutions: channels removed at the same positions in each chunk
    contribution: int = 0        # MACs removed by the probe (probe_ratio of the channels)
    probe_removed: int = 0


@dataclass
class Graph:
    """A model, its dependency graph, and the units and what was left alone."""

    model: nn.Module
    dg: Any
    units: list[Unit]
    heads: list[str]
    ignored: list[str]
    skipped: list[dict[str, str]]
    modules: dict[str, nn.Module] = field(default_factory=dict)


def _tp():
    import torch_pruning as tp

    return tp


@contextmanager
def _module_stack(model: nn.Module) -> Iterator[list[str]]:
    """The names of the modules running now (innermost last), for naming the module that broke a trace."""
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def enter(module: nn.Module, _inputs: Any) -> None:
        stack.append(names[module])

    def leave(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        if stack:
            stack.pop()

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return []


def build_graph(model: nn.Module, example: torch.Tensor, ignore: tuple[str, ...] = ()) -> Graph:
    """Trace `model` with Torch-Pruning and list its units; heads, ignored and unprunable groups are left alone."""
    tp = _tp()
    captured: list[Any] = []
    was_training = model.training
    model.eval()
    with _module_stack(model) as stack, torch.enable_grad():
        try:
            dg = tp.DependencyGraph().build_dependency(
                model, example, forward_fn=lambda m, x: m(x), verbose=False,
                output_transform=lambda out: captured.append(out) or out)
        except Exception as exc:  # noqa: BLE001 - tracing raises anything the model's forward can raise
            where = stack[-1] if stack else ""
            module = model.get_submodule(where) if where else model
            label = f"module {where!r} ({type(module).__name__})" if where else f"{type(model).__name__}"
            first = (str(exc).splitlines() or [""])[0][:200]
            raise UsageError(f"Torch-Pruning cannot trace {label}: {type(exc).__name__}: {first}; make its forward "
                             "traceable with autograd (tensor outputs, no torch.no_grad or in-place edits of its "
                             "input) or prune a model without it") from None
    model.train(was_training)
    outputs = _flatten(captured[0]) if captured else []
    roots = {id(o.grad_fn) for o in outputs if o.grad_fn is not None}
    names = {m: n for n, m in model.named_modules()}
    root_nodes = {node for node in dg.module2node.values() if id(node.grad_fn) in roots}
    conv, linear = tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR
    user_ignored = {m for n, m in model.named_modules() if n and any(matches(n, p) for p in ignore)}
    units, heads, ignored, skipped = [], [], [], []
    for group in dg.get_all_groups(ignored_layers=[], root_module_types=(conv, linear)):
        root = group[0].dep.target.module
        out_members = [dep.target.module for dep, _ in group if dg.is_out_channel_pruning_fn(dep.handler)
                       and isinstance(dep.target.module, nn.Module) and dep.target.module in names]
        reaches_output = any(dep.target in root_nodes and (dep.target.type == tp.ops.OPTYPE.OUTPUT or
                                                           dg.is_out_channel_pruning_fn(dep.handler))
                             for dep, _ in group)
        layer_names = [names[m] for m in out_members if isinstance(m, (conv, linear))]
        if reaches_output:
            heads.extend(layer_names)
            continue
        if any(m in user_ignored for m in out_members):
            ignored.extend(layer_names)
            continue
        pruner = dg.get_pruner_of_module(root)
        channels = pruner.get_out_channels(root)
        chunks = 1
        for dep, _ in group:
            m = dep.target.module
            if isinstance(m, conv) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels):
                chunks = math.lcm(chunks, m.groups)
        if channels is None or channels < 2:
            skipped.append({"name": names.get(root, "?"), "reason": "fewer than 2 output channels"})
            continue
        if channels % chunks or channels // chunks < 2 and chunks > 1:
            skipped.append({"name": names[root], "reason": f"channels {channels} do not split into {chunks} "
                                                           "convolution groups that can lose a channel each"})
            continue
        consumers = [names[dep.target.module] for dep, _ in group if dg.is_in_channel_pruning_fn(dep.handler)
                     and not dg.is_out_channel_pruning_fn(dep.handler) and dep.target.module in names]
        units.append(Unit(len(units), names[root], type(root).__name__, channels,
                          [names[m] for m in out_members], consumers, chunks))
    return Graph(model, dg, units, heads, ignored, skipped, dict(model.named_modules()))


def _root_group(graph: Graph, unit: Unit, idxs: list[int]) -> Any:
    root = graph.modules[unit.name]
    pruner = graph.dg.get_pruner_of_module(root)
    return graph.dg.get_pruning_group(root, pruner.prune_out_channels, idxs)


def saliency(graph: Graph, unit: Unit, norm: str = "l1") -> torch.Tensor:
    """Score per output channel (root index): the sum over the unit's Conv/Linear members of the channel's mean
    |W| (l1) or root-mean-square W (l2); BatchNorm |gamma| when the unit has no such member."""
    tp = _tp()
    group = _root_group(graph, unit, list(range(unit.channels)))
    score = torch.zeros(unit.channels, dtype=torch.float64)
    fallback = torch.zeros(unit.channels, dtype=torch.float64)
    found = False
    for item in group:
        dep, idxs, root_idxs = item.dep, item.idxs, item.root_idxs
        module = dep.target.module
        if not graph.dg.is_out_channel_pruning_fn(dep.handler) or not isinstance(module, nn.Module):
            continue
        if isinstance(module, (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)):
            weight = module.weight.detach()
            if getattr(module, "transposed", False):
                weight = weight.transpose(0, 1)
            flat = weight.flatten(1).double()
            per = flat.abs().mean(1) if norm == "l1" else flat.pow(2).mean(1).sqrt()
            score.index_add_(0, torch.tensor(root_idxs), per[torch.tensor(idxs)].cpu())
            found = True
        elif isinstance(module, nn.modules.batchnorm._NormBase) and module.affine:
            fallback.index_add_(0, torch.tensor(root_idxs), module.weight.detach().abs().double()[idxs].cpu())
    return score if found else fallback


def removable(unit: Unit, ratio: float, round_to: int) -> int:
    """Channels a ratio removes: floor(ratio x C), kept count rounded up to a multiple of round_to (and of the
    unit's convolution groups), at least one channel (one per group) kept."""
    c = unit.channels
    kept = max(c - math.floor(ratio * c + 1e-9), 1)
    step = math.lcm(round_to, unit.chunks)
    kept = min(c, math.ceil(kept / step) * step)
    return c - kept


def select(scores: torch.Tensor, n: int, chunks: int = 1) -> list[int]:
    """The n lowest-scoring channels, ties by position; with chunks, the same n / chunks positions in each."""
    if n <= 0:
        return []
    if chunks == 1:
        return sorted(torch.argsort(scores, stable=True)[:n].tolist())
    size = len(scores) // chunks
    positions = torch.argsort(scores.view(chunks, size).sum(0), stable=True)[:n // chunks].tolist()
    return sorted(c * size + p for c in range(chunks) for p in positions)


# ----------------------------------------------------------------------------------------- in-place probes


def _snapshot(obj: Any) -> dict[str, Any]:
    state = dict(vars(obj))
    if isinstance(obj, nn.Module):
        state["_parameters"] = dict(obj._parameters)
        state["_buffers"] = dict(obj._buffers)
    for key, value in state.items():
        if isinstance(value, list) and all(isinstance(v, (int, type(None))) for v in value):
            state[key] = list(value)  # concat/split sizes, which tp edits in place
    return state


def _restore(obj: Any, state: dict[str, Any]) -> None:
    vars(obj).clear()
    vars(obj).update(state)


def prune_unit(graph: Graph, unit: Unit, idxs: list[int]) -> Callable[[], None]:
    """Remove channels `idxs` (root indices) of `unit` in place; returns the function that puts them back."""
    tp = _tp()
    group = _root_group(graph, unit, idxs)
    saved: list[tuple[Any, dict[str, Any]]] = []
    dg_maps = None
    for item in group:
        target = item.dep.target
        if target.type == tp.ops.OPTYPE.PARAMETER:
            if dg_maps is None:
                dg_maps = (dict(graph.dg.module2node), dict(graph.dg._param_to_name))
            name = graph.dg._param_to_name[target.module]
            parent = graph.model.get_submodule(name.rpartition(".")[0]) if "." in name else graph.model
            saved.append((parent, _snapshot(parent)))
            saved.append((target, _snapshot(target)))
        elif not isinstance(target.module, nn.Parameter):
            saved.append((target.module, _snapshot(target.module)))
    with torch.no_grad():
        group.prune(record_history=False)

    def undo() -> None:
        for obj, state in reversed(saved):
            _restore(obj, state)
        if dg_maps is not None:
            graph.dg.module2node, graph.dg._param_to_name = dg_maps

    return undo


# ------------------------------------------------------------------------------------------------- oracle


class Oracle:
    """Per-task mean losses of a model on a fixed calibration subset."""

    def __init__(self, x: torch.Tensor, y: Any, tasks: Tasks) -> None:
        self.x, self.y, self.tasks = x, y, tasks
        self.evaluations = 0

    @torch.inference_mode()
    def losses(self, model: nn.Module) -> np.ndarray:
        self.evaluations += 1
        device = next(model.parameters()).device
        totals = np.zeros(len(self.tasks))
        for start in range(0, len(self.y), EVAL_BATCH):
            x = self.x[start:start + EVAL_BATCH].to(device)
            y = self.y[start:start + EVAL_BATCH].to(device)
            out = model(x)
            for i, task in enumerate(self.tasks):
                totals[i] += float(task.item_losses(task.pick_output(out), task.pick_target(y)).sum())
        return totals / max(len(self.y), 1)


# ------------------------------------------------------------------------------------------------- search


@dataclass
class UnitLog:
    """What the search did with one unit."""

    order: int
    unit: Unit
    ratio: float = 0.0                       # accepted grid value (0: nothing accepted)
    removed: list[int] = field(default_factory=list)
    vetoed_by: str | None = None             # task whose loss vetoed the next ratio (None: all passed)
    veto_reason: str | None = None           # "delta" (rise over the running baseline) or "tau" (over tau x L0)
    veto_ratio: float | None = None
    loss_ratios: dict[str, float] = field(default_factory=dict)  # accepted losses / running baseline
    delta: float = 0.0
    all_pass: bool = False
    macs_removed: int = 0
    rise: float = 0.0                        # max_t loss after / loss before - 1
    score: float = math.inf                  # rise per MAC removed (top-P keeps the smallest)
    evaluations: int = 0
    error: str | None = None
    selected: bool = False


@dataclass
class Search:
    """One search: the per-unit log and the bounds it ran under."""

    logs: list[UnitLog]
    delta0: float
    tau: float
    lam: float
    losses_before: np.ndarray
    losses_search: np.ndarray
    evaluations: int
    seconds: float
    macs_after: int = 0
    losses_after: np.ndarray | None = None


def grid(step: float) -> list[float]:
    count = int(math.floor(0.95 / step + 1e-9))
    return [round(step * (i + 1), 10) for i in range(count)]


def order_units(units: list[Unit], lam: float) -> list[Unit]:
    """By probe contribution: descending when λ <= 1, ascending when λ > 1 (ties by discovery order)."""
    if lam <= 1.0:
        return sorted(units, key=lambda u: (-u.contribution, u.index))
    return sorted(units, key=lambda u: (u.contribution, u.index))


def probe_contributions(graph: Graph, example: torch.Tensor, probe_ratio: float,
                        progress: Callable[[str, int, int], None] | None = None) -> int:
    """MACs removed by cutting probe_ratio of each unit's channels (in place, then restored); returns MACs(M)."""
    total = count_macs(graph.model, example).macs
    for i, unit in enumerate(graph.units):
        n = removable(unit, probe_ratio, 1)
        n = max(n, unit.chunks) if n == 0 and unit.channels > unit.chunks else n
        unit.probe_removed = n
        if n:
            undo = prune_unit(graph, unit, select(saliency(graph, unit), n, unit.chunks))
            try:
                unit.contribution = total - count_macs(graph.model, example).macs
            except Exception:  # noqa: BLE001 - a unit whose pruning breaks the forward pass is skipped later
                unit.contribution = -1
            finally:
                undo()
        if progress:
            progress("pagcp: probing units", i + 1, len(graph.units))
    return total


def run_search(model: nn.Module, units: list[Unit], cfg: PAGCPConfig, delta0: float, tau: float, oracle: Oracle,
               example: torch.Tensor, cache: dict, progress: Callable[[str, int, int], None] | None) -> Search:
    """The sequential greedy search on a working copy of `model` (left untouched)."""
    started = time.perf_counter()
    evaluations_before = oracle.evaluations
    work = copy.deepcopy(model).eval()
    graph = build_graph(work, example, cfg.ignore)
    by_name = {u.name: u for u in graph.units}
    searched = [dataclasses.replace(by_name[u.name], contribution=u.contribution, probe_removed=u.probe_removed)
                for u in units if u.name in by_name]
    lam = solve_lambda(delta0, tau, len(searched)) if cfg.exp else 1.0
    ordered = order_units(searched, lam)
    if cfg.max_units is not None:
        ordered = ordered[:cfg.max_units]
    base = oracle.losses(work)
    l0, current = base.copy(), base.copy()
    macs = count_macs(work, example).macs
    delta, state, logs = delta0, (), []
    names = [t.name for t in oracle.tasks]
    for position, unit in enumerate(ordered):
        log = UnitLog(position, unit, delta=delta)
        if unit.contribution < 0:
            log.error = "pruning this unit breaks the forward pass"
            logs.append(log)
            continue
        accepted: tuple[float, int, np.ndarray] | None = None
        tried: dict[int, np.ndarray] = {0: current}
        for ratio in grid(cfg.step):
            n = removable(unit, ratio, cfg.round_to)
            if n not in tried:
                key = (state, unit.name, n)
                if key not in cache:
                    undo = prune_unit(graph, unit, select(saliency(graph, unit, cfg.saliency), n, unit.chunks))
                    try:
                        cache[key] = oracle.losses(work)
                        log.evaluations += 1
                    except Exception as exc:  # noqa: BLE001 - shapes tp could not keep consistent
                        cache[key] = None
                        log.error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
                    finally:
                        undo()
                tried[n] = cache[key]
            losses = tried[n]
            if losses is None:
                log.vetoed_by, log.veto_reason, log.veto_ratio = None, "error", ratio
                break
            rise = losses / np.maximum(base, 1e-12)
            total = losses / np.maximum(l0, 1e-12)
            if rise.max() > 1.0 + delta or total.max() > tau:
                over_delta = rise.max() > 1.0 + delta
                worst = int(np.argmax(rise if over_delta else total))
                log.vetoed_by, log.veto_reason, log.veto_ratio = names[worst], "delta" if over_delta else "tau", ratio
                break
            accepted = (ratio, n, losses)
        else:
            log.all_pass = True
        if accepted is not None:
            ratio, n, losses = accepted
            log.ratio = ratio
            log.loss_ratios = {k: float(v) for k, v in zip(names, losses / np.maximum(base, 1e-12))}
            if n > 0:
                log.removed = select(saliency(graph, unit, cfg.saliency), n, unit.chunks)
                prune_unit(graph, unit, log.removed)
                after = count_macs(work, example).macs
                log.macs_removed, macs = macs - after, after
                log.rise = float((losses / np.maximum(current, 1e-12)).max() - 1.0)
                log.score = log.rise / max(log.macs_removed, 1)
                base = np.maximum(base, losses)
                current = losses
                state = (*state, (unit.name, n))
                delta *= lam
        logs.append(log)
        if progress:
            progress("pagcp: searching units", position + 1, len(ordered))
    return Search(logs, delta0, tau, lam, l0, current, oracle.evaluations - evaluations_before,
                  time.perf_counter() - started)


def select_top(search: Search, top_p: float) -> list[UnitLog]:
    """Keep the floor(P x U) units with the smallest loss rise per MAC removed (ties by search order)."""
    pruned = [log for log in search.logs if log.removed]
    keep = int(math.floor(top_p * len(search.logs) + 1e-9))
    kept = sorted(pruned, key=lambda log: (log.score, log.order))[:keep]
    chosen = {id(log) for log in kept}
    for log in search.logs:
        log.selected = id(log) in chosen
    return [log for log in search.logs if log.selected]


def replay(model: nn.Module, example: torch.Tensor, logs: list[UnitLog], ignore: tuple[str, ...]) -> None:
    """Prune `model` in place with the searched channel indices of `logs` (in search order)."""
    graph = build_graph(model, example, ignore)
    by_name = {u.name: u for u in graph.units}
    for log in sorted(logs, key=lambda lg: lg.order):
        prune_unit(graph, by_name[log.unit.name], log.removed)


# ---------------------------------------------------------------------------------------- the transform


def channel_transform(model: nn.Module, before: dict[str, list[int]]) -> dict[str, Any]:
    """The arch.json edit that re-creates every module whose tensors changed shape: its shape attributes and the
    shapes of its own parameters and buffers."""
    modules: dict[str, Any] = {}
    for name, module in model.named_modules():
        tensors = {k: list(v.shape) for k, v in [*module._parameters.items(), *module._buffers.items()]
                   if v is not None}
        full = {f"{name}.{k}" if name else k: shape for k, shape in tensors.items()}
        if any(before.get(k) != shape for k, shape in full.items()):
            attrs = {a: list(v) if isinstance(v, tuple) else v for a in SHAPE_ATTRS
                     if isinstance(v := getattr(module, a, None), (int, tuple))}
            modules[name] = {"attrs": attrs, "tensors": tensors}
    return {"type": TRANSFORM, "modules": modules}


@register_transform(TRANSFORM)
def replay_channels(model: nn.Module, edit: dict[str, Any]) -> None:
    """arch.json replay: give each recorded module its pruned widths (fresh tensors; the weights load after)."""
    for name, spec in edit["modules"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UsageError(f"arch.json prunes channels of {name!r}, which this architecture does not have; the "
                             "run directory does not match its base model") from None
        for attr, value in spec.get("attrs", {}).items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
        for key, shape in spec["tensors"].items():
            old = module._parameters.get(key)
            if old is not None:
                module._parameters[key] = nn.Parameter(torch.zeros(shape, dtype=old.dtype),
                                                       requires_grad=old.requires_grad)
            elif module._buffers.get(key) is not None:
                module._buffers[key] = torch.zeros(shape, dtype=module._buffers[key].dtype)


# --------------------------------------------------------------------------------------------------- apply


def _oracle(cfg: PAGCPConfig, ctx: Context) -> Oracle:
    if ctx.splits is None:
        raise UsageError("PAGCP evaluates every task's loss on calibration data; give a data set (--data)")
    calibration = ctx.splits.calibration.subset(cfg.calibration_items)
    tasks = tuple(ctx.tasks) if ctx.tasks else (CLASSIFICATION,)
    return Oracle(calibration.x, calibration.y, tasks)


def plan(model: nn.Module, cfg: PAGCPConfig, ctx: Context) -> dict[str, Any]:
    """The units and what is left alone, before any probing (the `--dry-run` listing)."""
    graph = build_graph(model, ctx.example_inputs, cfg.ignore)
    return {"units": [{"name": u.name, "kind": u.kind, "channels": u.channels, "members": u.members,
                       "consumers": u.consumers, "channel_groups": u.chunks} for u in graph.units],
            "heads": graph.heads, "ignored": graph.ignored, "skipped": graph.skipped,
            "ignore_patterns": list(cfg.ignore)}


def _searched(model: nn.Module, units: list[Unit], cfg: PAGCPConfig, scale: float, oracle: Oracle,
              example: torch.Tensor, cache: dict, progress: Any) -> tuple[Search, list[UnitLog]]:
    """One search at delta0 x scale and tau ^ scale, its top-P selection, and the MACs/losses of the selection."""
    search = run_search(model, units, cfg, cfg.delta0 * scale, cfg.tau ** scale, oracle, example, cache, progress)
    kept = select_top(search, cfg.top_p)
    candidate = copy.deepcopy(model).eval()
    replay(candidate, example, kept, cfg.ignore)
    search.macs_after = count_macs(candidate, example).macs
    search.losses_after = oracle.losses(candidate)
    return search, kept


@register("pagcp", PAGCPConfig)
def apply(model: nn.Module, cfg: PAGCPConfig, ctx: Context) -> Result:
    """Prune `model` in place by PAGCP; channels are removed physically (the transform rebuilds the widths)."""
    started = time.perf_counter()
    example = ctx.example_inputs
    oracle = _oracle(cfg, ctx)
    model.eval()
    before_shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    params_before = count_params(model).total
    probe_model = copy.deepcopy(model)
    graph = build_graph(probe_model, example, cfg.ignore)
    if not graph.units:
        raise UsageError("no prunable channel groups: every convolution is a head, ignored or too narrow "
                         f"(heads {graph.heads[:3]}, ignored {graph.ignored[:3]}); loosen --ignore")
    macs_before = probe_contributions(graph, example, cfg.probe_ratio, ctx.progress)
    units = graph.units
    del probe_model, graph
    cache: dict = {}
    rounds: list[dict[str, Any]] = []
    search, kept = _searched(model, units, cfg, 1.0, oracle, example, cache, ctx.progress)
    rounds.append(_round_row(1.0, search, macs_before))
    if cfg.macs_target is not None:
        search, kept = _target_search(model, units, cfg, oracle, example, cache, ctx.progress, macs_before, rounds,
                                      (search, kept))
    replay(model, example, kept, cfg.ignore)
    macs_after = count_macs(model, example).macs
    losses_final = oracle.losses(model)
    rows = _rows(model, search, before_shapes)
    names = [t.name for t in oracle.tasks]
    achieved = macs_after / macs_before
    summary: dict[str, Any] = {
        "method": "pagcp", "units": len(units), "units_searched": len(search.logs),
        "units_pruned": sum(1 for log in search.logs if log.selected),
        "units_all_pass": sum(1 for log in search.logs if log.all_pass),
        "lambda": search.lam, "delta0": search.delta0, "tau": search.tau, "exp": cfg.exp,
        "macs_before": macs_before, "macs_after": macs_after, "macs_keep": achieved,
        "params_before": params_before, "params_after": count_params(model).total,
        "calibration_items": len(oracle.y),
        "losses_before": dict(zip(names, map(float, search.losses_before))),
        "losses_after": dict(zip(names, map(float, losses_final))),
        "loss_ratios": {n: float(a / max(b, 1e-12)) for n, a, b in zip(names, losses_final, search.losses_before)},
        "evaluations": oracle.evaluations, "search_seconds": round(time.perf_counter() - started, 3),
        "rounds": rounds, "keep": {"requested": cfg.macs_target, "achieved": achieved, "counted_over": "MACs"},
    }
    summary["tau_bound_ok"] = all(r <= search.tau * (1 + 1e-9) for r in summary["loss_ratios"].values())
    if cfg.macs_target is not None:
        summary.update(macs_target=cfg.macs_target, macs_tolerance=cfg.macs_tolerance,
                       target_met=achieved <= cfg.macs_target + cfg.macs_tolerance)
    transform = channel_transform(model, before_shapes)
    return Result(model, layers=rows, summary=summary, transforms=[transform] if transform["modules"] else [])


def _round_row(scale: float, search: Search, macs_before: int) -> dict[str, Any]:
    return {"scale": scale, "delta0": search.delta0, "tau": search.tau, "lambda": search.lam,
            "macs_keep": search.macs_after / macs_before, "evaluations": search.evaluations,
            "seconds": round(search.seconds, 3)}


def _target_search(model: nn.Module, units: list[Unit], cfg: PAGCPConfig, oracle: Oracle, example: torch.Tensor,
                   cache: dict, progress: Any, macs_before: int, rounds: list[dict[str, Any]],
                   first: tuple[Search, list[UnitLog]]) -> tuple[Search, list[UnitLog]]:
    """Scale delta0 (and tau in log space) until the kept MACs are within tolerance of the target."""
    target, tol = cfg.macs_target, cfg.macs_tolerance
    tried: list[tuple[float, Search, list[UnitLog]]] = [(1.0, *first)]

    def keep_of(search: Search) -> float:
        return search.macs_after / macs_before

    lo, hi, scale = None, None, 1.0
    for _ in range(cfg.max_rounds - 1):
        keep = keep_of(tried[-1][1])
        if abs(keep - target) <= tol:
            break
        if keep > target:   # not pruned enough: allow larger rises
            lo = scale
            scale = scale * 4.0 if hi is None else math.sqrt(lo * hi)
        else:               # pruned too much
            hi = scale
            scale = scale / 4.0 if lo is None else math.sqrt(lo * hi)
        search, kept = _searched(model, units, cfg, scale, oracle, example, cache, progress)
        rounds.append(_round_row(scale, search, macs_before))
        tried.append((scale, search, kept))
    feasible = [t for t in tried if keep_of(t[1]) <= target + tol]
    if feasible:
        best = max(feasible, key=lambda t: (keep_of(t[1]), -t[0]))
    else:
        best = min(tried, key=lambda t: keep_of(t[1]))
    for row in rounds:
        row["chosen"] = row["scale"] == best[0]
    scale, search, kept = best
    if keep_of(search) < target - tol:  # pruned more than asked: keep fewer units, by score, to land on the target
        kept = _fewest_units_for(model, search, kept, target + tol, macs_before, example, cfg.ignore)
        candidate = copy.deepcopy(model).eval()
        replay(candidate, example, kept, cfg.ignore)
        search.macs_after = count_macs(candidate, example).macs
        search.losses_after = oracle.losses(candidate)
        rounds.append(dict(_round_row(scale, search, macs_before), chosen=True, units_kept=len(kept)))
        for row in rounds[:-1]:
            row["chosen"] = False
    return search, kept


def _fewest_units_for(model: nn.Module, search: Search, kept: list[UnitLog], limit: float, macs_before: int,
                      example: torch.Tensor, ignore: tuple[str, ...]) -> list[UnitLog]:
    """The shortest prefix of `kept` in score order (smallest loss rise per MAC first) whose pruning keeps at most
    `limit` of the original MACs; top-P still bounds it (the prefix comes from the top-P selection)."""
    ranked = sorted(kept, key=lambda log: (log.score, log.order))
    work = copy.deepcopy(model).eval()
    graph = build_graph(work, example, ignore)
    units = {u.name: u for u in graph.units}
    chosen = ranked
    for k, log in enumerate(ranked, start=1):
        prune_unit(graph, units[log.unit.name], log.removed)
        if count_macs(work, example).macs / macs_before <= limit:
            chosen = ranked[:k]
            break
    names = {id(log) for log in chosen}
    for log in search.logs:
        log.selected = id(log) in names
    return [log for log in search.logs if log.selected]


def _rows(model: nn.Module, search: Search, before: dict[str, list[int]]) -> list[dict[str, Any]]:
    modules = dict(model.named_modules())
    rows = []
    for log in search.logs:
        unit = log.unit
        root = modules[unit.name]
        after_shape = list(root.weight.shape)
        before_shape = before[f"{unit.name}.weight"]
        removed = len(log.removed) if log.selected else 0
        rows.append({
            "name": unit.name, "kind": unit.kind, "order": log.order, "members": unit.members,
            "consumers": unit.consumers, "macs_contribution": unit.contribution,
            "ratio": log.ratio if log.selected else 0.0, "searched_ratio": log.ratio,
            "channels_before": unit.channels, "channels_after": unit.channels - removed,
            "shape_before": before_shape, "shape_after": after_shape,
            "params_before": int(np.prod(before_shape)), "params_after": root.weight.numel(),
            "vetoed_by": log.vetoed_by, "veto_reason": log.veto_reason, "veto_ratio": log.veto_ratio,
            "loss_ratios": log.loss_ratios, "delta": log.delta, "all_pass": log.all_pass,
            "macs_removed": log.macs_removed, "loss_rise": log.rise,
            "score": None if math.isinf(log.score) else log.score, "selected": log.selected,
            "evaluations": log.evaluations, "error": log.error})
    return rows
