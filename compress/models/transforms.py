"""Structural edits that arch.json replays: a registry that the methods fill and the loader reads.

A method that changes a model's structure (a layer replaced by a decomposition, channels pruned away) records
`{"type": name, ...}` in `Result.transforms` and registers the function that replays that edit here. Loading the
artifact rebuilds the base architecture, replays the edits with random weights, then loads the weights. This
module sits below both the loader and the methods, so neither imports the other: the entry points
(`compress.api`, and so the CLI) import `compress.methods`, which registers every method's edits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from compress.errors import UsageError

ArchTransform = Callable[[nn.Module, dict[str, Any]], None]
ARCH_TRANSFORMS: dict[str, ArchTransform] = {}


def register_transform(name: str) -> Callable[[ArchTransform], ArchTransform]:
    """Decorator: register `fn` as the replay of the structural edit `name` recorded in arch.json."""

    def wrap(fn: ArchTransform) -> ArchTransform:
        ARCH_TRANSFORMS[name] = fn
        return fn

    return wrap


def transform_for(name: Any) -> ArchTransform:
    """The replay function of edit type `name`, or a one-line error that names it and the fix."""
    if name not in ARCH_TRANSFORMS:
        raise UsageError(f"arch.json has an unknown transform {name!r}; this process knows "
                         f"{sorted(ARCH_TRANSFORMS)}: import compress.methods (compress.api does) so the methods "
                         "register theirs, or upgrade compress")
    return ARCH_TRANSFORMS[name]


def replay_transforms(model: nn.Module, edits: Iterable[dict[str, Any]]) -> nn.Module:
    """Apply each recorded edit to `model`, in order; returns the model."""
    for edit in edits:
        transform_for(edit.get("type"))(model, edit)
    return model
