"""Resolve a `--model` spec into a module plus the recipe (`arch`) that rebuilds it without pickle."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.artifact import ARCH_FILE, MANIFEST_FILE, WEIGHTS_FILE, read_weights, verify_files
from compress.errors import UnsafeCheckpointError, UsageError, closest_match
from compress.models.builtin import BUILTIN_ARCHS, BUILTIN_DATASETS
from compress.models.transforms import ARCH_TRANSFORMS, register_transform, replay_transforms  # noqa: F401 - re-export

DEFAULT_MODEL = "rescnn"
BASELINES_DIR = Path(__file__).parent / "baselines"


@dataclass
class LoadedModel:
    """A model, how to rebuild it (`arch`, saved as arch.json), and what it was trained on."""

    model: nn.Module
    arch: dict[str, Any]
    source: str
    dataset: str | None = None
    manifest: dict[str, Any] = field(default_factory=dict)


def baseline_paths(name: str) -> tuple[Path, Path]:
    """The shipped weights and manifest of a built-in model."""
    return BASELINES_DIR / f"{name}.safetensors", BASELINES_DIR / f"{name}.json"


def build_from_arch(arch: dict[str, Any], *, trust_pickle: bool = False) -> nn.Module:
    """Instantiate an architecture from its arch.json description (random weights), replaying its transforms."""
    return replay_transforms(_build_base(arch, trust_pickle), arch.get("transforms", []))


def _build_base(arch: dict[str, Any], trust_pickle: bool = False) -> nn.Module:
    """The architecture before any transform."""
    kind, kwargs = arch.get("kind"), dict(arch.get("kwargs", {}))
    if kind == "pickle":  # a run made from a trusted pickled module: its architecture lives only in that pickle
        module = _torch_load(Path(arch["path"]), trust_pickle)
        if not isinstance(module, nn.Module):
            raise UsageError(f"{arch['path']!r} no longer holds a pickled module; the run cannot be rebuilt")
        return module
    if kind == "builtin":
        if arch["name"] not in BUILTIN_ARCHS:
            raise UsageError.unknown("built-in model", arch["name"], BUILTIN_ARCHS)
        if "widths" in kwargs:
            kwargs["widths"] = tuple(kwargs["widths"])
        return BUILTIN_ARCHS[arch["name"]](**kwargs)
    if kind == "torchvision":
        import torchvision.models as tvm

        if str(arch["name"]).lower() not in tvm.list_models():  # get_model ignores case
            raise UsageError.unknown("torchvision architecture", arch["name"], tvm.list_models(),
                                     choices="the names torchvision.models.list_models() gives")
        return tvm.get_model(arch["name"], weights=None, **kwargs)
    if kind == "factory":
        return _call_factory(arch["target"], kwargs)
    raise UsageError(f"arch.json has unknown kind {kind!r}; expected builtin, torchvision, factory or pickle")


def _call_factory(target: str, kwargs: dict[str, Any]) -> nn.Module:
    """Import `package.module:function` and call it."""
    module_name, _, function_name = target.partition(":")
    if os.getcwd() not in sys.path:  # like uvicorn: modules in the current directory are importable
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        fix = "give package.module:function importable from the current environment"
        if module_name != "torchvision" and closest_match(module_name, ["torchvision"], 0.8):
            fix = f"did you mean torchvision:{function_name}?"
        raise UsageError(f"cannot import factory {target!r} ({exc}); {fix}") from None
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UsageError(f"factory {target!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_state_file(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load a state dict weights-only (safetensors or torch.load(weights_only=True)).

    A file that needs arbitrary unpickling is refused with exit 5 unless `trust_pickle`.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"weights file {str(path)!r} does not exist; check the path given to --weights/--model")
    state = _read_state_file(path, trust_pickle)
    require_finite(state, f"weights file {str(path)!r}")
    return state


def _read_state_file(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return read_weights(path)  # plain safetensors or compress's sparse encoding
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise UsageError(f"cannot read {str(path)!r} as safetensors ({type(exc).__name__}); "
                             "check the file") from None
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
            if isinstance(obj.get(key), nn.Module):
                return obj[key].state_dict()
        tensors = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise UsageError(f"{str(path)!r} holds no state dict (found {type(obj).__name__}); "
                     "save one with torch.save(model.state_dict(), PATH)")


def require_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Exit 2 naming the first tensor of `state` that holds NaN or Inf (and how many), calling `what` broken."""
    bad = [name for name, tensor in state.items()
           if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all())]
    if not bad:
        return
    tensor = state[bad[0]]
    nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    counts = " and ".join(f"{n} {label}" for n, label in ((nan, "NaN"), (inf, "Inf")) if n)
    others = f", the first of {len(bad)} such tensors" if len(bad) > 1 else ""
    raise UsageError(f"{what} is broken: tensor {bad[0]!r} holds {counts} of its {tensor.numel()} values{others} "
                     "(weights that are not numbers); give a checkpoint saved before the training that wrote it "
                     "diverged")


def _fit_state(model: nn.Module, state: dict[str, torch.Tensor], what: str, kind: str) -> None:
    """Load `state` into `model`, or exit 2 with one line: the first key whose shape differs (both shapes), the
    missing and unexpected keys (five of each, then a count), and the likely fix for where the model came from
    (`kind`: arch.json's kind, or "run" for a run directory's own weights)."""
    own = model.state_dict()
    mismatched = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
                  if k in state and not isinstance(v, nn.parameter.UninitializedTensorMixin)
                  and tuple(state[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if not (mismatched or missing or unexpected):
        model.load_state_dict(state, strict=False)
        return
    parts = []
    if mismatched:
        key, theirs, ours = mismatched[0]
        others = len(mismatched) - 1
        more = f" ({others} more {'key differs' if others == 1 else 'keys differ'} in shape)" if others else ""
        parts.append(f"{key} is {list(theirs)} in the file but {list(ours)} in the model{more}")
    if missing:
        parts.append(f"missing {_some(missing)}")
    if unexpected:
        parts.append(f"unexpected {_some(unexpected)}")
    fix = _likely_fix(model, kind, mismatched, missing, unexpected)
    raise UsageError(f"{what} do not fit the architecture: {'; '.join(parts)}; {fix}")


def _some(keys: list[str], limit: int = 5) -> str:
    """`a, b, c, d, e and 3 more`."""
    shown = ", ".join(keys[:limit])
    return f"{shown} and {len(keys) - limit} more" if len(keys) > limit else shown


def _head_classes(model: nn.Module, mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> int | None:
    """The file's number of classes when the only difference is the output size of the model's last layer."""
    head = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d | nn.Conv1d) and next(module.parameters(False), None) is not None:
            head = name
    if head is None or not mismatched:
        return None
    prefix = f"{head}." if head else ""
    classes = set()
    for key, theirs, ours in mismatched:
        if key.removeprefix(prefix).count(".") or not key.startswith(prefix) or len(theirs) != len(ours) \
                or not theirs or theirs[1:] != ours[1:]:
            return None
        classes.add(theirs[0])
    return classes.pop() if len(classes) == 1 else None


def _likely_fix(model: nn.Module, kind: str, mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
                missing: list[str], unexpected: list[str]) -> str:
    if kind == "run":
        return "the run's arch.json and model.safetensors disagree: restore the run as compress wrote it"
    classes = None if missing or unexpected else _head_classes(model, mismatched)
    if classes is not None and kind == "factory":
        return (f"the file's head has {classes} classes: make the factory build {classes} classes "
                "(--num-classes does not reach a factory)")
    if classes is not None:
        return f"the file's head has {classes} classes: pass --num-classes {classes}"
    return ("the file holds another architecture's weights: give the --model they were saved from (another factory "
            "or torchvision:NAME)")


def _unreadable(path: Path, exc: Exception) -> UsageError:
    return UsageError(f"cannot read {str(path)!r} as a PyTorch checkpoint ({type(exc).__name__}); "
                      "give a .pt/.pth state dict or a .safetensors file")


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """torch.load weights-only; full unpickling only when the user trusts the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # the weights-only unpickler refuses globals (code) it does not allow-list; anything else is a bad file
        if "global" not in str(exc).split("WeightsUnpickler error", 1)[-1].lower():
            raise _unreadable(path, exc) from None
        if not trust_pickle:
            raise UnsafeCheckpointError(
                f"{str(path)!r} contains pickled code (not just weights) and was not loaded; "
                "re-save it as a state dict or safetensors, or pass --trust-pickle if you trust its author"
            ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a corrupt file
        raise _unreadable(path, exc) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise _unreadable(path, exc) from None


def _load_weights(model: nn.Module, weights: str | Path | None, trust_pickle: bool, kind: str) -> None:
    """Load a weights file into `model`, or exit 2 with one line naming the keys that do not fit and the fix."""
    if weights is None:
        return
    state = load_state_file(weights, trust_pickle=trust_pickle)
    _fit_state(model, state, f"weights {str(weights)!r}", kind)


def load_model(spec: str | None = None, *, weights: str | Path | None = None, num_classes: int | None = None,
               trust_pickle: bool = False, verify: bool = True) -> LoadedModel:
    """Resolve a model spec.

    Accepted forms: a built-in name (default: the shipped Fashion-MNIST baseline); `torchvision:NAME`
    (with `weights` and `num_classes`); a factory `package.module:function` (with `weights`); a `compress`
    output directory (its files checked against manifest.json unless `verify` is False); a `.pt` file holding a
    pickled module (only with `trust_pickle`).
    """
    spec = spec or DEFAULT_MODEL
    path = Path(spec)
    if path.is_dir():
        return load_artifact(path, trust_pickle=trust_pickle, verify=verify)
    if path.is_file():
        return _load_pickled_module(path, trust_pickle)
    if spec in BUILTIN_ARCHS:
        return _load_builtin(spec, weights, num_classes, trust_pickle)
    if spec.startswith("torchvision:"):
        kwargs = {"num_classes": num_classes} if num_classes else {}
        arch = {"kind": "torchvision", "name": spec.removeprefix("torchvision:"), "kwargs": kwargs}
    elif ":" in spec:
        arch = {"kind": "factory", "target": spec, "kwargs": {}}
    else:
        raise _unresolved(spec)
    model = build_from_arch(arch)
    if weights is None and arch["kind"] == "factory":  # the factory's own weights, loaded by the user's code
        require_finite(model.state_dict(), f"the model factory {spec!r} built")
    _load_weights(model, weights, trust_pickle, arch["kind"])
    return LoadedModel(model.eval(), arch, spec)


MODEL_FORMS = "torchvision:NAME, package.module:function or a compress output directory"


def _unresolved(spec: str) -> UsageError:
    """The error for a --model that is no file, directory, built-in name, torchvision:NAME or factory: a path that
    does not exist, or a name with the closest built-in or torchvision name."""
    if "/" in spec or os.sep in spec or Path(spec).suffix in (".pt", ".pth", ".bin", ".ckpt", ".safetensors"):
        return UsageError(f"model {spec!r} is neither a file nor a directory; check the path")
    names = {f"torchvision:{name}": name for name in _torchvision_names()}
    names.update({name: name for name in BUILTIN_ARCHS})
    match = closest_match(spec, names.values())
    suggestion = next((full for full, bare in names.items() if bare == match), None)
    choices = f"{', '.join(BUILTIN_ARCHS)}, {MODEL_FORMS}"
    if suggestion is None:
        return UsageError(f"unknown model {spec!r}; choose one of {choices}")
    return UsageError(f"unknown model {spec!r}; did you mean {suggestion}? (choose one of {choices})")


def _torchvision_names() -> list[str]:
    try:
        import torchvision.models as tvm
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return []
    return list(tvm.list_models())


def _load_builtin(name: str, weights: str | Path | None, num_classes: int | None,
                  trust_pickle: bool) -> LoadedModel:
    """A built-in model with its shipped baseline weights, unless other weights or classes are given."""
    shipped, manifest_path = baseline_paths(name)
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    kwargs = dict(manifest.get("arch", {}).get("kwargs", {}))
    if num_classes:
        kwargs["num_classes"] = num_classes
    arch = {"kind": "builtin", "name": name, "kwargs": kwargs}
    model = build_from_arch(arch)
    if weights is None and not num_classes:
        if not shipped.exists():
            raise UsageError(f"the built-in baseline {name!r} has no trained weights at {shipped}; "
                             "run `make baseline` to train it")
        weights = shipped
    _load_weights(model, weights, trust_pickle, "builtin")
    dataset = manifest.get("dataset", BUILTIN_DATASETS.get(name, "fashion-mnist"))
    return LoadedModel(model.eval(), arch, name, dataset, manifest)


def _load_pickled_module(path: Path, trust_pickle: bool) -> LoadedModel:
    """A whole pickled nn.Module: refused unless trusted, since unpickling can run code."""
    obj = _torch_load(path, trust_pickle)
    if not isinstance(obj, nn.Module):
        raise UsageError(f"{str(path)!r} holds weights but no architecture; pass the architecture as --model "
                         "(built-in, torchvision:NAME or package.module:function) and this file as --weights")
    require_finite(obj.state_dict(), f"{str(path)!r}")
    return LoadedModel(obj.eval(), {"kind": "pickle", "path": str(path.resolve())}, str(path))


def require_run_files(directory: Path) -> None:
    """Exit 2 unless `directory` holds a run's model files (model.safetensors and arch.json)."""
    for name in (WEIGHTS_FILE, ARCH_FILE):
        if not (directory / name).exists():
            raise UsageError(f"{directory} is not a compress output directory (no {name}); give the --out "
                             "directory of a compress run")


def load_artifact(directory: Path, *, trust_pickle: bool = False, verify: bool = True) -> LoadedModel:
    """Rebuild a model from a run directory with weights-only loading.

    With `verify` (the default) every file manifest.json covers must match its sha256 first, or the run is refused
    (UnsafeCheckpointError, exit 5, naming the file); every command that loads a run comes through here."""
    directory = Path(directory)
    require_run_files(directory)
    if verify:
        verify_files(directory)
    arch = json.loads((directory / ARCH_FILE).read_text())
    manifest_path = directory / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    model = build_from_arch(arch, trust_pickle=trust_pickle)
    state = _read_state_file(directory / WEIGHTS_FILE, trust_pickle=False)
    require_finite(state, f"the run's {str(directory / WEIGHTS_FILE)!r}")
    _fit_state(model, state, f"the run's weights {str(directory / WEIGHTS_FILE)!r}", "run")
    return LoadedModel(model.eval(), arch, str(directory), manifest.get("dataset"), manifest)
