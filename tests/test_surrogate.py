"""The learned score (rys_forge.research.surrogate) on synthetic rank rows and sweep outcomes: ridge against a
closed-form numpy solve, recovery of a planted signal, no leak of the held-out model into leave-one-model-out,
the JSON round trip, NaN columns, and the readers (a rank folder, a sweep folder and a flat sweep CSV)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy import stats

from rys_forge.errors import UsageError
from rys_forge.rank.learned import LearnedScore
from rys_forge.research.surrogate import (
    feature_columns,
    fit_surrogate,
    leave_one_model_out,
    learn_score,
    load_run,
    ranking_figures,
    read_sweep_table,
    ridge,
    sweep_outcomes,
)
from rys_forge.stats import evaluations_to_reach, hypergeom_enrichment_p

PROBES = ("cka_plateau", "delta_0", "r_0", "d_dec", "d_kl", "mmd2")


def _rows(n_layers: int, seed: int, scale: float = 1.0) -> list[dict]:
    """Every window of width >= 2 with random probe columns (``scale`` stretches them, as another model's
    probes would be), bookkeeping columns, a prior score and a Jacobian column on the first 5 windows only."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_layers):
        for j in range(i + 2, n_layers + 1):
            row = {"window": f"{i}:{j}", "i": i, "j": j, "width": j - i, "class": "refinement", "probe_s": 0.1,
                   **{p: float(scale * rng.normal()) for p in PROBES}, "score": float(rng.uniform())}
            row["rank"] = len(rows) + 1
            row["jac_sv_1"] = float(rng.normal()) if len(rows) < 5 else None
            rows.append(row)
    return rows


def _outcomes(rows: list[dict], values) -> dict:
    """validate-style outcome columns: combined_z and its positive flag (z > 1.96)."""
    return {"combined_z": {r["window"]: (float(v), bool(v > 1.96)) for r, v in zip(rows, values)}}


def _planted(n_layers: int, seed: int, weights: dict[str, float], scale: float = 1.0, noise: float = 0.05):
    rows = _rows(n_layers, seed, scale)
    rng = np.random.default_rng(seed + 100)
    y = np.array([sum(w * r[k] / scale for k, w in weights.items()) for r in rows]) + rng.normal(0, noise, len(rows))
    return rows, _outcomes(rows, y), y


def test_ridge_matches_the_closed_form_on_standardised_columns():
    runs = [(*_planted(10, s, {"delta_0": 1.0, "r_0": -0.5})[:2], f"m{s}") for s in (0, 1)]
    for penalty in (0.5, 3.0, 250.0):  # width = L (j/L - i/L): collinear, so penalty > 0
        fit = fit_surrogate(runs, penalty=penalty, feature_transform="none", target_transform="none")
        rows = [r for rows, _, _ in runs for r in rows]
        y = np.array([o["combined_z"][r["window"]][0] for rows, o, _ in runs for r in rows])
        depth = {"i/L": lambda r: r["i"] / 10, "j/L": lambda r: r["j"] / 10}  # L = 10 layers
        x = np.array([[depth[c](r) if c in depth else r[c] for c in fit.columns] for r in rows])
        assert "jac_sv_1" not in fit.columns and "i/L" in fit.columns and "score" not in fit.columns
        assert set(fit.columns) == {*PROBES, "width", "i/L", "j/L"} and fit.indicators == []
        xs = (x - x.mean(axis=0)) / x.std(axis=0)
        expected = np.linalg.solve(xs.T @ xs + penalty * np.eye(xs.shape[1]), xs.T @ (y - y.mean()))
        np.testing.assert_allclose(fit.coefficients, expected, rtol=1e-8, atol=1e-10)
        assert fit.intercept == pytest.approx(y.mean())
        np.testing.assert_allclose(fit.predict(runs[0][0]), xs[: len(runs[0][0])] @ expected + y.mean(), atol=1e-9)


def test_ridge_path_and_the_cross_validated_penalty_agree_with_the_closed_form():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 5)) + 2.0, rng.normal(size=40)
    coefs, intercepts = ridge(x, y, [0.5, 7.0])
    xc = x - x.mean(axis=0)
    for k, lam in enumerate((0.5, 7.0)):
        b = np.linalg.solve(xc.T @ xc + lam * np.eye(5), xc.T @ (y - y.mean()))
        np.testing.assert_allclose(coefs[k], b, rtol=1e-10)
        assert intercepts[k] == pytest.approx(y.mean() - x.mean(axis=0) @ b)
    runs = [(*_planted(10, s, {"delta_0": 1.0}, noise=1.0)[:2], f"m{s}") for s in (0, 1, 2)]
    fit = fit_surrogate(runs, feature_transform="none", target_transform="none")
    assert fit.cv["scheme"] == "leave-one-model-out" and len(fit.cv["mse"]) == len(fit.cv["penalties"])
    mse = np.round(fit.cv["mse"], 12)
    assert fit.penalty == fit.cv["penalties"][int(np.flatnonzero(mse == mse.min()).max())]  # ties: the larger
    lam = fit.cv["penalties"][4]  # the inner leave-one-model-out MSE at one penalty, by hand
    blocks = [(fit.design(rows), np.array([o["combined_z"][r["window"]][0] for r in rows])) for rows, o, _ in runs]
    errors = []
    for k, (x_test, y_test) in enumerate(blocks):
        x_train = np.concatenate([b[0] for n, b in enumerate(blocks) if n != k])
        y_train = np.concatenate([b[1] for n, b in enumerate(blocks) if n != k])
        xc = x_train - x_train.mean(axis=0)
        b = np.linalg.solve(xc.T @ xc + lam * np.eye(xc.shape[1]), xc.T @ (y_train - y_train.mean()))
        errors.append((y_test - (x_test - x_train.mean(axis=0)) @ b - y_train.mean()) ** 2)
    assert fit.cv["mse"][4] == pytest.approx(np.concatenate(errors).mean(), rel=1e-9)
    again = fit_surrogate(runs, penalty=fit.penalty, feature_transform="none", target_transform="none")
    np.testing.assert_allclose(fit.coefficients, again.coefficients)


def test_a_planted_linear_signal_is_recovered_across_probe_scales():
    weights = {"delta_0": 2.0, "d_kl": -1.0}
    runs = [(*_planted(12, s, weights, scale=sc)[:2], f"m{s}") for s, sc in ((0, 1.0), (1, 30.0), (2, 0.01))]
    fit = fit_surrogate(runs)  # default: per-model rank transforms, penalty by inner CV
    w = fit.weights()
    assert list(w)[:2] == ["delta_0", "d_kl"] and w["delta_0"] > 0 > w["d_kl"]
    assert all(abs(v) < 0.5 * abs(w["d_kl"]) for k, v in w.items() if k not in weights)
    held_rows, _, held_y = _planted(12, 9, weights, scale=1000.0)
    assert stats.spearmanr(fit.predict(held_rows), held_y)[0] > 0.9
    raw = fit_surrogate(runs[:1], penalty=1e-6, feature_transform="none", target_transform="none")
    spread = {k: np.std([r[k] for r in runs[0][0]]) for k in weights}  # a standardised column's weight: w * sd
    for k, v in weights.items():
        assert raw.weights()[k] == pytest.approx(v * spread[k], rel=0.05)


def test_leave_one_model_out_never_sees_the_held_out_rows():
    """m3's outcome is noise that its own column ``leak`` carries (noise in m0..m2, whose outcome follows
    delta_0): only a fit that saw m3's rows can use ``leak``."""
    runs = []
    for s in range(4):
        rows, _, y = _planted(10, s, {"delta_0": 1.0}, noise=0.5)
        noise = np.random.default_rng(50 + s).normal(size=len(rows))
        y = noise if s == 3 else y
        for r, v in zip(rows, noise):
            r["leak"] = float(v)
        runs.append((rows, _outcomes(rows, y), f"m{s}"))
    report = leave_one_model_out(runs, penalty=1.0)
    m3 = next(m for m in report.models if m["model"] == "m3")
    assert m3["trained_on"] == ["m0", "m1", "m2"]
    independent = fit_surrogate(runs[:3], penalty=1.0)
    held_y = [o[0] for o in runs[3][1]["combined_z"].values()]
    assert m3["learned_out_of_model"]["spearman"] == pytest.approx(stats.spearmanr(independent.predict(runs[3][0]), held_y)[0])
    assert m3["learned_in_sample"]["spearman"] > m3["learned_out_of_model"]["spearman"] + 0.1
    assert report.surrogate.trained_on == ["m0", "m1", "m2", "m3"]
    text = report.format_text()
    assert "m3" in text and report.verdict in text and ("do not ship" in report.verdict) == (not report.ship)


def test_ranking_figures_against_the_stats_functions():
    values = [0.5, 3.0, -1.0, 2.5, 0.0, 1.0, 2.0, -2.0, 0.2, 0.1]
    scores = [0.9, 0.1, 0.8, 0.7, math.nan, 0.6, 0.5, 0.4, 0.3, 0.2]
    positive = [v > 1.96 for v in values]
    f = ranking_figures(scores, values, positive, top_fraction=0.2)
    order = [0, 2, 3, 5, 6, 7, 8, 9, 1, 4]  # NaN score last
    assert f["evaluations"] == evaluations_to_reach([values[k] for k in order], 0.9 * 3.0) == 9
    assert f["k_top"] == 2 and f["top_positive"] == 0 and f["n_positive"] == 3
    assert f["enrichment_p"] == pytest.approx(hypergeom_enrichment_p(10, 3, 2, 0))
    assert f["random_expected"] == pytest.approx(11 / 2)  # one window reaches 2.7
    negative = ranking_figures([1.0, 2.0, 3.0], [-3.0, -1.0, -2.0], [False] * 3)
    assert negative["evaluations"] == 2 and negative["threshold_rule"].startswith("the best")
    assert math.isnan(negative["enrichment_p"])


def test_json_round_trip_and_bad_files():
    runs = [(*_planted(10, s, {"delta_0": 1.0})[:2], f"m{s}") for s in (0, 1)]
    fit = fit_surrogate(runs)
    again = LearnedScore.from_json(fit.to_json())
    assert again == fit
    np.testing.assert_array_equal(again.predict(runs[0][0]), fit.predict(runs[0][0]))
    data = json.loads(fit.to_json())
    assert data["rys_forge_surrogate"] == 1 and data["trained_on"] == ["m0", "m1"]
    with pytest.raises(UsageError, match="unknown key 'alpha'"):
        LearnedScore.from_json(json.dumps({**data, "alpha": 1}))
    with pytest.raises(UsageError, match="format"):
        LearnedScore.from_json(json.dumps({"alpha": 1}))
    with pytest.raises(UsageError, match="not valid JSON"):
        LearnedScore.from_json("{")


def test_nan_columns_are_dropped_or_imputed_with_an_indicator():
    runs = []
    for s in (0, 1):
        rows, outcomes, _ = _planted(10, s, {"delta_0": 1.0})
        for k, r in enumerate(rows):
            r["d_kl"] = math.nan if k % 5 == 0 else r["d_kl"]  # 20% missing: kept, imputed, flagged
            r["r_0"] = math.inf if k % 7 == 0 else r["r_0"]  # non-finite counts as missing
            if s == 1:
                del r["mmd2"]  # absent from one training model: dropped
        runs.append((rows, outcomes, f"m{s}"))
    assert "mmd2" not in feature_columns([runs[0][0], runs[1][0]]) and "jac_sv_1" not in feature_columns([runs[0][0]])
    fit = fit_surrogate(runs)
    assert fit.indicators == ["d_kl", "r_0"] and "d_kl:missing" in fit.design_names
    new = [{k: v for k, v in r.items() if k != "d_dec"} for r in _rows(8, 7)]  # a column missing at prediction
    assert np.isfinite(fit.predict(new)).all() and np.isfinite(fit.predict(runs[0][0])).all()


def test_usage_errors():
    rows, outcomes, _ = _planted(10, 0, {"delta_0": 1.0})
    with pytest.raises(UsageError, match="two or more distinct models"):
        leave_one_model_out([(rows, outcomes, "a")])
    with pytest.raises(UsageError, match="unknown target 'z:x'"):
        fit_surrogate([(rows, outcomes, "a")], target="z:x")
    with pytest.raises(UsageError, match="need 10"):
        fit_surrogate([(rows[:5], outcomes, "a")])
    with pytest.raises(UsageError, match="feature_transform"):
        fit_surrogate([(rows, outcomes, "a")], feature_transform="log")


def _sweep_rows(rows: list[dict], y: np.ndarray) -> list[dict]:
    return [{"window": r["window"], "i": r["i"], "j": r["j"], "width": r["width"], "repeats": 2, "combined_z": float(v),
             "tasks": {"t": {"delta": -float(v) / 100, "z": float(v), "p_value": 0.01, "higher_is_better": False}}}
            for r, v in zip(rows, y)]


def test_readers_agree_on_a_folder_and_its_flat_csv(tmp_path):
    rows, _, y = _planted(10, 0, {"delta_0": 1.0})
    rank, sweep = tmp_path / "rank", tmp_path / "sweep"
    rank.mkdir()
    sweep.mkdir()
    (rank / "windows.json").write_text(json.dumps(rows))
    sweep_rows = _sweep_rows(rows, y)
    (sweep / "sweep.json").write_text(json.dumps({"rows": sweep_rows}))
    summary = {"tasks": ["t"], "base": {"t": {"higher_is_better": False}}}
    (sweep / "summary.json").write_text(json.dumps(summary))
    table = tmp_path / "sweep_m_h100.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["window", "i", "j", "width", "repeats", "combined_z", "single_task_verdict",
                                         "delta:t", "z:t", "p:t"])
        writer.writeheader()
        for r in sweep_rows:
            t = r["tasks"]["t"]
            writer.writerow({**{k: r[k] for k in ("window", "i", "j", "width", "repeats", "combined_z")},
                             "single_task_verdict": False, "delta:t": t["delta"], "z:t": t["z"], "p:t": t["p_value"]})
    (tmp_path / "sweep_m_h100_summary.json").write_text(json.dumps(summary))
    csv_rows, csv_summary = read_sweep_table(table)
    assert csv_summary["tasks"] == ["t"] and csv_rows[0]["single_task_verdict"] is False and csv_rows[0]["i"] == 0
    folder_run, csv_run = load_run("m", rank, sweep), load_run("m", rank, table)
    assert folder_run.outcomes == csv_run.outcomes == sweep_outcomes(sweep_rows, ["t"])
    delta = folder_run.outcomes["delta:t"][rows[0]["window"]][0]
    assert delta == pytest.approx(y[0] / 100)  # lower-is-better delta oriented: positive = better
    assert folder_run.outcomes["z:t"][rows[0]["window"]] == (pytest.approx(y[0]), bool(y[0] / 100 > 0))
    with pytest.raises(UsageError, match="repeats=3"):
        load_run("m", rank, sweep, repeats=3)
    report = learn_score([("m", rank, sweep), ("n", rank, table)], out=tmp_path / "out" / "score.json",
                         report_out=tmp_path / "out" / "report.json", penalty=1.0)
    assert report.saved_to == [str(tmp_path / "out" / "score.json"), str(tmp_path / "out" / "report.json")]
    saved = LearnedScore.from_json((tmp_path / "out" / "score.json").read_text())
    np.testing.assert_allclose(saved.predict(rows), report.surrogate.predict(rows))
    assert json.loads((tmp_path / "out" / "report.json").read_text())["settings"]["runs"][1] == ["n", str(rank), str(table)]
