"""Latency of a candidate beside its baseline on every backend this machine has, interleaved in one process.

Backends: PyTorch CPU, PyTorch CUDA (synchronised) when a GPU is present, ONNX Runtime CPU, and the mobile proxy:
a static-shape export, int8 static QDQ quantisation, converted to ORT format for arm, run by ONNX Runtime's CPU
provider on one thread. The PyPI ONNX Runtime has no XNNPACK/NNAPI/CoreML providers on x86, so the proxy says how
the phone build's graph behaves on this CPU, not how fast a phone is; it is labelled "proxy" wherever it is shown.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress import export
from compress.errors import UsageError
from compress.measure.latency import LatencyPair, interleaved_times, pytorch_times, summarise_pair

PYTORCH_CPU, PYTORCH_CUDA, ONNXRUNTIME_CPU, MOBILE_PROXY = "pytorch-cpu", "pytorch-cuda", "onnxruntime-cpu", \
    "mobile-proxy"
BACKENDS = (PYTORCH_CPU, PYTORCH_CUDA, ONNXRUNTIME_CPU, MOBILE_PROXY)


def available_backends() -> tuple[str, ...]:
    """The backends this machine can run: CUDA only with a GPU."""
    return tuple(b for b in BACKENDS if b != PYTORCH_CUDA or torch.cuda.is_available())


@dataclass(frozen=True, kw_only=True)
class LatencySettings:
    """What to time: backends, batch sizes, threads, runs after warm-up."""

    backends: tuple[str, ...] = field(default_factory=available_backends)
    batches: tuple[int, ...] = (1, 32)
    threads: int = 1
    runs: int = 20
    warmup: int = 3

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise UsageError(f"unknown latency backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
        if PYTORCH_CUDA in self.backends and not torch.cuda.is_available():
            raise UsageError(f"backend {PYTORCH_CUDA} needs a CUDA GPU and none is visible; leave it out")
        if not self.batches or min(self.batches) < 1:
            raise UsageError(f"batch sizes {list(self.batches)} must be >= 1")
        if self.threads < 1 or self.runs < 1 or self.warmup < 0:
            raise UsageError(f"threads {self.threads} and runs {self.runs} must be >= 1, warm-up {self.warmup} >= 0")


def batch_of(inputs: torch.Tensor, batch: int) -> torch.Tensor:
    """`batch` items from `inputs`, cycling through them when there are fewer."""
    index = torch.arange(batch) % inputs.shape[0]
    return inputs[index].contiguous()


def _session_call(session: object, x: np.ndarray) -> Callable[[], object]:
    """A zero-argument call running `session` on `x`."""
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})


def _ort_pair(candidate_path: Path, baseline_path: Path, x: torch.Tensor,
              settings: LatencySettings, threads: int) -> tuple[list[float], list[float]]:
    """Interleaved ONNX Runtime times of two model files on the same input."""
    array = x.numpy()
    candidate = _session_call(export.ort_session(candidate_path, threads=threads), array)
    baseline = _session_call(export.ort_session(baseline_path, threads=threads), array)
    return interleaved_times(candidate, baseline, runs=settings.runs, warmup=settings.warmup)


def mobile_proxy_model(model: nn.Module, x: torch.Tensor, calibration: torch.Tensor, workdir: Path) -> Path:
    """The proxy's model: static-shape ONNX at x's batch size, int8 QDQ, in ORT format for arm."""
    workdir.mkdir(parents=True, exist_ok=True)
    fp32 = export.export_onnx(model, x, workdir / "static.onnx", static_shapes=True)
    int8 = export.quantize_int8(fp32, workdir / "static.int8.onnx", calibration)
    return export.convert_to_ort(int8, workdir / "ort")[0]


def _pytorch_pair(candidate: nn.Module, baseline: nn.Module, x: torch.Tensor, backend: str,
                  settings: LatencySettings) -> tuple[list[float], list[float]]:
    """Interleaved PyTorch times on `backend`'s device (CPU or CUDA); the models are back on the CPU after."""
    device = torch.device("cuda" if backend == PYTORCH_CUDA else "cpu")
    times = pytorch_times(candidate, baseline, x, threads=settings.threads, runs=settings.runs,
                          warmup=settings.warmup, device=device)
    candidate.cpu()  # nn.Module.cpu moves the module in place
    baseline.cpu()
    return times


def _onnx_files(candidate: nn.Module, baseline: nn.Module, x: torch.Tensor, workdir: Path) -> dict[str, Path]:
    """Both models exported to ONNX (dynamic batch) at x, as workdir/candidate.onnx and workdir/baseline.onnx."""
    return {role: export.export_onnx(model, x, workdir / f"{role}.onnx")
            for role, model in (("candidate", candidate), ("baseline", baseline))}


def _mobile_pair(candidate: nn.Module, baseline: nn.Module, x: torch.Tensor, calibration: torch.Tensor,
                 settings: LatencySettings, workdir: Path) -> tuple[list[float], list[float]]:
    """Interleaved mobile-proxy times (one thread) of both models' proxy builds at x's batch size."""
    batch = x.shape[0]
    paths = [mobile_proxy_model(model, x, calibration, workdir / f"{role}-mobile-b{batch}")
             for role, model in (("candidate", candidate), ("baseline", baseline))]
    return _ort_pair(*paths, x, settings, 1)


def measure_backends(candidate: nn.Module, baseline: nn.Module, inputs: torch.Tensor, calibration: torch.Tensor,
                     settings: LatencySettings, workdir: Path) -> list[LatencyPair]:
    """Time `candidate` beside `baseline` on each backend and batch size in `settings`.

    `inputs` supplies the items timed (cycled to fill a batch); `calibration` feeds int8 quantisation for the
    mobile proxy. The ONNX files timed are written under `workdir`.
    """
    candidate, baseline = candidate.cpu().eval(), baseline.cpu().eval()
    rows: list[LatencyPair] = []
    onnx_paths: dict[str, Path] = {}  # exported once, at the first batch timed on ONNX Runtime (dynamic batch)
    for backend in settings.backends:
        for batch in settings.batches:
            x = batch_of(inputs, batch)
            threads = 1 if backend == MOBILE_PROXY else settings.threads
            if backend in (PYTORCH_CPU, PYTORCH_CUDA):
                cand, base = _pytorch_pair(candidate, baseline, x, backend, settings)
            elif backend == ONNXRUNTIME_CPU:
                onnx_paths = onnx_paths or _onnx_files(candidate, baseline, x, workdir)
                cand, base = _ort_pair(onnx_paths["candidate"], onnx_paths["baseline"], x, settings, threads)
            else:
                cand, base = _mobile_pair(candidate, baseline, x, calibration, settings, workdir)
            rows.append(summarise_pair(backend, batch, threads, cand, base, proxy=backend == MOBILE_PROXY))
    return rows
