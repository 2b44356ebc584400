"""Small representatives of the torchvision zoo (`make bench-zoo` runs them all): the architectures that used to
stop a method, through `compress.api.prune` as a user runs them, and the zoo table's rendering."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_zoo import SETTINGS, render, summary_reason
from compress import api
from compress.config import ALDSConfig, PAGCPConfig


def prune(tmp_path: Path, model: str, cfg) -> dict:
    source = api.ModelSource(spec=f"torchvision:{model}", num_classes=10)
    options = api.RunOptions(out=tmp_path / "run", data="fashion-mnist", latency=False, eval_items=50,
                             command="test")
    return api.prune(source, cfg, options)


@pytest.mark.slow
def test_pagcp_prunes_shufflenet_v2(tmp_path):
    """Torch-Pruning used to stop tracing shufflenet_v2 with ZeroDivisionError (its channel shuffle); now the
    groups through the shuffle are left alone, named, and the branches' inner channels are pruned (about 15 s)."""
    report = prune(tmp_path, "shufflenet_v2_x0_5", PAGCPConfig(**SETTINGS["pagcp"]))
    assert report["status"] == "ok"
    summary = report["summary"]
    assert summary["units"] == 18 and summary["macs_keep"] < 1.0
    assert summary["skipped"] and all("channel shuffle" in s["reason"] for s in summary["skipped"])


@pytest.mark.slow
def test_alds_runs_swin_t_to_the_end(tmp_path):
    """swin_t's attention reads qkv.weight and proj.weight itself: those layers are found before any work, left
    dense and named; the rest is decomposed to the budget (about 20 s)."""
    report = prune(tmp_path, "swin_t", ALDSConfig(**SETTINGS["alds"]))
    assert report["status"] == "ok"
    skipped = report["summary"]["skipped"]
    assert len(skipped) == 24 and all(s["name"].endswith((".attn.qkv", ".attn.proj")) for s in skipped)
    assert all("read directly by" in s["reason"] for s in skipped)
    assert report["summary"]["layers_decomposed"] > 0


def test_zoo_table_renders_every_outcome():
    results = [
        {"model": "m1", "method": "globalmp", "status": "ok", "detail": "sparsity 0.500", "input_shape": [3, 28, 28],
         "left_alone": [{"name": "pos", "reason": "a bare parameter of M (position embedding)"}], "seconds": 3},
        {"model": "m1", "method": "alds", "status": "refused", "detail": "no layers | to decompose", "seconds": 1},
        {"model": "m2", "method": "globalmp", "status": "failed", "detail": "ValueError: boom", "seconds": 1},
        {"model": "m2", "method": "alds", "status": "skipped", "detail": "over 300 s", "seconds": 300,
         "left_alone": [{"name": "a.qkv", "reason": "its 'weight' is read directly by 'a' (Attn) instead"},
                        {"name": "b.qkv", "reason": "its 'weight' is read directly by 'b' (Attn) instead"}]},
    ]
    text = render(results, SETTINGS)
    assert "| model | input | globalmp | alds |" in text
    assert "| m1 | 3x28x28 | ok: sparsity 0.500; 1 left alone | **refused**: no layers \\| to decompose |" in text
    assert "| m2 | - | **failed**: ValueError: boom | **skipped**: over 300 s; 2 left alone |" in text
    assert "ok per method: globalmp 1/2, alds 0/2." in text
    assert summary_reason(results[3]["left_alone"]) == "2 x its 'weight' is read directly by its parent (Attn) instead"
