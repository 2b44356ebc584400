"""Low-rank choices priced on the backend the model ships to (issue 11): `--latency-keep` for ALDS and the SVD
baselines.

Each decomposable layer is priced by the cost model of `compress.measure.costs` at its real input shape: the dense
layer, and ALDS's encoder + decoder at every rank in steps of `rank_step` (so that j and k*j are multiples of it,
which blocked kernels run fast). An option that saves less than `dense_margin` of the dense layer's time is dropped,
so a layer stays dense unless decomposing it pays. The budget in milliseconds is the original's predicted latency
(the time outside the decomposable layers, measured once, plus their dense prices) times `latency_keep`; the
allocation's exact eps* sweep then minimises the worst layer's error under it. The shipped model's latency is
measured against the original, interleaved, with the measure layer's timing code, and audited.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from compress.config import ALDSConfig, SVDConfig, latency_keep_of
from compress.errors import UsageError
from compress.measure import count_macs
from compress.measure.backends import LatencySettings, measure_backends
from compress.measure.costs import CostModel, LayerSite, measure_model_ms, predict_ms, rest_ms, sites_of

MIN_PRICED_GROUP_CHANNELS = 16  # narrower groups make GEMMs too small to run fast on dense runtimes
LATENCY_TOLERANCE = 0.10        # a measured latency ratio may exceed the request by this much (timing noise)
AUDIT_RUNS = 30
LANDING_STEPS = 3               # whole-model measurements a latency target may take to land (each ~1-3 s)
LANDING_TOLERANCE = 0.05        # a measured ratio this close to the request (relative) has landed

Plan = TypeVar("Plan")


class Prices(Protocol):
    """What the allocation needs of a cost table (compress.measure.costs.CostModel, or a synthetic one in tests)."""

    def site_ms(self, site: LayerSite) -> float: ...

    def lowrank_ms(self, site: LayerSite, k: int, ranks: Any) -> np.ndarray: ...


@dataclass
class LatencyBudget:
    """A budget in predicted milliseconds: each layer's options (ranks in steps, dense) and their prices."""

    prices: Prices
    sites: tuple[LayerSite, ...]
    dense_ms: tuple[float, ...]
    fixed: float
    requested: float
    counted_over: str
    step: int
    margin: float
    priced: bool = True
    asked: bool = True  # False: no --latency-keep, the budget a priced run keeps anyway (never slower)
    aim: float | None = None  # the predicted ratio that stands for `requested` as measured (Calibration), if known
    _options: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def total(self) -> float:
        """The original's predicted latency: the time outside the layers plus their dense prices."""
        return self.fixed + sum(self.dense_ms)

    @property
    def aimed(self) -> float:
        """The predicted ratio the allocation aims at: `aim`, else the request itself."""
        return self.requested if self.aim is None else self.aim

    @property
    def target(self) -> float:
        return self.aimed * self.total

    def within(self, cost: float) -> bool:
        """A latency target is a ceiling: met when the predicted time is at or under it."""
        return cost <= self.target * (1 + 1e-9)

    def options(self, index: int, cand: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The layer's ranks in steps of `step` that decompose and save `margin` of its time, then dense (its full
        rank), with their prices in ms."""
        if (index, k) not in self._options:
            full = cand.max_rank(k)
            steps = np.array([j for j in range(self.step, full, self.step) if cand.decomposes(k, j)], dtype=np.int64)
            dense = self.dense_ms[index]
            ms = self.prices.lowrank_ms(self.sites[index], k, steps) if len(steps) else np.zeros(0)
            pays = ms <= (1 - self.margin) * dense
            self._options[(index, k)] = (np.append(steps[pays], full), np.append(ms[pays], dense))
        return self._options[(index, k)]

    def cost_at(self, index: int, cand: Any, k: int, ranks: np.ndarray) -> np.ndarray:
        """Prices of the layer at these ranks (dense where the rank does not decompose)."""
        known, ms = self.options(index, cand, k)
        table = dict(zip(known.tolist(), ms.tolist()))
        out = []
        for j in np.asarray(ranks).tolist():
            if j not in table:
                table[j] = (self.dense_ms[index] if not cand.decomposes(k, j)
                            else float(self.prices.lowrank_ms(self.sites[index], k, [j])[0]))
            out.append(table[j])
        return np.array(out, dtype=float)


def timing_inputs(ctx: Any) -> torch.Tensor:
    """The items latency measurements export with and run on: 64 of the calibration split, else the example."""
    return ctx.splits.calibration.x[:64] if ctx.splits is not None else ctx.example_inputs


def cost_model_for(cfg: ALDSConfig | SVDConfig) -> CostModel:
    """The cost table of the config's backend and batch, one thread (cached on disk across runs)."""
    return CostModel(cfg.backend, batch=cfg.latency_batch, threads=1)


def latency_budget(model: nn.Module, candidates: list[Any], example: torch.Tensor, cfg: ALDSConfig | SVDConfig,
                   prices: Prices, outside_ms: float | None = None) -> LatencyBudget:
    """The budget of `cfg.latency_keep` of the model's predicted latency; `outside_ms` (the time outside the
    decomposable layers) is measured on the backend unless given."""
    every = sites_of(model, example)
    sites = tuple(every[c.name] for c in candidates)
    dense = tuple(float(prices.site_ms(s)) for s in sites)
    if outside_ms is None:
        assert isinstance(prices, CostModel)
        measured = measure_model_ms(model, example, prices)
        # rest_ms is the time outside every Conv2d/Linear; layers that are not candidates count as outside too
        outside_ms = rest_ms(model, example, prices, measured) + (sum(prices.site_ms(s) for s in every.values())
                                                                  - sum(dense))
    over = f"latency ({cfg.backend}, batch {cfg.latency_batch})"
    requested = latency_keep_of(cfg)
    assert requested is not None
    return LatencyBudget(prices, sites, dense, max(0.0, outside_ms), float(requested), over, cfg.rank_step,
                         cfg.dense_margin, asked=cfg.latency_keep is not None)


def priced_ks(candidates: list[Any]) -> None:
    """Keep only group counts that leave at least MIN_PRICED_GROUP_CHANNELS input channels per group (and k = 1)."""
    for cand in candidates:
        cand.ks = [k for k in cand.ks if k == 1 or cand.c // k >= MIN_PRICED_GROUP_CHANNELS]


def layer_times(rows: list[dict[str, Any]], model: nn.Module, example: torch.Tensor, budget: LatencyBudget,
                chosen: list[tuple[int, int]], candidates: list[Any]) -> None:
    """Per layer: its dense price, the predicted price of its choice and the time measured for the shapes that
    shipped (encoder and decoder timed exactly, not interpolated)."""
    shipped = sites_of(model, example)
    for index, (row, (k, j), cand) in enumerate(zip(rows, chosen, candidates)):
        predicted = float(budget.cost_at(index, cand, k, np.array([j]))[0])
        parts = [shipped[n] for n in (f"{row['name']}.encoder", f"{row['name']}.decoder") if n in shipped]
        measured = sum(budget.prices.site_ms(s) for s in parts) if row["decomposed"] else budget.dense_ms[index]
        row.update(dense_ms=budget.dense_ms[index], predicted_ms=predicted, measured_ms=float(measured))


def latency_section(budget: LatencyBudget, cost: float, prices: Prices, calibration: Calibration | None = None,
                    landing: list[dict[str, float]] | None = None) -> dict[str, Any]:
    """The report's latency section of a priced decomposition: requested, predicted (and calibrated on the models
    measured while landing), and the cost table used."""
    section = {"backend": budget.counted_over, "requested": budget.requested, "asked": budget.asked,
               "predicted": cost / budget.total,
               "original_predicted_ms": budget.total, "predicted_ms": cost, "outside_layers_ms": budget.fixed,
               "rank_step": budget.step, "dense_margin": budget.margin}
    if calibration is not None:
        section.update(calibrated=calibration.measured(cost / budget.total), landing=landing or [])
    if isinstance(prices, CostModel):
        prices.save()
        section["cost_table"] = prices.summary()
    return section


def measured_ratio(shipped: nn.Module, original: nn.Module, example: torch.Tensor, calibration: torch.Tensor,
                   backend: str, batch: int) -> dict[str, Any]:
    """The shipped model's latency as a fraction of the original's on the priced backend, timed interleaved:
    median time ratio and its p25-p75 (from the per-round speed-ups)."""
    settings = LatencySettings(backends=(backend,), batches=(batch,), threads=1, runs=AUDIT_RUNS)
    with tempfile.TemporaryDirectory(prefix="compress-price-") as tmp:
        row = measure_backends(_cpu_copy(shipped), _cpu_copy(original), example, calibration, settings,
                               Path(tmp))[0]
    low, high = row.speedup_spread
    return {"latency_measured": 1.0 / row.speedup, "latency_measured_spread": [1.0 / high, 1.0 / low],
            "latency_measured_ms": row.p50_ms, "latency_original_ms": row.baseline_p50_ms}


def _cpu_copy(model: nn.Module) -> nn.Module:
    """A CPU copy in eval mode (the audit must not move the run's models)."""
    return copy.deepcopy(model).cpu().eval()


def audit_latency(shipped: nn.Module, original: nn.Module, example: torch.Tensor, calibration: torch.Tensor,
                  backend: str, batch: int, requested: float) -> tuple[list[str], dict[str, Any]]:
    """A latency request audited on the model that ships: a miss when even the p25 of the measured time ratio lies
    above the request plus LATENCY_TOLERANCE."""
    figures = measured_ratio(shipped, original, example, calibration, backend, batch)
    figures["latency_requested"] = requested
    low = figures["latency_measured_spread"][0]
    if low > requested * (1 + LATENCY_TOLERANCE):
        problem = (f"measured latency {figures['latency_measured']:.3f} of the original on {backend} (p25 "
                   f"{low:.3f}), requested {requested:g} (+{LATENCY_TOLERANCE:.0%} for noise); the cost table "
                   "may be stale (delete it), or ask for less")
        return [problem], figures
    return [], figures


@dataclass
class Calibration:
    """Measured against predicted latency ratios (to the original) of whole models on the priced backend.

    Prices are one-layer graphs timed warm and apart from the model; inside a model, layers share caches, fuse with
    their neighbours and change layout, and the time outside them does not shrink with the activations alone, so
    a heavily pruned model ran 2x faster than predicted on resnet18 (reports/speed.md). Every model a method
    measures adds a point; the map through them (and (1, 1): the original) is monotone and piecewise linear,
    proportional beyond the outermost points. With no point but (1, 1) it is the identity.
    """

    points: list[tuple[float, float]] = field(default_factory=lambda: [(1.0, 1.0)])

    def add(self, predicted: float, measured: float) -> None:
        """A whole model's predicted and measured latency ratio."""
        self.points.append((float(predicted), float(measured)))

    def _curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Points sorted by prediction, the measured ratios made non-decreasing (timing noise can invert two)."""
        pairs = sorted(self.points)
        x = np.array([p for p, _ in pairs])
        y = np.maximum.accumulate(np.array([m for _, m in pairs]))
        return x, y

    def measured(self, predicted: float) -> float:
        """The measured ratio a predicted one stands for."""
        return _through(predicted, *self._curve())

    def predicted(self, measured: float) -> float:
        """The predicted ratio that stands for a measured one (the inverse map)."""
        x, y = self._curve()
        return _through(measured, y, x)

    def to_dict(self) -> dict[str, Any]:
        return {"points": [{"predicted": p, "measured": m} for p, m in self.points[1:]]}


def _through(value: float, x: np.ndarray, y: np.ndarray) -> float:
    """Piecewise linear through (x, y), x ascending; proportional to the nearest end point outside them."""
    keep = np.concatenate([np.diff(x) > 1e-12, [True]])  # of tied x, the last: a flat run ends where it rises
    x, y = x[keep], y[keep]
    if value <= x[0]:
        return float(value * y[0] / x[0]) if x[0] > 0 else float(value)
    if value >= x[-1]:
        return float(value * y[-1] / x[-1])
    return float(np.interp(value, x, y))


@dataclass
class Landing(Generic[Plan]):
    """What landing a latency target tried: each plan's predicted and measured ratio, and the one taken."""

    plan: Plan
    tried: list[dict[str, float]]


def land(requested: float, plan_at: Callable[[float], tuple[Plan, float, nn.Module]],
         measure: Callable[[nn.Module], float], calibration: Calibration) -> Landing[Plan]:
    """Meet a latency ratio as measured, not as predicted: plan at the predicted ratio that the calibration says
    stands for `requested`, measure the model the plan builds, add the point, and plan again (at most
    LANDING_STEPS times) until the measured ratio lands within LANDING_TOLERANCE.

    `plan_at(predicted_target)` returns the plan, its predicted ratio and the model it builds. The plan taken is
    the least compressed of those measured at or under the request (plus the tolerance), else the fastest.
    """
    tried: list[tuple[float, float, Plan]] = []
    target = calibration.predicted(requested)
    for _ in range(LANDING_STEPS):
        plan, predicted, model = plan_at(target)
        if any(abs(predicted - p) < 1e-9 for p, _, _ in tried):
            break  # the same model again: the plan cannot move further that way
        measured = measure(model)
        calibration.add(predicted, measured)
        tried.append((predicted, measured, plan))
        again = calibration.predicted(requested)
        if abs(measured - requested) <= LANDING_TOLERANCE * requested or abs(again - target) < 1e-3:
            break
        target = again
    meets = [i for i, t in enumerate(tried) if t[1] <= requested * (1 + LANDING_TOLERANCE)]
    taken = (max(meets, key=lambda i: tried[i][1]) if meets
             else min(range(len(tried)), key=lambda i: tried[i][1]))
    return Landing(tried[taken][2], [{"predicted": p, "measured": m, "taken": i == taken}
                                     for i, (p, m, _) in enumerate(tried)])


@dataclass(frozen=True)
class Meter:
    """What a target counts on a whole model: its MACs, or its predicted milliseconds on a backend (the time
    outside its Conv2d/Linear layers measured once on the original, plus each layer's price at its widths), mapped
    through the calibration of the models measured so far (`measure`: a whole model's measured latency ratio)."""

    counted_over: str
    cost: Callable[[nn.Module], float]
    calibration: Calibration | None = None
    measure: Callable[[nn.Module], float] | None = None
    predicted_ratio: Callable[[nn.Module], float] | None = None
    # a channel unit's candidate removals -> those whose kept width the table prices faster than every wider one
    widths: Callable[[Any, list[int]], list[int]] | None = None

    def candidates(self, unit: Any, removals: list[int]) -> list[int]:
        """The removals worth probing: all of them, or with prices the ones that make the unit faster."""
        return self.widths(unit, removals) if self.widths is not None and removals else removals


def macs_meter(example: torch.Tensor) -> Meter:
    """MACs at one item of `example`."""
    return Meter("MACs", lambda model: float(count_macs(model, example).macs))


def latency_meter(original: nn.Module, example: torch.Tensor, backend: str, batch: int,
                  calibration_x: torch.Tensor | None = None) -> Meter:
    """Predicted latency on `backend` at `batch` (one thread), priced from the cost table (cached on disk), in
    milliseconds of the original; the time outside the layers scales with the activations the model hands between
    them (costs.predict_ms); the ratio to the original goes through the meter's calibration, which grows with every
    model `measure` times against the original (interleaved, whole models)."""
    prices = CostModel(backend, batch=batch, threads=1)
    reference = copy.deepcopy(original).eval()  # the method prunes `original` in place
    outside = rest_ms(reference, example, prices, measure_model_ms(reference, example, prices))
    original_ms = predict_ms(reference, example, prices, outside)
    calibration = Calibration()

    def ratio(model: nn.Module) -> float:
        predicted = predict_ms(model, example, prices, outside, reference=reference)
        prices.save()
        return predicted / original_ms

    def measure(model: nn.Module) -> float:
        x = calibration_x if calibration_x is not None else example
        return measured_ratio(model, reference, example, x, backend, batch)["latency_measured"]

    sites = sites_of(reference, example)
    fast: dict[tuple[str, int, tuple[int, ...]], list[int]] = {}

    def widths(unit: Any, removals: list[int]) -> list[int]:
        key = (unit.name, unit.channels, tuple(removals))
        if key not in fast:
            fast[key] = fast_removals(prices, sites, unit, removals)
            prices.save()
        return fast[key]

    return Meter(f"predicted latency ({backend}, batch {batch}; calibrated on measured models)",
                 lambda model: original_ms * calibration.measured(ratio(model)), calibration, measure, ratio, widths)


def fast_removals(prices: CostModel, sites: dict[str, LayerSite], unit: Any, removals: list[int]) -> list[int]:
    """The removals whose kept width the table prices strictly faster than the unit's full width and every wider
    candidate (its Conv2d/Linear members at that many output channels, its consumers at that many inputs): a width
    that runs no faster than a wider one would cost accuracy for no time (blocked kernels pad to their block)."""
    def unit_ms(width: int) -> float:
        total = 0.0
        for name in unit.members:
            if name in sites:
                site = sites[name]
                depthwise = site.groups > 1 and site.groups == site.in_ch == site.out_ch
                total += prices.width_ms(site, width if depthwise else site.in_ch, width)
        for name in unit.consumers:
            if name in sites:
                total += prices.width_ms(sites[name], width, sites[name].out_ch)
        return total

    try:
        best, kept = unit_ms(unit.channels), []
        for n in sorted(removals):  # fewest removed first: the widest candidate first
            ms = unit_ms(unit.channels - n)
            if ms < best:
                kept.append(n)
                best = ms
    except UsageError:  # a layer the table cannot price at these widths: every candidate stays
        return removals
    return kept
