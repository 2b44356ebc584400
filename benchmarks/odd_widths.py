"""Odd low-rank widths inside a model: what they cost on ONNX Runtime, and what the cost table sees (issue 11).

Goal 4 of issue 11 (predicted whole-model latency within 15% of measured) misses on rows whose ranks are
arbitrary: the allocations by weights alone (`--no-priced`) of ALDS and svd-energy (reports/speed.md). This
benchmark isolates why. It builds a method's decomposition of a bench-speed model, then the same model with every ungrouped low-rank
pair's inner width zero-padded up to a multiple of ONNX Runtime's NCHWc block on this CPU (the outputs are
unchanged: checked), and times on ONNX Runtime at batch 1, one thread:

- the decomposition against the original, and against its padded twin, each pair interleaved on its own (two
  sessions alternating: a dozen sessions in one round would evict each other's weights between calls and time
  every model cold);
- per pair: the padded twin with only that pair left at its odd width, against the padded twin (what that one odd
  width costs inside the model), beside the cost table's predicted difference for the same swap.

Predictions are `compress.measure.costs.predict_ms` with the bench's cost table (`runs/bench-speed/costs`) and
the original's time outside its layers, as bench_speed.py predicts its rows. Writes reports/odd_widths.{md,json}.

    python benchmarks/odd_widths.py [--studies rescnn:svd-energy:keep=0.5+priced=false,...] [--runs 300]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_speed import REPORTS, ROOT, WORK, Bench, load_bench_model
from compress import export
from compress.artifact import to_json, write_atomic
from compress.config import ALDSConfig, SVDConfig, SVDEnergyConfig
from compress.measure.backends import ONNXRUNTIME_CPU, LatencySettings
from compress.measure.conditions import environment
from compress.measure.costs import CACHE_ENV, nchwc_block, predict_ms, runtime_graph
from compress.measure.latency import interleaved_rounds
from compress.measure.layer_times import BASELINE, CANDIDATE, measure_layer_times
from compress.methods import METHODS
from compress.methods.alds import LowRank

CONFIGS = {"svd-energy": SVDEnergyConfig, "svd": SVDConfig, "alds": ALDSConfig}
# two unpriced allocations (arbitrary ranks) and a priced one (ranks in steps of 8)
STUDIES = ("rescnn:svd-energy:keep=0.5+priced=false", "mobilenet_v2:svd-energy:keep=0.5+priced=false",
           "mobilenet_v2:alds:latency_keep=0.6")


def ungrouped_pairs(model: nn.Module) -> dict[str, LowRank]:
    """The model's low-rank conv pairs whose encoder is not grouped (k = 1), by name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, LowRank) and isinstance(module.encoder, nn.Conv2d) and module.encoder.groups == 1}


def padded_pair(pair: LowRank, width: int) -> LowRank:
    """`pair` with its inner width zero-padded to `width`: the same outputs, more (zero) channels between."""
    enc, dec = pair.encoder, pair.decoder
    rank = enc.out_channels
    encoder = nn.Conv2d(enc.in_channels, width, enc.kernel_size, enc.stride, enc.padding, enc.dilation, bias=False,
                        padding_mode=enc.padding_mode)
    decoder = nn.Conv2d(width, dec.out_channels, 1, bias=dec.bias is not None)
    with torch.no_grad():
        encoder.weight.zero_()
        decoder.weight.zero_()
        encoder.weight[:rank] = enc.weight
        decoder.weight[:, :rank] = dec.weight
        if dec.bias is not None:
            decoder.bias.copy_(dec.bias)
    return LowRank(encoder, decoder).eval()


def padded(model: nn.Module, block: int, skip: str | None = None) -> nn.Module:
    """A copy with every ungrouped pair's width rounded up to a multiple of `block` (all but `skip`)."""
    model = copy.deepcopy(model)
    for name, pair in ungrouped_pairs(model).items():
        width = -(-pair.encoder.out_channels // block) * block
        if name != skip and width != pair.encoder.out_channels:
            model.set_submodule(name, padded_pair(pair, width))
    return model


def odd_pairs(model: nn.Module, block: int) -> list[str]:
    """The ungrouped pairs whose width is not a multiple of `block`."""
    return [name for name, pair in ungrouped_pairs(model).items() if pair.encoder.out_channels % block]


def model_file(folder: Path, name: str) -> Path:
    """Where a model's ONNX file is exported for timing (and read again to count its runtime nodes)."""
    return folder / f"{name}.onnx"


def session_call(model: nn.Module, x: torch.Tensor, folder: Path, name: str) -> Callable[[], object]:
    """One batch-1, one-thread ONNX Runtime call of the model as `compress measure` runs it."""
    session = export.ort_session(export.export_onnx(model, x, model_file(folder, name)), threads=1)
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def unblocked_call(model: nn.Module, x: torch.Tensor, folder: Path, name: str) -> Callable[[], object]:
    """The same call with ONNX Runtime's layout optimisations off (ORT_ENABLE_EXTENDED: no NCHWc transformer)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    session = ort.InferenceSession(str(export.export_onnx(model, x, folder / f"{name}.plain.onnx")), options,
                                   providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def paired_ms(first: Callable[[], object], second: Callable[[], object], runs: int) -> tuple[float, float]:
    """Median milliseconds of two calls timed alternately (only these two in the rounds)."""
    a, b = interleaved_rounds([first, second], runs=runs, warmup=20)
    return 1e3 * statistics.median(a), 1e3 * statistics.median(b)


def parse_study(text: str) -> tuple[str, str, dict[str, float | bool]]:
    """MODEL:METHOD:FIELD=VALUE[+FIELD=VALUE...] (e.g. rescnn:svd-energy:keep=0.5+priced=false) as its parts."""
    name, method, settings = text.split(":")
    fields = dict(setting.split("=") for setting in settings.split("+"))
    return name, method, {field: value == "true" if value in ("true", "false") else float(value)
                          for field, value in fields.items()}


def cli_flag(field: str, value: float | bool) -> str:
    """A config field as `compress prune` spells it (--keep 0.5, --no-priced)."""
    flag = field.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def runtime_nodes(source: Path) -> int:
    """Nodes of the graph ONNX Runtime runs for an ONNX file (after its own fusions and layout changes)."""
    return len(runtime_graph(source, source.with_suffix(".optimized.onnx")).graph.node)


def where_time_goes(odd: nn.Module, twin: nn.Module, bench: Bench, folder: Path) -> dict:
    """ORT's profiler on both (interleaved): the layers' time and the time between nodes, with the node counts
    (of the files `session_call` exported as "odd" and "padded")."""
    settings = LatencySettings(backends=(ONNXRUNTIME_CPU,), batches=(1,), threads=1, runs=10, warmup=10)
    tables = measure_layer_times(odd, twin, bench.inputs, bench.calibration, settings, folder / "profile", top=1000)
    by_role = {table.model: table for table in tables}
    return {role: {"profiled_total_ms": table.total_ms, "between_nodes_ms": table.unattributed.ms,
                   "nodes": runtime_nodes(model_file(folder, role))}
            for role, table in (("odd", by_role[CANDIDATE]), ("padded", by_role[BASELINE]))}


def study(name: str, method: str, setting: dict[str, float | bool], runs: int) -> dict:
    """One model: the decomposition, its padded twin and each odd pair, measured and predicted."""
    original, splits, info = load_bench_model(name)
    bench = Bench(name, original, splits, info, {1: runs}, 1, 0)
    cfg = CONFIGS[method](**setting)
    model = METHODS[method].apply(copy.deepcopy(original), cfg, bench.context()).model.eval()
    block, x = nchwc_block(), bench.example
    twin = padded(model, block)
    with torch.no_grad():
        assert torch.allclose(twin(x), model(x), atol=1e-4), "padding changed the outputs"
    odd = odd_pairs(model, block)
    one_odd = {pair: padded(model, block, skip=pair) for pair in odd}

    def predicted(m: nn.Module) -> float:
        return predict_ms(m, x, bench.costs, bench.rest, reference=original)

    with tempfile.TemporaryDirectory(prefix="odd-widths-") as tmp:
        folder = Path(tmp)
        calls = {key: session_call(m, x, folder, key.replace(".", "_"))
                 for key, m in {"original": original, "odd": model, "padded": twin, **one_odd}.items()}
        original_ms, odd_ms = paired_ms(calls["original"], calls["odd"], runs)
        padded_ms, odd_beside_padded = paired_ms(calls["padded"], calls["odd"], runs)
        unblocked = paired_ms(unblocked_call(twin, x, folder, "padded"), unblocked_call(model, x, folder, "odd"), runs)
        rows, pairs, twin_ms = [], ungrouped_pairs(model), predicted(twin)
        for pair in odd:
            base, single = paired_ms(calls["padded"], calls[pair], runs)
            module = pairs[pair]
            rows.append({"pair": pair, "rank": module.encoder.out_channels, "in": module.encoder.in_channels,
                         "out": module.decoder.out_channels, "measured_ms": single - base,
                         "predicted_ms": predicted(one_odd[pair]) - twin_ms})
        profile = where_time_goes(model, twin, bench, folder)
    pred = {"original": predicted(original), "odd": predicted(model), "padded": twin_ms}
    bench.costs.save()
    return {"model": name, "method": method, "setting": setting, "block": block, "runs": runs,
            "pairs": len(pairs), "odd_pairs": len(odd),
            "measured": {"original_ms": original_ms, "odd_ms": odd_ms, "odd_ratio": odd_ms / original_ms,
                         "padded_ms": padded_ms, "odd_beside_padded_ms": odd_beside_padded,
                         "padded_over_odd": padded_ms / odd_beside_padded,
                         "unblocked_padded_ms": unblocked[0], "unblocked_odd_ms": unblocked[1],
                         "unblocked_padded_over_odd": unblocked[0] / unblocked[1]},
            "predicted": {**{f"{k}_ms": v for k, v in pred.items()}, "odd_ratio": pred["odd"] / pred["original"],
                          "padded_over_odd": pred["padded"] / pred["odd"]},
            "per_pair": rows, "profile": profile}


def render(payload: dict) -> str:
    """reports/odd_widths.md from the payload."""
    lines = ["# Odd low-rank widths inside a model (ONNX Runtime, batch 1, one thread)", "",
             ("Made by `python benchmarks/odd_widths.py` (see its docstring). Times are medians of "
             f"{payload['runs']} rounds, each comparison timed as its own alternating pair. Padded: every "
             "ungrouped low-rank pair's inner width zero-padded up to a multiple of ONNX Runtime's NCHWc block "
             "(the same outputs). Predicted: the cost table, as reports/speed.md predicts its rows."), ""]
    for study_ in payload["studies"]:
        m, p = study_["measured"], study_["predicted"]
        flags = " ".join(cli_flag(k, v) for k, v in study_["setting"].items())
        lines += [f"## {study_['model']}, {study_['method']} {flags}", "",
                  (f"{study_['odd_pairs']} of {study_['pairs']} pairs have a width that is not a multiple of the "
                  f"block ({study_['block']})."), "",
                  "| | measured | predicted | predicted / measured |", "|---|---|---|---|",
                  (f"| decomposition / original | {m['odd_ratio']:.3f} | {p['odd_ratio']:.3f} | "
                  f"{p['odd_ratio'] / m['odd_ratio']:.2f} |"),
                  (f"| padded twin / decomposition | {m['padded_over_odd']:.3f} | {p['padded_over_odd']:.3f} | "
                  f"{p['padded_over_odd'] / m['padded_over_odd']:.2f} |"),
                  (f"| padded twin, ms (measured beside the decomposition) | {m['padded_ms']:.4f} | "
                  f"{p['padded_ms']:.4f} | {p['padded_ms'] / m['padded_ms']:.2f} |"), "",
                  (f"With ONNX Runtime's layout optimisations off (no NCHWc), the padded twin runs "
                   f"{m['unblocked_padded_over_odd']:.3f} of the decomposition's time ({m['unblocked_padded_ms']:.4f} "
                   f"against {m['unblocked_odd_ms']:.4f} ms): the gap above is the blocked layout's."), "",
                  "One pair left odd in the padded twin: its cost inside the model (ms).", "",
                  "| pair | rank | in -> out | measured | predicted |", "|---|---|---|---|---|"]
        lines += [f"| {r['pair']} | {r['rank']} | {r['in']} -> {r['out']} | {r['measured_ms']:+.4f} | "
                  f"{r['predicted_ms']:+.4f} |" for r in study_["per_pair"]]
        total = sum(r["measured_ms"] for r in study_["per_pair"])
        prof = study_["profile"]
        lines += ["", ("ONNX Runtime's profiler (10 runs each, interleaved; it adds microseconds per node, so only the "
                  "difference means much): "
                  f"the decomposition runs {prof['odd']['nodes']} nodes against the padded twin's "
                  f"{prof['padded']['nodes']}; the time between nodes (no node's event) is "
                  f"{prof['odd']['between_nodes_ms']:.3f} ms against {prof['padded']['between_nodes_ms']:.3f} ms "
                  f"of {prof['odd']['profiled_total_ms']:.3f} and {prof['padded']['profiled_total_ms']:.3f} ms "
                  "profiled.")]
        lines += ["", (f"Sum over the pairs: measured {total:+.4f} ms, predicted "
                      f"{sum(r['predicted_ms'] for r in study_['per_pair']):+.4f} ms."), ""]
    env = payload["environment"]
    lines += [(f"**Conditions**: {env['cpu']}; torch {env['versions'].get('torch')}, onnxruntime "
              f"{env['versions'].get('onnxruntime')}."), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", default=",".join(STUDIES), help="comma-separated MODEL:METHOD:FIELD=VALUE "
                        f"(methods: {', '.join(sorted(CONFIGS))})")
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault(CACHE_ENV, str(WORK / "costs"))  # the bench's tables: the same prices as its rows
    studies = [study(*parse_study(text), args.runs) for text in args.studies.split(",")]
    payload = {"runs": args.runs, "studies": studies, "environment": environment()}
    REPORTS.mkdir(exist_ok=True)
    write_atomic(REPORTS / "odd_widths.json", to_json(payload))
    write_atomic(REPORTS / "odd_widths.md", render(payload))
    print(f"wrote {(REPORTS / 'odd_widths.md').relative_to(ROOT)}", flush=True)


if __name__ == "__main__":
    main()
