"""report.md from report.json."""

from __future__ import annotations

from typing import Any

from compress.methods.base import sections_for
from compress.report.format import (
    budget_line,
    export_rows,
    latency_rows,
    layer_latency_rows,
    layer_latency_title,
    layer_table,
    mobile_lines,
    model_rows,
    num,
    task_rows,
)

SPARSE_NOTE = ("Unstructured sparsity makes the file smaller and can raise accuracy per byte; dense runtimes "
               "execute the same MACs, so expect size and accuracy changes only, no dense speed-up.")


PROXY_NOTE = ("The mobile proxy is a static-shape int8 (QDQ) model in ORT format for arm, run by ONNX Runtime's CPU "
              "provider on one thread of this machine: it shows how the phone build's graph behaves, not a phone's "
              "speed.")

LAYER_LATENCY_NOTE = ("Each row is a module of the model: its median time over the profiled runs, its share of the "
                      "run's time (all rows together) and its own share of the model's MACs. On ONNX Runtime the "
                      "times come from its profiler, a fused node (a Conv with its BatchNorm and ReLU) and the int8 "
                      "Q/DQ nodes counted with the layer they came from; on PyTorch from forward hooks, each "
                      "module's own time without its children's. \"unattributed\" is what no layer accounts for (the "
                      "runtime's executor and allocations, call overhead). Profiling adds a few microseconds per "
                      "node or module, so a profiled run is slower than the latency table's, most at batch 1: "
                      "compare shares rather than absolute times.")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """A Markdown table and the empty line after it."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def render_markdown(report: dict[str, Any]) -> str:
    """A human-readable report: outcome, accuracy, size and cost, latency, per-layer audit, conditions."""
    sections = (_summary, _accuracy, _size, _latency, _layer_latency, _export, _finetune, _method_sections, _layers,
                _conditions)
    return "\n".join(line for section in sections for line in section(report))


def _summary(report: dict[str, Any]) -> list[str]:
    """Title, outcome, model, command and seed; the budget, the sparsity note, audit problems and warnings."""
    lines = [f"# compress report: {report.get('method', '?')}", "",
             f"- status: **{report.get('status')}** (exit {report.get('exit_code')})",
             f"- model: `{report.get('model', {}).get('source')}`",
             f"- command: `{report.get('command')}`", f"- seed: {report.get('seed')}", ""]
    budget = budget_line(report)
    if budget:
        lines += [budget[0].upper() + budget[1:] + ".", ""]
    if report.get("sparsity"):
        lines += [SPARSE_NOTE, ""]
    lines += [f"- **audit:** {problem}" for problem in report.get("audit", {}).get("problems", [])]
    return lines + [f"- **warning:** {warning}" for warning in report.get("warnings", [])]


def _accuracy(report: dict[str, Any]) -> list[str]:
    """Every task's metric before and after, with the BatchNorm re-estimation when there was one."""
    if not report.get("tasks"):
        return []
    lines = ["## Accuracy", ""]
    recal = report.get("bn_recalibration") or {}
    if recal.get("layers"):
        lines += [(f"After compression, BatchNorm statistics of {recal['layers']} layers were re-estimated on the "
                   f"calibration split (test accuracy before that: {num(recal.get('accuracy_before'))})."), ""]
    return lines + _table(("task", "metric", "before", "after compression", "after fine-tuning"), task_rows(report))


def _size(report: dict[str, Any]) -> list[str]:
    """Parameters, MACs and bytes before and after."""
    return ["## Size and cost", ""] + _table(("quantity", "before", "after", "after/before"), model_rows(report))


def _latency(report: dict[str, Any]) -> list[str]:
    """The latency table, and what the mobile proxy measures when it was timed."""
    lines = []
    if report.get("latency"):
        lines += ["## Latency (interleaved with the original in one process)", ""]
        lines += _table(("backend", "batch", "threads", "runs", "p50 ms", "p90 ms", "original p50 ms",
                         "speed-up [p25, p75]"), latency_rows(report))
    if any(r.get("proxy") or r.get("backend") == "mobile-proxy" for r in report.get("latency", [])):
        lines += [PROXY_NOTE, ""]
    return lines


def _layer_latency(report: dict[str, Any]) -> list[str]:
    """Where the time goes: the slowest layers per backend, batch and model, when they were profiled."""
    entries = report.get("layer_latency") or []
    if not entries:
        return []
    lines = ["## Where the time goes (per layer)", "", LAYER_LATENCY_NOTE, ""]
    for entry in entries:
        columns, rows = layer_latency_rows(entry)
        lines += [f"### {layer_latency_title(report, entry)}", ""] + _table(columns, rows)
    return lines


def _export(report: dict[str, Any]) -> list[str]:
    """The exported files and how each matched the PyTorch model."""
    if not report.get("export"):
        return []
    lines = ["## Export (each file checked against the PyTorch model)", ""]
    lines += _table(("format", "file", "bytes", "verified", "max abs error", "cosine", "top-1 agreement",
                     "test accuracy"), export_rows(report))
    return lines + [f"- {line}" for line in mobile_lines(report)] + [""]


def _finetune(report: dict[str, Any]) -> list[str]:
    """The fine-tuning settings and the loss per epoch."""
    finetune = report.get("finetune")
    if not finetune:
        return []
    cfg = finetune["config"]
    return ["## Fine-tuning", "", (f"{finetune['epochs']} epoch(s), {cfg['optimizer']}, lr {cfg['lr']}, "
                                   f"label smoothing {cfg['label_smoothing']}, "
                                   f"distillation {'on' if cfg['distill'] else 'off'}; "
                                   f"mean loss per epoch {finetune['epoch_losses']}."), ""]


def _method_sections(report: dict[str, Any]) -> list[str]:
    """The sections the compression method contributes."""
    lines = []
    for section in sections_for(report):
        lines += [f"## {section.title}", ""] + _table(section.header, section.rows)
        lines += [section.note, ""] if section.note else []
    return lines


def _layers(report: dict[str, Any]) -> list[str]:
    """The per-layer audit table, when there are layers."""
    columns, rows = layer_table(report)
    return ["## Layers", ""] + _table(columns, rows) if rows else []


def _conditions(report: dict[str, Any]) -> list[str]:
    """Machine, versions, providers and the compression step's time; ends the report with an empty line."""
    env = report.get("env", {})
    lines = ["## Conditions", "", (f"- CPU: {env.get('cpu')} ({env.get('cpu_count')} cores), "
                                   f"torch threads {env.get('threads')}, device {env.get('device')}"),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v),
             f"- ONNX Runtime providers: {', '.join(env.get('providers') or []) or '-'}"]
    seconds = report.get("timings", {}).get("compress_seconds")
    lines += [f"- compression step: {num(seconds, 3)} s"] if seconds is not None else []
    return lines + [""]
