"""Built-in networks, small enough to train on two CPU cores."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from compress.models.blocks import BasicBlock
from compress.models.multitask import MTNet


class ResCNN(nn.Module):
    """A small residual CNN for 28x28 grayscale images: stem, three strided blocks, pooled linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        blocks, c_in = [], widths[0]
        for width in widths:
            blocks.append(BasicBlock(c_in, width, stride=2))
            c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


BUILTIN_ARCHS: dict[str, Callable[..., nn.Module]] = {"rescnn": ResCNN, "mtnet": MTNet}
BUILTIN_DATASETS: dict[str, str] = {"rescnn": "fashion-mnist", "mtnet": "fashion-mnist-canvas"}
