"""ALDS and its SVD baselines: exact one-layer mathematics, min-max allocation, budgets, determinism, artifacts, CLI."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

from compress import api
from compress.cli import app
from compress.config import ALDSConfig, SVDConfig, SVDEnergyConfig
from compress.errors import UsageError
from compress.finetune import recalibrate_batchnorm
from compress.measure import count_macs
from compress.methods import METHODS, Context, Result
from compress.methods.alds import (
    KEEP_TOLERANCE,
    Budget,
    GroupedLinear,
    LowRank,
    allocate,
    build_lowrank,
    error_curve,
    exact_factors,
    find_candidates,
    fold,
    load_lowrank,
    lowrank_weights,
    reconstructed,
)
from compress.models import load_model

DIGITS_SPEC = "tests.test_alds:digits_cnn"
ROW_KEYS = {"name", "kind", "shape_before", "shape_after", "params_before", "params_after", "macs_before",
            "macs_after", "groups", "rank", "eps_bound", "err_spectral", "err_frobenius"}


# ------------------------------------------------------------------------------------------------ factories


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 digits: strided, dilated, depthwise and 1x1 convolutions and a two-layer head."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=2 * w),   # depthwise: never decomposed
            nn.Conv2d(2 * w, 4 * w, 1), nn.BatchNorm2d(4 * w), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(4 * w, 96), nn.ReLU(), nn.Linear(96, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def digits_cnn(num_classes: int = 10, seed: int = 0) -> DigitsCNN:
    """DigitsCNN with weights drawn from `seed` (and non-trivial BatchNorm statistics), global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN(num_classes)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
        return model.eval()


def resnet18() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torchvision.models.resnet18(num_classes=10).eval()


def run(method: str, model: nn.Module, cfg, example: torch.Tensor, seed: int = 0) -> Result:
    return METHODS[method].apply(model, cfg, Context(example, seed=seed))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def decomposed(module: nn.Module, k: int, j: int, dtype=torch.float32) -> LowRank:
    """`module` replaced by its rank-j, k-group decomposition (module converted to `dtype` first)."""
    module = module.to(dtype)
    target = build_lowrank(module, k, j)
    load_lowrank(target, module, *lowrank_weights(module.weight, exact_factors(module.weight, k), j))
    return target


def true_svals(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Per-group singular values of fold(W) by a full SVD in float64 (independent of the Gram-based code)."""
    return torch.linalg.svdvals(fold(weight.detach().double(), k))


# ------------------------------------------------------------------------------------------------ one layer


CONVS = {
    "stride2_pad1_dil2_bias": lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1, dilation=2),
    "rect_reflect_nobias": lambda: nn.Conv2d(12, 6, (3, 5), padding=(1, 2), padding_mode="reflect", bias=False),
    "circular_stride_rect": lambda: nn.Conv2d(4, 24, (1, 3), stride=(2, 1), padding=(0, 1), padding_mode="circular"),
    "same_padding": lambda: nn.Conv2d(6, 10, 3, padding="same", dilation=3),
}


@pytest.mark.parametrize("name", sorted(CONVS))
@pytest.mark.parametrize("k", [1, 2])
def test_full_rank_conv_reproduces_the_layer(name, k):
    torch.manual_seed(1)
    conv = CONVS[name]()
    r = min(conv.out_channels, conv.in_channels * math.prod(conv.kernel_size) // k)
    x = torch.randn(2, conv.in_channels, 11, 13)
    # exact mathematics in float64 ...
    conv64 = copy.deepcopy(conv).double()
    low64 = decomposed(conv64, k, r, torch.float64)
    assert (low64(x.double()) - conv64(x.double())).abs().max().item() < 1e-6
    # ... and the float32 modules the method writes
    low = decomposed(conv, k, r)
    y = conv(x)
    assert (low(x) - y).abs().max().item() <= 1e-5 * y.abs().max().item()
    enc, dec = low.encoder, low.decoder
    assert isinstance(enc, nn.Conv2d) and isinstance(dec, nn.Conv2d)
    assert (enc.groups, enc.in_channels, enc.out_channels, enc.bias) == (k, conv.in_channels, k * r, None)
    for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
        assert getattr(enc, attr) == getattr(conv, attr), attr
    assert dec.kernel_size == (1, 1) and dec.stride == (1, 1) and dec.out_channels == conv.out_channels
    assert (dec.bias is None) == (conv.bias is None)
    if conv.bias is not None:
        assert torch.equal(dec.bias, conv.bias)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 12])
def test_full_rank_linear_reproduces_the_layer(k):
    torch.manual_seed(2)
    lin = nn.Linear(12, 20)
    r = min(20, 12 // k)
    x = torch.randn(2, 3, 12)  # leading dimensions are kept
    lin64 = copy.deepcopy(lin).double()
    assert (decomposed(lin64, k, r, torch.float64)(x.double()) - lin64(x.double())).abs().max().item() < 1e-6
    low = decomposed(lin, k, r)
    y = lin(x)
    assert low(x).shape == y.shape
    assert (low(x) - y).abs().max().item() <= 1e-5 * y.abs().max().item()
    assert isinstance(low.encoder, nn.Linear if k == 1 else GroupedLinear)
    assert isinstance(low.decoder, nn.Linear) and torch.equal(low.decoder.bias, lin.bias)


@pytest.mark.parametrize("make,k,j", [
    (lambda: nn.Conv2d(8, 16, 3, bias=True), 1, 3), (lambda: nn.Conv2d(8, 16, 3, bias=False), 2, 5),
    (lambda: nn.Conv2d(8, 16, (3, 5)), 4, 7), (lambda: nn.Linear(30, 7), 1, 4),
    (lambda: nn.Linear(30, 7, bias=False), 3, 2),
    (lambda: nn.Linear(30, 7), 5, 6),
])
def test_parameter_formula(make, k, j):
    module = make()
    f, c = module.weight.shape[:2]
    kappa = module.weight[0, 0].numel()
    low = build_lowrank(module, k, j)
    bias = f if module.bias is not None else 0
    assert n_params(low) == j * (k * f + c * kappa) + bias
    assert list(low.encoder.weight.shape)[:2] == [k * j, c // k]


def test_grouped_linear_is_block_diagonal():
    torch.manual_seed(3)
    layer = GroupedLinear(12, 6, 3)
    x = torch.randn(5, 12)
    blocks = torch.block_diag(*layer.weight.detach().view(3, 2, 4))
    assert torch.allclose(layer(x), x @ blocks.T, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("j", [1, 3, 6])
def test_group_errors_are_the_tail_singular_values(k, j):
    """Per group: spectral error = sigma_{j+1}, Frobenius error = sqrt(sum of the tail sigma^2)."""
    torch.manual_seed(4)
    conv = nn.Conv2d(8, 10, 3).double()
    low = decomposed(conv, k, j, torch.float64)
    weight = conv.weight.detach().double()
    residual = fold(weight, k) - fold(reconstructed(low, k).view_as(weight), k)
    sigma = true_svals(weight, k)                                   # (k, r)
    scale = float(sigma.max())
    for i in range(k):
        spectral = torch.linalg.matrix_norm(residual[i], ord=2)
        frobenius = torch.linalg.matrix_norm(residual[i])
        assert float(spectral) == pytest.approx(float(sigma[i, j]), abs=1e-9 * scale)
        assert float(frobenius) == pytest.approx(float(sigma[i, j:].square().sum().sqrt()), abs=1e-9 * scale)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_true_error_lies_between_the_bound_and_sqrt_k_times_it(k):
    torch.manual_seed(5)
    weight = torch.randn(24, 16, 3, 3, dtype=torch.float64)
    conv = nn.Conv2d(16, 24, 3, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(weight)
    norm = float(torch.linalg.matrix_norm(weight.reshape(24, -1), ord=2))
    sigma = true_svals(weight, k)
    ratios = []
    for j in (1, 4, 9):
        curve = error_curve(k, exact_factors(weight, k).sigma, norm)
        bound = float(sigma[:, j].max()) / norm
        assert curve.err[j] == pytest.approx(bound, rel=1e-9)
        approx = reconstructed(decomposed(conv, k, j, torch.float64), k)
        true = float(torch.linalg.matrix_norm(weight.reshape(24, -1) - approx, ord=2)) / norm
        assert bound <= true * (1 + 1e-9)
        assert true <= math.sqrt(k) * bound * (1 + 1e-9)
        ratios.append(true / bound)
    assert max(ratios) > 1.0 + 1e-6  # for k > 1 the bound is not exact


def test_layers_that_would_not_save_stay_dense():
    torch.manual_seed(6)
    tiny = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 200))
    result = run("alds", tiny, ALDSConfig(priced=False, keep=0.9), torch.randn(1, 2))
    rows = {r["name"]: r for r in result.layers}
    # Linear(2, 2): one rank costs 1 * (2 + 2) weights, never fewer than its 4 dense weights
    assert rows["0"]["decomposed"] is False and rows["0"]["rank"] is None
    assert rows["0"]["params_after"] == rows["0"]["params_before"] == 6
    assert type(tiny[0]) is nn.Linear
    assert rows["1"]["decomposed"] is True and isinstance(tiny[1], LowRank)
    model = digits_cnn()
    for row in run("alds", model, ALDSConfig(priced=False, keep=0.6), torch.randn(1, 1, 8, 8)).layers:
        if row["decomposed"]:
            assert row["params_after"] < row["params_before"]
            assert isinstance(model.get_submodule(row["name"]), LowRank)
        else:
            assert row["params_after"] == row["params_before"]
            assert not isinstance(model.get_submodule(row["name"]), LowRank)


def test_grouped_and_depthwise_convolutions_are_skipped():
    model = digits_cnn()
    candidates, skipped = find_candidates(model, (), ())
    assert [s["name"] for s in skipped] == ["features.9"]
    assert "features.9" not in [c.name for c in candidates]
    result = run("alds", model, ALDSConfig(priced=False, keep=0.5), torch.randn(1, 1, 8, 8))
    assert type(model.features[9]) is nn.Conv2d and model.features[9].groups == 64
    assert result.summary["skipped"][0]["name"] == "features.9"


# ------------------------------------------------------------------------------------------------ allocation


@pytest.fixture(scope="module")
def resnet_runs():
    """ALDS on seeded resnet18 at three keep ratios, plus the original weights (32x32 inputs)."""
    example = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    original = resnet18()
    runs = {}
    for keep in (0.3, 0.5, 0.7):
        model = copy.deepcopy(original)
        runs[keep] = (model, run("alds", model, ALDSConfig(priced=False, keep=keep), example))
    return original, example, runs


class IndependentErrors:
    """ALDS's bound at (k, j) from full float64 SVDs of the original weights, cached per (layer, k)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())
        self.cache: dict[tuple[str, int], tuple[torch.Tensor, float]] = {}

    def __call__(self, name: str, k: int, j: int) -> float:
        """max_i sigma^(i)_{j+1} / ||W||_2 (0 at full rank)."""
        if (name, k) not in self.cache:
            w = self.modules[name].weight.detach().double()
            norm = float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2))
            self.cache[name, k] = (true_svals(w, k), norm)
        sigma, norm = self.cache[name, k]
        return 0.0 if j >= sigma.shape[1] else float(sigma[:, j].max()) / norm


def check_min_max(original: nn.Module, result: Result) -> None:
    """Every cut layer is within eps*, and one rank less would lift it above eps*."""
    error = IndependentErrors(original)
    eps_star = result.summary["eps_star"]
    cut = [row for row in result.layers if row["decomposed"]]
    assert cut
    assert max(row["eps_bound"] for row in cut) == eps_star
    lowered = 0
    for row in cut:
        k, j = row["groups"], row["rank"]
        assert error(row["name"], k, j) == pytest.approx(row["eps_bound"], rel=1e-7, abs=1e-12)
        assert row["eps_bound"] <= eps_star
        if j > 1:
            lowered += 1
            assert error(row["name"], k, j - 1) > eps_star, row["name"]
    assert lowered >= 1  # some layer above rank 1, so the check bites


def test_min_max_optimality(resnet_runs):
    original, _, runs = resnet_runs
    check_min_max(original, runs[0.5][1])


@pytest.mark.parametrize("keep", [0.2, 0.4, 0.6])
@pytest.mark.parametrize("method", ["alds", "svd", "svd-energy"])
def test_min_max_optimality_small(method, keep):
    """ALDS is min-max in its bound; so are the baselines' ranks in their own levels, which the bound need not be:
    only ALDS is checked for the bound, the others for being decomposed at all."""
    model = digits_cnn()
    cfg = {"alds": ALDSConfig, "svd": SVDConfig, "svd-energy": SVDEnergyConfig}[method](keep=keep, priced=False)
    result = run(method, model, cfg, torch.randn(1, 1, 8, 8))
    if method == "alds":
        check_min_max(digits_cnn(), result)
    else:
        assert result.summary["eps_star"] == max(r["eps_bound"] for r in result.layers if r["decomposed"])


def test_larger_budget_never_larger_eps(resnet_runs):
    _, _, runs = resnet_runs
    eps = [runs[keep][1].summary["eps_star"] for keep in (0.3, 0.5, 0.7)]
    assert eps[0] > eps[1] > eps[2] > 0


def test_fixed_k_allocation_is_monotone_in_the_budget():
    """For fixed k per layer the common level is a monotone function of the budget, at every breakpoint."""
    model = digits_cnn()
    candidates, _ = find_candidates(model, (), ())
    rng = np.random.default_rng(0)
    ks = [int(rng.choice([d for d in (1, 2, 4, 8) if c.c % d == 0])) for c in candidates]
    curves = []
    for cand, k in zip(candidates, ks):
        fac = exact_factors(cand.module.weight, k)
        norm = float(torch.linalg.matrix_norm(cand.module.weight.detach().double().reshape(cand.f, -1), ord=2))
        curves.append(error_curve(k, fac.sigma, norm))
    total = n_params(model)
    fixed = total - sum(c.dense for c in candidates)
    last = math.inf
    for keep in np.linspace(0.1, 1.0, 200):
        budget = Budget(tuple(1 for _ in candidates), fixed, total, float(keep), "all parameters")
        allocation = allocate(candidates, curves, budget)
        assert allocation.eps_star <= last
        assert allocation.cost <= budget.target * (1 + KEEP_TOLERANCE)
        last = allocation.eps_star
    assert last == 0.0  # keep 1.0: every layer stays dense


@pytest.mark.parametrize("method,cfg", [("svd", SVDConfig(keep=0.3, priced=False)),
                                        ("svd", SVDConfig(keep=0.5, priced=False)),
                                        ("svd-energy", SVDEnergyConfig(keep=0.3, priced=False)),
                                        ("svd-energy", SVDEnergyConfig(keep=0.5, priced=False))])
def test_keep_ratio_met_over_all_parameters(method, cfg):
    model = resnet18()
    original = copy.deepcopy(model)
    before = n_params(model)
    example = torch.randn(1, 3, 32, 32)
    result = run(method, model, cfg, example)
    after = n_params(model)
    keep = result.summary["keep"]
    assert keep == {"requested": cfg.keep, "achieved": after / before, "counted_over": "all parameters"}
    assert abs(after - cfg.keep * before) <= KEEP_TOLERANCE * cfg.keep * before, (after / before)
    assert result.summary["allocated_cost"] == after
    assert sum(r["params_after"] - r["params_before"] for r in result.layers) == after - before
    assert not api.audit(cfg, result, model, original, Context(example)).problems


def test_keep_ratio_met_for_the_resnet_runs(resnet_runs):
    original, _, runs = resnet_runs
    before = n_params(original)
    for keep, (model, result) in runs.items():
        assert abs(n_params(model) / before - keep) <= KEEP_TOLERANCE * keep
        assert result.summary["keep_achieved"] == n_params(model) / before


def test_macs_budget_counts_the_real_modules():
    model = resnet18()
    example = torch.randn(1, 3, 32, 32)
    before = count_macs(model, example).macs
    result = run("alds", model, ALDSConfig(priced=False, macs_keep=0.6, seeds=5), example)
    after = count_macs(model, example).macs
    assert result.summary["keep"]["counted_over"] == "MACs"
    assert result.summary["macs_after"] == after == result.summary["allocated_cost"]
    assert abs(after / before - 0.6) <= KEEP_TOLERANCE * 0.6
    assert sum(r["macs_after"] for r in result.layers) - sum(r["macs_before"] for r in result.layers) == after - before


def test_rows_and_summary(resnet_runs):
    original, _, runs = resnet_runs
    model, result = runs[0.5]
    assert [row["name"] for row in result.layers] == \
        [n for n, m in original.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    for row in result.layers:
        assert ROW_KEYS <= set(row), row
        if row["decomposed"]:
            k, j = row["groups"], row["rank"]
            low = model.get_submodule(row["name"])
            assert isinstance(low, LowRank) and low.encoder.weight.shape[0] == k * j
            assert row["params_after"] == n_params(low)
            assert row["macs_after"] < row["macs_before"]
            # measured errors: the bound is exact for k = 1, a lower bound within sqrt(k) otherwise
            assert row["eps_bound"] <= row["err_spectral"] * (1 + 1e-5) + 1e-7
            assert row["err_spectral"] <= math.sqrt(k) * row["eps_bound"] * (1 + 1e-5) + 1e-7
            if k == 1:
                assert row["err_spectral"] == pytest.approx(row["eps_bound"], rel=1e-5)
            assert 0 < row["err_frobenius"] < 1
    summary = result.summary
    assert summary["keep_requested"] == 0.5 and summary["keep"]["counted_over"] == "all parameters"
    assert summary["layers_decomposed"] + summary["layers_dense"] == len(result.layers)
    assert len(result.transforms) == summary["layers_decomposed"]
    assert all(t["type"] == "lowrank" for t in result.transforms)


def test_same_seed_same_allocation():
    example = torch.randn(1, 1, 8, 8)

    def allocation(seed: int, noise: int):
        torch.manual_seed(noise)       # the global RNG state must not matter
        np.random.seed(noise)
        result = run("alds", digits_cnn(), ALDSConfig(priced=False, keep=0.4), example, seed=seed)
        return [(r["name"], r["groups"], r["rank"]) for r in result.layers], result.summary["eps_star"]

    first = allocation(7, 1)
    assert allocation(7, 2) == first
    assert any(k is not None and k > 1 for _, k, _ in first[0])


def test_baselines_follow_their_rules():
    model = resnet18()
    svd = run("svd", model, SVDConfig(keep=0.4, priced=False), torch.randn(1, 3, 32, 32))
    cut = [row for row in svd.layers if row["decomposed"]]
    assert all(row["groups"] == 1 for row in cut)
    relative = [row["rank"] / row["max_rank"] for row in cut]
    # one relative rank, up to rounding to whole ranks
    assert max(relative) - min(relative) <= max(1.0 / row["max_rank"] for row in cut) + 1e-9
    energy = run("svd-energy", digits_cnn(), SVDEnergyConfig(keep=0.4, priced=False),
                 torch.randn(1, 1, 8, 8))
    kept = energy.summary["energy_kept"]
    modules = dict(digits_cnn().named_modules())
    for row in energy.layers:
        if not row["decomposed"]:
            continue
        sigma2 = true_svals(modules[row["name"]].weight, 1)[0].square()
        fraction = sigma2.cumsum(0) / sigma2.sum()
        j = row["rank"]
        assert float(fraction[j - 1]) >= kept - 1e-9                  # keeps the common fraction ...
        assert j == 1 or float(fraction[j - 2]) < kept + 1e-9         # ... with the smallest such rank
        assert row["err_frobenius"] == pytest.approx(math.sqrt(max(0.0, 1 - float(fraction[j - 1]))), abs=1e-5)


def test_unreachable_budget_names_the_smallest_keep():
    with pytest.raises(UsageError, match=r"keep ratio 0.01 is unreachable.*keeps 0\.\d+"):
        run("alds", digits_cnn(), ALDSConfig(priced=False, keep=0.01), torch.randn(1, 1, 8, 8))


@pytest.mark.parametrize("cls,kwargs,needle", [
    (ALDSConfig, {"keep": 0.0}, r"keep = 0.0 is out of range; allowed \(0.0, 1.0\]"),
    (ALDSConfig, {"keep": 1.5}, "keep = 1.5"),
    (ALDSConfig, {"macs_keep": -0.1}, "macs_keep = -0.1"),
    (ALDSConfig, {"seeds": 0}, "seeds = 0"),
    (ALDSConfig, {"rounds": -1}, "rounds = -1"),
    (ALDSConfig, {"groups": (2, 0)}, r"groups = \[2, 0\]"),
    (ALDSConfig, {"exclude": ("re:(",)}, "--exclude"),
    (SVDConfig, {"keep": 2.0}, "keep = 2.0"),
    (SVDEnergyConfig, {"macs_keep": 0.0}, "macs_keep = 0.0"),
])
def test_config_validation(cls, kwargs, needle):
    with pytest.raises(UsageError, match=needle):
        cls(**kwargs)


def test_configs_round_trip():
    cfg = ALDSConfig(priced=False, keep=0.3, groups=(1, 2), seeds=3, exclude=("fc",))
    assert ALDSConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert SVDEnergyConfig.from_dict({"keep": 0.2}) == SVDEnergyConfig(keep=0.2)


def test_audit_fails_a_missed_keep_budget():
    """The audit counts the shipped model's parameters itself: 1001 originally, keep 0.5 within 0.5%."""
    original, cfg = nn.Linear(1000, 1), ALDSConfig(priced=False, keep=0.5)

    def problems(kept_inputs: int) -> list[str]:
        shipped = nn.Linear(kept_inputs, 1)  # kept_inputs + 1 parameters
        return api.audit(cfg, Result(shipped), shipped, original, Context(torch.randn(1, 1000))).problems

    assert problems(500) == [] and problems(497) == []  # 0.5005, 0.4975
    found = problems(495)
    assert len(found) == 1 and "0.495504" in found[0] and "all parameters" in found[0]
    assert problems(504)  # 0.5045: above the budget is a miss too


# ------------------------------------------------------------------------------------------------ artifact, CLI


ROUND_TRIP_KEEP = 0.5


@pytest.fixture(scope="module")
def alds_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("alds") / "run"
    report = api.prune(api.ModelSource(spec=DIGITS_SPEC), ALDSConfig(priced=False, keep=ROUND_TRIP_KEEP),
                       api.RunOptions(out=out, data="digits", latency=False, command="test"))
    return out, report


def test_artifact_round_trip(alds_run, digits):
    out, report = alds_run
    arch = json.loads((out / "arch.json").read_text())
    edits = arch["transforms"]
    assert edits and all(e["type"] == "lowrank" for e in edits)
    assert [e["layer"] for e in edits] == [row["name"] for row in report["layers"] if row["decomposed"]]
    loaded = load_model(str(out)).model
    # the same decomposition computed here (the method is deterministic) gives bit-identical outputs
    model = digits_cnn()
    run("alds", model, ALDSConfig(priced=False, keep=ROUND_TRIP_KEEP), digits.test.x[:1])
    recalibrate_batchnorm(model, digits.calibration)  # as `compress prune` does after compressing
    model.eval()
    x = digits.test.x[:64]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for edit in edits:
        assert isinstance(loaded.get_submodule(edit["layer"]), LowRank)
    assert n_params(loaded) == report["model"]["after"]["params_total"]
    assert report["keep"]["achieved"] == pytest.approx(n_params(loaded) / n_params(digits_cnn()), abs=1e-12)


def test_report_has_keep_section_and_rows(alds_run):
    _, report = alds_run
    assert report["status"] == "ok" and report["audit"]["ok"]
    keep = report["keep"]
    assert keep["requested"] == ROUND_TRIP_KEEP and keep["counted_over"] == "all parameters"
    assert abs(keep["achieved"] - ROUND_TRIP_KEEP) <= KEEP_TOLERANCE * ROUND_TRIP_KEEP
    assert report["model"]["after"]["params_total"] < report["model"]["before"]["params_total"]
    assert report["model"]["after"]["macs"] < report["model"]["before"]["macs"]
    assert all(ROW_KEYS <= set(row) for row in report["layers"])
    assert report["summary"]["eps_star"] > 0


@pytest.mark.parametrize("method,cfg", [("svd", SVDConfig(keep=0.5, priced=False)),
                                        ("svd-energy", SVDEnergyConfig(keep=0.5, priced=False))])
def test_baseline_artifacts_round_trip(method, cfg, tmp_path, digits):
    out = tmp_path / method
    report = api.prune(api.ModelSource(spec=DIGITS_SPEC), cfg,
                       api.RunOptions(out=out, data="digits", latency=False, command="test"))
    assert report["method"] == method and report["status"] == "ok"
    model = digits_cnn()
    run(method, model, cfg, digits.test.x[:1])
    recalibrate_batchnorm(model, digits.calibration)
    model.eval()
    loaded = load_model(str(out)).model
    x = digits.test.x[:64]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert sum(isinstance(m, LowRank) for m in loaded.modules()) == report["summary"]["layers_decomposed"] > 0


def test_replay_of_an_unknown_layer_is_a_usage_error():
    from compress.models.loader import build_from_arch

    arch = {"kind": "factory", "target": DIGITS_SPEC, "kwargs": {},
            "transforms": [{"type": "lowrank", "layer": "features.77", "groups": 1, "rank": 2}]}
    with pytest.raises(UsageError, match="features.77"):
        build_from_arch(arch)


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env={"NO_COLOR": "1", "CI": "1"})


SMALL = ["--model", DIGITS_SPEC, "--data", "digits", "--no-latency"]


def test_cli_prune_alds(runner, tmp_path):
    out = tmp_path / "cli"
    result = runner.invoke(app, ["prune", "--method", "alds", "--keep", "0.5", "--no-priced", "--json", "--out",
                                 str(out), *SMALL])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "alds" and report["config"]["keep"] == 0.5 and "sparsity" not in report["config"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["keep"] == report["keep"]
    assert saved["keep"]["requested"] == 0.5 and saved["keep"]["counted_over"] == "all parameters"
    assert abs(saved["keep"]["achieved"] - 0.5) <= KEEP_TOLERANCE * 0.5
    rows = saved["layers"]
    assert any(row["decomposed"] for row in rows)
    for row in rows:
        assert ROW_KEYS <= set(row)


def test_cli_recipe_with_a_baseline(runner, tmp_path):
    recipe = tmp_path / "svd.yaml"
    recipe.write_text("method: svd-energy\nconfig:\n  keep: 0.6\n  priced: false\n  exclude: [head.2]\n")
    out = tmp_path / "svd"
    result = runner.invoke(app, ["prune", "--recipe", str(recipe), "--json", "--out", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "svd-energy" and report["config"]["keep"] == 0.6
    assert "head.2" not in [row["name"] for row in report["layers"]]
    assert report["keep"]["requested"] == 0.6


@pytest.mark.parametrize("args,needles", [
    (["--method", "alds", "--sparsity", "0.5"], ("--sparsity", "alds")),
    (["--method", "globalmp", "--keep", "0.5"], ("--keep", "globalmp")),
    (["--method", "svd", "--schedule", "gradual"], ("--schedule", "svd")),
    (["--method", "alds", "--keep", "1.5"], ("keep = 1.5",)),
    (["--method", "alds", "--keep", "0.5", "--macs-keep", "0.5"], ("--keep", "--macs-keep", "not both")),
])
def test_cli_refuses_options_of_other_methods(runner, tmp_path, args, needles):
    result = runner.invoke(app, ["prune", "--out", str(tmp_path / "x"), *SMALL, *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.stderr


def test_cli_help_lists_the_registry(runner):
    result = runner.invoke(app, ["prune", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.stdout.replace("│", " ").split())
    assert ", ".join(api.method_names()) in text and "svd-energy" in text


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [True, False])
def test_onnx_export_parity(tmp_path, dynamo):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = digits_cnn()
    run("alds", model, ALDSConfig(priced=False, keep=0.4, groups=(1, 2, 4)), torch.randn(1, 1, 8, 8))
    assert any(isinstance(m, GroupedLinear) for m in model.modules()) or any(
        isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups < m.in_channels for m in model.modules())
    mlp = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).eval()
    run("alds", mlp, ALDSConfig(priced=False, keep=0.5, groups=(4,)), torch.randn(1, 64))
    for net, shape in ((model, (4, 1, 8, 8)), (mlp, (4, 64))):
        x = torch.randn(*shape)
        path = tmp_path / f"{type(net).__name__}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
            torch.onnx.export(net, (x,), str(path), dynamo=dynamo, opset_version=None if dynamo else 17,
                              verbose=False)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            assert np.abs(y - net(x).numpy()).max() < 1e-4


def test_alds_composes_with_physical_channel_pruning():
    """A model whose channels Torch-Pruning removed (what PAGCP will produce) decomposes like any other."""
    import torch_pruning as tp

    model = resnet18()
    example = torch.randn(1, 3, 32, 32)
    tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                              pruning_ratio=0.5, ignored_layers=[model.fc]).step()
    assert model.layer1[0].conv1.out_channels == 32, "channels physically removed"
    before = sum(p.numel() for p in model.parameters())
    result = METHODS["alds"].apply(model, ALDSConfig(priced=False, keep=0.5), Context(example))
    after = sum(p.numel() for p in model.parameters())
    assert abs(after - 0.5 * before) <= KEEP_TOLERANCE * 0.5 * before
    assert result.summary["layers_decomposed"] > 0
    assert model(example).shape == (1, 10)


def test_min_group_channels_keeps_groups_wide():
    """--min-group-channels w: every chosen k leaves at least w input channels per group (k = 1 always allowed)."""
    model = digits_cnn()
    cfg = ALDSConfig(priced=False, keep=0.4, min_group_channels=8)
    result = METHODS["alds"].apply(model, cfg, Context(torch.randn(1, 1, 8, 8)))
    decomposed = [row for row in result.layers if row["decomposed"]]
    assert decomposed
    for row in decomposed:
        channels = row["shape_before"][1]
        assert row["groups"] == 1 or channels // row["groups"] >= 8, row
    with pytest.raises(UsageError, match="min_group_channels"):
        ALDSConfig(min_group_channels=0)


# ------------------------------------------------------------------------------- layers read directly by a parent


class ReadsChildWeights(nn.Module):
    """Like torchvision's Swin attention: owns two Linear layers but passes their `.weight` to F.linear itself."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = nn.functional.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        return nn.functional.linear(attention @ v, self.proj.weight, self.proj.bias)


class DirectReadNet(nn.Module):
    """8x8 digits as 8 tokens: an embedding, the attention above, nn.MultiheadAttention (which reads its
    out_proj.weight directly), an MLP, a head, and a Linear that the forward never calls."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.attn = ReadsChildWeights(dim)
        self.mha = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, 10)
        self.unused = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.flatten(1, 2))
        h = h + self.attn(h)
        h = h + self.mha(h, h, h, need_weights=False)[0]
        return self.head((h + self.mlp(h)).mean(1))


def direct_read_net() -> DirectReadNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return DirectReadNet().eval()


DIRECT = {"attn.qkv": "'attn' (ReadsChildWeights)", "attn.proj": "'attn' (ReadsChildWeights)",
          "mha.out_proj": "'mha' (MultiheadAttention)"}


def test_layers_whose_weights_a_parent_reads_are_found_before_any_work():
    model, x = direct_read_net(), torch.randn(2, 1, 8, 8)
    candidates, skipped = find_candidates(model, (), (), example=x)
    assert [c.name for c in candidates] == ["embed", "mlp.0", "mlp.2", "head"]
    reasons = {s["name"]: s["reason"] for s in skipped}
    assert set(reasons) == {*DIRECT, "unused"}
    for name, reader in DIRECT.items():
        assert f"'weight' is read directly by {reader}" in reasons[name] and "left dense" in reasons[name]
    assert "not called by the forward pass" in reasons["unused"]
    # without an example (no forward pass) nothing is known about how the weights are used
    assert len(find_candidates(model, (), ())[0]) == 8


def test_alds_leaves_directly_read_layers_dense_and_runs_to_the_end():
    """Replacing attn.qkv by LowRank would break the forward (`'LowRank' object has no attribute 'weight'`): it and
    the other directly read layers stay dense, are named in the report's skipped list, and the budget is met."""
    model, x = direct_read_net(), torch.randn(2, 1, 8, 8)
    before = n_params(model)
    result = run("alds", model, ALDSConfig(priced=False, keep=0.6), x)
    assert {s["name"] for s in result.summary["skipped"]} == {*DIRECT, "unused"}
    for name in [*DIRECT, "unused"]:
        assert type(model.get_submodule(name)) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
    assert result.summary["layers_decomposed"] > 0
    assert [row["name"] for row in result.layers] == ["embed", "mlp.0", "mlp.2", "head"]
    assert abs(n_params(model) - 0.6 * before) <= KEEP_TOLERANCE * 0.6 * before
    assert model(x).shape == (2, 10)


@pytest.mark.slow
def test_alds_on_swin_t_runs_to_the_end():
    """torchvision swin_t (random weights, 3x32x32, which it runs at): every block's attention reads qkv.weight
    and proj.weight directly; those 24 layers stay dense, the rest decomposes to the budget (about 10 s)."""
    model, x = torchvision.models.swin_t(num_classes=10).eval(), torch.randn(2, 3, 32, 32)
    before = n_params(model)
    result = METHODS["alds"].apply(model, ALDSConfig(priced=False, keep=0.5, seeds=2, rounds=1), Context(x[:1]))
    skipped = {s["name"] for s in result.summary["skipped"]}
    attention = {n for n, _ in model.named_modules() if n.endswith((".attn.qkv", ".attn.proj"))}
    assert len(attention) == 24 and skipped == attention
    assert all(type(model.get_submodule(n)) is nn.Linear for n in attention)
    assert result.summary["layers_decomposed"] > 0
    assert abs(n_params(model) - 0.5 * before) <= KEEP_TOLERANCE * 0.5 * before
    assert model(x).shape == (2, 10)


class ReadsOutFeatures(nn.Module):
    """A parent that reads a plain attribute of its child Linear (no tensor, so no torch function sees it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x.flatten(1)).view(-1, self.fc.out_features))


def test_a_replacement_that_breaks_the_forward_is_found_by_trying_it():
    model, x = ReadsOutFeatures().eval(), torch.randn(2, 1, 8, 8)
    candidates, skipped = find_candidates(model, (), (), example=x)
    assert [c.name for c in candidates] == ["head"]
    assert [s["name"] for s in skipped] == ["fc"]
    assert "breaks the forward pass (AttributeError" in skipped[0]["reason"] and "out_features" in skipped[0]["reason"]
    assert type(model.fc) is nn.Linear and model(x).shape == (2, 10)  # every swap was put back
