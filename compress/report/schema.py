"""The versioned layout of report.json: its version, the builders every writer starts from, and its JSON Schema.

`report.schema.json` (shipped beside this module) is the layout as JSON Schema (draft 2020-12): the stable keys of
DESIGN.md §4 and the variants each command writes (prune with any method, finetune, train, measure, export, the
`--dry-run` listing, the `verify` report, the `check` result, the `--json` error object). Keys may be added freely; bump `SCHEMA_VERSION` (and the schema's
`schema_version` const) when a key changes meaning. Nothing here validates at run time: the tests check every
command's real report against `report_schema()` with the `jsonschema` package (a dev dependency).
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

SCHEMA_VERSION = 1
SCHEMA_FILE = "report.schema.json"


def new_report(*, command: str, method: str, config: dict[str, Any], seed: int, env: dict[str, Any],
               model: dict[str, Any], out: str) -> dict[str, Any]:
    """The keys every run's report.json starts with, in the order it shows them."""
    return {"schema_version": SCHEMA_VERSION, "command": command, "method": method, "config": config, "seed": seed,
            "env": env, "model": model, "out": out}


def dry_run_report(*, command: str, method: str, config: dict[str, Any], model: dict[str, Any],
                   listing: dict[str, Any]) -> dict[str, Any]:
    """The `--dry-run` report: the header, then `listing` (data, tasks, what the method would work on)."""
    return {"schema_version": SCHEMA_VERSION, "status": "ok", "exit_code": 0, "command": command, "method": method,
            "dry_run": True, "config": config, "model": model, **listing}


def error_report(message: str, exit_code: int) -> dict[str, Any]:
    """The JSON object `--json` prints when a command fails before it writes a run."""
    return {"schema_version": SCHEMA_VERSION, "status": "error", "exit_code": exit_code, "error": message}


@functools.cache
def _schema_text() -> str:
    """The shipped schema file's text (read once)."""
    return resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8")


def report_schema() -> dict[str, Any]:
    """The JSON Schema of report.json (a fresh copy; callers may change it)."""
    return json.loads(_schema_text())
