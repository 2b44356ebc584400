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
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from compress.config import ALDSConfig, SVDConfig
from compress.measure import count_macs
from compress.measure.backends import LatencySettings, measure_backends
from compress.measure.costs import CostModel, LayerSite, measure_model_ms, predict_ms, rest_ms, sites_of

MIN_PRICED_GROUP_CHANNELS = 16  # narrower groups make GEMMs too small to run fast on dense runtimes
LATENCY_TOLERANCE = 0.10        # a measured latency ratio may exceed the request by this much (timing noise)
AUDIT_RUNS = 30


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
    _options: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def total(self) -> float:
        """The original's predicted latency: the time outside the layers plus their dense prices."""
        return self.fixed + sum(self.dense_ms)

    @property
    def target(self) -> float:
        return self.requested * self.total

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
    return LatencyBudget(prices, sites, dense, max(0.0, outside_ms), float(cfg.latency_keep), over, cfg.rank_step,
                         cfg.dense_margin)


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


def latency_section(budget: LatencyBudget, cost: float, prices: Prices) -> dict[str, Any]:
    """The report's latency section of a priced decomposition: requested, predicted, and the cost table used."""
    section = {"backend": budget.counted_over, "requested": budget.requested, "predicted": cost / budget.total,
               "original_predicted_ms": budget.total, "predicted_ms": cost, "outside_layers_ms": budget.fixed,
               "rank_step": budget.step, "dense_margin": budget.margin}
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


@dataclass(frozen=True)
class Meter:
    """What a target counts on a whole model: its MACs, or its predicted milliseconds on a backend (the time
    outside its Conv2d/Linear layers measured once on the original, plus each layer's price at its widths)."""

    counted_over: str
    cost: Callable[[nn.Module], float]


def macs_meter(example: torch.Tensor) -> Meter:
    """MACs at one item of `example`."""
    return Meter("MACs", lambda model: float(count_macs(model, example).macs))


def latency_meter(original: nn.Module, example: torch.Tensor, backend: str, batch: int) -> Meter:
    """Predicted latency on `backend` at `batch` (one thread), priced from the cost table (cached on disk); the
    time outside the layers scales with the activations the model hands between them (costs.predict_ms)."""
    prices = CostModel(backend, batch=batch, threads=1)
    reference = copy.deepcopy(original).eval()  # the method prunes `original` in place
    outside = rest_ms(reference, example, prices, measure_model_ms(reference, example, prices))

    def cost(model: nn.Module) -> float:
        predicted = predict_ms(model, example, prices, outside, reference=reference)
        prices.save()
        return predicted

    return Meter(f"predicted latency ({backend}, batch {batch})", cost)
