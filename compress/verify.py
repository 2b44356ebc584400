"""`compress verify RUN`: a run's files against manifest.json, then its recorded test metrics reproduced.

1. Files: every file manifest.json's `outputs` lists must match its sha256 (model.safetensors and arch.json; runs
   written before arch.json was hashed list only the weights). report.json, report.md, report.html,
   recipe.resolved.yaml and exported files are written after the manifest and are not hashed, and the manifest
   cannot hash itself. A mismatch raises UnsafeCheckpointError (exit 5) naming the file.
2. Model: rebuilt weights-only from arch.json and model.safetensors (compress.models.loader.load_artifact).
3. Metrics: the model is evaluated on the test split of the run's data set, loaded as the Load stage loads it (the
   manifest's data set and seed, shaped for the model's first layer, on the run's default device), and each
   task's figure must match the one report.json recorded for the saved model: `after_finetune`, else
   `after_compression`, else `before` (the latest figure a run recorded is that of the model it saved). Allowed
   difference (`TOLERANCES`): 0.01 points of accuracy (percent), 1e-4 of IoU or of pixel error; report.json rounds
   figures to 4 decimals, well inside these. A metric that does not reproduce, or test data whose fingerprint
   differs from the manifest's, raises BudgetError (exit 3) carrying the verify report.

measure and export runs hold no model files and cannot be verified (exit 2, as for any plain directory).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from compress import artifact
from compress.data import Splits
from compress.errors import BudgetError, UsageError
from compress.finetune import Evaluation, default_device, evaluate
from compress.models.loader import load_artifact, require_run_files
from compress.pipeline import cap_test_items, load_data_for, seed_everything
from compress.report.schema import SCHEMA_VERSION

TOLERANCES: dict[str, float] = {"accuracy": 0.01, "iou": 1e-4, "pixel_error": 1e-4}  # largest |measured - recorded|
STAGES = ("after_finetune", "after_compression", "before")  # the first one recorded is the saved model's figure
VERIFY = "verify"  # the report's `method`
RESTORE = "restore the run from where it was written, or rerun the command in its manifest.json"


@dataclass(frozen=True)
class MetricCheck:
    """One task's recorded figure beside the one measured now."""

    task: str
    metric: str
    stage: str
    recorded: float
    measured: float | None
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.measured is not None and abs(self.measured - self.recorded) <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        measured = None if self.measured is None else round(self.measured, 6)
        return {**asdict(self), "measured": measured, "ok": self.ok}

    def describe(self) -> str:
        """One line: the metric, the recorded and the measured value."""
        measured = "nothing" if self.measured is None else f"{self.measured:.4f}"
        return (f"{self.task} {self.metric} ({self.stage}) does not reproduce: recorded {self.recorded:.4f}, "
                f"measured {measured} (tolerance {self.tolerance:g})")


def recorded_report(run_dir: Path) -> dict[str, Any]:
    """The run's report.json (exit 2 when it is missing or not JSON)."""
    path = run_dir / "report.json"
    if not path.is_file():
        raise UsageError(f"{run_dir} has no report.json, so there are no metrics to reproduce; give the --out "
                         "directory of a prune, finetune or train run")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}); rerun the command that wrote it") from None
    tasks = report.get("tasks") if isinstance(report, dict) else None
    if not isinstance(report, dict) or not isinstance(tasks or {}, dict) or \
            not all(isinstance(row, dict) for row in (tasks or {}).values()):
        raise UsageError(f"{path} is not a compress report (its tasks are not a table); rerun the command that "
                         "wrote it")
    return report


def metric_checks(tasks: dict[str, Any], measured: Evaluation) -> list[MetricCheck]:
    """One check per recorded task: its latest recorded figure against the measured one."""
    checks = []
    for name, row in tasks.items():
        stage = next((s for s in STAGES if isinstance(row.get(s), int | float)), None)
        if stage is None:
            continue
        metric = row.get("metric", "accuracy")
        checks.append(MetricCheck(name, metric, stage, float(row[stage]), measured.metrics.get(name),
                                  TOLERANCES.get(metric, 1e-4)))
    return checks


def data_check(splits: Splits, manifest: dict[str, Any]) -> dict[str, Any]:
    """The test data against the manifest's fingerprint (ok when the manifest records none)."""
    recorded = manifest.get("data_fingerprint")
    return {"name": splits.name, "seed": manifest.get("seed", 0), "fingerprint": splits.fingerprint,
            "recorded_fingerprint": recorded, "ok": recorded in (None, splits.fingerprint)}


def verify_report(run_dir: Path, command: str, files: dict[str, str], data: dict[str, Any],
                  checks: list[MetricCheck]) -> dict[str, Any]:
    """The versioned verify report (`--json`); status verify_failed and exit 3 when anything did not reproduce."""
    ok = data["ok"] and all(c.ok for c in checks)
    unhashed = sorted(p.name for p in run_dir.iterdir() if p.name not in files and p.name != artifact.MANIFEST_FILE)
    return {"schema_version": SCHEMA_VERSION, "status": "ok" if ok else "verify_failed",
            "exit_code": 0 if ok else BudgetError.exit_code, "command": command, "method": VERIFY,
            "run": str(run_dir), "files": [{"name": n, "sha256": d, "ok": True} for n, d in files.items()],
            "unhashed": unhashed, "data": data, "tolerances": dict(TOLERANCES),
            "metrics": [c.to_dict() for c in checks]}


def failure(report: dict[str, Any], checks: list[MetricCheck]) -> BudgetError | None:
    """The exit-3 error naming what did not reproduce, or None."""
    data = report["data"]
    if not data["ok"]:
        return BudgetError(f"the test data of {data['name']} differ from the run's (fingerprint "
                           f"{data['fingerprint']} here, {data['recorded_fingerprint']} recorded), so its metrics "
                           "cannot be reproduced; restore the run's data set", report)
    failed = [c for c in checks if not c.ok]
    if not failed:
        return None
    more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
    return BudgetError(f"{failed[0].describe()}{more}; the weights, the code or the environment differ from the "
                       "run's: rerun the command in its manifest.json", report)


def verify_run(run_dir: Path, *, command: str = "compress verify") -> dict[str, Any]:
    """Check the files (exit 5), rebuild the model weights-only, re-evaluate it on the test split (exit 3 when a
    metric does not reproduce); returns the verify report."""
    run_dir = Path(run_dir)
    require_run_files(run_dir)  # exit 2 for a plain directory
    files = artifact.verify_files(run_dir, RESTORE)  # exit 5 naming a file that differs
    loaded = load_artifact(run_dir, verify=False)
    report = recorded_report(run_dir)
    manifest = loaded.manifest
    seed = int(manifest.get("seed", 0))
    seed_everything(seed)
    splits = cap_test_items(load_data_for(loaded, manifest.get("dataset"), seed), manifest.get("eval_items"))
    measured = evaluate(loaded.model.to(default_device()), splits.test)
    checks = metric_checks(report.get("tasks") or {}, measured)
    result = verify_report(run_dir, command, files, data_check(splits, manifest), checks)
    error = failure(result, checks)
    if error is not None:
        raise error
    return result
