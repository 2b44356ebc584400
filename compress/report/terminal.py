"""A rich summary on stdout."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from compress.report.format import (
    budget_line,
    export_rows,
    latency_rows,
    layer_latency_rows,
    layer_latency_title,
    layer_table,
    model_rows,
    task_rows,
    verify_file_rows,
    verify_metric_rows,
)

MAX_LAYER_ROWS = 40


def _table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table


def print_summary(report: dict[str, Any], console: Console, *, layers: bool = True) -> None:
    """Outcome, accuracy, size, latency and (up to MAX_LAYER_ROWS) per-layer rows; a verify report's own tables."""
    if report.get("method") == "verify":
        print_verify(report, console)
        return
    columns, rows = layer_table(report)
    if layers and rows:
        shown = rows if len(rows) <= MAX_LAYER_ROWS else rows[:MAX_LAYER_ROWS]
        console.print(_table("Layers" + ("" if shown is rows else f" (first {MAX_LAYER_ROWS} of {len(rows)})"),
                             columns, shown))
    if report.get("tasks"):
        console.print(_table("Accuracy", ("task", "metric", "before", "after compression", "after fine-tuning"),
                             task_rows(report)))
    console.print(_table("Size and cost", ("quantity", "before", "after", "after/before"), model_rows(report)))
    if report.get("latency"):
        console.print(_table("Latency (interleaved with the original)", ("backend", "batch", "threads", "runs",
                             "p50 ms", "p90 ms", "original p50 ms", "speed-up [p25, p75]"), latency_rows(report)))
    print_layer_latency(report, console)
    if report.get("export"):
        console.print(_table("Export (checked against PyTorch)", ("format", "file", "bytes", "verified", "max abs",
                             "cosine", "top-1 agreement", "test accuracy"), export_rows(report)))
    budget = budget_line(report)
    if budget:
        console.print(budget)
    for problem in report.get("audit", {}).get("problems", []):
        console.print(f"[bold red]audit:[/] {problem}")
    console.print(f"status: [bold]{report.get('status')}[/]  output: {report.get('out')}")


def print_layer_latency(report: dict[str, Any], console: Console) -> None:
    """Where the time goes: the measured model's slowest layers per backend and batch (the original's in
    report.md and report.html; here as a column beside each of the model's layers)."""
    for entry in report.get("layer_latency", []):
        if entry.get("model") == "candidate":
            columns, rows = layer_latency_rows(entry)
            title = layer_latency_title(report, entry, model=False)
            console.print(_table(f"Where the time goes, {title}", columns, rows))


def print_verify(report: dict[str, Any], console: Console) -> None:
    """`compress verify`: the files checked against manifest.json, then each metric recorded and measured."""
    console.print(_table("Files (sha256 in manifest.json)", ("file", "sha256", "status"), verify_file_rows(report)))
    console.print(f"not covered by the manifest: {', '.join(report.get('unhashed', [])) or '-'}")
    data = report.get("data", {})
    title = f"Test metrics on {data.get('name')} (seed {data.get('seed')}) against report.json"
    rows = verify_metric_rows(report)
    if rows:
        console.print(_table(title, ("task", "metric", "figure", "recorded", "measured", "tolerance", "status"), rows))
    else:
        console.print("report.json records no test metrics to reproduce")
    console.print(f"status: [bold]{report.get('status')}[/]  run: {report.get('run')}")
