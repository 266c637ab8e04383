"""The rows of a sweep: from a base run and a window's run to per-task deltas, z-scores and a verdict.

Both runs are normalised lm-eval runs (:mod:`rys_forge.evaluate.runner`), compared with
:func:`rys_forge.evaluate.compare_runs`, so a sweep row and an ``rys-forge eval --model M --window i:j``
report agree number for number. Per task one metric is kept (:func:`pick_metric`); the z-scores and their
combination are :func:`rys_forge.stats.task_z` and :func:`rys_forge.stats.combine_z`.

Damped visits (:class:`Visits`): a row's repeated visits may carry a residual scale ``alpha`` (``sweep --alphas``)
or be ``K`` damped sub-steps of ``1/K`` (``--substeps``). :func:`best_scales` compares, per window, every scale
with the plain repeat (alpha 1) on the same items: the same paired tests as window vs base.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rys_forge.errors import UsageError
from rys_forge.evaluate import compare_runs
from rys_forge.plan import Window
from rys_forge.stats import (combine_z, fit_repeat_curve, is_binary, is_finite_number, mcnemar_from_pairs,
                             paired_bootstrap, task_z)

__all__ = [
    "METRIC_PREFERENCE", "SCALE_P", "Visits", "base_summary", "best_scales", "damped_gains", "parse_alphas",
    "parse_substeps", "pick_metric", "repeat_fits", "reported_tasks", "sweep_configs", "trim_run", "window_record",
]

#: Metric preference per task.
METRIC_PREFERENCE = ("acc_norm", "acc")
#: Paired-test p-value below which a damped scale counts as better than the plain repeat on a task.
SCALE_P = 0.05
#: Bootstrap resamples of a damped-vs-plain test on items that are not 0/1 (as for window vs base).
_SCALE_RESAMPLES = 2000


@dataclass(frozen=True)
class Visits:
    """How a sweep visits a window's block: ``repeats`` passes, the repeated ones at residual scale ``alpha``
    (1 = plain RYS); ``substeps`` K when the second pass is K damped sub-steps of 1/K (``repeats = K + 1``,
    ``alpha = 1/K``, as :func:`rys_forge.plan.resolve_damping` resolves ``build --substeps``)."""

    repeats: int = 2
    alpha: float = 1.0
    substeps: int | None = None

    @classmethod
    def of(cls, row: dict[str, Any]) -> "Visits":
        """The configuration of a sweep row (a row without ``alpha`` is a plain repeat)."""
        substeps = row.get("substeps")
        return cls(int(row["repeats"]), float(row.get("alpha", 1.0)),
                   int(substeps) if is_finite_number(substeps) else None)

    @property
    def plain(self) -> bool:
        return self.alpha == 1.0

    @property
    def reference(self) -> "Visits":
        """The plain repeat this configuration is compared with (sub-steps replace the second pass: x2)."""
        return Visits(2 if self.substeps else self.repeats)

    def key(self, window: Window | str) -> str:
        """The row's key in the run folder: ``i:jxN`` (plain), ``i:jxNa<alpha>`` or ``i:jxNs<K>``."""
        head = f"{window}x{self.repeats}"
        if self.substeps:
            return f"{head}s{self.substeps}"
        return head if self.plain else f"{head}a{self.alpha:g}"

    @property
    def suffix(self) -> str:
        """File-name suffix of its heatmaps: none for the plain x2, else ``_xN``, ``_a<alpha>``, ``_s<K>``."""
        if self.substeps:
            return f"_s{self.substeps}"
        return ("" if self.repeats == 2 else f"_x{self.repeats}") + ("" if self.plain else f"_a{self.alpha:g}")

    @property
    def label(self) -> str:
        """Human form: ``x2``, ``x2 alpha 0.5``, ``x3 (2 sub-steps of 1/2)``."""
        if self.substeps:
            return f"x{self.repeats} ({self.substeps} sub-steps of 1/{self.substeps})"
        return f"x{self.repeats}" + ("" if self.plain else f" alpha {self.alpha:g}")

    def fields(self) -> dict[str, Any]:
        """The row's fields beside ``repeats``: none for a plain repeat (its row is what it was before scales)."""
        if self.plain:
            return {}
        return {"alpha": self.alpha, **({"substeps": self.substeps} if self.substeps else {})}


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


def accuracy_mean_delta(per_task: dict[str, dict[str, Any]]) -> float:
    """Mean delta over the tasks scored per item as 0/1 (accuracies, McNemar's test): a perplexity's delta is on
    another scale and would swamp them. NaN when no task qualifies."""
    deltas = [v["delta"] for v in per_task.values()
              if v.get("test") == "mcnemar_exact" and is_finite_number(v.get("delta"))]
    return float(np.mean(deltas)) if deltas else math.nan


def window_record(
    window: Window, repeats: int, base_run: dict[str, Any], rys_run: dict[str, Any], tasks: Sequence[str],
    seed: int, seconds: float, *, alpha: float = 1.0, substeps: int | None = None,
) -> dict[str, Any]:
    """The sweep row of one (window, repeats): ``window``, ``i``, ``j``, ``width``, ``repeats``, ``alpha`` and
    ``substeps`` (damped visits only: :meth:`Visits.fields`), ``key``, ``tasks`` (per task: :func:`_task_entry`),
    :func:`~rys_forge.stats.combine_z`'s fields, ``mean_delta`` (:func:`accuracy_mean_delta`), ``seconds``, ``notes`` (if any) and flat
    ``delta:<task>``, ``z:<task>``, ``p:<task>``, ``rys:<task>``."""
    visits = Visits(repeats, float(alpha), substeps)
    rows, paired, notes = compare_runs(base_run, rys_run, n_resamples=2000, seed=seed)
    per_task = {task: _task_entry(row, entry) for task, row, entry in _kept(rows, paired, tasks)}
    combined = combine_z({t: v["z"] for t, v in per_task.items()})
    record: dict[str, Any] = {
        "window": str(window),
        "i": window.start,
        "j": window.end,
        "width": window.width,
        "repeats": repeats,
        **visits.fields(),
        "key": visits.key(window),
        "tasks": per_task,
        **combined,
        "mean_delta": accuracy_mean_delta(per_task),
        "seconds": seconds,
    }
    if notes:
        record["notes"] = notes
    for task, values in per_task.items():
        for name, key in (("delta", "delta"), ("z", "z"), ("p", "p_value"), ("rys", "rys")):
            record[f"{name}:{task}"] = values[key]
    return record


def trim_run(run: dict[str, Any], keep: dict[str, str]) -> dict[str, Any]:
    """``run`` reduced to the kept ``"metric,filter"`` of each task (what a cached-engine window run holds)."""
    out: dict[str, Any] = {"results": {}, "groups": {}, "metric_info": {}, "items": {}}
    for task, key in keep.items():
        metric, filt = key.split(",", 1)
        stderr_key = f"{metric}_stderr,{filt}"
        out["results"][task] = {k: v for k, v in run["results"][task].items() if k in (key, stderr_key)}
        out["metric_info"][task] = (run.get("metric_info") or {}).get(task) or {}
        items = (run["items"].get(task) or {}).get(filt) or {}
        out["items"][task] = {filt: {d: {**rec, "values": {metric: rec["values"].get(metric)}} for d, rec in items.items()}}
    return out


def repeat_fits(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """Per window: the repeats fit of each task's delta and of the mean delta against visits (plain repeats only)."""
    by_window: dict[str, list[dict[str, Any]]] = {}
    for row in (r for r in rows if Visits.of(r).plain):
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


def _parts(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, (int, float)):
        return [value]
    return list(value)


def parse_alphas(alphas: Any) -> list[float]:
    """Residual scales from ``0.5``, ``"1,0.75,0.5"`` or a list (None: just 1): distinct, 1 first (the plain
    repeat, every scale's reference, is always swept), then the others from largest to smallest.

    Raises:
        UsageError: a value that is not a positive finite number.
    """
    bad = UsageError(f"--alphas takes residual scales of the repeated visits such as 1,0.75,0.5 (positive numbers;"
                     f" 1 = plain repeat), got {alphas!r}")
    try:
        values = [1.0] if alphas is None else [float(p) for p in _parts(alphas)]
    except (TypeError, ValueError):
        raise bad from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise bad
    distinct = {"1": 1.0}
    for value in sorted(values, reverse=True):
        distinct.setdefault(f"{value:g}", value)
    return list(distinct.values())


def parse_substeps(substeps: Any) -> list[int]:
    """Sub-step counts from ``2``, ``"2,4"`` or a list (None: none): sorted, distinct, each an integer >= 2.

    Raises:
        UsageError: a value that is not an integer >= 2 (1 sub-step is the plain repeat).
    """
    if substeps is None:
        return []
    try:
        values = sorted({int(str(p).strip()) for p in _parts(substeps)})
    except (TypeError, ValueError):
        values = []
    if not values or values[0] < 2:
        raise UsageError(f"--substeps takes integers >= 2 (K damped sub-steps of 1/K replace the second pass;"
                         f" 1 is the plain repeat), got {substeps!r}")
    return values


def sweep_configs(repeats: Sequence[int], alphas: Sequence[float], substeps: Sequence[int]) -> list[Visits]:
    """The configurations a sweep evaluates: each repeat count at each scale (plain first), then each sub-step count.

    Raises:
        UsageError: sub-steps with repeat counts other than 2 (they replace the second pass of the x2 repeat).
    """
    if substeps and list(repeats) != [2]:
        raise UsageError(f"--substeps replaces the second pass of the x2 repeat by K visits at 1/K; it cannot be"
                         f" combined with --repeats {','.join(map(str, repeats))} (use --repeats 2)")
    return [Visits(r, a) for r in repeats for a in alphas] + [Visits(k + 1, 1.0 / k, k) for k in substeps]


def _paired_difference(plain: dict[str, Any], other: dict[str, Any], seed: int) -> tuple[float, float]:
    """``(other - plain, p)`` of one task's metric: the difference of the two rows' values and the paired test of
    their per-item results (exact McNemar for 0/1 items, else a paired bootstrap of the mean); p is NaN when the
    items do not pair."""
    finite = is_finite_number(other.get("rys")) and is_finite_number(plain.get("rys"))
    delta = other["rys"] - plain["rys"] if finite else math.nan
    a, b = plain.get("items"), other.get("items")
    if not a or not b or len(a) != len(b):
        return delta, math.nan
    try:
        if is_binary(a) and is_binary(b):
            return delta, mcnemar_from_pairs(a, b)["p_value"]
        return delta, paired_bootstrap(a, b, n_resamples=_SCALE_RESAMPLES, seed=seed)["p_value"]
    except (TypeError, ValueError):  # missing or non-finite per-item values: no test
        return delta, math.nan


def best_scales(rows: Sequence[dict[str, Any]], tasks: Sequence[str], seed: int = 0) -> list[dict[str, Any]]:
    """Per window and plain repeat count of a sweep with damped visits: the scale with the best combined z, beside
    the plain repeat (alpha 1) of the same window; [] when no row is damped.

    Each entry: ``window``, ``i``, ``j``, ``repeats`` (of the plain repeat), ``scales`` (configurations compared),
    ``best`` (:attr:`Visits.label`), ``best_alpha``, ``best_repeats``, ``best_substeps``, ``best_combined_z``,
    ``plain_combined_z``, ``gain_z`` (best - plain), and per task ``delta:<task>`` (best - plain of the task's
    metric), ``p:<task>`` (their paired test on the same items), ``damped_higher:<task>`` (some scale < 1 scores
    above plain) and ``damped_better:<task>`` (... with paired p < :data:`SCALE_P`).
    """
    if all(Visits.of(r).plain for r in rows):
        return []
    groups: dict[tuple[str, int], list[tuple[Visits, dict[str, Any]]]] = {}
    for row in rows:
        visits = Visits.of(row)
        groups.setdefault((row["window"], visits.reference.repeats), []).append((visits, row))
    table = []
    for (window, repeats), members in groups.items():
        plain = next((r for v, r in members if v.plain), None)
        ranked = [(v, r) for v, r in members if is_finite_number(r.get("combined_z"))]
        best_visits, best = max(ranked, key=lambda m: m[1]["combined_z"], default=(None, None))
        plain_z = plain.get("combined_z", math.nan) if plain else math.nan
        entry: dict[str, Any] = {
            "window": window, "i": members[0][1]["i"], "j": members[0][1]["j"], "repeats": repeats,
            "scales": len(members), "best": best_visits.label if best_visits else None,
            "best_alpha": best_visits.alpha if best_visits else math.nan,
            "best_repeats": best_visits.repeats if best_visits else None,
            "best_substeps": best_visits.substeps if best_visits else None,
            "best_combined_z": best["combined_z"] if best else math.nan, "plain_combined_z": plain_z,
            "gain_z": best["combined_z"] - plain_z if best and is_finite_number(plain_z) else math.nan,
        }
        for task in tasks:
            plain_entry = ((plain or {}).get("tasks") or {}).get(task) or {}
            delta, p = _paired_difference(plain_entry, ((best or {}).get("tasks") or {}).get(task) or {}, seed)
            entry[f"delta:{task}"], entry[f"p:{task}"] = delta, p
            sign = -1.0 if plain_entry.get("higher_is_better") is False else 1.0
            higher = better = False
            for visits, row in members:
                if visits.alpha < 1.0 and plain is not None:
                    gain, gain_p = _paired_difference(plain_entry, (row.get("tasks") or {}).get(task) or {}, seed)
                    higher |= is_finite_number(gain) and sign * gain > 0
                    better |= is_finite_number(gain) and sign * gain > 0 and is_finite_number(gain_p) and gain_p < SCALE_P
            entry[f"damped_higher:{task}"], entry[f"damped_better:{task}"] = higher, better
        table.append(entry)
    return table


def damped_gains(table: Sequence[dict[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """Summary of :func:`best_scales`: per task, how many windows score better at some scale < 1 than at alpha 1
    (``better``: paired p < :data:`SCALE_P`, uncorrected over the scales; ``higher``: any gain), and how many
    windows' best combined z is at a scale other than 1."""
    compared = [e for e in table if is_finite_number(e["plain_combined_z"])]
    return {
        "rule": f"a window is better at some alpha < 1 on a task when a damped scale's value beats the plain"
                f" repeat's (alpha 1) on the same items with paired p < {SCALE_P} (exact McNemar for 0/1 items, else a"
                f" paired bootstrap of the mean; not corrected for the number of scales)",
        "windows": len(compared),
        "better": {t: sum(bool(e[f"damped_better:{t}"]) for e in compared) for t in tasks},
        "higher": {t: sum(bool(e[f"damped_higher:{t}"]) for e in compared) for t in tasks},
        "best_not_plain": sum(e["best_alpha"] != 1.0 for e in compared if e["best"] is not None),
    }
