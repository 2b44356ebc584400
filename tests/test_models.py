"""Every --model form, helpful errors, and refusal of pickled code (the code inside must never run)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from compress import artifact
from compress.errors import UnsafeCheckpointError, UsageError
from compress.models import load_model
from compress.models.builtin import ResCNN
from tests.conftest import BASELINE_WEIGHTS, TINY_SPEC
from tests.factories import PickleBomb, TinyCNN, tiny_cnn


def assert_same_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert sorted(got) == sorted(state)
    for name, value in state.items():
        assert torch.equal(got[name], value), name


# --------------------------------------------------------------------------------------------------- the forms


def test_builtin_baseline(baseline):
    for loaded in (load_model(), load_model("rescnn")):
        assert isinstance(loaded.model, ResCNN)
        assert loaded.arch["kind"] == "builtin" and loaded.arch["name"] == "rescnn"
        assert loaded.dataset == "fashion-mnist"
        assert not loaded.model.training
        assert_same_state(loaded.model, artifact.read_weights(baseline))
    with torch.inference_mode():
        assert load_model().model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_builtin_with_num_classes_starts_from_random_weights():
    loaded = load_model("rescnn", num_classes=3)
    assert loaded.model.fc.out_features == 3
    assert loaded.arch["kwargs"]["num_classes"] == 3


def test_builtin_without_baseline_says_how_to_make_it(tmp_path, monkeypatch):
    from compress.models import loader

    monkeypatch.setattr(loader, "BASELINES_DIR", tmp_path)  # a checkout whose baseline was never trained
    with pytest.raises(UsageError, match="make baseline"):
        load_model()


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return {k: v.clone() for k, v in torchvision.models.resnet18(num_classes=10).state_dict().items()}


def test_torchvision_with_pt_state_dict(resnet18_state, tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(resnet18_state, path)
    loaded = load_model("torchvision:resnet18", weights=path, num_classes=10)
    assert isinstance(loaded.model, torchvision.models.ResNet)
    assert (loaded.arch["kind"], loaded.arch["name"], loaded.arch["kwargs"]) == ("torchvision", "resnet18",
                                                                                {"num_classes": 10})
    assert_same_state(loaded.model, resnet18_state)


def test_torchvision_with_safetensors(resnet18_state, tmp_path):
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in resnet18_state.items()}, str(path))
    loaded = load_model("torchvision:resnet18", weights=str(path), num_classes=10)
    assert_same_state(loaded.model, resnet18_state)


def test_torchvision_wrapped_and_prefixed_state_dicts(resnet18_state, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in resnet18_state.items()}}, path)
    loaded = load_model("torchvision:resnet18", weights=path, num_classes=10)
    assert_same_state(loaded.model, resnet18_state)


def test_weights_that_do_not_fit_name_the_keys(resnet18_state, tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(resnet18_state, path)
    with pytest.raises(UsageError, match="do not fit the architecture") as info:
        load_model("torchvision:resnet34", weights=path, num_classes=10)
    assert "missing layer1.2.conv1.weight" in str(info.value) and info.value.exit_code == 2
    assert "another architecture" in str(info.value)
    with pytest.raises(UsageError, match="fc.weight is \\[10, 512\\] in the file but \\[7, 512\\]") as info:
        load_model("torchvision:resnet18", weights=path, num_classes=7)
    assert str(info.value).endswith("pass --num-classes 10")


def test_factory(tmp_path):
    loaded = load_model(TINY_SPEC)
    assert isinstance(loaded.model, TinyCNN)
    assert (loaded.arch["kind"], loaded.arch["target"], loaded.arch["kwargs"]) == ("factory", TINY_SPEC, {})
    assert_same_state(loaded.model, tiny_cnn().state_dict())
    other = tiny_cnn(seed=5).state_dict()
    path = tmp_path / "w.pt"
    torch.save(other, path)
    assert_same_state(load_model(TINY_SPEC, weights=path).model, other)


def test_artifact_dir(tiny_run):
    loaded = load_model(str(tiny_run))
    assert isinstance(loaded.model, TinyCNN)
    assert loaded.arch["kind"] == "factory"
    assert loaded.manifest["masked_params"]
    assert_same_state(loaded.model, artifact.read_weights(tiny_run / "model.safetensors"))
    zeros = sum(int((p == 0).sum()) for n, p in loaded.model.named_parameters() if n.endswith("weight") and p.ndim > 1)
    assert zeros == round(0.9 * 3688)


def test_a_runs_model_safetensors_works_as_weights(tiny_run):
    loaded = load_model(TINY_SPEC, weights=tiny_run / "model.safetensors")
    assert_same_state(loaded.model, artifact.read_weights(tiny_run / "model.safetensors"))


# -------------------------------------------------------------------------------------------------- bad specs


@pytest.mark.parametrize("spec,needle", [
    ("no_such_model", "torchvision:NAME"),
    ("torchvision:no_such_net", "unknown torchvision architecture"),
    ("no_such_module_xyz:make", "cannot import factory"),
    ("tests.factories:no_such_function", "cannot import factory"),
    ("builtins:dict", "not a torch.nn.Module"),  # a factory that returns something else
])
def test_bad_spec_is_a_helpful_usage_error(spec, needle):
    with pytest.raises(UsageError) as info:
        load_model(spec)
    message = str(info.value)
    assert info.value.exit_code == 2
    assert needle in message
    assert "\n" not in message  # one line


def test_bad_spec_message_lists_the_forms():
    with pytest.raises(UsageError) as info:
        load_model("no_such_model")
    message = str(info.value)
    for form in ("rescnn", "torchvision:NAME", "package.module:function", "output directory"):
        assert form in message


def test_missing_weights_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_model(TINY_SPEC, weights=tmp_path / "missing.pt")


def test_state_dict_given_as_model_points_to_weights(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(tiny_cnn().state_dict(), path)
    with pytest.raises(UsageError, match="--weights"):
        load_model(str(path))


def test_corrupt_checkpoint_is_a_usage_error(tmp_path):
    path = tmp_path / "text.pt"
    path.write_text("this is not a checkpoint")
    with pytest.raises(UsageError, match="cannot read"):
        load_model(TINY_SPEC, weights=path)


@pytest.mark.parametrize("trust", [False, True])
def test_garbage_bytes_are_a_usage_error_not_unsafe(tmp_path, trust):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00\x01\x02\x03 garbage, not a checkpoint")
    with pytest.raises(UsageError):
        load_model(TINY_SPEC, weights=path, trust_pickle=trust)


# ------------------------------------------------------------------------------------------------ pickled code


@pytest.fixture
def bomb(tmp_path):
    """A checkpoint whose unpickling creates `sentinel`; returns (path, sentinel)."""
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "evil.pt"
    torch.save({"x": PickleBomb(sentinel)}, path)
    assert not sentinel.exists()
    return path, sentinel


def test_pickle_bomb_as_model_is_refused_without_running(bomb):
    path, sentinel = bomb
    with pytest.raises(UnsafeCheckpointError) as info:
        load_model(str(path))
    assert info.value.exit_code == 5
    assert "--trust-pickle" in str(info.value)
    assert not sentinel.exists()


def test_pickle_bomb_as_weights_is_refused_without_running(bomb):
    path, sentinel = bomb
    with pytest.raises(UnsafeCheckpointError) as info:
        load_model(TINY_SPEC, weights=path)
    assert info.value.exit_code == 5
    assert not sentinel.exists()
    with pytest.raises(UnsafeCheckpointError):
        load_model("torchvision:resnet18", weights=path, num_classes=10)
    assert not sentinel.exists()


def test_pickle_bomb_is_live_when_trusted(bomb):
    """The control: the payload really runs once the user trusts the file (so the refusal tests mean something)."""
    path, sentinel = bomb
    with pytest.raises(UsageError, match="no state dict"):
        load_model(TINY_SPEC, weights=path, trust_pickle=True)
    assert sentinel.exists()


def test_pickled_module_is_refused_then_loads_when_trusted(tmp_path):
    model = tiny_cnn(seed=9).eval()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_model(str(path))
    assert info.value.exit_code == 5
    loaded = load_model(str(path), trust_pickle=True)
    assert isinstance(loaded.model, TinyCNN)
    assert loaded.arch["kind"] == "pickle"
    x = torch.randn(4, 1, 8, 8)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), model(x))


def test_run_from_a_trusted_pickled_module_loads_back(tmp_path):
    from compress import api
    from compress.config import GlobalMPConfig

    whole = tmp_path / "whole.pt"
    torch.save(tiny_cnn(), whole)
    out = tmp_path / "run"
    api.prune(api.ModelSource(spec=str(whole), trust_pickle=True), GlobalMPConfig(sparsity=0.5),
              api.RunOptions(out=out, data="digits", latency=False))
    loaded = load_model(str(out), trust_pickle=True)
    assert_same_state(loaded.model, artifact.read_weights(out / "model.safetensors"))
