"""The `compress check` result (see compress.check) as table rows, a terminal table and a pull-request comment."""

from __future__ import annotations

from typing import Any

CHECK_HEADER = ("budget", "baseline", "current", "change", "limit", "status")
STATUS_MARK = {"ok": "ok", "warn": "warn", "error": "ERROR"}
MD_MARK = {"ok": "✅ ok", "warn": "⚠️ warn", "error": "❌ error"}
BASELINE_WORDS = {"run": "the baseline run", "origin": "the run's origin (model.before)", "none": "none"}


def figure(value: float | None, row: dict[str, Any]) -> str:
    """A figure in its row's unit: `17,032 B`, `3,778`, `14.76`, `0.95x`."""
    if value is None:
        return "-"
    if row["kind"] == "latency":
        return f"{value:.3g}x"
    if row["kind"] == "task":
        return f"{value:.4g}"
    text = f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"
    return f"{text} B" if row["kind"] == "bytes" else text


def change_label(row: dict[str, Any]) -> str:
    """`+2.1%`, `-0.42 pt`, or a speed ratio with its p25-p75 range."""
    if row["kind"] == "latency":
        spread = row.get("spread")
        return f"[{spread[0]:.3g}x, {spread[1]:.3g}x]" if spread else "-"
    if row["change"] is None:
        return "-"
    if row["kind"] == "task":
        return f"{row['change']:+.4g} {row['unit'] or ''}".rstrip()
    return f"{100 * row['change']:+.1f}%"


def limit_label(row: dict[str, Any]) -> str:
    """`warn +2% (17,373 B) · error +5% (17,884 B)`: each limit as written and resolved."""
    parts = []
    for level in ("warn", "error"):
        written = row["limits"][level]
        if written is not None:
            parts.append(f"{level} {written} ({figure(row[f'{level}_limit'], row)})")
    return " · ".join(parts) + (" strict" if row.get("strict") else "")


def check_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per budget: budget, baseline, current, change, limit, status (with why)."""
    return [(row["budget"], "1x (timed with)" if row["kind"] == "latency" else figure(row["baseline"], row),
             figure(row["current"], row), change_label(row), limit_label(row),
             STATUS_MARK[row["status"]] + (f": {row['note']}" if row["note"] else ""))
            for row in result["results"]]


def headline(result: dict[str, Any]) -> str:
    """`passed: 7 budgets, 1 warning` or `FAILED: 1 error, 0 warnings`."""
    counts = result["counts"]
    word = "FAILED" if result["exit_code"] else "passed"
    return (f"{word}: {len(result['results'])} budgets, {counts['error']} error(s), {counts['warn']} warning(s)"
            + (" (--warn-as-error)" if result["warn_as_error"] else ""))


def render_check_markdown(result: dict[str, Any], marker: str) -> str:
    """The pull-request comment: the marker line first (a workflow finds and updates the same comment)."""
    icon = "❌" if result["exit_code"] else "✅"
    lines = [marker, f"### {icon} compress check {headline(result)}", "",
             f"Current: `{result['current']}` · baseline: "
             + (f"`{result['baseline']}`" if result["baseline"] else BASELINE_WORDS[result["baseline_kind"]])
             + f" · budgets: `{result['budgets_file']}`", "",
             "| " + " | ".join(CHECK_HEADER) + " |", "|" + "---|" * len(CHECK_HEADER)]
    for row, cells in zip(result["results"], check_rows(result)):
        status = MD_MARK[row["status"]] + (f": {row['note']}" if row["note"] else "")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in (*cells[:5], status)) + " |")
    lines += ["", ("Sizes, parameters and MACs are deterministic and fail hard; latency errs only when the whole "
                   "p25-p75 range of its paired ratios is beyond a strict limit.")]
    return "\n".join(lines) + "\n"


def print_check(result: dict[str, Any], console: Any) -> None:
    """The check as a rich table on `console`, then its headline."""
    from rich.table import Table

    table = Table(title=f"Budgets ({result['budgets_file']}) against "
                  + (result["baseline"] or BASELINE_WORDS[result["baseline_kind"]]), title_justify="left")
    for column in CHECK_HEADER:
        table.add_column(column)
    styles = {"ok": None, "warn": "yellow", "error": "bold red"}
    for row, cells in zip(result["results"], check_rows(result)):
        table.add_row(*cells, style=styles[row["status"]])
    console.print(table)
    console.print(f"check {headline(result)}  current: {result['current']}", highlight=False)
