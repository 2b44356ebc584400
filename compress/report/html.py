"""report.html from report.json: one self-contained page with inline PNG plots; nothing here computes a measurement."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from html import escape
from typing import TYPE_CHECKING, Any

from compress.methods.base import sections_for
from compress.report.format import (
    backend_label,
    budget_line,
    bytes_label,
    export_rows,
    latency_rows,
    layer_kind,
    layer_latency_rows,
    layer_latency_title,
    layer_table,
    mobile_lines,
    model_rows,
    num,
    task_rows,
)
from compress.report.markdown import LAYER_LATENCY_NOTE, SPARSE_NOTE

if TYPE_CHECKING:  # matplotlib is imported on first use: the CLI starts without it
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Series = tuple[str, Sequence[float | None], str]  # (legend label, one value per group, colour)
BEFORE, AFTER, TUNED, ACCENT = "#8c959f", "#d4750b", "#0969da", "#cf222e"
LEGEND = {"fontsize": 8, "loc": "lower right", "bbox_to_anchor": (1.0, 1.0), "ncols": 4, "frameon": False}  # above
STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;margin:0;background:#f6f8fa}
main{max-width:1040px;margin:0 auto;padding:24px 28px;background:#fff}h1{font-size:26px;margin:0 0 8px}
h2{font-size:19px;margin:30px 0 10px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
h3{font-size:15px;margin:20px 0 6px}
code{font:13px ui-monospace,SFMono-Regular,Menlo,monospace;background:#f6f8fa;padding:1px 4px;overflow-wrap:anywhere}
.scroll{overflow-x:auto;margin:8px 0}table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:right}th{background:#f6f8fa;text-align:center}
td{white-space:nowrap}.nw{white-space:nowrap}
td:first-child,td.wrap{text-align:left;white-space:normal;overflow-wrap:anywhere;min-width:9em;max-width:22em}
td.c{text-align:center}td.details{min-width:16em}tr:nth-child(even) td{background:#fbfcfd}
.badge{display:inline-block;padding:1px 9px;border-radius:10px;color:#fff;font-weight:600;font-size:13px}
.ok{background:#1a7f37}.bad{background:#cf222e}
.problems{border-left:4px solid #cf222e;background:#fff1f0;padding:6px 12px;margin:10px 0}
.note{color:#59636e;font-size:13px}dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:0}
dt{color:#59636e}dd{margin:0}img{max-width:100%;height:auto;display:block;margin:8px 0}
"""


def _e(value: Any) -> str:
    """HTML-escaped text of any value."""
    return escape(str(value), quote=True)


def _t(text: Any) -> str:
    """Text safe for matplotlib (no mathtext from `$`)."""
    return str(text).replace("$", r"\$")


def _short(name: str, width: int = 48) -> str:
    """A name cut to `width` characters in the middle, keeping its start (block index) and its end (the leaf)."""
    head = (width - 1) * 2 // 5
    return name if len(name) <= width else name[:head] + "…" + name[-(width - 1 - head):]


def _g(value: float | None) -> str:
    """A plot annotation: 4 significant digits."""
    return "" if value is None else f"{value:.4g}"


def _figure(width: float, height: float, cols: int = 1) -> tuple[Figure, list[Axes]]:
    """A pyplot-free figure (thread-safe, nothing global) with `cols` side-by-side axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, cols, squeeze=False)[0]
    return fig, list(axes)


def _img(fig: Figure, alt: str) -> str:
    """The figure as an inline base64 PNG <img>, displayed at 100 px per inch."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    width = round(fig.get_figwidth() * 100)
    return f'<img alt="{_e(alt)}" width="{width}" src="data:image/png;base64,{data}">'


def _hbars(ax: Axes, labels: Sequence[str], series: Sequence[Series], xlabel: str,
           fmt: Callable[[float], str] = _g, xerr: Sequence[tuple[float, float]] | None = None) -> None:
    """Grouped horizontal bars, one group per label (top to bottom), each bar annotated with `fmt`."""
    series = [s for s in series if any(v is not None for v in s[1])]
    height = 0.8 / max(len(series), 1)
    for i, (name, values, colour) in enumerate(series):
        at = [(g, v) for g, v in enumerate(values) if v is not None]
        ys = [g - 0.4 + height * (i + 0.5) for g, _ in at]
        err = None if xerr is None else [[xerr[g][0] for g, _ in at], [xerr[g][1] for g, _ in at]]
        bars = ax.barh(ys, [v for _, v in at], height=height, color=colour, label=_t(name), xerr=err,
                       error_kw={"ecolor": "#24292f", "capsize": 3, "lw": 1})
        ax.bar_label(bars, labels=[_t(fmt(v)) for _, v in at], padding=4, fontsize=8)
    ax.set_yticks(range(len(labels)), [_t(_short(x)) for x in labels], fontsize=9 if len(labels) <= 40 else 8)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.margins(x=0.22)
    ax.set_xlim(left=0)
    ax.set_xlabel(_t(xlabel))
    ax.grid(axis="x", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    if len(series) > 1:
        ax.legend(**LEGEND)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], raw: bool = False) -> str:
    """An HTML table in a horizontally scrolling box; cells are text (escaped here) or, if `raw`, `<td>` markup."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(c if raw else f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _section(key: str, title: str, body: str) -> str:
    """A titled page section with an anchor id."""
    return f'<section id="{key}"><h2>{_e(title)}</h2>{body}</section>'


def _badge(ok: bool, good: str = "ok", bad: str = "FAILED") -> str:
    """A green or red pill."""
    return f'<span class="badge {"ok" if ok else "bad"}">{_e(good if ok else bad)}</span>'


def _header(report: dict[str, Any]) -> str:
    """Method, outcome, model, command, seed, budget and audit problems."""
    status, code = str(report.get("status", "?")), report.get("exit_code")
    words = " ".join(f'<span class="nw">{_e(w)}</span>' for w in str(report.get("command", "-")).split(" "))
    items = [("status", _badge(status == "ok" and code in (0, None), status, status) + f" exit {_e(code)}"),
             ("model", f"<code>{_e(report.get('model', {}).get('source', '-'))}</code>"),
             ("command", f"<code>{words}</code>"), ("seed", _e(report.get("seed", "-")))]
    if report.get("model", {}).get("baseline_source"):
        items.insert(2, ("baseline", f"<code>{_e(report['model']['baseline_source'])}</code>"))
    items += [("warning", _e(w)) for w in report.get("warnings", [])]
    if budget_line(report):
        items.append(("budget", _e(budget_line(report))))
    html = f"<h1>compress report: {_e(report.get('method', '?'))}</h1><dl>"
    html += "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"
    if report.get("sparsity"):
        html += f'<p class="note">{_e(SPARSE_NOTE)}</p>'
    problems = report.get("audit", {}).get("problems", [])
    if problems:
        html += '<div class="problems"><b>audit problems</b><ul>' + "".join(f"<li>{_e(p)}</li>" for p in problems)
        html += "</ul></div>"
    return f'<header id="summary">{html}</header>'


def _tasks(report: dict[str, Any]) -> str:
    """Per-task table and one panel of before / after compression / after fine-tuning bars per task."""
    if not report.get("tasks"):
        return ""
    tasks = {n: t for n, t in report.get("tasks", {}).items() if any(
        t.get(k) is not None for k in ("before", "after_compression", "after_finetune"))}
    body = _table(("task", "metric", "before", "after compression", "after fine-tuning"), task_rows(report))
    recal = report.get("bn_recalibration") or {}
    if recal.get("layers"):
        body += (f'<p class="note">BatchNorm statistics of {_e(recal["layers"])} layers were re-estimated after '
                 f'compression (test metric before that: {_e(num(recal.get("accuracy_before")))}).</p>')
    if tasks:
        fig, axes = _figure(min(3.4 * len(tasks), 10.0), 3.0, len(tasks))
        for ax, (name, t) in zip(axes, tasks.items()):
            keys = ("before", "after_compression", "after_finetune")
            bars = ax.bar(("before", "after\ncompression", "after\nfine-tuning"),
                          [t.get(k) or 0 for k in keys], color=(BEFORE, AFTER, TUNED))
            ax.bar_label(bars, labels=[_g(t.get(k)) or "n/a" for k in keys], fontsize=8, padding=2)
            arrow = "↑ higher is better" if t.get("higher_is_better", True) else "↓ lower is better"
            ax.set_ylabel(_t(f"{t.get('metric', 'metric')} ({t.get('split', 'test')}) {arrow}"), fontsize=9)
            ax.set_title(_t(name), fontsize=10)
            ax.margins(y=0.15)
            ax.tick_params(labelsize=8)
            ax.spines[["top", "right"]].set_visible(False)
        body += _img(fig, "metric per task before and after compression")
    return _section("accuracy", "Accuracy per task", body)


def _layer_chart(report: dict[str, Any]) -> Figure | None:
    """Sparsity, rank/groups with parameters, or kept channels per layer, one bar group per layer."""
    kind = layer_kind(report)
    if not kind:
        return None
    key = {"pruning": "weights", "lowrank": "rank", "channels": "channels_before"}[kind]
    rows = [r for r in report["layers"] if key in r]
    names, cols = [r["name"] for r in rows], 2 if kind == "lowrank" else 1
    per_row = (0.32 if len(rows) <= 40 else 0.22) * (1.6 if kind != "pruning" else 1.0)
    fig, axes = _figure(10.0, 1.2 + per_row * len(rows), cols)
    if kind == "pruning":
        _hbars(axes[0], names, [("sparsity", [100 * r["sparsity"] for r in rows], AFTER)], "sparsity per layer (%)",
               lambda v: f"{v:.1f}%")
        axes[0].set_xlim(0, 112)
        achieved = (report.get("sparsity") or {}).get("achieved")
        if achieved is not None:
            axes[0].axvline(100 * achieved, color=ACCENT, ls="--", lw=1, label=f"overall {100 * achieved:.1f}%")
            axes[0].legend(**LEGEND)
    elif kind == "lowrank":
        _hbars(axes[0], names, [("params before", [r.get("params_before") for r in rows], BEFORE),
                                ("params after", [r.get("params_after") for r in rows], AFTER)],
               "parameters per layer", num)
        _hbars(axes[1], names, [("rank j", [r.get("rank") for r in rows], TUNED),
                                ("groups k", [r.get("groups") for r in rows], AFTER)],
               "rank j and groups k (none: kept dense)", num)
        axes[1].set_yticklabels([])
    else:
        _hbars(axes[0], names, [("channels before", [r["channels_before"] for r in rows], BEFORE),
                                ("channels after", [r["channels_after"] for r in rows], AFTER)], "channels", num)
    return fig


def _layers(report: dict[str, Any]) -> str:
    """The per-layer chart and audit table; empty when the run has no per-layer rows."""
    columns, rows = layer_table(report)
    fig = _layer_chart(report)
    if not rows and fig is None:
        return ""
    return _section("layers", "Layers", (_img(fig, "per-layer chart") if fig else "") + _table(columns, rows))


def _size(report: dict[str, Any]) -> str:
    """Bytes per file format before and after, and the parameter / MAC table."""
    model = report.get("model", {})
    before, after = model.get("before", {}).get("bytes", {}), model.get("after", {}).get("bytes", {})
    formats = list(dict.fromkeys([*before, *after]))
    if not formats and not model.get("after"):
        return ""
    body = ""
    if formats:  # a training run has only `after`
        fig, (ax,) = _figure(10.0, 1.0 + 0.5 * len(formats))
        _hbars(ax, formats, [("before", [before.get(f) for f in formats], BEFORE),
                             ("after", [after.get(f) for f in formats], AFTER)], "file size (bytes)", bytes_label)
        ax.xaxis.set_major_formatter(lambda v, _: f"{v:,.0f}")
        body += _img(fig, "file size per format, before and after")
    return _section("size", "Size by format", body + _table(("quantity", "before", "after", "after/before"),
                                                                model_rows(report)))


def _latency(report: dict[str, Any]) -> str:
    """Speed-up against the original per (backend, batch) with its p25-p75 spread, and all latency rows."""
    rows = report.get("latency") or []
    if not rows:
        return ""
    labels = [f"{backend_label(r)} · batch {r['batch']}" for r in rows]
    speedups = [r.get("speedup") for r in rows]
    errors = [(max(s - r["speedup_spread"][0], 0.0), max(r["speedup_spread"][1] - s, 0.0))
              if s is not None and r.get("speedup_spread") else (0.0, 0.0) for s, r in zip(speedups, rows)]
    fig, (ax,) = _figure(10.0, 1.3 + 0.42 * len(rows))
    _hbars(ax, labels, [("speed-up", speedups, TUNED)],
           "speed-up vs the original (median of paired ratios; bars: p25-p75; > 1 is faster)", lambda v: f"{v:.2f}x", errors)
    ax.axvline(1.0, color="#24292f", lw=1, label="1.0x (no change)")
    before, after = report.get("model", {}).get("before", {}), report.get("model", {}).get("after", {})
    if before.get("macs") and after.get("macs"):
        macs = before["macs"] / after["macs"]
        ax.axvline(macs, color=ACCENT, ls="--", lw=1, label=f"dense MACs before/after {macs:.2f}x")
        ax.set_xlim(right=max(ax.get_xlim()[1], macs * 1.15))
    ax.legend(**LEGEND)
    table = _table(("backend", "batch", "threads", "runs", "p50 ms", "p90 ms", "original p50 ms",
                    "speed-up [p25, p75]"), latency_rows(report))
    return _section("latency", "Latency against the original", _img(fig, "speed-up per backend") + table
                    + '<p class="note">Measured interleaved with the original in one process; absolute times are '
                    'informational, the ratio is the result. "(proxy)" marks a stand-in for the device itself.</p>')


PANELS = 2  # per-layer latency charts side by side in one image


def _layer_latency_chart(entries: Sequence[dict[str, Any]]) -> Figure:
    """One panel per entry (a batch size): each shown layer's share of the profiled time beside its MACs share."""
    rows = max(len(entry["layers"]) + 2 for entry in entries)
    fig, axes = _figure(10.0, 1.2 + 0.34 * rows, len(entries))
    for ax, entry in zip(axes, entries):
        other, rest = entry["other"], entry["unattributed"]
        shown = [*entry["layers"], *([{"name": f"everything else ({other['layers']})", **other}]
                                     if other["layers"] else []), {"name": "unattributed", **rest}]
        _hbars(ax, [r["name"] for r in shown], [("time", [100 * r["time_share"] for r in shown], AFTER),
                                               ("MACs", [100 * r["macs_share"] for r in shown], BEFORE)],
               f"batch {entry['batch']}: share of time and of MACs (%)", lambda v: f"{v:.1f}")
    return fig


def _layer_latency(report: dict[str, Any]) -> str:
    """Where the time goes: per backend a chart of the model's slowest layers, then per batch the tables of the
    model and of the original."""
    entries = report.get("layer_latency") or []
    if not entries:
        return ""
    body = f'<p class="note">{_e(LAYER_LATENCY_NOTE)}</p>'
    for backend in dict.fromkeys(entry["backend"] for entry in entries):
        mine = [entry for entry in entries if entry["backend"] == backend]
        body += f"<h3>{_e(backend_label(mine[0]))}</h3>"
        candidates = [entry for entry in mine if entry.get("model") == "candidate"]
        for i in range(0, len(candidates), PANELS):
            body += _img(_layer_latency_chart(candidates[i:i + PANELS]), f"time and MACs share per layer on {backend}")
        for entry in mine:
            columns, rows = layer_latency_rows(entry)
            body += f'<p class="nw">{_e(layer_latency_title(report, entry))}</p>' + _table(columns, rows)
    return _section("layer-latency", "Where the time goes (per layer)", body)


def _value(value: Any, nested: bool = False) -> str:
    """A compact text of a nested value: `k: v; k: (k: v, k: v)` for dicts, comma-joined lists."""
    if isinstance(value, dict):
        text = ("; ", ", ")[nested].join(f"{k}: {_value(v, True)}" for k, v in value.items())
        return f"({text})" if nested else text
    if isinstance(value, list | tuple):
        return ", ".join(_value(v, True) for v in value)
    return f"{value:.4g}" if isinstance(value, float) else num(value)


def _export(report: dict[str, Any]) -> str:
    """One row per exported format with its ok/FAILED badge, parity, and every other key under details."""
    exports = report.get("export") or {}
    if not exports:
        return ""
    shown = ("path", "bytes", "ok", "parity", "proxy", "test_accuracy")
    rows = []
    for (fmt, e), row in zip(exports.items(), export_rows(report)):
        parity = {k: v for k, v in (e.get("parity") or {}).items() if k not in ("max_abs", "cosine", "top1_agreement")}
        extra = {**{k: v for k, v in e.items() if k not in shown and k != "mobile_usability"},
                 **({"parity": parity} if parity else {})}
        mobile = mobile_lines({"export": {"onnx": e}}) if "mobile_usability" in e else []
        rows.append([f"<td>{_e(backend_label({**e, 'backend': fmt}))}</td>", f'<td class="wrap">{_e(row[1])}</td>',
                     f"<td>{_e(bytes_label(e.get('bytes')))}</td>", f'<td class="c">{_badge(bool(e.get("ok")))}</td>',
                     *(f"<td>{_e(c)}</td>" for c in row[4:]),
                     '<td class="wrap details">' + "<br>".join(
                         [_e(line) for line in mobile] + [_e(f"{k}: {_value(v)}") for k, v in extra.items()])
                     + "</td>"])
    head = ("format", "file", "bytes", "verified", "max abs error", "cosine", "top-1 agreement", "test accuracy",
            "details")
    return _section("export", "Export (each file checked against the PyTorch model)", _table(head, rows, raw=True))


def _conditions(report: dict[str, Any]) -> str:
    """Machine, threads, device, versions, fine-tuning and timings."""
    env, items = report.get("env", {}), []
    if env:
        items += [("CPU", f"{env.get('cpu', '-')} ({env.get('cpu_count', '-')} cores)"),
                  ("torch threads", env.get("threads", "-")), ("device", env.get("device", "-"))]
        items += [(k, env[k]) for k in ("cuda", "platform") if env.get(k)]
        if env.get("providers"):
            items.append(("ONNX Runtime providers", ", ".join(env["providers"])))
        items.append(("versions", ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)))
    finetune = report.get("finetune")
    if finetune:
        items.append(("fine-tuning", f"{finetune.get('epochs')} epoch(s); {_value(finetune.get('config', {}))}; "
                                     f"mean loss per epoch {_value(finetune.get('epoch_losses', []))}"))
    items += [(k.replace("_", " "), num(v, 3)) for k, v in (report.get("timings") or {}).items()]
    if not items:
        return ""
    return _section("conditions", "Conditions", "<dl>" + "".join(
        f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items) + "</dl>")


def _method_sections(report: dict[str, Any]) -> str:
    """The tables the method that wrote the report adds (e.g. PAGCP's loss bound and rounds)."""
    return "".join(_section(f"method-{i}", s.title, _table(s.header, s.rows) + (f"<p>{_e(s.note)}</p>" if s.note
                                                                                else ""))
                   for i, s in enumerate(sections_for(report)))


def render_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page (inline CSS and PNG plots, no external resources) for one report.json."""
    parts = [_header(report), _tasks(report), _method_sections(report), _layers(report), _size(report), _latency(report),
             _layer_latency(report), _export(report),
             _conditions(report)]
    title = _e(f"compress report: {report.get('method', '?')}")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>'
            f"<style>{STYLE}</style></head>\n<body><main>\n" + "\n".join(p for p in parts if p)
            + "\n</main></body></html>\n")
