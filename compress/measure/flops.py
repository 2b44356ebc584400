"""MACs counted by torch's own FlopCounterMode (FLOPs = 2 x MACs), plus effective MACs for sparse weights."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

CROSS_CHECK_TOLERANCE = 0.02


def _cpu_attention_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *_args: object,
                         out_shape: object = None, **_kwargs: object) -> int:
    """FLOPs of CPU scaled-dot-product attention: the two batched matmuls, as for the CUDA kernels."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# The stock counter knows the CUDA attention kernels but not the one CPU inference dispatches to, so a ViT on CPU
# would lose its attention matmuls (4% of vit_b_16).
ATTENTION_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}

WEIGHTED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class MacCount:
    """Dense MACs and MACs of the nonzero weights for one input (batch 1)."""

    macs: int
    macs_effective: int
    per_layer: dict[str, int]
    cross_check: dict | None = None  # Torch-Pruning's count and the relative difference, when asked for

    @property
    def flops(self) -> int:
        return 2 * self.macs


def _layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """MACs of one Conv/Linear call per item: outputs x inputs feeding each output."""
    per_output = module.in_features if isinstance(module, nn.Linear) else (
        module.in_channels // module.groups * int(torch.tensor(module.kernel_size).prod()))
    return output[0].numel() * per_output if output.ndim > 1 else output.numel() * per_output


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor, *, cross_check: bool = False) -> MacCount:
    """Count MACs for one item of `example` (a batch of 1 is taken from it).

    Effective MACs scale each Conv/Linear layer by the density of its weight, which is what sparse kernels
    could at best skip; dense runtimes still execute the dense MACs. With `cross_check`, Torch-Pruning's
    counter counts too, and a `UserWarning` names both counts when they differ by more than 2%.
    """
    x = example[:1]
    per_layer: dict[str, int] = {}
    hooks = [module.register_forward_hook(
        lambda mod, _inp, out, name=name: per_layer.__setitem__(name, per_layer.get(name, 0) + _layer_macs(mod, out)))
        for name, module in model.named_modules() if isinstance(module, WEIGHTED_TYPES)]
    was_training = model.training
    model.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel hides its matmuls from the counter
    try:
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS) as counter:
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    macs = counter.get_total_flops() // 2
    modules = dict(model.named_modules())
    saved = sum(layer_macs * (1.0 - _density(modules[name].weight)) for name, layer_macs in per_layer.items())
    checked = _cross_check(model, x, int(macs)) if cross_check else None
    return MacCount(int(macs), int(round(macs - saved)), per_layer, checked)


def _cross_check(model: nn.Module, x: torch.Tensor, macs: int) -> dict:
    """Torch-Pruning's MAC count beside ours, warning when they disagree by more than the tolerance."""
    import torch_pruning as tp

    was_training = model.training
    try:
        total, _params, per_module, _ = tp.utils.count_ops_and_params(model.eval(), x, layer_wise=True)
    finally:
        model.train(was_training)
    # Torch-Pruning also counts normalisation, activation and pooling ops; FlopCounterMode counts matmuls only.
    theirs = int(total - sum(ops for module, ops in per_module.items() if _elementwise(module)))
    difference = (theirs - macs) / macs if macs else 0.0
    if abs(difference) > CROSS_CHECK_TOLERANCE:
        warnings.warn(f"MAC counters disagree: FlopCounterMode {macs:,}, Torch-Pruning {theirs:,} "
                      f"({difference:+.1%}); compress reports FlopCounterMode's", stacklevel=3)
    return {"torch_pruning_macs": theirs, "relative_difference": round(difference, 5),
            "agrees": abs(difference) <= CROSS_CHECK_TOLERANCE}


def _elementwise(module: object) -> bool:
    """Normalisation, activation and pooling modules: ops that are not multiply-accumulates of weights."""
    if isinstance(module, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm):
        return True
    home = type(module).__module__
    return home in ("torch.nn.modules.activation", "torch.nn.modules.pooling") and \
        not isinstance(module, nn.MultiheadAttention)


def _density(weight: torch.Tensor) -> float:
    return float(weight.count_nonzero()) / weight.numel()
