"""The conditions a measurement was taken under: versions, CPU, threads, device."""

from __future__ import annotations

import platform
from importlib import metadata

import torch

PACKAGES = ("compress", "torch", "torchvision", "torch-pruning", "onnx", "onnxruntime", "safetensors", "numpy",
            "typer", "rich")


def _cpuinfo_model() -> str | None:
    """The value of /proc/cpuinfo's first `model name` line; None without one or when the file cannot be read."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), None)
    except OSError:
        return None


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else platform's answer."""
    name = _cpuinfo_model()
    return name if name is not None else platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Versions, CPU, thread count and accelerator, for reports and `compress env`."""
    import os

    return {
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "providers": _onnxruntime_providers(),
    }


def _onnxruntime_providers() -> list[str]:
    """ONNX Runtime's execution providers on this machine (empty when it is not installed)."""
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())
