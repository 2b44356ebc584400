"""How far repeated runs of one priced ALDS setting spread on a bench-speed model (issue 11, goal 2).

Each repeat compresses the model afresh with `METHODS["alds"]` (the bench's context: data, BatchNorm
re-estimation), prints which allocation shipped (`compare_plain`), the landing's measured points, the parameters
kept, the measured ONNX Runtime batch-1 latency ratio and the test accuracy after BatchNorm re-estimation, as
bench_speed.py measures a row. `--remeasure N` then times the last shipped model N more times the way the landing
does (`pricing.measured_ratio`), so that measurement noise can be told apart from the spread of the plans.

    python benchmarks/landing_spread.py [--model mobilenet_v2] [--latency-keep 0.6] [--groups 1]
        [--repeats 4] [--remeasure 6]

Uses bench_speed.py's trained models and cost tables (runs/bench-speed/; `make bench-speed` makes them).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root

from benchmarks.bench_speed import MODELS, SEED, WORK, Bench, load_bench_model, ort_latency_ratio
from compress.config import ALDSConfig
from compress.finetune import recalibrate_batchnorm
from compress.measure.costs import CACHE_ENV
from compress.measure.size import count_params
from compress.methods import METHODS, pricing


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2", choices=MODELS)
    parser.add_argument("--latency-keep", type=float, default=0.6)
    parser.add_argument("--groups", type=int, action="append", default=[], help="as ALDS's --groups (repeat)")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--remeasure", type=int, default=6)
    return parser.parse_args()


def main() -> None:
    args = parse()
    os.environ.setdefault(CACHE_ENV, str(WORK / "costs"))
    torch.set_num_threads(1)
    original, splits, info = load_bench_model(args.model)
    bench = Bench(args.model, original, splits, info, {1: 50, 32: 15}, 1, 0)
    cfg = ALDSConfig(latency_keep=args.latency_keep, groups=tuple(args.groups))
    params = count_params(original).total
    shipped = original
    for repeat in range(args.repeats):
        ctx = bench.context()
        result = METHODS["alds"].apply(copy.deepcopy(original), cfg, ctx)
        shipped = result.model.eval()
        recalibrate_batchnorm(shipped, splits.calibration)
        landing = (result.sections.get("latency_target") or {}).get("landing", [])
        print(json.dumps({
            "repeat": repeat, "seed": SEED, "shipped": (result.summary.get("compare_plain") or {}).get("shipped"),
            "landing": [[round(t["predicted"], 3), round(t["measured"], 3), t["taken"]] for t in landing],
            "params_kept": round(count_params(shipped).total / params, 3),
            "measured_ratio": round(ort_latency_ratio(shipped, original, bench), 3),
            "after_compression": bench.metrics(shipped)}), flush=True)
    if args.remeasure:
        ctx = bench.context()
        again = [pricing.measured_ratio(shipped, original, ctx.example_inputs, pricing.timing_inputs(ctx),
                                        cfg.backend, cfg.latency_batch)["latency_measured"]
                 for _ in range(args.remeasure)]
        print(json.dumps({"remeasured": [round(v, 3) for v in again],
                          "sd": round(statistics.stdev(again), 4) if len(again) > 1 else 0.0}))


if __name__ == "__main__":
    main()
