"""Domain errors, each carrying the exit code the CLI documents."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_CODES: dict[int, str] = {
    0: "ok",
    1: "unexpected failure",
    2: "bad usage, config or recipe",
    3: "budget or regression exceeded",
    4: "export verification failed",
    5: "unsafe checkpoint refused",
    6: "compression audit failed (target or floor missed)",
}


class CompressError(Exception):
    """Base class: a one-line message that names the problem and the fix; `report` when a run was written."""

    exit_code = 1

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report


class UsageError(CompressError):
    """Bad option, config, recipe or model spec (exit 2)."""

    exit_code = 2

    @classmethod
    def unknown(cls, kind: str, name: str, valid: Iterable[str], *, choices: str | None = None) -> UsageError:
        """`unknown data set 'fashion-minst'; did you mean fashion-mnist? ...` (see `unknown_name`)."""
        return cls(unknown_name(kind, name, valid, choices=choices))


class TrainingDiverged(CompressError):
    """The loss or the weights stopped being numbers (NaN or Inf) during training or fine-tuning (exit 1: no
    documented code fits a run that failed at run time, but the message says what happened and what was kept)."""

    exit_code = 1


class BudgetError(CompressError):
    """A budget or regression gate was exceeded, or a run's recorded metrics did not reproduce (exit 3)."""

    exit_code = 3


class ExportError(CompressError):
    """An exported model did not match the PyTorch model (exit 4)."""

    exit_code = 4


class UnsafeCheckpointError(CompressError):
    """Unsafe input refused (exit 5): a checkpoint needs unpickling code and --trust-pickle was not given, or a run
    directory's files do not match the sha256 its manifest.json records."""

    exit_code = 5


class AuditError(CompressError):
    """The compression missed its target or a floor (exit 6); the run was written and `report` describes it."""

    exit_code = 6


def closest_match(name: str, valid: Iterable[str], cutoff: float = 0.7) -> str | None:
    """The valid name closest to `name` (difflib's ratio, ignoring case), or None when none reaches `cutoff` (0.7:
    a typo or two in a word, not any name that shares a few letters, e.g. magic and pagcp at 0.6)."""
    by_lower: dict[str, str] = {}
    for candidate in sorted(set(valid)):
        by_lower.setdefault(candidate.lower(), candidate)
    match = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=cutoff)
    return by_lower[match[0]] if match else None


def closest(name: str, valid: Iterable[str]) -> str:
    """`; did you mean X?` for the closest valid name, or the valid names when none is close."""
    names = sorted(set(valid))
    match = closest_match(name, names, cutoff=0.4)
    if match:
        return f"; did you mean {match}?"
    return f"; valid: {', '.join(names) or 'none'}"


def unknown_name(kind: str, name: str, valid: Iterable[str], *, choices: str | None = None) -> str:
    """One line for a name that is not one of `valid`: `unknown data set 'fashion-minst'; did you mean
    fashion-mnist? (choose one of ...)`, or without a close name `unknown data set 'x'; choose one of ...`.

    `choices` replaces the listing of `valid` (for long lists, or to add forms such as folder:PATH)."""
    valid = list(valid)
    listing = choices if choices is not None else ", ".join(valid)
    match = closest_match(name, valid)
    if match is None:
        return f"unknown {kind} {name!r}; choose one of {listing}"
    return f"unknown {kind} {name!r}; did you mean {match}? (choose one of {listing})"
