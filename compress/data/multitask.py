"""Multitask canvases: each image placed at a seeded random position on a larger canvas, with three targets.

Targets (and tasks, in the order a multitask model returns its outputs):
  0. `class`    the image's class                               cross-entropy / accuracy (%)
  1. `mask`     its foreground on the canvas (1 x H x W, 0/1)   BCE / IoU
  2. `position` the centre of the placed image, (x, y) / canvas  L1 / pixel error (Euclidean, pixels; lower better)

The placement uses a fixed seed, so the data set is the same in every run; the run's seed picks the
calibration split, as for the plain data sets.

- `fashion-mnist-canvas`: Fashion-MNIST's 28x28 items on 56x56 (55,000 train / 5,000 calibration / 10,000 test;
  about 1.1 GB in memory).
- `digits-canvas`: scikit-learn's 8x8 digits on 24x24 (seeded 70/10/20), small enough for tests.
"""

from __future__ import annotations

import numpy as np
import torch

from compress.data.datasets import (
    CALIBRATION_SIZE,
    FASHION_MNIST_FILES,
    Splits,
    TensorSplit,
    _find_fashion_mnist,
    _fingerprint,
    _read_idx,
    _shuffled_split,
    register_dataset,
)
from compress.tasks import Targets, Task

PLACEMENT_SEED = 0
CHUNK = 8192


def canvas_tasks(canvas: int) -> tuple[Task, ...]:
    """The three tasks of a canvas data set (output i of the model serves task i)."""
    return (Task("class", "cross_entropy", "accuracy", output=0, target="class"),
            Task("mask", "bce", "iou", output=1, target="mask"),
            Task("position", "l1", "pixel_error", output=2, target="position", weight=10.0, scale=float(canvas)))


def place(images: np.ndarray, canvas: int, seed: int, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paste each (h, w) image at a seeded random position on a zero canvas.

    Returns the canvases (N, canvas, canvas) float32, the foreground masks (pixels above `threshold`) as uint8
    and the centres of the pasted images as (x, y) / canvas, float32 (N, 2).
    """
    n, h, w = images.shape
    rng = np.random.default_rng(seed)
    top, left = rng.integers(0, canvas - h + 1, n), rng.integers(0, canvas - w + 1, n)
    out = np.zeros((n, canvas, canvas), np.float32)
    for start in range(0, n, CHUNK):
        idx = np.arange(start, min(n, start + CHUNK))
        rows = (top[idx, None] + np.arange(h))[:, :, None]
        cols = (left[idx, None] + np.arange(w))[:, None, :]
        out[idx[:, None, None], rows, cols] = images[idx]
    masks = (out > threshold).astype(np.uint8)
    centres = np.stack([(left + w / 2) / canvas, (top + h / 2) / canvas], axis=1).astype(np.float32)
    return out, masks, centres


def _split(x: torch.Tensor, labels: np.ndarray, masks: np.ndarray, centres: np.ndarray,
           tasks: tuple[Task, ...]) -> TensorSplit:
    targets = Targets({"class": torch.from_numpy(labels.astype(np.int64)),
                       "mask": torch.from_numpy(masks).unsqueeze(1),
                       "position": torch.from_numpy(centres)}, tasks)
    return TensorSplit(x.unsqueeze(1).contiguous(), targets)


@register_dataset("fashion-mnist-canvas")
def fashion_mnist_canvas(seed: int = 0, canvas: int = 56) -> Splits:
    """Fashion-MNIST items on a 56x56 canvas: 55,000 train / 5,000 calibration / 10,000 test."""
    folder = _find_fashion_mnist()
    raw = {key: _read_idx(folder / name) for key, name in FASHION_MNIST_FILES.items()}
    tasks = canvas_tasks(canvas)
    parts = {}
    for split, offset in (("train", 0), ("test", 1)):
        images = raw[f"{split}_x"].astype(np.float32) / 255.0
        parts[split] = place(images, canvas, PLACEMENT_SEED + offset, threshold=0.1)
    mean, std = float(parts["train"][0].mean()), float(parts["train"][0].std())
    full_train = _split((torch.from_numpy(parts["train"][0]) - mean) / std, raw["train_y"], *parts["train"][1:],
                        tasks)
    calibration, train = _shuffled_split(full_train.x, full_train.y, (CALIBRATION_SIZE,), seed)
    test = _split((torch.from_numpy(parts["test"][0]) - mean) / std, raw["test_y"], *parts["test"][1:], tasks)
    return Splits("fashion-mnist-canvas", train, calibration, test, 10,
                  _fingerprint(raw["train_x"], raw["train_y"], raw["test_x"], raw["test_y"],
                               np.array([canvas, PLACEMENT_SEED])))


@register_dataset("digits-canvas")
def digits_canvas(seed: int = 0, canvas: int = 24) -> Splits:
    """scikit-learn's 8x8 digits on a 24x24 canvas: seeded 70% train / 10% calibration / 20% test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, labels = bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)
    placed, masks, centres = place(images, canvas, PLACEMENT_SEED, threshold=0.2)
    x = torch.from_numpy(placed)
    full = _split((x - x.mean()) / x.std(), labels, masks, centres, canvas_tasks(canvas))
    n = len(labels)
    calibration, test, train = _shuffled_split(full.x, full.y, (n // 10, n // 5), seed)
    return Splits("digits-canvas", train, calibration, test, 10,
                  _fingerprint(images, labels, np.array([canvas, PLACEMENT_SEED])))
