"""Predicted against measured whole-model latency from the cost model (issue 11, item 1; target: within 15%).

For the built-in classifier and its ALDS decomposition: `rest_ms` is measured once on the original (its time
outside the Conv2d/Linear layers), and each model's latency is predicted as that rest plus its layers' prices.
Each repeat times a fresh table (a new cache directory) and measures both models, so the spread covers the
table's noise and the measurement's. Prints one line per repeat and the medians of the ratios, as JSON with
`--json`.

    python benchmarks/check_costs.py [--alds RUN_DIR] [--batches 1,32] [--backend onnxruntime-cpu]
        [--threads 1] [--repeats 5] [--runs 50]

Without --alds it first runs `compress prune --method alds --keep 0.5 --finetune-epochs 0` into a temporary
directory (about 40 s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import compress.methods  # noqa: F401 - registers ALDS's arch.json transform, which load_model replays
from compress.measure.costs import CostModel, measure_model_ms, predict_ms, rest_ms
from compress.models import load_model

INPUT = (1, 1, 28, 28)  # Fashion-MNIST


def alds_run(directory: Path) -> Path:
    """The ALDS keep-0.5 run of the built-in classifier, written to `directory` with the CLI."""
    subprocess.run([sys.executable, "-m", "compress.cli", "prune", "--method", "alds", "--keep", "0.5",
                    "--finetune-epochs", "0", "--no-latency", "--out", str(directory)], check=True,
                   stdout=subprocess.DEVNULL)
    return directory


def one_repeat(models: dict[str, torch.nn.Module], backend: str, batch: int, threads: int, runs: int) -> dict:
    """A fresh table, both models measured, rest from the original, both predicted."""
    example = torch.zeros(INPUT)
    with tempfile.TemporaryDirectory(prefix="check-costs-") as cache:
        costs = CostModel(backend, batch=batch, threads=threads, cache_dir=Path(cache))
        measured = {name: measure_model_ms(model, example, costs, runs=runs) for name, model in models.items()}
        rest = rest_ms(models["original"], example, costs, measured["original"])
        predicted = {name: predict_ms(model, example, costs, rest) for name, model in models.items()}
        summary = costs.summary()
    row = {"batch": batch, "rest_ms": rest, "table_seconds": summary["seconds_timing"], "entries": summary["entries"]}
    for name in models:
        row[name] = {"measured_ms": measured[name], "predicted_ms": predicted[name],
                     "ratio": predicted[name] / measured[name]}
    row["speedup_measured"] = measured["original"] / measured["alds"]
    row["speedup_predicted"] = predicted["original"] / predicted["alds"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alds", type=Path, help="an ALDS run directory of rescnn (default: made now)")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--backend", default="onnxruntime-cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs", type=int, default=50, help="rounds per whole-model measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="check-costs-run-") as tmp:
        run = args.alds or alds_run(Path(tmp) / "alds")
        models = {"original": load_model("rescnn").model, "alds": load_model(str(run)).model}
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        rows = [one_repeat(models, args.backend, batch, args.threads, args.runs) for _ in range(args.repeats)]
        for row in rows:
            if not args.json:
                print(f"b{batch}: original {row['original']['measured_ms']:.4f} ms (rest {row['rest_ms']:.4f}), "
                      f"alds measured {row['alds']['measured_ms']:.4f} predicted {row['alds']['predicted_ms']:.4f} "
                      f"ratio {row['alds']['ratio']:.3f}; speed-up measured {row['speedup_measured']:.3f} "
                      f"predicted {row['speedup_predicted']:.3f}; table {row['table_seconds']:.2f} s")
        median = {key: statistics.median(row[name]["ratio"] for row in rows) for key, name in
                  (("original_ratio", "original"), ("alds_ratio", "alds"))}
        median["rest_share"] = statistics.median(row["rest_ms"] / row["original"]["measured_ms"] for row in rows)
        results.append({"batch": batch, "backend": args.backend, "threads": args.threads, **median, "rows": rows})
        if not args.json:
            print(f"b{batch} medians over {len(rows)}: predicted/measured original {median['original_ratio']:.3f}, "
                  f"alds {median['alds_ratio']:.3f}; rest share of the original {median['rest_share']:.3f}")
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
