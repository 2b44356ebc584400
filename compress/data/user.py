"""The user's own data and tasks: `--data package.module:function`.

The function (called with the run's seed when it takes an argument) returns either a `compress.data.Splits`, or a
plain dict that this module turns into one::

    {"train": (x, y), "calibration": (x, y), "test": (x, y),      # x: float tensor (N, C, H, W), N items each
     "tasks": [Task("box", loss="l1", metric="pixel_error", output=0, target="box"), ...],   # several outputs
     "num_classes": 3}                                           # optional

`y` is a label tensor (N,) for a classifier (no `tasks` needed), or a dict of target tensors (N, ...) for a model
with several outputs, each named by a task's `target`; a task's `output` is the index (or key) of its output in
what the model returns. `Task` is the type the built-in multitask data uses (`compress.tasks`): a loss
(cross_entropy, bce, l1) and a metric with its direction (accuracy and iou higher, pixel_error lower). A worked
example: docs/own-data.md and docs/examples/face_stage.py.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import sys
from typing import Any

import torch

from compress.data.datasets import Splits, TensorSplit, load_dataset
from compress.errors import UsageError
from compress.tasks import Targets, Task

SPLITS = ("train", "calibration", "test")
SHAPE = "{'train': (x, y), 'calibration': (x, y), 'test': (x, y), 'tasks': [Task, ...]} or a Splits"


def is_user_data(spec: str) -> bool:
    """`package.module:function` (not `folder:PATH`, not a registered name)."""
    module, sep, function = spec.partition(":")
    return bool(sep) and module != "folder" and bool(function) and "/" not in module


def resolve_data(spec: str, seed: int) -> Splits:
    """A registered data set, `folder:PATH`, or the user's `package.module:function`."""
    return load_user_data(spec, seed) if is_user_data(spec) else load_dataset(spec, seed)


def load_user_data(spec: str, seed: int) -> Splits:
    """Import the user's function, call it and check what it returns (exit 2, one line, on anything wrong)."""
    function = _import(spec)
    try:
        takes_seed = bool(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        takes_seed = False
    returned = function(seed) if takes_seed else function()
    if isinstance(returned, Splits):
        return returned
    if not isinstance(returned, dict):
        raise UsageError(f"--data {spec} returned {type(returned).__name__}; return {SHAPE}")
    return _splits_from(spec, returned)


def _import(spec: str) -> Any:
    """The function named by `package.module:function` (the current directory is importable)."""
    module_name, _, function_name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot import data function {spec!r} ({exc}); give package.module:function importable "
                         "from the current directory") from None
    if not callable(function):
        raise UsageError(f"--data {spec} is not a function; give one that returns {SHAPE}")
    return function


def _splits_from(spec: str, data: dict[str, Any]) -> Splits:
    """A Splits from the plain dict form, checked: every split present, x and y with one item count, tasks that
    name the targets there are."""
    missing = [name for name in SPLITS if name not in data]
    if missing:
        raise UsageError(f"--data {spec} returned no {missing[0]!r} split; return {SHAPE}")
    tasks = tuple(data.get("tasks") or ())
    if not all(isinstance(t, Task) for t in tasks):
        raise UsageError(f"--data {spec}: `tasks` must hold compress.tasks.Task items (name, loss, metric, output, "
                         "target)")
    splits = {name: _split(spec, name, data[name], tasks) for name in SPLITS}
    num_classes = int(data.get("num_classes") or _classes(splits["train"]))
    # named by the spec, so that a run's manifest replays it (verify, measure, finetune)
    return Splits(spec, splits["train"], splits["calibration"], splits["test"], num_classes,
                  _fingerprint(splits.values()))


def _split(spec: str, name: str, pair: Any, tasks: tuple[Task, ...]) -> TensorSplit:
    """One (x, y) pair as a TensorSplit: y a label tensor, or a dict of targets wrapped with the tasks."""
    if not isinstance(pair, tuple | list) or len(pair) != 2:
        raise UsageError(f"--data {spec}: {name!r} must be a pair (x, y)")
    x, y = pair
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise UsageError(f"--data {spec}: {name} x must be a float tensor (N, C, H, W), not "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if isinstance(y, dict):
        if not tasks:
            raise UsageError(f"--data {spec}: targets {sorted(y)} need `tasks` naming them (Task(..., target=KEY))")
        unknown = [t.target for t in tasks if t.target is not None and t.target not in y]
        if unknown:
            raise UsageError(f"--data {spec}: task target {unknown[0]!r} is not among the targets {sorted(y)}")
        y = Targets({k: torch.as_tensor(v) for k, v in y.items()}, tasks)
    elif not isinstance(y, torch.Tensor):
        raise UsageError(f"--data {spec}: {name} y must be a label tensor or a dict of target tensors")
    if len(y) != len(x):
        raise UsageError(f"--data {spec}: {name} has {len(x)} inputs and {len(y)} targets; give one target per input")
    return TensorSplit(x.float().contiguous(), y)


def _classes(split: TensorSplit) -> int:
    """The class count a label tensor implies (0 for targets without a class tensor)."""
    labels = split.y if isinstance(split.y, torch.Tensor) else None
    return int(labels.max()) + 1 if labels is not None and labels.dtype in (torch.int64, torch.int32) else 0


def _fingerprint(splits: Any) -> str:
    """sha256 over every split's inputs and targets."""
    digest = hashlib.sha256()
    for split in splits:
        digest.update(split.x.numpy().tobytes())
        tensors = split.y.tensors.values() if isinstance(split.y, Targets) else [split.y]
        for tensor in tensors:
            digest.update(tensor.contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()
