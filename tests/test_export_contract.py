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
from compress.config import PAGCPConfig
from compress.data import Splits
from compress.methods import METHODS, Context
from tests.conftest import requires_baseline


def _compressed(model: torch.nn.Module, method: str, splits: Splits) -> torch.nn.Module:
    """`model` compressed in place by `method` at its default operating point (PAGCP on a small calibration
    subset: its oracle evaluates every candidate ratio of every unit)."""
    cfg = METHODS[method].config_type()
    if isinstance(cfg, PAGCPConfig):
        cfg = PAGCPConfig(calibration_items=32, step=0.25)
    example = splits.test.x[:1]
    return METHODS[method].apply(model, cfg, Context(example, splits, tasks=splits.tasks)).model.eval()


@requires_baseline
@pytest.mark.parametrize("method", sorted(METHODS))
def test_builtin_classifier_exports_with_parity(method: str, tmp_path: Path) -> None:
    from compress.data import load_dataset
    from compress.finetune import evaluate, recalibrate_batchnorm
    from compress.models import load_model

    splits = load_dataset("fashion-mnist")
    test = splits.test
    model = _compressed(load_model().model, method, splits)
    recalibrate_batchnorm(model, splits.calibration)  # as `compress prune` does: a working model, not a constant
    assert evaluate(model, test.subset(512)).accuracy > 20.0  # above chance (10%): outputs depend on the input
    path = export.export_onnx(model, test.x[:1], tmp_path / "model.onnx")
    parity = export.verify_export(model, path, test.x[:512])
    assert parity.ok and parity.cosine > 0.99999
    assert parity.top1_agreement == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_resnet18_exports_with_parity(method: str, tmp_path: Path) -> None:
    from compress.data import TensorSplit

    torch.manual_seed(0)
    x = torch.randn(32, 3, 64, 64)
    random = TensorSplit(x, torch.randint(0, 10, (32,)))  # parity needs no real data
    splits = Splits("random", random, random, random, 10, "random")
    model = _compressed(torchvision.models.resnet18(num_classes=10), method, splits)
    path = export.export_onnx(model, x[:1], tmp_path / "model.onnx")
    parity = export.verify_export(model, path, x)
    assert parity.ok and parity.cosine > 0.99999
