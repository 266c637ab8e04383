"""calibrate: the vectorised score against the formula, the fit on synthetic outcomes, and the in-/out-of-sample
bookkeeping through validate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from rys_forge.research.calibrate import BOUNDS, calibrate_score, fit_constants
from rys_forge.errors import UsageError
from rys_forge.rank.score import SCORE_INPUTS, ScoreConfig, score, score_terms
from rys_forge.research.validate import validate_runs

TRUE = {"alpha": 1.5, "c": 0.02, "beta": 0.5, "gamma": 0.2, "eta": 4.0}


def _windows(n_layers: int = 14, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_layers):
        for j in range(i + 2, n_layers + 1):
            rows.append({
                "window": f"{i}:{j}", "i": i, "j": j,
                "cka_plateau": float(rng.uniform(0.3, 1.0)), "delta_0": float(rng.uniform(0.0, 0.4)),
                "r_0": float(rng.uniform(0.5, 1.5)), "d_dec": float(rng.uniform(0.0, 0.3)), "d_kl": float(rng.uniform(0.0, 2.0)),
            })
    return rows


def _folders(tmp_path, name: str, model: str, rows: list[dict], outcome: np.ndarray) -> tuple:
    rank, sweep = tmp_path / f"rank_{name}", tmp_path / f"sweep_{name}"
    rank.mkdir()
    sweep.mkdir()
    rank_rows = [{**r, **score(r, ScoreConfig())} for r in rows]
    (rank / "windows.json").write_text(json.dumps(rank_rows))
    (rank / "summary.json").write_text(json.dumps({"model": {"source": model}}))
    sweep_rows = [{"window": r["window"], "i": r["i"], "j": r["j"], "repeats": 2, "combined_z": float(z),
                   "tasks": {"t": {"delta": float(z) / 100, "z": float(z), "p_value": 0.5}}, "delta:t": float(z) / 100}
                  for r, z in zip(rows, outcome)]
    (sweep / "sweep.json").write_text(json.dumps({"rows": sweep_rows}))
    (sweep / "summary.json").write_text(json.dumps({"model": {"source": model}, "tasks": ["t"]}))
    return rank, sweep


def test_score_terms_match_the_formula():
    row = {"cka_plateau": 0.9, "delta_0": 0.05, "r_0": 1.2, "d_dec": 0.1, "d_kl": 0.3}
    cfg = ScoreConfig()
    p = math.exp(-cfg.alpha * 0.1)
    a = 0.05 / (0.05 + cfg.c)
    s = math.exp(-cfg.beta * 0.2)
    d = math.exp(-cfg.gamma * 0.1 - cfg.eta * 0.3)
    assert score(row, cfg) == pytest.approx({"P": p, "A": a, "S": s, "D": d, "score": p * a * s * d}, rel=1e-12)
    assert score({**row, "r_0": 0.7}, cfg)["S"] == 1.0  # no penalty below r_0 = 1
    assert math.isnan(score({**row, "r_0": math.nan}, cfg)["score"])
    many = score_terms(*(np.array([row[k], row[k]]) for k in SCORE_INPUTS), **TRUE)["score"]
    assert many.shape == (2,) and many[0] == pytest.approx(score(row, ScoreConfig(**TRUE))["score"])


def test_fit_recovers_an_ordering_generated_by_known_constants():
    rows = _windows()
    inputs = np.array([[r[k] for r in rows] for k in SCORE_INPUTS])
    target = np.log(score_terms(*inputs, **TRUE)["score"])  # a monotone function of the true score
    defaults = {k: getattr(ScoreConfig(), k) for k in BOUNDS}
    start = stats.spearmanr(score_terms(*inputs, **defaults)["score"], target)[0]
    params, value = fit_constants(inputs, target, start=defaults, trials=600, seed=0)
    assert value > 0.99 > start
    assert value == pytest.approx(stats.spearmanr(score_terms(*inputs, **params)["score"], target)[0], abs=1e-12)
    assert all(BOUNDS[k][0] <= v <= BOUNDS[k][1] for k, v in params.items())


def test_calibrate_writes_a_config_that_rank_and_validate_read(tmp_path):
    rows = _windows()
    inputs = np.array([[r[k] for r in rows] for k in SCORE_INPUTS])
    rng = np.random.default_rng(1)
    outcome = np.log(score_terms(*inputs, **TRUE)["score"]) + rng.normal(0, 0.05, len(rows))
    rank, sweep = _folders(tmp_path, "a", "model-a", rows, outcome)
    out = tmp_path / "score.json"
    result = calibrate_score(sweep, rank, out=out, trials=300, folds=3, seed=0)
    report = json.loads(out.read_text())
    assert report["fitted"]["spearman"] > report["default"]["spearman"]
    assert report["fitted"]["spearman"] == pytest.approx(
        stats.spearmanr(score_terms(*inputs, **report["fitted"]["params"])["score"], outcome)[0], abs=1e-9)
    assert report["cross_validated"]["folds"] == 3 and len(report["cross_validated"]["per_fold_spearman"]) == 3
    assert report["cross_validated"]["mean_spearman"] > 0.9
    config = ScoreConfig.from_json(out)
    assert config.fitted_on["source"] == "model-a" and config.alpha == pytest.approx(result.config.alpha)
    # in-sample on the calibration model, out-of-sample on another one
    same = validate_runs(rank, sweep, score_config=config, n_permutations=50)
    assert same.calibration["in_sample"] is True and "in-sample" in same.verdict.lower()
    # validate re-scored the rank rows with the fitted constants (the rows on disk hold the default score)
    assert same.correlations["score"]["combined_z"]["spearman"] == pytest.approx(report["fitted"]["spearman"], abs=1e-9)
    rank_b, sweep_b = _folders(tmp_path, "b", "model-b", _windows(seed=5), outcome)
    other = validate_runs(rank_b, sweep_b, score_config=config, n_permutations=50)
    assert other.calibration["in_sample"] is False and "out-of-sample" in other.verdict.lower()


def test_calibrate_orients_a_lower_is_better_task(tmp_path):
    """`--target delta:<task>` counts a drop of a lower-is-better metric as a gain, as validate does."""
    rows = _windows()
    inputs = np.array([[r[k] for r in rows] for k in SCORE_INPUTS])
    outcome = np.log(score_terms(*inputs, **TRUE)["score"])
    rank, sweep = _folders(tmp_path, "lower", "m", rows, -outcome)  # delta = -outcome / 100: lower is better
    data = json.loads((sweep / "sweep.json").read_text())
    for row in data["rows"]:
        row["tasks"]["t"]["higher_is_better"] = False
    (sweep / "sweep.json").write_text(json.dumps(data))
    report = calibrate_score(sweep, rank, target="delta:t", trials=5, folds=0).report
    want = stats.spearmanr(score_terms(*inputs, **{k: getattr(ScoreConfig(), k) for k in BOUNDS})["score"], outcome)[0]
    assert report["default"]["spearman"] == pytest.approx(want, abs=1e-9) and want > 0


def test_calibrate_refuses_bad_input(tmp_path):
    rows = _windows(n_layers=5)  # 10 windows
    rank, sweep = _folders(tmp_path, "s", "m", rows, np.arange(len(rows), dtype=float))
    with pytest.raises(UsageError, match="unknown target"):
        calibrate_score(sweep, rank, target="nonsense", trials=5)
    (rank / "windows.json").write_text(json.dumps([{**r, "d_kl": None} for r in rows]))
    with pytest.raises(UsageError, match="at least 10"):
        calibrate_score(sweep, rank, trials=5)
    with pytest.raises(UsageError, match="not a finished rank run"):
        calibrate_score(sweep, tmp_path / "missing", trials=5)
    (rank / "windows.json").write_text(json.dumps(rows))
    with pytest.raises(UsageError, match="more than the 10 windows"):
        calibrate_score(sweep, rank, trials=5, folds=11)


def test_cli_calibrate_then_validate(tmp_path):
    from click.testing import CliRunner

    from rys_forge.cli import main

    rows = _windows()
    inputs = np.array([[r[k] for r in rows] for k in SCORE_INPUTS])
    rank, sweep = _folders(tmp_path, "c", "model-c", rows, np.log(score_terms(*inputs, **TRUE)["score"]))
    out = tmp_path / "score.json"
    runner = CliRunner()
    result = runner.invoke(main, ["calibrate", str(sweep), str(rank), "-o", str(out), "--trials", "200", "--folds", "2"])
    assert result.exit_code == 0, result.output
    assert "in-sample" in result.output and json.loads(out.read_text())["score"]["fitted_on"]["source"] == "model-c"
    result = runner.invoke(main, ["validate", str(rank), str(sweep), "--score-config", str(out), "--permutations", "20",
                                  "--out", str(tmp_path / "v")])
    assert result.exit_code == 0, result.output
    assert "In-sample" in result.output
    bad = runner.invoke(main, ["calibrate", str(sweep), str(tmp_path / "nope"), "-o", str(tmp_path / "x.json")])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1 and not (tmp_path / "x.json").exists()


def test_calibrate_replaces_only_an_earlier_calibration(tmp_path):
    """`--out` on an existing file: an earlier calibrate output is replaced; anything else (the rank run's own
    table, a user's file) is refused before any work and left as it was."""
    rows = _windows(n_layers=5)
    rank, sweep = _folders(tmp_path, "s", "m", rows, np.arange(len(rows), dtype=float))
    table = (rank / "windows.json").read_text()
    with pytest.raises(UsageError, match="not a score config rys-forge calibrate wrote"):
        calibrate_score(sweep, rank, out=rank / "windows.json", trials=5, folds=0)
    assert (rank / "windows.json").read_text() == table
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}\n')
    with pytest.raises(UsageError, match="not a score config"):
        calibrate_score(sweep, rank, out=notes, trials=5, folds=0)
    assert notes.read_text() == '{"mine": 1}\n'
    out = tmp_path / "score.json"
    first = calibrate_score(sweep, rank, out=out, trials=5, folds=0, seed=1)
    second = calibrate_score(sweep, rank, out=out, trials=5, folds=0, seed=2)
    assert json.loads(out.read_text())["search"]["seed"] == 2 and first.report["search"]["seed"] == 1
    assert second.config == ScoreConfig.from_json(out)
