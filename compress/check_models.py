"""What `compress check` measures itself: figures of a model given as a spec, and two models timed interleaved.

`compress.check` reads report.json files only and imports no torch. When CURRENT or BASELINE is a model spec
(`rescnn`, `torchvision:NAME`, `pkg.mod:fn` with weights) this module loads it weights-only and measures what a
run's report would hold: parameters, MACs, the bytes of the safetensors encodings (and of the ONNX, ORT and int8
files when a budget names them) and each task's metric on the test split. When a budgets file names latency and
both models are at hand (a run directory or a spec on each side), the two are timed here, interleaved in this
process, on the backends and batch sizes the budgets name; those rows replace whatever the current report
recorded, since a recorded speed-up was measured against the run's own origin, not against this baseline.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.check import Side, latency_requests
from compress.finetune import evaluate
from compress.measure.backends import LatencySettings, measure_backends
from compress.models.loader import LoadedModel
from compress.pipeline import ModelSource, describe_model, load_data_for, measurement_data, seed_everything, task_rows
from compress.ship import format_bytes

EXPORT_FORMATS = ("onnx", "ort", "onnx_int8", "ort_int8", "int8")


@dataclass(frozen=True, kw_only=True)
class MeasureOptions:
    """How check measures what it measures: data, seed, and the timing of latency budgets."""

    data: str | None = None
    seed: int = 0
    latency_runs: int = 20
    latency_threads: int = 1


@dataclass
class Loaded:
    """A model at hand with the data it is measured on."""

    loaded: LoadedModel
    inputs: torch.Tensor
    calibration: torch.Tensor
    test: Any


def _load(source: ModelSource, options: MeasureOptions) -> Loaded:
    """The model (weights-only) and its data: test items to time, calibration items for int8, the test split."""
    seed_everything(options.seed)  # a factory's initial weights then match those of a run made with this seed
    loaded = source.load()
    loaded.model.cpu().eval()
    splits = load_data_for(loaded, options.data, options.seed)
    inputs, calibration = measurement_data(splits)
    return Loaded(loaded, inputs, calibration, splits)


def spec_report(at_hand: Loaded, spec: str, byte_budgets: bool) -> dict[str, Any]:
    """A model's figures in report.json's shape: `model.after` and each task's metric (as `before`)."""
    model, example = at_hand.loaded.model, at_hand.inputs[:1]
    figures = describe_model(model, example)
    if byte_budgets:
        figures["bytes"].update(format_bytes(model, example, at_hand.calibration))
    evaluation = evaluate(model, at_hand.test.test)
    return {"model": {"source": spec, "after": figures}, "tasks": task_rows(at_hand.test.tasks, {"before": evaluation}),
            "latency": []}


def timed_latency(current: Loaded, baseline: Loaded, pairs: list[tuple[str, int]],
                  options: MeasureOptions) -> list[dict[str, Any]]:
    """Latency rows of CURRENT beside BASELINE, interleaved, for each (backend, batch) a budget names."""
    rows: list[dict[str, Any]] = []
    for backend in dict.fromkeys(b for b, _ in pairs):
        batches = tuple(sorted({n for b, n in pairs if b == backend}))
        settings = LatencySettings(backends=(backend,), batches=batches, threads=options.latency_threads,
                                   runs=options.latency_runs)
        with tempfile.TemporaryDirectory(prefix="compress-check-") as tmp:
            found = measure_backends(current.loaded.model, baseline.loaded.model, current.inputs,
                                     current.calibration, settings, Path(tmp))
        rows += [dict(row.to_dict(), timed_by="check") for row in found]
    return rows


def gather(current: Side, baseline: Side | None, budgets_file: Path | None, sources: tuple[ModelSource, ...],
           options: MeasureOptions) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The current and baseline reports for the check: read from runs, measured for specs, with latency timed
    here when the budgets name latency and both models are at hand. `sources` are the ModelSources of CURRENT and
    BASELINE (weights, --no-verify) for the sides that are models."""
    pairs = latency_requests(budgets_file) if budgets_file is not None else []
    byte_budgets = budgets_file is not None and _names_export_bytes(budgets_file)
    sides = [current] + ([baseline] if baseline is not None else [])
    time_them = bool(pairs) and baseline is not None and all(s.has_model for s in sides)
    at_hand = {i: _load(src, options) for i, (side, src) in enumerate(zip(sides, sources))
               if side.kind == "spec" or (time_them and side.has_model)}
    reports = [copy.deepcopy(side.report) if side.report is not None
               else spec_report(at_hand[i], side.text, byte_budgets) for i, side in enumerate(sides)]
    if time_them:
        reports[0]["latency"] = timed_latency(at_hand[0], at_hand[1], pairs, options)
    return reports[0], reports[1] if baseline is not None else None


def _names_export_bytes(path: Path) -> bool:
    """Whether the budgets file names the bytes of an exported format (which costs an export to measure)."""
    from compress.check import budget_keys

    return any(key.startswith("bytes.") and key.split(".", 1)[1] in EXPORT_FORMATS for key in budget_keys(path))
