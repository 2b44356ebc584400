"""Parameter counts and bytes on disk per format."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compress.artifact import dense_bytes, sparse_bytes


@dataclass(frozen=True)
class ParamCount:
    total: int
    nonzero: int
    buffers: int


@dataclass(frozen=True)
class SizeReport:
    """Bytes of each serialised format."""

    bytes: dict[str, int]


def count_params(model: nn.Module) -> ParamCount:
    """Parameters (total and nonzero) and buffer elements."""
    params = list(model.parameters())
    return ParamCount(sum(p.numel() for p in params), sum(int(p.count_nonzero()) for p in params),
                      sum(b.numel() for b in model.buffers()))


def model_sizes(model: nn.Module) -> SizeReport:
    """Bytes of the dense safetensors file and of the sparse encoding."""
    return SizeReport({"safetensors_dense": len(dense_bytes(model)), "safetensors_sparse": len(sparse_bytes(model))})
