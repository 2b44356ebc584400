"""PyTorch latency, candidate and baseline interleaved in one process so drift hits both alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LatencyPair:
    """Medians and p90 of candidate and baseline, and the speed-up (median of the per-round baseline / candidate
    ratios) with its spread (their 25th and 75th percentiles)."""

    backend: str
    batch: int
    threads: int
    runs: int
    p50_ms: float
    p90_ms: float
    baseline_p50_ms: float
    baseline_p90_ms: float
    speedup: float
    speedup_spread: tuple[float, float]  # 25th and 75th percentile of per-round ratios
    proxy: bool = False  # a stand-in for another device (the mobile proxy), labelled so wherever shown

    def to_dict(self) -> dict:
        return {"backend": self.backend, "batch": self.batch, "threads": self.threads, "runs": self.runs,
                "p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "baseline_p50_ms": self.baseline_p50_ms,
                "baseline_p90_ms": self.baseline_p90_ms, "speedup": self.speedup,
                "speedup_spread": list(self.speedup_spread), "proxy": self.proxy}


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with an explicit intra-op thread count, restoring the previous one."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def interleaved_rounds(fns: Sequence[Callable[[], object]], *, runs: int, warmup: int,
                       synchronize: Callable[[], None] = lambda: None) -> list[list[float]]:
    """Seconds per call of each of `fns`, all called once in every round, the order reversed every other round.

    Each callable gets one series of `runs` times, in the order of `fns`; round i of every series comes from the
    same stretch of wall time, so a slow spell (another process, a frequency change) hits all of them alike.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    series: list[list[float]] = [[] for _ in fns]
    forward = list(zip(fns, series))
    for i in range(runs):
        for fn, sink in (forward if i % 2 == 0 else forward[::-1]):
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            sink.append(time.perf_counter() - start)
    return series


def interleaved_times(candidate: Callable[[], object], baseline: Callable[[], object], *, runs: int,
                      warmup: int, synchronize: Callable[[], None] = lambda: None) -> tuple[list[float], list[float]]:
    """Seconds per call of each, alternating which goes first each round."""
    cand, base = interleaved_rounds((candidate, baseline), runs=runs, warmup=warmup, synchronize=synchronize)
    return cand, base


def summarise_pair(backend: str, batch: int, threads: int, cand: list[float], base: list[float], *,
                   proxy: bool = False) -> LatencyPair:
    """Medians, p90s and the per-round speed-up ratios of two interleaved series."""
    # the median of the per-round ratios, not the ratio of the medians: each round times both back to back, so
    # the pair shares the machine's state, and the speed-up then always lies inside its reported spread
    ratios = [b / c for b, c in zip(base, cand)]
    return LatencyPair(backend, batch, threads, len(cand), 1e3 * statistics.median(cand), 1e3 * _percentile(cand, 0.9),
                       1e3 * statistics.median(base), 1e3 * _percentile(base, 0.9), statistics.median(ratios),
                       (_percentile(ratios, 0.25), _percentile(ratios, 0.75)), proxy)


def pytorch_times(candidate: nn.Module, baseline: nn.Module, x: torch.Tensor, *, threads: int, runs: int,
                  warmup: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Interleaved PyTorch seconds per call of both models on `x`, in eval and inference mode (CUDA synchronised)."""
    candidate, baseline, x = candidate.eval().to(device), baseline.eval().to(device), x.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch_threads(threads), torch.inference_mode():
        return interleaved_times(lambda: candidate(x), lambda: baseline(x), runs=runs, warmup=warmup,
                                 synchronize=sync)


def measure_latency_pair(candidate: nn.Module, baseline: nn.Module, example: torch.Tensor, *, batch: int = 1,
                         threads: int = 1, runs: int = 50, warmup: int = 5,
                         device: torch.device | None = None) -> LatencyPair:
    """Latency of `candidate` beside `baseline` on PyTorch (CPU, or CUDA synchronised), in eval mode."""
    device = device or torch.device("cpu")
    x = example[:1].expand(batch, *example.shape[1:]).contiguous()
    cand, base = pytorch_times(candidate, baseline, x, threads=threads, runs=runs, warmup=warmup, device=device)
    backend = "pytorch-cuda" if device.type == "cuda" else "pytorch-cpu"
    return summarise_pair(backend, batch, threads, cand, base)
