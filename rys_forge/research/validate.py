"""`validate`: does a rank run's Score(B) find the windows a benchmark sweep says are positive?

Tests the seeds' falsifiable claim, "the top decile of Score(B), computed without benchmark labels, should
contain a statistically significant enrichment of benchmark-positive RYS windows", on the windows present in
both a ``rank`` run folder (``windows.json``) and a ``sweep`` run folder (``sweep.json``, or the
``sweep.jsonl`` log of an unfinished sweep; rows with ``repeats`` = 2 unless told otherwise).

Outcomes: ``combined_z`` (Stouffer over the sweep's tasks), per task ``delta:<task>`` (oriented so that
positive = better) and, for a raced sweep, ``race_estimate`` (the headline there: windows stopped early have
no combined z). A window is **benchmark-positive** for ``combined_z`` when ``combined_z > 1.96``; for a task
when ``delta > 0`` and the paired test's ``p < 0.05``; for ``race_estimate`` when the race called it positive.

Statistics, per outcome (the functions live in :mod:`rys_forge.stats`):

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
``score_config`` re-scores the rank rows with other constants; ``learned_score`` (``--learned-score``, from
``learn-score``) puts a learned score in the score's place, in-sample when fitted on the rank run's model.

``validation.json``, ``evaluations_to_best.png`` and ``score_vs_outcome.png`` go atomically into ``out_dir``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from rys_forge.errors import RysForgeError, UsageError, os_error_message
from rys_forge.evaluate import format_p, format_significant
from rys_forge.evaluate.report import check_writable
from rys_forge.files import json_marker, json_safe, write_atomic
from rys_forge.rank import LearnedScore, order_rows, read_rank_run, score
from rys_forge.research.sweep import read_sweep
from rys_forge.research.sweep_outputs import POSITIVE_P, POSITIVE_RULES, headline_outcome, outcome_columns
from rys_forge.stats import (bottom_mask, correlation, evaluations_to_best, hypergeom_enrichment_p, is_finite_number,
                             matched_permutation, top_count)

__all__ = ["ValidationReport", "check_options", "model_label", "read_rank_run", "validate_runs"]

VALIDATION_FILE = "validation.json"
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
        return json_safe({
            "rys_forge_validation": 1, "verdict": self.verdict, "metric": self.metric, "n_windows": self.n_windows,
            "calibration": self.calibration, "settings": self.settings, "outcomes": self.outcomes,
            "correlations": self.correlations, "notes": self.notes,
        })

    def format_text(self) -> str:
        """Short terminal summary: verdict, headline enrichment, score correlations per outcome."""
        f = format_significant
        lines = [self.verdict, ""]
        for name, outcome in self.outcomes.items():
            e = outcome["enrichment"]
            c = self.correlations.get("score", {}).get(name, {})
            lines.append(
                f"{name}: positives {e['n_positive']}/{e['n_windows']}; top {e['k_top']}: {e['top_positive']} positive"
                f" (rate {f(e['top_rate'])} vs {f(e['overall_rate'])}, p={f(e['hypergeom_p'])});"
                f" matched-CKA rate {f(e['matched'].get('null_rate_mean'))} (p={f(e['matched'].get('p_value'))});"
                f" Spearman {f(c.get('spearman'))}, Kendall {f(c.get('kendall'))}"
            )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


# --------------------------------------------------------------------------- reading runs


def check_options(top_fraction: float, n_permutations: int, seed: int, cka_bins: int = 10, out: Path | None = None) -> None:
    """The numeric options of ``validate`` and whether ``out`` can be written, before any work.

    Raises:
        UsageError: naming the option, its value and what is allowed (OutputError: ``out`` cannot be written).
    """
    if not (isinstance(top_fraction, (int, float)) and 0.0 < top_fraction <= 1.0):
        raise UsageError(f"--top-fraction must be in (0, 1], got {top_fraction}")
    for name, value, low in (("--permutations", n_permutations, 1), ("--seed", seed, 0), ("cka_bins", cka_bins, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
    if out is not None:
        check_writable([Path(out)])
        if Path(out).exists() and json_marker(out, "rys_forge_validation") is None:  # only its own report is replaced
            raise UsageError(f"{out} exists and rys-forge validate did not write it; choose another --out or remove"
                             " it")


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


def model_label(info: Any) -> str:
    """How a model record is named in text: its ``source``, ``name``, ``model`` or ``path`` (or ``str``)."""
    if isinstance(info, dict):
        return str(info.get("source") or info.get("name") or info.get("model") or info.get("path") or info)
    return str(info)


def _calibration(summary: dict[str, Any], learned: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fitting model(s) (with ``learned``, a learned score's ordering record: its own) and whether it is in-sample."""
    fitted = None
    holders = (learned,) if learned else (summary.get("score_config"), summary.get("settings"), summary)
    for holder in holders:
        if isinstance(holder, dict) and holder.get("fitted_on"):
            fitted = holder["fitted_on"]
            break
    model = summary.get("model") or {}
    rank_names = _model_names(model)
    fitted_list = fitted if isinstance(fitted, list) else [fitted]
    fitted_names = set().union(*(_model_names(f) for f in [*fitted_list, *(learned or {}).get("rank_models", [])]))
    in_sample = bool(rank_names & fitted_names) if fitted is not None and rank_names else None
    label = ", ".join(model_label(f) for f in fitted_list)
    what = "learned score" if learned else "score constants"
    if in_sample is True:
        text = (
            f"in-sample: the {what} {'was' if learned else 'were'} fitted on {label}, including the model validated"
            " here; this is not an independent test of the claim"
        )
    elif in_sample is False:
        text = f"out-of-sample: {what} fitted on {label}, validated on {model_label(model)}"
    else:
        text = f"calibration model not recorded in the rank run ({what}: defaults or unknown origin)"
    return {"fitted_on": fitted, "rank_model": model.get("source") if isinstance(model, dict) else model,
            "in_sample": in_sample, "text": text}


def _sweep_rows(sweep_dir: Path, repeats: int | None) -> tuple[list[dict[str, Any]], dict[str, Any], int, list[str]]:
    """The sweep's rows with the chosen repeat count (default: 2 if present, else the smallest), its
    summary, that repeat count and its tasks."""
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
    return sweep_rows, sweep_summary, repeats, tasks


# --------------------------------------------------------------------------- statistics per outcome


@dataclass
class _Windows:
    """The windows in both runs, best score first: names, top set, plateau CKA and low-CKA set (``[n]``)."""

    names: list[str]
    top: np.ndarray
    cka: np.ndarray
    low: np.ndarray

    @property
    def k(self) -> int:
        return int(self.top.sum())


def _outcome(name: str, column: dict[str, Any], windows: _Windows, n_permutations: int, seed: int,
             cka_bins: int) -> dict[str, Any]:
    """``enrichment`` of positives in the top set (vs all, CKA-matched and low-CKA windows) and the
    ``evaluations`` to the best, for one outcome column."""
    names, top, low, k, n = windows.names, windows.top, windows.low, windows.k, len(windows.names)
    pairs = [column.get(w, (None, False)) for w in names]
    values = [v for v, _ in pairs]
    positive = np.array([bool(flag) for _, flag in pairs], dtype=bool)
    has_value = np.array([is_finite_number(v) for v in values])
    n_pos = int(positive.sum())
    top_pos = int(positive[top].sum())
    low_pos = int(positive[low].sum())
    fisher_p = math.nan
    if low.any():
        fisher_p = float(scipy_stats.fisher_exact([[top_pos, k - top_pos], [low_pos, int(low.sum()) - low_pos]], alternative="greater")[1])
    enrichment = {
        "positive_rule": POSITIVE_RULES.get(name, f"delta > 0 and p < {POSITIVE_P}"),
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
        "matched": matched_permutation(positive, windows.cka, top, n_permutations=n_permutations, seed=seed, n_bins=cka_bins),
        "low_cka": {"k": int(low.sum()), "positive": low_pos, "rate": low_pos / low.sum() if low.any() else math.nan,
                    "fisher_p_top_greater": fisher_p, "windows": [w for w, l in zip(names, low) if l]},
    }
    return {"enrichment": enrichment, "evaluations": evaluations_to_best(values, n_permutations, seed)}


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


def _run_notes(sweep_rows: Sequence[dict[str, Any]], outcomes: dict[str, Any], rank_rows: Sequence[dict[str, Any]],
               rank_summary: dict[str, Any], sweep_summary: dict[str, Any]) -> list[str]:
    """Single-task positives, a model mismatch between the runs, swept windows missing from the rank run."""
    notes: list[str] = []
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
            f"the rank run is of {model_label(rank_summary.get('model'))} but the sweep of {model_label(sweep_summary.get('model'))}"
        )
    missing = len({r["window"] for r in sweep_rows} - {r["window"] for r in rank_rows})
    if missing:
        notes.append(f"{missing} swept windows are not in the rank run (left out)")
    return notes


def _verdict(metric: str, outcome: dict[str, Any], calibration: dict[str, Any]) -> str:
    e, ev = outcome["enrichment"], outcome["evaluations"]
    matched = e["matched"]
    rule = e["positive_rule"]
    head = (
        f"top-{'decile' if abs(e['k_top'] / e['n_windows'] - 0.1) < 0.05 else 'set'} positive rate"
        f" {e['top_rate']:.2f} vs {e['overall_rate']:.2f} overall, p={format_p(e['hypergeom_p'], short=True)}"
    )
    rate = matched.get("null_rate_mean")
    matched_text = (
        f"{rate:.2f} in CKA-matched random windows, p={format_p(matched.get('p_value'), short=True)}"
        if is_finite_number(rate) else "no CKA-matched comparison (no plateau CKA)"
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
            f" (random order: {best['random_expected']:.1f} expected, p={format_p(best['p_value'], short=True)})"
        )
    return text + ". " + calibration["text"][:1].upper() + calibration["text"][1:] + "."


# --------------------------------------------------------------------------- entry point


def _rescored(rows: list[dict[str, Any]], summary: dict[str, Any], config: Any, learned: LearnedScore | None) -> tuple[
        list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """The rank rows with ``score`` recomputed from ``config`` or replaced by the ``learned`` score (the prior
    kept as ``prior_score``), the summary, and the ordering record (which score orders the windows)."""
    if config is not None and learned is not None:
        raise UsageError("give --score-config or --learned-score, not both: each re-scores the rank rows")
    if config is not None:
        rows = [{**r, **score(r, config)} for r in rows]
        return rows, {**summary, "score_config": config.to_dict()}, {"ordering_score": "score_config", "column": "score"}
    if learned is None:
        return rows, summary, {"ordering_score": "the rank run's score", "column": "score"}
    depth = (summary.get("architecture") or {}).get("num_layers")
    rows, ordering = order_rows([dict(r) for r in rows], learned, depth if is_finite_number(depth) and depth > 0 else None)
    column = ordering["column"]  # the learned score takes the score's place
    rows = [{**{k: v for k, v in r.items() if k != column}, "prior_score": r.get("score"), "score": r[column]} for r in rows]
    return rows, summary, ordering


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
    learned_score: LearnedScore | None = None,
) -> ValidationReport:
    """Compare a rank run's score with a sweep run's benchmark outcomes (see the module docstring).

    Args:
        rank_dir: a finished ``rys-forge rank`` run folder (``windows.json``, ``summary.json``).
        sweep_dir: a ``rys-forge sweep`` run folder (``sweep.json``, or ``sweep.jsonl`` if unfinished).
        out_dir: folder for ``validation.json`` and figures (None: nothing is written).
        top_fraction: size of the top set by score (0.1: the top decile), and of the low-CKA set.
        n_permutations: draws of the matched-CKA permutation test (and, up to 2000, of the random curves).
        seed: seed of the numpy Generator (results are deterministic given it).
        metric: the headline outcome: ``combined_z`` (``race_estimate`` for a raced sweep), ``delta:<task>``, a task.
        repeats: which sweep rows to use (default: 2 if present, else the smallest repeat count).
        score_key: the rank column that orders windows.
        cka_key: the rank column used for CKA matching.
        cka_bins: quantile bins of the matched-CKA test.
        score_config: a :class:`rys_forge.rank.score.ScoreConfig` (e.g. from ``calibrate``) to re-score the
            rank rows with, from their stored probe metrics; its ``fitted_on`` decides in- vs out-of-sample.
        learned_score: a :class:`~rys_forge.rank.LearnedScore` (from ``learn-score``) to order the rank rows by
            instead: each row's ``score`` becomes its learned score (the prior is kept as ``prior_score``);
            its ``fitted_on`` models decide in- vs out-of-sample. Not together with ``score_config``.

    Raises:
        UsageError: a folder is not a run of the right kind, no window is in both, ``metric`` is unknown, or
            both ``score_config`` and ``learned_score`` are given (or the latter's columns are not in the rows).
    """
    check_options(top_fraction, n_permutations, seed, cka_bins, None if out_dir is None else Path(out_dir) / VALIDATION_FILE)
    rank_dir, sweep_dir = Path(rank_dir), Path(sweep_dir)
    rank_rows, rank_summary, ordering = _rescored(*read_rank_run(rank_dir), score_config, learned_score)
    sweep_rows, sweep_summary, repeats, tasks = _sweep_rows(sweep_dir, repeats)
    outcomes_raw = outcome_columns(sweep_rows, tasks)
    metric = headline_outcome(metric, outcomes_raw)

    swept = {r["window"] for r in sweep_rows}
    joined = [r for r in rank_rows if r.get("window") in swept and is_finite_number(r.get(score_key))]
    if not joined:
        raise UsageError(f"no window with a finite {score_key} is in both {rank_dir} and {sweep_dir}")
    # score order, best first; ties keep the (i, j) order
    joined.sort(key=lambda r: (-float(r[score_key]), int(r.get("i", 0)), int(r.get("j", 0))))
    names = [r["window"] for r in joined]
    top = np.arange(len(joined)) < top_count(len(joined), top_fraction)
    cka = np.array([float(r[cka_key]) if is_finite_number(r.get(cka_key)) else np.nan for r in joined])
    notes = [] if np.isfinite(cka).any() else [f"the rank rows have no {cka_key}: no CKA-matched or low-CKA comparison"]
    windows = _Windows(names, top, cka, bottom_mask(cka, top_fraction))  # the same low set for every outcome
    outcomes = {name: _outcome(name, column, windows, n_permutations, seed, cka_bins) for name, column in outcomes_raw.items()}
    notes += _run_notes(sweep_rows, outcomes, rank_rows, rank_summary, sweep_summary)
    calibration = _calibration(rank_summary, ordering if ordering["ordering_score"] == "learned" else None)
    settings = {
        "rank_dir": str(rank_dir), "sweep_dir": str(sweep_dir), "top_fraction": top_fraction,
        "n_permutations": n_permutations, "seed": seed, "metric": metric, "repeats": repeats, "score_key": score_key,
        "cka_key": cka_key, "cka_bins": cka_bins, "tasks": tasks,
        "positive_rule": {**POSITIVE_RULES, "task": f"delta > 0 and paired p < {POSITIVE_P}"},
        "sweep_metrics": sweep_summary.get("metrics"),
        "ordering": ordering,
    }
    report = ValidationReport(
        verdict=_verdict(metric, outcomes[metric], calibration), metric=metric, n_windows=len(joined),
        outcomes=outcomes, correlations=_correlations(joined, outcomes_raw, names), calibration=calibration,
        settings=settings, notes=notes,
    )
    if out_dir is not None:
        _write(report, Path(out_dir), joined, outcomes_raw, score_key)
    return report


# --------------------------------------------------------------------------- outputs


def _write(report: ValidationReport, out: Path, joined: Sequence[dict[str, Any]], outcomes_raw: dict[str, Any], score_key: str) -> None:
    """Figures, then ``validation.json`` (a figure that fails leaves a note, not a missing report)."""
    target = out / VALIDATION_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        try:
            _figures(report, joined, outcomes_raw, score_key, out)
        except Exception as exc:  # a figure must not cost the numbers
            report.notes.append(f"figures not written: {type(exc).__name__}: {exc}")
        write_atomic(target, json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    except OSError as exc:
        raise RysForgeError(f"cannot write {os_error_message(exc, target)}") from None
    report.saved_to.append(str(target))


def _figures(report: ValidationReport, joined: Sequence[dict[str, Any]], outcomes_raw: dict[str, Any], score_key: str,
             out: Path) -> None:
    from rys_forge.plots import best_so_far_curves, outcome_scatter

    best_so_far_curves({name: o["evaluations"].get("curve") for name, o in report.outcomes.items()},
                       out / "evaluations_to_best.png")
    panels = []
    for name, column in outcomes_raw.items():
        spearman = report.correlations.get(score_key, {}).get(name, {}).get("spearman")
        panels.append({
            "name": name, "title": f"{name}: Spearman {format_significant(spearman, 2)}",
            "x": [float(r[score_key]) for r in joined],
            "y": [column.get(r["window"], (None, False))[0] for r in joined],
            "positive": [column.get(r["window"], (None, False))[1] for r in joined],
        })
    outcome_scatter(panels, score_key, out / "score_vs_outcome.png")
