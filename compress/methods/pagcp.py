"""PAGCP: performance-aware global channel pruning for multitask CNNs (Ye et al., TPAMI 2023; METHODS.md §2).

The units and their physical removal come from `compress.methods.channels` (Torch-Pruning dependency groups;
task heads are never pruned). The search runs on one working copy: each unit, in probe order, loses the largest
candidate width whose every task's calibration loss stays within 1 + delta_i of the running baseline and within
tau_t times the round's reference (the model as given). Probes are evaluated as the model will ship: when the
run re-estimates BatchNorm statistics before shipping, every probe does too, on a fixed calibration batch.

The promise is the user's tau: it is never scaled. A MACs target varies delta0 only, in (0, tau - 1] (lambda
recomputed); an explicit `max_tau` may loosen tau up to that ceiling (reported as `tau_used`). The selection
(top-P, then the fewest units by score that land inside the target's tolerance, the last one taken partially)
is evaluated as a whole, as shipped, and units are dropped until the bound holds. A target one round cannot
reach is reported as a miss (exit 6), or reached in rounds of pruning and short fine-tuning (`rounds`). The
audit recomputes every task's calibration loss and the MACs of the shipped model with the run's own code.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.config import PAGCPConfig
from compress.errors import UsageError
from compress.measure import count_macs, count_params
from compress.methods import pricing
from compress.methods.base import AuditOutcome, Context, ReportSection, Result, register
from compress.methods.channels import (
    Graph,
    Unit,
    build_graph,
    candidate_removals,
    channel_transform,
    probe_contributions,
    prune_unit,
    replay,
    saliency,
    select,
)
from compress.methods.oracle import Oracle
from compress.methods.pricing import Meter
from compress.tasks import CLASSIFICATION, Tasks

RTOL = 1e-6           # float noise allowed on top of a bound (losses are float32 means)
Progress = Callable[[str, int, int], None] | None


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


# ----------------------------------------------------------------------------------------------------- bound


@dataclass(frozen=True)
class Bound:
    """Per-task limits on calibration loss against a reference: loss_t <= max(factor_t x reference_t, atol).

    The absolute floor `atol` is what a task whose reference loss is 0 may reach (no ratio, no division)."""

    tau: float            # the bound behind the delta schedule (the user's tau, or tau_used)
    taus: np.ndarray      # per task: its task_tau, else tau
    atol: float

    def over(self, losses: np.ndarray, reference: np.ndarray, factor: np.ndarray | float) -> np.ndarray:
        """Per task: whether `losses` exceed factor x reference (or atol)."""
        return losses > np.maximum(reference * factor, self.atol) * (1 + RTOL)

    def broken(self, losses: np.ndarray, reference: np.ndarray) -> np.ndarray:
        return self.over(losses, reference, self.taus)


def make_bound(cfg: PAGCPConfig, tasks: Tasks, tau: float | None = None) -> Bound:
    """The bound of a run; `tau` (a loosened global tau, up to max_tau) leaves the per-task bounds as given."""
    names = [t.name for t in tasks]
    unknown = sorted(set(dict(cfg.task_tau)) - set(names))
    if unknown:
        raise UsageError(f"task_tau names {unknown}, which the model's tasks do not have; its tasks: {names}")
    tau = cfg.tau if tau is None else tau
    own = dict(cfg.task_tau)
    return Bound(tau, np.array([own.get(n, tau) for n in names], dtype=float), cfg.zero_loss_atol)


def loss_ratios(names: list[str], losses: np.ndarray, reference: np.ndarray) -> dict[str, float | None]:
    """losses / reference per task (None where the reference loss is 0)."""
    return {n: float(a / b) if b > 0 else None for n, a, b in zip(names, losses, reference)}


# ------------------------------------------------------------------------------------------------- search


@dataclass
class UnitLog:
    """What the search did with one unit."""

    order: int
    unit: Unit
    ratio: float = 0.0                       # share of the unit's channels the accepted candidate removes
    removed: list[int] = field(default_factory=list)
    candidates: list[int] = field(default_factory=list)  # channels each candidate removes, in the order tried
    scores: torch.Tensor | None = None       # saliency per channel when the unit's turn came
    vetoed_by: str | None = None             # task whose loss vetoed the next candidate (None: all passed)
    veto_reason: str | None = None           # "delta" (rise over the running baseline) or "tau" (over the bound)
    veto_ratio: float | None = None
    loss_ratios: dict[str, float | None] = field(default_factory=dict)  # accepted losses / running baseline
    delta: float = 0.0
    all_pass: bool = False
    left_alone: str | None = None            # why the unit had no candidate
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
    reference: np.ndarray                    # losses the bound is stated against (the round's model as given)
    evaluations: int
    seconds: float


def order_units(units: list[Unit], lam: float) -> list[Unit]:
    """By probe contribution: descending when λ <= 1, ascending when λ > 1 (ties by discovery order)."""
    if lam <= 1.0:
        return sorted(units, key=lambda u: (-u.contribution, u.index))
    return sorted(units, key=lambda u: (u.contribution, u.index))


@dataclass
class _Walk:
    """The state of one sequential search: working model, running baseline, current losses and MACs."""

    graph: Graph
    oracle: Oracle
    bound: Bound
    reference: np.ndarray
    base: np.ndarray
    current: np.ndarray
    macs: float  # the target's cost: MACs, or predicted ms with a latency target
    cache: dict
    meter: Meter
    state: tuple = ()


def _probe(walk: _Walk, unit: Unit, idxs: list[int], log: UnitLog) -> np.ndarray | None:
    """Losses with `idxs` of `unit` removed (cached per search state), or None when the pruned model fails."""
    key = (walk.state, unit.name, len(idxs))
    if key not in walk.cache:
        undo = prune_unit(walk.graph, unit, idxs)
        try:
            walk.cache[key] = walk.oracle.probe(walk.graph.model)
            log.evaluations += 1
        except Exception as exc:  # noqa: BLE001 - shapes tp could not keep consistent
            walk.cache[key] = None
            log.error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
        finally:
            undo()
    return walk.cache[key]


def _veto(walk: _Walk, losses: np.ndarray, delta: float) -> tuple[str, int] | None:
    """("delta" | "tau", task index) when the losses break the step's rise or the bound, else None."""
    for reason, reference, factor in (("delta", walk.base, 1.0 + delta), ("tau", walk.reference, walk.bound.taus)):
        over = walk.bound.over(losses, reference, factor)
        if over.any():
            excess = losses - np.maximum(reference * factor, walk.bound.atol)
            return reason, int(np.argmax(np.where(over, excess, -np.inf)))
    return None


def _search_unit(walk: _Walk, unit: Unit, log: UnitLog, cfg: PAGCPConfig) -> tuple[int, np.ndarray] | None:
    """Try the unit's candidates in order; the largest removal that passes, with its losses (None: none)."""
    accepted = None
    log.scores = saliency(walk.graph, unit, cfg.saliency)
    for n in log.candidates:
        losses = _probe(walk, unit, select(log.scores, n, unit.chunks), log)
        verdict = ("error", -1) if losses is None else _veto(walk, losses, log.delta)
        if verdict is not None:
            reason, task = verdict
            log.vetoed_by = walk.oracle.names[task] if task >= 0 else None
            log.veto_reason, log.veto_ratio = reason, n / unit.channels
            return accepted
        accepted = (n, losses)
    log.all_pass = True
    return accepted


def _accept(walk: _Walk, unit: Unit, log: UnitLog, n: int, losses: np.ndarray, example: torch.Tensor) -> None:
    """Prune the accepted candidate for good and move the running baseline."""
    log.ratio = n / unit.channels
    log.loss_ratios = loss_ratios(walk.oracle.names, losses, walk.base)
    log.removed = select(log.scores, n, unit.chunks)
    prune_unit(walk.graph, unit, log.removed)
    after = walk.meter.cost(walk.graph.model)
    log.macs_removed, walk.macs = walk.macs - after, after
    log.rise = float(np.max(np.where(walk.current > 0, losses / np.maximum(walk.current, 1e-300), 1.0)) - 1.0)
    log.score = max(log.rise, 0.0) / max(log.macs_removed, 1)
    walk.base = np.maximum(walk.base, losses)
    walk.current = losses
    walk.state = (*walk.state, (unit.name, n))


def run_search(model: nn.Module, units: list[Unit], cfg: PAGCPConfig, delta0: float, bound: Bound,
               reference: np.ndarray, oracle: Oracle, example: torch.Tensor, cache: dict, progress: Progress,
               meter: Meter | None = None) -> Search:
    """The sequential greedy search on a working copy of `model` (left untouched), against `reference` losses;
    `meter` counts what each accepted unit removes (default: MACs)."""
    meter = meter or pricing.macs_meter(example)
    started, evaluations_before = time.perf_counter(), oracle.evaluations
    work = copy.deepcopy(model).eval()
    graph = build_graph(work, example, cfg.ignore)
    by_name = {u.name: u for u in graph.units}
    searched = [dataclasses.replace(by_name[u.name], contribution=u.contribution, probe_removed=u.probe_removed)
                for u in units if u.name in by_name]
    lam = solve_lambda(delta0, bound.tau, len(searched)) if cfg.exp else 1.0
    ordered = order_units(searched, lam)[:cfg.max_units]
    walk = _Walk(graph, oracle, bound, reference, reference.copy(), reference.copy(), meter.cost(work), cache, meter)
    delta_cap, delta, logs = float(bound.taus.max()) - 1.0, min(delta0, float(bound.taus.max()) - 1.0), []
    for position, unit in enumerate(ordered):
        log = UnitLog(position, unit, delta=delta,
                      candidates=meter.candidates(unit, candidate_removals(unit, cfg.step, cfg.width_multiple)))
        logs.append(log)
        if unit.contribution < 0:
            log.error = "pruning this unit breaks the forward pass"
        elif not log.candidates:
            log.left_alone = f"narrower than 2 x round_to ({2 * cfg.width_multiple} channels)"
        elif (accepted := _search_unit(walk, unit, log, cfg)) is not None:
            _accept(walk, unit, log, *accepted, example)
        if log.candidates and unit.contribution >= 0:
            delta = min(delta * lam, delta_cap)  # δ_i follows the unit's position; past tau - 1 the bound vetoes
        if progress:
            progress("pagcp: searching units", position + 1, len(ordered))
    return Search(logs, delta0, bound.tau, lam, reference, oracle.evaluations - evaluations_before,
                  time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------- selection


def select_top(search: Search, top_p: float) -> list[UnitLog]:
    """Keep the floor(P x U) units with the smallest loss rise per MAC removed (ties by search order)."""
    pruned = [log for log in search.logs if log.removed]
    keep = math.floor(top_p * len(search.logs) + 1e-9)
    kept = sorted(pruned, key=lambda log: (log.score, log.order))[:keep]
    chosen = {id(log) for log in kept}
    for log in search.logs:
        log.selected = id(log) in chosen
    return [log for log in search.logs if log.selected]


Removals = dict[str, list[int]]


def removals_of(logs: list[UnitLog]) -> Removals:
    """Unit name -> channels removed, in search order."""
    return {log.unit.name: list(log.removed) for log in sorted(logs, key=lambda lg: lg.order) if log.removed}


def pruned_copy(model: nn.Module, removals: Removals, example: torch.Tensor, cfg: PAGCPConfig,
                finalize: Callable[[nn.Module], Any] | None = None) -> nn.Module:
    """A copy of `model` with `removals` cut out, made as it would ship (finalized) when `finalize` is given."""
    candidate = copy.deepcopy(model).eval()
    replay(candidate, example, removals, cfg.ignore)
    if finalize is not None:
        finalize(candidate)
    return candidate.eval()


def trim_to_target(model: nn.Module, kept: list[UnitLog], limit: float, macs_original: float, example: torch.Tensor,
                   cfg: PAGCPConfig, meter: Meter | None = None) -> Removals:
    """The fewest units, in score order, whose pruning keeps at most `limit` of the original cost (MACs, or
    `meter`'s); the last one is taken partially (its smallest candidate that crosses the limit), so the result
    lands close to it."""
    meter = meter or pricing.macs_meter(example)
    work = copy.deepcopy(model).eval()
    graph = build_graph(work, example, cfg.ignore)
    units = {u.name: u for u in graph.units}
    chosen: Removals = {}
    for log in sorted(kept, key=lambda lg: (lg.score, lg.order)):
        unit = units[log.unit.name]
        undo = prune_unit(graph, unit, log.removed)
        if meter.cost(work) > limit * macs_original:
            chosen[unit.name] = list(log.removed)
            continue
        undo()  # this unit crosses the limit: take the smallest candidate of it that still does
        for n in [c for c in meter.candidates(unit, candidate_removals(unit, cfg.step, cfg.width_multiple))
                  if c < len(log.removed)]:
            idxs = select(log.scores, n, unit.chunks)
            undo = prune_unit(graph, unit, idxs)
            if meter.cost(work) <= limit * macs_original:
                chosen[unit.name] = idxs
                return chosen
            undo()
        chosen[unit.name] = list(log.removed)
        return chosen
    return chosen


@dataclass
class Selection:
    """A set of unit removals checked as a whole, as shipped."""

    removals: Removals
    model: nn.Module
    macs: float  # the target's cost (MACs, or predicted ms)
    losses: np.ndarray
    dropped: list[str] = field(default_factory=list)   # units dropped so that the bound holds


def hold_bound(model: nn.Module, removals: Removals, logs: list[UnitLog], bound: Bound, reference: np.ndarray,
               oracle: Oracle, example: torch.Tensor, cfg: PAGCPConfig, finalize: Any,
               meter: Meter | None = None) -> Selection:
    """Evaluate the selection as it ships; while a task breaks the bound, drop the unit with the largest loss
    rise per MAC (or ms) removed."""
    meter = meter or pricing.macs_meter(example)
    score = {log.unit.name: (log.score, log.order) for log in logs}
    removals, dropped = dict(removals), []
    while True:
        candidate = pruned_copy(model, removals, example, cfg, finalize)
        losses = oracle.losses(candidate)
        if not removals or not bound.broken(losses, reference).any():
            return Selection(removals, candidate, meter.cost(candidate), losses, dropped)
        worst = max(removals, key=lambda name: score.get(name, (math.inf, 0)))
        dropped.append(worst)
        del removals[worst]


# ------------------------------------------------------------------------------------------- target search


@dataclass
class Attempt:
    """One search at one delta0 (and tau), with its top-P selection and the MACs that selection keeps."""

    delta0: float
    tau: float
    search: Search
    kept: list[UnitLog]
    keep: float


@dataclass
class Round:
    """What one round of PAGCP did: the attempts, the chosen one and the selection it ships."""

    attempts: list[Attempt]
    chosen: Attempt
    selection: Selection
    trimmed: bool
    macs_entry: int
    skipped: list[dict[str, str]] = field(default_factory=list)  # channel groups left alone, with the reason
    landing: list[dict[str, float]] = field(default_factory=list)  # latency target: each selection timed


def _attempt(model: nn.Module, units: list[Unit], cfg: PAGCPConfig, delta0: float, bound: Bound,
             reference: np.ndarray, oracle: Oracle, example: torch.Tensor, cache: dict, macs_original: float,
             progress: Progress, meter: Meter) -> Attempt:
    search = run_search(model, units, cfg, delta0, bound, reference, oracle, example, cache, progress, meter)
    kept = select_top(search, cfg.top_p)
    macs = meter.cost(pruned_copy(model, removals_of(kept), example, cfg))
    return Attempt(delta0, bound.tau, search, kept, macs / macs_original)


def delta0_ladder(cfg: PAGCPConfig, bound: Bound) -> list[float]:
    """delta0 values a target search tries after the user's: geometric steps of at most x4 (fewer, larger ones
    when the search budget asks for it), ending at tau - 1, the largest rise the bound allows (delta0 beyond it
    changes nothing)."""
    ceiling = float(bound.taus.max()) - 1.0
    if cfg.delta0 >= ceiling or cfg.max_searches < 2:
        return []
    span = math.log(ceiling / cfg.delta0)
    steps = min(cfg.max_searches - 1, max(1, math.ceil(span / math.log(4.0))))
    return [cfg.delta0 * math.exp(span * i / steps) for i in range(1, steps)] + [ceiling]


def _short(attempt: Attempt, cfg: PAGCPConfig) -> bool:
    return cfg.target is not None and attempt.keep > cfg.target + cfg.macs_tolerance


def _bisect(attempts: list[Attempt], run: Callable[[float], Attempt], cfg: PAGCPConfig) -> None:
    """Geometric bisection of delta0 between the last attempt short of the target and the first one reaching
    it, until one lands inside the tolerance or the search budget is spent."""
    while len(attempts) < cfg.max_searches:
        reached = [a for a in attempts if not _short(a, cfg)]
        if not reached or any(abs(a.keep - cfg.target) <= cfg.macs_tolerance for a in reached):
            return
        high = min(a.delta0 for a in reached)
        shorter = [a.delta0 for a in attempts if _short(a, cfg) and a.delta0 < high]
        if not shorter:
            return
        attempts.append(run(math.sqrt(max(shorter) * high)))


def target_attempts(run: Callable[[float], Attempt], cfg: PAGCPConfig, bound: Bound) -> list[Attempt]:
    """The user's delta0, then (with a MACs target that it misses) larger ones up to tau - 1, then bisection."""
    attempts = [run(cfg.delta0)]
    if cfg.target is None:
        return attempts
    for delta0 in delta0_ladder(cfg, bound):
        if not _short(attempts[-1], cfg):
            break
        attempts.append(run(delta0))
    _bisect(attempts, run, cfg)
    return attempts


def _pick(attempts: list[Attempt], cfg: PAGCPConfig) -> Attempt:
    """The attempt reaching the target with the most MACs kept (least overshoot), else the one pruning most;
    without a target, the only one."""
    reached = [a for a in attempts if not _short(a, cfg)]
    if cfg.target is None:
        return attempts[0]
    return max(reached, key=lambda a: (a.keep, -a.delta0)) if reached else min(attempts, key=lambda a: a.keep)


def _taus_to_try(cfg: PAGCPConfig) -> list[float]:
    """The user's tau, then (with max_tau) up to three geometric steps to max_tau."""
    if cfg.max_tau is None or cfg.target is None or cfg.max_tau <= cfg.tau:
        return [cfg.tau]
    steps = 3
    return [cfg.tau * (cfg.max_tau / cfg.tau) ** (i / steps) for i in range(steps + 1)]


def run_round(model: nn.Module, cfg: PAGCPConfig, ctx: Context, oracle: Oracle, macs_original: float,
              meter: Meter) -> Round:
    """One PAGCP round on `model` (left untouched): search, select, land on the target, hold the bound."""
    example = ctx.example_inputs
    probe_model = copy.deepcopy(model).eval()
    graph = build_graph(probe_model, example, cfg.ignore)
    if not graph.units:
        raise UsageError("no prunable channel groups: every convolution is a head, ignored or too narrow "
                         f"(heads {graph.heads[:3]}, ignored {graph.ignored[:3]}); loosen `ignore`")
    macs_entry = probe_contributions(graph, example, cfg.probe_ratio, ctx.progress)
    units, reference, cache = graph.units, oracle.losses(model), {}
    attempts: list[Attempt] = []

    def search(bound: Bound) -> list[Attempt]:
        """The delta0 ladder under `bound` (probes shared through `cache`)."""
        return target_attempts(lambda d0: _attempt(model, units, cfg, d0, bound, reference, oracle, example, cache,
                                                   macs_original, ctx.progress, meter), cfg, bound)

    for tau in _taus_to_try(cfg):
        attempts += search(make_bound(cfg, oracle.tasks, tau))
        if not _short(_pick(attempts, cfg), cfg):
            break
    chosen = _pick(attempts, cfg)
    bound = make_bound(cfg, oracle.tasks, chosen.tau)
    if meter.measure is not None and cfg.target is not None:
        landing = _land_latency(model, chosen, bound, reference, oracle, example, cfg, ctx, meter)
        if _landed_short(landing, cfg):
            # the searches stopped where the uncalibrated prediction put the target; with the models just measured
            # the meter counts higher, so the same delta0 ladder now goes further (probes come from the cache)
            again = search(bound)
            attempts += again
            deeper = _pick(again, cfg)
            if deeper.keep < _taken(landing):  # both as measured (deeper's through the recalibrated meter)
                second = _land_latency(model, deeper, bound, reference, oracle, example, cfg, ctx, meter)
                better = _closer(landing, second, cfg)
                chosen = deeper if better is second else chosen
                landing = better
        removals = landing.plan.removals
        return Round(attempts, chosen, landing.plan, removals != removals_of(chosen.kept), macs_entry,
                     graph.skipped, landing.tried)
    removals, trimmed = removals_of(chosen.kept), False
    if cfg.target is not None and chosen.keep < cfg.target - cfg.macs_tolerance:
        removals = trim_to_target(model, chosen.kept, cfg.target + cfg.macs_tolerance, macs_original,
                                  example, cfg, meter)
        trimmed = True
    selection = hold_bound(model, removals, chosen.search.logs, bound, reference, oracle, example, cfg,
                           ctx.finalize, meter)
    return Round(attempts, chosen, selection, trimmed, macs_entry, graph.skipped)


def _taken(landing: pricing.Landing[Selection]) -> float:
    """The measured latency ratio of the plan a landing took."""
    return next(t["measured"] for t in landing.tried if t["taken"])


def _landed_short(landing: pricing.Landing[Selection], cfg: PAGCPConfig) -> bool:
    """Whether the landed model measures above the target by more than the landing tolerance."""
    return _taken(landing) > float(cfg.target) * (1 + pricing.LANDING_TOLERANCE)


def _closer(first: pricing.Landing[Selection], second: pricing.Landing[Selection],
            cfg: PAGCPConfig) -> pricing.Landing[Selection]:
    """Of two landings, the one that measures within the landing tolerance (the least compressed such), else the
    faster; the other's measurements are kept in its record."""
    limit = float(cfg.target) * (1 + pricing.LANDING_TOLERANCE)
    a, b = _taken(first), _taken(second)
    meets = [x for x in ((a, 0), (b, 1)) if x[0] <= limit]
    pick = max(meets)[1] if meets else (0 if a <= b else 1)
    taken, other = (first, second) if pick == 0 else (second, first)
    taken.tried[:0] = [dict(t, taken=False) for t in other.tried]
    return taken


def _land_latency(model: nn.Module, chosen: Attempt, bound: Bound, reference: np.ndarray, oracle: Oracle,
                  example: torch.Tensor, cfg: PAGCPConfig, ctx: Context, meter: Meter) -> pricing.Landing[Selection]:
    """A latency target met as measured: the chosen search's units trimmed (in score order) to a predicted ratio,
    the selection held to the bound and timed against the original, the prediction recalibrated, and trimmed
    again (pricing.land)."""
    assert meter.measure is not None and meter.predicted_ratio is not None and meter.calibration is not None
    predicted = Meter(meter.counted_over, meter.predicted_ratio, widths=meter.widths)

    def plan_at(target: float) -> tuple[Selection, float, nn.Module]:
        removals = trim_to_target(model, chosen.kept, target, 1.0, example, cfg, predicted)
        selection = hold_bound(model, removals, chosen.search.logs, bound, reference, oracle, example, cfg,
                               ctx.finalize, meter)
        return selection, predicted.cost(selection.model), selection.model

    return pricing.land(float(cfg.target), plan_at, meter.measure, meter.calibration)


# --------------------------------------------------------------------------------------------------- apply


def _oracle(cfg: PAGCPConfig, ctx: Context) -> Oracle:
    if ctx.splits is None:
        raise UsageError("PAGCP evaluates every task's loss on calibration data; give a data set (`data`)")
    calibration = ctx.splits.calibration.subset(cfg.calibration_items)
    tasks = tuple(ctx.tasks) if ctx.tasks else (CLASSIFICATION,)
    make_bound(cfg, tasks)  # an unknown task in task_tau fails before any work
    return Oracle(calibration.x, calibration.y, tasks, as_shipped=ctx.finalize is not None)


def plan(model: nn.Module, cfg: PAGCPConfig, ctx: Context) -> dict[str, Any]:
    """The units, the widths each may take, and what is left alone, before any probing (`--dry-run`)."""
    graph = build_graph(model, ctx.example_inputs, cfg.ignore)
    units, left_alone = [], []
    for u in graph.units:
        removals = candidate_removals(u, cfg.step, cfg.width_multiple)
        units.append({"name": u.name, "kind": u.kind, "channels": u.channels, "members": u.members,
                      "consumers": u.consumers, "channel_groups": u.chunks,
                      "candidate_widths": [u.channels - n for n in removals]})
        if not removals:
            left_alone.append({"name": u.name, "reason": f"{u.channels} channels: narrower than 2 x round_to "
                                                         f"({2 * cfg.width_multiple})"})
    planned = {"units": units, "heads": graph.heads, "ignored": graph.ignored,
               "skipped": graph.skipped + left_alone, "ignore_patterns": list(cfg.ignore)}
    if cfg.latency_target is not None:  # pricing times layers: a dry run does not
        planned["widths_note"] = ("before pricing: the search drops each width that the cost table prices no "
                                  "faster than a wider one")
    return planned


def _round_limit(cfg: PAGCPConfig) -> int:
    return cfg.max_auto_rounds if cfg.rounds == "auto" else int(cfg.rounds)


def _between_rounds(model: nn.Module, cfg: PAGCPConfig, ctx: Context) -> None:
    """The short fine-tune that lets the next round start from a recovered model (every task's loss counts)."""
    if ctx.finetune is None:
        raise UsageError("pruning in rounds fine-tunes between them; run it through `compress prune` (or give "
                         "the context a finetune function), or use rounds = 1")
    ctx.finetune(model, cfg.round_epochs, cfg.round_items)
    model.eval()


def _ship_round(model: nn.Module, outcome: Round, example: torch.Tensor, cfg: PAGCPConfig) -> None:
    """Cut the round's selection out of `model` in place, with the weights and statistics it was checked with."""
    replay(model, example, outcome.selection.removals, cfg.ignore)
    model.load_state_dict(outcome.selection.model.state_dict())
    model.eval()


def _target_state(keep: float, cfg: PAGCPConfig) -> str | None:
    """"met", "short" (kept more MACs than allowed) or "overshoot" (removed more than asked); None: no target."""
    if cfg.target is None:
        return None
    if keep > cfg.target + _tolerance(cfg):
        return "short"
    return "overshoot" if keep < cfg.target - _tolerance(cfg) else "met"


def _tolerance(cfg: PAGCPConfig) -> float:
    """How far from the target a result still meets it: `macs_tolerance`, and for a latency target also the
    timing noise a measured ratio carries (pricing.LATENCY_TOLERANCE of the target)."""
    noise = pricing.LATENCY_TOLERANCE * cfg.target if cfg.latency_target is not None and cfg.target else 0.0
    return cfg.macs_tolerance + noise


def apply(model: nn.Module, cfg: PAGCPConfig, ctx: Context) -> Result:
    """Prune `model` in place by PAGCP, in one round or several; channels are removed physically (the transform
    rebuilds the widths). `Result.reference` is the model the last round's bound is stated against."""
    started, example = time.perf_counter(), ctx.example_inputs
    oracle = _oracle(cfg, ctx)
    model.eval()
    original_shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    meter = (pricing.latency_meter(model, example, cfg.backend, cfg.latency_batch, pricing.timing_inputs(ctx))
             if cfg.latency_target is not None else pricing.macs_meter(example))
    params_before, macs_original = count_params(model).total, meter.cost(model)
    macs_before = count_macs(model, example).macs
    losses_original = oracle.losses(model)
    reference_model, rows, rounds = None, [], []
    for index in range(_round_limit(cfg)):
        if index:
            _between_rounds(model, cfg, ctx)
            reference_model = copy.deepcopy(model)
        entry_shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        outcome = run_round(model, cfg, ctx, oracle, macs_original, meter)
        _ship_round(model, outcome, example, cfg)
        rows += _rows(model, outcome, entry_shapes, index + 1)
        rounds.append(_round_summary(outcome, macs_original, oracle.names, index + 1))
        if not outcome.selection.removals or _target_state(rounds[-1]["macs_keep"], cfg) in ("met", "overshoot"):
            break
    summary = _summary(model, cfg, oracle, rounds, example, params_before, (macs_before, macs_original, meter),
                       losses_original)
    summary.update(_unit_counts(outcome), skipped=outcome.skipped)
    summary["search_seconds"] = round(time.perf_counter() - started, 3)
    transform = channel_transform(model, original_shapes)
    return Result(model, layers=rows, summary=summary, transforms=[transform] if transform["modules"] else [],
                  reference=reference_model, sections={"keep": summary["keep"]})


def _round_summary(outcome: Round, macs_original: int, names: list[str], index: int) -> dict[str, Any]:
    """One round's figures: every search it ran, the one chosen, and what the shipped selection keeps."""
    chosen, selection = outcome.chosen, outcome.selection
    reference = chosen.search.reference
    return {"round": index, "tau": chosen.tau, "delta0": chosen.delta0, "lambda": chosen.search.lam,
            "macs_keep": selection.macs / macs_original, "macs_keep_entry": outcome.macs_entry / macs_original,
            "units_pruned": len(selection.removals), "trimmed_to_target": outcome.trimmed,
            "dropped_for_bound": selection.dropped, **({"latency_landing": outcome.landing} if outcome.landing else {}),
            "losses_reference": dict(zip(names, map(float, reference))),
            "losses_after": dict(zip(names, map(float, selection.losses))),
            "loss_ratios": loss_ratios(names, selection.losses, reference),
            "searches": [{"delta0": a.delta0, "tau": a.tau, "lambda": a.search.lam, "macs_keep": a.keep,
                          "chosen": a is chosen, "evaluations": a.search.evaluations,
                          "seconds": round(a.search.seconds, 3)} for a in outcome.attempts]}


def _summary(model: nn.Module, cfg: PAGCPConfig, oracle: Oracle, rounds: list[dict[str, Any]],
             example: torch.Tensor, params_before: int, costs: tuple[int, float, Meter],
             losses_original: np.ndarray) -> dict[str, Any]:
    """The report's summary: MACs and params, every task's losses and the bound, the target's state (in the
    meter's units: MACs, or predicted latency)."""
    names, last = oracle.names, rounds[-1]
    macs_original, cost_original, meter = costs
    macs_after, kept = count_macs(model, example).macs, meter.cost(model) / cost_original
    final = np.array([last["losses_after"][n] for n in names])
    reference = np.array([last["losses_reference"][n] for n in names])
    tau_used = last["tau"]
    bound = make_bound(cfg, oracle.tasks, tau_used)
    summary: dict[str, Any] = {
        "method": "pagcp", "rounds": rounds, "exp": cfg.exp,
        "lambda": last["lambda"], "delta0": last["delta0"], "tau": cfg.tau, "tau_used": tau_used,
        "task_tau": {n: float(t) for n, t in zip(names, bound.taus)},
        "macs_before": macs_original, "macs_after": macs_after, "macs_keep": macs_after / macs_original,
        "params_before": params_before, "params_after": count_params(model).total,
        "calibration_items": len(oracle.y), "evaluations": oracle.evaluations,
        "losses_before": dict(zip(names, map(float, losses_original))),
        "losses_after": dict(zip(names, map(float, final))),
        "loss_ratios": loss_ratios(names, final, losses_original),
        "bound_reference": "original" if len(rounds) == 1 else f"the model entering round {len(rounds)}",
        "tau_bound_ok": not bool(bound.broken(final, reference).any()),
        "keep": {"requested": cfg.target, "achieved": kept, "counted_over": meter.counted_over},
    }
    if meter.calibration is not None:
        summary["latency_calibration"] = meter.calibration.to_dict()
    if cfg.target is not None:
        state = _target_state(kept, cfg)
        summary.update(macs_target=cfg.target, macs_tolerance=cfg.macs_tolerance, target_state=state,
                       target_met=state == "met")
    return summary


def _unit_counts(outcome: Round) -> dict[str, int]:
    """How many units the last round searched, pruned, and found passing every candidate."""
    logs = outcome.chosen.search.logs
    return {"units": len(logs), "units_searched": len(logs), "units_pruned": len(outcome.selection.removals),
            "units_all_pass": sum(1 for log in logs if log.all_pass)}


def _rows(model: nn.Module, outcome: Round, before: dict[str, list[int]], index: int) -> list[dict[str, Any]]:
    """Per unit of one round: what the search did and what the shipped selection removed."""
    modules, removals = dict(model.named_modules()), outcome.selection.removals
    rows = []
    for log in outcome.chosen.search.logs:
        unit, root = log.unit, modules[log.unit.name]
        removed = len(removals.get(unit.name, []))
        before_shape = before[f"{unit.name}.weight"]
        rows.append({
            "round": index, "name": unit.name, "kind": unit.kind, "order": log.order, "members": unit.members,
            "consumers": unit.consumers, "macs_contribution": unit.contribution,
            "ratio": removed / unit.channels, "searched_ratio": log.ratio,
            "channels_before": unit.channels, "channels_after": unit.channels - removed,
            "candidate_widths": [unit.channels - n for n in log.candidates],
            "shape_before": before_shape, "shape_after": list(root.weight.shape),
            "params_before": int(np.prod(before_shape)), "params_after": root.weight.numel(),
            "vetoed_by": log.vetoed_by, "veto_reason": log.veto_reason, "veto_ratio": log.veto_ratio,
            "loss_ratios": log.loss_ratios, "delta": log.delta, "all_pass": log.all_pass,
            "left_alone": log.left_alone, "macs_removed": log.macs_removed, "loss_rise": log.rise,
            "score": None if math.isinf(log.score) else log.score, "selected": unit.name in removals,
            "partial": 0 < removed < len(log.removed), "dropped_for_bound": unit.name in outcome.selection.dropped,
            "evaluations": log.evaluations, "error": log.error})
    return rows


# --------------------------------------------------------------------------------------------------- audit


def audit(result: Result, cfg: PAGCPConfig, shipped: nn.Module, original: nn.Module, ctx: Context) -> AuditOutcome:
    """PAGCP's promises on the model that ships, recomputed with the run's own evaluation and MAC counter:
    every task's calibration loss within its bound of the reference, and the MACs target met from both sides."""
    outcome = AuditOutcome()
    _audit_target(outcome, cfg, shipped, original, ctx, result.summary)
    if ctx.task_losses is not None and ctx.splits is not None:
        _audit_bound(outcome, cfg, shipped, result.reference or original, ctx, result.summary)
    return outcome


def _audit_target(outcome: AuditOutcome, cfg: PAGCPConfig, shipped: nn.Module, original: nn.Module,
                  ctx: Context, summary: dict[str, Any]) -> None:
    """The target from both sides, counted afresh on both models: MACs, or the latency measured against the
    original (interleaved, on the priced backend), short only when its whole p25-p75 lies beyond the tolerance."""
    example = ctx.example_inputs
    if cfg.latency_target is not None:
        calibration = pricing.timing_inputs(ctx)
        figures = pricing.measured_ratio(shipped, original, example, calibration, cfg.backend, cfg.latency_batch)
        outcome.figures.update(figures, latency_requested=cfg.latency_target)
        keep, what = figures["latency_measured"], f"of the original's latency measured on {cfg.backend}"
        low, high = figures["latency_measured_spread"]
        tolerance = _tolerance(cfg)
        state = ("short" if low > cfg.target + tolerance else
                 "overshoot" if high < cfg.target - tolerance else "met")
    else:
        keep, what = count_macs(shipped, example).macs / count_macs(original, example).macs, "of the original MACs"
        outcome.figures["macs_keep"] = keep
        state = _target_state(keep, cfg)
    _target_problem(outcome, cfg, state, keep, what, summary)


def _target_problem(outcome: AuditOutcome, cfg: PAGCPConfig, state: str | None, keep: float, what: str,
                    summary: dict[str, Any]) -> None:
    """The audit's line for a target missed from either side."""
    if state == "short":
        tau = summary.get("tau_used", cfg.tau)
        outcome.problems.append(
            f"kept {keep:.4f} {what}, target {cfg.target} ± {_tolerance(cfg):.3g}: that is as far "
            f"as the loss bound tau = {tau:g} allows in {len(summary.get('rounds', [])) or 1} round(s); raise `tau` "
            "(or allow `max_tau`), or prune in rounds with fine-tuning between them (`rounds` auto)")
    elif state == "overshoot":
        outcome.problems.append(
            f"kept {keep:.4f} {what}, below the target {cfg.target} - {_tolerance(cfg):.3g}: "
            "more was removed than asked (no unit could be cut finely enough); raise `macs_tolerance` or lower "
            "`round_to`")


def _audit_bound(outcome: AuditOutcome, cfg: PAGCPConfig, shipped: nn.Module, reference: nn.Module,
                 ctx: Context, summary: dict[str, Any]) -> None:
    split = ctx.splits.calibration.subset(cfg.calibration_items)
    losses, before = ctx.task_losses(shipped, split), ctx.task_losses(reference, split)
    tasks = tuple(ctx.tasks) if ctx.tasks else (CLASSIFICATION,)
    bound = make_bound(cfg, tasks, tau_allowed(cfg, summary))
    names = [t.name for t in tasks]
    now, ref = np.array([losses[n] for n in names]), np.array([before[n] for n in names])
    outcome.figures.update(loss_ratios=loss_ratios(names, now, ref), losses=dict(zip(names, map(float, now))),
                           losses_reference=dict(zip(names, map(float, ref))))
    for name, tau, a, b, broken in zip(names, bound.taus, now, ref, bound.broken(now, ref)):
        if broken:
            outcome.problems.append(
                f"task {name}: calibration loss {a:.5g} is above its bound {max(tau * b, bound.atol):.5g} "
                f"(tau {tau:g} x reference {b:.5g}) on the model that ships")


def tau_allowed(cfg: PAGCPConfig, summary: dict[str, Any]) -> float:
    """The tau the shipped model answers to: the user's, or the loosened one the run reports, never above the
    user's ceiling max_tau."""
    return min(max(cfg.tau, summary.get("tau_used", cfg.tau)), cfg.max_tau or cfg.tau)


# ------------------------------------------------------------------------------------------------ report


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def report_sections(report: dict[str, Any]) -> list[ReportSection]:
    """The bound as the audit measured it on the shipped model, and what each round did."""
    summary, figures = report.get("summary") or {}, (report.get("audit") or {}).get("figures") or {}
    sections = []
    if figures.get("losses"):
        rows = [(task, _fmt(figures["losses_reference"].get(task)), _fmt(loss),
                 _fmt(figures["loss_ratios"].get(task), 3), _fmt((summary.get("task_tau") or {}).get(task), 3))
                for task, loss in figures["losses"].items()]
        sections.append(ReportSection(
            "Loss bound on the shipped model", ("task", "reference loss", "shipped loss", "ratio", "bound tau"), rows,
            f"Calibration losses recomputed by the audit (reference: {summary.get('bound_reference', 'original')}); "
            "a task whose reference loss is 0 is bounded by an absolute loss instead of a ratio."))
    rounds = summary.get("rounds") or []
    if rounds:
        rows = [(str(r["round"]), _fmt(r["macs_keep"], 3), _fmt(r["tau"], 3),
                 ", ".join(_fmt(a["delta0"], 3) for a in r["searches"]), str(r["units_pruned"]),
                 "yes" if r["trimmed_to_target"] else "", ", ".join(r["dropped_for_bound"]) or "-") for r in rounds]
        sections.append(ReportSection("PAGCP rounds", ("round", "MACs kept", "tau", "delta0 tried",
                                                       "units pruned", "trimmed to target", "dropped for the bound"),
                                      rows))
    return sections


register("pagcp", PAGCPConfig, audit=audit, plan=plan, report_sections=report_sections,
         layer_kind="channels")(apply)
