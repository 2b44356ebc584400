"""--input-shape everywhere (issue 14, item 1): a model with a fixed input size is refused in one line that names
the flag, runs when given it, and every command that loads the run replays the shape; a torchvision model that cannot
run at the data's size gets the smallest one it runs at, and says so. Also: progress lines in a non-terminal."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from compress import cli
from compress.cli import app
from compress.data import load_dataset
from compress.data.inputs import InputTransform, with_input_shape
from compress.models import load_model
from tests.factories import fixed_input_cnn

FIXED = "tests.factories:fixed_input_cnn"
RUNNER = CliRunner(env={"NO_COLOR": "1", "CI": "1"})


def prune(out, *extra: str) -> object:
    return RUNNER.invoke(app, ["prune", "--model", FIXED, "--data", "digits", "--sparsity", "0.5", "--no-latency",
                               "--out", str(out), *extra])


def test_a_fixed_input_model_is_refused_in_one_line_naming_the_flag(tmp_path):
    result = prune(tmp_path / "run")
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in result.output and "unexpected" not in line
    assert "shape" in line and "'fc' expects 2304 input features and gets 64" in line
    assert "--input-shape 3,48,48" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_the_given_shape_is_used_recorded_and_replayed(tmp_path):
    run = tmp_path / "run"
    result = prune(run, "--input-shape", "3,48,48", "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["input"]["shape"] == [3, 48, 48] and manifest["input"]["data_shape"] == [1, 8, 8]
    assert manifest["input_shape"] == [3, 48, 48]
    # every command that loads the run replays it without being told
    assert RUNNER.invoke(app, ["verify", str(run), "--quiet"]).exit_code == 0
    exported = RUNNER.invoke(app, ["export", str(run), "--out", str(tmp_path / "onnx"), "--json"])
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["export"]["onnx"]["ok"]
    measured = RUNNER.invoke(app, ["measure", str(run), "--backend", "pytorch-cpu", "--batch", "1", "--runs", "3",
                                   "--no-layer-table", "--out", str(tmp_path / "m"), "--json"])
    assert measured.exit_code == 0, measured.output
    assert json.loads(measured.stdout)["input_shape"] == [3, 48, 48]


def test_a_shape_the_model_cannot_take_is_refused(tmp_path):
    result = prune(tmp_path / "run", "--input-shape", "3,32,32")
    assert result.exit_code == 2 and "does not run at --input-shape 3,32,32" in result.stderr
    assert "shape error" in result.stderr and not (tmp_path / "run").exists()
    bad = prune(tmp_path / "run", "--input-shape", "48x48")
    assert bad.exit_code == 2 and "C,H,W" in bad.stderr


def test_items_are_brought_to_the_shape_as_they_are_read():
    splits = load_dataset("digits")
    resized, _ = with_input_shape(splits, (3, 48, 48))
    assert resized.input_shape == (3, 48, 48) and resized.train.x.base is splits.train.x  # nothing materialised
    batch = resized.test.x[:4]
    assert batch.shape == (4, 3, 48, 48)
    expected = torch.nn.functional.interpolate(splits.test.x[:4], size=(48, 48), mode="bilinear",
                                               align_corners=False).expand(-1, 3, -1, -1)
    assert torch.equal(batch, expected.contiguous())
    assert resized.train.subset(5).x.shape == (5, 3, 48, 48)
    model = fixed_input_cnn()
    assert model(batch).shape == (4, 10)
    with pytest.raises(Exception, match="channels"):
        InputTransform((3, 8, 8), (1, 8, 8))


def test_a_torchvision_model_gets_the_smallest_input_it_runs_at(tmp_path):
    out = tmp_path / "sq"
    result = RUNNER.invoke(app, ["prune", "--model", "torchvision:squeezenet1_0", "--num-classes", "10", "--data",
                                 "digits", "--sparsity", "0.5", "--no-latency", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "note: torchvision:squeezenet1_0 does not run at 3,8,8" in result.stderr
    assert "resized to 3,24,24" in result.stderr
    assert json.loads((out / "manifest.json").read_text())["input"]["shape"] == [3, 24, 24]
    loaded = load_model(str(out))
    assert loaded.model(torch.zeros(1, 3, 24, 24)).shape == (1, 10)


def test_a_long_step_prints_plain_progress_outside_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "PLAIN_PROGRESS_S", 0.0)
    result = RUNNER.invoke(app, ["prune", "--model", "tests.factories:tiny_cnn", "--data", "digits",
                                 "--sparsity", "0.5", "--finetune-epochs", "1", "--no-latency",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("epoch 1/1: ")]
    assert lines and all(line.endswith(" s)") for line in lines)
    quiet = RUNNER.invoke(app, ["prune", "--model", "tests.factories:tiny_cnn", "--data", "digits",
                                "--sparsity", "0.5", "--finetune-epochs", "1", "--no-latency", "--quiet",
                                "--out", str(tmp_path / "quiet")])
    assert quiet.exit_code == 0 and "epoch 1/1" not in quiet.stderr


def test_the_interrupt_message_says_what_a_rerun_resumes(tmp_path, monkeypatch):
    from compress import finetune

    real, calls = finetune._train_epoch, []

    def second_epoch_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune, "_train_epoch", second_epoch_interrupted)
    args = ["prune", "--model", "tests.factories:tiny_cnn", "--data", "digits", "--sparsity", "0.5",
            "--finetune-epochs", "3", "--no-latency", "--quiet", "--out", str(tmp_path / "run")]
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 130
    assert "redoes the compression (same seed, same result) and resumes fine-tuning after epoch 1" in result.stderr

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "_train_epoch", interrupted)  # in the first epoch: no checkpoint yet
    again = RUNNER.invoke(app, [*args[:-1], str(tmp_path / "other")])
    assert again.exit_code == 130 and "nothing was saved to resume from" in again.stderr


def test_eval_items_caps_every_evaluation_and_verify_replays_it(tmp_path):
    run = tmp_path / "run"
    result = RUNNER.invoke(app, ["prune", "--model", "tests.factories:tiny_cnn", "--data", "digits", "--sparsity",
                                 "0.5", "--eval-items", "50", "--no-latency", "--quiet", "--out", str(run)])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "report.json").read_text())
    assert report["eval_items"] == 50
    # accuracy on 50 items moves in steps of 2 points: the figures were computed on 50 items, not on all 359
    assert all(round(v / 2.0, 6).is_integer() for v in (report["tasks"]["classification"]["before"],
                                                        report["tasks"]["classification"]["after_compression"]))
    assert RUNNER.invoke(app, ["verify", str(run), "--quiet"]).exit_code == 0
    assert RUNNER.invoke(app, ["prune", "--model", "tests.factories:tiny_cnn", "--data", "digits",
                               "--eval-items", "0", "--out", str(tmp_path / "bad")]).exit_code == 2
