"""`validate`: does a rank run's Score(B) find the windows a benchmark sweep says are positive?

Tests the seeds' falsifiable claim, "the top decile of Score(B), computed without benchmark labels, should
contain a statistically significant enrichment of benchmark-positive RYS windows", on the windows present in
both a ``rank`` run folder (``windows.json``) and a ``sweep`` run folder (``sweep.json``, or the
``sweep.jsonl`` log of an unfinished sweep; rows with ``repeats`` = 2 unless told otherwise).

Outcomes: ``combined_z`` (Stouffer over the sweep's tasks) and, per task, ``delta:<task>`` (oriented so
that positive = better). A window is **benchmark-positive**

* for ``combined_z``: ``combined_z > 1.96`` (two-sided 5% on the combined z);
* for a task: ``delta > 0`` and the paired test's ``p < 0.05`` (exact McNemar for 0/1 items).

Statistics, per outcome:

* correlations: Spearman and Kendall (``scipy.stats``) of the score and of every numeric column of the rank
  rows (each probe, and ``i``/``j``/``width`` as naive baselines) with the outcome, on finite pairs;
* enrichment of positives in the top ``top_fraction`` (default: decile, ``k = max(1, ceil(f N))``) by score
  (a) vs all windows: hypergeometric ``P(X >= x)`` (``scipy.stats.hypergeom.sf(x - 1, N, K, k)``);
  (b) vs random windows matched on plateau CKA: windows are binned by the quantile of ``cka_plateau``
      (``cka_bins`` bins of equal rank width); each permutation draws, for every top window, one non-top
      window of its bin (the nearest non-empty bin when its own has none); one-sided p =
      ``(1 + #{null positives >= observed}) / (1 + n_permutations)``, seeded ``numpy`` Generator;
  (c) vs low-CKA windows: the bottom ``top_fraction`` by ``cka_plateau``; one-sided Fisher exact test;
* evaluations to the best: a user evaluating windows in score order needs ``m`` evaluations to reach the
  best outcome (and 90% of it, when the best is positive). In random order the first of ``k`` targets among
  ``N`` windows comes, on average, at ``(N + 1) / (k + 1)``: with ``T`` the first hit,
  ``P(T > t) = C(N - t, k) / C(N, k)`` and ``E[T] = sum_t P(T > t) = C(N + 1, k + 1) / C(N, k)``
  (hockey-stick identity) ``= (N + 1) / (k + 1)``. The chance that random order needs at most ``m`` is
  ``1 - C(N - k, m) / C(N, m)`` (the p-value of the score order's ``m``).

The verdict says plainly whether the claim holds, and whether the test is in-sample: the rank run's
``summary.json`` may record the model the score constants were fitted on (``fitted_on`` in
``score_config``, ``settings`` or top level); if that is the rank run's model, the validation is in-sample.

``validation.json`` and figures (``evaluations_to_best.png``, ``score_vs_outcome.png``) are written
atomically into ``out_dir``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as _st

from rys_forge.errors import UsageError
from rys_forge.files import json_safe, write_atomic
from rys_forge.research.sweep import read_sweep
from rys_forge.stats import is_finite_number

__all__ = [
    "POSITIVE_P",
    "POSITIVE_Z",
    "ValidationReport",
    "correlation",
    "evaluations_to_reach",
    "expected_first_hit",
    "hypergeom_enrichment_p",
    "matched_permutation",
    "prob_hit_within",
    "top_count",
    "validate_runs",
]

VALIDATION_FILE = "validation.json"
#: combined z above which a window counts as benchmark-positive.
POSITIVE_Z = 1.96
#: per-task paired-test p-value below which a positive delta counts.
POSITIVE_P = 0.05
#: Rank-row columns that are not probes.
_NOT_PREDICTORS = frozenset({"probe_s"})
_ALPHA = 0.05


@dataclass
class ValidationReport:
    """The comparison of a rank run with a sweep run.

    Attributes:
        verdict: plain-language conclusion on the headline outcome (``metric``).
        metric: the headline outcome (``combined_z`` or ``delta:<task>``).
        n_windows: windows in both runs (with a finite score).
        outcomes: per outcome: ``enrichment`` (a, b, c) and ``evaluations`` (to best / 90% of best).
        correlations: ``{predictor: {outcome: {spearman, spearman_p, kendall, kendall_p, n}}}``.
        calibration: the calibration model, the rank run's model, and ``in_sample`` (True/False/None).
        settings: inputs and parameters.
        notes: warnings (model mismatch, single-task positives, missing CKA, ...).
        saved_to: files written.
    """

    verdict: str
    metric: str
    n_windows: int
    outcomes: dict[str, Any]
    correlations: dict[str, Any]
    calibration: dict[str, Any]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    saved_to: list[str] = field(default_factory=list)

    @property
    def headline(self) -> dict[str, Any]:
        return self.outcomes[self.metric]

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "rys_forge_validation": 1,
                "verdict": self.verdict,
                "metric": self.metric,
                "n_windows": self.n_windows,
                "calibration": self.calibration,
                "settings": self.settings,
                "outcomes": self.outcomes,
                "correlations": self.correlations,
                "notes": self.notes,
            }
        )

    def format_text(self) -> str:
        """Short terminal summary: verdict, headline enrichment, score correlations per outcome."""
        lines = [self.verdict, ""]
        for name, outcome in self.outcomes.items():
            e = outcome["enrichment"]
            c = self.correlations.get("score", {}).get(name, {})
            lines.append(
                f"{name}: positives {e['n_positive']}/{e['n_windows']}; top {e['k_top']}: {e['top_positive']} positive"
                f" (rate {_f(e['top_rate'])} vs {_f(e['overall_rate'])}, p={_f(e['hypergeom_p'])});"
                f" matched-CKA rate {_f(e['matched'].get('null_rate_mean'))} (p={_f(e['matched'].get('p_value'))});"
                f" Spearman {_f(c.get('spearman'))}, Kendall {_f(c.get('kendall'))}"
            )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float) and value != 0 and abs(value) < 10 ** (-digits):
        return f"{value:.1e}"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)



# --------------------------------------------------------------------------- statistics (pure)


def correlation(x: Sequence[Any], y: Sequence[Any]) -> dict[str, Any]:
    """Spearman and Kendall (tau-b) correlation on the pairs where both values are finite (n >= 3)."""
    pairs = [(float(a), float(b)) for a, b in zip(x, y) if is_finite_number(a) and is_finite_number(b)]
    out: dict[str, Any] = {"n": len(pairs), "spearman": math.nan, "spearman_p": math.nan, "kendall": math.nan, "kendall_p": math.nan}
    if len(pairs) < 3:
        return out
    xs, ys = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    if np.all(xs == xs[0]) or np.all(ys == ys[0]):
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho, rho_p = _st.spearmanr(xs, ys)
        tau, tau_p = _st.kendalltau(xs, ys)
    out.update(spearman=float(rho), spearman_p=float(rho_p), kendall=float(tau), kendall_p=float(tau_p))
    return out


def top_count(n: int, fraction: float) -> int:
    """Size of the top set: ``max(1, ceil(fraction * n))`` (0 for no windows)."""
    return 0 if n <= 0 else min(n, max(1, math.ceil(fraction * n - 1e-9)))


def hypergeom_enrichment_p(n_total: int, n_positive: int, n_top: int, n_top_positive: int) -> float:
    """One-sided ``P(X >= n_top_positive)`` for ``X ~ Hypergeom(N, K, k)`` (positives in a random top set)."""
    if n_total <= 0 or n_top <= 0:
        return math.nan
    return float(_st.hypergeom.sf(n_top_positive - 1, n_total, n_positive, n_top))


def expected_first_hit(n: int, k: int) -> float:
    """Expected position of the first of ``k`` targets among ``n`` items in random order: ``(n+1)/(k+1)``."""
    return math.nan if k <= 0 or n <= 0 else (n + 1) / (k + 1)


def prob_hit_within(n: int, k: int, m: int) -> float:
    """Chance that random order puts one of ``k`` targets among the first ``m`` of ``n``:
    ``1 - C(n-k, m) / C(n, m)``."""
    if k <= 0 or n <= 0:
        return math.nan
    m = max(0, min(m, n))
    return 1.0 - math.comb(n - k, m) / math.comb(n, m)


def evaluations_to_reach(values_in_order: Sequence[Any], threshold: float) -> int | None:
    """1-based number of evaluations (in the given order) until a value ``>= threshold``; None if never."""
    for position, value in enumerate(values_in_order, start=1):
        if is_finite_number(value) and float(value) >= threshold:
            return position
    return None


def _quantile_bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each value by its rank quantile (ties share a rank, so they share a bin)."""
    ranks = _st.rankdata(values, method="average")
    n = len(values)
    return np.minimum(n_bins - 1, np.floor((ranks - 1) / n * n_bins).astype(int))


def matched_permutation(
    positive: Sequence[bool],
    cka: Sequence[float],
    top: Sequence[bool],
    *,
    n_permutations: int = 10000,
    seed: int = 0,
    n_bins: int = 10,
) -> dict[str, Any]:
    """Permutation test of the top set against random windows matched on plateau CKA.

    Only windows with a finite CKA take part. For each permutation, every top window is paired with one
    non-top window drawn uniformly from its CKA quantile bin (the nearest non-empty bin if its own has no
    non-top window); draws are independent across top windows (with replacement).

    Returns:
        ``observed`` (positives among the top windows), ``k`` (top windows with a CKA), ``null_mean``,
        ``null_rate_mean``, ``null_q05``/``null_q95`` (rates), ``p_value`` (one-sided, ``>=``), ``n_bins``,
        ``n_permutations``, ``seed``.
    """
    pos = np.asarray(positive, dtype=bool)
    c = np.asarray(cka, dtype=float)
    t = np.asarray(top, dtype=bool)
    ok = np.isfinite(c)
    pos, c, t = pos[ok], c[ok], t[ok]
    out: dict[str, Any] = {"n_bins": n_bins, "n_permutations": int(n_permutations), "seed": seed, "k": int(t.sum())}
    if t.sum() == 0 or (~t).sum() == 0 or n_permutations < 1:
        return {**out, "observed": int(pos[t].sum()), "null_mean": math.nan, "null_rate_mean": math.nan,
                "null_q05": math.nan, "null_q95": math.nan, "p_value": math.nan}
    n_bins = max(1, min(n_bins, len(c)))
    bins = _quantile_bins(c, n_bins)
    pools = {b: np.flatnonzero((bins == b) & ~t) for b in range(n_bins)}
    nonempty = [b for b in range(n_bins) if pools[b].size]
    rng = np.random.default_rng(seed)
    null = np.zeros(int(n_permutations), dtype=np.int64)
    for index in np.flatnonzero(t):
        b = int(bins[index])
        if not pools[b].size:
            b = min(nonempty, key=lambda other: (abs(other - b), other))
        pool = pools[b]
        draws = pool[rng.integers(0, pool.size, size=int(n_permutations))]
        null += pos[draws]
    observed = int(pos[t].sum())
    k = int(t.sum())
    return {
        **out,
        "n_bins": n_bins,
        "observed": observed,
        "observed_rate": observed / k,
        "null_mean": float(null.mean()),
        "null_rate_mean": float(null.mean() / k),
        "null_q05": float(np.quantile(null, 0.05) / k),
        "null_q95": float(np.quantile(null, 0.95) / k),
        "p_value": float((1 + np.sum(null >= observed)) / (1 + null.size)),
    }


# --------------------------------------------------------------------------- reading runs


def _read_rank(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    table = path / "windows.json"
    if not table.exists():
        raise UsageError(f"{path} is not a finished rank run folder (no windows.json)")
    rows = json.loads(table.read_text())
    summary_file = path / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    return rows, summary


def _model_names(info: Any) -> set[str]:
    """Comparable names of a model record (a string, or a dict with source/path/name/model)."""
    names: set[str] = set()
    values = [info] if isinstance(info, str) else [info.get(k) for k in ("source", "path", "name", "model", "hub_id", "base")] if isinstance(info, dict) else []
    for value in values:
        if isinstance(value, str) and value.strip():
            text = value.strip().rstrip("/")
            names.add(text)
            names.add(Path(text).name)
    return names


def _calibration(summary: dict[str, Any]) -> dict[str, Any]:
    fitted = None
    for holder in (summary.get("score_config"), summary.get("settings"), summary):
        if isinstance(holder, dict) and holder.get("fitted_on"):
            fitted = holder["fitted_on"]
            break
    model = summary.get("model") or {}
    rank_names = _model_names(model)
    fitted_names = _model_names(fitted) if fitted is not None else set()
    in_sample = bool(rank_names & fitted_names) if fitted is not None and rank_names else None
    if in_sample is True:
        text = (
            f"in-sample: the score constants were fitted on {_display(fitted)}, the model validated here;"
            " this is not an independent test of the claim"
        )
    elif in_sample is False:
        text = f"out-of-sample: score constants fitted on {_display(fitted)}, validated on {_display(model)}"
    else:
        text = "calibration model not recorded in the rank run (score constants: defaults or unknown origin)"
    return {"fitted_on": fitted, "rank_model": model.get("source") if isinstance(model, dict) else model,
            "in_sample": in_sample, "text": text}


def _display(info: Any) -> str:
    if isinstance(info, dict):
        return str(info.get("source") or info.get("name") or info.get("model") or info.get("path") or info)
    return str(info)


# --------------------------------------------------------------------------- entry point


def _outcome_columns(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Outcome name -> per window: value (positive = better) and positive flag."""
    outcomes: dict[str, dict[str, Any]] = {"combined_z": {}}
    for row in rows:
        z = row.get("combined_z")
        outcomes["combined_z"][row["window"]] = (z, is_finite_number(z) and z > POSITIVE_Z)
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


def _evaluations(ordered_values: list[float], n_permutations: int, seed: int) -> dict[str, Any]:
    values = np.array([v if is_finite_number(v) else -np.inf for v in ordered_values], dtype=float)
    n = values.size
    best = float(values.max()) if n else math.nan
    out: dict[str, Any] = {"n": n, "best": best}
    for label, threshold in (("best", best - 1e-12 * max(1.0, abs(best))), ("best90", 0.9 * best if best > 0 else None)):
        if threshold is None or not math.isfinite(threshold):
            out[label] = {"threshold": None, "note": "the best outcome is not positive: no 90% target"}
            continue
        k = int(np.sum(values >= threshold))
        m = evaluations_to_reach(values.tolist(), threshold)
        out[label] = {
            "threshold": threshold,
            "targets": k,
            "score_order": m,
            "random_expected": expected_first_hit(n, k),
            "p_value": prob_hit_within(n, k, m) if m is not None else math.nan,
        }
    # curves: score-order running max vs random-order mean and 5-95% band
    curve_perms = int(min(max(n_permutations, 1), 2000))
    rng = np.random.default_rng(seed)
    if n:
        shuffled = np.stack([rng.permutation(values) for _ in range(curve_perms)])
        running = np.maximum.accumulate(shuffled, axis=1)
        running = np.where(np.isfinite(running), running, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["curve"] = {
                "score_order": np.where(np.isfinite(best_so_far := np.maximum.accumulate(values)), best_so_far, np.nan).tolist(),
                "random_mean": np.nanmean(running, axis=0).tolist(),
                "random_q05": np.nanquantile(running, 0.05, axis=0).tolist(),
                "random_q95": np.nanquantile(running, 0.95, axis=0).tolist(),
                "permutations": curve_perms,
            }
    return out


def validate_runs(
    rank_dir: str | Path,
    sweep_dir: str | Path,
    *,
    out_dir: str | Path | None = None,
    top_fraction: float = 0.1,
    n_permutations: int = 10000,
    seed: int = 0,
    metric: str = "combined_z",
    repeats: int | None = None,
    score_key: str = "score",
    cka_key: str = "cka_plateau",
    cka_bins: int = 10,
    score_config: Any = None,
) -> ValidationReport:
    """Compare a rank run's score with a sweep run's benchmark outcomes (see the module docstring).

    Args:
        rank_dir: a finished ``rys-forge rank`` run folder (``windows.json``, ``summary.json``).
        sweep_dir: a ``rys-forge sweep`` run folder (``sweep.json``, or ``sweep.jsonl`` if unfinished).
        out_dir: folder for ``validation.json`` and figures (None: nothing is written).
        top_fraction: size of the top set by score (0.1: the top decile), and of the low-CKA set.
        n_permutations: draws of the matched-CKA permutation test (and, up to 2000, of the random curves).
        seed: seed of the numpy Generator (results are deterministic given it).
        metric: the headline outcome: ``combined_z``, ``delta:<task>`` or a task name.
        repeats: which sweep rows to use (default: 2 if present, else the smallest repeat count).
        score_key: the rank column that orders windows.
        cka_key: the rank column used for CKA matching.
        cka_bins: quantile bins of the matched-CKA test.
        score_config: a :class:`rys_forge.probes.ScoreConfig` (e.g. from ``calibrate``) to re-score the rank
            rows with, from their stored probe metrics; its ``fitted_on`` decides in- vs out-of-sample.

    Raises:
        UsageError: a folder is not a run of the right kind, no window is in both, or ``metric`` is unknown.
    """
    if not 0.0 < top_fraction <= 1.0:
        raise UsageError(f"--top-fraction must be in (0, 1], got {top_fraction}")
    rank_dir, sweep_dir = Path(rank_dir), Path(sweep_dir)
    rank_rows, rank_summary = _read_rank(rank_dir)
    if score_config is not None:
        from rys_forge.rank.probes import score as _score

        rank_rows = [{**r, **_score(r, score_config)} for r in rank_rows]
        rank_summary = {**rank_summary, "score_config": score_config.to_dict()}
    sweep_rows, sweep_summary = read_sweep(sweep_dir)
    available = sorted({int(r["repeats"]) for r in sweep_rows if r.get("repeats") is not None})
    if not available:
        raise UsageError(f"{sweep_dir} has no finished sweep rows")
    if repeats is None:
        repeats = 2 if 2 in available else available[0]
    elif repeats not in available:
        raise UsageError(f"the sweep has no rows with repeats={repeats}; it has {', '.join(map(str, available))}")
    sweep_rows = [r for r in sweep_rows if r.get("repeats") == repeats]
    tasks = list(sweep_summary.get("tasks") or [])
    if not tasks:
        for row in sweep_rows:
            tasks.extend(t for t in (row.get("tasks") or {}) if t not in tasks)
    outcomes_raw = _outcome_columns(sweep_rows, tasks)
    if metric not in outcomes_raw and f"delta:{metric}" in outcomes_raw:
        metric = f"delta:{metric}"
    if metric not in outcomes_raw:
        raise UsageError(f"unknown metric {metric!r}; choose one of {', '.join(outcomes_raw)}")

    sweep_windows = {r["window"] for r in sweep_rows}
    joined = [r for r in rank_rows if r.get("window") in sweep_windows and is_finite_number(r.get(score_key))]
    if not joined:
        raise UsageError(f"no window with a finite {score_key} is in both {rank_dir} and {sweep_dir}")
    # score order, best first; ties keep the (i, j) order
    joined.sort(key=lambda r: (-float(r[score_key]), int(r.get("i", 0)), int(r.get("j", 0))))
    names = [r["window"] for r in joined]
    n = len(joined)
    k = top_count(n, top_fraction)
    top_mask = np.zeros(n, dtype=bool)
    top_mask[:k] = True
    cka = np.array([float(r[cka_key]) if is_finite_number(r.get(cka_key)) else np.nan for r in joined])
    notes: list[str] = []
    if not np.isfinite(cka).any():
        notes.append(f"the rank rows have no {cka_key}: no CKA-matched or low-CKA comparison")

    outcomes: dict[str, Any] = {}
    low = _low_cka(cka, top_fraction)  # the same comparison windows for every outcome
    for name, column in outcomes_raw.items():
        pairs = [column.get(w, (None, False)) for w in names]
        values = [v for v, _ in pairs]
        positive = np.array([bool(flag) for _, flag in pairs], dtype=bool)
        has_value = np.array([is_finite_number(v) for v in values])
        n_pos = int(positive.sum())
        top_pos = int(positive[top_mask].sum())
        low_pos = int(positive[low].sum())
        fisher_p = math.nan
        if low.any():
            fisher_p = float(_st.fisher_exact([[top_pos, k - top_pos], [low_pos, int(low.sum()) - low_pos]], alternative="greater")[1])
        enrichment = {
            "positive_rule": f"combined_z > {POSITIVE_Z}" if name == "combined_z" else f"delta > 0 and p < {POSITIVE_P}",
            "n_windows": n,
            "n_with_outcome": int(has_value.sum()),
            "n_positive": n_pos,
            "overall_rate": n_pos / n,
            "k_top": k,
            "top_positive": top_pos,
            "top_rate": top_pos / k,
            "top_windows": names[:k],
            "positive_windows": [w for w, p in zip(names, positive) if p],
            "hypergeom_p": hypergeom_enrichment_p(n, n_pos, k, top_pos),
            "expected_top_positive": k * n_pos / n,
            "matched": matched_permutation(positive, cka, top_mask, n_permutations=n_permutations, seed=seed, n_bins=cka_bins),
            "low_cka": {"k": int(low.sum()), "positive": low_pos, "rate": low_pos / low.sum() if low.any() else math.nan,
                        "fisher_p_top_greater": fisher_p, "windows": [w for w, l in zip(names, low) if l]},
        }
        outcomes[name] = {"enrichment": enrichment, "evaluations": _evaluations(values, n_permutations, seed)}

    correlations = _correlations(joined, outcomes_raw, names)
    single = [r["window"] for r in sweep_rows if r.get("single_task_verdict")]
    positives = set(outcomes["combined_z"]["enrichment"]["positive_windows"])
    flagged_pos = sorted(positives & set(single))
    if flagged_pos:
        notes.append(
            f"{len(flagged_pos)} of the {len(positives)} combined-positive windows rest on one task"
            f" (single_task_verdict: {', '.join(flagged_pos[:8])}{' ...' if len(flagged_pos) > 8 else ''});"
            " on small models a repeat can move one binary task by 10-20 points while others drop"
        )
    rank_model, sweep_model = _model_names(rank_summary.get("model") or {}), _model_names(sweep_summary.get("model") or {})
    if rank_model and sweep_model and not rank_model & sweep_model:
        notes.append(
            f"the rank run is of {_display(rank_summary.get('model'))} but the sweep of {_display(sweep_summary.get('model'))}"
        )
    missing = len(sweep_windows - {r["window"] for r in rank_rows})
    if missing:
        notes.append(f"{missing} swept windows are not in the rank run (left out)")
    calibration = _calibration(rank_summary)
    verdict = _verdict(metric, outcomes[metric], calibration)
    settings = {
        "rank_dir": str(rank_dir),
        "sweep_dir": str(sweep_dir),
        "top_fraction": top_fraction,
        "n_permutations": n_permutations,
        "seed": seed,
        "metric": metric,
        "repeats": repeats,
        "score_key": score_key,
        "cka_key": cka_key,
        "cka_bins": cka_bins,
        "tasks": tasks,
        "positive_rule": {"combined_z": f"combined_z > {POSITIVE_Z}", "task": f"delta > 0 and paired p < {POSITIVE_P}"},
        "sweep_metrics": sweep_summary.get("metrics"),
    }
    report = ValidationReport(
        verdict=verdict, metric=metric, n_windows=n, outcomes=outcomes, correlations=correlations,
        calibration=calibration, settings=settings, notes=notes,
    )
    if out_dir is not None:
        _write(report, Path(out_dir), joined, outcomes_raw, score_key)
    return report


def _low_cka(cka: np.ndarray, fraction: float) -> np.ndarray:
    """Bottom ``fraction`` of the windows with a finite CKA (ties broken by position)."""
    mask = np.zeros(cka.size, dtype=bool)
    finite = np.flatnonzero(np.isfinite(cka))
    if not finite.size:
        return mask
    k = top_count(finite.size, fraction)
    order = finite[np.argsort(cka[finite], kind="stable")]
    mask[order[:k]] = True
    return mask


def _correlations(joined: Sequence[dict[str, Any]], outcomes_raw: dict[str, dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    predictors: list[str] = []
    for row in joined:
        for key, value in row.items():
            if key not in predictors and key not in _NOT_PREDICTORS and is_finite_number(value):
                predictors.append(key)
    predictors.sort(key=lambda k: (k != "score", k))
    out: dict[str, Any] = {}
    for predictor in predictors:
        x = [row.get(predictor) for row in joined]
        out[predictor] = {name: correlation(x, [column.get(w, (None, False))[0] for w in names]) for name, column in outcomes_raw.items()}
    return out


def _verdict(metric: str, outcome: dict[str, Any], calibration: dict[str, Any]) -> str:
    e, ev = outcome["enrichment"], outcome["evaluations"]
    matched = e["matched"]
    rule = e["positive_rule"]
    head = (
        f"top-{'decile' if abs(e['k_top'] / e['n_windows'] - 0.1) < 0.05 else 'set'} positive rate"
        f" {e['top_rate']:.2f} vs {e['overall_rate']:.2f} overall, p={_p(e['hypergeom_p'])}"
    )
    rate = matched.get("null_rate_mean")
    matched_text = (
        f"{rate:.2f} in CKA-matched random windows, p={_p(matched.get('p_value'))}" if is_finite_number(rate)
        else "no CKA-matched comparison (no plateau CKA)"
    )
    if e["n_positive"] == 0:
        text = (
            f"no enrichment: no benchmark-positive window ({rule}) among the {e['n_windows']} windows in both runs;"
            f" the sweep cannot support the claim"
        )
    elif e["hypergeom_p"] < _ALPHA and (not is_finite_number(matched.get("p_value")) or matched["p_value"] < _ALPHA):
        text = f"enrichment ({metric}, positive = {rule}): {head}; vs {matched_text}"
    elif e["hypergeom_p"] < _ALPHA:
        text = (
            f"enrichment over all windows but not over CKA-matched random windows ({metric}): {head}; vs"
            f" {matched_text}: plateau CKA alone explains it (the seeds' first falsifier)"
        )
    else:
        text = f"no enrichment ({metric}, positive = {rule}): {head}"
    best = ev.get("best") or {}
    if isinstance(best, dict) and best.get("score_order") is not None:
        text += (
            f". The best window came after {best['score_order']} of {ev['n']} evaluations in score order"
            f" (random order: {best['random_expected']:.1f} expected, p={_p(best['p_value'])})"
        )
    return text + ". " + calibration["text"][:1].upper() + calibration["text"][1:] + "."


def _p(value: Any) -> str:
    if not is_finite_number(value):
        return "-"
    return f"{value:.2e}" if value < 1e-3 else f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


# --------------------------------------------------------------------------- outputs


def _write(report: ValidationReport, out: Path, joined: Sequence[dict[str, Any]], outcomes_raw: dict[str, Any], score_key: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    try:
        _plot_evaluations(report, out / "evaluations_to_best.png")
        _plot_scatter(report, joined, outcomes_raw, score_key, out / "score_vs_outcome.png")
    except Exception as exc:  # a figure must not cost the numbers
        report.notes.append(f"figures not written: {type(exc).__name__}: {exc}")
    target = out / VALIDATION_FILE
    write_atomic(target, json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    report.saved_to.append(str(target))


def _plot_evaluations(report: ValidationReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rys_forge.plots import save_figure

    names = list(report.outcomes)
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        curve = report.outcomes[name]["evaluations"].get("curve")
        if not curve:
            continue
        x = np.arange(1, len(curve["score_order"]) + 1)
        ax.fill_between(x, curve["random_q05"], curve["random_q95"], color="grey", alpha=0.3, label="random order 5-95%")
        ax.plot(x, curve["random_mean"], color="grey", label="random order mean")
        ax.plot(x, curve["score_order"], color="C0", label="score order")
        ax.set(xlabel="windows evaluated", ylabel=f"best {name} so far", title=name)
        ax.set_xscale("log")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("evaluations to find the best window: score order vs random order", fontsize=10)
    save_figure(fig, path)


def _plot_scatter(report: ValidationReport, joined: Sequence[dict[str, Any]], outcomes_raw: dict[str, Any], score_key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rys_forge.plots import save_figure

    names = list(outcomes_raw)
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        column = outcomes_raw[name]
        x = [float(r[score_key]) for r in joined]
        y = [column.get(r["window"], (None, False))[0] for r in joined]
        pos = [column.get(r["window"], (None, False))[1] for r in joined]
        y = [float(v) if is_finite_number(v) else np.nan for v in y]
        ax.scatter(x, y, s=12, c=["C3" if p else "C0" for p in pos])
        ax.axhline(0.0, color="grey", linewidth=0.8)
        c = report.correlations.get(score_key, {}).get(name, {})
        ax.set(xlabel=score_key, ylabel=name, title=f"{name}: Spearman {_f(c.get('spearman'), 2)}")
    fig.suptitle("score vs sweep outcome (red: benchmark-positive)", fontsize=10)
    save_figure(fig, path)
