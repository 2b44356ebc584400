"""`compress check`: budgets on a run's size, cost, accuracy and speed, against a baseline; the CI gate (exit 3).

Pure functions and small frozen dataclasses; nothing here prints (the CLI renders with compress.report.budgets).

Runs. CURRENT and BASELINE are each a run directory (its files checked against manifest.json first, exit 5 when
one differs, unless --no-verify), its report.json, or a model spec that `compress.check_models` measures (params,
MACs, bytes, each task on the test split). Figures are read from report.json: the model's `after` sizes (`before`
when a run has no `after`), each task's latest figure (after_finetune, else after_compression, else before) and the
latency rows. The baseline's figures are those of `--baseline`; without it the run's own origin (`model.before`,
each task's `before`) is the baseline when the report records one (a prune run does), else there is none and only
absolute limits can be checked. When the budgets name latency and both models are at hand (a run directory with its
weights, or a spec, on each side), check times them itself, interleaved, on the backends and batches named.

Budgets file (YAML, loaded safely: a tag such as `!!python/object` is refused)::

    budgets:
      params_total:          {error: "+0%"}            # parameters, all of them
      params_nonzero:        {warn: "+1%", error: "+2%"}
      macs:                  {error: "1.05x"}          # dense MACs
      macs_effective:        {error: "60k"}            # MACs x layer density
      bytes.sparse:          {warn: "+2%", error: "200kB"}
      task.classification:   {warn: "-0.3pt", error: "-1pt"}
      latency.pytorch-cpu.b1: {warn: "0.95x", error: "0.8x", strict: false}

Keys: `params_total`, `params_nonzero`, `macs`, `macs_effective`; `bytes.FORMAT` for every format in the report's
`model.after.bytes` (safetensors_dense, safetensors_sparse, onnx, ort, onnx_int8, ort_int8; the aliases `dense`,
`sparse` and `int8` name the first, second and fifth); `task.NAME` for every task in `tasks`;
`latency.BACKEND.bBATCH` for every row of `latency` (e.g. `latency.onnxruntime-cpu.b32`). Each budget has `warn`
and/or `error` (a limit) and, for latency only, `strict` (default false).

Limits, by the direction of the quantity (sizes, MACs and a pixel error may not rise above the limit; an accuracy,
an IoU and a speed ratio may not fall below it):

- absolute: `91.5`, `1.2M` (k, M, G for counts), `200kB` (B, kB, MB, GB, KiB, MiB, GiB for bytes);
- relative to the baseline: `+2%` / `-1%` (a signed percentage), `1.05x` (a factor), `-0.5pt` / `+3k` / `+512B`
  (a signed difference in the quantity's own unit: points for a task, percentage points for an accuracy).
- latency: a speed ratio (`0.95x`, `0.95`, or `-5%` for 0.95x), the run's recorded speed-up against the model it
  was timed interleaved with (its `speedup`, p25-p75 `speedup_spread`), or, when both models are at hand, CURRENT
  timed by check beside BASELINE.

Rules: sizes, parameters and MACs are deterministic: beyond `error` errs, beyond `warn` warns. A task is the same.
Latency is noisy: a limit inside the p25-p75 range of the paired ratios warns; the whole range beyond a limit warns,
and errs only for the `error` limit of a budget with `strict: true`. A file error (YAML, unknown key, wrong unit,
a figure the runs do not have, a malformed limit) is one line naming the file, line, key and closest valid name
(exit 2).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml

from compress.errors import UsageError, closest
from compress.manifest import WEIGHTS_FILE, verify_files
from compress.report.schema import SCHEMA_VERSION

MARKER = "<!-- compress-check -->"
MODEL_KEYS = ("params_total", "params_nonzero", "macs", "macs_effective")
BYTE_ALIASES = {"dense": "safetensors_dense", "sparse": "safetensors_sparse", "int8": "onnx_int8"}
TASK_STAGES = ("after_finetune", "after_compression", "before")
BUDGET_FIELDS = ("warn", "error", "strict")
COUNT_UNITS = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}
BYTE_UNITS = {"": 1.0, "B": 1.0, "kB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 1024.0, "MiB": 1024.0 ** 2,
              "GiB": 1024.0 ** 3}
RELATIVE_UNITS = ("%", "x")
LIMIT_RE = re.compile(r"^\s*([+-])?\s*((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z%]*)\s*$")
Kind = Literal["count", "bytes", "task", "latency"]
Status = Literal["ok", "warn", "error"]


@dataclasses.dataclass(frozen=True)
class Quantity:
    """One figure a budget can be set on: the current run's value and the baseline's (None: no baseline)."""

    key: str
    kind: Kind
    unit: str
    higher_is_better: bool
    current: float
    baseline: float | None
    spread: tuple[float, float] | None = None  # latency: p25-p75 of the paired ratios


@dataclasses.dataclass(frozen=True)
class Limit:
    """A limit as written: `absolute` (in the quantity's unit), `delta`, `percent` or `factor` of the baseline."""

    text: str
    form: Literal["absolute", "delta", "percent", "factor"]
    value: float

    def resolve(self, quantity: Quantity) -> float:
        """The limit in the quantity's unit (latency limits are speed ratios and need no baseline)."""
        if quantity.kind == "latency":
            return {"percent": 1 + self.value / 100, "delta": 1 + self.value}.get(self.form, self.value)
        if self.form == "absolute":
            return self.value
        base = quantity.baseline
        assert base is not None  # parse_budgets refuses relative limits without a baseline
        return {"delta": base + self.value, "percent": base * (1 + self.value / 100)}.get(self.form,
                                                                                          base * self.value)


@dataclasses.dataclass(frozen=True)
class Budget:
    """One entry of a budgets file: its key, its line (1-based), its limits and, for latency, `strict`."""

    key: str
    line: int
    warn: Limit | None
    error: Limit | None
    strict: bool = False


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A budget checked: the quantity, the limits resolved, the status and why."""

    budget: Budget
    quantity: Quantity
    warn_limit: float | None
    error_limit: float | None
    status: Status
    note: str

    def to_dict(self) -> dict[str, Any]:
        """The result row of `--json`."""
        q, b = self.quantity, self.budget
        return {"budget": b.key, "kind": q.kind, "unit": q.unit, "higher_is_better": q.higher_is_better,
                "baseline": q.baseline, "current": q.current, "change": change(q),
                "spread": list(q.spread) if q.spread else None,
                "limits": {"warn": b.warn.text if b.warn else None, "error": b.error.text if b.error else None},
                "warn_limit": self.warn_limit, "error_limit": self.error_limit, "strict": b.strict,
                "status": self.status, "note": self.note}


# --- runs ----------------------------------------------------------------------------------------------------------

def report_path(where: str | Path) -> Path:
    """report.json of a run directory, or the report.json given."""
    path = Path(where)
    found = path / "report.json" if path.is_dir() else path
    if not found.is_file():
        raise UsageError(f"{where}: no report.json there; give a compress run directory or its report.json")
    return found


def load_report(where: str | Path) -> dict[str, Any]:
    """The report.json of a run (exit 2 when it is missing or not a run's report)."""
    path = report_path(where)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not readable JSON ({exc}); give a compress run's report.json") from None
    if not isinstance(report, dict) or not isinstance(report.get("model"), dict):
        raise UsageError(f"{path}: not a compress run's report.json (no `model`); give a run directory")
    return report


@dataclasses.dataclass(frozen=True)
class Side:
    """CURRENT or BASELINE as given: a run directory, a report.json, or a model spec that check measures itself."""

    text: str
    kind: Literal["run", "report", "spec"]
    report: dict[str, Any] | None  # None for a spec until it is measured
    has_model: bool                # a model can be loaded: a run directory with weights, or a spec


def side_of(text: str, *, verify: bool = True) -> Side:
    """Read a side: a run directory (its files checked against manifest.json unless `verify` is False), a report.json,
    or, for anything that is not a path, a model spec (`rescnn`, `torchvision:NAME`, `pkg.mod:fn`)."""
    path = Path(text)
    if path.is_dir():
        has_model = (path / WEIGHTS_FILE).is_file()
        if verify and has_model:
            verify_files(path)  # a tampered run is refused (exit 5) before any figure of it is believed
        return Side(text, "run", load_report(path), has_model)
    if path.is_file():
        return Side(text, "report", load_report(path), False)
    if text.endswith(".json") or "/" in text or text.startswith("."):
        raise UsageError(f"{text}: no such run directory or report.json; give a compress run directory, its "
                         "report.json, or a model spec (rescnn, torchvision:NAME, pkg.module:function)")
    return Side(text, "spec", None, True)


def budget_keys(path: Path) -> list[str]:
    """The budget keys a budgets file names, read leniently (the full parse, with its errors, comes later)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    budgets = data.get("budgets") if isinstance(data, dict) else None
    return [str(k) for k in budgets] if isinstance(budgets, dict) else []


def latency_requests(path: Path) -> list[tuple[str, int]]:
    """(backend, batch) of each latency budget in a budgets file, in file order."""
    found = []
    for key in budget_keys(path):
        match = re.fullmatch(r"latency\.([a-z0-9_-]+)\.b(\d+)", key)
        if match:
            found.append((match.group(1), int(match.group(2))))
    return found


def model_figures(report: dict[str, Any], role: str) -> dict[str, Any]:
    """The model's `after` figures (`before` for a run without `after`), or `before` for role 'origin'."""
    model = report.get("model", {})
    if role == "origin":
        return model.get("before") or {}
    return model.get("after") or model.get("before") or {}


def latest_task_figure(row: dict[str, Any]) -> float | None:
    """A task's latest recorded figure: after fine-tuning, else after compression, else before."""
    return next((float(row[s]) for s in TASK_STAGES if row.get(s) is not None), None)


def _size_quantities(now: dict[str, Any], base: dict[str, Any] | None) -> list[Quantity]:
    """Parameters, MACs and bytes of every format the current run has."""
    found = [Quantity(k, "count", "", False, float(now[k]), _num((base or {}).get(k)))
             for k in MODEL_KEYS if now.get(k) is not None]
    base_bytes = (base or {}).get("bytes") or {}
    return found + [Quantity(f"bytes.{fmt}", "bytes", "B", False, float(n), _num(base_bytes.get(fmt)))
                    for fmt, n in (now.get("bytes") or {}).items() if n is not None]


def _task_quantities(now: dict[str, Any], base: dict[str, Any] | None, origin: bool) -> list[Quantity]:
    """Each task's latest figure, beside the baseline run's latest (or the run's own `before`)."""
    found = []
    for name, row in (now or {}).items():
        value = latest_task_figure(row)
        if value is None:
            continue
        base_row = (base or {}).get(name) or {}
        base_value = _num(base_row.get("before")) if origin else latest_task_figure(base_row)
        unit = "pt" if row.get("metric") == "accuracy" else row.get("metric", "")
        found.append(Quantity(f"task.{name}", "task", unit, bool(row.get("higher_is_better", True)), value,
                              base_value))
    return found


def _latency_quantities(rows: Iterable[dict[str, Any]]) -> list[Quantity]:
    """Each latency row with a speed-up: a speed ratio against the model it was timed with."""
    found = []
    for row in rows:
        if row.get("speedup") is None:
            continue
        spread = row.get("speedup_spread")
        found.append(Quantity(f"latency.{row['backend']}.b{row['batch']}", "latency", "x", True,
                              float(row["speedup"]), 1.0, (float(spread[0]), float(spread[1])) if spread else None))
    return found


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def baseline_kind(current: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    """'run' (--baseline given), 'origin' (the run's own model.before) or 'none'."""
    if baseline is not None:
        return "run"
    return "origin" if current.get("model", {}).get("before") else "none"


def quantities(current: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Quantity]:
    """Every figure of the current run a budget can name, by key, with its baseline's figure."""
    kind = baseline_kind(current, baseline)
    base_model = (model_figures(baseline, "after") if baseline is not None
                  else model_figures(current, "origin") if kind == "origin" else None)
    base_tasks = baseline.get("tasks") if baseline is not None else current.get("tasks") if kind == "origin" else None
    found = (_size_quantities(model_figures(current, "after"), base_model)
             + _task_quantities(current.get("tasks") or {}, base_tasks, origin=kind == "origin")
             + _latency_quantities(current.get("latency") or []))
    return {q.key: q for q in found}


# --- budgets files -------------------------------------------------------------------------------------------------

class _Where:
    """Where in a budgets file a problem is: the file and line, for one-line errors."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, node: yaml.Node | None, key: str, problem: str) -> UsageError:
        """`FILE:LINE: KEY: problem` as a UsageError (exit 2)."""
        line = node.start_mark.line + 1 if node is not None else 1
        return UsageError(f"{self.file}:{line}: {key}: {problem}")


def _compose(text: str, where: _Where) -> yaml.Node | None:
    """The YAML node tree (line numbers kept), refusing syntax errors and any tag beyond plain YAML."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{where.file}:{line}: not valid YAML ({problem}); fix the syntax") from None
    _refuse_tags(root, where, "budgets")
    return root


PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq")}


def _refuse_tags(node: yaml.Node | None, where: _Where, key: str) -> None:
    """Safe YAML only: any tag (`!!python/object`, `!custom`...) beyond strings, numbers, booleans, maps, lists."""
    if node is None:
        return
    if node.tag not in PLAIN_TAGS:
        raise where.fail(node, key, f"YAML tag {node.tag.replace('tag:yaml.org,2002:', '!!')} is refused (safe "
                                    "YAML only); write the limit as a plain string such as \"+2%\"")
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            _refuse_tags(k, where, key)
            _refuse_tags(v, where, k.value if isinstance(k, yaml.ScalarNode) else key)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_tags(item, where, key)


def _mapping(node: yaml.Node | None, where: _Where, key: str, fix: str) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
    """A mapping's (key node, value node) pairs; exit 2 on a non-mapping or a repeated key."""
    if not isinstance(node, yaml.MappingNode):
        raise where.fail(node, key, f"must be a mapping; {fix}")
    seen: set[str] = set()
    for k, _ in node.value:
        if k.value in seen:
            raise where.fail(k, k.value, "appears twice; keep one")
        seen.add(k.value)
    return node.value


def _scalar(node: yaml.Node) -> Any:
    """A plain scalar's value (str, int, float, bool or None), as safe_load would build it."""
    return yaml.SafeLoader("").construct_object(node) if isinstance(node, yaml.ScalarNode) else node


def key_family(key: str) -> str | None:
    """The family of a budget key by its grammar (`bytes`, `task`, `latency` or the key), None if none fits."""
    if key in MODEL_KEYS:
        return key
    head, _, rest = key.partition(".")
    if head in ("bytes", "task") and rest:
        return head
    if head == "latency" and re.fullmatch(r"[a-z0-9_-]+\.b\d+", rest):
        return head
    return None


def canonical(key: str) -> str:
    """`bytes.sparse` -> `bytes.safetensors_sparse` (the aliases); other keys unchanged."""
    head, _, rest = key.partition(".")
    return f"bytes.{BYTE_ALIASES[rest]}" if head == "bytes" and rest in BYTE_ALIASES else key


def parse_budgets(text: str, file: str, known: dict[str, Quantity]) -> tuple[Budget, ...]:
    """The budgets of a file's text, checked against the runs' figures (`known`); exit 2 naming file, line, key."""
    where = _Where(file)
    root = _compose(text, where)
    top = _mapping(root, where, "(top level)", "write `budgets:` then one `KEY: {warn: ..., error: ...}` a line")
    for k, _ in top:
        if k.value != "budgets":
            raise where.fail(k, k.value, "unknown top-level key" + closest(k.value, ["budgets"]))
    node = next((v for k, v in top if k.value == "budgets"), None)
    if node is None:
        raise where.fail(root, "budgets", "missing; write `budgets:` then one `KEY: {error: LIMIT}` a line")
    valid = [*MODEL_KEYS, *known, *(f"bytes.{a}" for a, full in BYTE_ALIASES.items() if f"bytes.{full}" in known)]
    return tuple(_budget(k, v, where, known, valid) for k, v in _mapping(node, where, "budgets", "one KEY a line"))


def _budget(key_node: yaml.ScalarNode, node: yaml.Node, where: _Where, known: dict[str, Quantity],
            valid: list[str]) -> Budget:
    """One budget entry, its key checked against the grammar and the runs' figures."""
    key = str(key_node.value)
    if key_family(key) is None:
        raise where.fail(key_node, key, "unknown budget key" + closest(key, valid))
    quantity = known.get(canonical(key))
    if quantity is None:
        raise where.fail(key_node, key, "the runs have no such figure (measure it first with prune --measure or "
                         "compress measure, or remove the budget)"
                         + closest(key, [k for k in valid if k.split(".")[0] == key.split(".")[0]] or valid))
    fields: dict[str, Any] = {}
    for k, v in _mapping(node, where, key, "write {warn: LIMIT, error: LIMIT}"):
        if k.value not in BUDGET_FIELDS or (k.value == "strict" and quantity.kind != "latency"):
            allowed = BUDGET_FIELDS if quantity.kind == "latency" else BUDGET_FIELDS[:2]
            raise where.fail(k, f"{key}.{k.value}", "unknown field" + closest(str(k.value), allowed))
        fields[k.value] = (k, _scalar(v))
    if "warn" not in fields and "error" not in fields:
        raise where.fail(key_node, key, "has no limit; give warn and/or error")
    strict = fields.get("strict", (None, False))
    if not isinstance(strict[1], bool):
        raise where.fail(strict[0], f"{key}.strict", f"must be true or false, not {strict[1]!r}")
    warn, error = (_limit(fields[f], where, f"{key}.{f}", quantity) if f in fields else None
                   for f in ("warn", "error"))
    return Budget(canonical(key), key_node.start_mark.line + 1, warn, error, strict[1])


def units_for(kind: Kind) -> dict[str, float]:
    """The units a limit may carry for a kind of quantity, with their multipliers (`%`, `x`, `pt` are relative)."""
    absolute = {"count": COUNT_UNITS, "bytes": BYTE_UNITS, "task": {"": 1.0, "pt": 1.0},
                "latency": {"": 1.0}}[kind]
    return {**absolute, "%": 1.0, "x": 1.0}


FORMS = "an absolute value (91.5, 1.2M, 200kB), +2%, 1.05x or -0.5pt"


def _limit(field: tuple[yaml.Node, Any], where: _Where, label: str, quantity: Quantity) -> Limit:
    """A limit's text parsed for its quantity: wrong units and malformed limits exit 2 naming file, line, key."""
    node, value = field
    text = str(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    match = LIMIT_RE.match(text) if text is not None else None
    if match is None:
        raise where.fail(node, label, f"malformed limit {value!r}; write {FORMS}")
    sign, number, unit = match.groups()
    units = units_for(quantity.kind)
    if unit not in units:
        what = {"count": "a count (k, M, G)", "bytes": "bytes (B, kB, MB, KiB...)", "task": "a task metric (pt)",
                "latency": "a speed ratio (x)"}[quantity.kind]
        named = [u for u in units if u]
        raise where.fail(node, label, f"unit {unit!r} does not fit {what}; use one of {', '.join(named)}"
                         + closest(unit, named).replace("; valid", "; units"))
    magnitude = float(number) * units[unit] * (-1.0 if sign == "-" else 1.0)
    form = _form(sign, unit, where, node, label, text or "")
    if form != "absolute" and quantity.kind != "latency" and quantity.baseline is None:
        raise where.fail(node, label, f"{text} is relative but there is no baseline figure; pass --baseline RUN "
                         "or write an absolute limit")
    if (form == "factor" and magnitude <= 0) or not math.isfinite(magnitude):
        raise where.fail(node, label, f"malformed limit {text!r}; a factor must be positive, e.g. 1.05x")
    return Limit(text or "", form, magnitude)


def _form(sign: str | None, unit: str, where: _Where, node: yaml.Node, label: str,
          text: str) -> Literal["absolute", "delta", "percent", "factor"]:
    """Which form a parsed limit has; `2%` and `0.5pt` without a sign, or `+1.05x`, are malformed."""
    if unit == "x":
        if sign:
            raise where.fail(node, label, f"malformed limit {text!r}; a factor has no sign, e.g. 1.05x")
        return "factor"
    if unit in ("%", "pt") and not sign:
        raise where.fail(node, label, f"malformed limit {text!r}; a relative limit has a sign, e.g. +{text.strip()} "
                         f"or -{text.strip()}")
    if unit == "%":
        return "percent"
    return "delta" if sign else "absolute"


def read_budgets(path: Path, known: dict[str, Quantity]) -> tuple[Budget, ...]:
    """The budgets of a file (exit 2 when it is missing or wrong)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the budgets file ({exc.strerror}); give an existing YAML file, or "
                         "write one with --write-budgets") from None
    return parse_budgets(text, str(path), known)


# --- checking ------------------------------------------------------------------------------------------------------

def beyond(value: float, limit: float, higher_is_better: bool) -> bool:
    """Whether `value` is on the wrong side of `limit` (below it when higher is better, else above it)."""
    return value < limit if higher_is_better else value > limit


def check_budget(budget: Budget, quantity: Quantity) -> Outcome:
    """One budget checked: hard for sizes, MACs and tasks, by the p25-p75 rule for latency."""
    warn = budget.warn.resolve(quantity) if budget.warn else None
    error = budget.error.resolve(quantity) if budget.error else None
    if quantity.kind == "latency":
        status, note = _latency_status(quantity, warn, error, budget.strict)
    elif error is not None and beyond(quantity.current, error, quantity.higher_is_better):
        status, note = "error", f"{_side(quantity)} the error limit {fmt_value(error, quantity)}"
    elif warn is not None and beyond(quantity.current, warn, quantity.higher_is_better):
        status, note = "warn", f"{_side(quantity)} the warn limit {fmt_value(warn, quantity)}"
    else:
        status, note = "ok", ""
    return Outcome(budget, quantity, warn, error, status, note)


def _side(quantity: Quantity) -> str:
    return "below" if quantity.higher_is_better else "above"


def _latency_status(q: Quantity, warn: float | None, error: float | None, strict: bool) -> tuple[Status, str]:
    """Latency: the whole p25-p75 range beyond `error` errs under strict (else warns); any part beyond a limit warns."""
    low, high = q.spread or (q.current, q.current)
    spread = f"p25-p75 [{low:.3g}x, {high:.3g}x]"
    for name, limit in (("error", error), ("warn", warn)):
        if limit is None:
            continue
        if beyond(high, limit, True):
            if name == "error" and strict:
                return "error", f"{spread} lies wholly below the error limit {limit:.3g}x"
            return "warn", f"{spread} lies wholly below the {name} limit {limit:.3g}x" + (
                " (errs only with strict: true)" if name == "error" else "")
        if beyond(low, limit, True):
            return "warn", f"{spread} straddles the {name} limit {limit:.3g}x (within noise)"
    return "ok", ""


def change(q: Quantity) -> float | None:
    """Tasks: current - baseline (metric units); latency: speed ratio - 1; others: current / baseline - 1."""
    if q.kind == "latency":
        return q.current - 1.0
    if q.baseline is None:
        return None
    if q.kind == "task":
        return q.current - q.baseline
    return q.current / q.baseline - 1.0 if q.baseline else None


def fmt_value(value: float | None, q: Quantity) -> str:
    """A figure in its quantity's unit: `17,032 B`, `3,778`, `14.76`, `0.95x`."""
    if value is None:
        return "-"
    if q.kind == "latency":
        return f"{value:.3g}x"
    if q.kind == "task":
        return f"{value:.4g}"
    text = f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"
    return f"{text} B" if q.kind == "bytes" else text


def check_runs(current: dict[str, Any], baseline: dict[str, Any] | None, budgets_file: Path, *,
               sources: tuple[str, str | None], warn_as_error: bool = False,
               command: str = "compress check") -> dict[str, Any]:
    """Load the budgets against the runs' figures, check each, and return the versioned check result."""
    known = quantities(current, baseline)
    outcomes = [check_budget(b, known[b.key]) for b in read_budgets(budgets_file, known)]
    return check_result(outcomes, current=sources[0], baseline=sources[1], kind=baseline_kind(current, baseline),
                        budgets_file=str(budgets_file), warn_as_error=warn_as_error, command=command)


def check_result(outcomes: list[Outcome], *, current: str, baseline: str | None, kind: str, budgets_file: str,
                 warn_as_error: bool, command: str) -> dict[str, Any]:
    """The check result `--json` prints: status budget_failed and exit 3 on any error (or warning, with
    --warn-as-error)."""
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "warn", "error")}
    failed = counts["error"] > 0 or (warn_as_error and counts["warn"] > 0)
    return {"schema_version": SCHEMA_VERSION, "status": "budget_failed" if failed else "ok",
            "exit_code": 3 if failed else 0, "command": command, "method": "check", "current": current,
            "baseline": baseline, "baseline_kind": kind, "budgets_file": budgets_file,
            "warn_as_error": warn_as_error, "counts": counts, "results": [o.to_dict() for o in outcomes]}


def failure_message(result: dict[str, Any]) -> str:
    """The one line a failed check ends with."""
    counts, failed = result["counts"], [r for r in result["results"] if r["status"] != "ok"]
    worst = [r["budget"] for r in failed if r["status"] == "error"] or [r["budget"] for r in failed]
    why = f"{counts['error']} error(s), {counts['warn']} warning(s)" + (
        " (--warn-as-error)" if result["warn_as_error"] and counts["warn"] else "")
    return (f"budgets exceeded: {why}: {', '.join(worst)}; fix the regression, or change the limit in "
            f"{result['budgets_file']} if it is intended")


# --- outputs for CI ------------------------------------------------------------------------------------------------

def benchmark_entries(result: dict[str, Any]) -> list[dict[str, Any]]:
    """github-action-benchmark's customSmallerIsBetter list: one entry per budget (higher-is-better figures
    inverted: 100 - accuracy, 1 - IoU, time ratio = 1 / speed-up)."""
    return [_benchmark_entry(row) for row in result["results"]]


def _benchmark_entry(row: dict[str, Any]) -> dict[str, Any]:
    """One result row as a smaller-is-better benchmark entry."""
    name, value, unit, spread = row["budget"], float(row["current"]), row["unit"] or "count", row.get("spread")
    rng = None
    if row["kind"] == "latency":
        name, unit, value = f"{name} time ratio", "x", 1.0 / value
        if spread:
            rng = f"± {abs(1.0 / spread[0] - 1.0 / spread[1]) / 2:.3g}"
    elif row["kind"] == "task" and row["higher_is_better"]:
        top = 100.0 if row["unit"] == "pt" else 1.0
        name, value = f"{name} ({top:g} - {'accuracy' if top == 100.0 else row['unit']})", top - value
        unit = "%" if top == 100.0 else row["unit"]
    limits = row["limits"]
    extra = (f"budget {row['budget']}: warn {limits['warn'] or '-'}, error {limits['error'] or '-'}; "
             f"status {row['status']}; baseline {row['baseline']}; current {row['current']}")
    entry: dict[str, Any] = {"name": name, "unit": unit, "value": value}
    if rng:
        entry["range"] = rng
    entry["extra"] = extra
    return entry


def starting_budgets(report: dict[str, Any], source: str) -> str:
    """A commented budgets file from a run's own figures: sizes and MACs held exactly, each task allowed a small
    drop, latency loose and warn-only; it loads back and passes on that run."""
    lines = [f"# Budgets written by `compress check --write-budgets` from {source}.",
             "# Limits are absolute, from the run's own figures: sizes, parameters and MACs may not grow (they are",
             "# deterministic); each task may lose a little; latency only warns (noisy; set strict: true to fail).",
             "# Relative forms work too against --baseline (or the run's origin): \"+2%\", \"1.05x\", \"-0.5pt\".",
             "budgets:"]
    for q in quantities(report, None).values():
        lines += [f"  # {q.key}: {fmt_value(q.current, q)} in this run", f"  {q.key}: {_starting_limits(q)}"]
    return "\n".join(lines) + "\n"


TASK_MARGINS = {"pt": (0.5, 1.0)}  # accuracy: warn at -0.5, err at -1 percentage point


def _starting_limits(q: Quantity) -> str:
    """The flow-style limits of one budget in a starting file."""
    if q.kind == "latency":
        return f'{{warn: "{math.floor(q.current * 0.8 * 100) / 100:g}x", strict: false}}'
    if q.kind != "task":
        unit = "B" if q.kind == "bytes" else ""
        return f'{{error: "{q.current:.0f}{unit}"}}'
    warn_margin, error_margin = TASK_MARGINS.get(q.unit, (0.02 * abs(q.current), 0.05 * abs(q.current)))
    sign = -1.0 if q.higher_is_better else 1.0
    round_to = math.floor if q.higher_is_better else math.ceil
    warn, error = (round_to((q.current + sign * m) * 1e4) / 1e4 for m in (warn_margin, error_margin))
    return f'{{warn: "{warn:g}", error: "{error:g}"}}'
