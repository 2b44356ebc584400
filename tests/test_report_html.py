"""report.html from real report.json files (a training run, GlobalMP and ALDS runs) with latency/export rows added."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from compress import api
from compress.config import ALDSConfig
from compress.errors import AuditError
from compress.report import render_html, render_markdown

ROOT = Path(__file__).resolve().parents[1]
TINY_SPEC = "tests.factories:tiny_cnn"
SECTIONS = ("summary", "accuracy", "layers", "size", "latency", "export", "conditions")


def add_latency_and_export(report: dict[str, Any]) -> dict[str, Any]:
    """A copy of a real report with synthetic latency rows for several backends and an export section."""
    report = copy.deepcopy(report)
    base = {"threads": 1, "runs": 30}

    def row(backend: str, batch: int, p50: float, base_p50: float, **extra: Any) -> dict[str, Any]:
        s = base_p50 / p50
        return {**base, "backend": backend, "batch": batch, "p50_ms": p50, "p90_ms": p50 * 1.2,
                "baseline_p50_ms": base_p50, "baseline_p90_ms": base_p50 * 1.2, "speedup": s,
                "speedup_spread": [s * 0.93, s * 1.05], **extra}

    report["latency"] = [row("pytorch-cpu", 1, 0.229, 0.221), row("pytorch-cpu", 32, 2.91, 3.02),
                         row("pytorch-cuda", 32, 0.081, 0.083), row("onnxruntime-cpu", 1, 0.052, 0.061),
                         row("mobile-proxy", 1, 0.047, 0.071, proxy=True)]
    parity = {"max_abs": 2.4e-06, "max_rel": 1.1e-05, "cosine": 1.0, "top1_agreement": 1.0, "items": 256}
    report["export"] = {
        "onnx": {"path": "model.onnx", "bytes": 17920, "ok": True, "parity": parity, "test_accuracy": 0.9031,
                 "mobile_usability": {"nnapi": {"supported_nodes": 11, "total_nodes": 14, "partitions": 2},
                                      "coreml": {"supported_nodes": 9, "total_nodes": 14, "partitions": 3}}},
        "ort": {"path": "model.ort", "bytes": 19344, "ok": True, "parity": parity,
                "required_operators": "model.required_operators.config"},
        "ort_int8": {"path": "model.int8.ort", "bytes": 9120, "ok": False, "proxy": True, "test_accuracy": 0.8712,
                     "parity": {**parity, "max_abs": 0.41, "cosine": 0.982, "top1_agreement": 0.93}}}
    for fmt, entry in report["export"].items():
        report["model"].setdefault("before", {}).setdefault("bytes", {})[fmt] = entry["bytes"] + 1000
        report["model"]["after"]["bytes"][fmt] = entry["bytes"]
    return report


@pytest.fixture(scope="module")
def train_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real training run's report (the tiny CNN, one epoch on digits): no layers, no latency, no export."""
    from compress.config import FinetuneConfig

    out = tmp_path_factory.mktemp("train") / "run"
    return api.train_model(api.ModelSource(spec=TINY_SPEC, num_classes=10), FinetuneConfig(epochs=1),
                           api.RunOptions(out=out, data="digits", latency=False, command="test"))


@pytest.fixture(scope="module")
def gmp_report(tiny_run: Path) -> dict[str, Any]:
    """A real GlobalMP run of the tiny CNN (90% sparsity), with synthetic latency and export sections."""
    return add_latency_and_export(json.loads((tiny_run / "report.json").read_text()))


@pytest.fixture(scope="module")
def gmp_page(gmp_report: dict[str, Any]) -> str:
    """The GlobalMP sample rendered once for the tests that only read it."""
    return render_html(gmp_report)


@pytest.fixture(scope="module")
def alds_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real ALDS run of the tiny CNN (keep 0.5; on this tiny net the audit fails, which the report shows)."""
    out = tmp_path_factory.mktemp("alds") / "run"
    try:
        api.prune(api.ModelSource(spec=TINY_SPEC), ALDSConfig(priced=False, keep=0.5, seeds=3, rounds=2),
                  api.RunOptions(out=out, data="digits", latency=False, command="test"))
    except AuditError:
        pass
    return json.loads((out / "report.json").read_text())


def section_ids(page: str) -> set[str]:
    return set(re.findall(r'<(?:section|header) id="([a-z]+)"', page))


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (asserting the signature)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_full_report_has_every_section(gmp_page: str) -> None:
    page = gmp_page
    assert section_ids(page) == set(SECTIONS)
    assert "sparsity over conv/linear weights" in page and "features.6" in page
    assert "<td>bytes: safetensors_sparse</td>" in page and "<td>17,920 B</td>" in page  # bytes say bytes


def test_lowrank_report_shows_ranks_groups_and_audit(alds_report: dict[str, Any]) -> None:
    page = render_html(alds_report)
    assert {"layers", "size", "accuracy"} <= section_ids(page)
    assert "rank j" in page and "groups k" in page
    if alds_report["audit"]["problems"]:
        assert "audit problems" in page and 'class="badge bad"' in page


def test_channel_layers_render(gmp_report: dict[str, Any]) -> None:
    report = copy.deepcopy(gmp_report)
    report["method"] = "pagcp"  # the rows are labelled by the method's registry entry, not guessed from their keys
    report["layers"] = [{"name": f"backbone.stage{i}.block.conv", "kind": "Conv2d", "shape_before": [32, 16, 3, 3],
                         "shape_after": [16, 16, 3, 3], "channels_before": 32, "channels_after": 16,
                         "params_before": 4608, "params_after": 2304} for i in range(3)]
    page = render_html(report)
    assert "channels before" in page and "backbone.stage2.block.conv" in page and "layers" in section_ids(page)


def test_train_report_omits_missing_sections(train_report: dict[str, Any]) -> None:
    page = render_html(train_report)
    assert section_ids(page) == {"summary", "accuracy", "size", "conditions"}
    assert render_html({}).startswith("<!doctype html>")  # nothing at all: still a page


def test_self_contained_and_images_are_png(gmp_page: str) -> None:
    page = gmp_page
    assert not re.search(r'(?:src|href)\s*=\s*["\']?(?:https?:)?//', page)
    assert "<link" not in page and "<script" not in page and "@import" not in page and "url(" not in page
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(sources) == 4  # accuracy, layers, size, latency
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        width, height = png_size(base64.b64decode(src.split(",", 1)[1]))
        assert width >= 450 and height >= 300  # 150 dpi


def test_report_strings_are_escaped(gmp_report: dict[str, Any]) -> None:
    report = copy.deepcopy(gmp_report)
    report["command"] = "compress prune --out '<script>alert(1)</script>'"
    report["layers"][0]["name"] = "x<img src=y>$\\alpha$"
    report["tasks"]['<b>"t"</b>'] = report["tasks"].pop("classification")
    page = render_html(report)
    assert "<script>" not in page and "<b>" not in page and "<img src=y>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;&quot;t&quot;&lt;/b&gt;" in page


def test_proxy_backend_is_labelled(gmp_page: str) -> None:
    page = gmp_page
    assert "<td>mobile-proxy (proxy)</td>" in page and "<td>ort_int8 (proxy)</td>" in page
    assert "<td>pytorch-cpu</td>" in page


def test_failed_export_shows_badge(gmp_page: str) -> None:
    page = gmp_page
    export = page[page.index('<section id="export">'):]
    export = export[:export.index("</section>")]
    assert export.count('<span class="badge bad">FAILED</span>') == 1
    assert export.count('<span class="badge ok">ok</span>') == 2
    assert "nnapi: 11 of 14 nodes supported in 2 partition(s)" in export


def test_lower_is_better_metric_and_markdown_still_renders(gmp_report: dict[str, Any]) -> None:
    report = copy.deepcopy(gmp_report)
    report["tasks"]["depth"] = {"metric": "pixel error", "higher_is_better": False, "split": "test",
                                "before": 0.12, "after_compression": 0.19, "after_finetune": 0.14}
    page = render_html(report)
    assert "pixel error" in page and page.count("<img ") == 4
    assert "## Layers" in render_markdown(report) and "mobile-proxy" in render_markdown(report)


def test_render_is_deterministic_and_thread_safe(train_report: dict[str, Any]) -> None:
    with ThreadPoolExecutor(2) as pool:
        pages = list(pool.map(render_html, [train_report] * 3))
    assert pages[0] == pages[1] == pages[2]
    assert "matplotlib.pyplot" not in sys.modules  # no global figure manager, nothing leaks between renders


@pytest.mark.slow
def test_chromium_screenshot(gmp_report: dict[str, Any], tmp_path: Path) -> None:
    if not (shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")):
        pytest.skip("chromium is not installed (apt-get install chromium); it renders report.html headless")
    html, png = tmp_path / "report.html", tmp_path / "report.png"
    html.write_text(render_html(gmp_report), encoding="utf-8")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "screenshot_report.py"), str(html), str(png),
                    "--height", "2400"], check=True, timeout=180)
    data = png.read_bytes()
    assert png_size(data) == (1280, 2400)
    assert len(data) > 60_000  # a rendered page with plots, not a blank canvas
