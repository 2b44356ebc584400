"""A worked example of `--data package.module:function` (docs/own-data.md): a face-detector-like output stage with
a fixed 3x48x48 input and three outputs (a box, five landmarks, a class), on synthetic data made here.

    compress train --model docs.examples.face_stage:model --data docs.examples.face_stage:data \
        --input-shape 3,48,48 --epochs 3 --out runs/face
    compress prune --method pagcp --model runs/face --tau 2 --finetune-epochs 0 --out runs/face-pagcp
"""

from __future__ import annotations

import torch
from torch import nn

from compress.tasks import Task

SIZE = 48
TASKS = [Task("box", loss="l1", metric="pixel_error", output=0, target="box", scale=SIZE),
         Task("landmarks", loss="l1", metric="pixel_error", output=1, target="landmarks", scale=SIZE),
         Task("kind", loss="cross_entropy", metric="accuracy", output=2, target="kind")]


class FaceStage(nn.Module):
    """3x48x48 -> three conv blocks -> flatten -> a shared Linear -> box (4), landmarks (10), kind (3)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.shared = nn.Sequential(nn.Flatten(), nn.Linear(32 * 6 * 6, 64), nn.ReLU())
        self.box, self.landmarks, self.kind = nn.Linear(64, 4), nn.Linear(64, 10), nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.shared(self.features(x))
        return self.box(h), self.landmarks(h), self.kind(h)


def model() -> FaceStage:
    """The model factory (`--model docs.examples.face_stage:model`)."""
    return FaceStage()


def _make(n: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n noisy images, each with one bright rectangle of one of three colours: its box (x0, y0, x1, y1), its
    corners and centre (landmarks), all normalised to [0, 1], and its colour (kind)."""
    x = 0.1 * torch.randn(n, 3, SIZE, SIZE, generator=generator)
    size = torch.randint(10, 24, (n, 2), generator=generator)
    corner = (torch.rand(n, 2, generator=generator) * (SIZE - size)).long()
    kind = torch.randint(0, 3, (n,), generator=generator)
    for i in range(n):
        (left, top), (w, h) = corner[i].tolist(), size[i].tolist()
        x[i, kind[i], top:top + h, left:left + w] += 1.0
    x0, y0 = corner[:, 0].float(), corner[:, 1].float()
    x1, y1 = x0 + size[:, 0], y0 + size[:, 1]
    box = torch.stack([x0, y0, x1, y1], 1) / SIZE
    landmarks = torch.stack([x0, y0, x1, y0, x0, y1, x1, y1, (x0 + x1) / 2, (y0 + y1) / 2], 1) / SIZE
    return x, {"box": box, "landmarks": landmarks, "kind": kind}


def data(seed: int = 0) -> dict:
    """The data function (`--data docs.examples.face_stage:data`): train, calibration and test splits, and the tasks."""
    generator = torch.Generator().manual_seed(seed)
    return {"train": _make(1200, generator), "calibration": _make(300, generator), "test": _make(300, generator),
            "tasks": TASKS, "num_classes": 3}
