"""rys_forge.stats against hand-computed values and scipy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from rys_forge.stats import is_binary, mcnemar_exact, mcnemar_from_pairs, mean_stderr, paired_bootstrap


def test_mcnemar_exact_hand_computed():
    # b=2, c=10: p = 2 * sum_{k<=2} C(12,k) / 2^12 = 2 * (1 + 12 + 66) / 4096
    expected = 2 * (1 + 12 + 66) / 4096
    assert expected == pytest.approx(0.03857421875, abs=0)
    assert mcnemar_exact(2, 10) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_exact(10, 2) == pytest.approx(expected, rel=1e-12)  # symmetric
    # scipy's exact binomial test as a second reference
    assert mcnemar_exact(2, 10) == pytest.approx(scipy_stats.binomtest(2, 12, 0.5).pvalue, rel=1e-12)


@pytest.mark.parametrize("b, c", [(0, 0), (3, 3), (7, 7), (0, 1), (1, 0), (5, 6)])
def test_mcnemar_exact_capped_at_one(b, c):
    p = mcnemar_exact(b, c)
    assert p == 1.0
    if b + c:
        assert p == pytest.approx(min(1.0, scipy_stats.binomtest(min(b, c), b + c, 0.5).pvalue))


@pytest.mark.parametrize("b, c", [(0, 8), (1, 20), (15, 40), (100, 130)])
def test_mcnemar_exact_matches_scipy(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(scipy_stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_mcnemar_exact_rejects_bad_counts():
    for b, c in [(-1, 2), (1.5, 2), (True, 2)]:
        with pytest.raises(ValueError):
            mcnemar_exact(b, c)


def test_mcnemar_from_pairs_counts():
    # a: both right (3), b: base right / RYS wrong (2), c: base wrong / RYS right (10), d: both wrong (1)
    base = [1] * 3 + [1] * 2 + [0] * 10 + [0] * 1
    rys = [1] * 3 + [0] * 2 + [1] * 10 + [0] * 1
    result = mcnemar_from_pairs(base, rys)
    assert (result["a"], result["b"], result["c"], result["d"], result["n"]) == (3, 2, 10, 1, 16)
    assert result["p_value"] == pytest.approx(0.03857421875, rel=1e-12)
    assert result["delta"] == pytest.approx(np.mean(rys) - np.mean(base))
    assert result["test"] == "mcnemar_exact"
    # booleans are 0/1 too
    assert mcnemar_from_pairs([True, False], [True, True])["c"] == 1


def test_mcnemar_from_pairs_rejects_bad_input():
    with pytest.raises(ValueError):
        mcnemar_from_pairs([1, 0], [1])
    with pytest.raises(ValueError):
        mcnemar_from_pairs([0.5, 1], [1, 1])
    with pytest.raises(ValueError):
        mcnemar_from_pairs([], [])


def test_paired_bootstrap_covers_true_mean_and_is_deterministic():
    rng = np.random.default_rng(123)
    n = 400
    base = rng.normal(0.0, 1.0, n)
    true_delta = 0.3
    rys = base + true_delta + rng.normal(0.0, 0.5, n)
    result = paired_bootstrap(base, rys, n_resamples=4000, seed=7)
    assert result["delta"] == pytest.approx(float(np.mean(rys - base)))
    assert result["ci_low"] < true_delta < result["ci_high"]
    assert result["ci_low"] < result["delta"] < result["ci_high"]
    assert result["p_value"] < 0.001  # a clear shift
    # the bootstrap stderr of a mean difference is close to the analytic one
    analytic = np.std(rys - base, ddof=1) / math.sqrt(n)
    assert result["stderr"] == pytest.approx(analytic, rel=0.1)
    again = paired_bootstrap(base, rys, n_resamples=4000, seed=7)
    assert again == result
    other = paired_bootstrap(base, rys, n_resamples=4000, seed=8)
    assert other["ci_low"] != result["ci_low"]


def test_paired_bootstrap_no_difference():
    values = [0.1, 0.5, 0.2, 0.9, 0.4]
    result = paired_bootstrap(values, values, n_resamples=500, seed=0)
    assert result["delta"] == 0.0
    assert result["p_value"] == 1.0
    assert result["ci_low"] == result["ci_high"] == 0.0
    noisy = paired_bootstrap([0.1, 0.5, 0.2, 0.9], [0.2, 0.4, 0.3, 0.8], n_resamples=2000, seed=0)
    assert 0.0 < noisy["p_value"] <= 1.0


def test_paired_bootstrap_custom_statistic_perplexity():
    loglik_base = np.array([-2.0, -3.0, -1.5, -2.5])
    loglik_rys = loglik_base - 0.2
    result = paired_bootstrap(
        loglik_base, loglik_rys, n_resamples=200, seed=0, statistic=lambda x: np.exp(-np.mean(x, axis=-1))
    )
    assert result["base"] == pytest.approx(math.exp(2.25))
    assert result["rys"] == pytest.approx(math.exp(2.45))
    assert result["delta"] > 0 and result["ci_low"] > 0  # every resample has the RYS perplexity higher


def test_paired_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [2.0], confidence=1.0)
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [2.0], n_resamples=0)
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, float("nan")], [2.0, 1.0])


def test_mean_stderr_matches_numpy_formula():
    values = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    mean, stderr = mean_stderr(values)
    array = np.asarray(values)
    assert mean == pytest.approx(array.mean())
    assert stderr == pytest.approx(array.std(ddof=1) / math.sqrt(array.size))
    # lm-eval's own formula
    from lm_eval.api.metrics import mean_stderr as lm_eval_mean_stderr

    assert stderr == pytest.approx(lm_eval_mean_stderr(values))
    single_mean, single_se = mean_stderr([0.5])
    assert single_mean == 0.5 and math.isnan(single_se)
    with pytest.raises(ValueError):
        mean_stderr([])


def test_is_binary():
    assert is_binary([0, 1, 1.0, True])
    assert not is_binary([0, 0.5])
    assert not is_binary([])
