"""GlobalMP: global magnitude pruning with per-layer floors (Gupta et al.), one-shot or gradual.

One ranking over every prunable weight; exactly round(sparsity * N) weights go, the smallest magnitudes first,
ties broken by position. Each layer's floor protects its largest weights from the ranking, which is the
"minimum threshold" of the paper in its cleaner equivalent form (METHODS.md §1).

The ranked weights are those of every convolution and Linear, and the input projections that
nn.MultiheadAttention holds as bare parameters (`in_proj_weight`, or `q/k/v_proj_weight`); a mask is kept per
parameter name, so these are masked, kept masked during fine-tuning and saved like any other. Every other
matrix or table (embedding tables, position embeddings, relative-position bias tables, recurrent weights) is
left out of the ranking and named in the summary's `excluded`, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.config import GlobalMPConfig, matches
from compress.errors import UsageError
from compress.methods.base import AuditOutcome, Context, Masks, Result, register

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                  nn.Linear)
# matrix weights a module holds as bare parameters and multiplies its input by, ranked like a Linear's weight
BARE_MATRICES: dict[type[nn.Module], tuple[str, ...]] = {
    nn.MultiheadAttention: ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
}
GRADUAL_EVENTS = 10          # pruning steps in the cubic schedule
GRADUAL_END_FRACTION = 0.75  # the schedule ends here, leaving the last quarter of steps to recover


@dataclass(frozen=True)
class PrunableLayer:
    """A weight tensor taking part in the global ranking."""

    name: str          # module name
    kind: str          # module class name
    weight: nn.Parameter
    param: str = "weight"  # the parameter's name in its module

    @property
    def param_name(self) -> str:
        return f"{self.name}.{self.param}" if self.name else self.param


def _selected(name: str, cfg: GlobalMPConfig) -> bool:
    """Whether the include/exclude patterns select module `name`."""
    if cfg.include and not any(matches(name, p) for p in cfg.include):
        return False
    return not any(matches(name, p) for p in cfg.exclude)


def _matrices(module: nn.Module) -> list[str]:
    """The parameter names of `module`'s own weight matrices that take part in the ranking."""
    if isinstance(module, PRUNABLE_TYPES):
        return ["weight"]
    for kind, params in BARE_MATRICES.items():
        if isinstance(module, kind):
            return [p for p in params if module._parameters.get(p) is not None]
    return []


def prunable_layers(model: nn.Module, cfg: GlobalMPConfig) -> list[PrunableLayer]:
    """Conv/Linear weights and attention input projections selected by the include/exclude patterns (matched on
    module names), in module order."""
    layers = []
    for name, module in model.named_modules():
        if _selected(name, cfg):
            layers += [PrunableLayer(name, type(module).__name__, module._parameters[p], p) for p in _matrices(module)]
    if not layers:
        raise UsageError("no Conv/Linear weights match `include`/`exclude`; loosen the patterns")
    return layers


def _exclusion_reason(module: nn.Module, param: str) -> str:
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return "embedding table (a lookup, not a weight matrix that multiplies an input)"
    if isinstance(module, nn.RNNBase):
        return f"recurrent weight of {type(module).__name__} (not ranked; exclude the module or prune it otherwise)"
    return (f"a bare parameter of {type(module).__name__} (not a Conv/Linear weight or an attention projection, "
            "e.g. a position embedding or a bias table)")


def excluded_weights(model: nn.Module, cfg: GlobalMPConfig) -> list[dict[str, Any]]:
    """Matrices and tables (parameters with two or more dimensions longer than 1) that the ranking leaves out though
    the patterns select their module: name, kind, shape, weights and why. Per-channel scales shaped (C, 1, 1) and
    class tokens (1, 1, D) are vectors, like biases and norms, and are not listed."""
    rows = []
    for name, module in model.named_modules():
        if not _selected(name, cfg):
            continue
        ranked = set(_matrices(module))
        for param, tensor in module._parameters.items():
            if tensor is None or sum(size > 1 for size in tensor.shape) < 2 or param in ranked:
                continue
            rows.append({"name": f"{name}.{param}" if name else param, "kind": type(module).__name__,
                         "shape": list(tensor.shape), "weights": tensor.numel(),
                         "reason": _exclusion_reason(module, param)})
    return rows


def counted_over(layers: list[PrunableLayer]) -> str:
    """What the sparsity is counted over, in words."""
    if any(layer.param != "weight" for layer in layers):
        return "conv/linear weights and attention input projections"
    return "conv/linear weights"


def layer_floors(sizes: list[int], cfg: GlobalMPConfig) -> list[int]:
    """Weights each layer must keep: the larger of the paper's MT (percent of N) and min_keep of its own."""
    total = sum(sizes)
    threshold = round(cfg.min_threshold / 100.0 * total)
    return [min(n, max(threshold, math.ceil(cfg.min_keep * n - 1e-9))) for n in sizes]


def check_feasible(sizes: list[int], floors: list[int], sparsity: float) -> int:
    """Number of weights to prune; raises if the floors forbid reaching `sparsity`."""
    total = sum(sizes)
    to_prune = round(sparsity * total)
    if sum(floors) > total - to_prune:
        largest = math.floor((1.0 - sum(floors) / total) * 1e6) / 1e6  # rounded down, so it is reachable
        raise UsageError(f"sparsity {sparsity} is unreachable with these floors: they keep {sum(floors)} of "
                         f"{total} weights, so the largest reachable sparsity is {largest:.6f}; lower "
                         "`sparsity` or `min_threshold`/`min_keep`")
    return to_prune


def select_pruned(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the k smallest scores; ties at the threshold go lowest index first."""
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return pruned
    # NumPy's introselect is an order of magnitude faster than torch.kthvalue on CPU for tens of millions
    threshold = float(np.partition(scores.numpy(), k - 1)[k - 1])
    pruned = scores < threshold
    need = k - int(pruned.sum())
    ties = torch.nonzero(scores == threshold).flatten()[:need]
    pruned[ties] = True
    return pruned


def global_scores(layers: list[PrunableLayer], floors: list[int], masks: Masks | None = None) -> torch.Tensor:
    """|w| over all layers; each layer's `floor` largest set to +inf, already-pruned weights to -1."""
    parts = []
    for layer, floor in zip(layers, floors):
        score = layer.weight.detach().abs().flatten().float().cpu()
        if masks is not None and layer.param_name in masks:
            score = torch.where(masks[layer.param_name].flatten().cpu().bool(), score, torch.full_like(score, -1.0))
        if floor > 0:
            score[score.topk(floor).indices] = math.inf
        parts.append(score)
    return torch.cat(parts)


def compute_masks(layers: list[PrunableLayer], cfg: GlobalMPConfig, sparsity: float,
                  previous: Masks | None = None) -> Masks:
    """Masks (1 = kept) that prune exactly round(sparsity * N) weights by the global ranking."""
    sizes = [layer.weight.numel() for layer in layers]
    floors = layer_floors(sizes, cfg)
    to_prune = check_feasible(sizes, floors, sparsity)
    pruned = select_pruned(global_scores(layers, floors, previous), to_prune)
    masks, offset = {}, 0
    for layer, n in zip(layers, sizes):
        keep = ~pruned[offset:offset + n]
        masks[layer.param_name] = keep.view_as(layer.weight).to(layer.weight.device, layer.weight.dtype)
        offset += n
    return masks


def apply_masks_to(layers: list[PrunableLayer], masks: Masks) -> None:
    """Zero the pruned weights in place."""
    with torch.no_grad():
        for layer in layers:
            layer.weight.masked_fill_(masks[layer.param_name] == 0, 0.0)  # +0.0, where mul_ would give -0.0


def layer_stats(layers: list[PrunableLayer], cfg: GlobalMPConfig, masks: Masks) -> list[dict]:
    """Per-layer audit: shape, weights, kept, sparsity, floor and whether the floor bound it. A row is named by
    its module (`param` names the parameter: `weight`, or an attention projection's own name)."""
    sizes = [layer.weight.numel() for layer in layers]
    rows = []
    for layer, n, floor in zip(layers, sizes, layer_floors(sizes, cfg)):
        kept = int(masks[layer.param_name].count_nonzero())
        shape = list(layer.weight.shape)
        name = layer.name if layer.param == "weight" else layer.param_name
        rows.append({"name": name, "kind": layer.kind, "param": layer.param_name, "shape_before": shape,
                     "shape_after": shape, "params_before": n, "params_after": kept, "weights": n, "kept": kept,
                     "sparsity": 1.0 - kept / n, "floor": floor, "floor_hit": floor > 0 and kept <= floor})
    return rows


def summarise(layers: list[PrunableLayer], cfg: GlobalMPConfig, masks: Masks,
              excluded: list[dict[str, Any]] | None = None) -> dict:
    """Requested vs achieved sparsity over the ranked weights, and the weight matrices left out of the ranking."""
    total = sum(layer.weight.numel() for layer in layers)
    kept = sum(int(masks[layer.param_name].count_nonzero()) for layer in layers)
    excluded = excluded or []
    return {"requested": cfg.sparsity, "achieved": 1.0 - kept / total, "pruned": total - kept,
            "target_pruned": round(cfg.sparsity * total), "counted_over": counted_over(layers),
            "prunable_weights": total, "schedule": cfg.schedule, "excluded": excluded,
            "excluded_weights": sum(row["weights"] for row in excluded)}


def cubic_sparsity(step: int, end_step: int, initial: float, final: float) -> float:
    """Zhu & Gupta's schedule: s_t = s_f + (s_i - s_f)(1 - t / end)^3, clamped at s_f after `end`."""
    if end_step <= 0 or step >= end_step:
        return final
    return final + (initial - final) * (1.0 - step / end_step) ** 3


class GradualSchedule:
    """Step hook for fine-tuning: re-ranks globally at each event; pruned weights stay pruned."""

    def __init__(self, layers: list[PrunableLayer], cfg: GlobalMPConfig, masks: Masks) -> None:
        self.layers, self.cfg, self.masks = layers, cfg, masks
        self.events: list[tuple[int, float]] = []

    def __call__(self, step: int, total_steps: int) -> None:
        end = int(GRADUAL_END_FRACTION * total_steps)
        every = max(1, end // GRADUAL_EVENTS)
        if step > end or (step % every and step != end):
            return
        sparsity = cubic_sparsity(step, end, self.cfg.initial_sparsity, self.cfg.sparsity)
        if step == end:
            sparsity = self.cfg.sparsity
        self.masks.update(compute_masks(self.layers, self.cfg, sparsity, previous=self.masks))
        apply_masks_to(self.layers, self.masks)
        self.events.append((step, sparsity))


def audit(result: Result, cfg: GlobalMPConfig, shipped: nn.Module, original: nn.Module,
          ctx: Context) -> AuditOutcome:
    """Exactly round(s x N) of the ranked weights pruned, zero in the shipped weights, and every layer at or
    above its floor (counted on the shipped weights)."""
    outcome = AuditOutcome()
    params = dict(shipped.named_parameters())
    total = sum(mask.numel() for mask in result.masks.values())
    pruned = sum(int((mask == 0).sum()) for mask in result.masks.values())
    zeros = sum(int((params[name] == 0).sum()) for name in result.masks)
    target = round(cfg.sparsity * total)
    outcome.figures.update(pruned=pruned, zero_weights=zeros, target_pruned=target)
    if pruned != target or zeros < target:
        outcome.problems.append(f"pruned {pruned} weights ({zeros} zero in the shipped model), requested {target} "
                                f"(sparsity {pruned / max(total, 1):.6f} vs {cfg.sparsity})")
    for layer in result.layers:
        kept = int(params[layer.get("param", f"{layer['name']}.weight")].count_nonzero())
        if kept < layer.get("floor", 0):
            outcome.problems.append(f"layer {layer['name']} keeps {kept} weights, below its floor {layer['floor']}")
    return outcome


@register("globalmp", GlobalMPConfig, audit=audit, layer_kind="pruning")
def apply(model: nn.Module, cfg: GlobalMPConfig, ctx: Context) -> Result:
    """Prune `model` in place by global magnitude with floors.

    One-shot: the target sparsity now. Gradual: `initial_sparsity` now, then the returned `step_hook`
    follows the cubic schedule to the target during fine-tuning (which must then run at least one step).
    """
    layers = prunable_layers(model, cfg)
    excluded = excluded_weights(model, cfg)
    sizes = [layer.weight.numel() for layer in layers]
    check_feasible(sizes, layer_floors(sizes, cfg), cfg.sparsity)
    first = cfg.sparsity if cfg.schedule == "oneshot" else cfg.initial_sparsity
    masks = compute_masks(layers, cfg, first)
    apply_masks_to(layers, masks)
    result = _result(model, layers, cfg, masks, excluded)
    if cfg.schedule == "gradual":
        result.step_hook = GradualSchedule(layers, cfg, masks)
        result.refresh = lambda: _result(model, layers, cfg, masks, excluded)
    return result


def plan(model: nn.Module, cfg: GlobalMPConfig, ctx: Context) -> dict[str, Any]:
    """What a run would rank (`--dry-run`), before any work: every ranked tensor with its floor, the weights that
    would go, and the weight matrices left out of the ranking (`excluded`, also as `skipped` name/reason pairs)."""
    layers = prunable_layers(model, cfg)
    sizes = [layer.weight.numel() for layer in layers]
    floors = layer_floors(sizes, cfg)
    excluded = excluded_weights(model, cfg)
    return {"ranked": [{"name": layer.param_name, "kind": layer.kind, "shape": list(layer.weight.shape),
                        "weights": n, "floor": floor} for layer, n, floor in zip(layers, sizes, floors)],
            "prunable_weights": sum(sizes), "to_prune": check_feasible(sizes, floors, cfg.sparsity),
            "counted_over": counted_over(layers), "excluded": excluded,
            "skipped": [{"name": row["name"], "reason": row["reason"]} for row in excluded]}


def _result(model: nn.Module, layers: list[PrunableLayer], cfg: GlobalMPConfig, masks: Masks,
            excluded: list[dict[str, Any]] | None = None) -> Result:
    """The result as the masks stand now, with the report's sparsity section."""
    summary = summarise(layers, cfg, masks, excluded)
    sparsity = {k: summary[k] for k in ("requested", "achieved", "counted_over")}
    return Result(model, masks, layer_stats(layers, cfg, masks), summary, sections={"sparsity": sparsity})
