"""Benchmark: does compression make the model faster, or only smaller? (issue 5; `make bench-latency`)

For each method at its default operating point, on the built-in classifier and on torchvision resnet18, the MACs
ratio beside the measured speed-up on PyTorch CPU, ONNX Runtime CPU and the mobile proxy (one thread, candidate
and original interleaved in one process), and the bytes of every format. Torch-Pruning's 50% L1 channel pruning
of resnet18 is measured alongside as a reference that removes channels physically. No fine-tuning: latency and
size do not depend on the weights' values, only on the structure each method leaves.

Writes reports/latency.md and reports/latency.json.
"""

from __future__ import annotations

import argparse
import copy
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

from benchmarks.bench_alds import RESNET18_RUN, ensure_resnet18, load  # noqa: E402
from compress.config import ALDSConfig  # noqa: E402
from compress.measure import count_macs, model_sizes  # noqa: E402
from compress.measure.backends import LatencySettings, available_backends, measure_backends  # noqa: E402
from compress.measure.conditions import environment  # noqa: E402
from compress.methods import METHODS, Context, method_for_config  # noqa: E402
from compress.ship import format_bytes  # noqa: E402

REPORTS = ROOT / "reports"
METHOD_ORDER = ("globalmp", "alds", "svd-energy", "svd")
TP_REFERENCE = "torch-pruning L1 channels 50%"
WIDE_ALDS = "alds, >= 16 channels per group"  # the latency-aware variant: no narrow channel groups
FORMATS = ("safetensors_dense", "safetensors_sparse", "onnx", "ort_int8")
# resnet18 is timed at ImageNet's 224x224, where its published MACs and Torch-Pruning's figures are quoted
INPUT_SHAPES = {"rescnn": None, "resnet18": (3, 224, 224)}
RUNS = {"rescnn": {1: 40, 32: 15}, "resnet18": {1: 15, 32: 4}}


def log(**fields: object) -> None:
    print(json.dumps(fields, default=str), flush=True)


def torch_pruning_channels(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Torch-Pruning's L1 channel pruning at 50% per layer (the classifier head kept), channels removed."""
    import torch_pruning as tp

    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=head)
    pruner.step()
    return model


def compressors(example: torch.Tensor, with_reference: bool) -> dict[str, Callable[[nn.Module], nn.Module]]:
    """Each method at its default config, ALDS also with wide groups, and the Torch-Pruning reference if asked."""
    configs = {name: METHODS[name].config_type() for name in METHOD_ORDER}
    configs = {**{k: v for k, v in configs.items() if k in ("globalmp", "alds")},
               WIDE_ALDS: ALDSConfig(min_group_channels=16),
               **{k: v for k, v in configs.items() if k not in ("globalmp", "alds")}}
    makers: dict[str, Callable[[nn.Module], nn.Module]] = {
        label: (lambda model, cfg=cfg: method_for_config(cfg).apply(model, cfg, Context(example)).model)
        for label, cfg in configs.items()}
    if with_reference:
        makers[TP_REFERENCE] = lambda model: torch_pruning_channels(model, example)
    return makers


def resized(x: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
    return x if shape is None else nn.functional.interpolate(x, size=shape[1:], mode="bilinear")


def measure_case(model_name: str, method: str, original: nn.Module, candidate: nn.Module, inputs: torch.Tensor,
                 calibration: torch.Tensor, threads: int) -> dict:
    """MACs, bytes and interleaved latency on every backend for one compressed model."""
    example = inputs[:1]
    macs_before, macs_after = count_macs(original, example), count_macs(candidate, example)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        for batch, runs in RUNS[model_name].items():
            settings = LatencySettings(backends=available_backends(), batches=(batch,), threads=threads, runs=runs,
                                       warmup=max(2, runs // 5))
            rows += [row.to_dict() for row in measure_backends(candidate, original, inputs, calibration, settings,
                                                               Path(tmp))]
    sizes = {role: {**model_sizes(model).bytes, **format_bytes(model, example, calibration)}
             for role, model in (("before", original), ("after", candidate))}
    return {"model": model_name, "method": method, "input_shape": list(example.shape[1:]),
            "macs_before": macs_before.macs, "macs_after": macs_after.macs,
            "macs_ratio": macs_before.macs / macs_after.macs,
            "macs_effective_ratio": macs_before.macs / macs_after.macs_effective,
            "params_before": sum(p.numel() for p in original.parameters()),
            "params_after": sum(p.numel() for p in candidate.parameters()),
            "latency": rows, "bytes": sizes}


def speedup(case: dict, backend: str, batch: int) -> str:
    row = next((r for r in case["latency"] if r["backend"] == backend and r["batch"] == batch), None)
    if row is None:
        return "-"
    return f"{row['speedup']:.2f}x [{row['speedup_spread'][0]:.2f}, {row['speedup_spread'][1]:.2f}]"


def render(cases: list[dict], env: dict, threads: int, seconds: float) -> str:
    """reports/latency.md."""
    backends = [b for b in ("pytorch-cpu", "pytorch-cuda", "onnxruntime-cpu", "mobile-proxy")
                if any(r["backend"] == b for c in cases for r in c["latency"])]
    header = ["model", "method", "MACs ratio (dense)", "MACs ratio (effective)"]
    header += [f"{b}{' (proxy)' if b == 'mobile-proxy' else ''} b{batch}" for b in backends for batch in (1, 32)]
    lines = ["# Latency: MACs ratio against measured speed-up", "",
             "Speed-up = original p50 / compressed p50, both timed interleaved in one process, one thread; "
             "[p25, p75] of the per-round ratios. MACs ratio = original / compressed MACs per item (dense: what "
             "a dense runtime executes; effective: nonzero weights only). The mobile proxy is a static-shape int8 "
             "(QDQ) model in ORT format, run by ONNX Runtime's CPU provider on one thread of this machine: the "
             "phone build's graph, not a phone's speed. No fine-tuning: latency depends on structure only.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in cases:
        cells = [f"{case['model']} ({'x'.join(map(str, case['input_shape']))})", case["method"],
                 f"{case['macs_ratio']:.2f}x", f"{case['macs_effective_ratio']:.2f}x"]
        cells += [speedup(case, b, batch) for b in backends for batch in (1, 32)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Bytes per format (compressed / original)", "",
              "| model | method | " + " | ".join(FORMATS) + " |", "|---|---|" + "---|" * len(FORMATS)]
    for case in cases:
        cells = [case["model"], case["method"]]
        for fmt in FORMATS:
            before, after = case["bytes"]["before"][fmt], case["bytes"]["after"][fmt]
            cells.append(f"{after:,} / {before:,} ({after / before:.3f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Conditions", "", f"- CPU: {env['cpu']} ({env['cpu_count']} cores), {threads} thread(s), "
              f"device {env['device']}", f"- ONNX Runtime providers: {', '.join(env['providers'])}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
              f"- runs per (backend, batch): {json.dumps(RUNS)}; wall time of the last run {seconds:.0f} s",
              f"- resnet18: `{RESNET18_RUN}` (trained by benchmarks/bench_alds.py's recipe), timed at 224x224",
              "- reproduce: `make bench-latency`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=["rescnn", "resnet18"])
    parser.add_argument("--name", default="latency", help="reports/NAME.{md,json}")
    parser.add_argument("--merge", action="store_true", help="keep the other models' rows of an existing "
                        "reports/NAME.json (re-measure some models on a quiet machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cases = []
    for model_name in args.models:
        if model_name == "resnet18":
            ensure_resnet18(args.threads)
        original, splits, _ = load(model_name, 0)
        shape = INPUT_SHAPES[model_name]
        inputs, calibration = resized(splits.test.x[:64], shape), resized(splits.calibration.x[:256], shape)
        for method, compress in compressors(inputs[:1], with_reference=model_name == "resnet18").items():
            candidate = compress(copy.deepcopy(original)).eval()
            case = measure_case(model_name, method, original, candidate, inputs, calibration, args.threads)
            log(**{k: v for k, v in case.items() if k != "latency"},
                speedups={f"{r['backend']}-b{r['batch']}": round(r["speedup"], 3) for r in case["latency"]})
            cases.append(case)
    env = environment()
    previous = REPORTS / f"{args.name}.json"
    if args.merge and previous.is_file():
        kept = [c for c in json.loads(previous.read_text())["cases"] if c["model"] not in args.models]
        cases = sorted(kept + cases, key=lambda c: list(INPUT_SHAPES).index(c["model"]))  # stable: methods in order
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / f"{args.name}.json").write_text(json.dumps({"env": env, "cases": cases}, indent=1, default=str))
    (REPORTS / f"{args.name}.md").write_text(render(cases, env, args.threads, time.perf_counter() - started))
    print(f"wrote reports/{args.name}.md", flush=True)


if __name__ == "__main__":
    main()
