"""`compress measure`, `compress export`, `compress report` and `prune --export --measure`, through the real CLI.

Real ONNX Runtime sessions on the tiny CNN and the digits data; the runs are small but every backend is real.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from compress.cli import app
from compress.measure.backends import available_backends
from tests.conftest import TINY_SPEC
from tests.test_cli import assert_one_line_error

FAST_LATENCY = ["--runs", "3", "--warmup", "1"]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env={"NO_COLOR": "1", "CI": "1"})


@pytest.fixture(scope="module")
def trained_tiny(runner, tmp_path_factory) -> str:
    """The tiny CNN trained on digits to about 84% (an untrained net's near-equal logits make int8 flip classes)."""
    out = tmp_path_factory.mktemp("trained") / "tiny"
    result = runner.invoke(app, ["train", "--model", TINY_SPEC, "--data", "digits", "--epochs", "30", "--lr", "0.1",
                                 "--warmup-steps", "0", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return str(out)


@pytest.fixture(scope="module")
def shipped_run(runner, trained_tiny, tmp_path_factory) -> dict:
    """One `prune --export ort --int8 --measure` run of the trained tiny CNN at 50% sparsity, with its report."""
    out = tmp_path_factory.mktemp("ship") / "run"
    result = runner.invoke(app, ["prune", "--model", trained_tiny, "--data", "digits", "--sparsity", "0.5",
                                 "--finetune-epochs", "1", "--export", "ort", "--int8", "--measure",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return {"out": out, "report": json.loads(result.stdout)}


@pytest.mark.slow
def test_one_command_prunes_finetunes_exports_and_measures(shipped_run):
    out, report = shipped_run["out"], shipped_run["report"]
    for name in ("model.safetensors", "model.onnx", "model.ort", "model.required_operators.config",
                 "model.int8.onnx", "report.json", "report.md", "report.html"):
        assert (out / name).is_file(), name
    assert report["status"] == "ok" and report["finetune"]["epochs"] == 1
    assert {row["backend"] for row in report["latency"]} == set(available_backends())
    assert {row["batch"] for row in report["latency"]} == {1, 32}
    assert all(row["proxy"] == (row["backend"] == "mobile-proxy") for row in report["latency"])
    for fmt in ("onnx", "ort", "onnx_int8"):
        entry = report["export"][fmt]
        assert entry["ok"] and entry["bytes"] == (out / entry["path"]).stat().st_size
    assert report["export"]["onnx"]["parity"]["cosine"] > 0.9999
    assert report["export"]["onnx_int8"]["parity"]["top1_agreement"] >= 0.98
    for side in ("before", "after"):
        assert set(report["model"][side]["bytes"]) >= {"safetensors_dense", "safetensors_sparse", "onnx", "ort",
                                                       "onnx_int8", "ort_int8"}
    # pruned weights are zeros in every dense format: only the sparse encoding shrinks
    before, after = report["model"]["before"]["bytes"], report["model"]["after"]["bytes"]
    assert after["safetensors_sparse"] < before["safetensors_sparse"]
    assert abs(after["onnx"] - before["onnx"]) < 0.02 * before["onnx"]
    markdown = (out / "report.md").read_text()
    assert "mobile-proxy (proxy)" in markdown and "## Export" in markdown


@pytest.mark.slow
def test_measure_compares_a_run_with_its_origin(runner, shipped_run, trained_tiny, tmp_path):
    out = tmp_path / "measured"
    result = runner.invoke(app, ["measure", str(shipped_run["out"]), "--backend", "pytorch-cpu", "--backend",
                                 "onnxruntime-cpu", "--batch", "1", *FAST_LATENCY, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"]["baseline_source"] == trained_tiny  # read from the run's manifest
    assert [(r["backend"], r["batch"]) for r in report["latency"]] == [("pytorch-cpu", 1), ("onnxruntime-cpu", 1)]
    assert all(r["speedup"] > 0 and r["runs"] == 3 for r in report["latency"])
    assert report["model"]["after"]["macs_cross_check"]["agrees"]
    assert report["model"]["after"]["params_nonzero"] < report["model"]["before"]["params_nonzero"]
    assert (out / "report.html").is_file()


@pytest.mark.slow
def test_measure_without_a_baseline_reports_times_but_no_ratio(runner, tmp_path):
    result = runner.invoke(app, ["measure", TINY_SPEC, "--data", "digits", "--backend", "pytorch-cpu", "--batch", "2",
                                 *FAST_LATENCY, "--out", str(tmp_path / "m"), "--json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)["latency"]
    assert row["p50_ms"] > 0 and row["speedup"] is None and row["baseline_p50_ms"] is None


@pytest.mark.slow
def test_export_verifies_and_writes_the_ort_model(runner, tmp_path):
    out = tmp_path / "exported"
    result = runner.invoke(app, ["export", TINY_SPEC, "--data", "digits", "--format", "ort", "--static-shapes",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["export"]["onnx"]["ok"] and report["export"]["ort"]["ok"]
    assert report["config"]["static_shapes"] is True
    nnapi = report["export"]["onnx"]["mobile_usability"]["nnapi"]
    assert 0 <= nnapi["supported_nodes"] <= nnapi["total_nodes"]
    assert "Conv" in (out / report["export"]["ort"]["required_operators"]).read_text()


@pytest.mark.slow
def test_export_mismatch_exits_4_and_says_by_how_much(runner, tmp_path):
    out = tmp_path / "bad"
    result = runner.invoke(app, ["export", "tests.factories:export_mismatch_cnn", "--data", "digits",
                                 "--out", str(out), "--quiet"])
    assert result.exit_code == 4, result.output
    assert "Traceback" not in result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: export verification failed: model.onnx differs") and "max abs error" in line
    report = json.loads((out / "report.json").read_text())  # the run is written, and says what failed
    assert report["status"] == "export_failed" and report["exit_code"] == 4
    assert not report["export"]["onnx"]["ok"]


def test_report_rerenders_from_report_json(runner, tiny_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    (run / "report.html").unlink()
    (run / "report.md").write_text("stale")
    result = runner.invoke(app, ["report", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (run / "report.html").read_text().startswith("<!doctype html>")
    assert (run / "report.md").read_text().startswith("# compress report: globalmp")


@pytest.mark.parametrize(("args", "needle"), [
    (["report", "{tmp}"], "has no report.json"),
    (["measure", TINY_SPEC, "--data", "digits", "--backend", "tpu"], "unknown latency backend 'tpu'"),
    (["measure", TINY_SPEC, "--data", "digits", "--batch", "0"], "must be >= 1"),
    (["measure", TINY_SPEC, "--data", "digits", "--input-shape", "3x224"], "--input-shape"),
    (["measure", TINY_SPEC, "--data", "digits", "--input-shape", "3,32,32"], "takes 1 channel(s)"),
    (["export", TINY_SPEC, "--data", "digits", "--format", "tflite"], "--format 'tflite'"),
    (["prune", "--model", TINY_SPEC, "--data", "digits", "--int8"], "add --export onnx"),
])
def test_bad_ship_options_exit_2(runner, tmp_path, args, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[0] != "report":
        args += ["--out", str(tmp_path / "out")]
    line = assert_one_line_error(runner.invoke(app, args), 2)
    assert needle in line
    assert not (tmp_path / "out").exists()


def test_bad_report_json_exits_2(runner, tmp_path):
    (tmp_path / "report.json").write_text("{not json")
    assert "not valid JSON" in assert_one_line_error(runner.invoke(app, ["report", str(tmp_path)]), 2)
