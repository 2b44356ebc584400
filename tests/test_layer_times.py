"""Where the time goes: per-layer latency from real ONNX Runtime sessions and real PyTorch hooks, traced back to
the model's modules, and `compress measure` writing the table into report.json, report.md and report.html."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from jsonschema import Draft202012Validator
from torch import nn
from typer.testing import CliRunner

from compress import export
from compress.cli import app
from compress.data.datasets import FASHION_MNIST_DIRS, FASHION_MNIST_FILES
from compress.measure.backends import (
    MOBILE_PROXY,
    ONNXRUNTIME_CPU,
    PYTORCH_CPU,
    LatencySettings,
    measure_backends,
    mobile_proxy_model,
)
from compress.measure.layer_times import (
    FORWARD_HOOKS,
    ORT_PROFILER,
    RUNTIME_SUFFIX,
    TOP_LEVEL,
    LayerProfile,
    LayerTable,
    OnnxNames,
    OrtModel,
    _module_path,
    _profiling_session,
    _source_onnx,
    layer_table,
    measure_layer_times,
    module_macs,
    onnxruntime_samples,
    pytorch_samples,
    summarise,
)
from compress.report.schema import report_schema
from tests.conftest import TINY_SPEC

# Rows are medians taken one by one, so they add up to the median whole run only within the noise of two shared
# cores; 20% (plus 20 us for runs of a fraction of a millisecond) holds with room on this machine.
TOTAL_TOLERANCE, TOTAL_SLACK_MS = 0.20, 0.02
SHARE_TOLERANCE = 1e-3  # report.json rounds each share to 5 decimals
RUNS = 5


class HugeLayer(nn.Module):
    """Two cheap 1x1 convolutions around one 5x5 convolution with 30,000 times their MACs."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Conv2d(3, 8, 1)
        self.huge = nn.Conv2d(8, 256, 5, padding=2)
        self.tail = nn.Sequential(nn.ReLU(), nn.Conv2d(256, 4, 1))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tail(self.huge(torch.relu(self.small(x)))).mean((2, 3)))


def huge_layer() -> HugeLayer:
    """A HugeLayer with seed-0 weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return HugeLayer().eval()


def rows(profile: LayerProfile) -> dict[str, float]:
    """Layer name -> median ms."""
    return {layer.name: layer.ms for layer in profile.layers}


def assert_adds_up(profile: LayerProfile) -> None:
    """Times non-negative; the rows add up to the whole run within the stated tolerance."""
    assert profile.total_ms > 0 and profile.unattributed_ms >= 0
    assert all(layer.ms >= 0 for layer in profile.layers)
    assert abs(profile.rows_ms - profile.total_ms) <= TOTAL_TOLERANCE * profile.total_ms + TOTAL_SLACK_MS, \
        (profile.rows_ms, profile.total_ms)


def assert_shares_sum_to_one(table: dict) -> None:
    """Time and MACs shares over the shown layers, everything else and the remainder each sum to 1."""
    for key in ("time_share", "macs_share"):
        total = sum(r[key] for r in table["layers"]) + table["other"][key] + table["unattributed"][key]
        assert total == pytest.approx(1.0, abs=SHARE_TOLERANCE), key


def ort_profile(model: nn.Module, x: torch.Tensor, tmp_path: Path) -> LayerProfile:
    """The model exported to ONNX and profiled by ONNX Runtime, rows traced back to its modules."""
    path = export.export_onnx(model, x, tmp_path / "model.onnx")
    [samples] = onnxruntime_samples([OrtModel(path, OnnxNames.load(path), {n for n, _ in model.named_modules()})],
                                    x.numpy(), threads=1, runs=RUNS, warmup=1, workdir=tmp_path / "profiles")
    return summarise(samples, *module_macs(model, x), backend=ONNXRUNTIME_CPU, batch=x.shape[0], threads=1,
                     method=ORT_PROFILER)


def torch_profile(model: nn.Module, x: torch.Tensor) -> LayerProfile:
    """The model profiled with forward hooks on the CPU."""
    [samples] = pytorch_samples([model], x, device=torch.device("cpu"), threads=1, runs=RUNS, warmup=1)
    return summarise(samples, *module_macs(model, x), backend=PYTORCH_CPU, batch=x.shape[0], threads=1,
                     method=FORWARD_HOOKS)


# --- names ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("node", "path"), [
    ("/blocks/blocks.0/conv1/Conv", "blocks.0.conv1"),
    ("/blocks/blocks.0/shortcut/shortcut.0/Conv", "blocks.0.shortcut.0"),
    ("/features/features.0/features.0.0/Conv", "features.0.0"),  # a Sequential inside a Sequential
    ("/fc/Gemm", "fc"),
    ("/Flatten", ""),  # the model's own forward
    ("onnx::Conv_98_DequantizeLinear", None),  # no scope: not a module
])
def test_torchscript_node_names_give_module_paths(node, path):
    assert _module_path(node, None) == path


def test_a_scope_deeper_than_the_model_falls_back_to_its_deepest_module():
    assert _module_path("/blocks/blocks.0/Relu", {"", "blocks", "blocks.0"}) == "blocks.0"
    assert _module_path("/blocks/blocks.0/Add", {""}) == ""


def test_module_macs_are_each_modules_own_and_add_up(tiny_model):
    x = torch.zeros(1, 1, 8, 8)
    own, total = module_macs(tiny_model, x)
    assert total > 0 and sum(own.values()) == total
    convs = [name for name, m in tiny_model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert all(own[name] > 0 for name in convs)
    assert own.get("features", 0) == 0 and own.get(TOP_LEVEL, 0) == 0  # containers own no MACs


def test_the_profiling_session_is_the_timed_session_with_the_profiler_on(tiny_model, tmp_path):
    path = export.export_onnx(tiny_model, torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx")
    timed = export.ort_session(path, threads=2).get_session_options()
    profiled_session = _profiling_session(path, threads=2, prefix=tmp_path / "p")
    profiled = profiled_session.get_session_options()
    for key in ("intra_op_num_threads", "inter_op_num_threads", "execution_mode", "graph_optimization_level",
                "log_severity_level"):
        assert getattr(profiled, key) == getattr(timed, key), key
    spin = "session.intra_op.allow_spinning"
    assert profiled.get_session_config_entry(spin) == timed.get_session_config_entry(spin) == "0"
    assert profiled.enable_profiling and not timed.enable_profiling
    Path(profiled_session.end_profiling()).unlink()


# --- ONNX Runtime -----------------------------------------------------------------------------------------------


def test_onnxruntime_rows_name_the_models_modules_and_add_up(tiny_model, tmp_path):
    x = torch.randn(4, 1, 8, 8)
    profile = ort_profile(tiny_model, x, tmp_path)
    modules = {name for name, _ in tiny_model.named_modules()}
    names = rows(profile)
    # every Conv and the Linear is a row under its module path; BatchNorm and ReLU are fused into the Conv
    assert {"features.0", "features.3", "features.6", "fc"} <= names.keys()
    # ... and anything else is a node ONNX Runtime added (the NCHWc layout's reorder back), marked as such
    assert all(name in modules or name == TOP_LEVEL or name.endswith(RUNTIME_SUFFIX) for name in names), names
    assert_adds_up(profile)
    table = layer_table(profile, top=2).to_dict()
    assert len(table["layers"]) == 2 and table["other"]["layers"] == len(profile.layers) - 2
    assert_shares_sum_to_one(table)
    assert table["layers"][0]["ms"] >= table["layers"][1]["ms"]


def test_the_mobile_proxys_int8_nodes_are_grouped_under_their_layers(tiny_model, tmp_path):
    x = torch.randn(1, 1, 8, 8)
    ort_file = mobile_proxy_model(tiny_model, x, torch.randn(32, 1, 8, 8), tmp_path / "mobile")
    source = _source_onnx(ort_file)
    assert source is not None and source.name.endswith(".int8.onnx")
    modules = {n for n, _ in tiny_model.named_modules()}
    [samples] = onnxruntime_samples([OrtModel(ort_file, OnnxNames.load(source), modules)], x.numpy(), threads=1,
                                    runs=RUNS, warmup=1, workdir=tmp_path / "p")
    profile = summarise(samples, *module_macs(tiny_model, x), backend=MOBILE_PROXY, batch=1, threads=1,
                        method=ORT_PROFILER)
    names = rows(profile)
    # the Q/DQ pairs of the input, the weights and every activation join the layer they quantise
    assert not [name for name in names if "QuantizeLinear" in name or name.startswith("onnx::")], names
    assert {"features.0", "features.3", "features.6", "fc"} <= names.keys()
    assert_adds_up(profile)


def test_a_huge_layer_comes_first_on_onnxruntime(tmp_path):
    profile = ort_profile(huge_layer(), torch.randn(2, 3, 32, 32), tmp_path)
    first = profile.layers[0]
    assert first.name == "huge" and first.op == "Conv"
    table = layer_table(profile).to_dict()
    assert table["layers"][0]["time_share"] > 0.5 and table["layers"][0]["macs_share"] > 0.9


# --- PyTorch ----------------------------------------------------------------------------------------------------


def test_pytorch_rows_are_every_modules_own_time_and_add_up(tiny_model):
    profile = torch_profile(tiny_model, torch.randn(4, 1, 8, 8))
    names = rows(profile)
    leaves = {name for name, m in tiny_model.named_modules() if not list(m.children())}
    assert leaves <= names.keys() and TOP_LEVEL in names
    assert "features" not in names  # a plain Sequential only calls its children: not timed on its own
    assert_adds_up(profile)
    assert_shares_sum_to_one(layer_table(profile, top=3).to_dict())
    ops = {layer.name: layer.op for layer in profile.layers}
    assert ops["features.0"] == "Conv2d" and ops[TOP_LEVEL] == "TinyCNN"


def test_a_huge_layer_comes_first_on_pytorch():
    profile = torch_profile(huge_layer(), torch.randn(2, 3, 32, 32))
    assert profile.layers[0].name == "huge"
    assert "tail" not in rows(profile) and "tail.1" in rows(profile)


def test_a_module_called_twice_counts_both_calls_once():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.conv(x))

    model = Twice().eval()
    x = torch.randn(1, 4, 16, 16)
    [samples] = pytorch_samples([model], x, device=torch.device("cpu"), threads=1, runs=RUNS, warmup=1)
    for run, total in zip(samples.runs, samples.totals):
        assert run["conv"] > 0 and run[TOP_LEVEL] >= 0 and sum(run.values()) <= total


# --- every backend, beside a baseline ---------------------------------------------------------------------------


def test_measure_layer_times_pairs_the_model_with_its_baseline(tiny_model, tmp_path):
    settings = LatencySettings(backends=(PYTORCH_CPU, ONNXRUNTIME_CPU), batches=(1,), runs=RUNS, warmup=1)
    baseline = huge_layer()  # another model entirely: only the names both have are compared
    candidate = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
    inputs = torch.randn(4, 3, 16, 16)
    tables = measure_layer_times(candidate, baseline, inputs, inputs, settings, tmp_path, top=2)
    assert [(t.backend, t.model) for t in tables] == [(PYTORCH_CPU, "candidate"), (PYTORCH_CPU, "baseline"),
                                                      (ONNXRUNTIME_CPU, "candidate"), (ONNXRUNTIME_CPU, "baseline")]
    # profiled interleaved: every table has all its runs
    assert all(isinstance(t, LayerTable) and len(t.layers) <= 2 and t.runs == RUNS for t in tables)
    assert all(row.baseline_ms is None for t in tables for row in t.layers)  # no layer name in common
    same = measure_layer_times(baseline, huge_layer(), inputs, inputs, settings, tmp_path / "same")
    assert all(row.baseline_ms is not None for row in same[0].layers)


def test_the_files_measure_backends_timed_are_profiled_not_built_again(tiny_model, tmp_path):
    settings = LatencySettings(backends=(ONNXRUNTIME_CPU, MOBILE_PROXY), batches=(1,), runs=2, warmup=1)
    inputs = torch.randn(8, 1, 8, 8)
    measure_backends(tiny_model, tiny_model, inputs, inputs, settings, tmp_path)
    models = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.suffix in (".onnx", ".ort")}
    tables = measure_layer_times(tiny_model, None, inputs, inputs, settings, tmp_path)
    assert [t.backend for t in tables] == [ONNXRUNTIME_CPU, MOBILE_PROXY]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.suffix in (".onnx", ".ort")} == models


# --- compress measure -------------------------------------------------------------------------------------------


def fashion_mnist_installed() -> bool:
    """Whether Fashion-MNIST is on disk already (the test must not download it)."""
    return any(all((folder / name).exists() for name in FASHION_MNIST_FILES.values())
               for folder in FASHION_MNIST_DIRS)


requires_fashion = pytest.mark.skipif(not fashion_mnist_installed(), reason="Fashion-MNIST is not installed "
                                      "(apt-get install dataset-fashion-mnist, or `make data`)")


def check_run(out: Path, backends: set[str]) -> dict:
    """report.json validates against the schema and holds a table per backend; report.md and .html show them."""
    report = json.loads((out / "report.json").read_text())
    errors = [error.message for error in Draft202012Validator(report_schema()).iter_errors(report)]
    assert not errors, errors
    tables = report["layer_latency"]
    assert {t["backend"] for t in tables} == backends
    for table in tables:
        assert table["layers"] and table["model"] == "candidate"
        assert_shares_sum_to_one(table)
    slowest = tables[0]["layers"][0]["name"]
    markdown, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "## Where the time goes (per layer)" in markdown and f"| {slowest} |" in markdown
    assert 'id="layer-latency"' in html and f"<td>{slowest}</td>" in html
    return report


@requires_fashion
def test_compress_measure_rescnn_shows_where_the_time_goes(tmp_path):
    out = tmp_path / "m"
    backends = (PYTORCH_CPU, ONNXRUNTIME_CPU, MOBILE_PROXY)
    args = ["measure", "rescnn", "--out", str(out), "--batch", "1", "--runs", "3", "--warmup", "1"]
    result = CliRunner(env={"NO_COLOR": "1", "CI": "1"}).invoke(app, [*args, *(a for b in backends
                                                                              for a in ("--backend", b))])
    assert result.exit_code == 0, result.output
    report = check_run(out, set(backends))
    assert {t["method"] for t in report["layer_latency"]} == {FORWARD_HOOKS, ORT_PROFILER}
    assert "Where the time goes, pytorch-cpu · batch 1" in result.stdout
    assert "blocks.0.conv1" in result.stdout and "unattributed" in result.stdout


@pytest.mark.slow
@requires_fashion
def test_compress_measure_rescnn_with_every_default(tmp_path):
    out = tmp_path / "m"
    result = CliRunner(env={"NO_COLOR": "1", "CI": "1"}).invoke(app, ["measure", "rescnn", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = check_run(out, {row["backend"] for row in report_latency(out)})
    assert {t["batch"] for t in report["layer_latency"]} == {1, 32}


def report_latency(out: Path) -> list[dict]:
    """report.json's latency rows."""
    return json.loads((out / "report.json").read_text())["latency"]


def test_no_layer_table_leaves_it_out(tmp_path):
    out = tmp_path / "m"
    result = CliRunner(env={"NO_COLOR": "1", "CI": "1"}).invoke(
        app, ["measure", TINY_SPEC, "--data", "digits", "--backend", "pytorch-cpu", "--batch", "1", "--runs", "2",
              "--warmup", "1", "--no-layer-table", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert "layer_latency" not in report and "Where the time goes" not in result.stdout
    assert "Where the time goes" not in (out / "report.md").read_text()
    assert report["stages"][-1]["config"]["layer_table"] is False
