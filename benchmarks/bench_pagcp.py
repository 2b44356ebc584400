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

from compress.api import RunOptions, load_data_for, method_context  # noqa: E402
from compress.config import FinetuneConfig, PAGCPConfig  # noqa: E402
from compress.data import Splits  # noqa: E402
from compress.finetune import evaluate, recalibrate_batchnorm, train  # noqa: E402
from compress.measure import count_macs, count_params  # noqa: E402
from compress.measure.backends import LatencySettings, measure_backends  # noqa: E402
from compress.measure.conditions import environment  # noqa: E402
from compress.methods import METHODS, Context  # noqa: E402
from compress.methods.channels import build_graph  # noqa: E402
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


def _better(case: dict, other: dict, task: dict, stage: str) -> bool:
    """Whether `case` beats `other` on a task's metric at a stage (respecting the metric's direction)."""
    a, b = case[stage][task["name"]], other[stage][task["name"]]
    return a > b if task["higher_is_better"] else a < b


def verdict_lines(result: dict) -> list[str]:
    """Per task: does PAGCP beat uniform L1 at the same MACs, after pruning and after the fine-tune (one round
    against uniform at one round's MACs, rounds against uniform at the rounds' MACs)? Written from the numbers,
    whichever way they go."""
    cases = {c["method"]: c for c in result["cases"]}
    lines = []
    for pagcp_name, label in (("PAGCP, one round", "one round's MACs"), ("PAGCP, rounds to the target",
                                                                          "the rounds' MACs")):
        pagcp, uniform = cases.get(pagcp_name), cases.get(f"{UNIFORM} (at {label})")
        if pagcp is None or uniform is None:
            continue
        lines += [f"{pagcp_name} against {UNIFORM} at about the same MACs ({pagcp['macs_keep']:.3f} vs "
                  f"{uniform['macs_keep']:.3f}):", ""]
        for task in result["tasks"]:
            words = [f"{'better' if _better(pagcp, uniform, task, stage) else 'NOT better'} {when}"
                     for stage, when in (("after_prune", "right after pruning"),
                                         ("after_finetune", "after fine-tuning"))]
            lines.append(f"- {task['name']} ({task['metric']}): " + ", ".join(words))
        lines.append("")
    return lines


def _worst_ratio(case: dict, original: dict) -> str:
    ratios = {k: v / original[k] for k, v in case["calibration_losses"].items() if original[k] > 0}
    task = max(ratios, key=ratios.get)
    return f"{ratios[task]:.2f} ({task})"


def render(result: dict) -> str:
    """reports/pagcp.md."""
    tasks = result["tasks"]
    lines = ["# PAGCP against Torch-Pruning's channel pruning, multitask model", "",
             f"Model `{result['model']}` on `{result['data']}` (test split, {result['test_items']:,} items). PAGCP "
             f"runs under the user's bound tau = {result['tau']:g} (every task's calibration loss at most tau times "
             f"the original, never loosened) with `--macs-target {result['macs_target']}`: in one round, and in rounds "
             "with a short fine-tune between them (`--rounds auto`; the rounds' fine-tunes come before the common "
             "fine-tune below, so those rows had more training). Torch-Pruning's ratio is bisected to match PAGCP's "
             "MACs. After pruning, BatchNorm statistics are re-estimated on the calibration split; the common "
             f"fine-tuning: {result['finetune']}.", "",
             "| method | MACs kept | params kept | worst calibration loss / original, after pruning | " + " | ".join(
                 f"{t['name']} {t['metric']} {'↑' if t['higher_is_better'] else '↓'} (pruned → fine-tuned)"
                 for t in tasks) + " |", "|---|---|---|---|" + "---|" * len(tasks)]
    original = result["original"]
    lines.append("| original | 1.000 | 1.000 | 1.00 | " + " | ".join(f"{original[t['name']]:.2f}" for t in tasks)
                 + " |")
    for case in result["cases"]:
        cells = [case["method"], f"{case['macs_keep']:.3f}", f"{case['params_keep']:.3f}",
                 _worst_ratio(case, result["original_calibration_losses"])]
        cells += [f"{case['after_prune'][t['name']]:.2f} → {case['after_finetune'][t['name']]:.2f}" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *verdict_lines(result),
              "## Speed-up against the MACs ratio (one thread, interleaved with the original)", "",
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
    lines += ["", "## PAGCP searches", "",
              "| run | rounds | MACs kept after each round | target met | searches (delta0 tried) | calibration "
              "evaluations | wall time |", "|---|---|---|---|---|---|---|"]
    for name, summary in result["summaries"].items():
        case = next(c for c in result["cases"] if c["method"] == name)
        keeps = ", ".join(f"{r['macs_keep']:.3f}" for r in summary["rounds"])
        tried = "; ".join(", ".join(f"{s['delta0']:.3g}" for s in r["searches"]) for r in summary["rounds"])
        lines.append(f"| {name} | {len(summary['rounds'])} | {keeps} | {summary.get('target_met')} | {tried} | "
                     f"{summary['evaluations']} | {case['seconds']:.0f} s |")
    lines += ["", f"Wall times on {result['threads']} thread(s), fine-tuning between rounds included.",
              f"- config: `{json.dumps(result['config'])}`", "",
              "## Conditions", "", f"- CPU: {result['env']['cpu']} ({result['env']['cpu_count']} cores)",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in result["env"]["versions"].items() if v),
              "- reproduce: `make bench-pagcp`", ""]
    return "\n".join(lines)


def pagcp_cases(original: nn.Module, splits: Splits, cfg: PAGCPConfig, ctx: Context) -> dict[str, tuple]:
    """PAGCP under the user's tau: one round, and rounds (short fine-tunes between them) until the target;
    each with free widths and with widths rounded to ROUND_TO. Name -> (result, seconds)."""
    runs = {}
    for rounds, round_to in ((1, 1), (1, ROUND_TO), ("auto", 1), ("auto", ROUND_TO)):
        name = "PAGCP, one round" if rounds == 1 else "PAGCP, rounds to the target"
        name += f", --round-to {ROUND_TO}" if round_to > 1 else ""
        started = time.perf_counter()
        result = METHODS["pagcp"].apply(copy.deepcopy(original), dataclasses.replace(cfg, rounds=rounds,
                                                                                    round_to=round_to), ctx)
        runs[name] = (result, time.perf_counter() - started)
        log(stage=name, seconds=round(runs[name][1], 1), macs_keep=round(result.summary["macs_keep"], 4),
            rounds=len(result.summary["rounds"]), target_met=result.summary.get("target_met"))
    return runs


def tp_makers(original: nn.Module, example: torch.Tensor, keep: float, label: str) -> dict[str, Callable]:
    """Torch-Pruning's uniform L1 and global group-magnitude at `keep` of the MACs, with free and rounded widths."""
    def tp(global_pruning: bool, round_to: int | None) -> Callable[[], nn.Module]:
        return lambda: tp_pruned(copy.deepcopy(original), example,
                                 matching_ratio(original, example, keep, global_pruning, round_to), global_pruning,
                                 round_to)

    return {f"{UNIFORM} ({label})": tp(False, None), f"{UNIFORM}, round_to {ROUND_TO} ({label})": tp(False, ROUND_TO),
            f"{GLOBAL} ({label})": tp(True, None), f"{GLOBAL}, round_to {ROUND_TO} ({label})": tp(True, ROUND_TO)}


def rerender() -> None:
    """reports/pagcp.md again from reports/pagcp.json (no measuring)."""
    (REPORTS / "pagcp.md").write_text(render(json.loads((REPORTS / "pagcp.json").read_text())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--macs-target", type=float, default=0.5)
    parser.add_argument("--tau", type=float, default=5.0)
    parser.add_argument("--calibration-items", type=int, default=256)
    parser.add_argument("--finetune-items", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--model", default=MODEL, help="a model spec (default: the shipped mtnet baseline)")
    parser.add_argument("--data", default=None, help="default: the model's own data set")
    parser.add_argument("--render-only", action="store_true", help="rewrite reports/pagcp.md from pagcp.json")
    args = parser.parse_args()
    if args.render_only:
        rerender()
        return
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    splits = load_data_for(loaded, args.data, 0)
    original = loaded.model.eval()
    example = splits.test.x[:1]
    macs_before = count_macs(original, example).macs
    params_before = count_params(original).total
    tune = FinetuneConfig(epochs=args.epochs, lr=0.03)
    cfg = PAGCPConfig(macs_target=args.macs_target, tau=args.tau, calibration_items=args.calibration_items, exp=True,
                      round_epochs=args.epochs, round_items=args.finetune_items)
    ctx = method_context(splits, example, RunOptions(out=REPORTS / "unused"), tune,
                         lambda d, i, n: log(stage=d, done=i, total=n) if i == n else None)
    tuned_splits = dataclasses.replace(splits, train=splits.train.subset(args.finetune_items))
    searches = pagcp_cases(original, splits, cfg, ctx)
    one_round = count_macs(searches["PAGCP, one round"][0].model, example).macs / macs_before
    rounds = count_macs(searches["PAGCP, rounds to the target"][0].model, example).macs / macs_before
    makers: dict[str, Callable[[], nn.Module]] = {name: (lambda r=result: r.model) for name, (result, _) in
                                                  searches.items()}
    makers.update(tp_makers(original, example, rounds, "at the rounds' MACs"))
    makers.update({k: v for k, v in tp_makers(original, example, one_round, "at one round's MACs").items()
                   if "round_to" not in k})
    cases = []
    for method, make in makers.items():
        model = make().eval()
        recalibrate_batchnorm(model, splits.calibration)
        after_prune = metrics(model, splits)
        calibration = evaluate(model, splits.calibration.subset(args.calibration_items)).losses
        train(model, tuned_splits, tune, seed=0)
        model.eval()
        case = {"method": method, "macs_keep": count_macs(model, example).macs / macs_before,
                "params_keep": count_params(model).total / params_before, "after_prune": after_prune,
                "calibration_losses": calibration, "after_finetune": metrics(model, splits),
                "latency": latency(model, original, splits, args.latency_runs)}
        if method in searches:
            summary = searches[method][0].summary
            case.update(rounds=len(summary["rounds"]), target_met=summary.get("target_met"),
                        seconds=searches[method][1], evaluations=summary["evaluations"])
        log(**{k: v for k, v in case.items() if k != "latency"})
        cases.append(case)
    result = {"model": args.model, "data": splits.name, "test_items": len(splits.test), "macs_target": args.macs_target,
              "tau": args.tau, "threads": args.threads, "original": metrics(original, splits),
              "original_calibration_losses": evaluate(original, splits.calibration.subset(args.calibration_items)
                                                      ).losses,
              "tasks": [t.to_dict() for t in splits.tasks], "cases": cases, "config": cfg.to_dict(),
              "finetune": f"{args.epochs} epoch(s) on the first {args.finetune_items:,} training items, SGD, lr "
                          f"{tune.lr}, cosine, same for every method",
              "summaries": {name: r.summary for name, (r, _) in searches.items()}, "env": environment()}
    REPORTS.mkdir(exist_ok=True)
    name = "pagcp" if args.model == MODEL else "pagcp-debug"
    (REPORTS / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    (REPORTS / f"{name}.md").write_text(render(result))
    print(f"wrote reports/{name}.md", flush=True)


if __name__ == "__main__":
    main()
