"""Benchmark: PAGCP against Torch-Pruning's uniform L1 and global group-magnitude channel pruning (issue 3).

On the built-in multitask model (class / mask / position on a Fashion-MNIST canvas), every method removes channels
physically to the same MACs (PAGCP's `--macs-target`; the Torch-Pruning ratio found by bisection to match what
PAGCP kept). Each task's test metric right after pruning (BatchNorm re-estimated on the calibration split, as
`compress prune` does), and after the same fine-tuning budget; the speed-up on ONNX Runtime CPU and PyTorch CPU
(one thread, interleaved with the original in one process) beside the MACs ratio; the search's wall time.

Writes reports/pagcp.md and reports/pagcp.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compress.api import load_data_for  # noqa: E402
from compress.config import FinetuneConfig, PAGCPConfig  # noqa: E402
from compress.data import Splits  # noqa: E402
from compress.finetune import evaluate, recalibrate_batchnorm, train  # noqa: E402
from compress.measure import count_macs, count_params  # noqa: E402
from compress.measure.backends import LatencySettings, measure_backends  # noqa: E402
from compress.measure.conditions import environment  # noqa: E402
from compress.methods import METHODS, Context  # noqa: E402
from compress.methods.pagcp import build_graph  # noqa: E402
from compress.models import load_model  # noqa: E402

REPORTS = ROOT / "reports"
MODEL = "mtnet"
UNIFORM, GLOBAL = "torch-pruning uniform L1", "torch-pruning global group-magnitude"
ROUND_TO = 8


def log(**fields: object) -> None:
    print(json.dumps(fields, default=str), flush=True)


def tp_pruned(model: nn.Module, example: torch.Tensor, ratio: float, global_pruning: bool,
              round_to: int | None = None) -> nn.Module:
    """Torch-Pruning's channel pruning at `ratio`, task heads left alone as PAGCP leaves them."""
    import torch_pruning as tp

    heads = set(build_graph(model, example).heads)
    ignored = [m for n, m in model.named_modules() if n in heads]
    importance = tp.importance.GroupMagnitudeImportance(p=2) if global_pruning else \
        tp.importance.MagnitudeImportance(p=1)
    tp.pruner.MetaPruner(model, example, importance=importance, pruning_ratio=ratio, global_pruning=global_pruning,
                         ignored_layers=ignored, max_pruning_ratio=0.95, round_to=round_to).step()
    return model


def matching_ratio(original: nn.Module, example: torch.Tensor, keep: float, global_pruning: bool,
                   round_to: int | None = None) -> float:
    """The Torch-Pruning ratio whose pruned model keeps `keep` of the original MACs (bisection)."""
    total = count_macs(original, example).macs
    low, high = 0.0, 0.95
    for _ in range(14):
        mid = (low + high) / 2
        pruned = tp_pruned(copy.deepcopy(original), example, mid, global_pruning, round_to)
        kept = count_macs(pruned, example).macs / total
        low, high = (mid, high) if kept > keep else (low, mid)
    return (low + high) / 2


def metrics(model: nn.Module, splits: Splits) -> dict[str, float]:
    return {k: round(v, 4) for k, v in evaluate(model, splits.test).metrics.items()}


def latency(candidate: nn.Module, original: nn.Module, splits: Splits, runs: int) -> list[dict]:
    """ONNX Runtime CPU and PyTorch CPU, one thread, batch 1 and 32, interleaved with the original."""
    settings = LatencySettings(backends=("onnxruntime-cpu", "pytorch-cpu"), batches=(1, 32), threads=1, runs=runs,
                               warmup=5)
    with tempfile.TemporaryDirectory(prefix="bench-pagcp-") as tmp:
        return [r.to_dict() for r in measure_backends(candidate, original, splits.test.x[:64],
                                                      splits.calibration.x[:64], settings, Path(tmp))]


def render(result: dict) -> str:
    """reports/pagcp.md."""
    tasks = result["tasks"]
    lines = ["# PAGCP against Torch-Pruning's channel pruning, multitask model", "",
             f"Model `{result['model']}` on `{result['data']}` (test split, {result['test_items']:,} items). Every method "
             f"removes channels physically and keeps the same MACs (PAGCP's `--macs-target {result['macs_target']}`; "
             "Torch-Pruning's ratio bisected to match). After pruning, BatchNorm statistics are re-estimated on the "
             f"calibration split; fine-tuning: {result['finetune']}.", "",
             "| method | MACs kept | params kept | " + " | ".join(
                 f"{t['name']} {t['metric']} {'↑' if t['higher_is_better'] else '↓'} (pruned → fine-tuned)"
                 for t in tasks) + " |", "|---|---|---|" + "---|" * len(tasks)]
    original = result["original"]
    lines.append(f"| original | 1.000 | 1.000 | " + " | ".join(f"{original[t['name']]:.2f}" for t in tasks) + " |")
    for case in result["cases"]:
        cells = [case["method"], f"{case['macs_keep']:.3f}", f"{case['params_keep']:.3f}"]
        cells += [f"{case['after_prune'][t['name']]:.2f} → {case['after_finetune'][t['name']]:.2f}" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Speed-up against the MACs ratio (one thread, interleaved with the original)", "",
              "| method | MACs ratio | ONNX Runtime b1 | ONNX Runtime b32 | PyTorch b1 | PyTorch b32 | "
              "ORT b1 speed-up / MACs ratio |", "|---|---|---|---|---|---|---|"]
    for case in result["cases"]:
        rows = {(r["backend"], r["batch"]): r for r in case["latency"]}

        def cell(backend: str, batch: int) -> str:
            r = rows[(backend, batch)]
            return f"{r['speedup']:.2f}x [{r['speedup_spread'][0]:.2f}, {r['speedup_spread'][1]:.2f}]"

        ratio = 1 / case["macs_keep"]
        lines.append(f"| {case['method']} | {ratio:.2f}x | {cell('onnxruntime-cpu', 1)} | "
                     f"{cell('onnxruntime-cpu', 32)} | {cell('pytorch-cpu', 1)} | {cell('pytorch-cpu', 32)} | "
                     f"{rows[('onnxruntime-cpu', 1)]['speedup'] / ratio:.2f} |")
    search = result["search"]
    lines += ["", "## PAGCP search", "",
              f"- wall time of the whole search (all rounds of the MACs-target bisection): **{search['seconds']:.0f} s** "
              f"on {result['threads']} thread(s); {search['rounds']} round(s), {search['units']} units, "
              f"{search['evaluations']} calibration evaluations on {search['calibration_items']} items",
              f"- config: `{json.dumps(result['config'])}`", "",
              "## Conditions", "", f"- CPU: {result['env']['cpu']} ({result['env']['cpu_count']} cores)",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in result["env"]["versions"].items() if v),
              "- reproduce: `make bench-pagcp`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--macs-target", type=float, default=0.5)
    parser.add_argument("--calibration-items", type=int, default=256)
    parser.add_argument("--finetune-items", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--model", default=MODEL, help="a model spec (default: the shipped mtnet baseline)")
    parser.add_argument("--data", default=None, help="default: the model's own data set")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    splits = load_data_for(loaded, args.data, 0)
    original = loaded.model.eval()
    example = splits.test.x[:1]
    macs_before = count_macs(original, example).macs
    params_before = count_params(original).total
    cfg = PAGCPConfig(macs_target=args.macs_target, calibration_items=args.calibration_items, exp=True)
    tuned_splits = dataclasses.replace(splits, train=splits.train.subset(args.finetune_items))
    tune = FinetuneConfig(epochs=args.epochs, lr=0.03)

    searches = {}
    for round_to in (1, ROUND_TO):
        started = time.perf_counter()
        searched = METHODS["pagcp"].apply(
            copy.deepcopy(original), dataclasses.replace(cfg, round_to=round_to),
            Context(example, splits, tasks=splits.tasks,
                    progress=lambda d, i, n: log(stage=d, done=i, total=n) if i == n else None))
        searches[round_to] = (searched, time.perf_counter() - started)
        log(stage="pagcp", round_to=round_to, seconds=round(searches[round_to][1], 1))
    searched, seconds = searches[1]
    keep = count_macs(searched.model, example).macs / macs_before

    def tp(global_pruning: bool, round_to: int | None) -> Callable[[], nn.Module]:
        return lambda: tp_pruned(copy.deepcopy(original), example,
                                 matching_ratio(original, example, keep, global_pruning, round_to), global_pruning,
                                 round_to)

    # ONNX Runtime's fast convolutions (NCHWc) want channel counts in multiples of 8 on this CPU: each method
    # is measured as it comes and with widths rounded to multiples of ROUND_TO
    makers: dict[str, Callable[[], nn.Module]] = {
        "PAGCP": lambda: searches[1][0].model, f"PAGCP, --round-to {ROUND_TO}": lambda: searches[ROUND_TO][0].model,
        UNIFORM: tp(False, None), f"{UNIFORM}, round_to {ROUND_TO}": tp(False, ROUND_TO),
        GLOBAL: tp(True, None), f"{GLOBAL}, round_to {ROUND_TO}": tp(True, ROUND_TO)}
    cases = []
    for method, make in makers.items():
        model = make().eval()
        recalibrate_batchnorm(model, splits.calibration)
        after_prune = metrics(model, splits)
        train(model, tuned_splits, tune, seed=0)
        model.eval()
        case = {"method": method, "macs_keep": count_macs(model, example).macs / macs_before,
                "params_keep": count_params(model).total / params_before, "after_prune": after_prune,
                "after_finetune": metrics(model, splits),
                "latency": latency(model, original, splits, args.latency_runs)}
        log(**{k: v for k, v in case.items() if k != "latency"})
        cases.append(case)
    summary = searched.summary
    result = {"model": args.model, "data": splits.name, "test_items": len(splits.test), "macs_target": args.macs_target,
              "threads": args.threads, "original": metrics(original, splits),
              "tasks": [t.to_dict() for t in splits.tasks], "cases": cases, "config": cfg.to_dict(),
              "finetune": f"{args.epochs} epoch(s) on the first {args.finetune_items:,} training items, SGD, lr "
                          f"{tune.lr}, cosine, same for every method",
              "search": {"seconds": seconds, "rounds": len(summary.get("rounds", [])) or 1,
                         "units": summary.get("units"), "evaluations": summary.get("evaluations"),
                         "calibration_items": args.calibration_items},
              "summary": summary, "env": environment()}
    REPORTS.mkdir(exist_ok=True)
    name = "pagcp" if args.model == MODEL else "pagcp-debug"
    (REPORTS / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    (REPORTS / f"{name}.md").write_text(render(result))
    print(f"wrote reports/{name}.md", flush=True)


if __name__ == "__main__":
    main()
