"""A window score learned from every probe column across models, judged leave-one-model-out.

``calibrate`` fits five constants of one formula on one model; here a ridge regression of a sweep outcome
(default: each window's ``combined_z``) on *every* numeric probe column of the rank rows is fitted on the
pooled windows of several models, and judged by fitting on all models but one and scoring the one left out,
beside the hand-set prior (the rank rows' ``score``). Numpy and scipy only. This module fits and judges; the
fitted score (:class:`~rys_forge.rank.learned.LearnedScore`: its file, the features, the per-model transform
and the prediction) lives in :mod:`rys_forge.rank.learned`, where ``rank --learned-score`` uses it.

Features: every finite numeric rank-row column except :data:`~rys_forge.rank.learned.NOT_FEATURES`
(bookkeeping, timings, the prior ``score`` and its terms; strings and booleans never count), plus the relative
depths ``i/L`` and ``j/L`` (``L`` = the largest ``j``). A column is used when it is finite in at least
``1 - max_missing`` of the rows of *every* training model (so the short-list-only Jacobian columns drop out); its gaps get the training
median and a 0/1 ``<column>:missing`` indicator. Per model, columns and target are transformed (``rank``,
the default: within-model rank scaled to [-0.5, 0.5], so other probe scales and a heavy negative tail of
combined z stop mattering; ``zscore``; ``none``); a per-model transform needs all windows of one model at
prediction time, which is what ``rank`` has. Design columns are then standardised over the training pool:

    minimise ||y - b0 - X b||^2 + penalty ||b||^2  ->  b = (X^T X + penalty I)^-1 X^T (y - mean y)

(``X`` centred, intercept unpenalised). The penalty (``f * n``, ``f`` in 1e-3..1e3) is chosen by inner
cross-validation on held-out squared error (ties: the larger): leave-one-model-out folds with three or
more training models, since transfer across models is the question, else seeded random folds of windows.

Judging (:func:`leave_one_model_out`), per held-out model, side by side for the prior, the fit on every
model (in-sample) and the fit on the others (out-of-model): Spearman with the outcome, evaluations in score
order to 90% of the best outcome (the best itself when it is not positive), benchmark-positive windows in
the top decile with the hypergeometric p. The learned score *wins* on a model when its out-of-model
Spearman beats the prior's; ship it only if it wins on a majority. Command: ``rys-forge learn-score``
(:func:`learn_score`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from rys_forge.errors import UsageError, output_problem
from rys_forge.files import json_marker, json_safe, write_atomic
from rys_forge.rank.learned import TRANSFORMS, LearnedScore, feature_table, per_model, row_features, window_depth
from rys_forge.research.sweep import read_sweep
from rys_forge.research.sweep_outputs import outcome_columns, read_sweep_table
from rys_forge.research.validate import model_label, read_rank_run
from rys_forge.stats import (correlation, evaluations_to_reach, expected_first_hit, hypergeom_enrichment_p,
                             is_finite_number, top_count)

__all__ = [
    "LomoReport", "ModelRun", "check_learn_outputs", "feature_columns", "fit_surrogate", "leave_one_model_out",
    "learn_score", "load_run", "ranking_figures", "read_sweep_table", "ridge", "sweep_outcomes",
]

#: Penalty grid, as multiples of the number of training windows.
PENALTY_FACTORS = tuple(float(f) for f in np.logspace(-3, 3, 13))
MIN_WINDOWS = 10
#: Key and version of the leave-one-model-out report file (``learn-score --report``).
REPORT_KEY = "rys_forge_learned_score"


class ModelRun(NamedTuple):
    """One model's rank rows, its sweep outcomes (``{outcome: {window: (value, positive)}}``, as
    :func:`sweep_outcomes` returns), its name and the model its rank run recorded (``source``, optional).
    A plain ``(rows, outcomes, model)`` tuple works too."""

    rows: list[dict[str, Any]]
    outcomes: dict[str, dict[str, tuple[Any, bool]]]
    model: str
    source: str | None = None


def feature_columns(runs: Sequence[Sequence[dict[str, Any]]], max_missing: float = 0.5) -> list[str]:
    """Columns finite in at least ``1 - max_missing`` of the rows of every run (sorted)."""
    common: set[str] | None = None
    for rows in runs:
        names = sorted({k for r in rows for k in row_features(r, window_depth(rows))})
        share = np.isfinite(feature_table(rows, names)).mean(axis=0) if rows else np.zeros(len(names))
        kept = {c for c, f in zip(names, share) if f >= 1.0 - max_missing}
        common = kept if common is None else common & kept
    return sorted(common or ())


def ridge(x: np.ndarray, y: np.ndarray, penalties: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Ridge coefficients of ``y`` on the centred columns of ``x`` for each penalty (one SVD).

    Args: ``x`` ``[n, d]`` design (centred here), ``y`` ``[n]`` target, ``penalties`` the ``lambda`` values.

    Returns: ``[len(penalties), d]`` coefficients ``(Xc^T Xc + lambda I)^-1 Xc^T (y - mean y)`` and ``[len]``
    intercepts ``mean y - mean(x) . b``.
    """
    mean_x, mean_y = x.mean(axis=0), y.mean()
    u, s, vt = np.linalg.svd(x - mean_x, full_matrices=False)
    uty = u.T @ (y - mean_y)
    coefs = np.stack([vt.T @ (s / (s**2 + lam) * uty) for lam in penalties])
    return coefs, mean_y - coefs @ mean_x


def _folds(groups: np.ndarray, folds: int, seed: int) -> tuple[str, list[np.ndarray]]:
    """Held-out masks: one per model with three or more models, else ``folds`` random folds of rows."""
    models = list(dict.fromkeys(groups.tolist()))
    if len(models) >= 3:
        return "leave-one-model-out", [groups == m for m in models]
    k = max(2, min(folds, groups.size))
    assignment = np.random.default_rng(seed).permutation(groups.size) % k
    return f"{k}-fold over windows", [assignment == f for f in range(k)]


def _choose_penalty(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> tuple[float, dict[str, Any]]:
    """The grid penalty with the lowest held-out mean squared error (ties: the larger)."""
    penalties = [f * y.size for f in PENALTY_FACTORS]
    scheme, masks = _folds(groups, folds, seed)
    errors = np.zeros(len(penalties))
    for test in masks:
        coefs, intercepts = ridge(x[~test], y[~test], penalties)
        predictions = x[test] @ coefs.T + intercepts[None, :]
        errors += ((predictions - y[test][:, None]) ** 2).sum(axis=0)
    errors /= y.size
    best = max(range(len(penalties)), key=lambda k: (-round(float(errors[k]), 12), k))
    return penalties[best], {"scheme": scheme, "penalties": penalties, "mse": errors.tolist()}


def _training_data(runs: Sequence[ModelRun], target: str, how: tuple[str, str], max_missing: float) -> tuple[
        list[str], list[np.ndarray], np.ndarray, np.ndarray]:
    """Columns, per-run transformed feature blocks, the transformed target and the model of each row."""
    feature_how, target_how = how
    blocks, targets, groups = [], [], []
    for run in runs:
        rows, column = _scored_rows(run, target)
        blocks.append(rows)
        targets.append(per_model(np.array([[column[r["window"]]] for r in rows], dtype=float), target_how)[:, 0])
        groups += [run.model] * len(rows)
    columns = feature_columns(blocks, max_missing)
    if not columns:
        raise UsageError("no probe column is finite in every training model's rank rows")
    values = [per_model(feature_table(rows, columns), feature_how) for rows in blocks]
    return columns, values, np.concatenate(targets), np.array(groups)


def _scored_rows(run: ModelRun, target: str) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The run's rank rows with a finite ``target``, and the target per window."""
    if target not in run.outcomes:
        raise UsageError(f"{run.model}: unknown target {target!r}; the sweep has {', '.join(run.outcomes)}")
    column = {w: float(v) for w, (v, _) in run.outcomes[target].items() if is_finite_number(v)}
    rows = [r for r in run.rows if r.get("window") in column]
    if len(rows) < MIN_WINDOWS:
        raise UsageError(f"{run.model}: only {len(rows)} windows have a rank row and a finite {target}; need {MIN_WINDOWS}")
    return rows, column


def fit_surrogate(
    runs: Sequence[ModelRun | tuple], *, target: str = "combined_z", penalty: float | None = None,
    feature_transform: str = "rank", target_transform: str = "rank", max_missing: float = 0.5, folds: int = 5,
    seed: int = 0,
) -> LearnedScore:
    """Fit the learned score on the pooled windows of ``runs``.

    Args:
        runs: ``(rank_rows, outcomes, model)`` per training model (see :class:`ModelRun`).
        target: outcome to learn: ``combined_z``, ``delta:<task>`` or ``z:<task>``.
        penalty: fixed ridge penalty; None chooses it by inner cross-validation.
        feature_transform, target_transform: per-model transform, ``rank``, ``zscore`` or ``none``.
        max_missing: largest share of non-finite values a column may have in any training model.
        folds, seed: random folds of the inner cross-validation (with fewer than three models) and their seed.

    Raises:
        UsageError: no runs, a bad transform or penalty, an unknown target, too few windows, or no common column.
    """
    runs = [ModelRun(*r) for r in runs]
    if not runs:
        raise UsageError("fit_surrogate needs at least one model's rank rows and sweep outcomes")
    for name, value in (("feature_transform", feature_transform), ("target_transform", target_transform)):
        if value not in TRANSFORMS:
            raise UsageError(f"{name} must be one of {', '.join(TRANSFORMS)}, got {value!r}")
    if penalty is not None and not (is_finite_number(penalty) and penalty > 0):
        raise UsageError(f"--penalty must be a finite number > 0, got {penalty!r}")
    columns, blocks, y, groups = _training_data(runs, target, (feature_transform, target_transform), max_missing)
    values = np.concatenate(blocks)
    missing = ~np.isfinite(values)
    medians = [float(np.median(values[~missing[:, k], k])) for k in range(len(columns))]
    values = np.where(missing, np.asarray(medians)[None, :], values)
    indicators = [c for k, c in enumerate(columns) if missing[:, k].any()]
    full = np.concatenate([values, missing[:, [columns.index(c) for c in indicators]].astype(float)], axis=1)
    means, scales = full.mean(axis=0), full.std(axis=0)
    scales = np.where(scales > 1e-12, scales, 1.0)  # a constant column stays 0 after centring: no weight
    x = (full - means) / scales
    cv: dict[str, Any] = {"scheme": "fixed penalty"}
    if penalty is None:
        penalty, cv = _choose_penalty(x, y, groups, folds, seed)
    coefs, intercepts = ridge(x, y, [float(penalty)])
    return LearnedScore(
        columns=columns, indicators=indicators, medians=medians, means=means.tolist(), scales=scales.tolist(),
        coefficients=coefs[0].tolist(), intercept=float(intercepts[0]), penalty=float(penalty),
        feature_transform=feature_transform, target=target, target_transform=target_transform,
        trained_on=[r.model for r in runs], n_windows=int(y.size), cv=cv,
        rank_models=[r.source for r in runs if r.source],
    )


# --------------------------------------------------------------------------- judging


def ranking_figures(scores: Sequence[float], values: Sequence[float], positive: Sequence[bool],
                    top_fraction: float = 0.1) -> dict[str, Any]:
    """How well ``scores`` order windows with outcomes ``values`` and benchmark-positive flags ``positive``.

    Returns: ``spearman`` (finite pairs); ``evaluations`` in score order (NaN scores last) to ``threshold``
    (90% of the best outcome; the best when it is not positive) and ``random_expected`` for random order;
    ``k_top``, ``top_positive``, ``n_positive``, ``enrichment`` (top rate / base rate), ``enrichment_p``.
    """
    s, v = np.asarray(scores, dtype=float), np.asarray(values, dtype=float)
    flags = np.asarray(positive, dtype=bool)
    order = sorted(range(s.size), key=lambda k: (0, -s[k], k) if math.isfinite(s[k]) else (1, 0.0, k))
    finite = v[np.isfinite(v)]
    best = float(finite.max()) if finite.size else math.nan
    threshold = 0.9 * best if best > 0 else best - 1e-12 * max(1.0, abs(best))
    targets = int(np.sum(v >= threshold)) if math.isfinite(best) else 0
    k = top_count(s.size, top_fraction)
    n_pos, top_pos = int(flags.sum()), int(flags[order[:k]].sum())
    return {
        "n": int(s.size), "spearman": correlation(s.tolist(), v.tolist())["spearman"],
        "evaluations": evaluations_to_reach(v[order].tolist(), threshold) if targets else None,
        "threshold": threshold, "threshold_rule": "90% of the best" if best > 0 else "the best (not positive)",
        "random_expected": expected_first_hit(s.size, targets), "k_top": k, "top_positive": top_pos, "n_positive": n_pos,
        "enrichment": (top_pos / k) / (n_pos / s.size) if n_pos else math.nan,
        "enrichment_p": hypergeom_enrichment_p(s.size, n_pos, k, top_pos) if n_pos else math.nan,
    }


@dataclass
class LomoReport:
    """Leave-one-model-out figures per held-out model, the verdict, and the fit on every model."""

    verdict: str
    ship: bool
    target: str
    models: list[dict[str, Any]]
    settings: dict[str, Any]
    surrogate: LearnedScore
    saved_to: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return json_safe({REPORT_KEY: 1, "verdict": self.verdict, "ship": self.ship, "target": self.target,
                          "settings": self.settings, "models": self.models, "surrogate": self.surrogate.to_dict()})

    def format_text(self) -> str:
        """Table: per held-out model, prior vs learned in-sample vs learned out-of-model."""
        def cell(value: Any, fmt: str = "{:.3f}") -> str:
            return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else fmt.format(value)
        head = (f"{'held-out model':<24}{'windows':>8}{'pos':>5} | {'Spearman prior/in/OUT':>23} |"
                f" {'evals to target prior/in/OUT (random)':>38} | {'top-decile pos prior/in/OUT':>27} | wins")
        lines = [f"target {self.target}; learned = ridge on every probe column", head, "-" * len(head)]
        for m in self.models:
            p, i, o = m["prior"], m["learned_in_sample"], m["learned_out_of_model"]
            rho = "/".join(cell(x["spearman"], "{:+.2f}") for x in (p, i, o))
            evals = "/".join(cell(x["evaluations"], "{:d}") for x in (p, i, o)) + f" ({cell(p['random_expected'], '{:.1f}')})"
            top = "/".join(str(x["top_positive"]) for x in (p, i, o)) + f" of {p['k_top']}"
            lines.append(f"{m['model'][:23]:<24}{p['n']:>8}{p['n_positive']:>5} | {rho:>23} | {evals:>38} | {top:>27} |"
                         f" {'yes' if m['wins'] else 'no'}")
        return "\n".join([*lines, "", self.verdict])


def _judge(model: ModelRun, target: str, learned: dict[str, LearnedScore], top_fraction: float) -> dict[str, Any]:
    """Figures of the prior and each learned prediction on one model's windows with a finite target."""
    rows, column = _scored_rows(model, target)
    positive = [bool(model.outcomes[target][r["window"]][1]) for r in rows]
    values = [column[r["window"]] for r in rows]
    prior = [float(r["score"]) if is_finite_number(r.get("score")) else math.nan for r in rows]
    out = {"prior": ranking_figures(prior, values, positive, top_fraction)}
    for name, fit in learned.items():
        out[name] = ranking_figures(fit.predict(rows).tolist(), values, positive, top_fraction)
    return out


def leave_one_model_out(runs: Sequence[ModelRun | tuple], *, target: str = "combined_z", top_fraction: float = 0.1,
                        **fit_kwargs: Any) -> LomoReport:
    """For each model: fit on the others, score it, and compare with the prior and the all-model fit.

    Args:
        runs: ``(rank_rows, outcomes, model)`` per model, at least two, distinct names.
        target: outcome learned and judged; top_fraction: top set of the enrichment figures.
        **fit_kwargs: passed to :func:`fit_surrogate`.

    Raises:
        UsageError: fewer than two models, a repeated model name, a ``top_fraction`` outside (0, 1] (and what
            :func:`fit_surrogate` raises).
    """
    if not (is_finite_number(top_fraction) and 0.0 < top_fraction <= 1.0):
        raise UsageError(f"--top-fraction must be in (0, 1], got {top_fraction!r}")
    runs = [ModelRun(*r) for r in runs]
    names = [r.model for r in runs]
    if len(runs) < 2 or len(set(names)) != len(names):
        raise UsageError(f"leave-one-model-out needs two or more distinct models, got {', '.join(names) or 'none'}")
    everything = fit_surrogate(runs, target=target, **fit_kwargs)
    models = []
    for k, held in enumerate(runs):
        others = fit_surrogate([r for n, r in enumerate(runs) if n != k], target=target, **fit_kwargs)
        figures = _judge(held, target, {"learned_in_sample": everything, "learned_out_of_model": others}, top_fraction)
        rho_out, rho_prior = figures["learned_out_of_model"]["spearman"], figures["prior"]["spearman"]
        wins = is_finite_number(rho_out) and (not is_finite_number(rho_prior) or rho_out > rho_prior)
        models.append({"model": held.model, **figures, "wins": bool(wins), "trained_on": others.trained_on,
                       "penalty": others.penalty, "top_weights": dict(list(others.weights().items())[:8])})
    won = sum(m["wins"] for m in models)
    ship = won > len(models) / 2
    verdict = (f"ship the learned score: out of model it beats the hand-set prior's Spearman on {won} of {len(models)}"
               " held-out models" if ship else "do not ship the learned score: out of model it beats the hand-set"
               f" prior's Spearman on only {won} of {len(models)} held-out models; keep the hand-set prior")
    settings = {"target": target, "top_fraction": top_fraction, "models": names, **fit_kwargs,
                "win_rule": "out-of-model Spearman above the prior's on the held-out model; ship on a majority"}
    return LomoReport(verdict=verdict, ship=ship, target=target, models=models, settings=settings, surrogate=everything)


# --------------------------------------------------------------------------- reading runs


def sweep_outcomes(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> dict[str, dict[str, tuple[Any, bool]]]:
    """validate's :func:`~rys_forge.research.validate.outcome_columns` plus ``z:<task>`` (already oriented:
    positive = better), whose positive flag is the task's delta rule."""
    outcomes = outcome_columns(rows, tasks)
    for task in tasks:
        flags = outcomes[f"delta:{task}"]
        outcomes[f"z:{task}"] = {r["window"]: (((r.get("tasks") or {}).get(task) or {}).get("z", r.get(f"z:{task}")),
                                               flags[r["window"]][1]) for r in rows}
    return outcomes


def load_run(model: str, rank_dir: str | Path, sweep: str | Path, repeats: int | None = None) -> ModelRun:
    """A :class:`ModelRun` from a rank run folder and a sweep run folder (or its CSV table).

    ``model`` names it in the report; ``sweep`` is a sweep run folder or a ``.csv`` table (:func:`read_sweep_table`);
    ``repeats``: sweep rows with this many visits (default: 2 if present, else the smallest). Raises UsageError
    on a bad folder or file, or without sweep rows with ``repeats``.
    """
    rank_rows, rank_summary = read_rank_run(Path(rank_dir))
    sweep = Path(sweep)
    rows, summary = read_sweep(sweep)
    available = sorted({int(r["repeats"]) for r in rows if is_finite_number(r.get("repeats"))})
    chosen = repeats if repeats is not None else (2 if 2 in available else (available or [None])[0])
    if chosen not in available:
        raise UsageError(f"{sweep} has no sweep rows with repeats={chosen}; it has {', '.join(map(str, available)) or 'none'}")
    rows = [r for r in rows if r.get("repeats") == chosen]
    tasks = list(summary.get("tasks") or dict.fromkeys(t for r in rows for t in (r.get("tasks") or {})))
    source = model_label(rank_summary["model"]) if rank_summary.get("model") else None
    return ModelRun(rows=rank_rows, outcomes=sweep_outcomes(rows, tasks), model=model, source=source)


def check_learn_outputs(out: str | Path | None, report_out: str | Path | None) -> None:
    """Before any work: ``out`` (the score file) and ``report_out`` (the report) can be written, are not the same
    file, and replace nothing but an earlier learn-score file of their kind.

    Raises:
        UsageError: naming the option (``--out``, ``--report``), the path and what to do.
    """
    if out is not None and report_out is not None and Path(out).absolute() == Path(report_out).absolute():
        raise UsageError(f"--out and --report are the same file ({out}); give the report its own name")
    for flag, path, kind in (("--out", out, "learned score"), ("--report", report_out, "learn-score report")):
        if path is None:
            continue
        problem = output_problem(path, folder=False)
        if problem is not None:
            raise UsageError(f"cannot write {flag} {path}: {problem}")
        if Path(path).exists() and not _is_earlier(Path(path), flag):
            raise UsageError(f"{flag} {path} exists and is not a {kind} file rys-forge learn-score wrote; choose"
                             " another name or remove it")


def _is_earlier(path: Path, flag: str) -> bool:
    """Whether ``path`` holds a file learn-score wrote for ``flag`` (a score, or a report)."""
    if flag == "--out":
        try:
            LearnedScore.load(path)
        except UsageError:
            return False
        return True
    return json_marker(path, REPORT_KEY) == 1


def learn_score(runs: Sequence[tuple[str, str | Path, str | Path]], *, out: str | Path | None = None,
                report_out: str | Path | None = None, repeats: int | None = None, **kwargs: Any) -> LomoReport:
    """Load ``(model, rank_dir, sweep)`` triples (:func:`load_run`), judge them with :func:`leave_one_model_out`
    (``kwargs``), and write the fit on every model to ``out`` and the report to ``report_out`` (JSON, atomically).

    Everything is checked and computed before the first file is written: a bad input writes nothing.

    Raises:
        UsageError: fewer than two runs, a repeated model name, an output that cannot or must not be replaced
            (:func:`check_learn_outputs`), a bad folder or file (:func:`load_run`), or what the fit raises.
    """
    names = [str(run[0]) for run in runs]
    if len(names) < 2 or len(set(names)) != len(names):
        raise UsageError("learn-score needs --run for two or more distinct models (a leave-one-model-out needs a model"
                         f" to leave out); got {', '.join(names) or 'none'}")
    check_learn_outputs(out, report_out)
    report = leave_one_model_out([load_run(m, r, s, repeats) for m, r, s in runs], **kwargs)
    report.settings["runs"] = [[str(v) for v in run] for run in runs]
    if out is not None:
        report.surrogate.save(out)
        report.saved_to.append(str(out))
    if report_out is not None:
        Path(report_out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(report_out), json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
        report.saved_to.append(str(report_out))
    return report
