"""GlobalMP's exact mathematics: target hit exactly, global order, floors, feasibility, ties, patterns, schedule."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torchvision
from torch import nn

from compress.config import GlobalMPConfig
from compress.errors import UsageError
from compress.finetune import apply_masks
from compress.methods import METHODS, Context
from compress.methods.globalmp import (
    GRADUAL_END_FRACTION,
    GradualSchedule,
    cubic_sparsity,
    layer_floors,
    prunable_layers,
)
from tests.factories import tiny_cnn

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def run_globalmp(model: nn.Module, **cfg):
    """Apply GlobalMP in place and return its Result."""
    return METHODS["globalmp"].apply(model, GlobalMPConfig(**cfg), Context(torch.zeros(1, 1)))


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every Conv/Linear weight, by module name."""
    return {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, PRUNABLE)}


def mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 33), nn.ReLU(), nn.Linear(33, 7))


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


@pytest.fixture(scope="module")
def resnet18_weights() -> dict[str, torch.Tensor]:
    """resnet18's initial state, so each test starts from the same random weights without rebuilding."""
    return {k: v.clone() for k, v in resnet18().state_dict().items()}


MODELS = {"tiny_cnn": tiny_cnn, "mlp": mlp}


def build(name: str, resnet18_weights) -> nn.Module:
    if name == "resnet18":
        model = torchvision.models.resnet18(num_classes=10)
        model.load_state_dict(resnet18_weights)
        return model
    return MODELS[name]()


# ---------------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("model_name", ["tiny_cnn", "mlp", "resnet18"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99, 0.999])
def test_achieved_sparsity_is_exact(model_name, sparsity, resnet18_weights):
    model = build(model_name, resnet18_weights)
    before = weights(model)
    n_total = sum(w.numel() for w in before.values())
    k = int(round(sparsity * n_total))

    result = run_globalmp(model, sparsity=sparsity)

    after = weights(model)
    zeros = sum(int((w == 0).sum()) for w in after.values())
    assert zeros == k, f"{zeros} weights are zero, expected exactly round({sparsity} * {n_total}) = {k}"
    masked = sum(int((m == 0).sum()) for m in result.masks.values())
    assert masked == k
    assert result.summary["pruned"] == result.summary["target_pruned"] == k
    assert result.summary["prunable_weights"] == n_total
    assert result.summary["achieved"] == pytest.approx(k / n_total, abs=1e-12)
    # the mask and the zeros agree, and the kept weights are untouched
    for name, w in after.items():
        mask = result.masks[f"{name}.weight"].bool()
        assert torch.equal(w == 0, ~mask), name
        assert torch.equal(w[mask], before[name][mask]), name


@pytest.mark.parametrize("model_name", ["tiny_cnn", "mlp", "resnet18"])
def test_global_order_without_floors(model_name, resnet18_weights):
    """Without floors, no pruned weight is larger in magnitude than any kept weight, across all layers."""
    model = build(model_name, resnet18_weights)
    before = weights(model)
    result = run_globalmp(model, sparsity=0.9)
    pruned, kept = [], []
    for name, w in before.items():
        mask = result.masks[f"{name}.weight"].bool()
        pruned.append(w[~mask].abs())
        kept.append(w[mask].abs())
    max_pruned, min_kept = torch.cat(pruned).max(), torch.cat(kept).min()
    assert max_pruned <= min_kept
    # layers are pruned unevenly: magnitudes compare raw across layers
    per_layer = [1 - float(result.masks[f"{n}.weight"].mean()) for n in before]
    assert max(per_layer) - min(per_layer) > 0.05


def test_rows_report_every_layer(tiny_model):
    result = run_globalmp(tiny_model, sparsity=0.9)
    names = [row["name"] for row in result.layers]
    assert names == ["features.0", "features.3", "features.6", "fc"]
    for row in result.layers:
        assert row["kept"] == int(result.masks[row["name"] + ".weight"].sum())
        assert row["sparsity"] == pytest.approx(1 - row["kept"] / row["weights"])


# ------------------------------------------------------------------------------------------------------- floors


def kept_per_layer(result) -> dict[str, int]:
    return {row["name"]: row["kept"] for row in result.layers}


def assert_within_layer_order(before: dict[str, torch.Tensor], result) -> None:
    """Inside each layer the kept weights are the largest ones."""
    for name, w in before.items():
        mask = result.masks[f"{name}.weight"].bool()
        if mask.all() or not mask.any():
            continue
        assert w[~mask].abs().max() <= w[mask].abs().min(), name


@pytest.mark.parametrize("model_name,sparsity,min_keep", [
    ("tiny_cnn", 0.99, 0.005), ("tiny_cnn", 0.95, 0.02), ("mlp", 0.99, 0.005), ("resnet18", 0.999, 0.0005),
])
def test_min_keep_floor_holds(model_name, sparsity, min_keep, resnet18_weights):
    plain = run_globalmp(build(model_name, resnet18_weights), sparsity=sparsity)
    model = build(model_name, resnet18_weights)
    before = weights(model)
    result = run_globalmp(model, sparsity=sparsity, min_keep=min_keep)

    n_total = sum(w.numel() for w in before.values())
    assert sum(int((w == 0).sum()) for w in weights(model).values()) == round(sparsity * n_total)
    floors = {name: min(w.numel(), math.ceil(min_keep * w.numel())) for name, w in before.items()}
    kept = kept_per_layer(result)
    for name, floor in floors.items():
        assert kept[name] >= floor, f"{name} keeps {kept[name]} < floor {floor}"
    assert {row["name"]: row["floor"] for row in result.layers} == floors
    # the floor mattered: plain GlobalMP leaves some layer below it
    assert any(kept_per_layer(plain)[name] < floor for name, floor in floors.items())
    assert_within_layer_order(before, result)
    assert result.summary["pruned"] == result.summary["target_pruned"]


def test_min_threshold_floor_holds_and_small_layers_stay_dense(tiny_model):
    before = weights(tiny_model)
    sizes = {name: w.numel() for name, w in before.items()}
    n_total = sum(sizes.values())
    assert n_total == 3688 and sizes["features.0"] == 72
    min_threshold = 2.5  # percent of N: 92 weights, more than the first conv has
    mt = int(round(min_threshold / 100 * n_total))
    assert mt == 92
    result = run_globalmp(tiny_model, sparsity=0.9, min_threshold=min_threshold)
    kept = kept_per_layer(result)
    assert kept["features.0"] == 72  # min(n_l, MT) = n_l: the layer stays dense
    for name, n in sizes.items():
        assert kept[name] >= min(n, mt), name
    assert sum(int((w == 0).sum()) for w in weights(tiny_model).values()) == round(0.9 * n_total)
    assert any(row["floor_hit"] for row in result.layers)
    assert_within_layer_order(before, result)


def test_layer_floors_formula():
    sizes = [72, 1152, 2304, 160]
    cfg = GlobalMPConfig(sparsity=0.5, min_threshold=1.0, min_keep=0.1)
    mt = round(0.01 * sum(sizes))  # 37
    assert layer_floors(sizes, cfg) == [max(mt, 8), max(mt, 116), max(mt, 231), max(mt, 16)]
    assert layer_floors([3], GlobalMPConfig(min_keep=1.0)) == [3]
    assert layer_floors([10, 10], GlobalMPConfig(min_threshold=100.0)) == [10, 10]  # capped at n_l


def largest_from(message: str) -> float:
    match = re.search(r"largest reachable sparsity is ([0-9.]+)", message)
    assert match, message
    return float(match.group(1))


@pytest.mark.parametrize("floor_cfg", [{"min_keep": 0.5}, {"min_threshold": 5.0}, {"min_keep": 0.05, "min_threshold": 3.0}])
def test_infeasible_floors_raise_and_name_the_largest_sparsity(tiny_model, floor_cfg):
    before = weights(tiny_model)
    sizes = [w.numel() for w in before.values()]
    n_total = sum(sizes)
    floors = layer_floors(sizes, GlobalMPConfig(**floor_cfg))
    expected = 1 - sum(floors) / n_total
    assert expected < 0.9

    with pytest.raises(UsageError) as info:
        run_globalmp(tiny_model, sparsity=0.9, **floor_cfg)
    assert info.value.exit_code == 2
    assert largest_from(str(info.value)) == pytest.approx(expected, abs=1e-6)
    # refused before touching the model
    for name, w in weights(tiny_model).items():
        assert torch.equal(w, before[name])

    # the named sparsity is reachable, one more weight is not
    reachable = (n_total - sum(floors)) / n_total
    result = run_globalmp(tiny_cnn(), sparsity=reachable, **floor_cfg)
    assert result.summary["pruned"] == n_total - sum(floors)
    assert all(row["kept"] == row["floor"] for row in result.layers)
    with pytest.raises(UsageError):
        run_globalmp(tiny_cnn(), sparsity=(n_total - sum(floors) + 1) / n_total, **floor_cfg)


def test_the_named_largest_sparsity_is_reachable_on_a_large_model(r18):
    from compress.methods.globalmp import check_feasible

    sizes = [layer.weight.numel() for layer in prunable_layers(r18, GlobalMPConfig())]
    for min_keep in (0.011, 0.017, 0.021, 0.023):
        floors = layer_floors(sizes, GlobalMPConfig(min_keep=min_keep))
        with pytest.raises(UsageError) as info:
            check_feasible(sizes, floors, 0.999)
        named = largest_from(str(info.value))
        assert check_feasible(sizes, floors, named) <= sum(sizes) - sum(floors), min_keep


# --------------------------------------------------------------------------------------------------------- ties


def constant_magnitude_model(value: float = 0.25) -> nn.Module:
    """Two Linear layers whose weights all have magnitude `value`, with alternating signs."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 6))
    with torch.no_grad():
        for layer in model:
            signs = torch.tensor([1.0, -1.0]).repeat(layer.weight.numel())[:layer.weight.numel()]
            layer.weight.copy_((value * signs).view_as(layer.weight))
    return model


@pytest.mark.parametrize("sparsity,k", [(0.3, 15), (0.5, 25), (0.02, 1), (0.98, 49)])
def test_ties_are_broken_by_index_so_exactly_k_go(sparsity, k):
    model = constant_magnitude_model()
    result = run_globalmp(model, sparsity=sparsity)
    flat_mask = torch.cat([result.masks["0.weight"].flatten(), result.masks["1.weight"].flatten()])
    assert int((flat_mask == 0).sum()) == k
    expected = torch.ones(50)
    expected[:k] = 0  # lowest global index first: layer 0 before layer 1, row-major inside a layer
    assert torch.equal(flat_mask, expected)
    zeros = torch.cat([model[0].weight.flatten() == 0, model[1].weight.flatten() == 0])
    assert torch.equal(zeros, expected == 0)


def test_ties_at_the_threshold_with_distinct_values_below():
    model = nn.Sequential(nn.Linear(10, 10, bias=False))
    with torch.no_grad():
        w = torch.full((100,), 0.5)
        w[::7] = 0.1  # 15 smaller values, spread out
        model[0].weight.copy_(w.view(10, 10))
    result = run_globalmp(model, sparsity=0.4)  # 15 small + the first 25 of the tied 0.5s
    mask = result.masks["0.weight"].flatten()
    assert int((mask == 0).sum()) == 40
    assert (mask[::7] == 0).all()
    tied = torch.nonzero(w == 0.5).flatten()
    assert (mask[tied[:25]] == 0).all() and (mask[tied[25:]] == 1).all()


# ----------------------------------------------------------------------------------------------------- patterns


def names(model: nn.Module, **cfg) -> list[str]:
    return [layer.name for layer in prunable_layers(model, GlobalMPConfig(**cfg))]


@pytest.fixture(scope="module")
def r18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


def test_default_selects_every_conv_and_linear(r18):
    all_names = names(r18)
    expected = [n for n, m in r18.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert all_names == expected and len(all_names) == 21
    assert "conv1" in all_names and "fc" in all_names and "layer2.0.downsample.0" in all_names


def test_include_glob(r18):
    assert names(r18, include=("layer1.*",)) == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]
    assert names(r18, include=("fc", "conv1")) == ["conv1", "fc"]
    assert names(r18, include=("*.conv2",)) == [f"layer{i}.{j}.conv2" for i in range(1, 5) for j in range(2)]


def test_include_regex(r18):
    assert names(r18, include=("re:^layer4\\.1",)) == ["layer4.1.conv1", "layer4.1.conv2"]
    assert names(r18, include=("re:downsample",)) == [f"layer{i}.0.downsample.0" for i in (2, 3, 4)]


def test_exclude_glob_and_regex(r18):
    everything = names(r18)
    assert names(r18, exclude=("fc",)) == [n for n in everything if n != "fc"]
    assert names(r18, exclude=("re:downsample", "conv1")) == [
        n for n in everything if "downsample" not in n and n != "conv1"]
    assert names(r18, include=("layer3.*",), exclude=("*.conv1",)) == [
        "layer3.0.conv2", "layer3.0.downsample.0", "layer3.1.conv2"]


def test_no_match_and_bad_regex_are_usage_errors(r18):
    with pytest.raises(UsageError, match="no Conv/Linear"):
        names(r18, include=("nothing*",))
    with pytest.raises(UsageError, match="not a valid regex") as info:
        GlobalMPConfig(exclude=("re:(",))
    assert info.value.exit_code == 2


def test_excluded_layers_are_untouched_and_not_counted(tiny_model):
    before = weights(tiny_model)
    result = run_globalmp(tiny_model, sparsity=0.9, exclude=("fc", "re:^features\\.0$"))
    after = weights(tiny_model)
    assert torch.equal(after["fc"], before["fc"]) and torch.equal(after["features.0"], before["features.0"])
    counted = before["features.3"].numel() + before["features.6"].numel()
    assert result.summary["prunable_weights"] == counted
    assert int((after["features.3"] == 0).sum() + (after["features.6"] == 0).sum()) == round(0.9 * counted)
    assert sorted(result.masks) == ["features.3.weight", "features.6.weight"]


# ----------------------------------------------------------------------------------------------------- schedule


def test_cubic_sparsity_endpoints_and_monotonicity():
    si, sf, end = 0.1, 0.9, 100
    assert cubic_sparsity(0, end, si, sf) == pytest.approx(si)
    assert cubic_sparsity(end, end, si, sf) == sf
    assert cubic_sparsity(end + 50, end, si, sf) == sf
    assert cubic_sparsity(5, 0, si, sf) == sf
    assert cubic_sparsity(50, end, si, sf) == pytest.approx(sf + (si - sf) * 0.5 ** 3)
    values = [cubic_sparsity(t, end, si, sf) for t in range(end + 10)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert all(si - 1e-12 <= v <= sf for v in values)
    # fast early, slow late (the point of the cubic)
    assert values[10] - values[0] > values[end] - values[end - 10]


@pytest.mark.parametrize("total_steps", [1, 7, 40])
def test_gradual_schedule_reaches_the_target_and_never_revives(total_steps):
    model = tiny_cnn()
    n_total = sum(w.numel() for w in weights(model).values())
    cfg = dict(sparsity=0.9, schedule="gradual", initial_sparsity=0.2)
    result = run_globalmp(model, **cfg)
    assert isinstance(result.step_hook, GradualSchedule)
    assert result.summary["pruned"] == round(0.2 * n_total)

    generator = torch.Generator().manual_seed(0)
    previous = {k: v.clone() for k, v in result.masks.items()}
    pruned_counts = []
    for step in range(total_steps):
        result.step_hook(step, total_steps)
        for name, mask in result.masks.items():
            assert not ((previous[name] == 0) & (mask == 1)).any(), f"{name} revived at step {step}"
        previous = {k: v.clone() for k, v in result.masks.items()}
        pruned_counts.append(sum(int((m == 0).sum()) for m in result.masks.values()))
        # a fake optimiser step that moves every weight (pruned ones too), then the training loop's re-masking
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        apply_masks(model, result.masks)

    assert pruned_counts == sorted(pruned_counts)
    assert pruned_counts[-1] == round(0.9 * n_total)
    zeros = sum(int((w == 0).sum()) for w in weights(model).values())
    assert zeros == round(0.9 * n_total)
    last_step, last_sparsity = result.step_hook.events[-1]
    assert last_step == int(GRADUAL_END_FRACTION * total_steps) and last_sparsity == 0.9
    for step, sparsity in result.step_hook.events:
        assert pruned_counts[step] == round(sparsity * n_total)
    refreshed = result.refresh()
    assert refreshed.summary["pruned"] == refreshed.summary["target_pruned"] == round(0.9 * n_total)


def test_gradual_schedule_keeps_floors():
    model = tiny_cnn()
    result = run_globalmp(model, sparsity=0.97, schedule="gradual", min_keep=0.02)
    for step in range(20):
        result.step_hook(step, 20)
    refreshed = result.refresh()
    assert refreshed.summary["pruned"] == refreshed.summary["target_pruned"]
    assert all(row["kept"] >= row["floor"] for row in refreshed.layers)


# --------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs,needle", [
    ({"sparsity": 1.0}, "sparsity = 1.0"),
    ({"sparsity": -0.1}, "sparsity = -0.1"),
    ({"sparsity": 1.5}, "sparsity = 1.5"),
    ({"schedule": "cubic"}, "cubic"),
    ({"min_keep": 1.5}, "min_keep"),
    ({"min_keep": -0.01}, "min_keep"),
    ({"min_threshold": 101.0}, "min_threshold"),
    ({"sparsity": 0.5, "initial_sparsity": 0.6}, "initial_sparsity"),
])
def test_config_validation(kwargs, needle):
    with pytest.raises(UsageError) as info:
        GlobalMPConfig(**kwargs)
    assert info.value.exit_code == 2
    assert needle in str(info.value)


def test_config_round_trip_and_unknown_keys():
    cfg = GlobalMPConfig(sparsity=0.8, include=("a*",), exclude=("re:b",), min_keep=0.01)
    assert GlobalMPConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UsageError, match="unknown key"):
        GlobalMPConfig.from_dict({"sparsity": 0.5, "sparsty": 0.5})


# --------------------------------------------------------------------------- fidelity against torch.nn.utils.prune


def distinct_magnitudes(model: nn.Module) -> None:
    """Give the Conv/Linear weights distinct magnitudes in their present order (ties by global index, the order
    GlobalMP breaks them in), signs kept: magnitude (rank + 1) / 2^24, exact in float32 below 2^24 weights."""
    tensors = [m.weight for m in model.modules() if isinstance(m, PRUNABLE)]
    flat = torch.cat([w.detach().abs().flatten() for w in tensors])
    assert flat.numel() < 2 ** 24
    magnitude = torch.empty_like(flat)
    magnitude[torch.argsort(flat, stable=True)] = torch.arange(1, flat.numel() + 1, dtype=flat.dtype) / 2 ** 24
    offset = 0
    with torch.no_grad():
        for w in tensors:
            n = w.numel()
            w.copy_(torch.where(w < 0, -1.0, 1.0) * magnitude[offset:offset + n].view_as(w))
            offset += n


@pytest.mark.parametrize("sparsity", [pytest.param(0.5, marks=pytest.mark.slow), 0.9,
                                      pytest.param(0.99, marks=pytest.mark.slow),
                                      pytest.param(0.999, marks=pytest.mark.slow)])
def test_masks_equal_torch_global_unstructured_on_resnet18(sparsity, resnet18_weights):
    """Without floors GlobalMP is global L1 magnitude pruning: the same masks as torch.nn.utils.prune's
    global_unstructured(L1Unstructured) over every Conv/Linear weight of resnet18. Ties: GlobalMP prunes the lowest
    global index first, torch.topk leaves their order unspecified, so the weights are first given distinct
    magnitudes in GlobalMP's order (ties by index); then both selections are fully determined and must agree."""
    from torch.nn.utils import prune as torch_prune

    ours, theirs = build("resnet18", resnet18_weights), build("resnet18", resnet18_weights)
    distinct_magnitudes(ours)
    theirs.load_state_dict(ours.state_dict())
    result = run_globalmp(ours, sparsity=sparsity)
    params = [(m, "weight") for m in theirs.modules() if isinstance(m, PRUNABLE)]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    for name, module in theirs.named_modules():
        if isinstance(module, PRUNABLE):
            assert torch.equal(result.masks[f"{name}.weight"], module.weight_mask), name
    assert result.summary["pruned"] == round(sparsity * result.summary["prunable_weights"])


def test_gradual_schedule_through_the_training_loop_ends_at_exactly_k(digits):
    """The cubic schedule as `compress prune` runs it: the step hook inside compress.finetune.train, the optimiser
    moving every weight between events; at the end exactly round(s x N) weights are zero and masked."""
    from compress.config import FinetuneConfig
    from compress.finetune import train

    model = tiny_cnn()
    result = run_globalmp(model, sparsity=0.9, schedule="gradual", initial_sparsity=0.3)
    n_total = result.summary["prunable_weights"]
    log = train(model, digits, FinetuneConfig(epochs=2, lr=0.05, batch_size=64, augment=False), masks=result.masks,
                step_hook=result.step_hook)
    assert log.epochs == 2 and len(result.step_hook.events) >= 3
    k = round(0.9 * n_total)
    assert result.step_hook.events[-1][1] == 0.9
    assert sum(int((m == 0).sum()) for m in result.masks.values()) == k
    zeros = sum(int((w == 0).sum()) for w in weights(model).values())
    assert zeros == k, f"{zeros} zero weights after training, expected exactly {k}"
    refreshed = result.refresh()
    assert refreshed.summary["pruned"] == refreshed.summary["target_pruned"] == k
    assert refreshed.summary["achieved"] == pytest.approx(k / n_total, abs=1e-12)


# --------------------------------------------------------------------- attention projections held as parameters


class TinyAttention(nn.Module):
    """8x8 digits as 8 tokens of 8 features: a Linear embedding, a position embedding (a bare parameter), one
    nn.MultiheadAttention (in_proj_weight: a bare matrix; out_proj: a Linear) and a head."""

    def __init__(self, dim: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.randn(1, 8, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.flatten(1, 2)) + self.pos
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


def tiny_attention() -> TinyAttention:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TinyAttention()


def test_attention_in_projection_is_ranked_masked_and_kept_through_training(digits):
    model = tiny_attention()
    in_proj = model.attn.in_proj_weight.detach().clone()
    n_total = sum(t.numel() for t in (model.embed.weight, in_proj, model.attn.out_proj.weight, model.head.weight))
    result = run_globalmp(model, sparsity=0.8)
    assert sorted(result.masks) == ["attn.in_proj_weight", "attn.out_proj.weight", "embed.weight", "head.weight"]
    assert result.summary["prunable_weights"] == n_total
    assert result.summary["counted_over"] == "conv/linear weights and attention input projections"
    k = round(0.8 * n_total)
    assert result.summary["pruned"] == k
    mask = result.masks["attn.in_proj_weight"].bool()
    assert 0 < int((~mask).sum()) < mask.numel()
    assert torch.equal(model.attn.in_proj_weight == 0, ~mask)
    assert torch.equal(model.attn.in_proj_weight[mask], in_proj[mask])
    row = next(r for r in result.layers if r["param"] == "attn.in_proj_weight")
    assert (row["name"], row["kind"], row["weights"]) == ("attn.in_proj_weight", "MultiheadAttention", in_proj.numel())
    # the one global order spans the projection too
    params = dict(model.named_parameters())
    kept = torch.cat([params[n][m.bool()].abs().flatten() for n, m in result.masks.items()])
    pruned = torch.cat([torch.cat([w.abs().flatten() for w in weights(tiny_attention()).values()]),
                        in_proj.abs().flatten()])
    assert kept.min() >= pruned.sort().values[k - 1]
    # the position embedding is named, not silently left out
    assert result.summary["excluded"] == [{"name": "pos", "kind": "TinyAttention", "shape": [1, 8, 16],
                                           "weights": 128, "reason": result.summary["excluded"][0]["reason"]}]
    assert "position embedding" in result.summary["excluded"][0]["reason"]
    assert result.summary["excluded_weights"] == 128

    from compress.config import FinetuneConfig
    from compress.finetune import train

    train(model, digits, FinetuneConfig(epochs=1, lr=0.05, batch_size=64, augment=False), masks=result.masks)
    assert torch.equal(model.attn.in_proj_weight == 0, ~mask), "a pruned in-projection weight was revived"
    assert sum(int((params[n] == 0).sum()) for n in result.masks) == k


def test_attention_patterns_and_dry_run_plan():
    from compress.methods.globalmp import plan

    model = tiny_attention()
    assert [layer.param_name for layer in prunable_layers(model, GlobalMPConfig())] == [
        "embed.weight", "attn.in_proj_weight", "attn.out_proj.weight", "head.weight"]
    assert [layer.param_name for layer in prunable_layers(model, GlobalMPConfig(exclude=("attn",)))] == [
        "embed.weight", "attn.out_proj.weight", "head.weight"]
    listing = plan(model, GlobalMPConfig(sparsity=0.5), Context(torch.zeros(1, 1, 8, 8)))
    assert [r["name"] for r in listing["ranked"]] == [
        "embed.weight", "attn.in_proj_weight", "attn.out_proj.weight", "head.weight"]
    assert listing["to_prune"] == round(0.5 * listing["prunable_weights"])
    assert [s["name"] for s in listing["skipped"]] == ["pos"] and listing["excluded"][0]["weights"] == 128
    # a per-channel scale (C, 1, 1) is a vector, not a matrix left out: not listed
    scaled = nn.Sequential(nn.Conv2d(1, 4, 3))
    scaled.register_parameter("scale", nn.Parameter(torch.ones(4, 1, 1)))
    assert plan(scaled, GlobalMPConfig(sparsity=0.5), Context(torch.zeros(1, 1, 8, 8)))["excluded"] == []
    # separate q/k/v projections (kdim != embed_dim) are ranked too
    cross = nn.MultiheadAttention(16, 2, kdim=8, vdim=8)
    assert [layer.param_name for layer in prunable_layers(cross, GlobalMPConfig())] == [
        "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]
