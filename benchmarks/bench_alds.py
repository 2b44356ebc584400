"""ALDS against the svd and svd-energy baselines; writes reports/alds.md and reports/alds.json.

On the built-in `rescnn` (shipped Fashion-MNIST baseline) and on torchvision resnet18 trained briefly on
Fashion-MNIST by `compress train`: test accuracy at each keep ratio right after decomposition and after one epoch
of fine-tuning, parameters and MACs kept, eps*, and the ONNX Runtime CPU speed-up (batch 1, one thread, candidate
interleaved with the original in one process); then the wall time of allocation plus decomposition on torchvision
resnet50 and resnet18 (random weights, seeded, 224x224) at keep 0.5, one thread.

    python benchmarks/bench_alds.py [--models rescnn,resnet18] [--keeps 0.5,0.3,0.2,0.1] [--epochs 1]
        [--no-finetune] [--threads 1] [--timing-rounds 3] [--latency-runs 500] [--name alds]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from compress.api import load_data_for
from compress.artifact import to_json, write_atomic
from compress.config import ALDSConfig, FinetuneConfig, SVDConfig, SVDEnergyConfig
from compress.data import Splits
from compress.errors import UsageError
from compress.finetune import evaluate, recalibrate_batchnorm, train
from compress.measure import count_macs, count_params
from compress.measure.conditions import environment
from compress.measure.latency import interleaved_times, summarise_pair
from compress.methods import METHODS, Context
from compress.models import load_model

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "reports"
KEEPS = (0.5, 0.3, 0.2, 0.1)
# the paper's allocation by weights (priced = False): this bench holds ALDS to the paper's numbers
# the paper's comparison: every method by weights alone (priced=False), as the reference figures were made
METHOD_CONFIGS = {"alds": functools.partial(ALDSConfig, priced=False),
                  "svd-energy": functools.partial(SVDEnergyConfig, priced=False),
                  "svd": functools.partial(SVDConfig, priced=False)}
RESNET18_RUN = "runs/resnet18-fmnist"
RESNET18_TRAIN = ["train", "--model", "torchvision:resnet18", "--num-classes", "10", "--data", "fashion-mnist",
                  "--epochs", "1", "--lr", "0.05", "--threads", "1", "--out", RESNET18_RUN]
# The reference implementation (lucaslie/torchprune) on a small digits CNN, no retraining (METHODS.md §3).
REFERENCE = {"keeps": (0.5, 0.3, 0.2), "alds": (99.17, 99.17, 95.28), "svd-energy": (87.78, 54.44, 20.00),
             "svd": (46.94, 28.06, 20.00)}
AUTHORS_SECONDS = {"resnet50": 50.0, "resnet18": 30.0}  # the authors' code on this machine (issue 4)


def log(**fields: object) -> None:
    print(json.dumps(fields, default=str), flush=True)


# ------------------------------------------------------------------------------------------------- models


def ensure_resnet18(threads: int) -> None:
    """Train torchvision resnet18 on Fashion-MNIST with the project's own command unless the run exists."""
    if (ROOT / RESNET18_RUN).is_dir():
        return
    exe = Path(sys.executable).with_name("compress")
    command = [str(exe) if exe.exists() else shutil.which("compress") or "compress", *RESNET18_TRAIN]
    command[command.index("--threads") + 1] = str(threads)
    log(stage="train resnet18", command=" ".join(command[1:]))
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    log(stage="trained resnet18", seconds=round(time.perf_counter() - started, 1))


def load(name: str, seed: int) -> tuple[nn.Module, Splits, dict]:
    """The model, its data (grayscale widened for RGB models) and how it was made."""
    if name == "rescnn":
        loaded = load_model()
        info = {"label": "rescnn (built-in baseline)", "spec": "load_model()", "made_by": "`make baseline`"}
    elif name == "resnet18":
        loaded = load_model(str(ROOT / RESNET18_RUN))
        info = {"label": "torchvision resnet18", "spec": RESNET18_RUN,
                "made_by": "`compress " + " ".join(RESNET18_TRAIN) + "`"}
    elif name == "digits":  # debugging only: the tests' small CNN with random weights, on scikit-learn digits
        loaded = load_model("tests.test_alds:digits_cnn")
        loaded.dataset = "digits"
        info = {"label": "digits CNN (random weights, debug)", "spec": "tests.test_alds:digits_cnn", "made_by": "-"}
    else:
        raise SystemExit(f"unknown model {name!r}; choose rescnn, resnet18 or digits")
    splits = load_data_for(loaded, None, seed)
    return loaded.model.cpu().eval(), splits, info


# ------------------------------------------------------------------------------------------------- ONNX Runtime


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    """Static-shape export (batch 1): the TorchScript exporter (as tests/test_alds.py does), else dynamo."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, verbose=False)
            return "torchscript"
        except Exception as exc:  # noqa: BLE001 - fall back to the other exporter on any failure
            log(stage="onnx", note=f"TorchScript exporter failed ({type(exc).__name__}); using dynamo")
            torch.onnx.export(model, (example,), str(path), dynamo=True, verbose=False)
            return "dynamo"


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtModel:
    """An exported model and its one-thread session."""

    def __init__(self, model: nn.Module, example: torch.Tensor, folder: Path, name: str) -> None:
        path = folder / f"{name}.onnx"
        self.exporter = export_onnx(model.eval(), example, path)
        self.bytes = path.stat().st_size
        self.session = ort_session(path)
        self.feed = {self.session.get_inputs()[0].name: example.numpy()}
        with torch.inference_mode():
            expected = model(example).numpy()
        self.parity = float(np.abs(self.run()[0] - expected).max())

    def run(self) -> list:
        return self.session.run(None, self.feed)


def ort_speedup(candidate: OrtModel, baseline: OrtModel, runs: int) -> dict:
    cand, base = interleaved_times(candidate.run, baseline.run, runs=runs, warmup=max(5, runs // 10))
    return summarise_pair("onnxruntime-cpu", 1, 1, cand, base).to_dict()


# ------------------------------------------------------------------------------------------------- fine-tuning


def epoch_seconds_estimate(model: nn.Module, splits: Splits, tune: FinetuneConfig, seed: int,
                           steps: int = 20) -> float:
    """One epoch's wall time extrapolated from `steps` mini-batches of fine-tuning a copy of `model`."""
    n = min(len(splits.train), steps * tune.batch_size)
    probe = dataclasses.replace(splits, train=splits.train.subset(n))
    started = time.perf_counter()
    train(copy.deepcopy(model), probe, dataclasses.replace(tune, epochs=1), seed=seed, device=torch.device("cpu"))
    return (time.perf_counter() - started) * len(splits.train) / n


# ------------------------------------------------------------------------------------------------- accuracy table


def model_table(name: str, keeps: tuple[float, ...], methods: tuple[str, ...], args: argparse.Namespace,
                folder: Path) -> tuple[list[dict], dict]:
    """Every method at every keep ratio on one model: accuracy before/after fine-tuning, keep, MACs, speed-up."""
    base, splits, info = load(name, args.seed)
    example = splits.test.x[:1].clone()
    dense = evaluate(base, splits.test).accuracy
    params = count_params(base).total
    macs = count_macs(base, example).macs
    original = OrtModel(base, example, folder, f"{name}-original")
    tune = FinetuneConfig(epochs=args.epochs, lr=0.01)
    meta = dict(info, name=name, dense_accuracy=dense, params=params, macs=macs, test_items=len(splits.test),
                train_items=len(splits.train), input_shape=list(splits.input_shape), onnx_exporter=original.exporter,
                onnx_bytes=original.bytes, finetune_items=len(splits.train), finetune_subset=False)
    log(stage="model", **meta)
    tune_splits = splits
    if args.epochs > 0:
        estimate = epoch_seconds_estimate(base, splits, tune, args.seed)
        meta["epoch_seconds_estimate"] = estimate
        if name in args.subset_models.split(",") and args.subset and estimate > args.epoch_budget_s \
                and len(splits.train) > args.subset:
            tune_splits = dataclasses.replace(splits, train=splits.train.subset(args.subset))
            meta.update(finetune_items=args.subset, finetune_subset=True)
        log(stage="finetune plan", model=name, epoch_seconds_estimate=round(estimate, 1),
            finetune_items=meta["finetune_items"])
    rows, errors = [], meta.setdefault("errors", [])
    for keep in keeps:
        for method in methods:
            model = copy.deepcopy(base)
            started = time.perf_counter()
            try:
                result = METHODS[method].apply(model, METHOD_CONFIGS[method](keep=keep),
                                               Context(example, splits, torch.device("cpu"), args.seed))
            except UsageError as exc:  # e.g. a keep ratio below rank 1 everywhere
                errors.append({"model": name, "method": method, "keep": keep, "error": str(exc)})
                log(**errors[-1])
                continue
            seconds = time.perf_counter() - started
            s = result.summary
            macs_after = count_macs(model, example).macs
            row = {"model": name, "method": method, "keep": keep, "keep_achieved": s["params_keep"],
                   "params_after": s["params_after"], "macs_after": macs_after, "macs_kept": macs_after / macs,
                   "eps_star": s["eps_star"], "worst_err_spectral": s["worst_err_spectral"],
                   "layers_decomposed": s["layers_decomposed"], "layers_dense": s["layers_dense"],
                   "compress_seconds": seconds, "acc_decomposed": evaluate(model, splits.test).accuracy,
                   "groups": sorted({r["groups"] for r in result.layers if r["decomposed"]})}
            recalibrate_batchnorm(model, splits.calibration)  # as `compress prune` does; no weight changes
            row["acc_bn"] = evaluate(model, splits.test).accuracy
            candidate = OrtModel(model, example, folder, f"{name}-{method}-{keep}")
            row.update(onnx_parity=candidate.parity, onnx_bytes=candidate.bytes,
                       ort=ort_speedup(candidate, original, args.latency_runs))
            if args.epochs > 0:
                started = time.perf_counter()
                train(model, tune_splits, tune, seed=args.seed, device=torch.device("cpu"))
                row.update(acc_finetuned=evaluate(model, splits.test).accuracy,
                           finetune_seconds=time.perf_counter() - started)
            log(**{k: v for k, v in row.items()})
            rows.append(row)
    return rows, meta


# ------------------------------------------------------------------------------------------------- wall time


def seeded_torchvision(arch: str, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(torchvision.models, arch)(weights=None).eval()


def decomposition_timing(arch: str, rounds: int, seed: int, keep: float = 0.5) -> dict:
    """Wall time of ALDS (budget, k search, allocation, decomposition) on a torchvision model, one thread."""
    base = seeded_torchvision(arch, seed)
    example = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    times, summary = [], {}
    for _ in range(rounds):
        model = copy.deepcopy(base)
        started = time.perf_counter()
        summary = METHODS["alds"].apply(model, ALDSConfig(keep=keep, priced=False),
                                        Context(example, seed=seed)).summary
        times.append(time.perf_counter() - started)
    out = {"model": f"torchvision {arch}", "arch": arch, "keep": keep, "rounds": rounds, "threads": 1,
           "input": [1, 3, 224, 224], "median_s": statistics.median(times), "min_s": min(times),
           "max_s": max(times), "times_s": times, "eps_star": summary["eps_star"],
           "keep_achieved": summary["params_keep"], "worst_err_spectral": summary["worst_err_spectral"],
           "authors_s": AUTHORS_SECONDS.get(arch)}
    log(stage="timing", **out)
    return out


# ------------------------------------------------------------------------------------------------- report


def _cell(row: dict) -> str:
    tuned = f"{row['acc_finetuned']:.2f}" if "acc_finetuned" in row else "-"
    bn = f" (BN re-estimated: {row['acc_bn']:.2f})" if "acc_bn" in row else ""
    return f"{row['acc_decomposed']:.2f}{bn} / {tuned}"


def _find(rows: list[dict], model: str, method: str, keep: float) -> dict | None:
    return next((r for r in rows if r["model"] == model and r["method"] == method and r["keep"] == keep), None)


def _ft_label(meta: dict, epochs: int) -> str:
    if epochs == 0:
        return "(no fine-tuning in this run)"
    if meta.get("finetune_subset"):
        return (f"{epochs} epoch(s) of fine-tuning on a SUBSET: the first {meta['finetune_items']:,} of the "
                f"{meta['train_items']:,} training items")
    return f"{epochs} epoch(s) of fine-tuning on all {meta['train_items']:,} training items"


def margin_text(rows: list[dict], metas: list[dict]) -> list[str]:
    """ALDS minus svd-energy without retraining, next to the reference's margins."""
    ref_keeps = REFERENCE["keeps"]
    ref = [a - e for a, e in zip(REFERENCE["alds"], REFERENCE["svd-energy"])]
    lines = ["| keep | reference: ALDS | reference: SVD-energy | reference margin | "
             + " | ".join(f"{m['name']}: ALDS − svd-energy" for m in metas) + " |",
             "|---|---|---|---|" + "---|" * len(metas)]
    verdicts = {m["name"]: [] for m in metas}
    for i, keep in enumerate(sorted({r["keep"] for r in rows} | set(ref_keeps), reverse=True)):
        in_ref = keep in ref_keeps
        j = ref_keeps.index(keep) if in_ref else None
        cells = [f"{REFERENCE['alds'][j]:.2f}", f"{REFERENCE['svd-energy'][j]:.2f}", f"{ref[j]:+.2f}"] if in_ref \
            else ["-", "-", "-"]
        for meta in metas:
            a, e = _find(rows, meta["name"], "alds", keep), _find(rows, meta["name"], "svd-energy", keep)
            if a and e:
                diff = a["acc_decomposed"] - e["acc_decomposed"]
                cells.append(f"{diff:+.2f} ({a['acc_decomposed']:.2f} vs {e['acc_decomposed']:.2f})")
                verdicts[meta["name"]].append((keep, diff, ref[j] if in_ref else None))
            else:
                cells.append("-")
        lines.append(f"| {keep} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, items in verdicts.items():
        if not items:
            continue
        ahead = [k for k, d, _ in items if d > 0]
        as_large = [k for k, d, r in items if r is not None and d >= r]
        shared = len([1 for _, _, r in items if r is not None])
        lines.append(f"- {name}: ALDS is ahead of svd-energy without retraining at {len(ahead)} of {len(items)} "
                     f"keep ratios ({', '.join(map(str, ahead)) or 'none'}); its margin is at least as large as the "
                     f"reference's at {len(as_large)} of the {shared} keep ratios the reference reports "
                     f"({', '.join(map(str, as_large)) or 'none'}).")
    return lines


def render(rows: list[dict], metas: list[dict], timings: list[dict], args: argparse.Namespace, env: dict,
           wall: float) -> str:
    methods = [m for m in METHOD_CONFIGS if any(r["method"] == m for r in rows)]
    lines = ["# ALDS against SVD baselines", "",
             "Low-rank decomposition by ALDS (per-layer rank and channel groups k, common worst-layer error ε*) "
             "against `svd-energy` (one fraction of Frobenius energy per layer) and `svd` (one relative rank per "
             "layer), all k = 1 for the baselines, under the same budget: keep = fraction of *all* parameters of the "
             "network. Fashion-MNIST test split. Fine-tuning: SGD lr 0.01 cosine, label smoothing 0.1, batch 128, "
             f"the decomposed model trained as is (no masks). {args.threads} torch thread(s). "
             "Generated by `make bench-alds`.", ""]
    lines += ["## Models", "", "| model | made by | parameters | MACs | test accuracy (%) | fine-tuning data |",
              "|---|---|---|---|---|---|"]
    for m in metas:
        data = (f"first {m['finetune_items']:,} of {m['train_items']:,} training items (subset)"
                if m.get("finetune_subset") else f"all {m['train_items']:,} training items")
        if "epoch_seconds_estimate" in m:
            data += f"; full epoch estimated at {m['epoch_seconds_estimate']:.0f} s"
        lines.append(f"| {m['label']} | {m['made_by']} | {m['params']:,} | {m['macs']:,} | "
                     f"{m['dense_accuracy']:.2f} | {data} |")
    for m in metas:
        if m.get("finetune_subset"):
            lines += ["", f"**{m['label']} is fine-tuned on a subset**: one epoch over all training items was "
                      f"estimated at {m['epoch_seconds_estimate']:.0f} s on one thread (over the "
                      f"{args.epoch_budget_s:.0f} s budget of this two-core machine), so its \"fine-tuned\" figures "
                      f"come from one epoch over the first {m['finetune_items']:,} items of the (already shuffled) "
                      "training split."]
    for m in metas:
        name = m["name"]
        keeps = sorted({r["keep"] for r in rows if r["model"] == name}, reverse=True)
        lines += ["", f"## {m['label']}: test accuracy (%) without retraining / after {_ft_label(m, args.epochs)}",
                  "", f"Dense: {m['dense_accuracy']:.2f}%.", "",
                  "| keep | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for keep in keeps:
            cells = [_cell(r) if (r := _find(rows, name, method, keep)) else "-" for method in methods]
            lines.append(f"| {keep} | " + " | ".join(cells) + " |")
        lines += ["", f"## {m['label']}: size, MACs and ONNX Runtime speed-up", "",
                  "Speed-up: original / candidate median latency, ONNX Runtime CPU, batch 1, 1 thread, sequential, no "
                  f"spinning, {args.latency_runs} interleaved rounds; in brackets the 25th–75th percentile of the "
                  "per-round ratios. MACs ratio = original MACs / candidate MACs (what a perfect runtime would "
                  "give). ε*: the worst decomposed layer's ALDS bound max_i σ_{j+1}/‖W‖₂ (for every method); "
                  "measured: the worst relative spectral error of the reconstructed weights.", "",
                  "| keep | method | params kept | MACs kept | MACs ratio | ORT speed-up | ORT ms (orig → cand) | "
                  "ε* | measured | layers cut | k used | compress s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for keep in keeps:
            for method in methods:
                r = _find(rows, name, method, keep)
                if r is None:
                    continue
                o = r["ort"]
                lines.append(
                    f"| {keep} | {method} | {r['keep_achieved']:.4f} | {r['macs_kept']:.3f} | "
                    f"{1 / r['macs_kept']:.2f}x | **{o['speedup']:.2f}x** ({o['speedup_spread'][0]:.2f}–"
                    f"{o['speedup_spread'][1]:.2f}) | {o['baseline_p50_ms']:.3f} → {o['p50_ms']:.3f} | "
                    f"{r['eps_star']:.4f} | {r['worst_err_spectral']:.4f} | {r['layers_decomposed']}/"
                    f"{r['layers_decomposed'] + r['layers_dense']} | {','.join(map(str, r['groups'])) or '-'} | "
                    f"{r['compress_seconds']:.2f} |")
        if m.get("errors"):
            lines.append("")
            lines += [f"- {e['method']} at keep {e['keep']}: not run ({e['error']})" for e in m["errors"]]
        worst = max((r["onnx_parity"] for r in rows if r["model"] == name), default=0.0)
        lines += ["", f"ONNX export: {m['onnx_exporter']} exporter, opset 17, static shapes; worst |ORT − PyTorch| "
                  f"on the example input over all candidates: {worst:.2e}."]
    lines += ["", "## Against the reference implementation (no retraining)", "",
              "The reference's numbers are **the reference's, not ours**: the official ALDS code (lucaslie/torchprune) "
              "on a small CNN on scikit-learn digits, without retraining (issue 4, METHODS.md §3); its uniform SVD "
              f"gives {' / '.join(f'{v:.2f}' for v in REFERENCE['svd'])} at keep 0.5 / 0.3 / 0.2. Our columns: "
              "accuracy points of ALDS minus svd-energy without retraining on our models (different models and "
              "data, so compare margins, not accuracies).", ""]
    lines += margin_text(rows, metas)
    if timings:
        lines += ["", "## Allocation + decomposition wall time (one thread)", "",
                  "`METHODS['alds'].apply` on torchvision models with random weights (seeded), 1000 classes, "
                  "224×224 example, keep 0.5 of all parameters, 15 seeds × 4 rounds of k search; median over "
                  "the rounds, each on a fresh copy. Target: at most half of the authors' code's time on this "
                  "machine as stated in issue 4 (not re-measured here).", "",
                  "| model | median s | min–max s | rounds | ε* | measured | params kept | authors' s | target s "
                  "| met |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for t in timings:
            target = t["authors_s"] / 2 if t["authors_s"] else None
            met = "-" if target is None else ("yes" if t["median_s"] <= target else "**no**")
            lines.append(f"| {t['model']} | {t['median_s']:.2f} | {t['min_s']:.2f}–{t['max_s']:.2f} | "
                         f"{t['rounds']} | {t['eps_star']:.4f} | {t['worst_err_spectral']:.4f} | "
                         f"{t['keep_achieved']:.4f} | "
                         f"{t['authors_s'] or '-'} | {target or '-'} | {met} |")
        lines += ["", "The reference's ε* at the same budget was not measured here (its code is not installed), so "
                  "\"ε* no larger than theirs\" is not checked by this benchmark."]
    lines += ["", f"Conditions: {env['cpu']} ({env['cpu_count']} cores, shared with another benchmark), torch "
              f"{env['versions']['torch']}, onnxruntime {env['versions']['onnxruntime']}, {args.threads} torch "
              f"thread(s), seed {args.seed}; whole run {wall / 60:.1f} min.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="rescnn,resnet18", help="rescnn, resnet18 (digits: debugging only)")
    parser.add_argument("--keeps", default=",".join(map(str, KEEPS)))
    parser.add_argument("--methods", default=",".join(METHOD_CONFIGS))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--no-finetune", action="store_true", help="same as --epochs 0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timing-rounds", type=int, default=3, help="0 skips the wall-time section")
    parser.add_argument("--timing-models", default="resnet50,resnet18")
    parser.add_argument("--latency-runs", type=int, default=500)
    parser.add_argument("--epoch-budget-s", type=float, default=240.0,
                        help="fine-tune on --subset items when a full epoch is estimated to take longer")
    parser.add_argument("--subset", type=int, default=10000, help="0: always the full training split")
    parser.add_argument("--subset-models", default="resnet18", help="the models the --subset rule may apply to")
    parser.add_argument("--wait-baseline", type=float, default=0.0,
                        help="poll every 60 s up to this many minutes for the built-in baseline's weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="alds", help="reports/NAME.md and reports/NAME.json")
    args = parser.parse_args()
    if args.no_finetune:
        args.epochs = 0
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    models = tuple(m for m in args.models.split(",") if m)
    keeps = tuple(float(k) for k in args.keeps.split(","))
    methods = tuple(m for m in args.methods.split(",") if m)
    if "rescnn" in models:
        weights = ROOT / "compress/models/baselines/rescnn.safetensors"
        deadline = time.monotonic() + 60 * args.wait_baseline
        while not weights.exists() and time.monotonic() < deadline:
            log(stage="waiting for the built-in baseline", path=str(weights))
            time.sleep(60)
    if "resnet18" in models:
        ensure_resnet18(args.threads)
    timings = []
    if args.timing_rounds > 0:
        with torch.random.fork_rng(devices=[]):
            timings = [decomposition_timing(arch, args.timing_rounds, args.seed)
                       for arch in args.timing_models.split(",") if arch]
    rows, metas = [], []
    with tempfile.TemporaryDirectory(prefix="bench-alds-") as tmp:
        for name in models:
            model_rows, meta = model_table(name, keeps, methods, args, Path(tmp))
            rows += model_rows
            metas.append(meta)
    wall = time.perf_counter() - started
    env = environment()
    REPORTS.mkdir(exist_ok=True)
    payload = {"rows": rows, "models": metas, "timing": timings, "reference": REFERENCE,
               "meta": {"threads": args.threads, "epochs": args.epochs,
                        "latency_runs": args.latency_runs, "seed": args.seed, "wall_seconds": wall,
                        "epoch_budget_s": args.epoch_budget_s, "subset": args.subset, "env": env}}
    text = render(rows, metas, timings, args, env, wall)
    write_atomic(REPORTS / f"{args.name}.json", to_json(payload))
    write_atomic(REPORTS / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
