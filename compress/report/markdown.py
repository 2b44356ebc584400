"""report.md from report.json."""

from __future__ import annotations

from typing import Any

from compress.methods.base import sections_for
from compress.report.format import (budget_line, export_rows, latency_rows, layer_table, mobile_lines, model_rows, num,
                                    task_rows)

SPARSE_NOTE = ("Unstructured sparsity makes the file smaller and can raise accuracy per byte; dense runtimes "
               "execute the same MACs, so expect size and accuracy changes only, no dense speed-up.")


PROXY_NOTE = ("The mobile proxy is a static-shape int8 (QDQ) model in ORT format for arm, run by ONNX Runtime's CPU "
              "provider on one thread of this machine: it shows how the phone build's graph behaves, not a phone's "
              "speed.")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def render_markdown(report: dict[str, Any]) -> str:
    """A human-readable report: outcome, accuracy, size and cost, latency, per-layer audit, conditions."""
    env = report.get("env", {})
    lines = [f"# compress report: {report.get('method', '?')}", "",
             f"- status: **{report.get('status')}** (exit {report.get('exit_code')})",
             f"- model: `{report.get('model', {}).get('source')}`",
             f"- command: `{report.get('command')}`", f"- seed: {report.get('seed')}", ""]
    budget = budget_line(report)
    if budget:
        lines += [budget[0].upper() + budget[1:] + ".", ""]
    if report.get("sparsity"):
        lines += [SPARSE_NOTE, ""]
    for problem in report.get("audit", {}).get("problems", []):
        lines.append(f"- **audit:** {problem}")
    for warning in report.get("warnings", []):
        lines.append(f"- **warning:** {warning}")
    if report.get("tasks"):
        lines += ["## Accuracy", ""]
        recal = report.get("bn_recalibration") or {}
        if recal.get("layers"):
            lines += [f"After compression, BatchNorm statistics of {recal['layers']} layers were re-estimated on the "
                      f"calibration split (test accuracy before that: {num(recal.get('accuracy_before'))}).", ""]
        lines += _table(("task", "metric", "before", "after compression", "after fine-tuning"), task_rows(report))
    lines += ["## Size and cost", ""] + _table(("quantity", "before", "after", "after/before"), model_rows(report))
    if report.get("latency"):
        lines += ["## Latency (interleaved with the original in one process)", ""]
        lines += _table(("backend", "batch", "threads", "runs", "p50 ms", "p90 ms", "original p50 ms",
                         "speed-up [p25, p75]"), latency_rows(report))
    if any(r.get("proxy") or r.get("backend") == "mobile-proxy" for r in report.get("latency", [])):
        lines += [PROXY_NOTE, ""]
    if report.get("export"):
        lines += ["## Export (each file checked against the PyTorch model)", ""]
        lines += _table(("format", "file", "bytes", "verified", "max abs error", "cosine", "top-1 agreement",
                         "test accuracy"), export_rows(report))
        lines += [f"- {line}" for line in mobile_lines(report)] + [""]
    finetune = report.get("finetune")
    if finetune:
        cfg = finetune["config"]
        lines += ["## Fine-tuning", "", f"{finetune['epochs']} epoch(s), {cfg['optimizer']}, lr {cfg['lr']}, "
                  f"label smoothing {cfg['label_smoothing']}, distillation {'on' if cfg['distill'] else 'off'}; "
                  f"mean loss per epoch {finetune['epoch_losses']}.", ""]
    for section in sections_for(report):
        lines += [f"## {section.title}", ""] + _table(section.header, section.rows)
        lines += [section.note, ""] if section.note else []
    columns, rows = layer_table(report)
    if rows:
        lines += ["## Layers", ""] + _table(columns, rows)
    lines += ["## Conditions", "", f"- CPU: {env.get('cpu')} ({env.get('cpu_count')} cores), "
              f"torch threads {env.get('threads')}, device {env.get('device')}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v),
              f"- ONNX Runtime providers: {', '.join(env.get('providers') or []) or '-'}"]
    seconds = report.get("timings", {}).get("compress_seconds")
    lines += [f"- compression step: {num(seconds, 3)} s"] if seconds is not None else []
    lines.append("")
    return "\n".join(lines)
