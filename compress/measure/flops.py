"""MACs counted by torch's own FlopCounterMode (FLOPs = 2 x MACs), plus effective MACs for sparse weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

WEIGHTED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class MacCount:
    """Dense MACs and MACs of the nonzero weights for one input (batch 1)."""

    macs: int
    macs_effective: int
    per_layer: dict[str, int]

    @property
    def flops(self) -> int:
        return 2 * self.macs


def _layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """MACs of one Conv/Linear call per item: outputs x inputs feeding each output."""
    per_output = module.in_features if isinstance(module, nn.Linear) else (
        module.in_channels // module.groups * int(torch.tensor(module.kernel_size).prod()))
    return output[0].numel() * per_output if output.ndim > 1 else output.numel() * per_output


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> MacCount:
    """Count MACs for one item of `example` (a batch of 1 is taken from it).

    Effective MACs scale each Conv/Linear layer by the density of its weight, which is what sparse kernels
    could at best skip; dense runtimes still execute the dense MACs.
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
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    macs = counter.get_total_flops() // 2
    modules = dict(model.named_modules())
    saved = sum(layer_macs * (1.0 - _density(modules[name].weight)) for name, layer_macs in per_layer.items())
    return MacCount(int(macs), int(round(macs - saved)), per_layer)


def _density(weight: torch.Tensor) -> float:
    return float(weight.count_nonzero()) / weight.numel()
