"""Export to ONNX and ORT format, parity against PyTorch, int8 quantisation and mobile coverage.

Parity compares both runtimes on the same inputs (float32, CPU, eval mode), over all output elements:
`max_abs` = max |ort - torch|; `max_rel` = max |ort - torch| / max(|torch|, 1% of max|torch|), the floor keeping
a near-zero reference value from turning a harmless error into a huge ratio; `cosine` of the flattened outputs;
`top1_agreement`, the fraction of items with the same arg-max (classifiers). `ok` means every output is finite
and `max_abs <= atol + rtol * max|torch|`: the relative part scales with the largest reference value, not per
element as in `numpy.allclose`, so one near-zero logit does not tighten the check to `atol`. An int8 model is
not expected to match to a tolerance: given `min_top1`, `ok` means top-1 agreement >= `min_top1` instead.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from compress.errors import ExportError, UsageError

if TYPE_CHECKING:
    import onnxruntime

INPUT, OUTPUT = "input", "output"
OPSET = 17
REL_FLOOR = 0.01  # max_rel's denominator is at least this fraction of max|reference|
CALIBRATION_BATCH = 16


@dataclass(frozen=True)
class Parity:
    """How closely an exported model reproduces the PyTorch model on the same inputs."""

    max_abs: float
    max_rel: float
    cosine: float
    top1_agreement: float | None
    items: int
    ok: bool
    tolerance: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside `path`; rename it over `path` if the block succeeds, else delete it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_bytes(paths: dict[str, Path]) -> dict[str, int]:
    """Bytes on disk of each exported file, by format name."""
    return {name: path.stat().st_size for name, path in paths.items()}


def ort_session(path: Path, *, threads: int = 1) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session configured as DESIGN.md section 5 prescribes for honest measurements.

    Explicit intra-op threads, one inter-op thread, sequential execution and no spinning (a spinning pool burns
    the cores that the interleaved PyTorch measurement needs). Loads `.onnx` and `.ort` files alike.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: warnings about folded initialisers are noise on stderr
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _export(model: nn.Module, example: torch.Tensor, path: Path, names: list[str],
            axes: dict[str, dict[int, str]] | None, opset: int, *, dynamo: bool) -> None:
    """One exporter run, silent on stdout (either exporter may print there, which would corrupt `--json`)."""
    # the TorchScript exporter's C++ log dumps the whole graph to stdout when an operator fails
    with contextlib.suppress(AttributeError):
        torch._C._jit_set_onnx_log_output_stream("stderr")
    extra = {"opset_version": max(opset, 18), "external_data": False} if dynamo else {"opset_version": opset}
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the deprecation notice and tracer warnings
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT], output_names=names,
                          dynamic_axes=axes, dynamo=dynamo, **extra)


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, *, static_shapes: bool = False,
                opset: int = OPSET) -> Path:
    """Export `model` to ONNX at `path` and validate it with the full ONNX checker.

    The graph's input is named `input` and its output `output` (`output_1`, ... for further outputs). The batch
    axis is dynamic unless `static_shapes`, in which case every shape is fixed to `example`'s (what NNAPI and
    CoreML want). The model is exported from a CPU float32 copy in eval mode, so the caller's model is left as
    it was. The file is written to a temporary name and renamed, so `path` is either complete or absent.
    Raises ExportError when both exporters fail or the checker rejects the graph.
    """
    import onnx

    frozen = copy.deepcopy(model).cpu().float().eval()
    example = example.detach().cpu().float()
    with torch.no_grad():
        out = frozen(example)
    names = [OUTPUT] + [f"{OUTPUT}_{i}" for i in range(1, len(out) if isinstance(out, (tuple, list)) else 1)]
    axes = None if static_shapes else {name: {0: "batch"} for name in [INPUT, *names]}
    path = Path(path)
    with _atomic(path) as tmp:
        errors: list[str] = []
        # The TorchScript exporter (dynamo=False) goes first although deprecated since torch 2.9: in torch 2.14 it
        # exports resnet18, mobilenet_v2 and grouped/low-rank convolutions with the same parity as the
        # torch.export one, 5-30x faster (0.1 s against 4 s for a small CNN), into one self-contained file, without
        # needing onnxscript. The torch.export exporter is the fallback, for operators TorchScript lacks (e.g.
        # FFTs) and for when it is removed.
        for name, dynamo in (("TorchScript", False), ("torch.export", True)):
            try:
                _export(frozen, example, tmp, names, axes, opset, dynamo=dynamo)
                onnx.checker.check_model(str(tmp), full_check=True)
                break
            except Exception as exc:  # exporters and the checker raise many unrelated types; all mean "no file"
                first = re.sub(r"\x1b\[[0-9;]*m", "", (str(exc).splitlines() or [""])[0])  # drop colour codes
                errors.append(f"{name} exporter: {type(exc).__name__}: {first[:300]}")
                cause = exc
        else:
            raise ExportError(f"ONNX export of {type(model).__name__} failed ({'; '.join(errors)}); replace or "
                              "exclude the unsupported operation, or export with a different opset") from cause
    return path


def _fixed_batch(session: onnxruntime.InferenceSession) -> int | None:
    """The session's input batch size if the graph fixes it, else None."""
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) and dim > 0 else None


def _flat(out: Any) -> np.ndarray:
    """A model's output(s) as one (items, features) float64 array."""
    parts = out if isinstance(out, (tuple, list)) else [out]
    arrays = [p.detach().cpu().numpy() if isinstance(p, torch.Tensor) else np.asarray(p) for p in parts]
    return np.concatenate([a.reshape(len(a), -1) for a in arrays], axis=1).astype(np.float64)


def _run(runner: nn.Module | onnxruntime.InferenceSession, inputs: np.ndarray, batch: int) -> np.ndarray:
    """Outputs of a PyTorch model or ORT session on `inputs`, in batches (padded for a fixed-batch graph)."""
    if isinstance(runner, nn.Module):
        with torch.no_grad():
            return np.concatenate([_flat(runner(torch.from_numpy(inputs[i:i + batch])))
                                   for i in range(0, len(inputs), batch)])
    fixed = _fixed_batch(runner)
    step = fixed or batch
    name = runner.get_inputs()[0].name
    outs = []
    for i in range(0, len(inputs), step):
        chunk = inputs[i:i + step]
        n = len(chunk)
        if fixed and n < fixed:  # pad the last chunk to the graph's batch size and drop the padding after
            chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), chunk.dtype)])
        outs.append(_flat(runner.run(None, {name: chunk}))[:n])
    return np.concatenate(outs)


def _array(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Inputs as a float32 NumPy array."""
    return np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, np.float32)


def _session(session_or_path: Any) -> onnxruntime.InferenceSession:
    """Open a path as a session; pass a session through."""
    return ort_session(Path(session_or_path)) if isinstance(session_or_path, (str, Path)) else session_or_path


def compare(ref: np.ndarray, out: np.ndarray, *, classifier: bool = True, atol: float = 1e-4, rtol: float = 1e-3,
            min_top1: float | None = None) -> Parity:
    """Parity of outputs `out` against reference outputs `ref` (both (items, features)); see the module doc."""
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    finite = bool(np.isfinite(out).all())
    diff = np.abs(out - ref) if finite else np.full_like(ref, np.inf)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / np.maximum(np.abs(ref), max(REL_FLOOR * scale, 1e-12))).max()) if diff.size else 0.0
    norms = np.linalg.norm(ref) * np.linalg.norm(out)
    cosine = float(np.dot(ref.ravel(), out.ravel()) / norms) if finite and norms > 0 else float(max_abs == 0)
    top1 = float((ref.argmax(1) == out.argmax(1)).mean()) if classifier and ref.shape[1] > 1 else None
    if min_top1 is None:
        ok, tolerance = finite and max_abs <= atol + rtol * scale, {"atol": atol, "rtol": rtol}
    else:
        ok, tolerance = finite and top1 is not None and top1 >= min_top1, {"min_top1": min_top1}
    return Parity(max_abs, max_rel, cosine, top1, len(ref), ok, tolerance)


def check_parity(model: nn.Module, session_or_path: Any, inputs: torch.Tensor | np.ndarray, *,
                 classifier: bool = True, atol: float = 1e-4, rtol: float = 1e-3, batch: int = 64,
                 min_top1: float | None = None) -> Parity:
    """Run `model` (a CPU float32 eval copy, no grad) and the ONNX/ORT session on `inputs` and compare outputs.

    `session_or_path` is an InferenceSession or the path of an .onnx/.ort file. A graph with a fixed batch size
    is fed that many items at a time. `ok` follows the tolerance rule in the module docstring, or top-1
    agreement >= `min_top1` when that is given (int8 models).
    """
    x = _array(inputs)
    ref = _run(copy.deepcopy(model).cpu().float().eval(), x, batch)
    return compare(ref, _run(_session(session_or_path), x, batch), classifier=classifier, atol=atol, rtol=rtol,
                   min_top1=min_top1)


def verify_export(model: nn.Module, path: Path, inputs: torch.Tensor | np.ndarray, **kw: Any) -> Parity:
    """`check_parity`, raising ExportError (exit 4) with the measured difference when the export does not match."""
    parity = check_parity(model, path, inputs, **kw)
    if parity.ok:
        return parity
    top1 = "n/a" if parity.top1_agreement is None else f"{parity.top1_agreement:.2%}"
    tol = parity.tolerance
    if "min_top1" in tol:
        limit, fix = (f"top-1 agreement {top1} < required {tol['min_top1']:.2%}",
                      "calibrate on more, representative inputs, or keep the model in float32")
    else:
        limit = f"max abs error {parity.max_abs:.3g} > tolerance {tol['atol']:g} + {tol['rtol']:g} x max|output|"
        fix = ("look for code that behaves differently when exported (torch.onnx.is_in_onnx_export, "
               "data-dependent control flow), or try static shapes or another opset")
    raise ExportError(f"{Path(path).name} does not match the PyTorch model on {parity.items} inputs: {limit} "
                      f"(cosine {parity.cosine:.6f}, top-1 agreement {top1}); {fix}")


def top1_accuracy(session_or_path: Any, inputs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                  *, batch: int = 256) -> float:
    """Fraction of `inputs` an exported classifier (session or .onnx/.ort path) labels correctly."""
    scores = _run(_session(session_or_path), _array(inputs), batch)
    truth = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return float((scores.argmax(1) == truth).mean())


def int8_agreement(fp32_session: Any, int8_session: Any, inputs: torch.Tensor | np.ndarray,
                   *, batch: int = 64) -> float:
    """Fraction of `inputs` on which the int8 and fp32 sessions (or model files) predict the same class."""
    x = _array(inputs)
    ref, out = _run(_session(fp32_session), x, batch), _run(_session(int8_session), x, batch)
    return float((ref.argmax(1) == out.argmax(1)).mean())


def _is_quantized(onnx_path: Path) -> bool:
    """Whether the graph holds QuantizeLinear/DequantizeLinear nodes (a QDQ int8 model)."""
    import onnx

    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear")
               for node in onnx.load(str(onnx_path), load_external_data=False).graph.node)


def convert_to_ort(onnx_path: Path, out_dir: Path, *, target_platform: str = "arm") -> tuple[Path, Path]:
    """Convert to ORT format with onnxruntime's own converter; returns (model .ort, required-operators config).

    A float model is converted with the "Fixed" optimisation style (optimisations applied before saving: the
    recommendation for the CPU execution provider). A QDQ int8 model gets the "Runtime" style, which saves the
    QDQ fusions for the runtime to apply with the kernels of the device it runs on; fused for arm in advance,
    the same int8 model ran 10x slower on an x86 CPU. The converter runs in a temporary directory inside
    `out_dir` and its two files are renamed into `out_dir` (as NAME.ort and NAME.required_operators.config)
    only once both exist, so no half-written output is left behind. The config lists the operators a minimal
    ONNX Runtime build needs for this model.
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # onnxruntime sets it to DEBUG on import
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runtime = _is_quantized(onnx_path)
    suffix = ".with_runtime_opt" if runtime else ""
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".ort-") as tmp:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
            convert_onnx_models_to_ort(onnx_path, output_dir=Path(tmp), target_platform=target_platform,
                                       optimization_styles=[OptimizationStyle.Runtime if runtime
                                                            else OptimizationStyle.Fixed])
        ort_file = Path(tmp) / onnx_path.with_suffix(f"{suffix}.ort").name
        config = Path(tmp) / onnx_path.with_suffix(f".required_operators{suffix}.config").name
        if not ort_file.is_file() or not config.is_file():
            raise ExportError(f"ORT-format conversion of {onnx_path.name} produced no model; run `python -m "
                              f"onnxruntime.tools.convert_onnx_models_to_ort {onnx_path}` to see why")
        # the config's header names the models it came from by absolute path: name the file alone, so the bytes
        # do not depend on the temporary directory (same inputs, same artifact)
        config.write_text(config.read_text().replace(f"{Path(tmp).resolve()}{os.sep}", ""))
        results = out_dir / onnx_path.with_suffix(".ort").name, \
            out_dir / onnx_path.with_suffix(".required_operators.config").name
        os.replace(ort_file, results[0])
        os.replace(config, results[1])
    return results


class _Calibration:
    """A CalibrationDataReader over an array, in batches of the graph's fixed batch size (or `batch`)."""

    def __init__(self, data: np.ndarray, batch: int, name: str) -> None:
        # a fixed-batch graph cannot take a short last batch: those few items are left out
        self._batches = iter([{name: data[i:i + batch]} for i in range(0, len(data) - batch + 1, batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_int8(onnx_path: Path, out_path: Path, calibration: torch.Tensor | np.ndarray, *,
                  per_channel: bool = True, batch: int = CALIBRATION_BATCH) -> Path:
    """Static int8 quantisation in QDQ format, calibrated with MinMax on `calibration` (a few hundred inputs).

    Activations are uint8 and weights int8 with a 7-bit range (`reduce_range`), per output channel unless
    `per_channel=False`. x86 CPUs without VNNI multiply u8 x s8 pairs into int16 and saturate with full 8-bit
    weights (ORT documents this, and converts S8S8 to that path too): measured here, a small digits CNN
    quantised S8S8 agreed with its fp32 model on 74.7% of the test set, and 98.1% with these settings; the
    built-in classifier agrees on 99.6% and runs faster than fp32 on ONNX Runtime. 7-bit weights compute
    the same on every CPU, so the accuracy measured here is the accuracy a phone gets. The model first goes
    through ORT's `quant_pre_process` (shape inference and basic optimisations such as folding BatchNorm into
    Conv, which gives better-calibrated ranges); if that fails the model is quantised as exported.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    data = _array(calibration)
    probe = ort_session(onnx_path)
    name, step = probe.get_inputs()[0].name, _fixed_batch(probe) or batch
    if len(data) < step:
        raise UsageError(f"int8 calibration needs at least {step} inputs, got {len(data)}")
    with tempfile.TemporaryDirectory(prefix="compress-int8-") as tmp:
        source = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(onnx_path), str(source))
        except Exception:  # an optional improvement: its shape inference rejects some valid graphs
            source = onnx_path
        with _atomic(out_path) as target:
            quantize_static(str(source), str(target), _Calibration(data, step, name), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, reduce_range=True,
                            calibrate_method=CalibrationMethod.MinMax)
    return out_path


def _coverage(info: Any) -> dict[str, Any]:
    """A PartitioningInfo as plain data."""
    return {"supported_nodes": info.num_supported_nodes, "total_nodes": info.num_nodes,
            "partitions": info.num_partitions, "unsupported_ops": sorted(info.unsupported_ops),
            "recommendation": info.suitability().name}


def mobile_usability(onnx_path: Path) -> dict[str, Any]:
    """NNAPI and CoreML coverage of the model, from onnxruntime's mobile usability checker.

    Mirrors `python -m onnxruntime.tools.check_onnx_model_mobile_usability` (basic ORT optimisations, shape
    inference, then partitioning per execution provider) but returns its numbers instead of logging them:
    `{"available": True, "dynamic_inputs": [...], "nnapi": {...}, "coreml_mlprogram": {...},
    "coreml_neuralnetwork": {...}}`, each EP with supported/total nodes, partitions, unsupported op types and
    the checker's recommendation (YES/MAYBE/NO), plus `recommendation_if_fixed_shapes` for dynamic inputs.
    `{"available": False, "reason": ...}` when the checker is missing or fails: the numbers are informational.
    """
    try:
        from onnxruntime.tools.mobile_helpers import usability_checker as uc
        from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

        with tempfile.TemporaryDirectory(prefix="compress-mobile-") as tmp:
            optimized = Path(tmp) / "optimized.onnx"
            optimize_model(Path(onnx_path), optimized, use_external_initializers=True)
            model = ModelProtoWithShapeInfo(optimized).model_with_shape_info
        checks = {"nnapi": uc.check_nnapi_partitions,
                  "coreml_mlprogram": partial(uc.check_coreml_partitions,
                                              config_filename="coreml_supported_mlprogram_ops.md"),
                  "coreml_neuralnetwork": partial(uc.check_coreml_partitions,
                                                  config_filename="coreml_supported_neuralnetwork_ops.md")}
        dynamic = [i.name for i in model.graph.input if not uc.is_fixed_size_tensor(i)]
        result: dict[str, Any] = {"available": True, "dynamic_inputs": dynamic}
        for ep, check in checks.items():
            result[ep] = _coverage(check(model, True))
            if dynamic:  # the checker's second opinion: how the model would fare with its shapes fixed
                result[ep]["recommendation_if_fixed_shapes"] = check(model, False).suitability().name
        return result
    except Exception as exc:  # an internal, undocumented API: report it missing rather than fail the run
        return {"available": False, "reason": f"onnxruntime mobile usability checker failed: "
                                              f"{type(exc).__name__}: {exc}"}
