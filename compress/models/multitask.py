"""The built-in multitask network: a shared residual encoder and three heads (class, mask, position).

For an image on a canvas (see compress.data.multitask) it returns a tuple, in task order:
  0. class logits (N, classes)
  1. mask logits at the input's resolution (N, 1, H, W)
  2. the position (x, y) of the item's centre as a fraction of the canvas (N, 2), by a soft-argmax over a
     heat map at 1/4 resolution

The encoder's residual blocks couple channels (identity and projection shortcuts), and the mask head
concatenates a skip connection, so structured pruning meets both kinds of coupling. Input sides must be
divisible by 4.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.models.blocks import BasicBlock


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class MTNet(nn.Module):
    """Shared encoder (stem at full resolution, two strided blocks, one identity block) and three task heads."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.stem = _conv_bn(in_channels, w0)
        self.layer1 = BasicBlock(w0, w1, stride=2)     # 1/2
        self.layer2 = BasicBlock(w1, w2, stride=2)     # 1/4
        self.layer3 = BasicBlock(w2, w2, stride=1)     # 1/4, identity shortcut
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(w2, num_classes)
        self.mask_low = _conv_bn(w2, w1)                # 1/4
        self.mask_high = _conv_bn(w1 + w1, w0)          # 1/2, after the skip from layer1
        self.mask_out = nn.Conv2d(w0, 1, 1)             # full resolution
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.position_features = _conv_bn(w2, w1)
        self.position_out = nn.Conv2d(w1, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        half = self.layer1(self.stem(x))
        quarter = self.layer3(self.layer2(half))
        logits = self.classifier(torch.flatten(self.pool(quarter), 1))
        m = self.up(self.mask_low(quarter))
        m = self.mask_high(torch.cat([m, half], 1))
        mask = self.mask_out(self.up(m))
        heat = self.position_out(self.position_features(quarter))
        return logits, mask, soft_argmax(heat)


def soft_argmax(heat: torch.Tensor) -> torch.Tensor:
    """(N, 1, h, w) scores -> (N, 2) expected (x, y) of the cell centres under softmax(scores), in [0, 1]."""
    n, _, h, w = heat.shape
    prob = torch.softmax(heat.flatten(1), dim=1).view(n, h, w)
    xs = (torch.arange(w, device=heat.device, dtype=heat.dtype) + 0.5) / w
    ys = (torch.arange(h, device=heat.device, dtype=heat.dtype) + 0.5) / h
    return torch.stack([(prob.sum(1) * xs).sum(1), (prob.sum(2) * ys).sum(1)], dim=1)
