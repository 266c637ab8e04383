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

Randomness comes only from an explicit ``numpy.random.Generator`` seeded by the caller's ``seed``;
nothing here touches global random state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats as _scipy_stats

__all__ = [
    "is_binary",
    "mcnemar_exact",
    "mcnemar_from_pairs",
    "mean_stderr",
    "paired_bootstrap",
]

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
