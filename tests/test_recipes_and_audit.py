"""Recipes round-trip through a run, the audit fails loudly, runs are reproducible, missing data is explained."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from compress import api
from compress.cli import app
from compress.config import GlobalMPConfig, load_recipe
from compress.data import datasets
from compress.errors import UsageError
from compress.methods import METHODS, Context
from tests.conftest import TINY_SPEC

runner = CliRunner()


def _prune(out: Path, *extra: str):
    return runner.invoke(app, ["prune", "--model", TINY_SPEC, "--data", "digits", "--no-latency", "--json",
                               "--out", str(out), *extra])


def test_recipe_sets_config_and_explicit_options_override_it(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "globalmp", "config": {"sparsity": 0.8, "min_keep": 0.05}}))
    result = _prune(tmp_path / "a", "--recipe", str(recipe))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["sparsity"] == 0.8 and report["config"]["min_keep"] == 0.05
    overridden = json.loads(_prune(tmp_path / "b", "--recipe", str(recipe), "--sparsity", "0.6").stdout)
    assert overridden["config"]["sparsity"] == 0.6 and overridden["config"]["min_keep"] == 0.05


def test_resolved_recipe_reproduces_the_run(tmp_path: Path) -> None:
    first = json.loads(_prune(tmp_path / "a", "--sparsity", "0.7", "--min-keep", "0.1").stdout)
    resolved = tmp_path / "a" / "recipe.resolved.yaml"
    assert load_recipe(str(resolved))["config"]["sparsity"] == 0.7
    again = json.loads(_prune(tmp_path / "b", "--recipe", str(resolved)).stdout)
    assert again["config"] == first["config"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_bad_recipe_is_one_line_exit_2(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("method: globalmp\nconfig: {sparsity: 0.9, bogus: 1}\n")
    result = _prune(tmp_path / "x", "--recipe", str(recipe))
    assert result.exit_code == 2
    assert "bogus" in result.stderr and "Traceback" not in result.output
    recipe.write_text("nonsense_key: 1\n")
    assert _prune(tmp_path / "y", "--recipe", str(recipe)).exit_code == 2


def test_shipped_recipes_are_valid() -> None:
    for path in Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"):
        recipe = load_recipe(str(path))
        if recipe["method"] == "globalmp":
            GlobalMPConfig.from_dict(recipe["config"])


def test_audit_names_a_missed_target_and_a_broken_floor(tiny_model, digits) -> None:
    """GlobalMP's audit reads the shipped weights: a pruned weight brought back, or a layer emptied below its
    floor, is named."""
    cfg = GlobalMPConfig(sparsity=0.9, min_keep=0.05)
    original = copy.deepcopy(tiny_model)
    result = METHODS["globalmp"].apply(tiny_model, cfg, Context(digits.test.x[:1], digits))
    ctx = Context(digits.test.x[:1], digits)
    assert api.audit(cfg, result, tiny_model, original, ctx).problems == []
    with torch.no_grad():
        weight = tiny_model.fc.weight
        revived = (weight == 0).nonzero()[0]
        weight[tuple(revived)] = 1.0  # one pruned weight is no longer zero
        problems = api.audit(cfg, result, tiny_model, original, ctx).problems
        assert len(problems) == 1 and "requested" in problems[0]
        weight[tuple(revived)] = 0.0
        weight.zero_()  # the classifier below its 5% floor
        problems = api.audit(cfg, result, tiny_model, original, ctx).problems
    assert any("fc" in p and "floor" in p for p in problems)


def test_same_seed_same_artifact_bytes(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert _prune(tmp_path / name, "--sparsity", "0.9", "--finetune-epochs", "1").exit_code == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_missing_fashion_mnist_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIRS", (tmp_path / "none", tmp_path / "cache"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # no download on this machine either way
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist"):
        datasets.fashion_mnist()


def test_an_early_error_leaves_no_partial_directory(tmp_path: Path) -> None:
    out = tmp_path / "never"
    assert _prune(out, "--sparsity", "0.99", "--min-keep", "0.5").exit_code == 2
    assert not out.exists() and not out.with_name("never.partial").exists()
