"""report.json has one versioned layout: the real output of every command follows the shipped JSON Schema, and
`jsonschema` (a dev dependency) rejects what breaks it (so the check can fail)."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, ValidationError
from typer.testing import CliRunner

from compress import api
from compress.cli import app
from compress.report import schema
from compress.report.schema import SCHEMA_VERSION, report_schema
from tests.conftest import TINY_SPEC

ROOT = Path(__file__).resolve().parents[1]
Output = tuple[dict[str, Any], Path | None]  # what --json printed, and the report.json written (None: no run)
VALIDATOR = Draft202012Validator(report_schema())


def where(error: ValidationError) -> str:
    """The failing value's place in the report, e.g. `report.layers[0].params_after`."""
    return "report" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)


def problems(report: Any) -> list[str]:
    """Every way `report` breaks the shipped schema, e.g. `report.model.after: 'macs' is a required property`."""
    return list(dict.fromkeys(f"{where(e)}: {e.message}" for e in VALIDATOR.iter_errors(report)))


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
    assert problems(printed) == []
    assert printed["schema_version"] == SCHEMA_VERSION
    if name in ("dry_run", "error"):
        assert written is None  # neither claims its --out directory
    else:
        report = json.loads(written.read_text())
        assert problems(report) == []
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
    found = problems(broken)
    assert "report: 'seed' is a required property" in found, found
    assert "report.model.after: 'macs' is a required property" in found, found


def test_a_wrong_type_is_rejected(prune_report):
    broken = copy.deepcopy(prune_report)
    broken["model"]["after"]["macs"] = "lots"
    broken["audit"]["ok"] = 1  # a number is not a boolean
    broken["layers"][0]["params_after"] = True  # nor is a boolean a count
    found = problems(broken)
    assert "report.model.after.macs: 'lots' is not of type 'integer'" in found, found
    assert "report.audit.ok: 1 is not of type 'boolean'" in found, found
    assert any(p.startswith("report.layers[0].params_after: True ") for p in found), found


def test_each_variant_has_its_own_required_keys(outputs, prune_report):
    measured = copy.deepcopy(outputs["measure"][0])
    del measured["latency"]
    assert "report: 'latency' is a required property" in problems(measured)
    listing = copy.deepcopy(outputs["dry_run"][0])
    del listing["units"]
    assert "report: 'units' is a required property" in problems(listing)
    audit = copy.deepcopy(prune_report)
    del audit["audit"]["figures"]
    assert "report.audit: 'figures' is a required property" in problems(audit)
    old_error = {"status": "error", "exit_code": 2, "error": "x"}  # before the error object carried its version
    assert "report: 'schema_version' is a required property" in problems(old_error)


def test_status_and_exit_code_agree(prune_report):
    failed = dict(prune_report, status="audit_failed")  # still exit 0
    assert any(p.startswith("report.exit_code: ") for p in problems(failed)), problems(failed)
    assert problems(dict(prune_report, status="audit_failed", exit_code=6)) == []
    assert problems(dict(prune_report, status="finished")) != []


def test_keys_may_be_added_freely(prune_report):
    added = copy.deepcopy(prune_report)
    added["new_section"] = {"anything": [1, 2]}
    added["model"]["after"]["bytes_per_param"] = 0.5
    added["layers"][0]["importance"] = None
    assert problems(added) == []


def test_schema_is_valid_versioned_and_shipped():
    loaded = report_schema()
    Draft202012Validator.check_schema(loaded)
    assert loaded["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert loaded["properties"]["schema_version"]["const"] == SCHEMA_VERSION == api.SCHEMA_VERSION
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert schema.SCHEMA_FILE in package_data["compress.report"]
    assert (Path(schema.__file__).parent / schema.SCHEMA_FILE).is_file()
    for key in ("schema_version", "status", "exit_code", "command", "method", "config", "seed", "env", "model",
                "sparsity", "keep", "layers", "tasks", "latency", "export", "audit"):  # DESIGN.md §4
        assert key in loaded["properties"] or key in loaded["$defs"]["run"]["properties"], key
