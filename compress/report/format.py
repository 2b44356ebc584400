"""Number formatting shared by the Markdown and terminal renderers."""

from __future__ import annotations

from typing import Any

from compress.methods.base import layer_kind_of


def num(value: Any, digits: int = 2) -> str:
    """Integers with thousands separators, floats with fixed digits, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100.0 * value:.{digits}f}%"


def ratio(after: float | None, before: float | None) -> str:
    """after / before as `0.123x`."""
    if not after or not before:
        return "-"
    return f"{after / before:.3f}x"


def model_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(quantity, before, after, after/before) rows for the size and cost table."""
    before, after = report.get("model", {}).get("before", {}), report.get("model", {}).get("after", {})
    rows = []
    for key, label in (("params_total", "parameters (total)"), ("params_nonzero", "parameters (nonzero)"),
                       ("macs", "MACs (dense, per item)"), ("macs_effective", "MACs (effective, nonzero weights)")):
        rows.append((label, num(before.get(key)), num(after.get(key)), ratio(after.get(key), before.get(key))))
    for fmt, value in after.get("bytes", {}).items():
        old = before.get("bytes", {}).get(fmt)
        rows.append((f"bytes: {fmt}", num(old), num(value), ratio(value, old)))
    return rows


def task_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """(task, metric, before, after compression, after fine-tune) rows."""
    return [(name, f"{t['metric']} ({t.get('split', 'test')})", num(t.get("before")), num(t.get("after_compression")),
             num(t.get("after_finetune"))) for name, t in report.get("tasks", {}).items()]


def backend_label(row: dict[str, Any]) -> str:
    """The backend's name, marked "(proxy)" when it stands in for another device."""
    proxy = row.get("proxy") or row.get("backend") == "mobile-proxy"
    return f"{row['backend']} (proxy)" if proxy and "(proxy)" not in row["backend"] else row["backend"]


def _speedup(row: dict[str, Any]) -> str:
    if row.get("speedup") is None:
        return "-"
    low, high = row["speedup_spread"]
    return f"{row['speedup']:.2f}x [{low:.2f}, {high:.2f}]"


def latency_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """(backend, batch, threads, runs, p50, p90, baseline p50, speed-up [spread]) rows."""
    return [(backend_label(r), str(r["batch"]), str(r["threads"]), str(r["runs"]), num(r["p50_ms"], 3),
             num(r["p90_ms"], 3), num(r.get("baseline_p50_ms"), 3), _speedup(r)) for r in report.get("latency", [])]


PRUNING_COLUMNS = ("name", "kind", "shape", "weights", "kept", "sparsity", "floor", "floor hit")
LOWRANK_COLUMNS = ("name", "kind", "shape", "groups k", "rank j", "params before", "params after", "MACs after/before",
                   "ε bound", "error (spectral)", "error (Frobenius)")
PRICED_COLUMNS = ("dense ms", "predicted ms", "measured ms")
CHANNEL_COLUMNS = ("order", "unit", "channels before", "channels after", "ratio", "MACs contribution", "δ_i",
                   "vetoed by", "loss ratios at the chosen ratio", "flags")


def _shape(shape: list) -> str:
    """`64x32x3x3`, or `enc -> dec` for a decomposed layer's pair of shapes."""
    if shape and isinstance(shape[0], list):
        return " → ".join("x".join(map(str, s)) for s in shape)
    return "x".join(map(str, shape))


def layer_kind(report: dict[str, Any]) -> str:
    """`pruning`, `lowrank`, `channels` or ``: as the registry entry of the method that wrote the report says."""
    return layer_kind_of(report)


def _channel_row(row: dict[str, Any]) -> tuple[str, ...]:
    """One unit of a channel-pruning log: what it lost, which task stopped it, and each task's loss ratio."""
    losses = ", ".join(f"{task} {value:.3f}" for task, value in (row.get("loss_ratios") or {}).items())
    flags = [flag for flag, on in (("all pass", row.get("all_pass")), ("not kept (top-P)", row.get("selected") is False))
             if on]
    vetoed = row.get("vetoed_by") or "-"
    return (num(row.get("order")), row["name"], num(row["channels_before"]), num(row["channels_after"]),
            num(row.get("ratio")), num(row.get("macs_contribution")), num(row.get("delta"), 4), vetoed, losses or "-",
            ", ".join(flags))


def _lowrank_row(row: dict[str, Any], priced: bool) -> tuple[str, ...]:
    """One layer of a low-rank decomposition: its (k, j), sizes, error bound and true errors, and with a latency
    budget its dense, predicted and measured time on the priced backend."""
    cells = (row["name"], row["kind"], _shape(row["shape_after"]), num(row["groups"]), num(row["rank"]),
             num(row["params_before"]), num(row["params_after"]), ratio(row["macs_after"], row["macs_before"]),
             num(row["eps_bound"], 4), num(row["err_spectral"], 4), num(row["err_frobenius"], 4))
    if not priced:
        return cells
    return cells + tuple(num(row.get(key), 4) for key in ("dense_ms", "predicted_ms", "measured_ms"))


def layer_table(report: dict[str, Any]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Per-layer audit: the pruning columns (GlobalMP), the low-rank columns (ALDS, SVD) or the channel columns."""
    layers, kind = report.get("layers") or [], layer_kind(report)
    if kind == "pruning":
        return PRUNING_COLUMNS, [(row["name"], row["kind"], _shape(row["shape_before"]), num(row["weights"]),
                                  num(row["kept"]), pct(row["sparsity"]), num(row["floor"]),
                                  "yes" if row["floor_hit"] else "") for row in layers if "weights" in row]
    if kind == "lowrank":
        priced = any("dense_ms" in row for row in layers)
        return LOWRANK_COLUMNS + (PRICED_COLUMNS if priced else ()), [_lowrank_row(row, priced) for row in layers]
    if kind == "channels":
        ordered = sorted((row for row in layers if "channels_before" in row),
                         key=lambda r: (r.get("round", 1), r.get("order", 0)))
        return CHANNEL_COLUMNS, [_channel_row(row) for row in ordered]
    return (), []


def bytes_label(value: int | None) -> str:
    """`1,247,688 B`: bytes, never an unlabelled MB."""
    return "-" if value is None else f"{value:,} B"


def budget_line(report: dict[str, Any]) -> str | None:
    """`sparsity over X: requested, achieved` or `kept of X: requested, achieved`, whichever the run has."""
    if report.get("sparsity"):
        s = report["sparsity"]
        return (f"sparsity over {s['counted_over']}: requested {pct(s['requested'], 3)}, "
                f"achieved {pct(s['achieved'], 3)}")
    if report.get("keep"):
        k = report["keep"]
        line = f"kept of {k['counted_over']}: requested {pct(k['requested'], 3)}, achieved {pct(k['achieved'], 3)}"
        for other in (report.get("summary") or {}).get("also") or []:
            line += (f"; and of {other['counted_over']}: requested {pct(other['requested'], 3)}, achieved "
                     f"{pct(other['achieved'], 3)}")
        measured = ((report.get("audit") or {}).get("figures") or {}).get("latency_measured")
        if measured is not None:
            line += f"; latency measured against the original: {pct(measured, 3)}"
        return line
    return None


def export_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """(format, file, bytes, verified, max abs error, cosine, top-1 agreement, test accuracy) rows."""
    rows = []
    for fmt, entry in report.get("export", {}).items():
        parity = entry.get("parity", {})
        rows.append((fmt, entry.get("path", "-"), num(entry.get("bytes")), "ok" if entry.get("ok") else "FAILED",
                     f"{parity['max_abs']:.3g}" if parity.get("max_abs") is not None else "-",
                     num(parity.get("cosine"), 6), pct(parity.get("top1_agreement")), num(entry.get("test_accuracy"))))
    return rows


def mobile_lines(report: dict[str, Any]) -> list[str]:
    """One line per mobile execution provider: nodes it could run, and in how many partitions."""
    usability = report.get("export", {}).get("onnx", {}).get("mobile_usability") or {}
    lines = []
    for provider, info in usability.items():
        if isinstance(info, dict) and "supported_nodes" in info:
            fixed = info.get("recommendation_if_fixed_shapes")
            lines.append(f"{provider}: {info['supported_nodes']} of {info['total_nodes']} nodes supported in "
                         f"{info.get('partitions', '-')} partition(s), recommendation {info.get('recommendation')}"
                         + (f" ({fixed} with static shapes)" if fixed and fixed != info.get("recommendation") else ""))
    return lines



def verify_file_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(file, sha256, status) rows of a verify report: the files manifest.json covers."""
    return [(f["name"], f["sha256"].removeprefix("sha256:")[:16], "match" if f["ok"] else "DIFFERS")
            for f in report.get("files", [])]


def verify_metric_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """(task, metric, figure, recorded, measured, tolerance, status) rows of a verify report."""
    return [(m["task"], m["metric"], m["stage"], num(m["recorded"], 4), num(m["measured"], 4), f"{m['tolerance']:g}",
             "ok" if m["ok"] else "DIFFERS") for m in report.get("metrics", [])]


LAYER_LATENCY_COLUMNS = ("layer", "op", "ms", "time share", "MACs share")
MODEL_LABELS = {"candidate": "the model", "baseline": "the original"}


def _unprofiled_ms(report: dict[str, Any], entry: dict[str, Any]) -> float | None:
    """The latency table's p50 for the entry's backend, batch and model (timed without profiler or hooks)."""
    key = "p50_ms" if entry.get("model") == "candidate" else "baseline_p50_ms"
    return next((row.get(key) for row in report.get("latency", [])
                 if row.get("backend") == entry["backend"] and row.get("batch") == entry["batch"]), None)


def layer_latency_title(report: dict[str, Any], entry: dict[str, Any], *, model: bool = True) -> str:
    """`onnxruntime-cpu · batch 1 · the model: 0.248 ms profiled (0.185 ms unprofiled)`; the unprofiled time is
    the latency table's p50 for the same backend, batch and model, when it has one."""
    plain = _unprofiled_ms(report, entry)
    who = f" · {MODEL_LABELS.get(entry.get('model'), '?')}" if model else ""
    return (f"{backend_label(entry)} · batch {entry['batch']}{who}: {num(entry['total_ms'], 3)} ms profiled"
            + (f" ({num(plain, 3)} ms unprofiled)" if plain is not None else ""))


def layer_latency_rows(entry: dict[str, Any]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """The columns and rows of one per-layer latency table: the top layers, everything else, the remainder.

    An "original ms" column follows when the entry carries the baseline's time of the same layers.
    """
    layers = entry.get("layers", [])
    compared = any("baseline_ms" in row for row in layers)
    blank = ("",) if compared else ()
    rows = [(row["name"], row["op"], num(row["ms"], 3), pct(row["time_share"], 1), pct(row["macs_share"], 1),
             *((num(row.get("baseline_ms"), 3),) if compared else ())) for row in layers]
    other, rest = entry["other"], entry["unattributed"]
    if other["layers"]:
        rows.append((f"everything else ({other['layers']} layers)", "", num(other["ms"], 3),
                     pct(other["time_share"], 1), pct(other["macs_share"], 1), *blank))
    rows.append(("unattributed (overhead)", "", num(rest["ms"], 3), pct(rest["time_share"], 1),
                 pct(rest["macs_share"], 1), *blank))
    return LAYER_LATENCY_COLUMNS + (("original ms",) if compared else ()), rows
