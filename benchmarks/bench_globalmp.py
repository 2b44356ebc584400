"""GlobalMP against its peers on the built-in model; writes reports/globalmp.md and reports/globalmp.json.

Accuracy at each sparsity right after pruning and after one epoch of fine-tuning (masks kept) for GlobalMP,
GlobalMP with floors, uniform layer-wise magnitude pruning and torch.nn.utils.prune.global_unstructured; bytes
on disk; and the wall time of the pruning step on torchvision resnet50 against global_unstructured, interleaved
in one process on one thread.

    python benchmarks/bench_globalmp.py [--sparsities 0.5,0.9] [--epochs 1] [--threads 2] [--timing-rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn.utils import prune as torch_prune

from compress.artifact import dense_bytes, sparse_bytes, to_json, write_atomic
from compress.config import FinetuneConfig, GlobalMPConfig
from compress.data import Splits, load_dataset
from compress.finetune import evaluate, recalibrate_batchnorm, train
from compress.measure.conditions import environment
from compress.methods.globalmp import apply_masks_to, compute_masks, prunable_layers
from compress.models import load_model

SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)
FLOOR_MT = 0.01  # percent of all prunable weights kept per layer: feasible up to 0.995 on the built-in model
REPORTS = Path(__file__).resolve().parent.parent / "reports"
Masks = dict[str, torch.Tensor]


def _weights(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def globalmp(model: nn.Module, sparsity: float, min_threshold: float = 0.0) -> Masks:
    """compress's GlobalMP (optionally with the paper's minimum threshold)."""
    cfg = GlobalMPConfig(sparsity=sparsity, min_threshold=min_threshold)
    layers = prunable_layers(model, cfg)
    masks = compute_masks(layers, cfg, sparsity)
    apply_masks_to(layers, masks)
    return masks


def _torch_prune_masks(model: nn.Module, prune_fn: Callable[[list[tuple[nn.Module, str]]], None]) -> Masks:
    """Run a torch.nn.utils.prune method, make it permanent, and return its masks."""
    params = [(m, "weight") for _, m in _weights(model)]
    prune_fn(params)
    masks = {f"{n}.weight": m.weight_mask.detach().clone() for n, m in _weights(model)}
    for module, name in params:
        torch_prune.remove(module, name)
    return masks


def global_unstructured(model: nn.Module, sparsity: float) -> Masks:
    """The peer users have today: torch.nn.utils.prune.global_unstructured with L1."""
    return _torch_prune_masks(model, lambda params: torch_prune.global_unstructured(
        params, pruning_method=torch_prune.L1Unstructured, amount=sparsity))


def uniform(model: nn.Module, sparsity: float) -> Masks:
    """Layer-wise magnitude pruning: every layer loses the same fraction."""
    def run(params: list[tuple[nn.Module, str]]) -> None:
        for module, name in params:
            torch_prune.l1_unstructured(module, name, amount=sparsity)
    return _torch_prune_masks(model, run)


METHODS: dict[str, Callable[[nn.Module, float], Masks]] = {
    "GlobalMP": globalmp,
    f"GlobalMP + {FLOOR_MT}% MT": lambda m, s: globalmp(m, s, FLOOR_MT),
    "uniform layer-wise": uniform,
    "torch global_unstructured": global_unstructured,
}


def accuracy_table(base: nn.Module, splits: Splits, sparsities: tuple[float, ...], tune: FinetuneConfig,
                   seed: int) -> list[dict]:
    """Every method at every sparsity: accuracy after pruning and after fine-tuning, bytes, smallest layer."""
    rows = []
    for sparsity in sparsities:
        finetuned: dict[str, tuple[Masks, float]] = {}
        for name, method in METHODS.items():
            model = copy.deepcopy(base)
            masks = method(model, sparsity)
            kept = sum(int(m.sum()) for m in masks.values())
            total = sum(m.numel() for m in masks.values())
            row = {"method": name, "sparsity": sparsity, "achieved": 1 - kept / total,
                   "min_layer_kept": min(int(m.sum()) for m in masks.values()),
                   "acc_pruned_raw": evaluate(model, splits.test).accuracy}
            recalibrate_batchnorm(model, splits.calibration)  # what `compress prune` does after every method
            row |= {"acc_pruned": evaluate(model, splits.test).accuracy,
                   "bytes_sparse": len(sparse_bytes(model)), "bytes_dense": len(dense_bytes(model))}
            twin = next((other for other, (m, _) in finetuned.items()
                         if m.keys() == masks.keys() and all(torch.equal(m[k], masks[k]) for k in m)), None)
            if twin is not None:  # identical masks from the same weights: fine-tuning would repeat the twin's run
                row.update(acc_finetuned=finetuned[twin][1], finetune_note=f"same masks as {twin}")
            else:
                started = time.perf_counter()
                train(model, splits, tune, masks=masks, seed=seed)
                row.update(acc_finetuned=evaluate(model, splits.test).accuracy,
                           finetune_seconds=time.perf_counter() - started)
                finetuned[name] = (masks, row["acc_finetuned"])
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def resnet50_timing(rounds: int, sparsity: float = 0.9) -> dict:
    """Wall time of the pruning step, GlobalMP vs global_unstructured, interleaved, one thread."""
    torch.set_num_threads(1)
    base = torchvision.models.resnet50(weights=None)
    ours, peer = [], []
    for i in range(rounds):
        for name in (("ours", "peer") if i % 2 == 0 else ("peer", "ours")):
            model = copy.deepcopy(base)
            started = time.perf_counter()
            (globalmp if name == "ours" else global_unstructured)(model, sparsity)
            (ours if name == "ours" else peer).append(time.perf_counter() - started)
    ratios = [o / p for o, p in zip(ours, peer)]
    return {"model": "torchvision resnet50", "sparsity": sparsity, "rounds": rounds, "threads": 1,
            "globalmp_median_s": statistics.median(ours), "global_unstructured_median_s": statistics.median(peer),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def render(rows: list[dict], timing: dict, meta: dict) -> str:
    """reports/globalmp.md."""
    lines = ["# GlobalMP on the built-in model", "",
             f"Built-in `rescnn` on Fashion-MNIST (test split, {meta['test_items']} items); dense test accuracy "
             f"**{meta['dense_accuracy']:.2f}%**. Sparsity counted over conv/linear weights "
             f"({meta['prunable_weights']:,}). After pruning, every method's model has its BatchNorm statistics "
             "re-estimated on the 5,000-item calibration split, as `compress prune` does. Fine-tuning: "
             f"{meta['tune']['epochs']} epoch(s), SGD lr {meta['tune']['lr']} cosine, label smoothing "
             f"{meta['tune']['label_smoothing']}, masks re-applied after every step. Floors: the paper's minimum "
             f"threshold, {FLOOR_MT}% of all prunable weights per layer. Generated by `make bench-globalmp`.", "",
             "## Test accuracy (%): right after pruning → after the BatchNorm re-estimate → after fine-tuning", ""]
    methods = list(METHODS)
    lines += ["| sparsity | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for sparsity in sorted({r["sparsity"] for r in rows}):
        cells = []
        for method in methods:
            row = next(r for r in rows if r["sparsity"] == sparsity and r["method"] == method)
            note = "*" if "finetune_note" in row else ""
            cells.append(f"{row['acc_pruned_raw']:.2f} → {row['acc_pruned']:.2f} → {row['acc_finetuned']:.2f}{note}")
        lines.append(f"| {sparsity} | " + " | ".join(cells) + " |")
    lines += ["", "\\* identical masks to GlobalMP's (checked tensor by tensor), so the fine-tuned figure is that "
              "run's.", "", "## Smallest layer (weights kept) and bytes on disk (GlobalMP)", "",
              "| sparsity | smallest layer, GlobalMP | smallest layer, with MT | uniform | sparse bytes | dense bytes "
              "| sparse/dense |", "|---|---|---|---|---|---|---|"]
    for sparsity in sorted({r["sparsity"] for r in rows}):
        by = {r["method"]: r for r in rows if r["sparsity"] == sparsity}
        g = by["GlobalMP"]
        lines.append(f"| {sparsity} | {g['min_layer_kept']} | {by[methods[1]]['min_layer_kept']} | "
                     f"{by['uniform layer-wise']['min_layer_kept']} | {g['bytes_sparse']:,} | {g['bytes_dense']:,} | "
                     f"{g['bytes_sparse'] / g['bytes_dense']:.3f} |")
    lines += ["", "## Pruning step on torchvision resnet50 at 0.9 (one thread, interleaved)", "",
              f"GlobalMP median {timing['globalmp_median_s']:.3f} s, `global_unstructured` median "
              f"{timing['global_unstructured_median_s']:.3f} s over {timing['rounds']} rounds: ratio **"
              f"{timing['ratio_median']:.3f}x** (min {timing['ratio_min']:.3f}, max {timing['ratio_max']:.3f}). "
              "Absolute times are for information; the ratio is the result.", "",
              f"Conditions: {meta['env']['cpu']}, torch {meta['env']['versions']['torch']}, "
              f"{meta['threads']} thread(s) for the accuracy runs.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    timing = resnet50_timing(args.timing_rounds)
    print(json.dumps(timing), flush=True)
    torch.set_num_threads(args.threads)
    base = load_model().model
    splits = load_dataset("fashion-mnist", args.seed)
    sparsities = tuple(float(s) for s in args.sparsities.split(","))
    tune = FinetuneConfig(epochs=args.epochs)  # compress's default fine-tuning recipe
    rows = accuracy_table(base, splits, sparsities, tune, args.seed)
    meta = {"dense_accuracy": evaluate(base, splits.test).accuracy, "test_items": len(splits.test),
            "prunable_weights": sum(m.weight.numel() for _, m in _weights(base)), "tune": tune.to_dict(),
            "threads": args.threads, "env": environment()}
    REPORTS.mkdir(exist_ok=True)
    write_atomic(REPORTS / "globalmp.json", to_json({"rows": rows, "timing": timing, "meta": meta}))
    write_atomic(REPORTS / "globalmp.md", render(rows, timing, meta))
    print(render(rows, timing, meta))


if __name__ == "__main__":
    main()
