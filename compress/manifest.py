"""manifest.json: the sha256 of each file a run directory's manifest covers, and the check of those files.

Kept free of torch so that `compress check`, which reads reports, can refuse a tampered run without loading a model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from compress.errors import UnsafeCheckpointError

WEIGHTS_FILE, ARCH_FILE, MANIFEST_FILE = "model.safetensors", "arch.json", "manifest.json"


def sha256_bytes(data: bytes) -> str:
    """`sha256:<hex>` of some bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Digest of a file or, for a directory, of its files in name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.read_bytes())
    return "sha256:" + digest.hexdigest()



RESTORE_OR_SKIP = "restore the run or pass --no-verify to load it unchecked"  # the fix a loading command offers


def manifest_outputs(directory: Path, fix: str = RESTORE_OR_SKIP) -> dict[str, str]:
    """The files manifest.json covers and their digests; exit 5 when it is missing, unreadable or lists none."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise UnsafeCheckpointError(f"{directory} has no {MANIFEST_FILE}, so its files cannot be checked; {fix}")
    try:
        outputs = json.loads(path.read_text()).get("outputs")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        outputs = None
    if not isinstance(outputs, dict) or not outputs or not all(isinstance(v, str) for v in outputs.values()):
        raise UnsafeCheckpointError(f"{path} is unreadable or lists no file digests (outputs), so the run cannot "
                                    f"be checked; {fix}")
    return outputs


def verify_files(directory: Path, fix: str = RESTORE_OR_SKIP) -> dict[str, str]:
    """Check every file manifest.json covers against its sha256; exit 5 naming the first that differs (the message
    ends with `fix`); returns the files and digests checked."""
    directory = Path(directory)
    outputs = manifest_outputs(directory, fix)
    for name, digest in outputs.items():
        path = directory / name
        if not path.resolve().is_relative_to(directory.resolve()) or not path.is_file():
            raise UnsafeCheckpointError(f"{path} is listed in {MANIFEST_FILE} but is not a file of the run; {fix}")
        if sha256_file(path) != digest:
            raise UnsafeCheckpointError(f"{path} does not match its sha256 in {MANIFEST_FILE} (changed since the "
                                        f"run was written); {fix}")
    return outputs
