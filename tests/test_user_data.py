"""The user's own data and tasks (issue 14, item 2): `--data package.module:function` with the worked example of
docs/own-data.md, a three-output model with a fixed 3x48x48 input, trained and pruned by PAGCP through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from compress.cli import app
from compress.models import load_model
from docs.examples import face_stage

RUNNER = CliRunner(env={"NO_COLOR": "1", "CI": "1"})
MODEL, DATA = "docs.examples.face_stage:model", "docs.examples.face_stage:data"


def bad_list(seed: int = 0) -> list:
    return [1, 2, 3]


def bad_target(seed: int = 0) -> dict:
    data = face_stage.data(seed)
    data["tasks"] = [face_stage.TASKS[0].__class__("box", loss="l1", metric="pixel_error", output=0, target="bbox")]
    return data


def no_test(seed: int = 0) -> dict:
    data = face_stage.data(seed)
    del data["test"]
    return data


def calibration_losses(model: torch.nn.Module) -> dict[str, float]:
    """Each task's mean calibration loss, recomputed here from the data function and the tasks."""
    x, targets = face_stage.data(0)["calibration"]
    with torch.no_grad():
        out = model.eval()(x)
    return {t.name: float(t.item_losses(t.pick_output(out), targets[t.target]).mean()) for t in face_stage.TASKS}


@pytest.mark.slow
def test_three_output_model_on_its_own_data_end_to_end(tmp_path):
    trained, pruned = tmp_path / "face", tmp_path / "face-pagcp"
    result = RUNNER.invoke(app, ["train", "--model", MODEL, "--data", DATA, "--input-shape", "3,48,48",
                                 "--epochs", "4", "--lr", "0.05", "--quiet", "--out", str(trained)])
    assert result.exit_code == 0, result.output
    report = json.loads((trained / "report.json").read_text())
    assert set(report["tasks"]) == {"box", "landmarks", "kind"}
    assert report["tasks"]["box"]["higher_is_better"] is False and report["tasks"]["kind"]["higher_is_better"]
    result = RUNNER.invoke(app, ["prune", "--method", "pagcp", "--model", str(trained), "--tau", "2",
                                 "--finetune-epochs", "0", "--no-latency", "--quiet", "--out", str(pruned)])
    assert result.exit_code in (0, 6), result.output
    shipped, original = load_model(str(pruned)).model, load_model(str(trained)).model
    out = shipped.eval()(torch.randn(5, 3, 48, 48))
    assert [tuple(o.shape) for o in out] == [(5, 4), (5, 10), (5, 3)]  # every output keeps its shape
    assert sum(p.numel() for p in shipped.parameters()) < sum(p.numel() for p in original.parameters())
    after, before = calibration_losses(shipped), calibration_losses(original)
    for task in after:  # the bound, recomputed here (BatchNorm re-estimated on the same calibration split)
        assert after[task] <= 2.0 * before[task] * 1.01 + 1e-6, (task, after[task], before[task])
    assert RUNNER.invoke(app, ["verify", str(pruned), "--quiet"]).exit_code == 0


@pytest.mark.parametrize(("function", "says"), [("bad_list", "returned list"),
                                                ("bad_target", "task target 'bbox' is not among the targets"),
                                                ("no_test", "returned no 'test' split"),
                                                ("missing_function", "cannot import data function")])
def test_a_data_function_that_returns_the_wrong_thing_is_one_line(tmp_path, function, says):
    result = RUNNER.invoke(app, ["prune", "--model", MODEL, "--data", f"tests.test_user_data:{function}",
                                 "--input-shape", "3,48,48", "--no-latency", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
