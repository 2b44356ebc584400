"""The run directory: weights in safetensors with a lossless sparse encoding, arch.json, manifest.json.

manifest.json's `outputs` maps each file it covers (model.safetensors and arch.json) to its sha256;
`verify_files` checks them. Files written after the manifest (report.*, recipe.resolved.yaml, exports) are not
covered, and the manifest cannot cover itself.

A pruned tensor is stored as a bitmask of its nonzeros (packed, 1 bit per weight) plus the nonzero values in
row-major order, whenever that is smaller than the dense tensor. Decoding gives back every value exactly
(bit for bit, except that a -0.0 comes back as +0.0; compress's own pruning writes +0.0).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import nn

from compress.errors import UsageError
from compress.manifest import (  # noqa: F401  (re-exported: the run directory's API)
    ARCH_FILE,
    MANIFEST_FILE,
    RESTORE_OR_SKIP,
    WEIGHTS_FILE,
    manifest_outputs,
    sha256_bytes,
    sha256_file,
    verify_files,
)

FORMAT = "compress-sparse-v1"
MASK_SUFFIX, VALUES_SUFFIX = "::bitmask", "::values"


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A contiguous CPU copy of the state dict (shared tensors de-duplicated by name)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def encode_sparse(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Replace each tensor whose bitmask + nonzeros is smaller than it by that pair; returns tensors, shapes."""
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, tensor in state.items():
        n = tensor.numel()
        if not tensor.is_floating_point():
            tensors[name] = tensor
            continue
        # -0.0 counts as zero and decodes as +0.0 (equal values): tools that prune by multiplying leave -0.0 in
        # half their pruned weights, and keeping those as values would double the file
        nonzero = tensor != 0
        nnz = int(nonzero.sum())
        encoded_bytes = (n + 7) // 8 + nnz * tensor.element_size()
        if encoded_bytes >= n * tensor.element_size():
            tensors[name] = tensor
            continue
        bits = np.packbits(nonzero.flatten().numpy())
        tensors[name + MASK_SUFFIX] = torch.from_numpy(bits)
        tensors[name + VALUES_SUFFIX] = tensor.flatten()[nonzero.flatten()].contiguous()
        shapes[name] = list(tensor.shape)
    return tensors, shapes


def decode_sparse(tensors: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Invert `encode_sparse`."""
    state = {k: v for k, v in tensors.items() if not k.endswith((MASK_SUFFIX, VALUES_SUFFIX))}
    for name, shape in shapes.items():
        values = tensors[name + VALUES_SUFFIX]
        n = int(np.prod(shape)) if shape else 1
        keep = torch.from_numpy(np.unpackbits(tensors[name + MASK_SUFFIX].numpy(), count=n).astype(bool))
        dense = torch.zeros(n, dtype=values.dtype)
        dense[keep] = values
        state[name] = dense.view(shape)
    return state


def sparse_bytes(model: nn.Module) -> bytes:
    """The safetensors file of `model` with the sparse encoding."""
    tensors, shapes = encode_sparse(_state(model))
    # one metadata key: safetensors keeps metadata in a hash map, so several keys come out in random order
    header = json.dumps({"format": FORMAT, "sparse_shapes": shapes}, sort_keys=True)
    return save_bytes(tensors, metadata={"compress": header})


def dense_bytes(model: nn.Module) -> bytes:
    """The plain safetensors file of `model`."""
    return save_bytes(_state(model))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load model.safetensors (either encoding) into a dense state dict."""
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + header_len]).get("__metadata__", {}) or {}
    shapes = json.loads(metadata.get("compress", "{}")).get("sparse_shapes", {})
    return decode_sparse(load_bytes(data), shapes)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temporary name beside `path`, then rename over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


def _written_by_compress(name: str) -> bool:
    """Whether a file name is one compress writes into a run (or its temporary name while writing it): a partial
    directory holding none of them is not an interrupted run of ours."""
    name = name.lstrip(".")
    return name.startswith(("model.", "report.", "finetune.ckpt")) or name.split(".tmp")[0] in (
        ARCH_FILE, MANIFEST_FILE, "recipe.resolved.yaml")


def _json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in a small file, or None when it is missing, large or not a JSON object."""
    try:
        if not path.is_file() or path.stat().st_size > 64 * 2**20:
            return None
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def is_run_directory(path: Path) -> bool:
    """Whether `path` is a directory compress wrote: a manifest.json of its format (model runs) or a report.json
    with its schema (measure and export runs)."""
    if not path.is_dir():
        return False
    manifest = _json_object(path / MANIFEST_FILE)
    if manifest is not None and str(manifest.get("format", "")).startswith("compress-") and "outputs" in manifest:
        return True
    report = _json_object(path / "report.json")
    return report is not None and "schema_version" in report and "status" in report


def _is_empty_directory(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


class RunDir:
    """An output directory built under `<out>.partial` and renamed into place when complete.

    The partial directory survives an interruption, so a rerun with the same `--out` resumes from what it holds
    (the fine-tuning checkpoint). An existing `out` is refused unless `force`, and even then unless it is a run
    compress wrote (`is_run_directory`) or an empty directory: nothing that is not a run is ever replaced.
    """

    def __init__(self, out: Path, *, force: bool = False, inputs: tuple[Path, ...] = (), writer: bool = True) -> None:
        self.out, self.writer, self.force = out.resolve(), writer, force  # under torchrun only rank 0 writes
        self.given = out
        for source in inputs:
            if source.exists() and source.resolve() == self.out:
                raise UsageError(f"--out {out} is the input model; choose a new directory (inputs are never "
                                 "overwritten)")
        self._check_out()
        self.partial = self.out.with_name(self.out.name + ".partial")
        if self.partial.exists() and not self.partial.is_dir():
            raise UsageError(f"{self.partial} is a file, and compress builds --out {out} there; move it away or "
                             "choose another --out")
        if self.partial.is_dir() and not _is_empty_directory(self.partial) \
                and not any(_written_by_compress(entry.name) for entry in self.partial.iterdir()):
            raise UsageError(f"{self.partial} exists and is not an interrupted compress run; compress builds --out "
                             f"{out} there: move it away or choose another --out")

    def _check_out(self) -> None:
        """Refuse an existing `out` that must not be replaced (exit 2, naming it)."""
        out = self.given
        if not (self.out.exists() or self.out.is_symlink()):
            return
        if not self.out.is_dir():
            raise UsageError(f"--out {out} is a file, not a run directory; choose another path (a file is never "
                             "replaced, even with --force)")
        if not (is_run_directory(self.out) or _is_empty_directory(self.out)):
            raise UsageError(f"--out {out} already exists and is not a compress run (no manifest.json or report.json "
                             "that compress wrote); choose another directory (--force replaces only a previous run "
                             "or an empty directory)")
        if not self.force:
            raise UsageError(f"--out {out} already exists; choose another directory or pass --force")

    def path(self, name: str) -> Path:
        """A path inside the partial directory (created on first use, so early errors leave nothing behind)."""
        if self.writer:
            self.partial.mkdir(parents=True, exist_ok=True)
        return self.partial / name

    def write(self, name: str, data: bytes | str) -> Path:
        if self.writer:
            write_atomic(self.path(name), data)
        return self.out / name

    def commit(self) -> Path:
        """Move the finished directory into place. An existing `out` (a run or an empty directory, checked again
        now, and only with --force) is first renamed to a hidden name of its own, then deleted: never `<out>.old`
        or any other name that might be the user's."""
        if not self.writer:
            return self.out
        if not (self.out.exists() or self.out.is_symlink()):
            os.replace(self.partial, self.out)
            return self.out
        self._check_out()
        aside = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.replaced-", dir=self.out.parent))
        os.replace(self.out, aside)  # onto the empty directory just made: the name is ours alone
        try:
            os.replace(self.partial, self.out)
        except OSError:
            os.replace(aside, self.out)
            raise
        shutil.rmtree(aside)
        return self.out


def save_model_files(run: RunDir, model: nn.Module, arch: dict[str, Any], manifest: dict[str, Any],
                     masks: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Write model.safetensors, arch.json and manifest.json; the manifest's `outputs` holds both files' digests."""
    weights, arch_text = sparse_bytes(model), to_json(arch)
    run.write(WEIGHTS_FILE, weights)
    run.write(ARCH_FILE, arch_text)
    manifest = dict(manifest, format=FORMAT, masked_params=sorted(masks or {}),
                    outputs={WEIGHTS_FILE: sha256_bytes(weights), ARCH_FILE: sha256_bytes(arch_text.encode())})
    run.write(MANIFEST_FILE, to_json(manifest))
    return manifest


def masks_from_manifest(model: nn.Module, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Masks for the parameters a run pruned: 1 where the stored weight is nonzero."""
    params = dict(model.named_parameters())
    return {name: (params[name].detach() != 0).to(params[name].dtype) for name in manifest.get("masked_params", [])
            if name in params}
