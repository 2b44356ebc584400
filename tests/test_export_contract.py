"""Every registered method's output exports to ONNX and computes what the PyTorch model computes.

The contract of DESIGN.md section 6, on the built-in classifier (real weights, real data) and on torchvision
resnet18; the tolerance is export.check_parity's (max abs error <= 1e-4 + 1e-3 x max|output|).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from compress import export
from compress.methods import METHODS, Context
from tests.conftest import requires_baseline


def _compressed(model: torch.nn.Module, method: str, example: torch.Tensor) -> torch.nn.Module:
    """`model` compressed in place by `method` at its default operating point."""
    result = METHODS[method].apply(model, METHODS[method].config_type(), Context(example))
    return result.model.eval()


@requires_baseline
@pytest.mark.parametrize("method", sorted(METHODS))
def test_builtin_classifier_exports_with_parity(method: str, tmp_path: Path) -> None:
    from compress.data import load_dataset
    from compress.finetune import evaluate, recalibrate_batchnorm
    from compress.models import load_model

    splits = load_dataset("fashion-mnist")
    test = splits.test
    model = _compressed(load_model().model, method, test.x[:1])
    recalibrate_batchnorm(model, splits.calibration)  # as `compress prune` does: a working model, not a constant
    assert evaluate(model, test.subset(512)).accuracy > 20.0  # above chance (10%): outputs depend on the input
    path = export.export_onnx(model, test.x[:1], tmp_path / "model.onnx")
    parity = export.verify_export(model, path, test.x[:512])
    assert parity.ok and parity.cosine > 0.99999
    assert parity.top1_agreement == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_resnet18_exports_with_parity(method: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 3, 64, 64)
    model = _compressed(torchvision.models.resnet18(num_classes=10), method, x[:1])
    path = export.export_onnx(model, x[:1], tmp_path / "model.onnx")
    parity = export.verify_export(model, path, x)
    assert parity.ok and parity.cosine > 0.99999
