"""Paired statistics for base-vs-RYS comparisons (pure functions over per-item results).

Both models are scored on the same items, so the comparisons are paired:

* :func:`mcnemar_exact` / :func:`mcnemar_from_pairs`: exact McNemar test for 0/1 per-item scores
  (accuracy, exact match). Only the discordant items matter: ``b`` = base right and RYS wrong,
  ``c`` = base wrong and RYS right. Under H0 (equal accuracy) ``b ~ Binomial(b + c, 1/2)``; the two-sided
  p-value is ``min(1, 2 * P(X <= min(b, c)))`` (1.0 when there are no discordant items).
* :func:`paired_bootstrap`: resamples items (the same indices for both models) to get a confidence interval
  of the difference of a statistic (the mean by default) and a two-sided p-value, for per-item scores that
  are not 0/1 (log-likelihoods, F1, ...).
* :func:`mean_stderr`: mean and standard error ``s / sqrt(n)`` with the sample standard deviation
  (``ddof=1``), the formula lm-evaluation-harness uses for mean-aggregated metrics.

Sweep scores: :func:`task_z`, :func:`combine_z` (Stouffer, with the single-task flag), :func:`fit_repeat_curve`.
Validation: :func:`correlation`, :func:`hypergeom_enrichment_p`, :func:`matched_permutation` (a CKA-matched
null), :func:`evaluations_to_best` (with :func:`expected_first_hit`, :func:`prob_hit_within`), :func:`top_count`
and :func:`bottom_mask` (top and bottom sets).

Randomness comes only from an explicit ``numpy.random.Generator`` seeded by the caller's ``seed``;
nothing here touches global random state.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats as _scipy_stats

__all__ = [
    "SINGLE_TASK_MIN_Z", "SINGLE_TASK_SHARE", "bottom_mask", "combine_z", "correlation", "evaluations_to_best",
    "evaluations_to_reach", "expected_first_hit", "fit_repeat_curve", "hypergeom_enrichment_p", "is_binary",
    "is_finite_number", "matched_permutation", "mcnemar_exact", "mcnemar_from_pairs", "mean_stderr",
    "paired_bootstrap", "prob_hit_within", "task_z", "top_count",
]

#: One task's share of |sum z| above which a window's verdict rests on a single task (:func:`combine_z`).
SINGLE_TASK_SHARE = 0.7
#: ... provided that task really moved (|z| at least this).
SINGLE_TASK_MIN_Z = 1.0
#: Resamples evaluated per vectorised chunk in :func:`paired_bootstrap` (bounds memory to chunk * n indices).
_BOOTSTRAP_CHUNK = 1000


def _as_1d(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {array.shape}")
    return array


def _paired_arrays(base: Sequence[float], rys: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    base_arr, rys_arr = _as_1d(base, "base"), _as_1d(rys, "rys")
    if base_arr.shape != rys_arr.shape:
        raise ValueError(
            f"paired samples need the same number of items: base has {base_arr.size}, rys has {rys_arr.size}"
        )
    if base_arr.size == 0:
        raise ValueError("paired samples are empty")
    if not (np.all(np.isfinite(base_arr)) and np.all(np.isfinite(rys_arr))):
        raise ValueError("paired samples contain NaN or infinite values")
    return base_arr, rys_arr


def is_binary(values: Sequence[float] | np.ndarray) -> bool:
    """Whether every value is exactly 0 or 1 (booleans count); an empty sequence is not binary."""
    array = np.asarray(values, dtype=np.float64)
    return bool(array.size) and bool(np.all((array == 0.0) | (array == 1.0)))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant-pair counts.

    Args:
        b: items the base model got right and the RYS model got wrong.
        c: items the base model got wrong and the RYS model got right.

    Returns:
        ``min(1, 2 * BinomCDF(min(b, c); b + c, 0.5))``; 1.0 when ``b + c == 0``.

    Raises:
        ValueError: a count is negative or not an integer.
    """
    for name, value in (("b", b), ("c", c)):
        if isinstance(value, bool) or int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer count, got {value!r}")
    b, c = int(b), int(c)
    n = b + c
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * _scipy_stats.binom.cdf(min(b, c), n, 0.5)))


def mcnemar_from_pairs(base: Sequence[float], rys: Sequence[float]) -> dict[str, Any]:
    """Exact McNemar test on paired 0/1 per-item scores.

    Args:
        base: per-item scores of the base model (0/1 or booleans), in item order.
        rys: per-item scores of the RYS model for the same items, in the same order.

    Returns:
        ``{"test": "mcnemar_exact", "n", "a", "b", "c", "d", "p_value", "base_mean", "rys_mean", "delta"}``
        with ``a`` = both right, ``b`` = base right / RYS wrong, ``c`` = base wrong / RYS right,
        ``d`` = both wrong, and ``delta = rys_mean - base_mean = (c - b) / n``.

    Raises:
        ValueError: lengths differ, the samples are empty, or a value is not 0/1.
    """
    base_arr, rys_arr = _paired_arrays(base, rys)
    if not (is_binary(base_arr) and is_binary(rys_arr)):
        raise ValueError("McNemar's test needs 0/1 per-item scores; use paired_bootstrap for other values")
    base_right, rys_right = base_arr == 1.0, rys_arr == 1.0
    a = int(np.sum(base_right & rys_right))
    b = int(np.sum(base_right & ~rys_right))
    c = int(np.sum(~base_right & rys_right))
    d = int(np.sum(~base_right & ~rys_right))
    n = a + b + c + d
    return {
        "test": "mcnemar_exact",
        "n": n,
        "a": a,
        "b": b,
        "c": c,
        "d": d,
        "p_value": mcnemar_exact(b, c),
        "base_mean": float(base_arr.mean()),
        "rys_mean": float(rys_arr.mean()),
        "delta": (c - b) / n,
    }


def _row_mean(samples: np.ndarray) -> np.ndarray:
    return samples.mean(axis=-1)


def paired_bootstrap(
    base: Sequence[float],
    rys: Sequence[float],
    n_resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Paired bootstrap of ``statistic(rys) - statistic(base)`` over items.

    Each resample draws ``n`` item indices with replacement and applies them to both models, so the
    pairing (item difficulty shared by both) is kept.

    Args:
        base: per-item scores of the base model.
        rys: per-item scores of the RYS model, same items in the same order.
        n_resamples: bootstrap resamples.
        seed: seed of the ``numpy.random.default_rng`` generator (results are deterministic given it).
        confidence: level of the two-sided percentile confidence interval (0 < confidence < 1).
        statistic: vectorised statistic over the last axis (``f(array[..., n]) -> array[...]``); the mean
            when None. lm-eval's ``perplexity`` aggregation, for instance, is
            ``lambda x: np.exp(-x.mean(axis=-1))`` over per-item log-likelihoods.

    Returns:
        ``{"test": "paired_bootstrap", "n", "n_resamples", "seed", "confidence", "base", "rys", "delta",
        "ci_low", "ci_high", "p_value", "stderr"}``: the observed statistics and their difference, the
        percentile interval of the resampled differences, their standard deviation (a bootstrap standard
        error of the difference), and the two-sided p-value of H0 "no difference", computed by centring the
        bootstrap distribution on 0: ``p = (1 + #{|d* - d| >= |d|}) / (1 + n_resamples)``, and 1.0 when the
        observed difference is exactly 0.

    Raises:
        ValueError: lengths differ, the samples are empty or not finite, or an argument is out of range.
    """
    base_arr, rys_arr = _paired_arrays(base, rys)
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence!r}")
    stat = statistic or _row_mean
    n_resamples = int(n_resamples)
    n = base_arr.size
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore", invalid="ignore"):
        base_stat = float(stat(base_arr))
        rys_stat = float(stat(rys_arr))
        observed = rys_stat - base_stat
        deltas = np.empty(n_resamples, dtype=np.float64)
        for start in range(0, n_resamples, _BOOTSTRAP_CHUNK):
            stop = min(start + _BOOTSTRAP_CHUNK, n_resamples)
            idx = rng.integers(0, n, size=(stop - start, n))
            deltas[start:stop] = stat(rys_arr[idx]) - stat(base_arr[idx])
    alpha = 1.0 - confidence
    finite = deltas[np.isfinite(deltas)]
    if finite.size and math.isfinite(observed):
        ci_low, ci_high = (float(v) for v in np.quantile(finite, [alpha / 2.0, 1.0 - alpha / 2.0]))
        stderr = float(finite.std(ddof=1)) if finite.size > 1 else float("nan")
        if observed == 0.0:
            p_value = 1.0
        else:
            extreme = int(np.sum(np.abs(finite - observed) >= abs(observed)))
            p_value = min(1.0, (1 + extreme) / (1 + finite.size))
    else:  # the statistic overflowed on every resample (or on the data)
        ci_low = ci_high = stderr = p_value = float("nan")
    return {
        "test": "paired_bootstrap",
        "n": int(n),
        "n_resamples": n_resamples,
        "seed": seed,
        "confidence": confidence,
        "base": base_stat,
        "rys": rys_stat,
        "delta": observed,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "stderr": stderr,
        "p_value": p_value,
    }


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error ``std(values, ddof=1) / sqrt(n)`` (lm-eval's ``mean_stderr``).

    Returns:
        ``(mean, stderr)``; the stderr is NaN for a single value (no spread can be estimated).

    Raises:
        ValueError: ``values`` is empty or not 1-D.
    """
    array = _as_1d(values, "values")
    if array.size == 0:
        raise ValueError("mean_stderr needs at least one value")
    mean = float(array.mean())
    if array.size < 2:
        return mean, float("nan")
    return mean, float(array.std(ddof=1) / math.sqrt(array.size))


def is_finite_number(value: Any) -> bool:
    """True for a real, finite int or float (numpy scalars included; bools, None and strings are not)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- sweep scores


def task_z(delta: float | None, se_base: float | None, se_rys: float | None, n: int | None = None) -> float:
    """``delta / sqrt(se_base^2 + se_rys^2)``; missing stderrs count as 0, a zero denominator is floored at
    ``1 / (2 n)`` (half an item) when ``n`` is known; NaN when nothing can be said."""
    if delta is None or not is_finite_number(delta):
        return math.nan
    var = sum(float(s) ** 2 for s in (se_base, se_rys) if is_finite_number(s))
    denom = math.sqrt(var)
    if denom <= 0.0:
        if delta == 0.0:
            return 0.0
        if not n:
            return math.nan
        denom = 1.0 / (2.0 * n)
    return float(delta) / denom


def combine_z(
    z_by_task: dict[str, float], share: float = SINGLE_TASK_SHARE, min_z: float = SINGLE_TASK_MIN_Z
) -> dict[str, Any]:
    """Stouffer's combination of per-task z-scores and the single-task flag.

    Returns:
        ``combined_z`` = sum z / sqrt(#tasks) over the finite z's; ``dominant_task`` (largest |z|);
        ``dominant_share`` = its |z| / |sum z| (above 1 when the other tasks move the other way; inf when
        the sum is 0); ``single_task_verdict``: two or more tasks, ``dominant_share > share`` and the
        dominant |z| >= ``min_z``.
    """
    finite = {t: float(z) for t, z in z_by_task.items() if is_finite_number(z)}
    if not finite:
        return {"combined_z": math.nan, "dominant_task": None, "dominant_share": math.nan, "single_task_verdict": False}
    total = sum(finite.values())
    combined = total / math.sqrt(len(finite))
    dominant = max(finite, key=lambda t: abs(finite[t]))
    top = abs(finite[dominant])
    ratio = top / abs(total) if total != 0 else (math.inf if top > 0 else math.nan)
    flag = len(finite) >= 2 and top >= min_z and ratio > share
    return {"combined_z": combined, "dominant_task": dominant, "dominant_share": ratio, "single_task_verdict": bool(flag)}


def fit_repeat_curve(visits: Sequence[int], deltas: Sequence[float]) -> dict[str, Any]:
    """Least-squares fit of ``Perf(n) - Perf(1) = a (n-1) - b (n-1)^2`` (n = visits; ``Perf(1)`` = base).

    Points with n = 1 (delta 0 by definition) may be included; they do not move the fit. ``a`` and ``b``
    need two distinct n > 1; with one, only ``a`` is fitted (``b`` = 0, ``underdetermined``).

    Returns:
        ``a``, ``b``, ``n_peak`` (``1 + a / (2 b)`` for ``b > 0``, the visits at the fitted maximum),
        ``perf_peak`` (fitted delta there), ``residual_rms``, ``points``, ``underdetermined``.
    """
    pairs = [(int(n), float(d)) for n, d in zip(visits, deltas) if is_finite_number(d)]
    x = np.array([n - 1 for n, _ in pairs], dtype=float)
    y = np.array([d for _, d in pairs], dtype=float)
    distinct = {v for v in x.tolist() if v > 0}
    out: dict[str, Any] = {"points": [[n, d] for n, d in pairs], "underdetermined": len(distinct) < 2}
    if not distinct:
        return {**out, "a": math.nan, "b": math.nan, "n_peak": math.nan, "perf_peak": math.nan, "residual_rms": math.nan}
    if len(distinct) < 2:
        design = x[:, None]
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        a, b = float(coef[0]), 0.0
    else:
        design = np.stack([x, -(x**2)], axis=1)
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        a, b = float(coef[0]), float(coef[1])
    fitted = a * x - b * x**2
    n_peak = 1.0 + a / (2.0 * b) if b > 0 else math.nan
    perf_peak = a * (n_peak - 1) - b * (n_peak - 1) ** 2 if b > 0 else math.nan
    return {
        **out,
        "a": a,
        "b": b,
        "n_peak": n_peak,
        "perf_peak": perf_peak,
        "residual_rms": float(np.sqrt(np.mean((y - fitted) ** 2))) if y.size else math.nan,
    }


# --------------------------------------------------------------------------- validation


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
        rho, rho_p = _scipy_stats.spearmanr(xs, ys)
        tau, tau_p = _scipy_stats.kendalltau(xs, ys)
    out.update(spearman=float(rho), spearman_p=float(rho_p), kendall=float(tau), kendall_p=float(tau_p))
    return out


def top_count(n: int, fraction: float) -> int:
    """Size of the top set: ``max(1, ceil(fraction * n))`` (0 for no windows)."""
    return 0 if n <= 0 else min(n, max(1, math.ceil(fraction * n - 1e-9)))


def bottom_mask(values: np.ndarray, fraction: float) -> np.ndarray:
    """``[n]`` bool: the lowest ``top_count(#finite, fraction)`` of the finite values (ties by position)."""
    mask = np.zeros(values.size, dtype=bool)
    finite = np.flatnonzero(np.isfinite(values))
    if not finite.size:
        return mask
    k = top_count(finite.size, fraction)
    order = finite[np.argsort(values[finite], kind="stable")]
    mask[order[:k]] = True
    return mask


def hypergeom_enrichment_p(n_total: int, n_positive: int, n_top: int, n_top_positive: int) -> float:
    """One-sided ``P(X >= n_top_positive)`` for ``X ~ Hypergeom(N, K, k)`` (positives in a random top set)."""
    if n_total <= 0 or n_top <= 0:
        return math.nan
    return float(_scipy_stats.hypergeom.sf(n_top_positive - 1, n_total, n_positive, n_top))


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


def evaluations_to_best(ordered_values: Sequence[Any], n_permutations: int, seed: int) -> dict[str, Any]:
    """Evaluations, in the given order, to reach the best value and 90% of it, against random order.

    Args:
        ordered_values: ``[n]`` outcome per item, in evaluation order (non-numbers count as ``-inf``).
        n_permutations: random orders of the curves (at most 2000 are drawn).
        seed: seed of the numpy Generator.

    Returns:
        ``n``, ``best``; ``best`` and ``best90`` entries (``threshold``, ``targets`` reaching it,
        ``score_order`` evaluations, ``random_expected``, ``p_value`` of doing as well in random order; or a
        ``note`` when the best is not positive); ``curve`` when ``n > 0``: the running maximum in the given
        order (``score_order``) vs random orders (``random_mean``, ``random_q05``, ``random_q95``).
    """
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


def _quantile_bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each value by its rank quantile (ties share a rank, so they share a bin)."""
    ranks = _scipy_stats.rankdata(values, method="average")
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
