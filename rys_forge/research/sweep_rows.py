"""The rows of a sweep: from a base run and a window's run to per-task deltas, z-scores and a verdict.

Both runs are normalised lm-eval runs (:mod:`rys_forge.evaluate.runner`), compared with
:func:`rys_forge.evaluate.compare_runs`, so a sweep row and an ``rys-forge eval --model M --window i:j``
report agree number for number. Per task one metric is kept (:func:`pick_metric`); the z-scores and their
combination are :func:`rys_forge.stats.task_z` and :func:`rys_forge.stats.combine_z`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from rys_forge.errors import UsageError
from rys_forge.evaluate import compare_runs
from rys_forge.plan import Window
from rys_forge.stats import combine_z, fit_repeat_curve, is_finite_number, task_z

__all__ = ["METRIC_PREFERENCE", "base_summary", "pick_metric", "repeat_fits", "reported_tasks", "window_record"]

#: Metric preference per task.
METRIC_PREFERENCE = ("acc_norm", "acc")


def pick_metric(rows: Sequence[dict[str, Any]], task: str) -> dict[str, Any] | None:
    """The row of ``task`` the sweep keeps: ``acc_norm``, else ``acc``, else the first metric (filter
    ``none`` preferred within each choice); None when the task has no numeric row."""
    candidates = [r for r in rows if r["task"] == task and r.get("base") is not None and r.get("rys") is not None]
    if not candidates:
        return None
    candidates.sort(key=lambda r: 0 if r["filter"] in ("none", None) else 1)
    for metric in METRIC_PREFERENCE:
        for row in candidates:
            if row["metric"] == metric:
                return row
    return candidates[0]


def reported_tasks(rows: Sequence[dict[str, Any]], groups: dict[str, Any] | None = None) -> list[str]:
    """The tasks a sweep scores: every top-level task, and for a top-level group its direct members
    (``rys_suite`` -> its six tasks; ``mmlu`` -> its four category groups, scored by their aggregates), so
    the per-task z-scores and the single-task flag see the benchmarks one by one."""
    groups = groups or {}
    seen: list[str] = []
    for row in rows:
        if row.get("in_group") or row["task"] in seen:
            continue
        members = [m for m in groups.get(row["task"]) or [] if any(r["task"] == m for r in rows)]
        for name in members or [row["task"]]:
            if name not in seen:
                seen.append(name)
    return seen


def _kept(
    rows: Sequence[dict[str, Any]], paired: dict[str, Any], tasks: Sequence[str]
) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``(task, row, entry)`` for each task with a kept metric: its comparison row and its paired items."""
    for task in tasks:
        row = pick_metric(rows, task)
        if row is not None:
            yield task, row, (paired.get(task) or {}).get(row["filter"]) or {}


def base_summary(rows: Sequence[dict[str, Any]], paired: dict[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """Per task with a kept metric: its ``metric``, ``filter``, base ``value``, ``stderr``, ``n``,
    ``higher_is_better``, ``doc_ids`` and per-item ``items`` (from the base run's self-comparison
    ``rows, paired``)."""
    out: dict[str, Any] = {}
    for task, row, entry in _kept(rows, paired, tasks):
        out[task] = {
            "metric": row["metric"],
            "filter": row["filter"],
            "value": row["base"],
            "stderr": row["base_stderr"],
            "n": row.get("n"),
            "higher_is_better": row.get("higher_is_better"),
            "doc_ids": entry.get("doc_ids"),
            "items": (entry.get(row["metric"]) or {}).get("base"),
        }
    return out


def _task_entry(row: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """One task of a window row: the kept metric's values, test and z (positive = better)."""
    items = (entry.get(row["metric"]) or {}).get("rys")
    n = row.get("n") or (len(items) if items else None)
    return {
        "metric": row["metric"],
        "filter": row["filter"],
        "base": row["base"],
        "rys": row["rys"],
        "delta": row["delta"],
        "base_stderr": row["base_stderr"],
        "rys_stderr": row["rys_stderr"],
        "test": row.get("test"),
        "p_value": row.get("p_value"),
        "n": n,
        "b": row.get("b"),
        "c": row.get("c"),
        "higher_is_better": row.get("higher_is_better"),
        # z is oriented so that positive = better (a lower-is-better metric's delta is negated)
        "z": (-1.0 if row.get("higher_is_better") is False else 1.0)
        * task_z(row["delta"], row["base_stderr"], row["rys_stderr"], n),
        "items": items,
    }


def window_record(
    window: Window, repeats: int, base_run: dict[str, Any], rys_run: dict[str, Any], tasks: Sequence[str],
    seed: int, seconds: float,
) -> dict[str, Any]:
    """The sweep row of one (window, repeats): ``window``, ``i``, ``j``, ``width``, ``repeats``, ``key``,
    ``tasks`` (per task: :func:`_task_entry`), :func:`~rys_forge.stats.combine_z`'s fields,
    ``mean_delta``, ``seconds``, ``notes`` (if any) and flat ``delta:<task>``, ``z:<task>``, ``p:<task>``,
    ``rys:<task>``."""
    rows, paired, notes = compare_runs(base_run, rys_run, n_resamples=2000, seed=seed)
    per_task = {task: _task_entry(row, entry) for task, row, entry in _kept(rows, paired, tasks)}
    combined = combine_z({t: v["z"] for t, v in per_task.items()})
    deltas = [v["delta"] for v in per_task.values() if is_finite_number(v["delta"])]
    record: dict[str, Any] = {
        "window": str(window),
        "i": window.start,
        "j": window.end,
        "width": window.width,
        "repeats": repeats,
        "key": f"{window}x{repeats}",
        "tasks": per_task,
        **combined,
        "mean_delta": float(np.mean(deltas)) if deltas else math.nan,
        "seconds": seconds,
    }
    if notes:
        record["notes"] = notes
    for task, values in per_task.items():
        for name, key in (("delta", "delta"), ("z", "z"), ("p", "p_value"), ("rys", "rys")):
            record[f"{name}:{task}"] = values[key]
    return record


def repeat_fits(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """Per window: the repeats fit of each task's delta and of the mean delta against visits."""
    by_window: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_window.setdefault(row["window"], []).append(row)
    fits: dict[str, Any] = {}
    for window, group in by_window.items():
        group = sorted(group, key=lambda r: r["repeats"])
        visits = [1] + [r["repeats"] for r in group]
        entry = {"mean_delta": fit_repeat_curve(visits, [0.0] + [r.get("mean_delta") for r in group])}
        for task in tasks:
            entry[task] = fit_repeat_curve(visits, [0.0] + [(r["tasks"].get(task) or {}).get("delta") for r in group])
        fits[window] = entry
    return fits


def parse_repeats(repeats: Any) -> list[int]:
    """Visit counts from ``2``, ``"2,3,4"`` or a list: sorted, distinct, each >= 2 (UsageError otherwise)."""
    if isinstance(repeats, str):
        parts = [p.strip() for p in repeats.split(",") if p.strip()]
    elif isinstance(repeats, int):
        parts = [repeats]
    else:
        parts = list(repeats)
    try:
        values = sorted({int(p) for p in parts})
    except (TypeError, ValueError):
        raise UsageError(f"--repeats takes visit counts such as 2 or 2,3,4, got {repeats!r}") from None
    if not values or values[0] < 2:
        raise UsageError(f"--repeats values must be >= 2 (visits of the block; 2 = RYS), got {repeats!r}")
    return values
