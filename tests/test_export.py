"""ONNX / ORT export with real exporters and ONNX Runtime: parity, shapes, atomic files, int8, mobile coverage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision

from compress.config import ALDSConfig, GlobalMPConfig
from compress.errors import ExportError, UsageError
from compress.export import (
    Parity,
    check_parity,
    compare,
    convert_to_ort,
    export_bytes,
    export_onnx,
    int8_agreement,
    mobile_usability,
    ort_session,
    quantize_int8,
    verify_export,
)
from compress.methods import METHODS, Context
from tests.conftest import requires_baseline
from tests.factories import export_mismatch_cnn, tiny_cnn
from tests.test_alds import digits_cnn

DIGIT = (1, 8, 8)


def inputs(n: int, shape: tuple[int, ...] = DIGIT, seed: int = 0) -> torch.Tensor:
    """Seeded standard-normal inputs."""
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def visible(directory: Path) -> set[str]:
    """Every entry in `directory`, temporary names included."""
    return {p.name for p in directory.iterdir()}


def assert_exact(parity: Parity) -> None:
    assert parity.ok, parity
    assert parity.cosine > 0.9999 and parity.top1_agreement == 1.0, parity


# ------------------------------------------------------------------------------------------------ fp32 parity


def test_tiny_cnn_exports_with_parity(tmp_path: Path) -> None:
    model = tiny_cnn()
    path = export_onnx(model, inputs(1), tmp_path / "model.onnx")
    model_proto = onnx.load(str(path))
    assert [i.name for i in model_proto.graph.input] == ["input"]
    assert [o.name for o in model_proto.graph.output] == ["output"]
    parity = verify_export(model, path, inputs(100, seed=1))
    assert_exact(parity)
    assert parity.items == 100 and parity.max_abs < 1e-5
    assert set(parity.to_dict()) == {"max_abs", "max_rel", "cosine", "top1_agreement", "items", "ok", "tolerance"}
    json.dumps(parity.to_dict())


def test_pruned_model_exports_with_parity(tmp_path: Path) -> None:
    model = tiny_cnn()
    METHODS["globalmp"].apply(model, GlobalMPConfig(sparsity=0.7), Context(inputs(1)))
    x = inputs(64, seed=1)
    assert model.eval()(x).std(0).mean() > 1e-3, "pruning left outputs that vary, so parity is not trivial"
    path = export_onnx(model, inputs(1), tmp_path / "pruned.onnx")
    assert_exact(check_parity(model, path, x))
    zeros = sum(int((onnx.numpy_helper.to_array(t) == 0).sum()) for t in onnx.load(str(path)).graph.initializer)
    weights = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, (torch.nn.Conv2d,
                                                                                        torch.nn.Linear)))
    assert zeros >= weights * 0.99, "pruned zeros survive export (BatchNorm folding may rescale a few)"


def test_alds_model_with_grouped_convs_exports_with_parity(tmp_path: Path) -> None:
    model = digits_cnn()
    result = METHODS["alds"].apply(model, ALDSConfig(priced=False, keep=0.5), Context(inputs(1)))
    assert result.summary["layers_decomposed"] > 0
    path = export_onnx(result.model, inputs(1), tmp_path / "alds.onnx")
    groups = [a.i for n in onnx.load(str(path)).graph.node if n.op_type == "Conv" for a in n.attribute
              if a.name == "group"]
    assert any(g > 1 for g in groups), "the decomposition's grouped convolutions are in the graph"
    assert_exact(check_parity(result.model, path, inputs(64, seed=1)))


@pytest.mark.slow
def test_resnet18_exports_with_parity(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    path = export_onnx(model, inputs(1, (3, 64, 64)), tmp_path / "resnet18.onnx")
    assert_exact(verify_export(model, path, inputs(8, (3, 64, 64), seed=1), batch=4))


def test_export_leaves_the_callers_model_untouched(tmp_path: Path) -> None:
    model = tiny_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, inputs(4), tmp_path / "model.onnx")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------ failures


def test_mismatching_export_raises_export_error(tmp_path: Path) -> None:
    model = export_mismatch_cnn()
    path = export_onnx(model, inputs(1), tmp_path / "model.onnx")
    parity = check_parity(model, path, inputs(32))
    assert not parity.ok and parity.max_abs == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ExportError) as caught:
        verify_export(model, path, inputs(32))
    assert caught.value.exit_code == 4
    message = str(caught.value)
    assert "\n" not in message
    assert f"max abs error {parity.max_abs:.3g} > tolerance" in message and "cosine" in message


@pytest.mark.slow
def test_operator_missing_from_torchscript_falls_back_to_torch_export(tmp_path: Path) -> None:
    class Spectrum(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.fft.fft(x).abs().flatten(1)  # aten::fft_fft: only the torch.export exporter has it

    path = export_onnx(Spectrum(), inputs(1), tmp_path / "model.onnx")
    assert visible(tmp_path) == {"model.onnx"}, "one self-contained file, no external .data"
    assert verify_export(Spectrum(), path, inputs(7), classifier=False).cosine > 0.9999


@pytest.mark.slow
def test_unexportable_model_raises_and_leaves_no_file(tmp_path: Path) -> None:
    class Eigen(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.eigh(x @ x.transpose(-1, -2))[0]  # no ONNX operator in either exporter

    with pytest.raises(ExportError, match="linalg_eigh") as caught:
        export_onnx(Eigen(), inputs(1), tmp_path / "model.onnx")
    assert caught.value.exit_code == 4
    assert visible(tmp_path) == set()


def test_parity_rules() -> None:
    ref = np.array([[10.0, 0.0, -2.0], [1.0, 3.0, 0.5]])
    close = compare(ref, ref + 0.005, atol=1e-4, rtol=1e-3)  # 0.005 <= 1e-4 + 1e-3 * 10
    assert close.ok and close.max_abs == pytest.approx(0.005)
    assert close.max_rel == pytest.approx(0.005 / 0.1), "the 0.0 reference counts as 1% of max|ref|"
    assert not compare(ref, ref + 0.02).ok
    assert compare(ref, np.array([[0.0, 0.0, 1.0], [1.0, 3.0, 0.5]])).top1_agreement == 0.5
    broken = compare(ref, ref * np.nan)
    assert not broken.ok and broken.max_abs == np.inf
    int8_like = compare(ref, ref + 0.5, min_top1=0.99)
    assert int8_like.ok and int8_like.tolerance == {"min_top1": 0.99}


# ------------------------------------------------------------------------------------------------ shapes


def test_static_export_fixes_the_batch_and_dynamic_accepts_any(tmp_path: Path) -> None:
    model = tiny_cnn()
    static = ort_session(export_onnx(model, inputs(1), tmp_path / "static.onnx", static_shapes=True))
    dynamic = ort_session(export_onnx(model, inputs(1), tmp_path / "dynamic.onnx"))
    assert static.get_inputs()[0].shape == [1, 1, 8, 8]
    assert static.get_outputs()[0].shape == [1, 10]
    assert dynamic.get_inputs()[0].shape[0] == "batch"
    for n in (1, 7):
        out = dynamic.run(None, {"input": inputs(n).numpy()})[0]
        assert out.shape == (n, 10)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        static.run(None, {"input": inputs(7).numpy()})
    assert_exact(check_parity(model, static, inputs(7)))  # fed one at a time


# ------------------------------------------------------------------------------------------------ ORT format


def test_ort_format_conversion(tmp_path: Path) -> None:
    model = tiny_cnn()
    onnx_path = export_onnx(model, inputs(1), tmp_path / "model.onnx")
    ort_path, config = convert_to_ort(onnx_path, tmp_path)
    assert ort_path == tmp_path / "model.ort" and ort_path.stat().st_size > 0
    assert visible(tmp_path) == {"model.onnx", "model.ort", "model.required_operators.config"}
    ops = [line for line in config.read_text().splitlines() if line and not line.startswith("#")]
    assert any("Conv" in line for line in ops) and any("Gemm" in line for line in ops), ops
    assert str(tmp_path) not in config.read_text(), "no temporary path recorded in the config"
    assert_exact(check_parity(model, ort_path, inputs(50, seed=2)))
    assert set(export_bytes({"onnx": onnx_path, "ort": ort_path})) == {"onnx", "ort"}


# ------------------------------------------------------------------------------------------------ int8


def test_int8_quantises_static_and_dynamic_batch_graphs(tmp_path: Path) -> None:
    model = tiny_cnn()
    calibration, x = inputs(64, seed=3), inputs(40, seed=4)
    for name, static in (("dynamic", False), ("static", True)):
        fp32 = export_onnx(model, inputs(1), tmp_path / f"{name}.onnx", static_shapes=static)
        int8 = quantize_int8(fp32, tmp_path / f"{name}.int8.onnx", calibration)
        ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        parity = check_parity(model, int8, x, min_top1=0.9)
        assert parity.ok and parity.cosine > 0.99, parity
        assert int8_agreement(fp32, int8, x) == parity.top1_agreement
    with pytest.raises(ExportError, match="top-1 agreement .* < required 101.00%"):
        verify_export(model, int8, x, min_top1=1.01)
    with pytest.raises(UsageError, match="at least 1 inputs"):
        quantize_int8(fp32, tmp_path / "empty.onnx", calibration[:0])
    assert visible(tmp_path) == {"dynamic.onnx", "dynamic.int8.onnx", "static.onnx", "static.int8.onnx"}


@pytest.mark.slow
@requires_baseline
def test_int8_builtin_classifier_agrees_with_fp32(tmp_path: Path) -> None:
    from compress.data import load_dataset
    from compress.models.loader import load_model

    model = load_model("rescnn").model
    splits = load_dataset("fashion-mnist")
    fp32 = export_onnx(model, splits.test.x[:1], tmp_path / "model.onnx")
    int8 = quantize_int8(fp32, tmp_path / "model.int8.onnx", splits.calibration.x[:512])
    fp32_session, int8_session = ort_session(fp32), ort_session(int8)
    x, labels = splits.test.x.numpy(), splits.test.y.numpy()
    fp32_top1, int8_top1 = (s.run(None, {"input": x})[0].argmax(1) for s in (fp32_session, int8_session))
    assert (int8_top1 == fp32_top1).mean() >= 0.98, "int8 agrees with fp32 on the 10,000 test images"
    assert (int8_top1 == labels).mean() >= (fp32_top1 == labels).mean() - 0.01, "accuracy within 1 point"
    subset = (int8_top1 == fp32_top1)[:1000].mean()
    assert int8_agreement(fp32_session, int8_session, x[:1000], batch=500) == pytest.approx(subset, abs=0.002)
    sizes = export_bytes({"fp32": fp32, "int8": int8})
    assert sizes["int8"] < sizes["fp32"] / 3, sizes


# ------------------------------------------------------------------------------------------------ mobile


def test_mobile_usability_reports_coverage(tmp_path: Path) -> None:
    static = export_onnx(tiny_cnn(), inputs(1), tmp_path / "static.onnx", static_shapes=True)
    report = mobile_usability(static)
    json.dumps(report)
    assert report["available"] and report["dynamic_inputs"] == []
    for ep in ("nnapi", "coreml_mlprogram", "coreml_neuralnetwork"):
        assert 0 < report[ep]["supported_nodes"] <= report[ep]["total_nodes"]
        assert report[ep]["partitions"] >= 1 and report[ep]["recommendation"] in {"YES", "MAYBE", "NO"}
    assert report["nnapi"]["supported_nodes"] == report["nnapi"]["total_nodes"]
    dynamic = mobile_usability(export_onnx(tiny_cnn(), inputs(1), tmp_path / "dynamic.onnx"))
    assert dynamic["dynamic_inputs"] == ["input"]
    assert "recommendation_if_fixed_shapes" in dynamic["nnapi"]
    assert visible(tmp_path) == {"static.onnx", "dynamic.onnx"}


def test_mobile_usability_of_a_missing_file_is_unavailable(tmp_path: Path) -> None:
    report = mobile_usability(tmp_path / "absent.onnx")
    assert report["available"] is False and report["reason"]
