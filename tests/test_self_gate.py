"""The project gates itself: the shipped recipes compress the built-in models, and `compress check` holds them to
the baseline reports and budgets committed under tests/gate/ (no bigger, no worse), as a team's CI would."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli import app
from tests.conftest import requires_baseline

ROOT = Path(__file__).resolve().parent.parent
GATE = ROOT / "tests" / "gate"
RECIPES = ("globalmp", "alds", "pagcp")  # rescnn at 90% GlobalMP, rescnn at ALDS keep 0.5, PAGCP on mtnet


@pytest.mark.slow
@requires_baseline
@pytest.mark.parametrize("recipe", RECIPES)
def test_shipped_recipes_stay_within_the_committed_budgets(recipe: str, tmp_path: Path) -> None:
    out = tmp_path / recipe
    runner = CliRunner()
    pruned = runner.invoke(app, ["prune", "--recipe", str(ROOT / "recipes" / f"{recipe}.yaml"),
                                 "--finetune-epochs", "0", "--no-latency", "--quiet", "--out", str(out)])
    assert pruned.exit_code == 0, pruned.output
    checked = runner.invoke(app, ["check", str(out), "--baseline", str(GATE / f"{recipe}.report.json"),
                                  "--budgets", str(GATE / f"{recipe}.budgets.yaml"), "--json"])
    result = json.loads(checked.stdout)
    assert checked.exit_code == 0, [row for row in result["results"] if row.get("status") != "ok"]
    assert result["status"] == "ok"


def test_gate_budgets_are_hard_on_size_and_can_fail(tmp_path: Path) -> None:
    """The committed budgets hold the baseline to itself, and a copy with 5% more parameters fails them (exit 3)."""
    runner = CliRunner()
    for recipe in RECIPES:
        report = GATE / f"{recipe}.report.json"
        budgets = GATE / f"{recipe}.budgets.yaml"
        same = runner.invoke(app, ["check", str(report), "--baseline", str(report), "--budgets", str(budgets)])
        assert same.exit_code == 0, same.output
        bigger = json.loads(report.read_text())
        bigger["model"]["after"]["params_total"] = math.ceil(1.05 * bigger["model"]["after"]["params_total"])
        path = tmp_path / f"{recipe}.json"
        path.write_text(json.dumps(bigger))
        grown = runner.invoke(app, ["check", str(path), "--baseline", str(report), "--budgets", str(budgets)])
        assert grown.exit_code == 3, grown.output
