"""Benchmark: faster in milliseconds, not only in MACs (issue 11, item 5; `make bench-speed`).

For the built-in classifier (`rescnn`), the built-in multitask model (`mtnet`) and torchvision resnet18 and
mobilenet_v2 trained on Fashion-MNIST by this benchmark's own short recipe (1-channel 28x28 input, 10 classes;
weights cached under runs/bench-speed/models), every method at a parameter or MACs target and at a latency target:
ALDS and svd-energy (keep 0.5 priced, the default, and by weights alone; latency-keep 0.6), GlobalMP 90%, PAGCP
(MACs target 0.5 and latency target 0.6, one round, round_to 8), and Torch-Pruning's uniform L1 and global
pruning with round_to 8 at the ratio whose measured ONNX Runtime batch-1 latency matches ALDS's latency-keep 0.6 row
(bisection). Per row: MACs and parameters kept, the cost model's predicted speed-up (onnxruntime-cpu, batch 1), the
measured speed-up with its p25-p75 on ONNX Runtime (batch 1 and 32), PyTorch CPU (batch 1) and the mobile proxy
(batch 1), each timed interleaved with the original by `measure_backends`; every task's test metric after
compression (BatchNorm re-estimated, as `compress prune` does) and after one epoch of fine-tuning on a subset; a
setting that cannot be met is a row with the method's own message. With a CUDA device, the same structures are
also timed on pytorch-cuda (batch 1 and 32); `--gpu-only` fills just that section from reports/speed.json.

    python benchmarks/bench_speed.py [--models rescnn,mtnet,resnet18,mobilenet_v2] [--threads 1] [--quick]
        [--settings KEY,...] [--merge] [--render-only] [--gpu-only]

Writes reports/speed.md and reports/speed.json (`--quick`: runs/bench-speed/quick/ instead).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_pagcp import tp_pruned
from compress.api import RunOptions, audit, load_data_for, method_context
from compress.artifact import to_json, write_atomic
from compress.config import (
    ALDSConfig,
    ConfigBase,
    FinetuneConfig,
    GlobalMPConfig,
    PAGCPConfig,
    SVDEnergyConfig,
)
from compress.data import Splits
from compress.data.datasets import load_dataset
from compress.errors import AuditError, UsageError
from compress.finetune import evaluate, recalibrate_batchnorm, train
from compress.measure import count_macs, count_params
from compress.measure.backends import (
    MOBILE_PROXY,
    ONNXRUNTIME_CPU,
    PYTORCH_CPU,
    PYTORCH_CUDA,
    LatencySettings,
    measure_backends,
)
from compress.measure.conditions import environment
from compress.measure.costs import CACHE_ENV, CostModel, activations, measure_model_ms, predict_ms, rest_ms
from compress.methods import METHODS, method_for_config
from compress.methods.channels import channel_transform
from compress.models import load_model
from compress.models.loader import load_state_file
from compress.models.transforms import replay_transforms

REPORTS = ROOT / "reports"
WORK = ROOT / "runs" / "bench-speed"  # gitignored (/runs/): trained weights, the cost tables, --quick output
MODELS = ("rescnn", "mtnet", "resnet18", "mobilenet_v2")
TORCHVISION = ("resnet18", "mobilenet_v2")
SEED = 0
# the benchmark's own recipe for the torchvision models: about 4-5 min each on one thread of this machine
TRAIN = {"items": 40_000, "epochs": 2, "lr": 0.05}
TUNE = {"items": 8_000, "epochs": 1, "lr": 0.01}  # the common fine-tune after compression, every row alike
RUNS = {1: 50, 32: 15}  # interleaved rounds per batch size
QUICK_RUNS = {1: 15, 32: 5}
QUICK_TUNE_ITEMS = 2_000
PREDICT_RUNS = 50  # rounds of the original's whole-model measurement that fixes the time outside its layers
BISECT_STEPS, BISECT_RUNS, TP_MAX_RATIO = 7, 30, 0.9
ROUND_TO = 8
TOLERANCE = 0.15  # the bound on predicted against measured latency
LATENCY_GOAL, SPEEDUP_GOAL, PAGCP_GOAL = 0.66, 1.3, 0.9
INPUTS, CALIBRATION = 64, 64  # items cycled into the timed batches; items that calibrate the proxy's int8 model
MATCH_KEY = "alds-lat0.6"  # the row whose measured latency Torch-Pruning is matched to


def log(**fields: object) -> None:
    print(json.dumps(fields, default=str), flush=True)


# ------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """One method at one target: a compress config, or Torch-Pruning matched to a measured latency."""

    key: str
    label: str
    config: ConfigBase | None = None
    global_pruning: bool = False  # Torch-Pruning rows only

    @property
    def method(self) -> str:
        return method_for_config(self.config).name if self.config is not None else "torch-pruning"


def settings() -> tuple[Setting, ...]:
    """Every row of a model's table, in order (Torch-Pruning after the ALDS row it is matched to)."""
    pagcp = {"round_to": ROUND_TO, "rounds": 1, "exp": True, "calibration_items": 256}
    return (
        Setting("alds-keep0.5", "ALDS --keep 0.5 --no-priced (the paper's allocation; the default before issue 11)",
                ALDSConfig(keep=0.5, priced=False)),
        Setting("alds-keep0.5-lat1.0", "ALDS --keep 0.5 (the default now: priced, no slower; parameters bind)",
                ALDSConfig(keep=0.5)),
        Setting("alds-keep0.5-lat0.75", "ALDS --keep 0.5 --latency-keep 0.75 (both budgets asked)",
                ALDSConfig(keep=0.5, latency_keep=0.75)),
        Setting("alds-keep0.5-k1", "ALDS --keep 0.5 --groups 1 (priced, no grouped layers)",
                ALDSConfig(keep=0.5, groups=(1,))),
        Setting(MATCH_KEY, "ALDS --latency-keep 0.6", ALDSConfig(latency_keep=0.6)),
        Setting("alds-lat0.6-k1", "ALDS --latency-keep 0.6 --groups 1 (no grouped layers)",
                ALDSConfig(latency_keep=0.6, groups=(1,))),
        Setting("svd-energy-keep0.5-paper", "svd-energy --keep 0.5 --no-priced (the textbook baseline by weights "
                "alone; its default until it was priced)", SVDEnergyConfig(keep=0.5, priced=False)),
        Setting("svd-energy-keep0.5", "svd-energy --keep 0.5 (the default now: priced, no slower)",
                SVDEnergyConfig(keep=0.5)),
        Setting("svd-energy-lat0.6", "svd-energy --latency-keep 0.6", SVDEnergyConfig(latency_keep=0.6)),
        Setting("globalmp-0.9", "GlobalMP --sparsity 0.9", GlobalMPConfig(sparsity=0.9)),
        Setting("pagcp-macs0.5", "PAGCP --macs-target 0.5 --round-to 8", PAGCPConfig(macs_target=0.5, **pagcp)),
        Setting("pagcp-lat0.6", "PAGCP --latency-target 0.6 --round-to 8", PAGCPConfig(latency_target=0.6, **pagcp)),
        Setting("tp-uniform", "Torch-Pruning uniform L1, round_to 8, at ALDS latency-keep 0.6's latency"),
        Setting("tp-global", "Torch-Pruning global group-magnitude, round_to 8, at the same latency",
                global_pruning=True),
    )


# ------------------------------------------------------------------------------------------------- models


def torchvision_model(name: str) -> nn.Module:
    """torchvision `name` with 10 classes and a 1-channel stem (Fashion-MNIST as it is), random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = getattr(torchvision.models, name)(num_classes=10)
        if name == "resnet18":
            model.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
        elif name == "mobilenet_v2":
            model.features[0][0] = nn.Conv2d(1, 32, 3, stride=2, padding=1, bias=False)
        else:
            raise SystemExit(f"unknown torchvision model {name!r}; choose {', '.join(TORCHVISION)}")
    return model


def trained_torchvision(name: str, splits: Splits) -> tuple[nn.Module, dict]:
    """The model trained by this benchmark's recipe; cached weights are reused (a rerun skips training)."""
    folder = WORK / "models"
    weights, meta_file = folder / f"{name}.safetensors", folder / f"{name}.json"
    model = torchvision_model(name)
    if weights.is_file() and meta_file.is_file():
        model.load_state_dict(load_state_file(weights), strict=True)
        return model.eval(), json.loads(meta_file.read_text())
    recipe = FinetuneConfig(epochs=TRAIN["epochs"], lr=TRAIN["lr"])
    log(stage="train", model=name, **TRAIN)
    started = time.perf_counter()
    train(model, dataclasses.replace(splits, train=splits.train.subset(TRAIN["items"])), recipe, seed=SEED,
          device=torch.device("cpu"))
    meta = {"recipe": dict(TRAIN, batch_size=recipe.batch_size, optimizer=recipe.optimizer, schedule="cosine",
                           label_smoothing=recipe.label_smoothing, augment=recipe.augment, seed=SEED),
            "train_seconds": round(time.perf_counter() - started, 1), "threads": torch.get_num_threads()}
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    meta_file.write_text(json.dumps(meta, indent=1))
    log(stage="trained", model=name, seconds=meta["train_seconds"])
    return model.eval(), meta


def load_bench_model(name: str) -> tuple[nn.Module, Splits, dict]:
    """The model, its data and how it was made."""
    if name in ("rescnn", "mtnet"):
        loaded = load_model(name)
        return loaded.model.cpu().eval(), load_data_for(loaded, None, SEED), {
            "made_by": f"shipped baseline (`load_model(\"{name}\")`, "
                       f"`make {'baseline' if name == 'rescnn' else 'baseline-mtnet'}`)"}
    splits = load_dataset("fashion-mnist", SEED)
    model, meta = trained_torchvision(name, splits)
    return model, splits, {"made_by": f"torchvision {name}, 1-channel stem, trained here: {TRAIN['epochs']} "
                                      f"epochs on the first {TRAIN['items']:,} training items, SGD lr "
                                      f"{TRAIN['lr']}, cosine ({meta['train_seconds']:.0f} s)", **meta}


def structure_only(name: str) -> nn.Module:
    """The model's architecture for timing alone (shipped weights where they ship, else random)."""
    return load_model(name).model.eval() if name in ("rescnn", "mtnet") else torchvision_model(name).eval()


# ------------------------------------------------------------------------------------------------- bench state


@dataclass
class Bench:
    """One model under test: its data, context, cost model and measuring settings."""

    name: str
    original: nn.Module
    splits: Splits
    info: dict
    runs: dict[int, int]
    threads: int
    tune_items: int
    example: torch.Tensor = field(init=False)
    costs: CostModel = field(init=False)
    rest: float = field(init=False)
    predicted_original: float = field(init=False)

    def __post_init__(self) -> None:
        self.example = self.splits.test.x[:1].clone()
        # one cost table for every row (COMPRESS_CACHE_DIR): the methods' own tables share the file
        self.costs = CostModel(ONNXRUNTIME_CPU, batch=1, threads=1)
        measured = measure_model_ms(self.original, self.example, self.costs, runs=PREDICT_RUNS)
        self.rest = rest_ms(self.original, self.example, self.costs, measured)
        self.predicted_original = predict_ms(self.original, self.example, self.costs, self.rest)
        self.costs.save()

    @property
    def inputs(self) -> torch.Tensor:
        return self.splits.test.x[:INPUTS]

    @property
    def calibration(self) -> torch.Tensor:
        return self.splits.calibration.x[:CALIBRATION]

    def context(self) -> Any:
        """What `compress prune` gives a method: data, tasks, BN re-estimation, short fine-tunes, evaluation."""
        tune = FinetuneConfig(epochs=TUNE["epochs"], lr=TUNE["lr"])
        return method_context(self.splits, self.example, RunOptions(out=WORK / "unused", seed=SEED), tune)

    def metrics(self, model: nn.Module) -> dict[str, float]:
        return {k: round(float(v), 4) for k, v in evaluate(model, self.splits.test).metrics.items()}


# ------------------------------------------------------------------------------------------------- measuring


def speedups(candidate: nn.Module, original: nn.Module, bench: Bench) -> list[dict]:
    """ORT b1 and b32, PyTorch CPU b1 and the mobile proxy b1, each interleaved with the original."""
    plans = ((ONNXRUNTIME_CPU, PYTORCH_CPU, MOBILE_PROXY), 1), ((ONNXRUNTIME_CPU,), 32)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        for index, (backends, batch) in enumerate(plans):
            runs = bench.runs[batch]
            settings_ = LatencySettings(backends=backends, batches=(batch,), threads=bench.threads, runs=runs,
                                        warmup=max(3, runs // 5))
            rows += [r.to_dict() for r in measure_backends(candidate, original, bench.inputs, bench.calibration,
                                                           settings_, Path(tmp) / str(index))]
    return rows


def ort_latency_ratio(candidate: nn.Module, original: nn.Module, bench: Bench) -> float:
    """Candidate / original median time on ONNX Runtime at batch 1 (per-round ratios), for the bisection."""
    settings_ = LatencySettings(backends=(ONNXRUNTIME_CPU,), batches=(1,), threads=bench.threads, runs=BISECT_RUNS,
                                warmup=5)
    with tempfile.TemporaryDirectory(prefix="bench-speed-tp-") as tmp:
        row = measure_backends(candidate, original, bench.inputs, bench.calibration, settings_, Path(tmp))[0]
    return 1.0 / row.speedup


def latency_of(row: dict, backend: str, batch: int) -> dict | None:
    return next((r for r in row.get("latency", []) if r["backend"] == backend and r["batch"] == batch), None)


# ------------------------------------------------------------------------------------------------- Torch-Pruning


def match_target(rows: dict[str, dict]) -> tuple[float, str]:
    """The latency Torch-Pruning is matched to: ALDS latency-keep 0.6's measured ORT b1 ratio, else 0.6."""
    alds = rows.get(MATCH_KEY)
    measured = latency_of(alds, ONNXRUNTIME_CPU, 1) if alds else None
    if measured is not None:
        return 1.0 / measured["speedup"], "ALDS --latency-keep 0.6's measured ORT b1 latency"
    return 0.6, "the requested 0.6, since ALDS --latency-keep 0.6 has no model on this network"


def tp_matched(bench: Bench, setting: Setting, target: float) -> tuple[nn.Module, dict]:
    """Torch-Pruning (round_to 8) at the ratio whose measured ORT b1 latency ratio is nearest `target`."""
    low, high, tried = 0.0, TP_MAX_RATIO, []
    for _ in range(BISECT_STEPS):
        mid = (low + high) / 2
        pruned = tp_pruned(copy.deepcopy(bench.original), bench.example, mid, setting.global_pruning, ROUND_TO)
        ratio = ort_latency_ratio(pruned.eval(), bench.original, bench)
        tried.append({"pruning_ratio": round(mid, 4), "latency_ratio": round(ratio, 4)})
        low, high = (mid, high) if ratio > target else (low, mid)
    best = min(tried, key=lambda t: abs(t["latency_ratio"] - target))
    model = tp_pruned(copy.deepcopy(bench.original), bench.example, best["pruning_ratio"], setting.global_pruning,
                      ROUND_TO)
    return model, {"pruning_ratio": best["pruning_ratio"], "matched_to": round(target, 4), "bisection": tried}


# ------------------------------------------------------------------------------------------------- one row


def smallest_reachable(message: str) -> float | None:
    """The smallest reachable fraction a method's 'unreachable' message names, if it names one."""
    found = re.search(r"(?:keeps|measures) (\d+(?:\.\d+)?)", message)
    return float(found.group(1)) if found else None


def compress_row(bench: Bench, setting: Setting, target: float) -> tuple[nn.Module, Any, dict]:
    """The compressed model, the method's result (None for Torch-Pruning) and what the row records of it."""
    model = copy.deepcopy(bench.original)
    if setting.config is None:
        model, extra = tp_matched(bench, setting, target)
        return model, None, extra
    ctx = bench.context()
    result = METHODS[setting.method].apply(model, setting.config, ctx)
    extra = {"summary_keep": result.summary.get("keep"), "transforms": result.transforms}
    latency_target = result.sections.get("latency_target")
    if latency_target:
        extra["cost_table"] = latency_target.get("cost_table")
        extra["predicted_by_method"] = latency_target.get("predicted")
        extra["calibrated_by_method"] = latency_target.get("calibrated")
    if "latency_calibration" in result.summary:  # PAGCP at a latency target: its keep is the calibrated ratio
        extra["calibrated_by_method"] = result.summary["keep"]["achieved"]
    if "target_met" in result.summary:
        extra["target_met"] = result.summary["target_met"]
    if "compare_plain" in result.summary:  # priced ALDS: the searched k's or plain low rank, which shipped and why
        extra["compare_plain"] = result.summary["compare_plain"]
    return result.model, (result, ctx), extra


def audited(setting: Setting, outcome: Any, model: nn.Module, bench: Bench) -> tuple[list[str], dict]:
    """The method's own audit on the model that ships (what `compress prune` exits 6 on)."""
    if outcome is None:
        return [], {}
    result, ctx = outcome
    try:
        checked = audit(setting.config, result, model.eval(), bench.original, ctx)
    except (AuditError, UsageError) as exc:
        return [str(exc)], {}
    return checked.problems, checked.figures


def shape_figures(model: nn.Module, bench: Bench) -> dict:
    """MACs and parameters kept (dense and nonzero), against the original."""
    before_macs, after_macs = count_macs(bench.original, bench.example), count_macs(model, bench.example)
    before, after = count_params(bench.original), count_params(model)
    return {"macs_kept": after_macs.macs / before_macs.macs,
            "macs_effective_kept": after_macs.macs_effective / before_macs.macs,
            "params_kept": after.total / before.total, "params_nonzero_kept": after.nonzero / before.total,
            "activations_kept": activations(model, bench.example) / activations(bench.original, bench.example)}


def finetuned(model: nn.Module, outcome: Any, bench: Bench) -> dict[str, float]:
    """One epoch on the first `tune_items` training items (masks kept), then every task's test metric."""
    masks = outcome[0].masks if outcome is not None else None
    tune = FinetuneConfig(epochs=TUNE["epochs"], lr=TUNE["lr"])
    data = dataclasses.replace(bench.splits, train=bench.splits.train.subset(bench.tune_items))
    train(model, data, tune, masks=masks, seed=SEED, device=torch.device("cpu"))
    return bench.metrics(model.eval())


def run_row(bench: Bench, setting: Setting, done: dict[str, dict]) -> dict:
    """One setting on one model: compressed, audited, measured, predicted, fine-tuned; or why it could not be."""
    row: dict[str, Any] = {"model": bench.name, "setting": setting.key, "label": setting.label,
                           "method": setting.method}
    target, target_source = match_target(done)
    if setting.config is None:
        row["target_source"] = target_source
    else:
        row["config"] = setting.config.to_dict()
    started = time.perf_counter()
    try:
        model, outcome, extra = compress_row(bench, setting, target)
    except (UsageError, AuditError) as exc:
        row.update(status="unreachable", message=str(exc), smallest_reachable=smallest_reachable(str(exc)),
                   compress_seconds=round(time.perf_counter() - started, 2))
        return row
    row.update(extra, compress_seconds=round(time.perf_counter() - started, 2))
    model.eval()
    row["after_compression_raw"] = bench.metrics(model)
    recalibrate_batchnorm(model, bench.splits.calibration)  # as `compress prune` does before it measures
    row["after_compression"] = bench.metrics(model)
    problems, figures = audited(setting, outcome, model, bench)
    row.update(status="audit failed" if problems else "ok", audit_problems=problems, audit_figures=figures)
    if setting.config is None:
        row["transforms"] = [channel_transform(model, {k: list(v.shape)
                                                       for k, v in bench.original.state_dict().items()})]
    row.update(shape_figures(model, bench))
    row["latency"] = speedups(model, bench.original, bench)
    predicted = predict_ms(model, bench.example, bench.costs, bench.rest, reference=bench.original)
    bench.costs.save()
    ort = latency_of(row, ONNXRUNTIME_CPU, 1)
    # both latencies as fractions of the original: the measured one against the original timed beside it, so
    # that the machine's drift between the prediction's reference measurement and this one cancels; a method that
    # landed a latency target predicts through its calibration (the models it measured), the others by the table
    table_ratio = predicted / bench.predicted_original
    ratio = row.get("calibrated_by_method") or table_ratio
    row.update(predicted_ms=predicted, predicted_original_ms=bench.predicted_original,
               predicted_speedup=1.0 / ratio, predicted_ratio=ratio, predicted_ratio_table=table_ratio,
               predicted_calibrated="calibrated_by_method" in row and row["calibrated_by_method"] is not None,
               measured_ratio=1.0 / ort["speedup"], predicted_over_measured=ratio * ort["speedup"],
               predicted_over_measured_ms=predicted / ort["p50_ms"])
    started = time.perf_counter()
    row["after_finetune"] = finetuned(model, outcome, bench)
    row["finetune_seconds"] = round(time.perf_counter() - started, 1)
    return row


def run_model(name: str, chosen: tuple[Setting, ...], runs: dict[int, int], threads: int,
              tune_items: int) -> tuple[dict, list[dict]]:
    """Every chosen setting on one model: its meta and its rows."""
    started = time.perf_counter()
    original, splits, info = load_bench_model(name)
    bench = Bench(name, original, splits, info, runs, threads, tune_items)
    meta = {"name": name, **info, "input_shape": list(splits.input_shape), "data": splits.name,
            "test_items": len(splits.test), "train_items": len(splits.train), "tune_items": tune_items,
            "tasks": [t.to_dict() for t in splits.tasks], "original": bench.metrics(original),
            "macs": count_macs(original, bench.example).macs, "params": count_params(original).total,
            "rest_ms": bench.rest, "predicted_original_ms": bench.predicted_original}
    log(stage="model", **{k: v for k, v in meta.items() if k != "tasks"})
    done: dict[str, dict] = {}
    for setting in chosen:
        try:
            row = run_row(bench, setting, done)
        except Exception as exc:  # noqa: BLE001 - one failing row must not cost an hour of others; it is shown
            row = {"model": name, "setting": setting.key, "label": setting.label, "method": setting.method,
                   "status": "error", "message": f"{type(exc).__name__}: {exc}"}
        done[setting.key] = row
        log(**{k: v for k, v in row.items() if k not in ("transforms", "config", "audit_figures", "cost_table")})
    meta["cost_table"] = bench.costs.summary()
    meta["seconds"] = round(time.perf_counter() - started, 1)
    return meta, list(done.values())


# ------------------------------------------------------------------------------------------------- GPU


def gpu_section(payload: dict, threads: int) -> dict:
    """Every measured row's structure (replayed from its recorded transforms) against its original on
    pytorch-cuda, batch 1 and 32; or a note that no CUDA device was present."""
    if not torch.cuda.is_available():
        return {"present": False, "note": "no CUDA device was present on this run; `python benchmarks/"
                                          "bench_speed.py --gpu-only` on a machine with one fills this section"}
    import compress.methods  # noqa: F401 - registers the low-rank and channel transforms that are replayed

    rows = []
    runs = payload["meta"]["runs"]
    for meta in payload["models"]:
        original = structure_only(meta["name"])
        inputs = torch.randn(INPUTS, *meta["input_shape"], generator=torch.Generator().manual_seed(SEED))
        for row in (r for r in payload["rows"] if r["model"] == meta["name"] and "latency" in r):
            candidate = replay_transforms(copy.deepcopy(original), row.get("transforms") or []).eval()
            found = []
            for batch in (1, 32):
                settings_ = LatencySettings(backends=(PYTORCH_CUDA,), batches=(batch,), threads=threads,
                                            runs=int(runs[str(batch)]),
                                            warmup=10)
                with tempfile.TemporaryDirectory(prefix="bench-speed-gpu-") as tmp:
                    found += [r.to_dict() for r in measure_backends(candidate, original, inputs, inputs, settings_,
                                                                    Path(tmp))]
            rows.append({"model": meta["name"], "setting": row["setting"], "label": row["label"],
                         "latency": found})
            log(stage="gpu", model=meta["name"], setting=row["setting"],
                speedups={f"b{r['batch']}": round(r["speedup"], 3) for r in found})
    return {"present": True, "device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
            "note": "structures replayed from each row's recorded transforms with the original's weights where "
                    "they ship (random otherwise; speed does not depend on the values)", "rows": rows}


# ------------------------------------------------------------------------------------------------- report


def cell(row: dict, backend: str, batch: int) -> str:
    found = latency_of(row, backend, batch)
    if found is None:
        return "-"
    low, high = found["speedup_spread"]
    return f"{found['speedup']:.2f}x [{low:.2f}, {high:.2f}]"


def tasks_of(payload: dict, model: str) -> list[dict]:
    return next(m["tasks"] for m in payload["models"] if m["name"] == model)


def metric_text(values: dict[str, float] | None, tasks: list[dict]) -> str:
    """Every task's metric, e.g. '89.12' for a classifier or 'class 85.6, mask 0.93, position 0.96'."""
    if not values:
        return "-"
    if len(tasks) == 1:
        return f"{values[tasks[0]['name']]:.2f}"
    return ", ".join(f"{t['name']} {values[t['name']]:.2f}" for t in tasks)


def note_text(row: dict) -> str:
    """Unreachable, audit failed, Torch-Pruning's matched ratio, GlobalMP's lack of dense speed-up."""
    if row["status"] == "error":
        return f"**error** (a bug to report, not a result): {row['message']}"
    if row["status"] == "unreachable":
        smallest = row.get("smallest_reachable")
        tail = f" (smallest reachable: {smallest:.3f})" if smallest is not None else ""
        return f"**unreachable**{tail}: {row['message']}"
    notes = []
    if row["status"] == "audit failed":
        notes.append("**audit failed**: " + "; ".join(row["audit_problems"]))
    if row["method"] == "torch-pruning":
        notes.append(f"pruning ratio {row['pruning_ratio']:.3f}, matched to a latency ratio of "
                     f"{row['matched_to']:.3f}: {row['target_source']}")
    if row["method"] == "globalmp":
        notes.append(f"unstructured: {row['macs_effective_kept']:.3f} of MACs effective, no dense speed-up "
                     "(size and accuracy only)")
    return "; ".join(notes)


def main_table(payload: dict, model: dict) -> list[str]:
    """One model's rows."""
    tasks = tasks_of(payload, model["name"])
    header = ["setting", "MACs kept", "params kept", "predicted ORT b1", "ORT b1", "ORT b32", "PyTorch CPU b1",
              "mobile (proxy) b1", "latency ratio predicted / measured (ORT b1)",
              "after compression", f"after {TUNE['epochs']} epoch", "note"]
    original = model["original"]
    lines = [f"### {model['name']} ({'x'.join(map(str, model['input_shape']))}, {model['data']})", "",
             f"Made by: {model['made_by']}. Original: {metric_text(original, tasks)}; {model['macs']:,} MACs, "
             f"{model['params']:,} parameters; ORT b1 {model['predicted_original_ms']:.3f} ms (time outside the "
             f"Conv2d/Linear layers: {model['rest_ms']:.3f} ms). Metrics: "
             + ", ".join(f"{t['name']} {t['metric']} {'↑' if t['higher_is_better'] else '↓'}" for t in tasks)
             + f"; fine-tuned on the first {model['tune_items']:,} training items.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in (r for r in payload["rows"] if r["model"] == model["name"]):
        if "latency" not in row:  # unreachable, or an error
            cells = [row["label"]] + ["-"] * (len(header) - 2) + [note_text(row)]
        else:
            cells = [row["label"], f"{row['macs_kept']:.3f}", f"{row['params_kept']:.3f}",
                     f"{row['predicted_speedup']:.2f}x", cell(row, ONNXRUNTIME_CPU, 1), cell(row, ONNXRUNTIME_CPU, 32),
                     cell(row, PYTORCH_CPU, 1), cell(row, MOBILE_PROXY, 1),
                     (f"{row['predicted_ratio']:.3f} / {row['measured_ratio']:.3f} = "
                     f"{row['predicted_over_measured']:.2f}" + (" (calibrated)" if row.get("predicted_calibrated")
                                                                 else "")),
                     metric_text(row["after_compression"], tasks), metric_text(row["after_finetune"], tasks),
                     note_text(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def find(payload: dict, model: str, key: str) -> dict | None:
    return next((r for r in payload["rows"] if r["model"] == model and r["setting"] == key), None)


def ahead(a: dict, b: dict, tasks: list[dict], stage: str) -> bool:
    """Whether row `a` beats row `b` on every task at `stage` (each metric's own direction)."""
    def better(t: dict) -> bool:
        x, y = a[stage][t["name"]], b[stage][t["name"]]
        return x > y if t["higher_is_better"] else x < y
    return all(better(t) for t in tasks)


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def goal_speed(payload: dict) -> list[str]:
    """Goal 1: priced ALDS at keep 0.5 is >= 1.3x on ORT b1 on rescnn and resnet18, within 1 point of today's."""
    lines, all_ok = [], True
    for model in ("rescnn", "resnet18"):
        priced, today = find(payload, model, "alds-keep0.5-lat1.0"), find(payload, model, "alds-keep0.5")
        if priced is None or today is None:
            lines.append(f"  - {model}: not run")
            all_ok = False
            continue
        if "latency" not in priced:
            lines.append(f"  - {model}: {priced['status']} ({priced['message']})")
            all_ok = False
            continue
        ort = latency_of(priced, ONNXRUNTIME_CPU, 1)
        tasks = tasks_of(payload, model)
        name = tasks[0]["name"]
        acc, base = priced["after_compression"][name], today["after_compression"][name] if today.get(
            "after_compression") else None
        fast = ort["speedup"] >= SPEEDUP_GOAL
        close = base is not None and acc >= base - 1.0
        all_ok &= fast and close
        lines.append(f"  - {model}: ORT b1 speed-up {ort['speedup']:.2f}x [{ort['speedup_spread'][0]:.2f}, "
                     f"{ort['speedup_spread'][1]:.2f}] (>= {SPEEDUP_GOAL}x: {verdict(fast)}); accuracy after "
                     f"compression {acc:.2f} vs --no-priced "
                     f"{'-' if base is None else f'{base:.2f}'} ({'-' if base is None else f'{acc - base:+.2f}'} "
                     f"points, no more than 1 below: {verdict(close)})")
        for key, words in (("alds-keep0.5-lat0.75", "with `--latency-keep 0.75` asked as well"),
                           ("alds-keep0.5-k1", "with `--groups 1` (no grouped layers)")):
            asked = find(payload, model, key)
            if asked is not None and "latency" in asked:
                ort = latency_of(asked, ONNXRUNTIME_CPU, 1)
                lines.append(f"    - {words}: {ort['speedup']:.2f}x [{ort['speedup_spread'][0]:.2f}, "
                             f"{ort['speedup_spread'][1]:.2f}], accuracy after compression "
                             f"{asked['after_compression'][name]:.2f}")
    head = (f"- **ALDS at keep 0.5** (the default, priced: `--keep 0.5`): ORT b1 speed-up >= {SPEEDUP_GOAL}x "
            "on rescnn and resnet18, accuracy after compression no more than 1 point below the paper's allocation at "
            f"keep 0.5 (`--no-priced`, the default before this issue): {verdict(all_ok)}")
    return [head, *lines]


def goal_latency(payload: dict) -> list[str]:
    """Goal 2: ALDS latency-keep 0.6 measures <= 0.66 on ORT b1 everywhere, and is ahead of svd-energy and TP."""
    lines, all_ok = [], True
    for model in (m["name"] for m in payload["models"]):
        row = find(payload, model, MATCH_KEY)
        if row is None:
            continue
        if "latency" not in row:
            smallest = row.get("smallest_reachable")
            lines.append(f"  - {model}: **{row['status']}** (ALDS: smallest reachable latency "
                         f"{'-' if smallest is None else f'{smallest:.3f}'}): not met")
            all_ok = False
            continue
        ort = latency_of(row, ONNXRUNTIME_CPU, 1)
        ratio = 1.0 / ort["speedup"]
        fast = ratio <= LATENCY_GOAL
        tasks = tasks_of(payload, model)
        parts = [(f"measured latency {ratio:.3f} of the original (p25-p75 {1 / ort['speedup_spread'][1]:.3f}-"
                 f"{1 / ort['speedup_spread'][0]:.3f}; <= {LATENCY_GOAL}: {verdict(fast)})")]
        ok = fast
        for key, name in (("svd-energy-lat0.6", "svd-energy --latency-keep 0.6"), ("tp-uniform", "TP uniform L1")):
            other = find(payload, model, key)
            if other is None or "latency" not in other:
                parts.append(f"{name}: {'not run' if other is None else other['status']}, so ALDS has the only "
                             "model at that latency")
                continue
            for stage, words in (("after_compression", "after compression"), ("after_finetune", "after 1 epoch")):
                win = ahead(row, other, tasks, stage)
                ok &= win
                parts.append(f"ahead of {name} {words}: {metric_text(row[stage], tasks)} vs "
                             f"{metric_text(other[stage], tasks)}, {verdict(win)}")
        all_ok &= ok
        lines.append(f"  - {model}: " + "; ".join(parts))
        plain = find(payload, model, "alds-lat0.6-k1")
        if plain is not None and "latency" in plain:
            lines.append(f"    - with `--groups 1` (no grouped layers): measured latency "
                         f"{1.0 / latency_of(plain, ONNXRUNTIME_CPU, 1)['speedup']:.3f}, after compression "
                         f"{metric_text(plain['after_compression'], tasks)}, after 1 epoch "
                         f"{metric_text(plain['after_finetune'], tasks)}")
    head = (f"- **`--latency-keep 0.6`**: measured ORT b1 latency at most {LATENCY_GOAL} of the original on every "
            "model, and accuracy (every task) ahead of svd-energy and Torch-Pruning uniform L1 at that latency: "
            f"{verdict(all_ok)}")
    return [head, *lines]


def goal_pagcp(payload: dict) -> list[str]:
    """Goal 3: PAGCP's ORT b1 speed-up is at least 0.9 of its MACs ratio."""
    lines, all_ok = [], True
    for row in (r for r in payload["rows"] if r["method"] == "pagcp"):
        if "latency" not in row:
            lines.append(f"  - {row['model']}, {row['label']}: {row['status']} ({row['message']})")
            all_ok = False
            continue
        ort = latency_of(row, ONNXRUNTIME_CPU, 1)
        share = ort["speedup"] * row["macs_kept"]
        ok = share >= PAGCP_GOAL
        all_ok &= ok
        audit_note = " (audit failed: target missed)" if row["status"] == "audit failed" else ""
        lines.append(f"  - {row['model']}, {row['label']}: {ort['speedup']:.2f}x for a MACs ratio of "
                     f"{1 / row['macs_kept']:.2f}x = {share:.3f} of it{audit_note}: {verdict(ok)}"
                     + attainable_note(payload, row))
    return [(f"- **PAGCP at its target**: ORT b1 speed-up at least {PAGCP_GOAL} of its MACs ratio: "
            f"{verdict(all_ok and bool(lines))}"), *lines]


def attainable_note(payload: dict, row: dict) -> str:
    """What share of the MACs ratio a channel-pruned model could reach if its layers' time fell with their MACs
    and the time outside them (measured on the original) with the activations handed on: the part that no choice
    of channels at these MACs and activations can beat."""
    model = next((m for m in payload["models"] if m["name"] == row["model"]), None)
    if model is None or "activations_kept" not in row:
        return ""
    total, rest = model["predicted_original_ms"], model["rest_ms"]
    ideal = total / (rest * row["activations_kept"] + (total - rest) * row["macs_kept"])
    return (f" (attainable with the layers' time falling with their MACs and the rest, {rest / total:.0%} of the "
            f"original's time, with the activations, {row['activations_kept']:.2f} kept: {ideal * row['macs_kept']:.2f})")


def goal_prediction(payload: dict) -> list[str]:
    """Goal 4: predicted whole-model ORT b1 latency within 15% of measured on every row."""
    measured = [r for r in payload["rows"] if "predicted_over_measured" in r]
    off = [r for r in measured if abs(r["predicted_over_measured"] - 1) > TOLERANCE]
    ratios = [r["predicted_over_measured"] for r in measured]
    lines = [(f"- **Prediction**: predicted whole-model latency (ORT b1) within {TOLERANCE:.0%} of measured on every "
             f"row (both as fractions of the original's: predicted by the method's calibration where it landed a "
             f"latency target, else from the cost table; measured against the original timed beside it): "
             f"{len(measured) - len(off)} of {len(measured)} rows within; "
             f"{verdict(not off and bool(measured))}")]
    if ratios:
        raw = [r["predicted_over_measured_ms"] for r in measured]
        lines.append(f"  - predicted / measured over all rows: median {statistics.median(ratios):.2f}, range "
                     f"{min(ratios):.2f}-{max(ratios):.2f} (in raw milliseconds, the candidate's prediction against "
                     f"its own p50 timed later: median {statistics.median(raw):.2f}, range {min(raw):.2f}-"
                     f"{max(raw):.2f})")
    for row in off:
        ort = latency_of(row, ONNXRUNTIME_CPU, 1)
        lines.append(f"  - off: {row['model']}, {row['label']}: predicted {row['predicted_ratio']:.3f} of the "
                     f"original, measured {row['measured_ratio']:.3f} ({row['predicted_over_measured']:.2f}); "
                     f"{row['predicted_ms']:.3f} ms predicted, {ort['p50_ms']:.3f} ms measured")
    return lines


def gpu_lines(payload: dict) -> list[str]:
    """The GPU section: pytorch-cuda b1 and b32 per row, or why it is empty."""
    gpu = payload.get("gpu") or {"present": False, "note": "not run"}
    lines = ["## GPU (pytorch-cuda)", ""]
    if not gpu.get("present"):
        return lines + [f"No GPU: {gpu['note']}.", ""]
    lines += [(f"{gpu['device']} (CUDA {gpu['cuda']}); {gpu['note']}. Speed-up with p25-p75, interleaved, "
              "synchronised."), "", "| model | setting | pytorch-cuda b1 | pytorch-cuda b32 |", "|---|---|---|---|"]
    for row in gpu["rows"]:
        lines.append(f"| {row['model']} | {row['label']} | {cell(row, PYTORCH_CUDA, 1)} | "
                     f"{cell(row, PYTORCH_CUDA, 32)} |")
    return lines + [""]


def shipped_allocations(payload: dict) -> list[str]:
    """Per priced, searching ALDS row: whether a decomposed layer is grouped (the search's k's) or none is."""
    compared = {s.key for s in settings() if isinstance(s.config, ALDSConfig) and s.config.priced
                and s.config.compare_plain and s.config.groups != (1,)}
    out = []
    for row in payload["rows"]:
        if row["setting"] not in compared:
            continue
        ks = [t["groups"] for t in row.get("transforms") or [] if "groups" in t]
        if ks:
            out.append(f"{row['model']} {row['setting']}: {'search' if any(k > 1 for k in ks) else 'plain'}")
    return out


def notes_lines(payload: dict) -> list[str]:
    """How the rows were made, where the models come from, the cost tables, how to reproduce."""
    tables = ", ".join(f"{m['name']} {m['cost_table']['entries']} entries" for m in payload["models"])
    return [
        "## Notes", "",
        ("- Torch-Pruning rows: `MetaPruner` with `round_to=8`, task heads ignored as in bench_pagcp.py; uniform = "
         "L1 magnitude per layer, global = group magnitude (p=2) ranked across layers; the pruning ratio is "
         f"bisected ({BISECT_STEPS} steps, {BISECT_RUNS} interleaved rounds each) so that the measured ORT b1 "
         "latency ratio meets ALDS --latency-keep 0.6's measured one (or 0.6 where ALDS has no model)."),
        ("- PAGCP rows: one round, tau 5, geometric schedule (`exp`), 256 calibration items, round_to 8 (as "
         "bench_pagcp.py). ALDS/svd-energy at a latency target price their choices on onnxruntime-cpu at batch 1 "
         "(ranks in steps of 8, at least 16 channels a group, a layer kept dense unless it saves 10%)."),
        ("- Prediction: rows marked (calibrated) come from the method's own map of predicted to measured ratios, "
         "built from the models it measured while landing its latency target (pricing.land); the other rows are "
         "the cost table's prediction (one-layer graphs timed apart from the model, the time outside the layers "
         "scaled by the activations handed on), which misses in-model effects (caches, fusion, layout)."),
        ("- Priced ALDS (not `--groups 1`) weighs its searched k's against plain low rank on calibration data and "
         "ships one (`compare_plain`); what each row shipped, read from its transforms: "
         + "; ".join(shipped_allocations(payload)) + "."),
        "- Models: " + "; ".join(f"{m['name']}: {m['made_by']}" for m in payload["models"]) + ".",
        f"- Cost tables: {tables}; a rerun reuses them (one cache directory for the whole run).",
        ("- Reproduce: `make bench-speed` (`python benchmarks/bench_speed.py --quick` tries it on rescnn alone; "
         "`--gpu-only` on a CUDA machine fills the GPU section)."), ""]


def render(payload: dict) -> str:
    """reports/speed.md from the payload alone."""
    meta, env = payload["meta"], payload["meta"]["env"]
    lines = ["# Faster in milliseconds: every method at a size target and at a latency target", "",
             ("Issue 11, item 5 (`make bench-speed`). Speed-up = original p50 / compressed p50, both timed "
             "interleaved in one process by `compress.measure.backends.measure_backends`, "
             f"{meta['threads']} thread(s), [p25, p75] of the per-round ratios; {meta['runs']['1']} rounds at batch 1, "
             f"{meta['runs']['32']} at batch 32. Predicted: the cost model (`compress.measure.costs`, onnxruntime-cpu, "
             "batch 1): the original's time outside its Conv2d/Linear layers, measured once, plus each layer's "
             "price at its real shape. The mobile proxy is a static-shape int8 (QDQ) model in ORT format run by ONNX "
             "Runtime's CPU provider on this machine: the phone build's graph, not a phone's speed. Accuracy after "
             "compression: BatchNorm statistics re-estimated on the calibration split, as `compress prune` does; "
             f"then {TUNE['epochs']} epoch of fine-tuning (SGD lr {TUNE['lr']}, cosine, label smoothing 0.1, masks "
             "kept) on a subset of the training split, the same for every row. A setting the method cannot meet "
             "is a row with the method's own message (a result, not a crash); \"audit failed\" is what `compress "
             "prune` would exit 6 on, and the model is measured anyway."), ""]
    lines += ["## Goals (issue 11)", "", *goal_speed(payload), *goal_latency(payload), *goal_pagcp(payload),
              *goal_prediction(payload), ""]
    lines += [f"**Conditions**: {env['cpu']} ({env['cpu_count']} cores, shared), {meta['threads']} thread(s); "
              + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
              + f"; wall time {meta['wall_seconds'] / 60:.1f} min; cost tables in `{meta['cost_dir']}`.", ""]
    lines += ["## Results", ""]
    for model in payload["models"]:
        lines += main_table(payload, model)
    lines += gpu_lines(payload)
    lines += notes_lines(payload)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main


def shown(path: Path) -> str:
    """A path relative to the repository when it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def outputs(quick: bool) -> tuple[Path, Path]:
    """Where the report goes: reports/speed.{md,json}, or the gitignored quick folder."""
    folder = WORK / "quick" if quick else REPORTS
    return folder / "speed.json", folder / "speed.md"


def write(payload: dict, json_path: Path, md_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(json_path, to_json(payload))
    write_atomic(md_path, render(payload))
    print(f"wrote {md_path.relative_to(ROOT)}", flush=True)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--settings", default="", help="comma-separated setting keys (default: all): "
                        + ", ".join(s.key for s in settings()))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="rescnn only, fewer rounds, a smaller fine-tune; "
                        "writes runs/bench-speed/quick/")
    parser.add_argument("--merge", action="store_true", help="keep the existing json's rows that this run does "
                        "not redo (other models, other settings)")
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json")
    parser.add_argument("--gpu-only", action="store_true", help="time the json's rows on pytorch-cuda only")
    return parser.parse_args()


def main() -> None:
    args = parse()
    json_path, md_path = outputs(args.quick)
    if args.render_only:
        md_path.write_text(render(json.loads(json_path.read_text())))
        print(f"wrote {md_path.relative_to(ROOT)}", flush=True)
        return
    os.environ.setdefault(CACHE_ENV, str(WORK / "costs"))  # one cost-table directory for every table of the run
    torch.set_num_threads(args.threads)
    if args.gpu_only:
        payload = json.loads(json_path.read_text())
        payload["gpu"] = gpu_section(payload, args.threads)
        write(payload, json_path, md_path)
        return
    models = ("rescnn",) if args.quick else tuple(m for m in args.models.split(",") if m)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    keys = [k for k in args.settings.split(",") if k]
    chosen = tuple(s for s in settings() if not keys or s.key in keys)
    runs = QUICK_RUNS if args.quick else RUNS
    tune_items = QUICK_TUNE_ITEMS if args.quick else TUNE["items"]
    previous = json.loads(json_path.read_text()) if args.merge and json_path.is_file() else None
    metas, rows = [], []
    run_meta = {"threads": args.threads, "runs": {str(k): v for k, v in runs.items()}, "tune": TUNE,
                "tune_items": tune_items, "train": TRAIN, "quick": args.quick,
                "cost_dir": shown(Path(os.environ[CACHE_ENV]))}
    for name in models:
        meta, model_rows = run_model(name, chosen, runs, args.threads, tune_items)
        metas.append(meta)
        rows += model_rows
        payload = assemble(previous, metas, rows, run_meta)
        write(payload, json_path, md_path)  # after every model: a run that stops keeps what it measured
    payload["gpu"] = gpu_section(payload, args.threads)
    write(payload, json_path, md_path)


def assemble(previous: dict | None, metas: list[dict], rows: list[dict], run_meta: dict) -> dict:
    """This run's models and rows, merged over a previous payload's (this run's rows replace the same
    (model, setting)); the wall time is the sum over the models' own."""
    if previous is not None:
        fresh = {m["name"] for m in metas}
        metas = [m for m in previous["models"] if m["name"] not in fresh] + metas
        redone = {(r["model"], r["setting"]) for r in rows}
        rows = [r for r in previous["rows"] if (r["model"], r["setting"]) not in redone] + rows
    model_order = {m: i for i, m in enumerate(MODELS)}
    setting_order = {s.key: i for i, s in enumerate(settings())}
    metas = sorted(metas, key=lambda m: model_order[m["name"]])
    rows = sorted(rows, key=lambda r: (model_order[r["model"]], setting_order[r["setting"]]))
    meta = dict(run_meta, wall_seconds=sum(m["seconds"] for m in metas), env=environment())
    return {"meta": meta, "models": metas, "rows": rows}

if __name__ == "__main__":
    main()
