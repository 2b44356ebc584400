"""Launcher-agnostic multi-process support: under `torchrun` every rank runs the same command.

Every rank prunes the same model with the same seed; the masks are hashed and compared across ranks before
fine-tuning (a mismatch would silently train different models). Only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from compress.errors import CompressError


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> Rank:
    """This process's rank, initialising the process group from torchrun's environment when needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Rank()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Rank(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_same_on_all_ranks(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise when any rank holds different tensors (e.g. pruning masks)."""
    rank = current()
    if rank.world == 1:
        return
    mine = digest(tensors)
    gathered: list[str | None] = [None] * rank.world
    dist.all_gather_object(gathered, mine)
    if len(set(gathered)) != 1:
        raise CompressError(f"{what} differ across ranks ({len(set(gathered))} distinct digests); give every rank "
                            "the same --seed, model and data")
