"""A real torchrun with two CPU processes (gloo on loopback) fine-tunes a pruned model with DDP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.models import load_model
from tests.conftest import TINY_SPEC

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_prune_and_finetune(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "compress.cli", "prune", "--model", TINY_SPEC, "--data", "digits", "--sparsity", "0.9",
           "--finetune-epochs", "2", "--no-latency", "--threads", "1", "--json", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    reports = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1, "only rank 0 prints the report"
    report = json.loads(reports[0])
    assert report["finetune"]["epochs"] == 2 and report["sparsity"]["achieved"] == pytest.approx(0.9, abs=1e-3)
    assert not out.with_name("ddp.partial").exists()
    loaded = load_model(str(out))
    params = dict(loaded.model.named_parameters())
    weights = [params[name] for name in loaded.manifest["masked_params"]]
    kept = sum(int(torch.count_nonzero(w)) for w in weights)
    assert kept == sum(w.numel() for w in weights) - report["summary"]["pruned"], "masks held through DDP training"
