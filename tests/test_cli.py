"""The command line through Typer's CliRunner, with real small runs (tiny CNN, digits, no latency)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from typer.testing import CliRunner

from compress import artifact
from compress.cli import app
from compress.config import GlobalMPConfig
from compress.methods.globalmp import layer_floors
from compress.models import load_model
from compress.report.schema import SCHEMA_VERSION
from tests.conftest import TINY_SPEC
from tests.factories import PickleBomb, tiny_cnn

TINY_N = 3688  # Conv/Linear weights of TinyCNN
SMALL_RUN = ["--model", TINY_SPEC, "--data", "digits", "--no-latency"]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env={"NO_COLOR": "1", "CI": "1"})


def assert_one_line_error(result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    if result.stdout:  # with --json, stdout carries only the error object
        assert json.loads(result.stdout) == {"schema_version": SCHEMA_VERSION, "status": "error", "exit_code": code,
                                             "error": result.stderr.strip().removeprefix("error: ")}
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module")
def cli_run(runner, tmp_path_factory):
    """`compress prune --sparsity 0.9 --json` on the tiny model; returns (result, out dir)."""
    out = tmp_path_factory.mktemp("cli") / "pruned"
    result = runner.invoke(app, ["prune", "--sparsity", "0.9", "--json", "--out", str(out), *SMALL_RUN])
    return result, out


def test_prune_json_is_the_only_stdout(cli_run):
    result, out = cli_run
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # nothing but one JSON document
    assert result.stdout.strip().count("\n") == 0
    assert report["status"] == "ok" and report["exit_code"] == 0
    assert report["method"] == "globalmp"
    k = round(0.9 * TINY_N)
    assert report["summary"]["prunable_weights"] == TINY_N
    assert report["summary"]["pruned"] == k
    assert report["sparsity"]["achieved"] == pytest.approx(k / TINY_N, abs=1e-12)
    assert report["sparsity"]["requested"] == 0.9
    assert report["sparsity"]["counted_over"] == "conv/linear weights"
    assert report["audit"]["ok"] is True and report["audit"]["problems"] == []
    assert report["audit"]["figures"]["pruned"] == k  # recounted on the shipped weights
    assert "latency" not in report
    assert report["out"] == str(out)
    for key in ("schema_version", "command", "config", "seed", "env", "model", "layers", "tasks"):
        assert key in report, key
    for side in ("before", "after"):
        assert set(report["model"][side]) >= {"params_total", "params_nonzero", "macs", "flops", "macs_effective",
                                              "bytes"}
    assert report["model"]["before"]["params_nonzero"] - report["model"]["after"]["params_nonzero"] == k
    assert report["model"]["after"]["macs_effective"] < report["model"]["before"]["macs_effective"]
    task = report["tasks"]["classification"]
    assert task["metric"] == "accuracy" and 0 <= task["before"] <= 100 and task["after_finetune"] is None


def test_prune_writes_the_run_files(cli_run):
    result, out = cli_run
    assert result.exit_code == 0, result.output
    for name in ("report.json", "report.md", "manifest.json", "arch.json", "model.safetensors", "recipe.resolved.yaml"):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "report.json").read_text()) == json.loads(result.stdout)
    recipe = yaml.safe_load((out / "recipe.resolved.yaml").read_text())
    assert recipe["method"] == "globalmp" and recipe["data"] == "digits" and recipe["config"]["sparsity"] == 0.9
    assert GlobalMPConfig.from_dict(recipe["config"]).sparsity == 0.9
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"]["model.safetensors"] == artifact.sha256_file(out / "model.safetensors")
    assert "sparsity" in (out / "report.md").read_text().lower()
    model = load_model(str(out)).model
    zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1)
    assert zeros == round(0.9 * TINY_N)
    assert not out.with_name(out.name + ".partial").exists()


def test_prune_summary_without_json(runner, out_dir):
    result = runner.invoke(app, ["prune", "--sparsity", "0.5", "--out", str(out_dir("plain")), *SMALL_RUN])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() and not result.stdout.lstrip().startswith("{")


def test_existing_out_without_force_exits_2(runner, cli_run):
    _, out = cli_run
    before = (out / "model.safetensors").read_bytes()
    result = runner.invoke(app, ["prune", "--sparsity", "0.5", "--json", "--out", str(out), *SMALL_RUN])
    line = assert_one_line_error(result, 2)
    assert "already exists" in line and "--force" in line
    assert (out / "model.safetensors").read_bytes() == before


def test_pickled_module_exits_5(runner, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    bomb = tmp_path / "evil.pt"
    torch.save({"x": PickleBomb(sentinel)}, bomb)
    result = runner.invoke(app, ["prune", "--model", str(bomb), "--data", "digits", "--no-latency", "--json",
                                 "--out", str(tmp_path / "o1")])
    line = assert_one_line_error(result, 5)
    assert "--trust-pickle" in line
    result = runner.invoke(app, ["prune", "--model", TINY_SPEC, "--weights", str(bomb), "--data", "digits",
                                 "--no-latency", "--out", str(tmp_path / "o2")])
    assert_one_line_error(result, 5)
    assert not sentinel.exists()
    whole = tmp_path / "whole.pt"
    torch.save(tiny_cnn(), whole)  # a whole pickled nn.Module
    result = runner.invoke(app, ["prune", "--model", str(whole), "--data", "digits", "--no-latency",
                                 "--out", str(tmp_path / "o3")])
    assert_one_line_error(result, 5)
    result = runner.invoke(app, ["prune", "--model", str(whole), "--trust-pickle", "--data", "digits",
                                 "--no-latency", "--json", "--out", str(tmp_path / "o3")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"]["arch"]["kind"] == "pickle"


def test_infeasible_floors_exit_2_naming_the_largest_sparsity(runner, out_dir):
    result = runner.invoke(app, ["prune", "--sparsity", "0.9", "--min-keep", "0.5", "--out", str(out_dir("inf")),
                                 *SMALL_RUN])
    line = assert_one_line_error(result, 2)
    floors = layer_floors([72, 1152, 2304, 160], GlobalMPConfig(min_keep=0.5))
    match = re.search(r"largest reachable sparsity is ([0-9.]+)", line)
    assert match, line
    assert float(match.group(1)) == pytest.approx(1 - sum(floors) / TINY_N, abs=1e-6)


def test_unknown_method_exits_2(runner, out_dir):
    result = runner.invoke(app, ["prune", "--method", "magic", "--out", str(out_dir("m")), *SMALL_RUN])
    line = assert_one_line_error(result, 2)
    assert "magic" in line and "globalmp" in line


@pytest.mark.parametrize("args,needle", [
    (["--sparsity", "1.0"], "sparsity"),
    (["--schedule", "cubic"], "cubic"),
    (["--schedule", "gradual"], "--finetune-epochs"),
    (["--data", "no-such-data"], "unknown data set"),
    (["--threads", "0"], "--threads"),
])
def test_bad_options_exit_2(runner, out_dir, args, needle):
    result = runner.invoke(app, ["prune", "--out", str(out_dir("bad")), *SMALL_RUN, *args])
    assert needle in assert_one_line_error(result, 2)


def test_env_json(runner):
    result = runner.invoke(app, ["env", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["versions"]["torch"] == torch.__version__.split("+")[0] or info["versions"]["torch"] == torch.__version__
    assert info["versions"]["compress"] and info["threads"] >= 1


def test_help_documents_exit_codes(runner):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    text = re.sub(r"[\s│]+", " ", result.stdout)  # rich wraps the help in a box at 80 columns
    for code, meaning in ((2, "bad usage"), (5, "unsafe checkpoint refused"), (6, "compression audit failed")):
        assert f"{code} {meaning}" in text


def test_finetune_keeps_pruned_weights_at_zero(runner, cli_run, tmp_path):
    _, pruned = cli_run
    out = tmp_path / "tuned"
    result = runner.invoke(app, ["finetune", str(pruned), "--epochs", "1", "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "ok" and report["method"] == "finetune"
    assert report["finetune"]["epochs"] == 1
    assert report["tasks"]["classification"]["after_finetune"] is not None
    for name in ("report.json", "report.md", "manifest.json", "arch.json", "model.safetensors", "recipe.resolved.yaml"):
        assert (out / name).is_file(), name

    before = dict(load_model(str(pruned)).model.named_parameters())
    after = dict(load_model(str(out)).model.named_parameters())
    masked = json.loads((pruned / "manifest.json").read_text())["masked_params"]
    assert json.loads((out / "manifest.json").read_text())["masked_params"] == masked
    changed = False
    for name in masked:
        was_zero = before[name] == 0
        assert torch.equal(after[name] == 0, was_zero), f"{name}: zero positions changed"
        changed |= not torch.equal(after[name][~was_zero], before[name][~was_zero])
    assert changed, "fine-tuning did not move any kept weight"
    assert not (out.with_name("tuned.partial") / "finetune.ckpt").exists()
    # the input run is untouched
    assert json.loads((pruned / "report.json").read_text())["method"] == "globalmp"


def test_json_errors_are_json_on_stdout(tmp_path):
    result = CliRunner().invoke(app, ["prune", "--model", "nope.nothing:here", "--json", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    payload = json.loads(result.stdout)
    assert payload["status"] == "error" and payload["exit_code"] == 2 and "nope.nothing" in payload["error"]
