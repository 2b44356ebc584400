"""Inputs that must be refused, through the CLI with real files (issue 14, items 3, 4, 6 and 7).

Weights that are not numbers, state dicts that do not fit, --out paths that are not runs, and unknown names with
the closest valid one. Each refusal is one line with its exit code, no traceback and no "unexpected error", and
leaves nothing behind in --out.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from compress import artifact
from compress.cli import app
from compress.data import Batches, load_dataset
from compress.models.builtin import ResCNN
from tests.conftest import TINY_SPEC
from tests.factories import TinyCNN, tiny_cnn
from tests.test_cli import assert_one_line_error

SMALL = ["--data", "digits", "--no-latency"]

# ------------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env={"NO_COLOR": "1", "CI": "1"})


def one_line_error(result, code: int) -> str:
    """The single `error: ...` line of a refused command (no traceback, no "unexpected error")."""
    assert "unexpected error" not in result.output, result.output
    return assert_one_line_error(result, code)


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), sorted(out.iterdir()) if out.is_dir() else out
    assert not out.with_name(out.name + ".partial").exists()


def prune(runner: CliRunner, out: Path, *args: str, json_out: bool = False):
    extra = ["--json"] if json_out else []
    return runner.invoke(app, ["prune", "--sparsity", "0.5", *SMALL, "--out", str(out), *extra, *args])


def tiny_state(**poison: tuple[int, float]) -> dict[str, torch.Tensor]:
    """The tiny CNN's state dict with `name=(count, value)`: the first `count` entries of `name` set to `value`."""
    state = {k: v.clone() for k, v in tiny_cnn().state_dict().items()}
    for name, (count, value) in poison.items():
        state[name.replace("__", ".")].view(-1)[:count] = value
    return state


def save_run(out: Path, model: torch.nn.Module, arch: dict) -> Path:
    """A run directory as compress writes it (manifest digests match), holding `model` under `arch`."""
    run = artifact.RunDir(out)
    artifact.save_model_files(run, model, arch, {"source": TINY_SPEC, "dataset": "digits"})
    return run.commit()


# ------------------------------------------------------------------------- 3. weights that are not numbers


def test_nan_in_a_pt_state_dict_exits_2_naming_the_tensor(runner, tmp_path):
    weights = tmp_path / "nan.pt"
    torch.save(tiny_state(features__0__weight=(3, float("nan")), fc__weight=(1, float("nan"))), weights)
    out = tmp_path / "out"
    line = one_line_error(prune(runner, out, "--model", TINY_SPEC, "--weights", str(weights), json_out=True), 2)
    assert f"weights file {str(weights)!r} is broken" in line
    assert "tensor 'features.0.weight' holds 3 NaN of its 72 values, the first of 2 such tensors" in line
    assert_nothing_written(out)


def test_inf_in_a_safetensors_file_exits_2(runner, tmp_path):
    weights = tmp_path / "inf.safetensors"
    save_file(tiny_state(fc__bias=(2, float("inf"))), str(weights))
    out = tmp_path / "out"
    line = one_line_error(prune(runner, out, "--model", TINY_SPEC, "--weights", str(weights)), 2)
    assert "is broken: tensor 'fc.bias' holds 2 Inf of its 10 values" in line
    assert_nothing_written(out)


def test_nan_in_a_runs_model_safetensors_exits_2(runner, tmp_path):
    model = tiny_cnn()
    with torch.no_grad():
        model.features[4].running_var[:4] = float("nan")  # a buffer: BatchNorm statistics count too
    run = save_run(tmp_path / "nan-run", model, {"kind": "factory", "target": TINY_SPEC, "kwargs": {}})
    out = tmp_path / "out"
    line = one_line_error(prune(runner, out, "--model", str(run)), 2)
    assert f"the run's {str(run / 'model.safetensors')!r} is broken" in line
    assert "'features.4.running_var' holds 4 NaN of its 16 values" in line
    assert_nothing_written(out)


DIVERGE_AFTER_STEPS = 10**9  # set by the test: training forwards after which DivergingCNN outputs NaN


class DivergingCNN(TinyCNN):
    """The tiny CNN, whose outputs turn NaN after DIVERGE_AFTER_STEPS training steps (forwards with gradients)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training and torch.is_grad_enabled():
            self.steps += 1
            if self.steps > DIVERGE_AFTER_STEPS:
                return out * float("nan")
        return out


def diverging_cnn() -> DivergingCNN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return DivergingCNN()


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(runner, tmp_path, monkeypatch):
    steps = len(Batches(load_dataset("digits").train, 128))
    monkeypatch.setitem(globals(), "DIVERGE_AFTER_STEPS", steps + 2)
    out = tmp_path / "trained"
    result = runner.invoke(app, ["train", "--model", f"{__name__}:diverging_cnn", "--data", "digits", "--epochs", "3",
                                 "--warmup-steps", "0", "--out", str(out)])
    line = one_line_error(result, 1)
    checkpoint = out.with_name("trained.partial") / "finetune.ckpt"
    assert line == (f"error: training diverged: the loss became nan at step 3 of {steps} in epoch 2 (the learning "
                    "rate may be too high for this model, or the data hold NaN); the last good checkpoint, after "
                    f"epoch 1, is kept in {checkpoint} (move it away, then rerun with a lower --lr)")
    assert not out.exists()
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] == 1 and len(saved["losses"]) == 1
    assert all(bool(torch.isfinite(v).all()) for v in saved["model"].values() if v.is_floating_point())


def test_nan_loss_in_the_first_epoch_says_nothing_was_kept(runner, tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "DIVERGE_AFTER_STEPS", 1)
    out = tmp_path / "trained"
    result = runner.invoke(app, ["train", "--model", f"{__name__}:diverging_cnn", "--data", "digits", "--epochs", "2",
                                 "--out", str(out)])
    line = one_line_error(result, 1)
    assert "training diverged: the loss became nan at step 2 of" in line and "in epoch 1" in line
    assert line.endswith("no epoch finished, so no checkpoint was kept; rerun with a lower --lr")
    assert not out.exists() and not (out.with_name("trained.partial") / "finetune.ckpt").exists()


# ----------------------------------------------------------------------- 4. state dicts that do not fit


def test_a_head_for_other_classes_names_num_classes(runner, tmp_path):
    weights = tmp_path / "rescnn7.pt"
    torch.save(ResCNN(num_classes=7).state_dict(), weights)
    out = tmp_path / "out"
    line = one_line_error(prune(runner, out, "--model", "rescnn", "--weights", str(weights)), 2)
    assert line == (f"error: weights {str(weights)!r} do not fit the architecture: fc.weight is [7, 128] in the file "
                    "but [10, 128] in the model (1 more key differs in shape); the file's head has 7 classes: pass "
                    "--num-classes 7")
    assert_nothing_written(out)


def test_a_torchvision_head_for_other_classes_names_num_classes(runner, tmp_path):
    import torchvision

    weights = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    out = tmp_path / "out"
    line = one_line_error(prune(runner, out, "--model", "torchvision:resnet18", "--weights", str(weights)), 2)
    assert "fc.weight is [10, 512] in the file but [1000, 512] in the model" in line
    assert line.endswith("the file's head has 10 classes: pass --num-classes 10")
    assert_nothing_written(out)


def test_a_factory_head_for_other_classes_says_the_factory_must_build_them(runner, tmp_path):
    weights = tmp_path / "tiny3.pt"
    torch.save(tiny_cnn(num_classes=3).state_dict(), weights)
    out = tmp_path / "out"
    line = one_line_error(prune(runner, out, "--model", TINY_SPEC, "--weights", str(weights)), 2)
    assert "fc.weight is [3, 16] in the file but [10, 16] in the model" in line
    assert line.endswith("make the factory build 3 classes (--num-classes does not reach a factory)")


def test_another_architecture_lists_five_keys_of_each_and_a_count(runner, tmp_path):
    weights = tmp_path / "tiny.pt"
    torch.save(tiny_cnn().state_dict(), weights)
    out = tmp_path / "out"
    line = one_line_error(prune(runner, out, "--model", "rescnn", "--weights", str(weights), json_out=True), 2)
    rescnn_keys = [k for k in ResCNN().state_dict() if not k.endswith("num_batches_tracked")]
    tiny_keys = list(tiny_cnn().state_dict())
    missing = [k for k in rescnn_keys if k not in tiny_keys]
    unexpected = [k for k in tiny_keys if k not in rescnn_keys]
    assert "fc.weight is [10, 16] in the file but [10, 128] in the model" in line
    assert f"missing {', '.join(missing[:5])} and {len(missing) - 5} more" in line
    assert f"unexpected {', '.join(unexpected[:5])} and {len(unexpected) - 5} more" in line
    assert line.endswith("the file holds another architecture's weights: give the --model they were saved from "
                         "(another factory or torchvision:NAME)")
    assert_nothing_written(out)


def test_a_run_whose_arch_and_weights_disagree_exits_2(runner, tmp_path):
    run = save_run(tmp_path / "odd-run", tiny_cnn(),
                   {"kind": "factory", "target": "tests.factories:tiny_cnn", "kwargs": {"num_classes": 4}})
    out = tmp_path / "out"
    line = one_line_error(prune(runner, out, "--model", str(run)), 2)
    assert "fc.weight is [10, 16] in the file but [4, 16] in the model" in line
    assert line.endswith("the run's arch.json and model.safetensors disagree: restore the run as compress wrote it")
    assert_nothing_written(out)


# --------------------------------------------------------------------------------------------- 6. --out


def test_out_naming_a_file_is_refused_even_with_force(runner, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    for force in ([], ["--force"]):
        line = one_line_error(prune(runner, out, "--model", TINY_SPEC, *force), 2)
        assert line == (f"error: --out {out} is a file, not a run directory; choose another path (a file is never "
                        "replaced, even with --force)")
    assert out.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no notes.txt.old, no partial


def test_a_directory_that_is_not_a_run_is_refused_even_with_force(runner, tmp_path):
    out = tmp_path / "data"
    (out / "images").mkdir(parents=True)
    (out / "images" / "0.png").write_bytes(b"png")
    (out / "labels.csv").write_text("0\n")
    line = one_line_error(prune(runner, out, "--model", TINY_SPEC, "--force", json_out=True), 2)
    assert line == (f"error: --out {out} already exists and is not a compress run (no manifest.json or report.json "
                    "that compress wrote); choose another directory (--force replaces only a previous run or an empty "
                    "directory)")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["images", "images/0.png", "labels.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_force_replaces_a_previous_run_and_leaves_an_unrelated_old_alone(runner, tmp_path):
    out = tmp_path / "run"
    assert prune(runner, out, "--model", TINY_SPEC).exit_code == 0
    old = tmp_path / "run.old"
    old.mkdir()
    (old / "keep.txt").write_text("not a run")
    (out / "stale.txt").write_text("from the first run")
    result = prune(runner, out, "--model", TINY_SPEC, "--force")
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file() and not (out / "stale.txt").exists()
    assert (old / "keep.txt").read_text() == "not a run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.old"]


def test_force_replaces_an_empty_directory(runner, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert one_line_error(prune(runner, out, "--model", TINY_SPEC), 2).endswith(
        "already exists; choose another directory or pass --force")
    result = prune(runner, out, "--model", TINY_SPEC, "--force")
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_a_partial_path_that_is_not_ours_is_refused(runner, tmp_path):
    out = tmp_path / "run"
    partial = tmp_path / "run.partial"
    partial.write_text("mine")
    line = one_line_error(prune(runner, out, "--model", TINY_SPEC), 2)
    assert line == (f"error: {partial} is a file, and compress builds --out {out} there; move it away or choose "
                    "another --out")
    partial.unlink()
    partial.mkdir()
    (partial / "thesis.tex").write_text("mine")
    line = one_line_error(prune(runner, out, "--model", TINY_SPEC), 2)
    assert line.startswith(f"error: {partial} exists and is not an interrupted compress run")
    assert (partial / "thesis.tex").read_text() == "mine" and not out.exists()


# --------------------------------------------------------------------------------- 7. closest names


@pytest.mark.parametrize("args,expected", [
    (["--model", TINY_SPEC, "--data", "fashion-minst"],
     "unknown data set 'fashion-minst'; did you mean fashion-mnist? (choose one of fashion-mnist, digits, "),
    (["--model", TINY_SPEC, "--method", "globalpm"], "unknown method 'globalpm'; did you mean globalmp? "),
    (["--model", "rescn"], "unknown model 'rescn'; did you mean rescnn? (choose one of rescnn, mtnet, "),
    (["--model", "resnet18"], "unknown model 'resnet18'; did you mean torchvision:resnet18? "),
    (["--model", "torchvision:resnet19"], "unknown torchvision architecture 'resnet19'; did you mean resnet18? "),
    (["--model", "torchvison:resnet18"], ("cannot import factory 'torchvison:resnet18' (No module named "
                                          "'torchvison'); did you mean torchvision:resnet18?")),
])
def test_unknown_names_suggest_the_closest(runner, tmp_path, args, expected):
    out = tmp_path / "out"
    line = one_line_error(prune(runner, out, *args), 2)
    assert line.startswith("error: " + expected), line
    assert_nothing_written(out)


def test_a_name_nothing_is_close_to_lists_the_choices(runner, tmp_path):
    line = one_line_error(prune(runner, tmp_path / "out", "--model", TINY_SPEC, "--method", "magic"), 2)
    assert line.startswith("error: unknown method 'magic'; choose one of ") and "did you mean" not in line
    assert all(name in line for name in ("globalmp", "pagcp", "alds"))


@pytest.mark.parametrize("recipe,expected", [
    ({"methd": "globalmp"}, ("has unknown key(s) 'methd' (did you mean method?); allowed: method, model, data, "
                             "seed, config, finetune")),
    ({"method": "globalmp", "config": {"sparsty": 0.5}},
     "unknown key(s) 'sparsty' (did you mean sparsity?) for GlobalMPConfig; allowed: "),
    ({"method": "globalmp", "finetune": {"epochs": 1, "learning_rate": 0.1}},
     "unknown key(s) 'learning_rate' for FinetuneConfig; allowed: "),
    ({"method": "globalmp", "finetune": {"epocs": 1}}, "unknown key(s) 'epocs' (did you mean epochs?)"),
])
def test_unknown_recipe_and_config_keys_suggest_the_closest(runner, tmp_path, recipe, expected):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", "--model", TINY_SPEC, *SMALL, "--recipe", str(path), "--out", str(out)])
    assert expected in one_line_error(result, 2)
    assert_nothing_written(out)
