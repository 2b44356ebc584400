"""PAGCP: λ, unit discovery and order, the per-task oracle's bounds, top-P, MACs targets, physical removal,
artifacts and the CLI (METHODS.md §2 invariants), on tiny seeded models trained for seconds on digits."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from compress import api
from compress.cli import app
from compress.config import FinetuneConfig, PAGCPConfig
from compress.errors import UsageError
from compress.finetune import evaluate, train
from compress.measure import count_macs, count_params
from compress.methods import METHODS, Context
from compress.methods.pagcp import (
    Oracle,
    build_graph,
    grid,
    prune_unit,
    removable,
    saliency,
    select,
    solve_lambda,
)
from compress.models import build_from_arch, load_model
from compress.models.multitask import MTNet
from tests.factories import tiny_cnn

MT_SPEC = "tests.test_pagcp:tiny_mtnet"
WORKED = [(0.06, 51, 6.0, 0.97739), (0.05, 51, 5.0, 0.98085), (0.06, 40, 6.0, 0.98558), (0.05, 80, 5.0, 0.97271),
          (0.05, 20, 5.0, 1.05159)]


def tiny_mtnet(num_classes: int = 10, seed: int = 0) -> MTNet:
    """MTNet with widths (8, 16, 16) and seeded weights (24x24 digits-canvas inputs)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MTNet(num_classes=num_classes, widths=(8, 16, 16)).eval()


@pytest.fixture(scope="session")
def canvas():
    from compress.data import load_dataset

    return load_dataset("digits-canvas")


@pytest.fixture(scope="session")
def trained_mt(canvas) -> MTNet:
    """tiny_mtnet after 5 quick epochs on digits-canvas (about 10 s on one thread)."""
    model = tiny_mtnet()
    train(model, canvas, FinetuneConfig(epochs=5, lr=0.05, batch_size=32, label_smoothing=0.0, weight_decay=0.0),
          device=torch.device("cpu"))
    return model.eval()


@pytest.fixture(scope="session")
def trained_cnn(digits) -> nn.Module:
    model = tiny_cnn()
    train(model, digits, FinetuneConfig(epochs=4, lr=0.05, batch_size=32, augment=False),
          device=torch.device("cpu"))
    return model.eval()


def run(model: nn.Module, splits, **cfg) -> tuple[nn.Module, object]:
    pruned = copy.deepcopy(model)
    result = METHODS["pagcp"].apply(pruned, PAGCPConfig(**cfg), Context(splits.test.x[:1], splits,
                                                                         tasks=splits.tasks))
    return pruned, result


@pytest.fixture(scope="session")
def searched(trained_mt, canvas):
    """One search with the geometric schedule (λ > 1 for 9 units) and top-P = 1."""
    return run(trained_mt, canvas, delta0=0.05, tau=5.0, exp=True)


# ------------------------------------------------------------------------------------------------------ λ


@pytest.mark.parametrize(("delta0", "units", "tau", "expected"), WORKED)
def test_lambda_worked_values(delta0, units, tau, expected):
    lam = solve_lambda(delta0, tau, units)
    assert lam == pytest.approx(expected, abs=1e-4)
    assert math.prod(1 + delta0 * lam ** i for i in range(units)) == pytest.approx(tau, rel=1e-9)


def test_lambda_edge_cases():
    assert solve_lambda(0.05, 5.0, 1) == 1.0
    assert solve_lambda(5.0, 2.0, 10) == 0.0  # the first unit alone may use the whole budget


# ------------------------------------------------------------------------------------------------ units


def test_units_heads_and_ignore(trained_mt, canvas):
    graph = build_graph(copy.deepcopy(trained_mt), canvas.test.x[:1])
    assert sorted(graph.heads) == ["classifier", "mask_out", "position_out"]
    names = {u.name for u in graph.units}
    residual = next(u for u in graph.units if "layer3.conv2" in u.members)
    assert {"layer2.conv2", "layer2.shortcut.0", "layer3.conv2", "layer2.bn2", "layer3.bn2"} <= set(residual.members)
    assert "classifier" in residual.consumers  # heads' inputs shrink
    assert not names & {"classifier", "mask_out", "position_out"}
    ignored = build_graph(copy.deepcopy(trained_mt), canvas.test.x[:1], ignore=("layer1.*",))
    assert "layer1.conv1" in ignored.ignored
    assert all(not any(m.startswith("layer1.") for m in u.members) for u in ignored.units)


def test_classifier_head_detected(trained_cnn, digits):
    graph = build_graph(copy.deepcopy(trained_cnn), digits.test.x[:1])
    assert graph.heads == ["fc"]
    assert sorted(u.name for u in graph.units) == ["features.0", "features.3", "features.6"]


def test_units_come_in_probe_order(trained_mt, canvas, searched):
    _, result = searched
    assert result.summary["lambda"] > 1
    contributions = [row["macs_contribution"] for row in sorted(result.layers, key=lambda r: r["order"])]
    assert contributions == sorted(contributions)  # λ > 1: ascending
    _, flat = run(trained_mt, canvas, delta0=0.05, tau=5.0, exp=False, max_units=3)
    assert flat.summary["lambda"] == 1.0
    desc = [row["macs_contribution"] for row in sorted(flat.layers, key=lambda r: r["order"])]
    assert desc == sorted(desc, reverse=True) and len(desc) == 3
    # each contribution is the MACs removed by cutting 30% of the unit's channels, counted afresh
    model = copy.deepcopy(trained_mt)
    graph = build_graph(model, canvas.test.x[:1])
    total = count_macs(model, canvas.test.x[:1]).macs
    for unit in graph.units[:3]:
        undo = prune_unit(graph, unit, select(saliency(graph, unit), int(0.3 * unit.channels)))
        macs = count_macs(model, canvas.test.x[:1]).macs
        undo()
        row = next(r for r in result.layers if r["name"] == unit.name)
        assert row["macs_contribution"] == total - macs
    assert count_macs(model, canvas.test.x[:1]).macs == total  # probes leave the model as it was


# ----------------------------------------------------------------------------------------------- oracle


def _replay_states(model, splits, result, cfg):
    """Replay the search unit by unit on a copy: losses after each, with the running baseline before it."""
    work = copy.deepcopy(model).eval()
    graph = build_graph(work, splits.test.x[:1])
    units = {u.name: u for u in graph.units}
    calibration = splits.calibration.subset(cfg.calibration_items)
    oracle = Oracle(calibration.x, calibration.y, splits.tasks)
    base = oracle.losses(work)
    l0 = base.copy()
    steps = []
    for row in sorted(result.layers, key=lambda r: r["order"]):
        unit = units[row["name"]]
        n = unit.channels - row["channels_after"]
        if row["veto_ratio"] is not None and row["veto_reason"] in ("delta", "tau"):
            vetoed = removable(unit, row["veto_ratio"], cfg.round_to)
            undo = prune_unit(graph, unit, select(saliency(graph, unit), vetoed, unit.chunks))
            vetoed_losses = oracle.losses(work)
            undo()
        else:
            vetoed_losses = None
        before = base.copy()
        if n:
            prune_unit(graph, unit, select(saliency(graph, unit), n, unit.chunks))
            losses = oracle.losses(work)
            base = np.maximum(base, losses)
        else:
            losses = None
        steps.append((row, before, losses, vetoed_losses))
    return steps, l0, work


def test_every_accepted_unit_within_delta_and_largest_ratio(trained_mt, canvas, searched):
    pruned, result = searched
    cfg = PAGCPConfig(delta0=0.05, tau=5.0, exp=True)
    steps, l0, work = _replay_states(trained_mt, canvas, result, cfg)
    accepted = 0
    for row, before, losses, vetoed in steps:
        if losses is not None:
            accepted += 1
            assert (losses / before).max() <= 1 + row["delta"] + 1e-9, row["name"]
            assert row["ratio"] == max(r for r in grid(cfg.step) if r <= row["ratio"])
        if row["all_pass"]:
            assert row["ratio"] == grid(cfg.step)[-1] and row["vetoed_by"] is None
        elif vetoed is not None:  # the next grid value fails the oracle, for the task the log names
            assert row["veto_ratio"] == pytest.approx(row["searched_ratio"] + cfg.step if row["searched_ratio"]
                                                      else cfg.step)
            rises = vetoed / before  # the baseline moves only once the unit is accepted
            assert rises.max() > 1 + row["delta"] or (vetoed / l0).max() > cfg.tau
            names = [t.name for t in canvas.tasks]
            assert row["vetoed_by"] in names
    assert accepted >= 3
    with torch.no_grad():  # the replay is the searched model
        x = canvas.test.x[:8]
        assert all(torch.equal(a, b) for a, b in zip(work(x), pruned(x)))


def test_final_loss_within_tau(trained_mt, canvas, searched):
    pruned, result = searched
    calibration = canvas.calibration.subset(512)
    oracle = Oracle(calibration.x, calibration.y, canvas.tasks)
    final, original = oracle.losses(pruned), oracle.losses(trained_mt)
    assert (final / original).max() <= 5.0
    assert result.summary["tau_bound_ok"]
    assert result.summary["losses_after"]["class"] == pytest.approx(final[0])
    assert result.summary["macs_keep"] < 0.95  # it did prune


def test_params_and_macs_equal_the_counter(canvas, searched):
    pruned, result = searched
    x = canvas.test.x[:1]
    assert result.summary["macs_after"] == count_macs(pruned, x).macs
    assert result.summary["params_after"] == count_params(pruned).total
    assert result.summary["params_after"] < result.summary["params_before"]
    modules = dict(pruned.named_modules())
    for row in result.layers:  # channels physically gone, norms sliced with their convolutions
        for member in row["members"]:
            module = modules[member]
            width = module.out_channels if isinstance(module, nn.Conv2d) else module.num_features
            assert width == row["channels_after"], member
    assert pruned.classifier.out_features == 10 and pruned.mask_out.out_channels == 1


def test_top_p_keeps_smallest_scores(trained_mt, canvas):
    _, result = run(trained_mt, canvas, delta0=0.05, tau=5.0, exp=True, top_p=0.5)
    rows = result.layers
    keep = math.floor(0.5 * len(rows))
    scored = sorted((r for r in rows if r["score"] is not None), key=lambda r: (r["score"], r["order"]))
    assert {r["name"] for r in rows if r["selected"]} == {r["name"] for r in scored[:keep]}
    for row in rows:
        if not row["selected"]:
            assert row["channels_after"] == row["channels_before"] and row["ratio"] == 0.0


def test_round_to_gives_multiples(trained_mt, canvas):
    _, result = run(trained_mt, canvas, delta0=0.2, tau=50.0, round_to=4)
    for row in result.layers:
        assert row["channels_after"] == row["channels_before"] or row["channels_after"] % 4 == 0, row


def test_macs_target_is_reached(trained_mt, canvas):
    pruned, result = run(trained_mt, canvas, delta0=0.05, tau=5.0, exp=True, macs_target=0.5, macs_tolerance=0.03)
    summary = result.summary
    assert summary["target_met"]
    assert abs(summary["macs_keep"] - 0.5) <= 0.03
    assert summary["macs_after"] == count_macs(pruned, canvas.test.x[:1]).macs
    assert sum(r["chosen"] for r in summary["rounds"]) == 1


def test_single_task_classifier(trained_cnn, digits):
    pruned, result = run(trained_cnn, digits, delta0=0.1, tau=5.0)
    assert set(result.summary["losses_before"]) == {"classification"}
    assert pruned.fc.out_features == 10
    assert pruned(digits.test.x[:2]).shape == (2, 10)
    assert result.summary["loss_ratios"]["classification"] <= 5.0


def test_channel_transform_rebuilds_exactly(canvas, searched):
    pruned, result = searched
    arch = {"kind": "factory", "target": MT_SPEC, "kwargs": {}, "transforms": result.transforms}
    rebuilt = build_from_arch(arch).eval()
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    with torch.no_grad():
        x = canvas.test.x[:16]
        assert all(torch.equal(a, b) for a, b in zip(rebuilt(x), pruned(x)))


def test_progress_and_summary(trained_cnn, digits):
    seen = []
    cfg = PAGCPConfig(delta0=0.1, max_units=2)
    METHODS["pagcp"].apply(copy.deepcopy(trained_cnn), cfg, Context(digits.test.x[:1], digits,
                                                                    progress=lambda d, i, n: seen.append((d, i, n))))
    assert ("pagcp: searching units", 2, 2) in seen
    assert any(d == "pagcp: probing units" for d, _, _ in seen)


# --------------------------------------------------------------------------------------- end to end, CLI


def test_api_prune_round_trip_and_task_table(trained_mt, tmp_path):
    weights = tmp_path / "mt.pt"
    torch.save(trained_mt.state_dict(), weights)
    out = tmp_path / "run"
    report = api.prune(api.ModelSource(spec=MT_SPEC, weights=str(weights)),
                       PAGCPConfig(delta0=0.05, tau=5.0, exp=True),
                       api.RunOptions(out=out, data="digits-canvas", latency=False, command="test"))
    assert set(report["tasks"]) == {"class", "mask", "position"}
    assert report["tasks"]["position"]["higher_is_better"] is False
    assert report["tasks"]["mask"]["metric"] == "iou"
    assert report["status"] == "ok" and report["layers"][0]["channels_before"] > 0
    loaded = load_model(str(out))
    from compress.data import load_dataset

    splits = load_dataset("digits-canvas")
    again = evaluate(loaded.model, splits.test)
    for name, row in report["tasks"].items():
        assert round(again.metrics[name], 4) == row["after_compression"]
    assert report["model"]["after"]["macs"] == count_macs(loaded.model, splits.test.x[:1]).macs
    md = (out / "report.md").read_text()
    assert "| position | pixel_error" in md
    assert "| order | unit | channels before | channels after | ratio | MACs contribution | δ_i | vetoed by" in md
    first = min(report["layers"], key=lambda row: row["order"])
    assert f"| {first['order']} | {first['name']} | {first['channels_before']} | {first['channels_after']} |" in md


def test_alds_after_pagcp_rebuilds_weights_only(trained_mt, tmp_path):
    """Channel pruning then low rank (METHODS.md: the composition ALDS after PAGCP): both transforms replay."""
    from compress.config import ALDSConfig
    from compress.data import load_dataset

    weights = tmp_path / "mt.pt"
    torch.save(trained_mt.state_dict(), weights)
    options = {"data": "digits-canvas", "latency": False, "command": "test"}
    api.prune(api.ModelSource(spec=MT_SPEC, weights=str(weights)), PAGCPConfig(macs_target=0.6),
              api.RunOptions(out=tmp_path / "pagcp", **options))
    report = api.prune(api.ModelSource(spec=str(tmp_path / "pagcp")), ALDSConfig(keep=0.5),
                       api.RunOptions(out=tmp_path / "alds", **options))
    assert report["status"] == "ok"
    loaded = load_model(str(tmp_path / "alds"))
    kinds = [t["type"] for t in loaded.arch["transforms"]]
    assert kinds[0] == "channels" and set(kinds[1:]) == {"lowrank"}
    again = evaluate(loaded.model, load_dataset("digits-canvas").test)
    for name, row in report["tasks"].items():
        assert round(again.metrics[name], 4) == row["after_compression"]


def test_cli_dry_run_lists_units_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    result = CliRunner().invoke(app, ["prune", "--method", "pagcp", "--model", MT_SPEC, "--data", "digits-canvas",
                                      "--dry-run", "--ignore", "mask_*", "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert listing["dry_run"] and len(listing["units"]) >= 5
    assert "classifier" in listing["heads"] and "mask_low.0" in listing["ignored"]
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_cli_rejects_pagcp_options_for_other_methods(tmp_path):
    result = CliRunner().invoke(app, ["prune", "--method", "globalmp", "--delta0", "0.1", "--model",
                                      "tests.factories:tiny_cnn", "--data", "digits", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--delta0" in result.output


class Untraceable(nn.Module):
    """Reads a value with .numpy(), which autograd tracing refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.probe = Peek()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.probe(self.conv(x)).mean((2, 3)))


class Peek(nn.Module):
    def forward(self, x):
        x.numpy()
        return x


def test_untraceable_model_names_the_module():
    with pytest.raises(UsageError) as info:
        build_graph(Untraceable(), torch.randn(1, 1, 8, 8))
    message = str(info.value)
    assert "'probe'" in message and "Peek" in message and "\n" not in message


def test_config_validation():
    with pytest.raises(UsageError, match="delta0"):
        PAGCPConfig(delta0=0)
    with pytest.raises(UsageError, match="top_p"):
        PAGCPConfig(top_p=1.5)
    with pytest.raises(UsageError, match="macs_target"):
        PAGCPConfig(macs_target=1.0)
    assert PAGCPConfig.from_dict(PAGCPConfig(ignore=("a*",)).to_dict()) == PAGCPConfig(ignore=("a*",))


# ------------------------------------------------------------------------------------------------ coverage

COVERAGE = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "vgg11_bn",
            "densenet121", "regnet_x_400mf"]


class _Random:
    """Splits-like stand-in: random calibration data and a 10-class task (coverage needs no real data)."""

    def __init__(self, x):
        from compress.data import TensorSplit

        self.calibration = TensorSplit(x, torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(0)))
        self.test = self.calibration


@pytest.mark.slow
@pytest.mark.parametrize("name", COVERAGE)
def test_coverage_torchvision(name, tmp_path):
    """Random weights, 3x64x64: every unit searched at one ratio (0.5), then forward, artifact replay and ONNX."""
    import torchvision

    from compress.export import check_parity, export_onnx

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    original = copy.deepcopy(model)
    cfg = PAGCPConfig(delta0=1e6, tau=1e12, step=0.5, calibration_items=2)
    result = METHODS["pagcp"].apply(model, cfg, Context(x[:1], _Random(x)))
    assert result.summary["macs_after"] < 0.8 * result.summary["macs_before"], result.summary
    assert not [r for r in result.layers if r["error"]]
    assert model(x).shape == (2, 10)
    rebuilt = build_from_arch({"kind": "torchvision", "name": name, "kwargs": {"num_classes": 10},
                               "transforms": result.transforms}).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    del original
    path = export_onnx(model, x[:1], tmp_path / f"{name}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert check_parity(model, path, x).ok
