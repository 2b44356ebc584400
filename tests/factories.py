"""Importable model factories and pickle payloads for the tests (used as `tests.factories:NAME` specs)."""

from __future__ import annotations

import pathlib

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Three 3x3 convolutions with BatchNorm and a linear head; takes 1x8x8 inputs (the `digits` data set)."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def tiny_cnn(num_classes: int = 10, seed: int = 0) -> TinyCNN:
    """A TinyCNN with weights drawn from `seed`, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyCNN(num_classes)


class PickleBomb:
    """Unpickling this creates `path`: the stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, path: str | pathlib.Path) -> None:
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


class ExportMismatchCNN(TinyCNN):
    """A TinyCNN whose exported graph adds 1.0 to every logit: the ONNX file does not match PyTorch on purpose."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        # traced into the ONNX graph only: eager PyTorch never sees the shift
        return out + 1.0 if torch.onnx.is_in_onnx_export() else out


def export_mismatch_cnn(num_classes: int = 10, seed: int = 0) -> ExportMismatchCNN:
    """An ExportMismatchCNN with weights drawn from `seed` (1x8x8 inputs), leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ExportMismatchCNN(num_classes)


class FixedInputCNN(nn.Module):
    """A face-detector-like stage with a fixed input size: 3x48x48 -> two conv/pool steps -> flatten -> Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(16 * 12 * 12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def fixed_input_cnn(num_classes: int = 10, seed: int = 0) -> FixedInputCNN:
    """A FixedInputCNN with weights drawn from `seed` (runs only at 3x48x48), leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FixedInputCNN(num_classes)
