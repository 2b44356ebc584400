"""`compress verify RUN` and the manifest check of every command that loads a run, on real runs of the tiny CNN.

Each test that tampers works on its own copy of the shared `tiny_run` (shutil.copytree), never on the fixture.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from compress import api, artifact
from compress.cli import app
from compress.errors import BudgetError, UnsafeCheckpointError
from compress.models import load_model
from compress.report.schema import SCHEMA_VERSION, report_schema
from tests.test_cli import assert_one_line_error

HASHED = ("model.safetensors", "arch.json")  # what manifest.json's outputs cover (report.* come after it)
VALIDATOR = Draft202012Validator(report_schema())


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env={"NO_COLOR": "1", "CI": "1"})


def copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the shared run, free to tamper with."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def flip_byte(path: Path, at: int | None = None) -> None:
    """Flip the lowest bit of one byte (the middle one unless `at` is given)."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def tamper_arch(run: Path) -> None:
    """Change one byte of arch.json that keeps it valid JSON (its final newline becomes a space)."""
    data = bytearray((run / "arch.json").read_bytes())
    assert data[-1:] == b"\n"
    data[-1:] = b" "
    (run / "arch.json").write_bytes(bytes(data))


def test_manifest_hashes_the_weights_and_arch(tiny_run):
    outputs = json.loads((tiny_run / "manifest.json").read_text())["outputs"]
    assert set(outputs) == set(HASHED)
    for name in HASHED:
        assert outputs[name] == artifact.sha256_file(tiny_run / name)


def test_verify_passes_on_an_untouched_run(tiny_run, runner):
    before = {p.name: p.read_bytes() for p in tiny_run.iterdir()}
    result = runner.invoke(app, ["verify", str(tiny_run), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(VALIDATOR.iter_errors(report)) == []
    assert report["schema_version"] == SCHEMA_VERSION and report["status"] == "ok" and report["exit_code"] == 0
    assert [f["name"] for f in report["files"]] == sorted(HASHED) and all(f["ok"] for f in report["files"])
    assert report["unhashed"] == ["recipe.resolved.yaml", "report.html", "report.json", "report.md"]
    assert report["data"]["name"] == "digits" and report["data"]["ok"]
    recorded = json.loads((tiny_run / "report.json").read_text())["tasks"]["classification"]
    [metric] = report["metrics"]
    assert metric["stage"] == "after_compression" and metric["recorded"] == recorded["after_compression"]
    assert abs(metric["measured"] - metric["recorded"]) <= metric["tolerance"] == 0.01
    assert {p.name: p.read_bytes() for p in tiny_run.iterdir()} == before  # verify writes nothing


def test_verify_prints_a_table(tiny_run, runner):
    result = runner.invoke(app, ["verify", str(tiny_run)])
    assert result.exit_code == 0, result.output
    for text in ("model.safetensors", "arch.json", "classification", "accuracy", "after_compression", "status: ok"):
        assert text in result.stdout, result.stdout


@pytest.mark.parametrize("name", HASHED)
def test_one_flipped_byte_in_a_hashed_file_exits_5_naming_it(tiny_run, tmp_path, runner, name):
    run = copy_run(tiny_run, tmp_path)
    flip_byte(run / name)
    line = assert_one_line_error(runner.invoke(app, ["verify", str(run)]), 5)
    assert f"{run / name} does not match its sha256 in manifest.json" in line and "restore the run" in line
    assert "--no-verify" not in line  # verify has no escape: checking is what it is for
    assert_one_line_error(runner.invoke(app, ["verify", str(run), "--json"]), 5)
    with pytest.raises(UnsafeCheckpointError, match=f"{name} does not match.*pass --no-verify"):
        load_model(str(run))


def test_a_changed_metric_exits_3_naming_it(tiny_run, tmp_path, runner):
    run = copy_run(tiny_run, tmp_path)
    report = json.loads((run / "report.json").read_text())
    recorded = report["tasks"]["classification"]["after_compression"]
    report["tasks"]["classification"]["after_compression"] = round(recorded + 1.5, 4)
    (run / "report.json").write_text(json.dumps(report))
    result = runner.invoke(app, ["verify", str(run), "--json"])
    assert result.exit_code == 3, result.output
    printed = json.loads(result.stdout)
    assert list(VALIDATOR.iter_errors(printed)) == []
    assert printed["status"] == "verify_failed" and printed["exit_code"] == 3
    assert [m["ok"] for m in printed["metrics"]] == [False]
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: classification accuracy (after_compression) does not reproduce: ")
    assert f"recorded {recorded + 1.5:.4f}, measured {recorded:.4f} (tolerance 0.01)" in line, line
    with pytest.raises(BudgetError, match="classification accuracy"):
        api.verify(run)


def test_a_difference_within_the_tolerance_passes(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    report = json.loads((run / "report.json").read_text())
    report["tasks"]["classification"]["after_compression"] += 0.005
    (run / "report.json").write_text(json.dumps(report))
    assert api.verify(run)["status"] == "ok"


def test_a_plain_directory_is_not_a_run(tmp_path, runner):
    assert_one_line_error(runner.invoke(app, ["verify", str(tmp_path)]), 2)


def test_a_run_without_its_manifest_is_refused(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    (run / "manifest.json").unlink()
    with pytest.raises(UnsafeCheckpointError, match="has no manifest.json.*--no-verify"):
        load_model(str(run))
    assert load_model(str(run), verify=False).model is not None


SMALL_MEASURE = ["--backend", "pytorch-cpu", "--batch", "1", "--runs", "2", "--warmup", "1"]
LOADERS = {  # every command that loads a run: its arguments after the run directory
    "measure": ["measure", "{run}", *SMALL_MEASURE],
    "export": ["export", "{run}", "--format", "onnx"],
    "finetune": ["finetune", "{run}", "--epochs", "1"],
    "prune": ["prune", "--model", "{run}", "--sparsity", "0.95", "--no-latency"],
}


@pytest.mark.parametrize("command", sorted(LOADERS))
def test_a_tampered_run_is_refused_unless_no_verify(tiny_run, tmp_path, runner, command):
    run = copy_run(tiny_run, tmp_path)
    tamper_arch(run)
    args = [arg.format(run=run) for arg in LOADERS[command]]
    refused = runner.invoke(app, [*args, "--out", str(tmp_path / "refused")])
    line = assert_one_line_error(refused, 5)
    assert f"{run / 'arch.json'} does not match its sha256" in line and "--no-verify" in line
    assert not (tmp_path / "refused").exists() and not (tmp_path / "refused.partial").exists()
    allowed = runner.invoke(app, [*args, "--no-verify", "--out", str(tmp_path / "allowed"), "--quiet"])
    assert allowed.exit_code == 0, allowed.output
    assert (tmp_path / "allowed" / "report.json").is_file()


def test_a_run_made_from_a_tampered_run_is_measured_against_it_only_unchecked(tiny_run, tmp_path, runner):
    run = copy_run(tiny_run, tmp_path)
    finetuned = tmp_path / "finetuned"
    assert runner.invoke(app, ["finetune", str(run), "--epochs", "1", "--out", str(finetuned), "--quiet"]).exit_code == 0
    assert api.verify(finetuned)["metrics"][0]["stage"] == "after_finetune"
    tamper_arch(run)  # the origin that `measure FINETUNED` compares with
    measure = ["measure", str(finetuned), *SMALL_MEASURE]
    assert_one_line_error(runner.invoke(app, [*measure, "--out", str(tmp_path / "m1")]), 5)
    allowed = runner.invoke(app, [*measure, "--no-verify", "--out", str(tmp_path / "m2"), "--quiet"])
    assert allowed.exit_code == 0, allowed.output
