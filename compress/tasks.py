"""Tasks: a model's named outputs, each with a loss and a metric with its direction.

A plain classifier is the one-task case (`CLASSIFICATION`: cross-entropy / accuracy on the whole output and the
whole label tensor). A multitask data set carries its targets in a `Targets` container, which also names the
tasks; a multitask model returns a tuple whose entries the tasks pick by index.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

LOSSES = ("cross_entropy", "bce", "l1")
METRICS = {"accuracy": True, "iou": True, "pixel_error": False}  # metric -> higher is better


@dataclass(frozen=True)
class Task:
    """One output of a model: where it is, its target, its loss and its metric."""

    name: str
    loss: str = "cross_entropy"     # cross_entropy | bce | l1
    metric: str = "accuracy"        # accuracy (%) | iou | pixel_error (pixels)
    output: int | str | None = None  # index (or key) into a tuple/list/dict output; None: the whole output
    target: str | None = None       # key into Targets; None: the whole label tensor
    weight: float = 1.0             # weight of this loss in the training objective
    scale: float = 1.0              # pixel_error: normalised coordinates times this = pixels

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"task {self.name!r}: loss {self.loss!r} is unknown; choose one of {LOSSES}")
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name!r}: metric {self.metric!r} is unknown; choose one of {list(METRICS)}")

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric]

    def pick_output(self, out: Any) -> torch.Tensor:
        return out if self.output is None else out[self.output]

    def pick_target(self, y: Any) -> torch.Tensor:
        return y if self.target is None else y[self.target]

    def item_losses(self, out: torch.Tensor, y: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
        """The loss of every item (N,): cross-entropy, or the mean BCE / L1 over an item's elements."""
        if self.loss == "cross_entropy":
            return F.cross_entropy(out, y, reduction="none", label_smoothing=label_smoothing)
        if self.loss == "bce":
            return F.binary_cross_entropy_with_logits(out, y.to(out.dtype), reduction="none").flatten(1).mean(1)
        return (out - y.to(out.dtype)).abs().flatten(1).mean(1)

    def metric_sum(self, out: torch.Tensor, y: torch.Tensor) -> float:
        """The metric summed over the items of a batch (divide by the item count for the mean)."""
        if self.metric == "accuracy":
            return 100.0 * float((out.argmax(1) == y).sum())
        if self.metric == "iou":
            pred, truth = (out > 0).flatten(1), y.flatten(1) > 0.5
            inter, union = (pred & truth).sum(1).float(), (pred | truth).sum(1).float()
            return float(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter)).sum())
        return float(((out - y.to(out.dtype)) * self.scale).norm(dim=1).sum())  # pixel_error: Euclidean distance

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "loss": self.loss, "metric": self.metric, "output": self.output,
                "target": self.target, "weight": self.weight, "higher_is_better": self.higher_is_better}


CLASSIFICATION = Task("classification")
Tasks = tuple[Task, ...]


class Targets:
    """Several target tensors with one item axis, indexed together like one tensor, and the tasks they serve."""

    def __init__(self, tensors: dict[str, torch.Tensor], tasks: Iterable[Task]) -> None:
        self.tensors = dict(tensors)
        self.tasks: Tasks = tuple(tasks)
        lengths = {len(v) for v in self.tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"targets have different item counts: {sorted(lengths)}")

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return self.tensors[key]
        return Targets({k: v[key] for k, v in self.tensors.items()}, self.tasks)

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def to(self, *args: Any, **kwargs: Any) -> Targets:
        return Targets({k: v.to(*args, **kwargs) for k, v in self.tensors.items()}, self.tasks)

    def contiguous(self) -> Targets:
        return Targets({k: v.contiguous() for k, v in self.tensors.items()}, self.tasks)

    def numpy_arrays(self) -> list[Any]:
        return [v.numpy() for v in self.tensors.values()]


def tasks_of(labels: Any) -> Tasks:
    """The tasks a label container serves: its own for `Targets`, else the one classification task."""
    return labels.tasks if isinstance(labels, Targets) else (CLASSIFICATION,)


def is_multitask(tasks: Tasks | None) -> bool:
    return tasks is not None and tuple(tasks) != (CLASSIFICATION,)


def total_loss(out: Any, y: Any, tasks: Tasks, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """The training objective: the weighted sum of every task's mean loss."""
    return sum(task.weight * task.item_losses(task.pick_output(out), task.pick_target(y),
                                              label_smoothing=label_smoothing if task.loss == "cross_entropy"
                                              else 0.0).mean()
               for task in tasks)
