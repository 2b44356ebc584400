"""`compress check`: budgets on sizes, MACs, tasks and latency pass, warn and err where they should; the budgets
file's errors are one line naming file, line and key; the outputs (JSON, Markdown comment, benchmark JSON) parse."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from compress import api, check
from compress.cli import app
from compress.config import GlobalMPConfig
from compress.errors import UsageError
from compress.report.schema import SCHEMA_VERSION, report_schema
from tests.conftest import TINY_SPEC

VALIDATOR = Draft202012Validator(report_schema())
RUNNER = CliRunner(env={"NO_COLOR": "1", "CI": "1"})


def schema_problems(result: dict[str, Any]) -> list[str]:
    """Every way a check result breaks the shipped schema."""
    return [f"{list(e.absolute_path)}: {e.message}" for e in VALIDATOR.iter_errors(result)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real GlobalMP runs of the tiny CNN on digits: 80% and 90% sparsity."""
    root = tmp_path_factory.mktemp("check")
    found = {}
    for name, sparsity in (("s80", 0.8), ("s90", 0.9)):
        found[name] = root / name
        api.prune(api.ModelSource(spec=TINY_SPEC), GlobalMPConfig(sparsity=sparsity),
                  api.RunOptions(out=found[name], data="digits", latency=False, command="test"))
    return found


def fake_report(*, params: int = 1000, nonzero: int = 500, macs: int = 1_000_000, effective: int = 400_000,
                dense: int = 4000, sparse: int = 2000, acc: float = 90.0, px: float = 2.0,
                latency: list[dict[str, Any]] | None = None, before: bool = True) -> dict[str, Any]:
    """A hand-made report.json with the figures a case needs (the `before` side equals the defaults)."""
    after = {"params_total": params, "params_nonzero": nonzero, "macs": macs, "macs_effective": effective,
             "bytes": {"safetensors_dense": dense, "safetensors_sparse": sparse}}
    origin = {"params_total": 1000, "params_nonzero": 500, "macs": 1_000_000, "macs_effective": 400_000,
              "bytes": {"safetensors_dense": 4000, "safetensors_sparse": 2000}}
    tasks = {"classification": {"metric": "accuracy", "higher_is_better": True, "before": 90.0,
                                "after_compression": acc, "after_finetune": None},
             "position": {"metric": "pixel_error", "higher_is_better": False, "before": 2.0,
                          "after_compression": 2.5, "after_finetune": px}}
    return {"schema_version": 1, "status": "ok", "exit_code": 0, "method": "globalmp",
            "model": {"before": origin if before else None, "after": after}, "tasks": tasks,
            "latency": latency or []}


def lat(speedup: float, low: float, high: float, backend: str = "pytorch-cpu", batch: int = 1) -> dict[str, Any]:
    """A latency row with its p25-p75 spread of paired ratios."""
    return {"backend": backend, "batch": batch, "threads": 1, "p50_ms": 1.0, "p90_ms": 1.2, "runs": 20,
            "baseline_p50_ms": 1.0 * speedup, "speedup": speedup, "speedup_spread": [low, high]}


def run_check(tmp: Path, budgets: str, current: dict[str, Any], baseline: dict[str, Any] | None = None,
              ) -> dict[str, Any]:
    """The check result of a budgets text on hand-made reports (through the pure functions)."""
    path = tmp / "budgets.yaml"
    path.write_text(budgets)
    return check.check_runs(current, baseline, path, sources=("current", "baseline" if baseline else None))


def statuses(result: dict[str, Any]) -> dict[str, str]:
    return {row["budget"]: row["status"] for row in result["results"]}


# --- every kind passes, warns and errs -----------------------------------------------------------------------------

DETERMINISTIC_CASES = [
    # key, limits, current figures, expected
    ("params_total", '{error: "1k"}', {"params": 1000}, "ok"),
    ("params_total", '{error: "1k"}', {"params": 1001}, "error"),
    ("params_total", '{warn: "+0%", error: "+1%"}', {"params": 1005}, "warn"),
    ("params_nonzero", '{warn: "+0%", error: "+1%"}', {"nonzero": 510}, "error"),
    ("params_nonzero", '{error: "+10"}', {"nonzero": 510}, "ok"),
    ("macs", '{error: "1.2M"}', {"macs": 1_100_000}, "ok"),
    ("macs", '{warn: "1.05x", error: "1.2M"}', {"macs": 1_100_000}, "warn"),
    ("macs_effective", '{error: "0.5x"}', {"effective": 210_000}, "error"),
    ("bytes.dense", '{error: "4kB"}', {"dense": 4000}, "ok"),
    ("bytes.safetensors_dense", '{error: "4kB"}', {"dense": 4001}, "error"),
    ("bytes.sparse", '{warn: "+2%", error: "+5%"}', {"sparse": 2050}, "warn"),
    ("bytes.sparse", '{warn: "+2%", error: "+5%"}', {"sparse": 2101}, "error"),
    ("bytes.sparse", '{error: "+512B"}', {"sparse": 2500}, "ok"),
    ("bytes.sparse", '{error: "2KiB"}', {"sparse": 2049}, "error"),
]


@pytest.mark.parametrize(("key", "limits", "figures", "expected"), DETERMINISTIC_CASES)
def test_sizes_and_macs_pass_warn_and_fail(tmp_path, key, limits, figures, expected):
    result = run_check(tmp_path, f"budgets:\n  {key}: {limits}\n", fake_report(**figures))
    assert [row["status"] for row in result["results"]] == [expected], result["results"]
    assert result["exit_code"] == (3 if expected == "error" else 0)
    assert schema_problems(result) == []


TASK_CASES = [  # accuracy may fall by at most Y; a pixel error may rise by at most X
    ("task.classification", '{warn: "-0.3pt", error: "-1pt"}', {"acc": 89.8}, "ok"),
    ("task.classification", '{warn: "-0.3pt", error: "-1pt"}', {"acc": 89.5}, "warn"),
    ("task.classification", '{warn: "-0.3pt", error: "-1pt"}', {"acc": 88.9}, "error"),
    ("task.classification", '{error: "91.5"}', {"acc": 91.6}, "ok"),
    ("task.classification", '{error: "91.5"}', {"acc": 91.4}, "error"),
    ("task.classification", '{error: "-1%"}', {"acc": 89.2}, "ok"),  # 90 - 1% = 89.1
    ("task.classification", '{error: "-1%"}', {"acc": 89.0}, "error"),
    ("task.position", '{warn: "+0.2pt", error: "+0.5pt"}', {"px": 2.1}, "ok"),
    ("task.position", '{warn: "+0.2pt", error: "+0.5pt"}', {"px": 2.3}, "warn"),
    ("task.position", '{warn: "+0.2pt", error: "+0.5pt"}', {"px": 2.6}, "error"),
    ("task.position", '{error: "2.0"}', {"px": 1.5}, "ok"),  # a lower pixel error is better, never an error
    ("task.position", '{error: "+10%"}', {"px": 2.3}, "error"),
]


@pytest.mark.parametrize(("key", "limits", "figures", "expected"), TASK_CASES)
def test_tasks_respect_their_direction(tmp_path, key, limits, figures, expected):
    result = run_check(tmp_path, f"budgets:\n  {key}: {limits}\n", fake_report(**figures))
    assert statuses(result) == {key: expected}, result["results"]


def test_relative_limits_use_the_baseline_run_over_the_origin(tmp_path):
    budgets = 'budgets:\n  params_nonzero: {error: "+0%"}\n  task.classification: {error: "-1pt"}\n'
    current = fake_report(nonzero=400, acc=88.0)
    assert statuses(run_check(tmp_path, budgets, current)) == {"params_nonzero": "ok", "task.classification": "error"}
    baseline = fake_report(nonzero=300, acc=88.5)  # its latest figures are the baseline now
    result = run_check(tmp_path, budgets, current, baseline)
    assert statuses(result) == {"params_nonzero": "error", "task.classification": "ok"}
    assert result["baseline_kind"] == "run" and result["results"][0]["baseline"] == 300


def test_without_any_baseline_only_absolute_limits_work(tmp_path):
    current = fake_report(before=False)
    result = run_check(tmp_path, 'budgets:\n  params_total: {error: "1000"}\n', current)
    assert result["baseline_kind"] == "none" and statuses(result) == {"params_total": "ok"}
    with pytest.raises(UsageError, match=r"budgets.yaml:2: params_total.error: \+1% is relative but there is no "):
        run_check(tmp_path, 'budgets:\n  params_total: {error: "+1%"}\n', current)


# --- latency: the p25-p75 rule ---------------------------------------------------------------------------------------

LATENCY_CASES = [
    # row (speedup, p25, p75), limits, expected
    ((1.10, 1.00, 1.20), '{warn: "0.95x"}', "ok"),
    ((0.97, 0.90, 1.02), '{warn: "0.95x"}', "warn"),  # straddles the limit
    ((0.97, 0.90, 1.02), '{error: "0.95x", strict: true}', "warn"),  # straddles: noise, never an error
    ((0.80, 0.75, 0.85), '{error: "0.95x"}', "warn"),  # wholly beyond, not strict: warn only
    ((0.80, 0.75, 0.85), '{error: "0.95x", strict: true}', "error"),  # wholly beyond, strict: error
    ((0.80, 0.75, 0.85), '{error: "-5%", strict: true}', "error"),  # -5% is 0.95x
    ((1.50, 1.40, 1.60), '{warn: "1.2", error: "1.1x", strict: true}', "ok"),
]


@pytest.mark.parametrize(("row", "limits", "expected"), LATENCY_CASES)
def test_latency_errs_only_when_the_whole_range_is_beyond_a_strict_limit(tmp_path, row, limits, expected):
    current = fake_report(latency=[lat(*row), lat(2.0, 1.9, 2.1, "onnxruntime-cpu", 32)])
    result = run_check(tmp_path, f"budgets:\n  latency.pytorch-cpu.b1: {limits}\n", current)
    assert statuses(result) == {"latency.pytorch-cpu.b1": expected}, result["results"]
    assert result["exit_code"] == (3 if expected == "error" else 0)
    assert schema_problems(result) == []
    if expected == "warn" and row[2] > 0.95:
        assert "straddles" in result["results"][0]["note"]


# --- the budgets file -----------------------------------------------------------------------------------------------

FILE_ERRORS = [
    # budgets text, the line, the key, what the message says (including the closest valid name)
    ('budgets:\n  params_total: {error: "+0%"}\n  params_totl: {error: "+0%"}\n', 3, "params_totl",
     "unknown budget key; did you mean params_total?"),
    ('budgets:\n  params_total: {error: "+0%"}\n  bytes.spars: {error: "+1%"}\n', 3, "bytes.spars",
     "did you mean bytes.sparse?"),
    ('budgets:\n  params_total: {error: "200kB"}\n', 2, "params_total.error", "unit 'kB' does not fit a count"),
    ('budgets:\n\n  task.classification:\n    warn: "-0.5px"\n', 4, "task.classification.warn",
     "unit 'px' does not fit a task metric"),
    ('budgets:\n  bytes.onnx: {error: "+1%"}\n', 2, "bytes.onnx", "the runs have no such figure"),
    ('budgets:\n  task.segmentation: {error: "-1pt"}\n', 2, "task.segmentation", "did you mean task."),
    ('budgets:\n  latency.pytorch-cpu.b1: {warn: "0.9x"}\n', 2, "latency.pytorch-cpu.b1",
     "the runs have no such figure"),
    ('budgets:\n  params_total: !!python/object:os.system {error: "+0%"}\n', 2, "params_total",
     "YAML tag !!python/object:os.system is refused"),
    ('budgets:\n  params_total: {error: !!python/name:os.system ""}\n', 2, "error", "YAML tag"),
    ('budgets:\n  params_total: {error: "lots"}\n', 2, "params_total.error", "malformed limit 'lots'"),
    ('budgets:\n  params_total: {error: "2%"}\n', 2, "params_total.error", "a relative limit has a sign"),
    ('budgets:\n  params_total: {eror: "+2%"}\n', 2, "params_total.eror", "did you mean error?"),
    ('budgets:\n  params_total: {error: "+0%", strict: true}\n', 2, "params_total.strict", "unknown field"),
    ('budget:\n  params_total: {error: "+0%"}\n', 1, "budget", "did you mean budgets?"),
    ('budgets:\n  params_total: {error: "+0%"\n', 3, "", "not valid YAML"),
]


@pytest.mark.parametrize(("text", "line", "key", "says"), FILE_ERRORS)
def test_each_budgets_file_error_is_one_line_naming_file_line_and_key(runs, tmp_path, text, line, key, says):
    path = tmp_path / "budgets.yaml"
    path.write_text(text)
    result = RUNNER.invoke(app, ["check", str(runs["s90"]), "--budgets", str(path)])
    assert result.exit_code == 2, result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}:{line}: {key}"), lines[0]
    assert says in lines[0], lines[0]


def test_a_yaml_tag_never_runs(runs, tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr("os.system", lambda *a: called.append(a))
    path = tmp_path / "budgets.yaml"
    path.write_text('budgets:\n  params_total: !!python/object/apply:os.system ["echo owned"]\n')
    result = RUNNER.invoke(app, ["check", str(runs["s90"]), "--budgets", str(path)])
    assert result.exit_code == 2 and "is refused" in result.stderr and called == []


def test_missing_budgets_and_missing_run_are_usage_errors(runs, tmp_path):
    result = RUNNER.invoke(app, ["check", str(runs["s90"])])
    assert result.exit_code == 2 and "--budgets FILE is required" in result.stderr
    result = RUNNER.invoke(app, ["check", str(tmp_path / "nope"), "--budgets", str(tmp_path / "b.yaml")])
    assert result.exit_code == 2 and "no such run directory or report.json" in result.stderr


def test_written_budgets_load_back_and_pass_on_their_own_run(runs, tmp_path):
    path = tmp_path / "budgets.yaml"
    result = RUNNER.invoke(app, ["check", str(runs["s90"]), "--write-budgets", str(path)])
    assert result.exit_code == 0, result.output
    text = path.read_text()
    assert text.startswith("# Budgets written by `compress check --write-budgets`")
    budgets = yaml.safe_load(text)["budgets"]
    assert budgets["params_nonzero"] == {"error": str(check.load_report(runs["s90"])["model"]["after"]
                                                       ["params_nonzero"])}  # deterministic: tight
    assert set(budgets["task.classification"]) == {"warn", "error"}  # a small drop allowed
    checked = RUNNER.invoke(app, ["check", str(runs["s90"]), "--budgets", str(path), "--json", "--warn-as-error"])
    assert checked.exit_code == 0, checked.output
    result_json = json.loads(checked.stdout)
    assert result_json["counts"]["ok"] == len(budgets) == len(result_json["results"])
    again = RUNNER.invoke(app, ["check", str(runs["s90"]), "--write-budgets", str(path)])
    assert again.exit_code == 2 and "add --force" in again.stderr


def test_written_latency_budgets_are_loose_and_warn_only():
    report = fake_report(latency=[lat(1.5, 1.4, 1.6)])
    text = check.starting_budgets(report, "run")
    assert 'latency.pytorch-cpu.b1: {warn: "1.2x", strict: false}' in text
    known = check.quantities(report, None)
    outcomes = [check.check_budget(b, known[b.key]) for b in check.parse_budgets(text, "b.yaml", known)]
    assert {o.status for o in outcomes} == {"ok"}


# --- the CLI: exit codes, --warn-as-error, outputs ------------------------------------------------------------------

def write_report(tmp: Path, name: str, report: dict[str, Any]) -> Path:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(report))
    return path


def test_exit_codes_and_warn_as_error(tmp_path):
    current = write_report(tmp_path, "current", fake_report(sparse=2050, acc=89.0))
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text('budgets:\n  bytes.sparse: {warn: "+2%", error: "+5%"}\n')
    assert RUNNER.invoke(app, ["check", str(current), "--budgets", str(budgets)]).exit_code == 0  # warns only
    failed = RUNNER.invoke(app, ["check", str(current), "--budgets", str(budgets), "--warn-as-error", "--json"])
    assert failed.exit_code == 3
    printed = json.loads(failed.stdout)
    assert printed["status"] == "budget_failed" and printed["warn_as_error"] and schema_problems(printed) == []
    assert "(--warn-as-error)" in failed.stderr and "bytes.safetensors_sparse" in failed.stderr
    budgets.write_text('budgets:\n  bytes.sparse: {warn: "+2%"}\n  task.classification: {error: "-0.5pt"}\n')
    result = RUNNER.invoke(app, ["check", str(current), "--budgets", str(budgets)])
    assert result.exit_code == 3
    assert re.search(r"task\.classification.*ERROR: below the error limit 89\.5", result.stdout), result.stdout
    assert [x for x in result.stderr.splitlines() if x.strip()] == [
        (f"error: budgets exceeded: 1 error(s), 1 warning(s): task.classification; fix the regression, or change "
         f"the limit in {budgets} if it is intended")]


def test_markdown_comment_and_benchmark_json_parse(tmp_path):
    current = write_report(tmp_path, "current", fake_report(sparse=2050, acc=88.0, latency=[lat(0.97, 0.9, 1.02)]))
    baseline = write_report(tmp_path, "baseline", fake_report())
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text('budgets:\n  params_total: {error: "+0%"}\n  bytes.sparse: {warn: "+2%", error: "+5%"}\n'
                       '  task.classification: {warn: "-0.3pt", error: "-1pt"}\n  task.position: {error: "3.0"}\n'
                       '  latency.pytorch-cpu.b1: {warn: "0.95x"}\n')
    md, bench = tmp_path / "comment.md", tmp_path / "bench.json"
    result = RUNNER.invoke(app, ["check", str(current), "--baseline", str(baseline), "--budgets", str(budgets),
                                 "--markdown", str(md), "--benchmark-json", str(bench)])
    assert result.exit_code == 3, result.output  # the accuracy fell by 2 points
    lines = md.read_text().splitlines()
    assert lines[0] == check.MARKER == "<!-- compress-check -->"
    assert lines[1].startswith("### ❌ compress check FAILED: 5 budgets, 1 error(s), 2 warning(s)")
    table = [line for line in lines if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["budget", "baseline", "current", "change", "limit", "status"]
    assert re.fullmatch(r"\|(---\|){6}", table[1])
    rows = {cells[0]: cells for cells in ([c.strip() for c in row.strip("|").split("|")] for row in table[2:])}
    assert set(rows) == {"params_total", "bytes.safetensors_sparse", "task.classification", "task.position",
                         "latency.pytorch-cpu.b1"}
    assert all(len(cells) == 6 for cells in rows.values())
    assert rows["task.classification"][5].startswith("❌ error") and rows["bytes.safetensors_sparse"][3] == "+2.5%"
    assert rows["latency.pytorch-cpu.b1"][5].startswith("⚠️ warn: p25-p75 [0.9x, 1.02x] straddles")
    entries = json.loads(bench.read_text())
    assert isinstance(entries, list) and len(entries) == 5
    for entry in entries:
        assert set(entry) <= {"name", "unit", "value", "range", "extra"} and {"name", "unit", "value"} <= set(entry)
        assert isinstance(entry["name"], str) and isinstance(entry["value"], float) and isinstance(entry["extra"], str)
    named = {e["name"]: e for e in entries}
    assert named["task.classification (100 - accuracy)"]["value"] == pytest.approx(12.0)  # smaller is better
    assert named["task.position"]["value"] == pytest.approx(2.0) and named["task.position"]["unit"] == "pixel_error"
    timing = named["latency.pytorch-cpu.b1 time ratio"]
    assert timing["value"] == pytest.approx(1 / 0.97) and timing["range"].startswith("± ")
    assert named["bytes.safetensors_sparse"]["unit"] == "B"


def test_two_real_runs_end_to_end(runs, tmp_path):
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text('budgets:\n  params_total: {error: "+0%"}\n  params_nonzero: {warn: "-50%", error: "+0%"}\n'
                       '  macs: {error: "1.0x"}\n  macs_effective: {error: "+0%"}\n'
                       '  bytes.dense: {error: "+0B"}\n  bytes.sparse: {warn: "+2%", error: "+5%"}\n'
                       '  task.classification: {error: "-100pt"}\n')
    args = ["check", str(runs["s90"]), "--baseline", str(runs["s80"]), "--budgets", str(budgets)]
    table = RUNNER.invoke(app, args)
    assert table.exit_code == 0, table.output
    for column in ("budget", "baseline", "current", "change", "limit", "status"):
        assert column in table.stdout
    printed = json.loads(RUNNER.invoke(app, [*args, "--json"]).stdout)
    assert schema_problems(printed) == [] and printed["schema_version"] == SCHEMA_VERSION
    assert printed["method"] == "check" and printed["baseline_kind"] == "run" and printed["status"] == "ok"
    by_key = {row["budget"]: row for row in printed["results"]}
    assert by_key["params_nonzero"]["current"] < by_key["params_nonzero"]["baseline"]  # 90% < 80% kept
    assert by_key["params_nonzero"]["status"] == "warn"  # asked to halve, it fell by less (788 -> 419): a warning
    reverse = RUNNER.invoke(app, ["check", str(runs["s80"]), "--baseline", str(runs["s90"]), "--budgets",
                                  str(budgets), "--json"])
    assert reverse.exit_code == 3  # the 80% run has more nonzero parameters and sparse bytes than the 90% one
    failed = json.loads(reverse.stdout)
    assert schema_problems(failed) == [] and failed["status"] == "budget_failed" and failed["exit_code"] == 3
    assert {r["budget"] for r in failed["results"] if r["status"] == "error"} >= {"params_nonzero", "macs_effective"}


def test_api_check_and_report_json_path(runs, tmp_path):
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text('budgets:\n  params_nonzero: {error: "+0%"}\n')
    result = api.check(runs["s90"] / "report.json", budgets)
    assert result["baseline_kind"] == "origin" and result["exit_code"] == 0  # pruned: fewer than its origin
    broken = copy.deepcopy(result)
    broken["status"] = "ok"
    broken["exit_code"] = 3
    assert schema_problems(broken) != []  # status and exit code must agree


def test_checking_two_runs_does_not_import_torch(runs, tmp_path):
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text('budgets:\n  params_total: {error: "+0%"}\n')
    probe = ("import sys\nfrom typer.testing import CliRunner\nfrom compress.cli import app\n"
             "r = CliRunner().invoke(app, sys.argv[1:])\nassert r.exit_code == 0, r.output\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH')\n")
    done = subprocess.run([sys.executable, "-c", probe, "check", str(runs["s90"]), "--baseline", str(runs["s80"]),
                           "--budgets", str(budgets), "--markdown", str(tmp_path / "c.md")],
                          capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("NO_TORCH")


# ------------------------------------------------------------------- model specs and latency timed by check itself

def test_a_model_spec_is_measured_by_check(runs, tmp_path):
    """CURRENT as a run, BASELINE as the spec it was pruned from: check measures the spec (params, nonzero and the
    test accuracy, recomputed here independently) and compares."""
    from compress.finetune import evaluate
    from compress.models import load_model
    from compress.pipeline import load_data_for, seed_everything

    budgets = tmp_path / "budgets.yaml"
    budgets.write_text('budgets:\n  params_total: {error: "+0%"}\n  params_nonzero: {error: "-85%"}\n'
                       '  task.classification: {error: "-100pt"}\n')
    done = RUNNER.invoke(app, ["check", str(runs["s90"]), "--baseline", TINY_SPEC, "--data", "digits",
                               "--budgets", str(budgets), "--json"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert schema_problems(result) == [] and result["baseline_kind"] == "run"
    rows = {r["budget"]: r for r in result["results"]}
    seed_everything(0)
    origin = load_model(TINY_SPEC)
    model = origin.model.eval()
    splits = load_data_for(origin, "digits", 0)
    assert rows["params_total"]["baseline"] == sum(p.numel() for p in model.parameters())
    assert rows["params_nonzero"]["baseline"] == sum(int(p.count_nonzero()) for p in model.parameters())
    assert rows["task.classification"]["baseline"] == pytest.approx(evaluate(model, splits.test).accuracy, abs=1e-3)
    # the run pruned 90%: against the spec's own count, -85% holds and -95% does not
    budgets.write_text('budgets:\n  params_nonzero: {error: "-95%"}\n')
    stricter = RUNNER.invoke(app, ["check", str(runs["s90"]), "--baseline", TINY_SPEC, "--data", "digits",
                                   "--budgets", str(budgets)])
    assert stricter.exit_code == 3, stricter.output


def test_check_times_two_models_at_hand_itself(runs, tmp_path):
    """Both runs were made without latency: a latency budget can only be met by check's own interleaved timing,
    and an impossible strict limit (100x faster) must err on its p25-p75 range."""
    assert not json.loads((runs["s90"] / "report.json").read_text()).get("latency")
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text('budgets:\n  latency.pytorch-cpu.b1: {warn: "0.01x"}\n')
    args = ["check", str(runs["s90"]), "--baseline", str(runs["s80"]), "--data", "digits", "--latency-runs", "9"]
    done = RUNNER.invoke(app, [*args, "--budgets", str(budgets), "--json"])
    assert done.exit_code == 0, done.output
    row = json.loads(done.stdout)["results"][0]
    low, high = row["spread"]
    assert 0.2 < low <= row["current"] <= high < 5  # the same architecture, a masked copy: about as fast
    budgets.write_text('budgets:\n  latency.pytorch-cpu.b1: {error: "100x", strict: true}\n')
    failed = RUNNER.invoke(app, [*args, "--budgets", str(budgets)])
    assert failed.exit_code == 3 and "latency.pytorch-cpu.b1" in failed.output


def test_check_refuses_a_tampered_run_and_misplaced_weights(runs, tmp_path):
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text('budgets:\n  params_total: {error: "+0%"}\n')
    tampered = tmp_path / "tampered"
    shutil.copytree(runs["s90"], tampered)
    weights = tampered / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    refused = RUNNER.invoke(app, ["check", str(tampered), "--budgets", str(budgets)])
    assert refused.exit_code == 5 and "model.safetensors" in refused.output and "Traceback" not in refused.output
    assert RUNNER.invoke(app, ["check", str(tampered), "--budgets", str(budgets), "--no-verify"]).exit_code == 0
    misplaced = RUNNER.invoke(app, ["check", str(runs["s90"]), "--weights", str(weights), "--budgets", str(budgets)])
    assert misplaced.exit_code == 2 and "model spec only" in misplaced.output
    missing = RUNNER.invoke(app, ["check", str(tmp_path / "nowhere"), "--budgets", str(budgets)])
    assert missing.exit_code == 2 and "no such run directory" in missing.output
