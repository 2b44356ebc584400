"""The CLI starts fast: listing the commands (and other commands' --help) never imports torch, because prune's
parameters, generated from the method registry, are built only when prune itself is resolved."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli import app

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: the test process has torch imported already (conftest).
PROBE = """
import sys
from typer.testing import CliRunner
from compress.cli import app
result = CliRunner(env={"NO_COLOR": "1", "CI": "1"}).invoke(app, sys.argv[1:])
assert result.exit_code == 0, result.output
print(result.stdout)
print("TORCH_IMPORTED" if "torch" in sys.modules else "TORCH_NOT_IMPORTED")
"""


def probe(*args: str) -> str:
    """The output of `compress *args` run through CliRunner in a fresh interpreter, then whether torch was imported."""
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_top_level_help_lists_prune_without_importing_torch():
    out = probe("--help")
    assert out.rstrip().endswith("TORCH_NOT_IMPORTED")
    text = re.sub(r"[\s│]+", " ", out)  # rich wraps the help in a box at 80 columns
    assert "prune Compress a model, optionally fine-tune it" in text
    for command in ("finetune", "train", "measure", "export", "check", "report", "env"):
        assert f" {command} " in text


@pytest.mark.parametrize("command", ["report", "measure", "export", "check"])
def test_other_commands_help_does_not_import_torch(command):
    out = probe(command, "--help")
    assert out.rstrip().endswith("TORCH_NOT_IMPORTED")
    assert "Usage:" in out


def test_importing_the_cli_does_not_import_torch():
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "from compress.cli import app"], cwd=ROOT,
                          capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported
    assert "compress.methods" not in imported


def test_prune_help_still_shows_the_generated_panels():
    result = CliRunner(env={"NO_COLOR": "1", "CI": "1", "COLUMNS": "160"}).invoke(app, ["prune", "--help"])
    assert result.exit_code == 0, result.output
    for panel in ("Common", "GlobalMP", "PAGCP", "Fine-tuning", "Measure and export"):
        assert re.search(rf"─ {re.escape(panel)} ─", result.stdout), panel
    assert "--method" in result.stdout
