"""Which torchvision classification models each method handles (issue 14, item 8; `make bench-zoo`).

Every model of the zoo below (random weights, 10 classes) goes through `compress prune` as a user would run it,
through `compress.api.prune`: Fashion-MNIST brought to the model's input (the smallest square input a torchvision
model runs at, as `compress prune` picks it), short settings, no fine-tuning, no latency, the first 100 test
items evaluated. Each model x method runs in its own process with a time limit (default 300 s: a case that takes
longer is listed as skipped, not run to the end) and one thread. A cell is

- ok: the run finished and its audit passed (with the method's headline figure and what it left alone; PAGCP
  runs with its loss bound switched off, so that every unit it can prune loses channels),
- refused: compress stopped with its one-line usage error (exit 2),
- audit: the run finished but missed its own target (exit 6, the message),
- failed: anything else (the exception and its first line),
- skipped: over the time limit.

Random weights say nothing about accuracy; this table is about architectures. Writes reports/zoo.md and
reports/zoo.json.

    python benchmarks/bench_zoo.py [--models resnet18,...] [--methods globalmp,alds,pagcp] [--timeout 300]
        [--threads 1] [--render-only]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "reports"
MODELS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5", "mnasnet0_5", "squeezenet1_0",
          "efficientnet_b0", "regnet_y_400mf", "googlenet", "densenet121", "convnext_tiny", "swin_t", "vit_b_16")
METHODS = ("globalmp", "alds", "pagcp")
SETTINGS = {  # short settings: the point is whether the architecture goes through, not the best result
    "globalmp": {"sparsity": 0.5},
    "alds": {"keep": 0.5, "seeds": 2, "rounds": 1},
    # the bound switched off, so that every unit loses channels: the question is whether channels come out of
    # this architecture (traced, removed, rebuilt, audited), not how many should on random weights
    "pagcp": {"calibration_items": 64, "step": 0.25, "delta0": 1e6, "tau": 1e12},
}
EVAL_ITEMS = 100


def log(**fields: object) -> None:
    print(json.dumps(fields, default=str), flush=True)


# ------------------------------------------------------------------------------------------------ one case


def first_line(text: str, limit: int = 240) -> str:
    line = (str(text).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def left_alone(method: str, report: dict) -> list[dict]:
    """What the method left out, as {name, reason}: ALDS's and PAGCP's skipped layers, GlobalMP's excluded weights,
    and the PAGCP units whose pruning broke the forward pass."""
    summary = report.get("summary") or {}
    rows = summary.get("excluded") if method == "globalmp" else summary.get("skipped")
    out = [{"name": r["name"], "reason": r["reason"]} for r in rows or []]
    if method == "pagcp":
        out += [{"name": r["name"], "reason": f"pruning it breaks the forward pass ({first_line(r['error'], 160)})"
                 if not r["error"].startswith("pruning this unit") else r["error"]}
                for r in report.get("layers") or [] if r.get("error")]
    return out


def headline(method: str, report: dict) -> str:
    summary = report.get("summary") or {}
    if method == "globalmp":
        return f"sparsity {summary['achieved']:.3f} of {summary['prunable_weights']:,} weights"
    if method == "alds":
        return f"params kept {summary['keep_achieved']:.3f}, {summary['layers_decomposed']} layers decomposed"
    return f"MACs kept {summary['macs_keep']:.3f}, {summary.get('units_pruned', 0)}/{summary.get('units', 0)} units"


def run_case(model: str, method: str, threads: int) -> dict:
    """One model x method through compress.api.prune; the outcome as a JSON-able dict."""
    import torch

    torch.set_num_threads(threads)
    from compress import api
    from compress.config import ALDSConfig, GlobalMPConfig, PAGCPConfig
    from compress.errors import AuditError, CompressError, UsageError

    configs = {"globalmp": GlobalMPConfig, "alds": ALDSConfig, "pagcp": PAGCPConfig}
    cfg = configs[method](**SETTINGS[method])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
        out = Path(tmp) / "run"
        source = api.ModelSource(spec=f"torchvision:{model}", num_classes=10)
        options = api.RunOptions(out=out, data="fashion-mnist", seed=0, latency=False, eval_items=EVAL_ITEMS,
                                 command=f"compress prune --method {method} --model torchvision:{model} "
                                         "--num-classes 10 --data fashion-mnist --finetune-epochs 0")
        outcome: dict = {"model": model, "method": method}
        try:
            report = api.prune(source, cfg, options)
            outcome.update(status="ok", detail=headline(method, report), left_alone=left_alone(method, report))
        except UsageError as exc:
            outcome.update(status="refused", detail=first_line(exc))
        except AuditError as exc:
            outcome.update(status="audit", detail=first_line(exc))
        except CompressError as exc:
            outcome.update(status="failed", detail=f"exit {exc.exit_code}: {first_line(exc)}")
        except Exception as exc:  # noqa: BLE001 - the table records whatever stops a run
            where = traceback.extract_tb(exc.__traceback__)[-1]
            outcome.update(status="failed", detail=f"{type(exc).__name__}: {first_line(exc)}",
                           where=f"{Path(where.filename).name}:{where.lineno}")
        manifest = out / "manifest.json"
        if manifest.is_file():
            outcome["input_shape"] = json.loads(manifest.read_text()).get("input_shape")
    outcome["seconds"] = round(time.perf_counter() - started, 1)
    return outcome


# ------------------------------------------------------------------------------------------------ the zoo


def run_in_child(model: str, method: str, threads: int, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CI="1")
    command = [sys.executable, str(Path(__file__).resolve()), "--case", model, method, "--threads", str(threads)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"model": model, "method": method, "status": "skipped", "detail": f"over {timeout:g} s",
                "seconds": round(time.perf_counter() - started, 1)}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model": model, "method": method, "status": "failed", "detail": f"process exit {done.returncode}: "
            f"{first_line(tail)}", "seconds": round(time.perf_counter() - started, 1)}


def cell(outcome: dict | None) -> str:
    if outcome is None:
        return "-"
    status, detail = outcome["status"], outcome.get("detail", "")
    text = f"**{status}**" if status != "ok" else "ok"
    if detail:
        text += f": {detail}"
    dense = outcome.get("left_alone") or []
    if dense:
        text += f"; {len(dense)} left alone"
    return text.replace("|", "\\|")


def summary_reason(rows: list[dict]) -> str:
    """The reasons of what a run left alone, each with its count (names, shapes and group counts folded)."""
    counts: dict[str, int] = {}
    for row in rows:
        reason = row["reason"]
        if reason.startswith("coupled to "):
            reason = "coupled to one of the groups above"
        reason = re.sub(r"'[^']*' \((\w+)\)", r"its parent (\1)", reason)  # "read directly by 'a.b' (Kind)"
        reason = re.sub(r"\(\[[^\]]*\] -> \[[^\]]*\]: ", "(", reason)  # the shapes of a view
        reason = re.sub(r" \(groups=\d+\)", "", reason)
        reason = re.sub(r" \((\w+Error): .*\)$", r" (\1)", reason)
        counts[reason] = counts.get(reason, 0) + 1
    return "; ".join(f"{n} x {reason}" for reason, n in counts.items())


def render(results: list[dict], settings: dict) -> str:
    by = {(r["model"], r["method"]): r for r in results}
    models = list(dict.fromkeys(r["model"] for r in results))
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    counts = {m: sum(by.get((x, m), {}).get("status") == "ok" for x in models) for m in methods}
    lines = [
        "# Which torchvision models each method handles",
        "",
        ("Each torchvision classification model (random weights, 10 classes) through `compress prune` on "
        "Fashion-MNIST, brought to the smallest square input the model runs at; short settings, no fine-tuning, "
        f"{EVAL_ITEMS} test items, one thread, each case in its own process with a time limit. "
        "ok: finished and audited; refused: compress stopped with a one-line usage error (exit 2); audit: finished "
        "but missed its own target (exit 6); failed: anything else; skipped: over the time limit. "
        "PAGCP runs with its loss bound switched off, so that every unit it can prune loses channels. "
        "Random weights say nothing about accuracy. Generated by `make bench-zoo` (benchmarks/bench_zoo.py)."),
        "",
        "Settings: " + "; ".join(f"{m} {json.dumps(settings[m])}" for m in methods) + ".",
        "",
        "| model | input | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for model in models:
        shape = next((by[(model, m)].get("input_shape") for m in methods if by.get((model, m), {}).get("input_shape")),
                     None)
        size = "x".join(map(str, shape)) if shape else "-"
        lines.append(f"| {model} | {size} | " + " | ".join(cell(by.get((model, m))) for m in methods) + " |")
    lines += ["", "ok per method: " + ", ".join(f"{m} {counts[m]}/{len(models)}" for m in methods) + ".", "",
              "## What each run left alone", ""]
    notes = [(r["model"], r["method"], summary_reason(r["left_alone"])) for r in results if r.get("left_alone")]
    lines += [f"- {model}, {method}: {reason}" for model, method, reason in notes] or ["- nothing"]
    seconds = sum(r.get("seconds", 0) for r in results)
    lines += ["", f"Wall time of all cases: {seconds / 60:.1f} min.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model x method")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render-only", action="store_true", help="rewrite zoo.md from zoo.json")
    parser.add_argument("--merge", action="store_true", help="replace these cases in zoo.json, keep the others")
    parser.add_argument("--case", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.case:
        print(json.dumps(run_case(*args.case, args.threads), default=str), flush=True)
        return
    path = REPORTS / "zoo.json"
    if args.render_only:
        data = json.loads(path.read_text())
        (REPORTS / "zoo.md").write_text(render(data["results"], data["settings"]))
        return
    import torch

    from compress.artifact import to_json, write_atomic
    from compress.measure.conditions import environment

    torch.set_num_threads(args.threads)

    results = json.loads(path.read_text())["results"] if args.merge and path.is_file() else []
    for model in args.models.split(","):
        for method in args.methods.split(","):
            outcome = run_in_child(model, method, args.threads, args.timeout)
            log(**{k: v for k, v in outcome.items() if k != "left_alone"})
            at = next((i for i, r in enumerate(results) if (r["model"], r["method"]) == (model, method)), None)
            if at is None:
                results.append(outcome)
            else:
                results[at] = outcome
            data = {"settings": SETTINGS, "eval_items": EVAL_ITEMS, "timeout_s": args.timeout,
                    "threads": args.threads, "env": environment(), "results": results}
            write_atomic(path, to_json(data))  # after every case, so a long run can be read while it goes
            write_atomic(REPORTS / "zoo.md", render(results, SETTINGS))


if __name__ == "__main__":
    main()
