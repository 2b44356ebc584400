"""Latency on every backend: the rows, their labels, and the mobile proxy's model (real ONNX Runtime sessions)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compress import export
from compress.errors import UsageError
from compress.measure.backends import (MOBILE_PROXY, ONNXRUNTIME_CPU, PYTORCH_CPU, LatencySettings,
                                       available_backends, batch_of, measure_backends, mobile_proxy_model)
from tests.factories import tiny_cnn


def test_every_backend_and_batch_gets_an_interleaved_row(tmp_path: Path) -> None:
    torch.manual_seed(0)
    inputs, calibration = torch.randn(5, 1, 8, 8), torch.randn(32, 1, 8, 8)
    candidate, baseline = tiny_cnn(seed=1), tiny_cnn(seed=0)
    settings = LatencySettings(backends=(PYTORCH_CPU, ONNXRUNTIME_CPU, MOBILE_PROXY), batches=(1, 3), threads=2,
                               runs=3, warmup=1)
    rows = measure_backends(candidate, baseline, inputs, calibration, settings, tmp_path)
    assert [(r.backend, r.batch) for r in rows] == [(b, n) for b in settings.backends for n in (1, 3)]
    for row in rows:
        assert row.runs == 3 and row.p50_ms > 0 and row.baseline_p50_ms > 0
        assert row.speedup_spread[0] <= row.speedup <= row.speedup_spread[1]  # the median of per-round ratios
        assert row.proxy == (row.backend == MOBILE_PROXY)
        assert row.threads == (1 if row.backend == MOBILE_PROXY else 2)  # a phone core, whatever --threads says
    assert not candidate.training  # measured in eval mode


def test_mobile_proxy_model_is_static_int8_ort(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = mobile_proxy_model(tiny_cnn(), torch.randn(4, 1, 8, 8), torch.randn(32, 1, 8, 8), tmp_path)
    assert path.suffix == ".ort"
    session = export.ort_session(path)
    assert session.get_inputs()[0].shape == [4, 1, 8, 8]  # static shapes, the batch it was made for
    assert (tmp_path / "static.int8.onnx").stat().st_size < (tmp_path / "static.onnx").stat().st_size


def test_batch_of_cycles_through_the_items() -> None:
    x = torch.arange(3.0).reshape(3, 1)
    assert batch_of(x, 7).flatten().tolist() == [0, 1, 2, 0, 1, 2, 0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal only applies without a GPU")
def test_cuda_backend_without_a_gpu_is_a_usage_error() -> None:
    assert "pytorch-cuda" not in available_backends()
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        LatencySettings(backends=("pytorch-cuda",))


def test_speedup_is_the_median_of_paired_ratios() -> None:
    from compress.measure.latency import summarise_pair

    pair = summarise_pair("pytorch-cpu", 1, 1, cand=[1.0, 3.0, 3.0], base=[3.0, 3.0, 9.0])
    assert pair.speedup == 3.0  # rounds: 3x, 1x, 3x (the ratio of the medians would say 1x)
    assert (pair.p50_ms, pair.baseline_p50_ms) == (3000.0, 3000.0)
    assert pair.speedup_spread == (1.0, 3.0)
