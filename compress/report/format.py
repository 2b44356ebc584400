"""Number formatting shared by the Markdown and terminal renderers."""

from __future__ import annotations

from typing import Any


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


def latency_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """(backend, batch, threads, runs, p50, p90, baseline p50, speed-up [spread]) rows."""
    return [(r["backend"], str(r["batch"]), str(r["threads"]), str(r["runs"]), f"{r['p50_ms']:.3f}",
             f"{r['p90_ms']:.3f}", f"{r['baseline_p50_ms']:.3f}",
             f"{r['speedup']:.2f}x [{r['speedup_spread'][0]:.2f}, {r['speedup_spread'][1]:.2f}]")
            for r in report.get("latency", [])]


PRUNING_COLUMNS = ("name", "kind", "shape", "weights", "kept", "sparsity", "floor", "floor hit")
LOWRANK_COLUMNS = ("name", "kind", "shape", "groups k", "rank j", "params before", "params after", "MACs after/before",
                   "ε bound", "error (spectral)", "error (Frobenius)")


def _shape(shape: list) -> str:
    """`64x32x3x3`, or `enc -> dec` for a decomposed layer's pair of shapes."""
    if shape and isinstance(shape[0], list):
        return " → ".join("x".join(map(str, s)) for s in shape)
    return "x".join(map(str, shape))


def layer_table(report: dict[str, Any]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Per-layer audit: the pruning columns (GlobalMP) or the low-rank columns (ALDS, SVD)."""
    layers = report.get("layers", [])
    if any("weights" in row for row in layers):
        return PRUNING_COLUMNS, [(row["name"], row["kind"], _shape(row["shape_before"]), num(row["weights"]),
                                  num(row["kept"]), pct(row["sparsity"]), num(row["floor"]),
                                  "yes" if row["floor_hit"] else "") for row in layers if "weights" in row]
    if any("rank" in row for row in layers):
        return LOWRANK_COLUMNS, [(row["name"], row["kind"], _shape(row["shape_after"]), num(row["groups"]),
                                  num(row["rank"]), num(row["params_before"]), num(row["params_after"]),
                                  ratio(row["macs_after"], row["macs_before"]), num(row["eps_bound"], 4),
                                  num(row["err_spectral"], 4), num(row["err_frobenius"], 4)) for row in layers]
    return (), []


def budget_line(report: dict[str, Any]) -> str | None:
    """`sparsity over X: requested, achieved` or `kept of X: requested, achieved`, whichever the run has."""
    if report.get("sparsity"):
        s = report["sparsity"]
        return (f"sparsity over {s['counted_over']}: requested {pct(s['requested'], 3)}, "
                f"achieved {pct(s['achieved'], 3)}")
    if report.get("keep"):
        k = report["keep"]
        return f"kept of {k['counted_over']}: requested {pct(k['requested'], 3)}, achieved {pct(k['achieved'], 3)}"
    return None
