"""A sweep's run folder and outputs: the folder (``run.json``, ``base.json``, ``sweep.jsonl``), reading a
finished or unfinished sweep back, and the table, summary and heatmaps (see :mod:`rys_forge.research.sweep`
for the columns). :func:`report_unfinished` writes those outputs for the windows an interrupted sweep has
finished, without a model: a cut sweep (its windows run in a seeded random order) is an unbiased sample.
A sweep with damped visits also gets per-scale heatmaps and the best-scale table (``best_scale.csv`` / ``.md``);
:func:`read_sweep` returns its plain rows (alpha 1) unless asked for every scale.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from rys_forge.artifacts import RUN_FILE, read_json, rys_forge_version
from rys_forge.errors import UsageError
from rys_forge.evaluate import compare_runs, lm_eval_version
from rys_forge.files import json_safe
from rys_forge.plan import WINDOW_CONVENTION
from rys_forge.research.sweep_rows import (Visits, accuracy_mean_delta, base_summary, best_scales, damped_gains, parse_alphas,
                                          reported_tasks, sweep_configs)
from rys_forge.runs import RunFolder
from rys_forge.stats import SINGLE_TASK_MIN_Z, SINGLE_TASK_SHARE, is_finite_number

__all__ = [
    "BASE_FILE", "BEST_SCALE_FILE", "POSITIVE_P", "POSITIVE_RULES", "POSITIVE_Z", "RACE_COLUMNS", "SWEEP_FORMAT", "headline_outcome",
    "is_plain_row", "outcome_columns", "SWEEP_LOG", "SweepFolder", "SweepResult", "read_stored_base", "read_sweep",
    "report_unfinished", "restore_record", "summarise", "write_outputs",
]

SWEEP_LOG = "sweep.jsonl"
BASE_FILE = "base.json"
#: The best-scale table of a sweep with damped visits (CSV; the same table as markdown beside it).
BEST_SCALE_FILE = "best_scale.csv"
SWEEP_FORMAT = 1
#: combined z above which a window counts as benchmark-positive.
POSITIVE_Z = 1.96
#: per-task paired-test p-value below which a positive delta counts.
POSITIVE_P = 0.05
#: How a window counts as benchmark-positive, per outcome (a task's delta: ``delta > 0`` and paired p < POSITIVE_P).
POSITIVE_RULES = {"combined_z": f"combined_z > {POSITIVE_Z}",
                  "race_estimate": "the race's lower bound of the mean paired difference > 0 at some look"}
#: Per-window columns of a raced sweep (rys_forge.research.race.race_record).
RACE_COLUMNS = ("race_reason", "race_look", "race_items", "race_items_full", "race_estimate", "race_lower",
                "race_upper", "race_positive")


@dataclass
class SweepResult:
    """Rows of a sweep (one per window and repeat count, in evaluation order) and its summary.

    Attributes:
        rows: ``window``, ``i``, ``j``, ``width``, ``repeats``, ``tasks`` ({task: {metric, base, rys, delta,
            base_stderr, rys_stderr, p_value, test, n, z, items}}), ``combined_z``, ``mean_delta``,
            ``single_task_verdict``, ``dominant_task``, ``dominant_share``, ``seconds``, and flat copies
            ``delta:<task>``, ``z:<task>``, ``p:<task>``, ``rys:<task>``.
        base: per task: ``metric``, ``filter``, ``value``, ``stderr``, ``n``, ``doc_ids``, ``items``.
        summary: settings, base scores, metrics used, repeats fits, timings.
        out_dir: the run folder (None: in memory only).
        fits: per window, the repeats fits (:func:`rys_forge.research.sweep_rows.repeat_fits`).
        missing: windows planned but not evaluated (an unfinished sweep's report; grey in the heatmaps).
        scales: with damped visits, per window the best scale beside the plain repeat
            (:func:`rys_forge.research.sweep_rows.best_scales`); empty otherwise.
    """

    rows: list[dict[str, Any]]
    base: dict[str, Any]
    summary: dict[str, Any]
    out_dir: Path | None = None
    fits: dict[str, Any] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    scales: list[dict[str, Any]] = field(default_factory=list)



class SweepFolder(RunFolder):
    """rank's RunFolder with the log in ``sweep.jsonl`` and records keyed by (window, repeats), a later
    record replacing an earlier one."""

    stem, key, merge = "sweep", "key", False



def _task_slug(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", task)



def read_stored_base(folder: SweepFolder | None) -> dict[str, Any] | None:
    """The base run stored in the run folder by an earlier session, if any."""
    base_file = folder.path / BASE_FILE if folder else None
    if base_file is None or not base_file.exists():
        return None
    try:
        return json.loads(base_file.read_text())["run"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _brief(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    keys = ("window", "repeats", "combined_z", "mean_delta", "single_task_verdict", "dominant_task")
    scale = {k: row[k] for k in ("alpha", "substeps") if k in row}  # damped rows only
    return {**{k: row.get(k) for k in keys}, **scale, "delta": {t: v["delta"] for t, v in row["tasks"].items()}}


_DEFINITIONS = {
    "delta": "rys - base of the task's metric",
    "p": "paired test on per-item results (exact McNemar for 0/1 items, else paired bootstrap)",
    "z": "delta / sqrt(se_base^2 + se_rys^2) (lm-eval stderrs; floored at 1/(2n) when both are 0);"
    " negated for lower-is-better metrics, so positive z = better",
    "combined_z": "Stouffer: sum of per-task z / sqrt(#tasks)",
    "single_task_verdict": f"one task's |z| > {SINGLE_TASK_SHARE:.0%} of |sum z| and >= {SINGLE_TASK_MIN_Z}"
    " (with >= 2 tasks): the gain rests on one task (calibration shift?)",
    "repeats_fit": "Perf(n) = Perf(1) + a(n-1) - b(n-1)^2, n = visits, Perf(1) = base; least squares",
}


def summarise(model_type: str | None, info: dict[str, Any], num_layers: int, settings: dict[str, Any], base: dict[str, Any],
             rows: list[dict[str, Any]], fits: dict[str, Any], timings: dict[str, Any],
             scales: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """``summary.json``: settings, base scores, metrics used, definitions, best window, fits, timings, and with
    damped visits ``scales`` (:func:`~rys_forge.research.sweep_rows.damped_gains` of the best-scale table)."""
    per_window = [r["seconds"] for r in rows if is_finite_number(r.get("seconds"))]
    ranked = (r for r in rows if is_finite_number(r.get("combined_z")))
    extra = {"scales": damped_gains(scales, list(base))} if scales else {}
    return {
        "rys_forge_sweep": SWEEP_FORMAT,
        "model": info,
        "architecture": {"model_type": model_type, "num_layers": num_layers},
        "convention": WINDOW_CONVENTION.replace("L", str(num_layers)),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "tasks": list(base),
        "metrics": {t: base[t]["metric"] + ("" if base[t]["filter"] in ("none", None) else f",{base[t]['filter']}") for t in base},
        "metric_rule": "acc_norm where the task has it, else acc, else the task's first metric",
        "base": {t: {k: v for k, v in b.items() if k not in ("items", "doc_ids")} for t, b in base.items()},
        "definitions": dict(_DEFINITIONS),
        "windows": len({r["window"] for r in rows}),
        "rows": len(rows),
        "best": _brief(max(ranked, key=lambda r: r["combined_z"], default=None)),
        "single_task_flags": sum(bool(r.get("single_task_verdict")) for r in rows),
        "repeats_fits": fits,
        **extra,
        "timings": {
            **{k: v for k, v in timings.items() if k != "total_s"},
            "per_window_s": {r["key"]: r.get("seconds") for r in rows},
            "mean_per_window_s": float(np.mean(per_window)) if per_window else math.nan,
            "total_s": timings["total_s"],
        },
        "versions": {"lm_eval": lm_eval_version(), "rys_forge": rys_forge_version()},
    }




def restore_record(record: dict[str, Any]) -> dict[str, Any]:
    """A logged record with JSON nulls of float fields back to NaN (in-memory rows use NaN); `mean_delta`
    recomputed from its tasks (`accuracy_mean_delta`: records logged before it skipped perplexities had them in)."""
    row = dict(record)
    for key in ("combined_z", "mean_delta", "dominant_share", "seconds"):
        if row.get(key) is None:
            row[key] = math.nan
    if isinstance(row.get("tasks"), dict) and row["tasks"] and all(isinstance(v, dict) for v in row["tasks"].values()):
        row["mean_delta"] = accuracy_mean_delta(row["tasks"])
    return row


def read_sweep(path: str | Path, all_scales: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and summary of a sweep folder: ``sweep.json`` when the sweep finished, else the rows of
    ``sweep.jsonl`` (an interrupted sweep) and an empty summary; or of a sweep's ``.csv`` table
    (:func:`read_sweep_table`). Only the plain repeats' rows (alpha 1) unless ``all_scales``: what ``validate``,
    ``calibrate`` and ``learn-score`` judge a ranking against.

    Raises:
        UsageError: not a sweep folder or table, or a file of it that is unreadable, not JSON or of the wrong shape.
    """
    folder = Path(path)
    if folder.suffix == ".csv" and not folder.is_dir():
        return read_sweep_table(folder, all_scales)
    table = folder / "sweep.json"
    summary_file = folder / "summary.json"
    summary = read_json(summary_file, "sweep summary") if summary_file.is_file() else {}
    if table.is_file():
        rows = read_json(table, "sweep table")
        rows = rows.get("rows") if isinstance(rows, dict) else None
    elif any(folder.glob("sweep*.jsonl")):
        rows = list(SweepFolder.records(folder).values())
    else:
        raise UsageError(f"{folder} is not a sweep run folder (no sweep.json or {SWEEP_LOG})")
    if not isinstance(summary, dict) or not isinstance(rows, list) or not all(
            isinstance(r, dict) and isinstance(r.get("window"), str) for r in rows):
        raise UsageError(f"{folder} is not a readable sweep run folder: sweep.json or summary.json has the wrong shape")
    return [restore_record(r) for r in rows if all_scales or is_plain_row(r)], summary


def is_plain_row(row: dict[str, Any]) -> bool:
    """Whether a sweep row (from ``sweep.json``, the log or ``sweep.csv``) is a plain repeat: no ``alpha``, or 1."""
    alpha = row.get("alpha")
    return not is_finite_number(alpha) or float(alpha) == 1.0  # absent, empty or malformed: before scales existed


def _parse_cell(text: str) -> Any:
    """A CSV cell as written by the sweep: empty -> NaN, True/False -> bool, numbers -> int/float."""
    if text in ("", "nan", "NaN", "True", "False"):
        return math.nan if text not in ("True", "False") else text == "True"
    try:
        return int(text) if text.lstrip("-").isdigit() else float(text)
    except ValueError:
        return text


def read_sweep_table(path: str | Path, all_scales: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and summary of a sweep's flat CSV table (``sweep.csv`` or a committed copy such as
    ``docs/results/sweep_<model>_h100.csv``): the summary is ``<stem>_summary.json`` beside it, else
    ``summary.json``, else ``{}``; each row's ``tasks`` entry (``delta``, ``z``, ``p_value``, ``rys``, and
    ``higher_is_better`` from the summary's ``base``) is rebuilt from the ``delta:/z:/p:/rys:<task>`` columns so
    validate's outcome rules apply (per-item results are not in the CSV). Only the plain repeats' rows unless
    ``all_scales``. Raises UsageError on a bad file.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"sweep table not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [{k: (v if k in ("window", "dominant_task") else _parse_cell(v)) for k, v in r.items()}
                    for r in csv.DictReader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"cannot read sweep table {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if rows and "window" not in rows[0]:
        raise UsageError(f"{path} is not a sweep table (no window column)")
    rows = [r for r in rows if all_scales or is_plain_row(r)]  # a damped sweep's table: the plain repeats
    summary_file = next((f for f in (path.with_name(f"{path.stem}_summary.json"), path.with_name("summary.json")) if f.exists()), None)
    summary = read_json(summary_file, "sweep summary") if summary_file else {}
    if not isinstance(summary, dict):
        raise UsageError(f"sweep summary {summary_file} has the wrong shape (not a JSON object)")
    tasks = list(summary.get("tasks") or dict.fromkeys(k.split(":", 1)[1] for k in (rows[0] if rows else {}) if k.startswith("delta:")))
    base = summary.get("base") or {}
    for row in rows:
        row["tasks"] = {t: {"delta": row.get(f"delta:{t}"), "z": row.get(f"z:{t}"), "p_value": row.get(f"p:{t}"),
                            "rys": row.get(f"rys:{t}"), "higher_is_better": (base.get(t) or {}).get("higher_is_better")}
                        for t in tasks}
    return rows, {**summary, "tasks": tasks}


def write_outputs(result: SweepResult, num_layers: int) -> None:
    """Table (JSON, CSV), summary and figures into the run folder, each written atomically (a failed write
    is one line naming the file: `RunFolder.write`)."""
    assert result.out_dir is not None
    out = SweepFolder(result.out_dir)
    tasks = list(result.summary["tasks"])
    out.write("sweep.json", json.dumps(json_safe({"rows": result.rows}), indent=1))
    scale_columns = [k for k in ("alpha", "substeps") if any(k in r for r in result.rows)]  # damped sweeps only
    columns = ["window", "i", "j", "width", "repeats", *scale_columns, "combined_z", "mean_delta",
               "single_task_verdict", "dominant_task", "dominant_share", "seconds"]
    if any("race_reason" in r for r in result.rows):
        columns += list(RACE_COLUMNS)
    for task in tasks:
        columns += [f"rys:{task}", f"delta:{task}", f"z:{task}", f"p:{task}"]
    defaults = {"alpha": 1.0} if scale_columns else {}  # a plain row of a damped sweep: alpha 1
    out.write("sweep.csv", _csv_text(columns, [{**defaults, **row} for row in result.rows]))
    out.write("summary.json", json.dumps(json_safe(result.summary), indent=2))
    if result.scales:
        _write_best_scales(result.scales, tasks, out)
    _figures(result, num_layers, tasks, out)


def _cell(value: Any) -> Any:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _csv_text(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return buffer.getvalue()


def _write_best_scales(table: Sequence[dict[str, Any]], tasks: Sequence[str], out: RunFolder) -> None:
    """``best_scale.csv`` and ``best_scale.md``: per window, the scale with the best combined z beside alpha 1."""
    columns = ["window", "i", "j", "repeats", "scales", "best", "best_alpha", "best_repeats", "best_substeps",
               "best_combined_z", "plain_combined_z", "gain_z"]
    for task in tasks:
        columns += [f"delta:{task}", f"p:{task}", f"damped_higher:{task}", f"damped_better:{task}"]
    out.write(BEST_SCALE_FILE, _csv_text(columns, table))

    def number(value: Any) -> str:
        return f"{value:+.3f}" if is_finite_number(value) else "-"

    def p_text(value: Any) -> str:
        return f"{value:.3g}" if is_finite_number(value) else "-"

    head = ["window", "plain", "best scale", "best z", "plain z", "gain z"]
    head += [f"{t}: best - plain (p)" for t in tasks]
    lines = ["# Best residual scale per window", "",
             "Per window: the scale of the repeated visits with the best combined z, beside the plain repeat"
             " (alpha 1) on the same items; per task, the best scale's value minus the plain one's and their paired"
             " test (exact McNemar for 0/1 items, else a paired bootstrap of the mean).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in table:
        cells = [e["window"], f"x{e['repeats']}", e["best"] or "-", number(e["best_combined_z"]),
                 number(e["plain_combined_z"]), number(e["gain_z"])]
        cells += [f"{number(e[f'delta:{t}'])} ({p_text(e[f'p:{t}'])})" for t in tasks]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    out.write(Path(BEST_SCALE_FILE).with_suffix(".md").name, "\n".join(lines) + "\n")


def _figures(result: SweepResult, num_layers: int, tasks: Sequence[str], out: RunFolder) -> None:
    """Per configuration of the visits (repeat count, scale): a delta heatmap per task and the combined-z heatmap;
    with several plain repeat counts, the fits."""
    from rys_forge.plots import repeat_fit_curves, window_heatmap

    name = (result.summary.get("model") or {}).get("source", "")
    configs = list(dict.fromkeys(Visits.of(r) for r in result.rows))
    for visits in sorted(configs, key=lambda v: (v.substeps or 0, v.repeats, -v.alpha)):
        rows = [r for r in result.rows if Visits.of(r) == visits]
        suffix = visits.suffix
        dropped = [r["window"] for r in rows if r.get("race_reason") == "dropped"]
        missing = sorted({*result.missing, *(r["window"] for r in rows if r.get("race_reason") == "budget")})
        marks = {"centre": 0.0, "missing": missing, "crossed": dropped}
        race_note = f"; x = dropped by the race ({len(dropped)})" if dropped else ""
        for task in tasks:
            title = f"{name}: {task} {result.summary['metrics'].get(task, '')} delta (rys - base), {visits.label}{race_note}"
            out.write(f"heatmap_delta_{_task_slug(task)}{suffix}.png", lambda path, rows=rows, task=task, title=title:
                      window_heatmap(rows, f"delta:{task}", num_layers, path, title, **marks))
        flagged = [r["window"] for r in rows if r.get("single_task_verdict")]
        title = f"{name}: combined z (Stouffer over {len(tasks)} tasks), {visits.label}; o = single-task{race_note}"
        out.write(f"heatmap_combined_z{suffix}.png", lambda path, rows=rows, title=title, flagged=flagged:
                  window_heatmap(rows, "combined_z", num_layers, path, title, highlight=flagged, **marks))
    if len({v.repeats for v in configs if v.plain}) > 1:
        out.write("repeats_fit.png", lambda path: repeat_fit_curves(result.fits, ["mean_delta", *tasks], path))


def report_unfinished(out_dir: str | Path) -> SweepResult:
    """Table, summary (``complete``: false, windows done / planned) and heatmaps of the windows an
    interrupted sweep has finished, from its run folder alone (no model). A later ``--resume`` that finishes
    the sweep overwrites them.

    Raises:
        UsageError: not a sweep run folder, no base run or no finished window yet, or a finished sweep.
    """
    folder = Path(out_dir)
    settings = read_json(folder / RUN_FILE, "sweep settings") if (folder / RUN_FILE).is_file() else None
    if not isinstance(settings, dict) or not all(isinstance(settings.get(k), list) for k in ("windows", "tasks", "repeats")):
        raise UsageError(f"{folder} is not a sweep run folder (no readable {RUN_FILE})")
    configs = sweep_configs(settings["repeats"], parse_alphas(settings.get("alphas")), settings.get("substeps") or [])
    if (folder / "summary.json").is_file() and (folder / "sweep.json").is_file() and read_json(
            folder / "summary.json", "sweep summary").get("complete", True):
        raise UsageError(f"{folder} holds a finished sweep; its outputs are already there")
    base_run = read_stored_base(SweepFolder(folder))
    done = SweepFolder.records(folder)
    if base_run is None or not done:
        raise UsageError(f"{folder} has no base run or no finished window yet: nothing to report")
    base_rows, base_paired, _ = compare_runs(base_run, base_run, n_resamples=1, seed=0)
    base = base_summary(base_rows, base_paired, reported_tasks(base_rows, base_run.get("groups")))
    planned = [v.key(w) for v in configs for w in settings["windows"]]
    rows = [restore_record(done[key]) for key in planned if key in done]
    num_layers = int(settings["num_layers"])
    scales = best_scales(rows, list(base), int(settings.get("seed") or 0))
    summary = summarise(None, {"source": settings.get("model")}, num_layers, settings, base, rows, {},
                        {"total_s": math.nan}, scales)
    summary.update(complete=False, windows_done=len(rows), windows_planned=len(planned),
                   note="an unfinished sweep: windows ran in a seeded random order, so these are an unbiased sample;"
                        " finish it with sweep --resume")
    missing = sorted({key.rsplit("x", 1)[0] for key in planned if key not in done})
    result = SweepResult(rows=rows, base=base, summary=summary, out_dir=folder, missing=missing, scales=scales)
    write_outputs(result, num_layers)
    return result


# --------------------------------------------------------------------------- outcomes (validate, calibrate)


def outcome_columns(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Outcome name (``combined_z``, ``delta:<task>``) -> window -> ``(value, positive)``, the value
    oriented so that positive = better (a lower-is-better task's delta is negated)."""
    outcomes: dict[str, dict[str, Any]] = {"combined_z": {}}
    for row in rows:
        z = row.get("combined_z")
        outcomes["combined_z"][row["window"]] = (z, is_finite_number(z) and z > POSITIVE_Z)
    if any("race_reason" in row for row in rows):  # a raced sweep: every window's interval centre and call
        outcomes["race_estimate"] = {r["window"]: (r.get("race_estimate"), bool(r.get("race_positive"))) for r in rows}
    for task in tasks:
        column: dict[str, Any] = {}
        for row in rows:
            entry = (row.get("tasks") or {}).get(task) or {}
            delta = entry.get("delta", row.get(f"delta:{task}"))
            p = entry.get("p_value", row.get(f"p:{task}"))
            if is_finite_number(delta) and entry.get("higher_is_better") is False:
                delta = -float(delta)
            column[row["window"]] = (delta, is_finite_number(delta) and delta > 0 and is_finite_number(p) and p < POSITIVE_P)
        outcomes[f"delta:{task}"] = column
    return outcomes


def headline_outcome(metric: str, outcomes: dict[str, Any]) -> str:
    """The outcome named by `metric` (a bare task name means its delta; a raced sweep's combined z is its
    ``race_estimate``, since windows stopped early have no combined z)."""
    if metric == "combined_z" and "race_estimate" in outcomes:
        return "race_estimate"
    if metric not in outcomes and f"delta:{metric}" in outcomes:
        metric = f"delta:{metric}"
    if metric not in outcomes:
        raise UsageError(f"unknown metric {metric!r}; choose one of {', '.join(outcomes)}")
    return metric
