"""Shipping a model: export it to every format asked for, verify each file against PyTorch, and size the formats.

Functions here take a model and its data and return the plain dicts that report.json holds; the CLI and the
report renderers know nothing of how they are made.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress import export
from compress.data.datasets import TensorSplit
from compress.errors import UsageError

FORMATS = ("onnx", "ort")
INT8_MIN_AGREEMENT = 0.98  # top-1 agreement an int8 model must reach with its fp32 source


@dataclass(frozen=True, kw_only=True)
class ExportSettings:
    """Which files to write and how to check them."""

    format: str = "onnx"  # onnx, or ort (ORT format for mobile, made from the ONNX file)
    int8: bool = False  # also an int8 static QDQ model, calibrated on the calibration split
    static_shapes: bool = False  # fix every shape (batch 1), as NNAPI and CoreML want
    parity_items: int = 256
    calibration_items: int = 256

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UsageError(f"--format {self.format!r} is not supported; choose onnx or ort")
        if self.parity_items < 1 or self.calibration_items < 1:
            raise UsageError("parity and calibration need at least one item each")


def is_classifier(model: nn.Module, example: torch.Tensor) -> bool:
    """Whether the model maps a batch to one 2-D tensor of scores (top-1 agreement then means something)."""
    with torch.no_grad():
        out = model.eval()(example[:1])
    return isinstance(out, torch.Tensor) and out.ndim == 2


def _parity_entry(path: Path, parity: export.Parity, **extra: Any) -> dict[str, Any]:
    return {"path": path.name, "bytes": path.stat().st_size, "parity": parity.to_dict(), "ok": parity.ok, **extra}


def export_all(model: nn.Module, test: TensorSplit, calibration: TensorSplit, settings: ExportSettings,
               directory: Path) -> dict[str, Any]:
    """Write model.onnx (and model.ort, model.int8.onnx/.ort as asked) into `directory`, each checked against
    the PyTorch model on the first `parity_items` test items; returns the report's `export` section.

    Every entry has `ok`; the caller decides what a failure means (the CLI exits 4). An int8 model is checked by
    top-1 agreement with the fp32 model (at least 98%) and its test accuracy is measured.
    """
    model = model.cpu().eval()
    inputs = test.x[:settings.parity_items]
    example = inputs[:1]
    classifier = is_classifier(model, example)
    onnx_path = export.export_onnx(model, example, directory / "model.onnx", static_shapes=settings.static_shapes)
    section: dict[str, Any] = {"onnx": _parity_entry(
        onnx_path, export.check_parity(model, onnx_path, inputs, classifier=classifier),
        mobile_usability=export.mobile_usability(onnx_path))}
    if settings.format == "ort":
        ort_path, operators = export.convert_to_ort(onnx_path, directory)
        section["ort"] = _parity_entry(ort_path, export.check_parity(model, ort_path, inputs, classifier=classifier),
                                       required_operators=operators.name)
    if settings.int8:
        int8_path = export.quantize_int8(onnx_path, directory / "model.int8.onnx",
                                         calibration.x[:settings.calibration_items])
        parity = export.check_parity(model, int8_path, inputs, classifier=classifier,
                                     min_top1=INT8_MIN_AGREEMENT if classifier else None)
        # percent, as compress reports accuracy
        extra = {"test_accuracy": round(100 * export.top1_accuracy(int8_path, test.x, test.y), 4),
                 "fp32_test_accuracy": round(100 * export.top1_accuracy(onnx_path, test.x, test.y), 4)} \
            if classifier else {}
        section["onnx_int8"] = _parity_entry(int8_path, parity, **extra)
        if settings.format == "ort":
            int8_ort, _ = export.convert_to_ort(int8_path, directory)
            section["ort_int8"] = _parity_entry(int8_ort, export.check_parity(
                model, int8_ort, inputs, classifier=classifier, min_top1=INT8_MIN_AGREEMENT if classifier else None))
    return section


def export_failures(section: dict[str, Any]) -> list[str]:
    """One line per exported file that failed its check."""
    problems = []
    for fmt, entry in section.items():
        if not entry["ok"]:
            parity = entry["parity"]
            top1 = parity.get("top1_agreement")
            problems.append(f"{entry['path']} differs from the PyTorch model: max abs error {parity['max_abs']:.3g}, "
                            f"cosine {parity['cosine']:.6f}"
                            + ("" if top1 is None else f", top-1 agreement {top1:.2%}"))
    return problems


def format_bytes(model: nn.Module, example: torch.Tensor, calibration: torch.Tensor) -> dict[str, int]:
    """Bytes of the ONNX, ORT, int8 ONNX and int8 ORT files of a model, written to a scratch directory."""
    with tempfile.TemporaryDirectory(prefix="compress-sizes-") as tmp:
        work = Path(tmp)
        onnx_path = export.export_onnx(model.cpu().eval(), example[:1], work / "model.onnx")
        int8_path = export.quantize_int8(onnx_path, work / "model.int8.onnx", calibration)
        paths = {"onnx": onnx_path, "ort": export.convert_to_ort(onnx_path, work)[0], "onnx_int8": int8_path,
                 "ort_int8": export.convert_to_ort(int8_path, work)[0]}
        return export.export_bytes(paths)
