"""Task losses of a model on a fixed calibration subset, evaluated as the model will ship (BatchNorm statistics
re-estimated first when the run does that before shipping). PAGCP guards every removal with them; priced ALDS
compares its searched allocation with plain low rank on them (`compare_plain`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.tasks import Tasks

EVAL_BATCH = 256
BN_ITEMS = 256  # calibration items each probe re-estimates BatchNorm statistics on


@contextmanager
def fresh_batchnorm(model: nn.Module, x: torch.Tensor) -> Iterator[None]:
    """BatchNorm statistics re-estimated on `x` (as the run does before shipping), then put back."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
             for m in norms]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None
            model.train()
            for start in range(0, len(x), EVAL_BATCH):
                model(x[start:start + EVAL_BATCH].to(device))
            model.eval()
        yield
    finally:
        with torch.no_grad():
            for norm, (mean, var, count, momentum) in zip(norms, saved):
                norm.running_mean.copy_(mean)
                norm.running_var.copy_(var)
                norm.num_batches_tracked.copy_(count)
                norm.momentum = momentum
        model.eval()


class Oracle:
    """Per-task losses of a model on a fixed calibration subset; with `as_shipped`, probes re-estimate
    BatchNorm statistics on the subset's first BN_ITEMS items first (and put them back afterwards)."""

    def __init__(self, x: torch.Tensor, y: Any, tasks: Tasks, *, as_shipped: bool = False) -> None:
        self.x, self.y, self.tasks, self.as_shipped = x, y, tasks, as_shipped
        self.evaluations = 0

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def probe(self, model: nn.Module) -> np.ndarray:
        """Mean losses per task of a probe as it would ship."""
        return _means(self.probe_items(model))

    def probe_items(self, model: nn.Module) -> np.ndarray:
        """Every item's loss per task (tasks x items) of a probe as it would ship."""
        if not self.as_shipped:
            return self.item_losses(model)
        with fresh_batchnorm(model, self.x[:BN_ITEMS]):
            return self.item_losses(model)

    def losses(self, model: nn.Module) -> np.ndarray:
        """Mean losses per task of `model` as it is."""
        return _means(self.item_losses(model))

    @torch.inference_mode()
    def item_losses(self, model: nn.Module) -> np.ndarray:
        """Every item's loss per task (tasks x items) of `model` as it is."""
        self.evaluations += 1
        model.eval()
        device = next(model.parameters()).device
        parts: list[list[np.ndarray]] = [[] for _ in self.tasks]
        for start in range(0, len(self.y), EVAL_BATCH):
            x = self.x[start:start + EVAL_BATCH].to(device)
            y = self.y[start:start + EVAL_BATCH].to(device)
            out = model(x)
            for i, task in enumerate(self.tasks):
                loss = task.item_losses(task.pick_output(out), task.pick_target(y))
                parts[i].append(loss.detach().to("cpu", torch.float64).numpy())
        return np.stack([np.concatenate(p) if p else np.zeros(0) for p in parts])


def _means(items: np.ndarray) -> np.ndarray:
    """Per task (rows), the mean item loss; 0 for an empty subset."""
    return items.mean(axis=1) if items.shape[1] else np.zeros(items.shape[0])
