"""rank's short list: distinct regions by non-maximum suppression, and the task-stability overlap of two families."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rys_forge.rank.score import ScoreConfig, score


def as_number(value: Any) -> float:
    """`value` as a float, None as NaN."""
    return math.nan if value is None else float(value)


def window_overlap(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Intersection over union of two windows' layer sets (0: disjoint, 1: the same window)."""
    shared = max(0, min(a["j"], b["j"]) - max(a["i"], b["i"]))
    return shared / ((a["j"] - a["i"]) + (b["j"] - b["i"]) - shared)


def shortlist(rows: list[dict[str, Any]], k: int, max_overlap: float) -> list[dict[str, Any]]:
    """Greedy non-maximum suppression over `rows` (best first): keep a window only if its overlap
    (`window_overlap`, IoU) with every kept one is at most `max_overlap`, until `k` are kept; if fewer
    survive, the best remaining windows fill the list. 1.0 keeps the raw order. Sets `row["shortlist"]`
    (1..k, else None) in place and returns the kept rows, best first."""
    finite = [r for r in rows if not math.isnan(as_number(r.get("score")))]
    kept: list[dict[str, Any]] = []
    for row in finite:
        if len(kept) == k:
            break
        if all(window_overlap(row, other) <= max_overlap for other in kept):
            kept.append(row)
    kept += [r for r in finite if r not in kept][: k - len(kept)]
    for row in rows:
        row["shortlist"] = None
    for position, row in enumerate(kept, start=1):
        row["shortlist"] = position
    return kept


def shared_share(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Layers two windows share, as a share of the smaller window's layers."""
    return max(0, min(a["j"], b["j"]) - max(a["i"], b["i"])) / min(a["j"] - a["i"], b["j"] - b["i"])


def distinct_regions(rows: Sequence[dict[str, Any]]) -> int:
    """Distinct regions among `rows`: groups of windows linked by sharing more than half of the smaller
    window's layers (nested or near-copies count as one region)."""
    groups: list[list[dict[str, Any]]] = []
    for row in rows:
        linked = [g for g in groups if any(shared_share(row, other) > 0.5 for other in g)]
        merged = [row] + [r for g in linked for r in g]
        groups = [g for g in groups if g not in linked] + [merged]
    return len(groups)


def family_overlap(rows: list[dict[str, Any]], families: Sequence[str], config: ScoreConfig, k: int) -> dict[str, Any]:
    """Top-k overlap of the score computed on two prompt families alone (the seeds' task stability)."""
    from scipy.stats import hypergeom

    tops = []
    for family in families:
        scored = []
        for row in rows:
            values = {m: as_number(row.get(f"{m}@{family}")) for m in ("cka_plateau", "delta_0", "r_0", "d_dec", "d_kl")}
            scored.append((score(values, config)["score"], row["window"]))
        scored = [s for s in scored if not math.isnan(s[0])]
        tops.append([w for _, w in sorted(scored, reverse=True)[:k]])
    overlap = len(set(tops[0]) & set(tops[1]))
    n = len(rows)
    return {
        "families": list(families),
        "k": k,
        "top_k": {families[0]: tops[0], families[1]: tops[1]},
        "overlap": overlap,
        "expected_by_chance": k * k / n if n else math.nan,
        "p_value": float(hypergeom.sf(overlap - 1, n, k, k)) if n else math.nan,
    }
