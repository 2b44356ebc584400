"""Domain errors, each carrying the exit code the CLI documents."""

from __future__ import annotations

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
