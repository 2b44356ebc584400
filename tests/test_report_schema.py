"""report.json has one versioned layout: the real output of every command follows the shipped JSON Schema, and the
validator rejects what breaks it (so the check can fail)."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from compress import api
from compress.cli import app
from compress.report import schema
from compress.report.schema import (SCHEMA_VERSION, ReportSchemaError, report_schema, schema_problems,
                                    unsupported_keywords, validate)
from tests.conftest import TINY_SPEC

ROOT = Path(__file__).resolve().parents[1]
Output = tuple[dict[str, Any], Path | None]  # what --json printed, and the report.json written (None: no run)


def invoke(runner: CliRunner, args: list[str], code: int = 0) -> dict[str, Any]:
    """Run the CLI with --json; the one JSON document it printed on stdout."""
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Output]:
    """Each command's --json output on the tiny CNN (and the tiny multitask net for the dry run), with its run."""
    runner, root = CliRunner(env={"NO_COLOR": "1", "CI": "1"}), tmp_path_factory.mktemp("schema")
    small = ["--model", TINY_SPEC, "--data", "digits"]
    commands: dict[str, tuple[list[str], int]] = {
        "prune": (["prune", *small, "--method", "globalmp", "--sparsity", "0.5", "--no-latency"], 0),
        "finetune": (["finetune", str(root / "prune"), "--epochs", "1"], 0),
        "train": (["train", *small, "--epochs", "1", "--warmup-steps", "0"], 0),
        "measure": (["measure", str(root / "prune"), "--backend", "pytorch-cpu", "--batch", "1", "--runs", "2",
                     "--warmup", "1"], 0),
        "export": (["export", TINY_SPEC, "--data", "digits", "--format", "onnx"], 0),
        "dry_run": (["prune", "--method", "pagcp", "--model", "tests.test_pagcp:tiny_mtnet", "--data", "digits-canvas",
                     "--dry-run"], 0),
        "error": (["prune", *small, "--sparsity", "1.5"], 2),
    }
    found: dict[str, Output] = {}
    for name, (args, code) in commands.items():  # in order: finetune and measure read the prune run
        out = root / name
        printed = invoke(runner, [*args, "--out", str(out)], code)
        found[name] = (printed, out / "report.json" if (out / "report.json").is_file() else None)
    return found


@pytest.fixture(scope="module")
def prune_report(outputs: dict[str, Output]) -> dict[str, Any]:
    """A real, valid prune report (shared: tests copy it before breaking it)."""
    return outputs["prune"][0]


@pytest.mark.parametrize("name", ["prune", "finetune", "train", "measure", "export", "dry_run", "error"])
def test_every_command_writes_a_valid_report(outputs, name):
    printed, written = outputs[name]
    assert schema_problems(printed) == []
    validate(printed)
    assert printed["schema_version"] == SCHEMA_VERSION
    if name in ("dry_run", "error"):
        assert written is None  # neither claims its --out directory
    else:
        report = json.loads(written.read_text())
        assert schema_problems(report) == []
        assert report["method"] == (name if name in ("finetune", "train", "measure", "export") else "globalmp")


def test_variants_are_what_each_command_writes(outputs):
    assert outputs["dry_run"][0]["dry_run"] is True and outputs["dry_run"][0]["units"]
    assert outputs["error"][0] == {"schema_version": SCHEMA_VERSION, "status": "error", "exit_code": 2,
                                   "error": outputs["error"][0]["error"]}
    assert "sparsity" in outputs["error"][0]["error"]
    assert outputs["measure"][0]["latency"][0]["backend"] == "pytorch-cpu"
    assert outputs["export"][0]["export"]["onnx"]["ok"]


def test_a_missing_required_key_is_rejected(prune_report):
    broken = copy.deepcopy(prune_report)
    del broken["seed"]
    del broken["model"]["after"]["macs"]
    problems = schema_problems(broken)
    assert "report: missing required key 'seed'" in problems
    assert "report.model.after: missing required key 'macs'" in problems
    with pytest.raises(ReportSchemaError, match="does not follow report.schema.json") as caught:
        validate(broken)
    assert caught.value.problems == problems


def test_a_wrong_type_is_rejected(prune_report):
    broken = copy.deepcopy(prune_report)
    broken["model"]["after"]["macs"] = "lots"
    broken["audit"]["ok"] = 1  # a number is not a boolean
    broken["layers"][0]["params_after"] = True  # nor is a boolean a count
    problems = schema_problems(broken)
    assert any(p.startswith("report.model.after.macs: ") and "integer" in p for p in problems), problems
    assert any(p.startswith("report.audit.ok: ") and "boolean" in p for p in problems), problems
    assert any(p.startswith("report.layers[0].params_after: ") for p in problems), problems
    with pytest.raises(ReportSchemaError):
        validate(broken)


def test_each_variant_has_its_own_required_keys(outputs, prune_report):
    measured = copy.deepcopy(outputs["measure"][0])
    del measured["latency"]
    assert "report: missing required key 'latency'" in schema_problems(measured)
    listing = copy.deepcopy(outputs["dry_run"][0])
    del listing["units"]
    assert "report: missing required key 'units'" in schema_problems(listing)
    audit = copy.deepcopy(prune_report)
    del audit["audit"]["figures"]
    assert "report.audit: missing required key 'figures'" in schema_problems(audit)
    old_error = {"status": "error", "exit_code": 2, "error": "x"}  # before the error object carried its version
    assert "report: missing required key 'schema_version'" in schema_problems(old_error)


def test_status_and_exit_code_agree(prune_report):
    failed = dict(prune_report, status="audit_failed")  # still exit 0
    assert any("report.exit_code" in p for p in schema_problems(failed))
    assert schema_problems(dict(prune_report, status="audit_failed", exit_code=6)) == []
    assert schema_problems(dict(prune_report, status="finished")) != []


def test_keys_may_be_added_freely(prune_report):
    added = copy.deepcopy(prune_report)
    added["new_section"] = {"anything": [1, 2]}
    added["model"]["after"]["bytes_per_param"] = 0.5
    added["layers"][0]["importance"] = None
    assert schema_problems(added) == []


def test_schema_is_versioned_shipped_and_within_the_validator():
    loaded = report_schema()
    assert loaded["properties"]["schema_version"]["const"] == SCHEMA_VERSION == api.SCHEMA_VERSION
    assert unsupported_keywords(loaded) == []
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert schema.SCHEMA_FILE in package_data["compress.report"]
    assert (Path(schema.__file__).parent / schema.SCHEMA_FILE).is_file()
    for key in ("schema_version", "status", "exit_code", "command", "method", "config", "seed", "env", "model",
                "sparsity", "keep", "layers", "tasks", "latency", "export", "audit"):  # DESIGN.md §4
        assert key in loaded["properties"] or key in loaded["$defs"]["run"]["properties"], key


def test_validator_follows_json_schema_semantics():
    check = lambda value, sub: schema_problems(value, sub)  # noqa: E731
    assert check(2.0, {"type": "integer"}) == [] and check(True, {"type": "integer"}) != []
    assert check(1, {"const": True}) != [] and check(None, {"type": ["number", "null"]}) == []
    assert check({"a": 1}, {"properties": {"b": {"type": "string"}}}) == []  # properties bind only when present
    assert check({"a": 1}, {"additionalProperties": False}) == ["report.a: not allowed here"]
    branch = {"if": {"properties": {"k": {"const": 1}}}, "then": {"required": ["x"]}, "else": {"required": ["y"]}}
    assert check({"k": 1}, branch) == ["report: missing required key 'x'"]
    assert check({"k": 2}, branch) == ["report: missing required key 'y'"]
    assert check("a", {"not": {"enum": ["a", "b"]}}) != [] and check("c", {"not": {"enum": ["a", "b"]}}) == []


def test_the_standard_validator_agrees(outputs, prune_report):
    """Where the `jsonschema` package is installed, it reads the shipped file the same way (not a dependency)."""
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(report_schema())
    jsonschema.Draft202012Validator.check_schema(report_schema())
    for printed, _ in outputs.values():
        assert list(validator.iter_errors(printed)) == []
    assert list(validator.iter_errors({k: v for k, v in prune_report.items() if k != "seed"}))
