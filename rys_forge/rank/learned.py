"""The learned window score at rank time: read a fitted score file, predict one model's windows, order them.

``rys-forge learn-score`` fits the score (ridge on every probe column, pooled over several models and judged
leave-one-model-out: :mod:`rys_forge.research.surrogate`) and writes it as JSON; ``rank --learned-score FILE``
and ``validate --learned-score FILE`` read it here (:meth:`LearnedScore.load`) and :func:`order_rows` puts a
run's windows in its order, keeping the hand-set prior (``score``) beside it. This module owns the file format.

Prediction for the rows of one rank run (all windows of one model; ``[n]`` rows):

* features: every numeric rank-row column except :data:`NOT_FEATURES`, plus ``i/L`` and ``j/L`` (``L``: the
  model's layers, else the largest ``j``); the score uses its fitted ``columns`` only;
* per model, each column is transformed (``rank``: within-model rank scaled to [-0.5, 0.5]; ``zscore``;
  ``none``): a per-model transform needs all of the model's windows at once, which is what rank has;
* gaps (a missing or non-finite value, a column absent from this run) get the training median, and a 0/1
  ``<column>:missing`` indicator for the columns that had gaps in training;
* the design is standardised with the training means and scales, then ``score = design @ coefficients +
  intercept`` (higher = better). A window with no finite probe value at all (only geometry: ``width``,
  ``i/L``, ``j/L``) gets NaN, as the prior does when its inputs fail.

Usage::

    learned = LearnedScore.load("learned_score.json")
    rows, ordering = order_rows(rows, learned)   # rows best first; ordering goes into summary.json
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from rys_forge.artifacts import rys_forge_version
from rys_forge.errors import UsageError
from rys_forge.files import json_safe, write_atomic
from rys_forge.stats import is_finite_number

__all__ = [
    "FORMAT_KEY", "GEOMETRY_COLUMNS", "LEARNED_COLUMN", "LEARNED_SCORE_FORMAT", "NOT_FEATURES", "TRANSFORMS",
    "LearnedScore", "feature_table", "order_rows", "per_model", "prior_ordering", "row_features", "window_depth",
]

#: Version of the learned-score file, stored under :data:`FORMAT_KEY`.
LEARNED_SCORE_FORMAT = 1
FORMAT_KEY = "rys_forge_surrogate"
#: The rank-row column :func:`order_rows` adds.
LEARNED_COLUMN = "learned_score"
#: Rank-row columns that are bookkeeping, timings, the prior score and its terms, or the learned score: never features.
NOT_FEATURES = frozenset({"i", "j", "rank", "shortlist", "probe_s", "jac_iters", "score", "P", "A", "S", "D", "repeats",
                          LEARNED_COLUMN})
#: Feature columns that describe where the window is, not what a probe measured.
GEOMETRY_COLUMNS = frozenset({"width", "i/L", "j/L"})
#: Per-model transforms of features and target.
TRANSFORMS = ("rank", "zscore", "none")


# --------------------------------------------------------------------------- features


def window_depth(rows: Sequence[dict[str, Any]]) -> int:
    """The largest finite ``j`` of ``rows`` (0 if none): the layer count when every depth was probed."""
    return max([int(r["j"]) for r in rows if is_finite_number(r.get("j"))] or [0])


def row_features(row: dict[str, Any], num_layers: int) -> dict[str, float]:
    """The row's numeric feature values (non-finite -> NaN; strings and booleans never count), with ``i/L``, ``j/L``."""
    out = {k: float(v) if is_finite_number(v) else math.nan for k, v in row.items()
           if k not in NOT_FEATURES and isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))}
    for key in ("i", "j"):
        value = row.get(key)
        out[f"{key}/L"] = float(value) / num_layers if is_finite_number(value) and num_layers else math.nan
    return out


def feature_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], num_layers: int | None = None) -> np.ndarray:
    """``[n, len(columns)]`` feature values of ``rows``, NaN where a column is missing or not finite."""
    depth = num_layers or window_depth(rows)
    values = [row_features(r, depth) for r in rows]
    return np.array([[v.get(c, math.nan) for c in columns] for v in values], dtype=float).reshape(len(rows), len(columns))


def per_model(values: np.ndarray, how: str) -> np.ndarray:
    """Column-wise within-model transform of ``[n, c]`` values (``rank``, ``zscore`` or ``none``; NaN stays NaN;
    a column with fewer than two finite values becomes 0 unless ``none``)."""
    out = np.full_like(values, np.nan)
    for k in range(values.shape[1]):
        column, ok = values[:, k], np.isfinite(values[:, k])
        if how == "none" or ok.sum() < 2:
            out[ok, k] = column[ok] if how == "none" else 0.0
        elif how == "rank":
            out[ok, k] = (scipy_stats.rankdata(column[ok]) - 1.0) / (ok.sum() - 1.0) - 0.5
        else:
            sd = column[ok].std()
            out[ok, k] = (column[ok] - column[ok].mean()) / (sd if sd > 0 else 1.0)
    return out


# --------------------------------------------------------------------------- the score and its file


@dataclass
class LearnedScore:
    """A fitted learned score: :meth:`predict` applies it to one model's rank rows.

    Attributes: ``columns`` (base features, in order) and ``indicators`` (those with a ``:missing`` column);
    ``medians`` (imputation per base column, after the per-model transform); ``means``/``scales`` (per design
    column: base columns, then indicators); ``coefficients``/``intercept`` (ridge on the standardised design);
    ``penalty`` (its ``lambda``); the transforms and ``target``; ``trained_on`` (model names) and ``n_windows``;
    ``cv`` (the inner cross-validation); ``rank_models`` (the model each training rank run recorded, for
    validate's in-sample check). ``origin`` (``file``, ``path``, ``sha256`` of a loaded or saved file) is not stored.
    """

    columns: list[str]
    indicators: list[str]
    medians: list[float]
    means: list[float]
    scales: list[float]
    coefficients: list[float]
    intercept: float
    penalty: float
    feature_transform: str
    target: str
    target_transform: str
    trained_on: list[str]
    n_windows: int
    cv: dict[str, Any] = field(default_factory=dict)
    rank_models: list[str] = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def design_names(self) -> list[str]:
        return [*self.columns, *(f"{c}:missing" for c in self.indicators)]

    def design(self, rows: Sequence[dict[str, Any]], num_layers: int | None = None) -> np.ndarray:
        """``[n, d]`` standardised design of one model's rows (transform, impute, indicators, scale)."""
        values = per_model(feature_table(rows, self.columns, num_layers), self.feature_transform)
        missing = ~np.isfinite(values)
        values = np.where(missing, np.asarray(self.medians, dtype=float)[None, :], values)
        full = np.concatenate([values, missing[:, [self.columns.index(c) for c in self.indicators]]], axis=1)
        return (full - np.asarray(self.means)[None, :]) / np.asarray(self.scales)[None, :]

    def predict(self, rows: Sequence[dict[str, Any]], num_layers: int | None = None) -> np.ndarray:
        """``[n]`` learned score of ``rows`` (all windows of one model; higher = better); NaN for a row with no
        finite value in any of the score's probe columns. ``num_layers``: the model's (default: the largest ``j``)."""
        scores = self.design(rows, num_layers) @ np.asarray(self.coefficients) + self.intercept
        probes = [c for c in self.columns if c not in GEOMETRY_COLUMNS]
        if probes:
            scores[~np.isfinite(feature_table(rows, probes, num_layers)).any(axis=1)] = math.nan
        return scores

    def missing_columns(self, rows: Sequence[dict[str, Any]]) -> list[str]:
        """The score's columns with no finite value in any of ``rows`` (imputed with the training median)."""
        table = feature_table(rows, self.columns)
        return [c for k, c in enumerate(self.columns) if not np.isfinite(table[:, k]).any()]

    def weights(self) -> dict[str, float]:
        """Coefficient per design column, largest magnitude first (per standard deviation of the column)."""
        pairs = sorted(zip(self.design_names, self.coefficients), key=lambda p: -abs(p[1]))
        return {k: float(v) for k, v in pairs}

    def to_dict(self) -> dict[str, Any]:
        body = {k: v for k, v in asdict(self).items() if k != "origin"}
        return json_safe({FORMAT_KEY: LEARNED_SCORE_FORMAT, "rys_forge_version": rys_forge_version(), **body})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def sha256(self) -> str:
        """sha256 of the file it came from (or was saved to), else of its JSON text."""
        return self.origin.get("sha256") or hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str, name: str = "learned score") -> "LearnedScore":
        """The score of :meth:`to_json` text; ``name`` starts the error messages (e.g. ``learned score FILE``).

        Raises:
            UsageError: not JSON, another format, an unknown or missing key, or values that do not fit together.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{name} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
        if not isinstance(data, dict) or data.get(FORMAT_KEY) != LEARNED_SCORE_FORMAT:
            raise UsageError(f"{name}: not a learned-score file of format {LEARNED_SCORE_FORMAT} (no '{FORMAT_KEY}':"
                             f" {LEARNED_SCORE_FORMAT}); write one with rys-forge learn-score")
        body = {k: v for k, v in data.items() if k not in (FORMAT_KEY, "rys_forge_version")}
        allowed = [f.name for f in fields(cls) if f.name != "origin"]
        unknown = sorted(set(body) - set(allowed))
        if unknown:
            raise UsageError(f"{name}: unknown key '{unknown[0]}'; allowed: {', '.join(allowed)}")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        absent = [k for k in required if k not in body]
        if absent:
            raise UsageError(f"{name}: missing key '{absent[0]}'")
        problem = _problem(body)
        if problem:
            raise UsageError(f"{name}: {problem}")
        return cls(**body)

    @classmethod
    def load(cls, path: str | Path) -> "LearnedScore":
        """The score in a file written by ``rys-forge learn-score`` (its name and sha256 kept in ``origin``).

        Raises:
            UsageError: the file is missing, a folder, unreadable, or not a valid learned score (:meth:`from_json`).
        """
        file = Path(path)
        try:
            data = file.read_bytes()
            text = data.decode("utf-8")
        except FileNotFoundError:
            raise UsageError(f"learned score not found: {path}") from None
        except IsADirectoryError:
            raise UsageError(f"learned score {path} is a folder; pass the JSON file rys-forge learn-score wrote") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read learned score {path}: {getattr(exc, 'strerror', None) or exc}") from None
        score = cls.from_json(text, name=f"learned score {path}")
        score.origin = {"file": file.name, "path": str(file), "sha256": hashlib.sha256(data).hexdigest()}
        return score

    def save(self, path: str | Path) -> None:
        """Write the score's JSON to ``path`` atomically (the parent folder is created)."""
        file, text = Path(path), self.to_json()
        file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(file, text)
        self.origin = {"file": file.name, "path": str(file), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def _numbers(value: Any, length: int | None = None) -> bool:
    return isinstance(value, list) and all(is_finite_number(v) for v in value) and (length is None or len(value) == length)


def _problem(body: dict[str, Any]) -> str | None:
    """What is wrong with a score file's values (None: they fit together)."""
    columns, indicators = body["columns"], body["indicators"]
    if not (isinstance(columns, list) and columns and all(isinstance(c, str) for c in columns)):
        return "'columns' must be a non-empty list of column names"
    if not (isinstance(indicators, list) and set(indicators) <= set(columns)):
        return "'indicators' must be a list of names from 'columns'"
    width = len(columns) + len(indicators)
    for key, length in (("medians", len(columns)), ("means", width), ("scales", width), ("coefficients", width)):
        if not _numbers(body[key], length):
            return f"'{key}' must be a list of {length} finite numbers"
    if not all(s > 0 for s in body["scales"]):
        return "'scales' must be positive"
    for key in ("intercept", "penalty"):
        if not is_finite_number(body[key]):
            return f"'{key}' must be a finite number, got {body[key]!r}"
    for key in ("feature_transform", "target_transform"):
        if body[key] not in TRANSFORMS:
            return f"'{key}' must be one of {', '.join(TRANSFORMS)}, got {body[key]!r}"
    for key in ("trained_on", "rank_models"):
        if not (isinstance(body.get(key, []), list) and all(isinstance(m, str) for m in body.get(key, []))):
            return f"'{key}' must be a list of model names"
    if not isinstance(body["target"], str) or not isinstance(body["n_windows"], int):
        return "'target' must be a string and 'n_windows' an integer"
    if not isinstance(body.get("cv", {}), dict):
        return "'cv' must be an object"
    return None


# --------------------------------------------------------------------------- ordering a rank run


def prior_ordering() -> dict[str, Any]:
    """summary.json's ``ordering`` record of a run ordered by the hand-set prior."""
    return {"ordering_score": "prior", "column": "score", "formula": "Score(B) = P*A*S*D (constants: score_config)"}


def _best_first(rows: Sequence[dict[str, Any]], column: str) -> list[dict[str, Any]]:
    """``rows`` by ``column``, best first, non-finite last; ties keep their order (a stable sort)."""
    return sorted(rows, key=lambda r: (0, -float(r[column])) if is_finite_number(r.get(column)) else (1, 0.0))


def order_rows(rows: Sequence[dict[str, Any]], learned: LearnedScore | None = None,
               num_layers: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rank run's rows in the order of the score that ranks them, and the ``ordering`` record for summary.json.

    Args:
        rows: every window's row of one rank run (one model), with its probe columns and prior ``score``.
        learned: a learned score (:meth:`LearnedScore.load`); None orders by the prior ``score``.
        num_layers: the model's decoder layers (for ``i/L``, ``j/L``; default: the largest ``j`` of ``rows``).

    Returns:
        The rows best first (NaN scores last, ties in their incoming order) and the record: ``{"ordering_score":
        "prior", "column": "score", ...}``, or with ``learned`` ``{"ordering_score": "learned", "column":
        "learned_score", "file", "sha256", "fitted_on", "target", "features", "missing_columns", ...}``. With
        ``learned`` each row gains a ``learned_score`` entry (in place); its ``score`` (the prior) is kept.

    Raises:
        UsageError: none of the learned score's probe columns is in ``rows`` (it was fitted on other probes).
    """
    if learned is None:
        return _best_first(rows, "score"), prior_ordering()
    missing = learned.missing_columns(rows)
    probes = [c for c in learned.columns if c not in GEOMETRY_COLUMNS]
    if probes and set(probes) <= set(missing):
        name = learned.origin.get("path", "in memory")
        raise UsageError(f"learned score {name}: none of its probe columns ({', '.join(probes[:6])}"
                         f"{', ...' if len(probes) > 6 else ''}) is in the rank rows; rank with the probes it was fitted on")
    for row, value in zip(rows, learned.predict(rows, num_layers).tolist()):
        row[LEARNED_COLUMN] = value
    record = {
        "ordering_score": "learned", "column": LEARNED_COLUMN, "file": learned.origin.get("file"),
        "sha256": learned.sha256(), "fitted_on": list(learned.trained_on), "rank_models": list(learned.rank_models),
        "target": learned.target, "features": len(learned.columns), "feature_transform": learned.feature_transform,
        "missing_columns": missing, "prior_column": "score",
    }
    return _best_first(rows, LEARNED_COLUMN), record
