"""MACs against torchvision's published number, effective MACs of sparse weights, parameter counts, sizes."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from compress.config import GlobalMPConfig
from compress.measure import count_macs, count_params, model_sizes
from compress.methods import METHODS, Context
from tests.factories import tiny_cnn

IMAGENET = (1, 3, 224, 224)


def resnet18(num_classes: int = 1000) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=num_classes)


@pytest.fixture(scope="module")
def pruned_r18():
    """resnet18 (1000 classes) pruned to 90% by GlobalMP, with its Result."""
    model = resnet18()
    result = METHODS["globalmp"].apply(model, GlobalMPConfig(sparsity=0.9), Context(torch.zeros(IMAGENET)))
    return model, result


def test_resnet18_macs_match_torchvision():
    macs = count_macs(resnet18(), torch.randn(IMAGENET))
    assert macs.macs == pytest.approx(1.814e9, rel=1e-3)  # torchvision's published 1.814 GMACs
    assert macs.flops == 2 * macs.macs
    assert macs.macs_effective == macs.macs  # dense weights
    assert sum(macs.per_layer.values()) == macs.macs  # every MAC of resnet18 is in a Conv or the Linear
    assert len(macs.per_layer) == 21
    # conv1: 112x112 outputs x 64 channels x 3*7*7 inputs each
    assert macs.per_layer["conv1"] == 112 * 112 * 64 * 3 * 7 * 7
    assert macs.per_layer["fc"] == 512 * 1000


@pytest.mark.parametrize(("name", "published_gmacs"), [("mobilenet_v2", 0.301), ("vit_b_16", 17.564)])
def test_macs_match_torchvision_published(name, published_gmacs):
    model = getattr(torchvision.models, name)().eval()
    macs = count_macs(model, torch.randn(IMAGENET), cross_check=True)
    assert macs.macs == pytest.approx(published_gmacs * 1e9, rel=1e-3)
    assert macs.cross_check["agrees"], macs.cross_check  # Torch-Pruning's counter, norms and activations left out


def test_vit_counts_cpu_attention():
    """The CPU attention kernel is counted: the stock counter alone misses QK^T and AV of every block."""
    from torch.utils.flop_counter import FlopCounterMode

    model = torchvision.models.vit_b_16().eval()
    x = torch.randn(IMAGENET)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as stock, torch.no_grad():
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    blocks, heads, tokens, head_dim = 12, 12, 197, 64
    attention_macs = blocks * heads * 2 * tokens * tokens * head_dim
    assert count_macs(model, x).macs - stock.get_total_flops() // 2 == attention_macs


def test_cross_check_warns_when_counters_disagree():
    """A weight used through a functional matmul is invisible to Torch-Pruning's module hooks."""

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.weight = nn.Parameter(torch.randn(8, 64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) @ self.weight

    with pytest.warns(UserWarning, match="MAC counters disagree"):
        macs = count_macs(Functional(), torch.randn(1, 8), cross_check=True)
    assert macs.macs == 8 * 8 + 8 * 64
    assert not macs.cross_check["agrees"]


def test_macs_are_per_item_and_restore_mode():
    model = tiny_cnn().train()
    one = count_macs(model, torch.randn(1, 1, 8, 8))
    many = count_macs(model, torch.randn(16, 1, 8, 8))
    assert one.macs == many.macs > 0
    assert model.training
    # TinyCNN by hand: 8x8x8x9 + 4x4x16x72 + 4x4x16x144 + 16x10
    assert one.macs == 8 * 8 * 8 * 9 + 4 * 4 * 16 * 72 + 4 * 4 * 16 * 144 + 16 * 10


def test_effective_macs_of_90_percent_resnet18(pruned_r18):
    model, result = pruned_r18
    macs = count_macs(model, torch.randn(IMAGENET))
    assert macs.macs == pytest.approx(1.814e9, rel=1e-3)  # dense MACs do not change with zeros
    ratio = macs.macs_effective / macs.macs
    assert 0.15 <= ratio <= 0.4, ratio  # DESIGN.md: about 26%, not 10%
    modules = dict(model.named_modules())
    expected = 0.0
    for name, layer_macs in macs.per_layer.items():
        mask = result.masks[f"{name}.weight"]
        density = float(mask.sum()) / mask.numel()
        assert density == pytest.approx(float((modules[name].weight != 0).sum()) / mask.numel())
        expected += layer_macs * density
    assert abs(macs.macs_effective - expected) <= 1


def test_effective_macs_of_a_shared_module_count_every_call():
    """A layer called twice contributes twice, scaled by its density."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8, bias=False)

        def forward(self, x):
            return self.lin(self.lin(x))

    model = Twice()
    with torch.no_grad():
        model.lin.weight.copy_(torch.ones(8, 8))
        model.lin.weight[:, :6] = 0  # density 0.25
    macs = count_macs(model, torch.randn(1, 8))
    assert macs.macs == 128 and macs.per_layer == {"lin": 128}
    assert macs.macs_effective == 32


def test_count_params_nonzero(pruned_r18):
    model, result = pruned_r18
    counts = count_params(model)
    reference = resnet18()
    assert counts.total == sum(p.numel() for p in reference.parameters()) == 11_689_512
    pruned = result.summary["pruned"]
    bn_biases = sum(m.bias.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d))  # zero at init
    assert counts.nonzero == counts.total - pruned - bn_biases
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert counts.buffers == sum(2 * m.num_features + 1 for m in bn)


def test_count_params_tiny():
    model = tiny_cnn()
    counts = count_params(model)
    assert counts.total == 3688 + 10 + 2 * (8 + 16 + 16)  # weights, fc bias, BN affine
    assert counts.nonzero == counts.total - (8 + 16 + 16)  # BN biases start at zero
    with torch.no_grad():
        model.fc.weight.zero_()
    assert count_params(model).nonzero == counts.nonzero - 160


def test_model_sizes(pruned_r18):
    model, _ = pruned_r18
    sizes = model_sizes(model).bytes
    assert set(sizes) == {"safetensors_dense", "safetensors_sparse"}
    assert sizes["safetensors_dense"] >= 4 * 11_689_512
    assert sizes["safetensors_sparse"] < 0.15 * sizes["safetensors_dense"]
