"""Paired comparison of two normalised lm-eval runs (base vs RYS), per task, metric and item.

For every task and metric the row gives the base value, the RYS value, the delta (RYS - base), lm-eval's
standard errors, and a paired test on the per-item results (items matched by ``doc_id``):

* 0/1 per-item scores (``acc``, ``acc_norm``, ``exact_match``, ...): exact McNemar test;
* other scalar per-item scores (``perplexity``'s per-item log-likelihoods, ...): paired bootstrap of the
  task's aggregation (``mean``, or ``exp(-mean)`` for ``perplexity``), with a confidence interval;
* corpus-level metrics whose per-item values are not numbers (BLEU, F1 over (gold, pred) pairs, ...) and
  group aggregates: no paired test (the notes say why).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rys_forge.evaluate.runner import scalar
from rys_forge.stats import is_binary, mcnemar_from_pairs, paired_bootstrap

__all__ = ["compare_runs"]

#: Aggregations whose per-item values rys-forge can resample, as vectorised statistics (last axis).
_STATISTICS: dict[str, Any] = {
    "mean": lambda x: np.mean(x, axis=-1),
    "nanmean": lambda x: np.mean(x, axis=-1),
    "perplexity": lambda x: np.exp(-np.mean(x, axis=-1)),
}
#: Aggregations for which McNemar's test applies when the per-item values are 0/1.
_MEAN_AGGREGATIONS = ("mean", "nanmean")


def compare_runs(
    base: dict[str, Any], rys: dict[str, Any], *, n_resamples: int, seed: int
) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """Rows, paired per-item data and notes from two normalised runs (:mod:`rys_forge.evaluate.runner`).

    Args:
        base, rys: the normalised runs; ``base`` decides which tasks and metrics are compared.
        n_resamples: resamples of the paired bootstrap.
        seed: the bootstrap's seed.

    Returns:
        ``(rows, items, notes)``: the row layout of :class:`rys_forge.evaluate.report.EvalReport`, paired
        per-item scores ``{task: {filter: {"doc_ids": [...], metric: {"base": [...], "rys": [...]}}}}``, and
        remarks (metrics without a paired test and why, mismatched items, tasks missing from ``rys``).
    """
    rows: list[dict[str, Any]] = []
    paired_items: dict[str, Any] = {}
    notes: list[str] = []
    groups = base.get("groups") or {}
    members = {m for subtasks in groups.values() for m in subtasks}
    for task in _ordered_names(base["results"], groups):
        base_entry = base["results"][task]
        rys_entry = rys["results"].get(task)
        if rys_entry is None:
            notes.append(f"{task}: missing from the RYS results")
            continue
        is_group = task in groups or task not in base.get("items", {})
        for key, raw in base_entry.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            base_value, rys_value = scalar(raw), scalar(rys_entry.get(key))
            if base_value is None and rys_value is None:
                continue
            info = (base.get("metric_info", {}).get(task) or {}).get(metric) or {}
            row: dict[str, Any] = {
                "task": task,
                "metric": metric,
                "filter": filt,
                "base": base_value,
                "rys": rys_value,
                "delta": None if base_value is None or rys_value is None else rys_value - base_value,
                "base_stderr": scalar(base_entry.get(f"{metric}_stderr,{filt}")),
                "rys_stderr": scalar(rys_entry.get(f"{metric}_stderr,{filt}")),
                "test": None,
                "p_value": None,
                "n": None,
                "higher_is_better": info.get("higher_is_better"),
                "is_group": is_group,
                "in_group": task in members,
            }
            if is_group:
                row["note"] = "group aggregate: no per-item paired test (see its member tasks)"
            else:
                _paired_test(row, base, rys, info, paired_items, notes, n_resamples, seed)
            rows.append(row)
    return rows, paired_items, notes


def _ordered_names(results: Mapping[str, Any], groups: Mapping[str, Sequence[str]]) -> list[str]:
    """Result names with every group directly followed by its members (lm-eval lists groups last)."""
    members = {m for subtasks in groups.values() for m in subtasks}
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in ordered or name not in results:
            return
        ordered.append(name)
        for member in groups.get(name, ()):
            visit(member)

    for name in results:
        if name not in members:
            visit(name)
    for name in results:  # members of groups that are not in the results themselves
        visit(name)
    return ordered


def _doc_sort_key(doc_id: str) -> tuple[int, Any]:
    return (0, int(doc_id)) if doc_id.lstrip("-").isdigit() else (1, doc_id)


def _doc_id(doc_id: str) -> int | str:
    return int(doc_id) if doc_id.lstrip("-").isdigit() else doc_id


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) or (math.isinf(a) and a == b)


def _untestable(row: dict[str, Any], base_values: list[Any], rys_values: list[Any], aggregation: str | None,
                full: bool) -> str | None:
    """Why the paired values of a row cannot be tested (None: they can)."""
    if any(v is None for v in base_values + rys_values):
        return "corpus-level metric (per-item values are not numbers): no paired test"
    if not all(math.isfinite(v) for v in base_values + rys_values):
        return "non-finite per-item values: no paired test"
    statistic = _STATISTICS.get(aggregation or "mean")
    if statistic is None:
        return f"aggregation '{aggregation}' is not resampled by rys-forge: no paired test"
    with np.errstate(over="ignore"):
        reproduced = [
            float(statistic(np.asarray(values, dtype=np.float64))) for values in (base_values, rys_values)
        ]
    if full and not (
        row["base"] is not None
        and row["rys"] is not None
        and _close(reproduced[0], row["base"])
        and _close(reproduced[1], row["rys"])
    ):
        return (
            f"per-item values do not reproduce the aggregate (aggregation '{aggregation or 'unknown'}'):"
            " no paired test"
        )
    return None


def _paired_test(
    row: dict[str, Any],
    base: dict[str, Any],
    rys: dict[str, Any],
    info: dict[str, Any],
    paired_items: dict[str, Any],
    notes: list[str],
    n_resamples: int,
    seed: int,
) -> None:
    """Fill ``row`` with the paired test of one metric (or a note saying why there is none)."""
    task, metric, filt = row["task"], row["metric"], row["filter"]
    base_items = (base["items"].get(task) or {}).get(filt) or {}
    rys_items = (rys["items"].get(task) or {}).get(filt) or {}
    common = sorted(set(base_items) & set(rys_items), key=_doc_sort_key)
    label = f"{task} {metric}" + ("" if filt == "none" else f",{filt}")
    if len(common) != len(base_items) or len(common) != len(rys_items):
        notes.append(
            f"{label}: {len(base_items)} base items and {len(rys_items)} RYS items; the test uses the"
            f" {len(common)} with the same doc_id"
        )
    mismatched = [d for d in common if base_items[d].get("doc_hash") != rys_items[d].get("doc_hash")]
    aggregation = info.get("aggregation")
    if mismatched:
        reason: str | None = f"{len(mismatched)} items differ between the runs (doc_hash); no paired test"
    elif not common:
        reason = "no per-item results to pair"
    else:
        base_values = [base_items[d]["values"].get(metric) for d in common]
        rys_values = [rys_items[d]["values"].get(metric) for d in common]
        full = len(common) == len(base_items) == len(rys_items)
        reason = _untestable(row, base_values, rys_values, aggregation, full)
    if reason is not None:
        row["note"] = reason
        notes.append(f"{label}: {reason}")
        return
    paired = paired_items.setdefault(task, {}).setdefault(filt, {"doc_ids": [_doc_id(d) for d in common]})
    paired[metric] = {"base": base_values, "rys": rys_values}
    row["n"] = len(common)
    if (aggregation or "mean") in _MEAN_AGGREGATIONS and is_binary(base_values) and is_binary(rys_values):
        result = mcnemar_from_pairs(base_values, rys_values)
        row.update(test="mcnemar_exact", p_value=result["p_value"], b=result["b"], c=result["c"])
    else:
        statistic = _STATISTICS[aggregation or "mean"]
        result = paired_bootstrap(base_values, rys_values, n_resamples=n_resamples, seed=seed, statistic=statistic)
        row.update(
            test="paired_bootstrap",
            p_value=result["p_value"],
            ci_low=result["ci_low"],
            ci_high=result["ci_high"],
            statistic=aggregation or "mean",
        )
