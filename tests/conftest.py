"""Shared fixtures: a tiny seeded CNN, the `digits` splits, output directories, and the baseline skip marker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

torch.set_num_threads(1)  # the test machine has two cores and other work on them

import pytest  # noqa: E402

from compress.models.loader import DEFAULT_MODEL, baseline_paths  # noqa: E402
from tests.factories import TinyCNN, tiny_cnn  # noqa: E402

TINY_SPEC = "tests.factories:tiny_cnn"
BASELINE_WEIGHTS = baseline_paths(DEFAULT_MODEL)[0]


def baseline_available() -> bool:
    """Whether the shipped built-in baseline weights exist (they are trained by `make baseline`)."""
    return BASELINE_WEIGHTS.is_file()


def _baseline_reason() -> str:
    return (f"built-in baseline {BASELINE_WEIGHTS} does not exist yet; train it with `make baseline` "
            "(compress train --install-baseline)")


# Evaluated when the test module is collected, so a run after the baseline is installed does not skip.
requires_baseline = pytest.mark.skipif(not baseline_available(), reason=_baseline_reason())


@pytest.fixture
def baseline() -> Path:
    """The shipped baseline weights file; skips (with the reason) while it does not exist."""
    if not baseline_available():
        pytest.skip(_baseline_reason())
    return BASELINE_WEIGHTS


@pytest.fixture
def tiny_model() -> TinyCNN:
    """A fresh TinyCNN with seed-0 weights (1x8x8 input, 10 classes)."""
    return tiny_cnn()


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 8x8 digits as compress Splits (seed 0)."""
    from compress.data import load_dataset

    return load_dataset("digits")


@pytest.fixture
def out_dir(tmp_path: Path) -> Callable[[str], Path]:
    """`out_dir(name)`: a path under tmp_path that does not exist yet (for --out)."""

    def make(name: str = "run") -> Path:
        path = tmp_path / name
        assert not path.exists()
        return path

    return make


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished `compress prune` run directory: the tiny CNN at 90% sparsity on digits, no latency."""
    from compress import api
    from compress.config import GlobalMPConfig

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    api.prune(api.ModelSource(spec=TINY_SPEC), GlobalMPConfig(sparsity=0.9),
              api.RunOptions(out=out, data="digits", latency=False, command="test"))
    return out
