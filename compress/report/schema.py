"""The versioned layout of report.json: its version, the builders every writer starts from, and validation.

`report.schema.json` (shipped beside this module) is the layout as JSON Schema (draft 2020-12): the stable keys of
DESIGN.md §4 and the variants each command writes (prune with any method, finetune, train, measure, export, the
`--dry-run` listing, the `--json` error object). Keys may be added freely; bump `SCHEMA_VERSION` (and the schema's
`schema_version` const) when a key changes meaning. `validate` checks a report against the schema with the small
validator below, which implements exactly the keywords the schema uses (`SUPPORTED_KEYWORDS`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from importlib import resources
from typing import Any

SCHEMA_VERSION = 1
SCHEMA_FILE = "report.schema.json"
SUPPORTED_KEYWORDS = frozenset({"type", "required", "properties", "additionalProperties", "items", "enum", "const",
                                "$ref", "allOf", "not", "if", "then", "else"})
ANNOTATIONS = frozenset({"$schema", "$id", "$defs", "$comment", "title", "description"})
_TYPES: dict[str, type | tuple[type, ...]] = {"object": dict, "array": list, "string": str, "boolean": bool,
                                              "null": type(None), "integer": int, "number": (int, float)}


class ReportSchemaError(ValueError):
    """A report that does not follow report.schema.json; `problems` lists every mismatch."""

    def __init__(self, problems: list[str]) -> None:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"report does not follow {SCHEMA_FILE}: {problems[0]}{more}")
        self.problems = problems


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


def schema_problems(report: Any, schema: dict[str, Any] | None = None) -> list[str]:
    """Every way `report` breaks the schema (empty when it follows it)."""
    root = schema if schema is not None else report_schema()
    return list(dict.fromkeys(_check(report, root, "report", root)))  # each once, in order


def validate(report: Any, schema: dict[str, Any] | None = None) -> None:
    """Raise `ReportSchemaError` naming each mismatch when `report` does not follow the schema."""
    problems = schema_problems(report, schema)
    if problems:
        raise ReportSchemaError(problems)


def _is(value: Any, name: str) -> bool:
    """Whether `value` is of JSON type `name` (booleans are not numbers; 2.0 is an integer)."""
    if isinstance(value, bool) and name in ("integer", "number"):
        return False
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES[name])


def _same(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def _resolve(root: dict[str, Any], ref: str) -> Any:
    """A local reference such as `#/$defs/layer`."""
    if not ref.startswith("#/"):
        raise ValueError(f"only local references (#/...) are supported, not {ref!r}")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _check(value: Any, schema: Any, path: str, root: dict[str, Any]) -> Iterator[str]:
    """The problems of `value` at `path` against `schema` (a boolean or a schema object)."""
    if isinstance(schema, bool):
        if not schema:
            yield f"{path}: not allowed here"
        return
    if "$ref" in schema:
        yield from _check(value, _resolve(root, schema["$ref"]), path, root)
    if "type" in schema:
        names = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
        if not any(_is(value, n) for n in names):
            yield f"{path}: {json.dumps(value, default=str)[:60]} is not of type {' or '.join(names)}"
            return
    if "const" in schema and not _same(value, schema["const"]):
        yield f"{path}: {json.dumps(value, default=str)[:60]} is not {json.dumps(schema['const'])}"
    if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
        yield f"{path}: {json.dumps(value, default=str)[:60]} is not one of {json.dumps(schema['enum'])}"
    if isinstance(value, dict):
        yield from _check_object(value, schema, path, root)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from _check(item, schema["items"], f"{path}[{i}]", root)
    yield from _check_combined(value, schema, path, root)


def _check_object(value: dict[str, Any], schema: dict[str, Any], path: str, root: dict[str, Any]) -> Iterator[str]:
    """required, properties and additionalProperties of one object."""
    for key in schema.get("required", []):
        if key not in value:
            yield f"{path}: missing required key {key!r}"
    properties, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
    for key, item in value.items():
        yield from _check(item, properties.get(key, extra), f"{path}.{key}", root)


def _check_combined(value: Any, schema: dict[str, Any], path: str, root: dict[str, Any]) -> Iterator[str]:
    """allOf, not and if/then/else."""
    for sub in schema.get("allOf", []):
        yield from _check(value, sub, path, root)
    if "not" in schema and not any(_check(value, schema["not"], path, root)):
        yield f"{path}: must not match {json.dumps(schema['not'])}"
    if "if" in schema:
        branch = "else" if any(_check(value, schema["if"], path, root)) else "then"
        if branch in schema:
            yield from _check(value, schema[branch], path, root)


def unsupported_keywords(schema: Any, where: str = "#") -> list[str]:
    """Keywords in `schema` this validator does not implement (so a schema cannot silently ask for more)."""
    if not isinstance(schema, dict):
        return []
    found = [f"{where}/{k}" for k in schema if k not in SUPPORTED_KEYWORDS | ANNOTATIONS]
    for key in ("items", "additionalProperties", "not", "if", "then", "else"):
        found += unsupported_keywords(schema.get(key), f"{where}/{key}")
    for key in ("properties", "$defs"):
        for name, sub in schema.get(key, {}).items():
            found += unsupported_keywords(sub, f"{where}/{key}/{name}")
    for i, sub in enumerate(schema.get("allOf", [])):
        found += unsupported_keywords(sub, f"{where}/allOf/{i}")
    return found
