"""The run directory: lossless sparse encoding, artifact round trip, sizes, and --out safety."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from compress import api, artifact
from compress.config import GlobalMPConfig
from compress.errors import UsageError
from compress.finetune import recalibrate_batchnorm
from compress.methods import METHODS, Context
from compress.models import load_model
from tests.conftest import TINY_SPEC, requires_baseline
from tests.factories import tiny_cnn


def bits(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (so -0.0 != 0.0 and NaN payloads count)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert bits(a[name]) == bits(b[name]), name


def random_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def sparse(shape, fraction=0.9, dtype=torch.float32):
        t = torch.randn(shape, generator=g).to(dtype)
        t[torch.rand(shape, generator=g) < fraction] = 0
        return t

    return {
        "conv.weight": sparse((16, 8, 3, 3)),
        "odd.weight": sparse((7, 13)),              # numel not a multiple of 8
        "fc.weight": sparse((10, 64), 0.99),
        "all_zero": torch.zeros(33),
        "dense.weight": torch.randn(12, 5, generator=g),
        "half.weight": sparse((40, 40), dtype=torch.float16),
        "double.weight": sparse((30, 30), dtype=torch.float64),
        "bf16.weight": sparse((20, 20), dtype=torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(17, dtype=torch.int64),
        "scalar": torch.tensor(0.0),
        "ints": torch.zeros(100, dtype=torch.int32),
        "tiny_values": sparse((64,), 0.9) * 1e-38,  # subnormal floats survive too
    }


def test_encode_decode_round_trip_is_bit_exact():
    state = random_state()
    tensors, shapes = artifact.encode_sparse(state)
    # the mostly-zero float tensors were encoded, the rest stored as they are
    for name in ("conv.weight", "odd.weight", "fc.weight", "all_zero", "half.weight", "double.weight", "bf16.weight"):
        assert name in shapes and name + artifact.MASK_SUFFIX in tensors and name not in tensors, name
    for name in ("dense.weight", "bn.num_batches_tracked", "ints"):
        assert name not in shapes and name in tensors, name
    assert tensors["fc.weight" + artifact.VALUES_SUFFIX].numel() == int((state["fc.weight"] != 0).sum())
    assert_bit_exact(artifact.decode_sparse(tensors, shapes), state)


def test_weights_file_round_trip_is_bit_exact(tiny_model, tmp_path):
    METHODS["globalmp"].apply(tiny_model, GlobalMPConfig(sparsity=0.9), Context(torch.zeros(1)))
    path = tmp_path / "model.safetensors"
    path.write_bytes(artifact.sparse_bytes(tiny_model))
    expected = {k: v.detach() for k, v in tiny_model.state_dict().items()}
    got = artifact.read_weights(path)
    assert sorted(got) == sorted(expected)
    for name in expected:  # numerically exact (see the -0.0 test below for the sign of zeros)
        assert torch.equal(got[name], expected[name]) and got[name].dtype == expected[name].dtype, name
    # the dense encoding reads back too
    path.write_bytes(artifact.dense_bytes(tiny_model))
    assert all(torch.equal(artifact.read_weights(path)[k], v) for k, v in expected.items())


def test_negative_zeros_stay_compact_and_equal():
    t = torch.randn(200, generator=torch.Generator().manual_seed(0))
    t = t * (torch.arange(200) % 10 == 0)  # pruning by multiplying (torch.nn.utils.prune) leaves -0.0
    assert (torch.signbit(t) & (t == 0)).any()
    tensors, shapes = artifact.encode_sparse({"w": t})
    assert "w" in shapes and tensors["w::values"].numel() == 20, "-0.0 is not stored as a value"
    decoded = artifact.decode_sparse(tensors, shapes)["w"]
    assert torch.equal(decoded, t)  # equal values (-0.0 == +0.0)


def test_compress_pruning_writes_positive_zeros(tiny_model):
    METHODS["globalmp"].apply(tiny_model, GlobalMPConfig(sparsity=0.9), Context(torch.zeros(1)))
    weights = [p for p in tiny_model.parameters() if p.ndim > 1]
    assert not any((torch.signbit(w) & (w == 0)).any() for w in weights), "so its artifacts round-trip bit for bit"


def test_pruned_run_loads_back_with_identical_outputs(tiny_run, digits):
    loaded = load_model(str(tiny_run))
    reference = tiny_cnn()
    METHODS["globalmp"].apply(reference, GlobalMPConfig(sparsity=0.9), Context(torch.zeros(1)))
    recalibrate_batchnorm(reference, digits.calibration)  # as `compress prune` does after compressing
    x = digits.test.x[:64]
    with torch.inference_mode():
        out = loaded.model(x)
        expected = reference.eval()(x)
    assert torch.equal(out, expected)
    state = loaded.model.state_dict()
    for name, value in reference.state_dict().items():
        assert torch.equal(state[name], value), name
    arch = json.loads((tiny_run / "arch.json").read_text())
    assert (arch["kind"], arch["target"], arch["kwargs"]) == ("factory", TINY_SPEC, {})
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["format"] == artifact.FORMAT and manifest["dataset"] == "digits"
    assert manifest["masked_params"] == ["fc.weight", "features.0.weight", "features.3.weight", "features.6.weight"]
    assert manifest["outputs"]["model.safetensors"] == artifact.sha256_file(tiny_run / "model.safetensors")
    assert loaded.dataset == "digits"
    assert not tiny_run.with_name(tiny_run.name + ".partial").exists()


def test_same_seed_gives_the_same_artifact_bytes(tiny_run, out_dir):
    again = out_dir("again")
    api.prune(api.ModelSource(spec=TINY_SPEC), GlobalMPConfig(sparsity=0.9),
              api.RunOptions(out=again, data="digits", latency=False, command="test"))
    assert (again / "model.safetensors").read_bytes() == (tiny_run / "model.safetensors").read_bytes()


def pruned_resnet18(sparsity: float = 0.9) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    METHODS["globalmp"].apply(model, GlobalMPConfig(sparsity=sparsity), Context(torch.zeros(1)))
    return model


def test_sparse_file_is_small_at_90_percent():
    model = pruned_resnet18(0.9)
    dense, sparse = len(artifact.dense_bytes(model)), len(artifact.sparse_bytes(model))
    # ideal: 1 bit per weight plus 10% of 32 bits = 0.131 of dense
    assert sparse <= 0.15 * dense, f"sparse {sparse} bytes is {sparse / dense:.3f} of dense {dense}"
    assert sparse >= 0.10 * dense  # it stores the values; not a suspiciously lossy encoding


def test_sparse_file_of_the_tiny_model_is_smaller():
    model = tiny_cnn()
    dense_unpruned = len(artifact.dense_bytes(model))
    METHODS["globalmp"].apply(model, GlobalMPConfig(sparsity=0.9), Context(torch.zeros(1)))
    # a model this small is dominated by its norms and the header, so only a weaker bound holds
    assert len(artifact.sparse_bytes(model)) < 0.5 * dense_unpruned


def test_rundir_refuses_an_existing_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(UsageError, match="already exists") as info:
        artifact.RunDir(out)
    assert info.value.exit_code == 2
    assert (out / "keep.txt").read_text() == "old"


def test_rundir_with_force_replaces_the_out_on_commit(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(UsageError, match="is not a compress run"):  # only a run (or an empty directory) is replaced
        artifact.RunDir(out, force=True)
    (out / "manifest.json").write_text(json.dumps({"format": artifact.FORMAT, "outputs": {}}))
    run = artifact.RunDir(out, force=True)
    run.write("new.txt", "new")
    assert (out / "stale.txt").exists()  # nothing replaced before the run is complete
    assert run.commit() == out.resolve()
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert not run.partial.exists()
    assert not out.with_name("out.old").exists()


def test_prune_with_force_replaces_a_previous_run(tiny_run, tmp_path):
    out = tmp_path / "forced"
    api.prune(api.ModelSource(spec=TINY_SPEC), GlobalMPConfig(sparsity=0.5),
              api.RunOptions(out=out, data="digits", latency=False))
    (out / "stale.txt").write_text("old")
    with pytest.raises(UsageError, match="already exists"):
        api.prune(api.ModelSource(spec=TINY_SPEC), GlobalMPConfig(sparsity=0.5),
                  api.RunOptions(out=out, data="digits", latency=False))
    report = api.prune(api.ModelSource(spec=TINY_SPEC), GlobalMPConfig(sparsity=0.5),
                       api.RunOptions(out=out, data="digits", latency=False, force=True))
    assert report["status"] == "ok"
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()


def test_out_equal_to_the_input_model_is_refused(tiny_run):
    before = {p.name: p.read_bytes() for p in tiny_run.iterdir()}
    for force in (False, True):
        with pytest.raises(UsageError, match="is the input model") as info:
            api.prune(api.ModelSource(spec=str(tiny_run)), GlobalMPConfig(sparsity=0.95),
                      api.RunOptions(out=tiny_run, data="digits", latency=False, force=force))
        assert info.value.exit_code == 2
    assert {p.name: p.read_bytes() for p in tiny_run.iterdir()} == before
    with pytest.raises(UsageError, match="is the input model"):
        artifact.RunDir(tiny_run, force=True, inputs=(tiny_run,))


def test_load_artifact_rejects_a_plain_directory(tmp_path):
    with pytest.raises(UsageError, match="not a compress output directory"):
        load_model(str(tmp_path))


@requires_baseline
def test_sparse_file_of_the_builtin_model_at_90_percent():
    model = load_model().model
    METHODS["globalmp"].apply(model, GlobalMPConfig(sparsity=0.9), Context(torch.zeros(1)))
    dense, sparse = len(artifact.dense_bytes(model)), len(artifact.sparse_bytes(model))
    assert sparse <= 0.15 * dense, f"sparse {sparse} bytes is {sparse / dense:.3f} of dense {dense}"
