"""A model's input shape, and the one transform that brings any data set's items to it.

The transform, applied per item as batches are read (nothing is materialised at the new size up front, so a
224x224 input over Fashion-MNIST costs memory per batch, not per data set):

1. channels: a grayscale item is repeated to the model's channel count (1 -> 3); other mismatches are refused;
2. size: bilinear resize of H x W to the model's (`torch.nn.functional.interpolate`, align_corners=False);
3. normalisation: kept as the data set's own (zero mean, unit variance over its training images); a model
   pretrained on other statistics is fine-tuned on these.

The shape and the transform are recorded in the run's manifest (`input`) and replayed by every command that
loads the run (verify, measure, export, finetune).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from compress.data.datasets import Splits, TensorSplit
from compress.errors import UsageError

RESIZE = "bilinear"


def parse_shape(text: str | None) -> tuple[int, int, int] | None:
    """`3,48,48` -> (3, 48, 48); exit 2 on anything else."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).replace("x", ",").split(",")]
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UsageError(f"--input-shape {text!r} must be C,H,W with three positive integers, e.g. 3,224,224")
    return (int(parts[0]), int(parts[1]), int(parts[2]))


@dataclass(frozen=True)
class InputTransform:
    """Items of shape `source` brought to `shape`: gray repeated to the channels, bilinear resize."""

    source: tuple[int, int, int]
    shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        have, want = self.source[0], self.shape[0]
        if have != want and have != 1:
            raise UsageError(f"the data has {have} channels and --input-shape asks for {want}; only grayscale "
                             "(1 channel) data is widened; pick data with matching channels")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A batch (N, C, H, W) at the data's shape -> (N, *shape)."""
        if x.shape[1] != self.shape[0]:
            x = x.expand(-1, self.shape[0], -1, -1)
        if tuple(x.shape[2:]) != self.shape[1:]:
            x = F.interpolate(x, size=self.shape[1:], mode=RESIZE, align_corners=False)
        return x.contiguous()

    def to_dict(self) -> dict[str, Any]:
        """What the manifest records: enough to replay it and to say what was done."""
        return {"shape": list(self.shape), "data_shape": list(self.source),
                "channels": "gray repeated" if self.source[0] != self.shape[0] else "as is",
                "resize": RESIZE if self.source[1:] != self.shape[1:] else "none",
                "normalisation": "the data set's own"}


class TransformedInputs:
    """A split's inputs seen through an InputTransform: indexing returns transformed tensors; nothing else is
    stored at the new size."""

    def __init__(self, base: torch.Tensor, transform: InputTransform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: Any) -> torch.Tensor:
        items = self.base[index]
        return self.transform.apply(items if items.ndim == 4 else items.unsqueeze(0))

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.base), *self.transform.shape))

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def head(self, n: int) -> TransformedInputs:
        """The first n items, still transformed lazily."""
        return TransformedInputs(self.base[:n], self.transform)

    def numpy(self) -> Any:
        """Every item, transformed (for code that needs one array)."""
        return self[:].numpy()

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)


def with_input_shape(splits: Splits, shape: tuple[int, int, int]) -> tuple[Splits, InputTransform]:
    """The same splits with every item brought to `shape` as it is read."""
    transform = InputTransform(tuple(splits.input_shape), tuple(shape))  # type: ignore[arg-type]
    if transform.source == transform.shape:
        return splits, transform

    def view(split: TensorSplit) -> TensorSplit:
        base = split.x.base if isinstance(split.x, TransformedInputs) else split.x
        return TensorSplit(TransformedInputs(base, transform), split.y)  # type: ignore[arg-type]

    return dataclasses.replace(splits, train=view(splits.train), calibration=view(splits.calibration),
                               test=view(splits.test)), transform


# ------------------------------------------------------------------------------------------ does the model run?

SIZES = (16, 24, 28, 32, 48, 56, 64, 96, 112, 128, 160, 192, 224, 256, 299, 320, 384, 512)
FORWARD_ERRORS = (RuntimeError, ValueError, AssertionError, IndexError, TypeError)
log = logging.getLogger("compress")


def forward_error(model: nn.Module, x: torch.Tensor) -> str | None:
    """The first line of the error the model raises on `x` (eval mode, no grad), or None when it runs."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
        return None
    except FORWARD_ERRORS as exc:
        return ((str(exc).splitlines() or [type(exc).__name__])[0])[:160]
    finally:
        model.train(was_training)


def runnable_shape(model: nn.Module, channels: tuple[int, ...]) -> tuple[int, int, int] | None:
    """The smallest square C,S,S (C from `channels`, in order) at which the model runs on one item."""
    device = next(model.parameters(), torch.empty(0)).device
    for size in SIZES:
        for c in channels:
            if forward_error(model, torch.zeros(1, c, size, size, device=device)) is None:
                return (c, size, size)
    return None


def _linear_hint(model: nn.Module, x: torch.Tensor) -> str:
    """`; its first Linear fc expects 6912 features and gets 1152` when that is where the forward breaks."""
    found: list[str] = []

    def check(name: str) -> Any:
        def hook(module: nn.Linear, args: tuple) -> None:
            if not found and args and args[0].shape[-1] != module.in_features:
                found.append(f"; its Linear {name!r} expects {module.in_features} input features and gets "
                             f"{args[0].shape[-1]} (the flattened size at this input)")
        return hook

    handles = [m.register_forward_pre_hook(check(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        forward_error(model, x)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else ""


def _shape_text(shape: tuple[int, ...]) -> str:
    return ",".join(map(str, shape))


def fit_input(model: nn.Module, splits: Splits, *, explicit: bool, source: str) -> Splits:
    """Run the model once on two test items before any work. When it does not run: a torchvision model is given the
    smallest square input it runs at (and a note says so); anything else, or a shape the user chose, stops with one
    line naming the data's shape, what the model seems to expect and the flag to pass."""
    device = next(model.parameters(), torch.empty(0)).device
    here = tuple(splits.input_shape)
    error = forward_error(model, splits.test.x[:2].to(device))
    if error is None:
        return splits
    if explicit:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        channels = (f"; its first convolution takes {first.in_channels} channel(s)"
                    if first is not None and first.in_channels != here[0] else "")
        raise UsageError(f"the model does not run at --input-shape {_shape_text(here)} (shape error: {error})"
                         f"{channels}; give the input shape the model was built for")
    working = runnable_shape(model, tuple(dict.fromkeys((here[0], 3, 1))))
    if working is not None and source.startswith("torchvision:"):
        log.info("%s does not run at %s; its items are resized to %s, the smallest square input it runs at "
                 "(pass --input-shape C,H,W to choose another)", source, _shape_text(here), _shape_text(working))
        return with_input_shape(splits, working)[0]
    hint = _linear_hint(model, splits.test.x[:2].to(device))
    runs_at = f"; it runs at {_shape_text(working)}" if working is not None else ""
    flag = f"--input-shape {_shape_text(working)}" if working is not None else "--input-shape C,H,W"
    raise UsageError(f"the model does not run on {splits.name}'s items of shape {_shape_text(here)} (shape error: "
                     f"{error}){hint}{runs_at}; pass {flag}")
