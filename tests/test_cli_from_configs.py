"""`compress prune`'s method and fine-tuning options are generated from the configs' fields and the registry:
panels in --help, a method registered later gets its own flags, range errors come from the config."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

import pytest
import torch
from typer.testing import CliRunner

from compress.cli import app
from compress.config import ConfigBase
from compress.errors import UsageError
from compress.methods import METHODS, Result
from compress.methods.base import register
from compress.models import load_model
from tests.conftest import TINY_SPEC
from tests.factories import tiny_cnn
from tests.test_cli import assert_one_line_error

SMALL_RUN = ["--model", TINY_SPEC, "--data", "digits", "--no-latency"]
WIDE = {"COLUMNS": "200"}  # rich wraps at the terminal's width; CliRunner's output is not a terminal


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def panels(help_text: str) -> dict[str, list[str]]:
    """The flags of each rich help panel ("╭─ Title ───╮ ... ╰───╯"), in order: the first flag of each row."""
    found: dict[str, list[str]] = {}
    current = None
    for line in help_text.splitlines():
        title = re.match(r"\s*╭─ (.+?) ─", line)
        if title:
            current = found.setdefault(title.group(1), [])
        elif line.lstrip().startswith("╰"):
            current = None
        elif current is not None:
            current += re.findall(r"^\s*│ (--[a-z0-9-]+)", line)
    return found


def prune_help(runner: CliRunner) -> dict[str, list[str]]:
    result = runner.invoke(app, ["prune", "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    return panels(result.stdout)


def test_help_groups_the_options_in_panels(runner):
    found = prune_help(runner)
    expected = {
        "Common": ["--method", "--model", "--data", "--seed", "--recipe", "--dry-run", "--out", "--force",
                   "--json"],
        "GlobalMP": ["--sparsity", "--min-threshold", "--min-keep", "--include", "--exclude", "--schedule"],
        "ALDS / SVD": ["--keep", "--macs-keep", "--min-group-channels"],
        "PAGCP": ["--delta0", "--tau", "--max-tau", "--zero-loss-atol", "--top-p", "--exp", "--macs-target",
                  "--macs-tolerance", "--rounds", "--round-epochs", "--round-items", "--round-to", "--ignore"],
        "Fine-tuning": ["--finetune-epochs", "--optimizer", "--lr", "--distill"],
        "Measure and export": ["--latency", "--export", "--int8", "--static-shapes", "--measure"],
    }
    for panel, flags in expected.items():
        assert set(flags) <= set(found.get(panel, [])), (panel, found.get(panel))
    every = [flag for flags in found.values() for flag in flags]
    assert len(every) == len(set(every)), "an option shared by several configs appears once"
    # internal knobs (metadata hidden) are no options: ALDS's own rounds, PAGCP's step, fine-tuning's momentum
    assert not {"--seeds", "--step", "--momentum", "--task-tau", "--initial-sparsity"} & set(every)


def test_every_visible_config_field_is_a_flag_under_its_methods_panel(runner):
    found = prune_help(runner)
    panel_of = {flag: panel for panel, flags in found.items() for flag in flags}
    for spec in METHODS.values():
        for f in dataclasses.fields(spec.config_type):
            if f.metadata.get("hidden"):
                continue
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            owners = [s for s in METHODS.values() if f.name in {g.name for g in dataclasses.fields(s.config_type)}]
            if len(owners) == 1:  # a shared option sits in the panel of the first method that has it
                assert panel_of.get(flag) == (spec.config_type.cli_panel or spec.name), (spec.name, flag)
            else:
                assert flag in panel_of, (spec.name, flag)


@dataclass(frozen=True, kw_only=True)
class ToyConfig(ConfigBase):
    """Scales one weight of the head: the smallest method the registry can hold."""

    factor: float = field(default=1.0, metadata={"help": "Multiplier of the head's first weight."})

    def __post_init__(self) -> None:
        if not 0.0 < self.factor <= 1.0:
            raise UsageError(f"factor = {self.factor} is out of range; allowed (0.0, 1.0]")


@pytest.fixture
def toy(request) -> list[ToyConfig]:
    """A method `toy` registered for the test only; returns the configs its apply received."""
    seen: list[ToyConfig] = []

    def apply(model: torch.nn.Module, cfg: ToyConfig, ctx) -> Result:
        with torch.no_grad():
            model.fc.weight[0, 0] *= cfg.factor
        seen.append(cfg)
        return Result(model=model, summary={"factor": cfg.factor})

    assert "toy" not in METHODS
    register("toy", ToyConfig)(apply)
    request.addfinalizer(lambda: METHODS.pop("toy", None))
    return seen


def test_a_registered_method_gets_its_panel_and_flags(runner, toy):
    found = prune_help(runner)
    assert found["toy"] == ["--factor"]
    text = " ".join(runner.invoke(app, ["prune", "--help"], env=WIDE).stdout.replace("│", " ").split())
    assert re.search(r"--method .*Compression method: [a-z, -]*\btoy\b", text)
    assert "Multiplier of the head's first weight." in text
    line = assert_one_line_error(runner.invoke(app, ["prune", "--method", "magic", *SMALL_RUN]), 2)  # writes nothing
    assert "toy" in line  # --method's choices are the registry's


def test_a_registered_method_runs_end_to_end(runner, toy, tmp_path):
    out = tmp_path / "toy"
    result = runner.invoke(app, ["prune", "--method", "toy", "--factor", "0.5", "--no-bn-recalibrate", "--json",
                                 "--out", str(out), *SMALL_RUN])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "toy" and report["config"] == {"factor": 0.5}
    assert toy == [ToyConfig(factor=0.5)]
    shipped = load_model(str(out)).model
    assert shipped.fc.weight[0, 0].item() == pytest.approx(0.5 * tiny_cnn().fc.weight[0, 0].item())
    # its flag belongs to its config only
    result = runner.invoke(app, ["prune", "--factor", "0.5", "--out", str(tmp_path / "x"), *SMALL_RUN])
    line = assert_one_line_error(result, 2)
    assert "--factor does not apply to --method globalmp" in line


def test_a_range_error_comes_from_the_config(runner, toy, tmp_path):
    result = runner.invoke(app, ["prune", "--method", "toy", "--factor", "5", "--out", str(tmp_path / "x"),
                                 *SMALL_RUN])
    line = assert_one_line_error(result, 2)
    assert "factor = 5.0 is out of range" in line and "(0.0, 1.0]" in line
    assert not (tmp_path / "x").exists()
    result = runner.invoke(app, ["prune", "--method", "alds", "--min-group-channels", "0", "--out",
                                 str(tmp_path / "y"), *SMALL_RUN])
    line = assert_one_line_error(result, 2)
    assert line == "error: min_group_channels = 0 must be >= 1 (1 allows every k)"


def test_domain_messages_name_settings_and_the_cli_names_flags(tmp_path):
    """A method names its settings (`sparsity`, `min_keep`); the CLI shows the flags that set them."""
    from compress.cli import in_flags
    from compress.config import GlobalMPConfig
    from compress.errors import UsageError
    from compress.methods import METHODS, Context
    from compress.data import load_dataset
    from tests.factories import tiny_cnn

    digits = load_dataset("digits")
    with pytest.raises(UsageError) as info:
        METHODS["globalmp"].apply(tiny_cnn(), GlobalMPConfig(sparsity=0.99, min_keep=0.5), Context(digits.test.x[:1]))
    assert "`sparsity`" in str(info.value) and "`min_keep`" in str(info.value)
    assert "--sparsity" in in_flags(str(info.value)) and "--min-keep" in in_flags(str(info.value))
    assert in_flags("raise `tau` (or allow `max_tau`), `rounds` auto; `nonsense` stays") == \
        "raise --tau (or allow --max-tau), --rounds auto; `nonsense` stays"
