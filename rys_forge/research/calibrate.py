"""`calibrate`: fit the score's constants on one model's sweep, to freeze them and test on other models.

The seeds' protocol: the constants of `Score(B) = P*A*S*D` (``alpha, c, beta, gamma, eta``; see
:class:`rys_forge.rank.score.ScoreConfig`) are priors. ``calibrate`` fits them on a *calibration* model, for
which both a rank run and a sweep run exist, by maximising the Spearman correlation between the score
(recomputed from the rank run's stored probe metrics, no model needed) and a sweep outcome (default:
``combined_z``). The search is a seeded log-uniform random search inside fixed bounds, started from
the defaults and refined coordinate-wise. The class thresholds do not enter the score and are not fitted.

The output JSON holds the fitted ``score`` block, with ``fitted_on`` naming the calibration model, so
``rank --score-config`` / ``validate --score-config`` use it and ``validate`` reports whether it is
validating on the calibration model itself (in-sample: not a test of the claim). To tell fitting from
overfitting, a k-fold cross-validated Spearman (fit on k-1 folds of windows, measured on the held-out
fold) is reported beside the in-sample one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from rys_forge.errors import RysForgeError, UsageError, os_error_message
from rys_forge.evaluate.report import check_writable
from rys_forge.files import json_marker, json_safe, write_atomic
from rys_forge.rank.score import SCORE_INPUTS, ScoreConfig, score_terms
from rys_forge.research.sweep import read_sweep
from rys_forge.research.sweep_outputs import outcome_columns
from rys_forge.research.validate import model_label, read_rank_run
from rys_forge.stats import is_finite_number

__all__ = ["BOUNDS", "CalibrationResult", "calibrate_score", "fit_constants"]

CALIBRATION_FORMAT = 1
#: Search bounds of the fitted constants (log-uniform).
BOUNDS: dict[str, tuple[float, float]] = {
    "alpha": (0.1, 100.0),
    "c": (1e-3, 10.0),
    "beta": (1e-2, 30.0),
    "gamma": (1e-2, 30.0),
    "eta": (1e-3, 10.0),
}


@dataclass
class CalibrationResult:
    """The fitted constants, the objective before and after, and the cross-validated objective."""

    config: ScoreConfig
    report: dict[str, Any]

    def format_text(self) -> str:
        r = self.report
        fitted = ", ".join(f"{k}={r['score'][k]:.4g}" for k in BOUNDS)
        cv = r["cross_validated"]
        return (
            f"fitted on {r['n_windows']} windows of {r['calibration_model']}: {fitted}\n"
            f"Spearman(score, {r['target']}): defaults {r['default']['spearman']:.3f} -> fitted"
            f" {r['fitted']['spearman']:.3f} (in-sample); {cv['folds']}-fold cross-validated"
            f" {cv['mean_spearman']:.3f} (defaults on the same folds {cv['mean_default_spearman']:.3f})"
        )


def _spearman(score: np.ndarray, target_ranks: np.ndarray) -> float:
    if not np.isfinite(score).all() or np.ptp(score) == 0.0:
        return -math.inf
    ranks = scipy_stats.rankdata(score)
    value = np.corrcoef(ranks, target_ranks)[0, 1]
    return float(value) if math.isfinite(value) else -math.inf


def _scores(inputs: np.ndarray, params: dict[str, float]) -> np.ndarray:
    return score_terms(*inputs, **params)["score"]


def fit_constants(
    inputs: np.ndarray, target: np.ndarray, *, start: dict[str, float], trials: int = 2000, seed: int = 0
) -> tuple[dict[str, float], float]:
    """Maximise Spearman(score(inputs; params), target) over ``BOUNDS``.

    Args:
        inputs: ``[5, n]`` rows of :data:`rys_forge.rank.score.SCORE_INPUTS`, all finite.
        target: ``[n]`` outcome per window.
        start: the first candidate (the defaults).
        trials: random log-uniform candidates before the coordinate refinement.
        seed: numpy seed.

    Returns:
        The best parameters and their Spearman correlation.
    """
    target_ranks = scipy_stats.rankdata(target)
    rng = np.random.default_rng(seed)
    best = {k: float(start[k]) for k in BOUNDS}
    best_value = _spearman(_scores(inputs, best), target_ranks)
    logs = {k: (math.log(lo), math.log(hi)) for k, (lo, hi) in BOUNDS.items()}
    for _ in range(trials):
        candidate = {k: math.exp(rng.uniform(*logs[k])) for k in BOUNDS}
        value = _spearman(_scores(inputs, candidate), target_ranks)
        if value > best_value:
            best, best_value = candidate, value
    for step in (2.0, 1.5, 1.2, 1.05):
        improved = True
        while improved:
            improved = False
            for key in BOUNDS:
                for factor in (step, 1.0 / step):
                    lo, hi = BOUNDS[key]
                    candidate = {**best, key: min(hi, max(lo, best[key] * factor))}
                    value = _spearman(_scores(inputs, candidate), target_ranks)
                    if value > best_value + 1e-12:
                        best, best_value, improved = candidate, value, True
    return best, best_value


def _joined(
    rank_rows: list[dict[str, Any]], sweep_rows: list[dict[str, Any]], sweep_dir: Path, target: str, repeats: int
) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    """The rank rows with every score input and a finite ``target``, their ``[5, n]`` inputs and ``[n]`` target.

    Raises:
        UsageError: no sweep rows with ``repeats``, an unknown ``target``, or fewer than 10 windows.
    """
    rows = [r for r in sweep_rows if r.get("repeats") == repeats]
    if target == "combined_z" and any("race_reason" in r for r in rows):
        target = "race_estimate"  # a raced sweep: every window's interval centre, not only the completed ones' z
    if target.startswith("delta:"):  # oriented like validate's outcomes: positive = better
        outcome = {w: value for w, (value, _) in outcome_columns(rows, [target[len("delta:"):]])[target].items()}
    else:
        outcome = {r["window"]: r.get(target) for r in rows}
    if not outcome:
        raise UsageError(f"{sweep_dir} has no sweep rows with repeats={repeats}")
    if all(v is None for v in outcome.values()):
        columns = sorted(k for k in sweep_rows[0] if k.startswith("delta:") or k in ("combined_z", "mean_delta", "race_estimate"))
        raise UsageError(f"unknown target {target!r}; the sweep has {', '.join(columns)}")
    joined = [
        r for r in rank_rows
        if r.get("window") in outcome and is_finite_number(outcome[r["window"]]) and all(is_finite_number(r.get(k)) for k in SCORE_INPUTS)
    ]
    if len(joined) < 10:
        raise UsageError(
            f"only {len(joined)} windows have every score input ({', '.join(SCORE_INPUTS)}) and a finite {target}:"
            " calibration needs at least 10"
        )
    inputs = np.array([[float(r[k]) for r in joined] for k in SCORE_INPUTS])
    y = np.array([float(outcome[r["window"]]) for r in joined])
    return joined, inputs, y


def _cross_validate(
    inputs: np.ndarray, y: np.ndarray, start: dict[str, float], *, folds: int, trials: int, seed: int
) -> tuple[list[float], list[float]]:
    """Held-out Spearman per fold of the constants fitted on the other folds, and of ``start`` (``folds < 2``:
    none)."""
    per_fold: list[float] = []
    per_fold_default: list[float] = []
    if folds >= 2:
        assignment = np.random.default_rng(seed + 1).permutation(y.size) % folds
        for fold in range(folds):
            train, test = assignment != fold, assignment == fold
            params, _ = fit_constants(inputs[:, train], y[train], start=start, trials=trials, seed=seed + 2 + fold)
            per_fold.append(_spearman(_scores(inputs[:, test], params), scipy_stats.rankdata(y[test])))
            per_fold_default.append(_spearman(_scores(inputs[:, test], start), scipy_stats.rankdata(y[test])))
    return per_fold, per_fold_default


def calibrate_score(
    sweep_dir: str | Path,
    rank_dir: str | Path,
    *,
    out: str | Path | None = None,
    target: str = "combined_z",
    repeats: int = 2,
    trials: int = 2000,
    folds: int = 5,
    seed: int = 0,
) -> CalibrationResult:
    """Fit the score constants on a calibration model (its sweep and rank runs); write ``out`` (JSON).

    Args:
        sweep_dir: a ``rys-forge sweep`` run folder of the calibration model.
        rank_dir: a ``rys-forge rank`` run folder of the same model (its probe metrics are re-scored).
        out: where the score config goes (None: not written).
        target: sweep column to correlate with: ``combined_z``, ``mean_delta`` or ``delta:<task>``.
        repeats: which sweep rows (visits of the block).
        trials: random candidates of the search (per fit; the cross-validation refits per fold).
        folds: folds of the cross-validated Spearman (0 or 1: none).
        seed: seed of the search and of the fold assignment.

    Raises:
        UsageError: bad folders, an unknown target, or fewer than 10 windows with every input.
    """
    _check_options(trials, folds, seed, repeats, out)
    sweep_dir, rank_dir = Path(sweep_dir), Path(rank_dir)
    rank_rows, rank_summary = read_rank_run(rank_dir)
    sweep_rows, sweep_summary = read_sweep(sweep_dir)
    joined, inputs, y = _joined(rank_rows, sweep_rows, sweep_dir, target, repeats)
    if folds > len(joined):
        raise UsageError(f"--folds {folds} is more than the {len(joined)} windows to split")
    defaults = ScoreConfig()
    start = {k: getattr(defaults, k) for k in BOUNDS}
    best, best_value = fit_constants(inputs, y, start=start, trials=trials, seed=seed)
    default_value = _spearman(_scores(inputs, start), scipy_stats.rankdata(y))
    per_fold, per_fold_default = _cross_validate(inputs, y, start, folds=folds, trials=trials, seed=seed)

    model = rank_summary.get("model") or {}
    fitted_on = {**(model if isinstance(model, dict) else {"source": str(model)}), "rank_run": str(rank_dir),
                 "sweep_run": str(sweep_dir), "target": target}
    config = replace(defaults, **best, fitted_on=fitted_on)
    kendall = lambda params: float(scipy_stats.kendalltau(_scores(inputs, params), y)[0])  # noqa: E731
    name = model_label(model) if model else str(rank_dir)
    report = {
        "rys_forge_calibration": CALIBRATION_FORMAT,
        "score": config.to_dict(),
        "calibration_model": name,
        "target": target,
        "repeats": repeats,
        "objective": f"Spearman(score, {target}) over windows with every score input",
        "n_windows": len(joined),
        "default": {"params": start, "spearman": default_value, "kendall": kendall(start)},
        "fitted": {"params": best, "spearman": best_value, "kendall": kendall(best)},
        "cross_validated": {
            "folds": folds if folds >= 2 else 0,
            "per_fold_spearman": per_fold,
            "mean_spearman": float(np.mean(per_fold)) if per_fold else math.nan,
            "per_fold_default_spearman": per_fold_default,
            "mean_default_spearman": float(np.mean(per_fold_default)) if per_fold_default else math.nan,
        },
        "search": {"trials": trials, "seed": seed, "bounds": {k: list(v) for k, v in BOUNDS.items()},
                   "method": "log-uniform random search from the defaults, then coordinate refinement"},
        "not_fitted": "plateau_max, inert_cka, inert_delta, epsilon, kl_max (class thresholds; not in the score)",
        "sweep_metrics": sweep_summary.get("metrics"),
        "warning": "validating on the calibration model itself is in-sample; freeze these constants and"
        " validate on other models",
    }
    if out is not None:
        try:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(Path(out), json.dumps(json_safe(report), indent=2))
        except OSError as exc:
            raise RysForgeError(f"cannot write {os_error_message(exc, out)}") from None
    return CalibrationResult(config=config, report=report)


def _check_options(trials: int, folds: int, seed: int, repeats: int, out: str | Path | None) -> None:
    """The numeric options, and whether ``out`` can be written, before any work (UsageError, OutputError)."""
    for name, value, low in (("--trials", trials, 0), ("--folds", folds, 0), ("--seed", seed, 0), ("--repeats", repeats, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
    if out is not None:
        check_writable([Path(out)])
        if Path(out).exists() and json_marker(out, "rys_forge_calibration") != CALIBRATION_FORMAT:
            raise UsageError(f"--out {out} exists and is not a score config rys-forge calibrate wrote; choose another"
                             " name or remove it")
