"""The learned score in the product (rys_forge.rank.learned and the CLI): the file's round trip and checks, the
prediction against a hand computation from the file's numbers, the order it gives a rank run and the record of
it, `learn-score` on small rank/sweep folders, its bad input (one line, exit 2, nothing written), `rank
--learned-score` failing before any model loads, and `validate --learned-score`."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from rys_forge.cli import main
from rys_forge.errors import RysForgeError, UsageError
from rys_forge.rank import LearnedScore, order_rows
from rys_forge.rank.learned import LEARNED_COLUMN, prior_ordering
from rys_forge.research.surrogate import fit_surrogate
from rys_forge.research.validate import validate_runs
from test_faults_inputs import _one_line

PROBES = ("cka_plateau", "delta_0", "r_0", "d_dec", "d_kl")
MODELS = (("ma", 10, 1.0), ("mb", 12, 30.0), ("mc", 11, 0.02))


def _model(name: str, layers: int, scale: float, seed: int) -> tuple[list[dict], dict[str, float]]:
    """Every window of width >= 2: probe columns at ``scale``, a noise prior ``score``; the outcome (combined z)
    follows ``delta_0 - d_kl`` plus noise."""
    rng = np.random.default_rng(seed)
    rows, z = [], {}
    for i in range(layers):
        for j in range(i + 2, layers + 1):
            probes = {p: float(rng.normal()) for p in PROBES}
            z[f"{i}:{j}"] = 2.0 * (probes["delta_0"] - probes["d_kl"]) + float(rng.normal(0, 0.5))
            rows.append({"window": f"{i}:{j}", "i": i, "j": j, "width": j - i, "score": float(rng.uniform()),
                         "class": "refinement", **{k: v * scale for k, v in probes.items()}})
    return rows, z


def _runs() -> list[tuple[list[dict], dict, str]]:
    out = []
    for seed, (name, layers, scale) in enumerate(MODELS):
        rows, z = _model(name, layers, scale, seed)
        out.append((rows, {"combined_z": {w: (v, v > 1.96) for w, v in z.items()}}, name))
    return out


def _write_runs(folder: Path) -> list[str]:
    """Minimal rank run folders (windows.json, summary.json: what read_rank_run reads) and sweep run folders
    (sweep.json, summary.json) for MODELS; the ``--run`` arguments."""
    args = []
    for seed, (name, layers, scale) in enumerate(MODELS):
        rows, z = _model(name, layers, scale, seed)
        rank, sweep = folder / f"rank-{name}", folder / f"sweep-{name}"
        rank.mkdir(parents=True)
        sweep.mkdir(parents=True)
        (rank / "windows.json").write_text(json.dumps(rows))
        (rank / "summary.json").write_text(json.dumps({"model": {"source": name}, "architecture": {"num_layers": layers}}))
        sweep_rows = [{"window": r["window"], "i": r["i"], "j": r["j"], "width": r["width"], "repeats": 2,
                       "combined_z": z[r["window"]], "tasks": {}} for r in rows]
        (sweep / "sweep.json").write_text(json.dumps({"rows": sweep_rows}))
        (sweep / "summary.json").write_text(json.dumps({"tasks": [], "model": {"source": name}}))
        args += ["--run", name, str(rank), str(sweep)]
    return args


@pytest.fixture(scope="module")
def fitted() -> LearnedScore:
    return fit_surrogate(_runs()[:2], penalty=5.0)


# --------------------------------------------------------------------------- the file and the prediction


def test_save_and_load_round_trip(fitted, tmp_path):
    path = tmp_path / "sub" / "learned.json"
    fitted.save(path)
    again = LearnedScore.load(path)
    assert again == fitted and again.trained_on == ["ma", "mb"] and again.rank_models == []
    assert again.origin == {"file": "learned.json", "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert again.sha256() == fitted.sha256() == again.origin["sha256"]
    assert json.loads(path.read_text())["rys_forge_surrogate"] == 1 and "origin" not in json.loads(path.read_text())
    assert [p.name for p in path.parent.iterdir()] == ["learned.json"]  # no temporary file left
    rows = _runs()[2][0]
    np.testing.assert_array_equal(again.predict(rows), fitted.predict(rows))


def _by_hand(data: dict, rows: list[dict], num_layers: int) -> np.ndarray:
    """The prediction from the file's numbers alone: per-model rank transform, median imputation with missing
    indicators, standardisation, dot product; NaN where no probe column is finite."""
    depth = {"i/L": lambda r: r["i"] / num_layers, "j/L": lambda r: r["j"] / num_layers}
    raw = np.array([[depth[c](r) if c in depth else (r.get(c) if r.get(c) is not None else math.nan)
                     for c in data["columns"]] for r in rows], dtype=float)
    missing = ~np.isfinite(raw)
    x = np.zeros_like(raw)
    for k in range(raw.shape[1]):
        ok = ~missing[:, k]
        x[ok, k] = (stats.rankdata(raw[ok, k]) - 1) / (ok.sum() - 1) - 0.5
        x[~ok, k] = data["medians"][k]
    flags = missing[:, [data["columns"].index(c) for c in data["indicators"]]].astype(float)
    design = (np.hstack([x, flags]) - np.array(data["means"])) / np.array(data["scales"])
    out = design @ np.array(data["coefficients"]) + data["intercept"]
    probes = [k for k, c in enumerate(data["columns"]) if c not in ("width", "i/L", "j/L")]
    out[missing[:, probes].all(axis=1)] = math.nan
    return out


def test_prediction_equals_a_hand_computation_from_the_file(tmp_path):
    runs = _runs()
    for rows, _, _ in runs[:2]:  # gaps in training: d_kl gets an indicator
        for k, r in enumerate(rows):
            r["d_kl"] = None if k % 6 == 0 else r["d_kl"]
    fit = fit_surrogate(runs[:2], penalty=2.0)
    assert fit.indicators == ["d_kl"]
    fit.save(tmp_path / "s.json")
    data = json.loads((tmp_path / "s.json").read_text())
    rows = [dict(r) for r in runs[2][0]]
    rows[3]["d_kl"], rows[4]["delta_0"] = math.nan, None  # gaps at prediction
    rows[5] = {k: (None if k in PROBES else v) for k, v in rows[5].items()}  # no probe value at all
    expected = _by_hand(data, rows, num_layers=11)
    loaded = LearnedScore.load(tmp_path / "s.json")
    np.testing.assert_allclose(loaded.predict(rows, 11), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fit.predict(rows, 11), expected, rtol=1e-10, atol=1e-12)
    assert math.isnan(expected[5]) and np.isfinite(np.delete(expected, 5)).all()


@pytest.mark.parametrize("change, fragment", [
    (lambda d: d.pop("coefficients"), "missing key 'coefficients'"),
    (lambda d: d.update(alpha=1), "unknown key 'alpha'"),
    (lambda d: d["means"].pop(), "'means' must be a list of"),
    (lambda d: d.update(scales=[0.0] * len(d["scales"])), "'scales' must be positive"),
    (lambda d: d.update(feature_transform="log"), "'feature_transform' must be one of"),
    (lambda d: d.update(intercept="1"), "'intercept' must be a finite number"),
    (lambda d: d.update(indicators=["nope"]), "'indicators' must be a list of names from 'columns'"),
    (lambda d: d.update(columns=[]), "'columns' must be a non-empty list"),
    (lambda d: d.update(rys_forge_surrogate=2), "not a learned-score file of format 1"),
])
def test_a_bad_score_file_is_refused_naming_the_problem(fitted, tmp_path, change, fragment):
    data = fitted.to_dict()
    change(data)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UsageError, match="learned score") as caught:
        LearnedScore.load(path)
    assert fragment in str(caught.value) and str(path) in str(caught.value)


def test_unreadable_score_files(tmp_path):
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    for path, fragment in ((tmp_path / "missing.json", "not found"), (tmp_path, "is a folder"),
                           (tmp_path / "bin.json", "cannot read learned score")):
        with pytest.raises(UsageError, match=fragment):
            LearnedScore.load(path)


# --------------------------------------------------------------------------- the order of a rank run


def test_order_rows_sorts_by_the_learned_score_nan_last_and_records_it(fitted, tmp_path):
    fitted.save(tmp_path / "s.json")
    learned = LearnedScore.load(tmp_path / "s.json")
    rows = [dict(r) for r in _runs()[2][0]]
    rows[0] = {k: (math.nan if k in PROBES else v) for k, v in rows[0].items()}  # its probes failed
    prior = {r["window"]: r["score"] for r in rows}
    ordered, record = order_rows(rows, learned, num_layers=11)
    expected = learned.predict(rows, 11)
    assert len(ordered) == len(rows) and all(LEARNED_COLUMN in r for r in rows)
    values = [r[LEARNED_COLUMN] for r in ordered]
    assert math.isnan(values[-1]) and ordered[-1]["window"] == "0:2"
    assert values[:-1] == sorted(values[:-1], reverse=True)
    assert values[0] == pytest.approx(np.nanmax(expected))
    assert all(r["score"] == prior[r["window"]] for r in ordered)  # the prior is kept
    assert record == {
        "ordering_score": "learned", "column": "learned_score", "file": "s.json",
        "sha256": hashlib.sha256((tmp_path / "s.json").read_bytes()).hexdigest(), "fitted_on": ["ma", "mb"],
        "rank_models": [], "target": "combined_z", "features": len(learned.columns), "feature_transform": "rank",
        "missing_columns": [], "prior_column": "score",
    }
    without_dkl = [{k: v for k, v in r.items() if k != "d_kl"} for r in rows]
    assert order_rows(without_dkl, learned)[1]["missing_columns"] == ["d_kl"]


def test_order_rows_ties_keep_their_order_and_the_prior_orders_without_a_learned_score(fitted):
    rows = [{"window": w, "i": 0, "j": 2, "score": s} for w, s in (("a", 0.5), ("b", math.nan), ("c", 0.9), ("d", 0.5))]
    ordered, record = order_rows(rows, None)
    assert [r["window"] for r in ordered] == ["c", "a", "d", "b"] and record == prior_ordering()
    assert record["ordering_score"] == "prior" and all(LEARNED_COLUMN not in r for r in rows)
    twins = [dict(r) for r in _runs()[2][0][:12]] * 2  # identical rows: equal learned scores
    ordered, _ = order_rows([dict(r, tag=k) for k, r in enumerate(twins)], fitted)
    pairs = [r["tag"] for r in ordered]
    assert all(pairs.index(k) < pairs.index(k + 12) for k in range(12))


def test_order_rows_refuses_rows_without_any_of_its_probe_columns(fitted):
    rows = [{"window": f"0:{j}", "i": 0, "j": j, "width": j, "score": 1.0, "mmd2": 0.1} for j in range(2, 9)]
    with pytest.raises(UsageError, match="none of its probe columns"):
        order_rows(rows, fitted)


# --------------------------------------------------------------------------- learn-score


def test_learn_score_writes_a_score_and_a_report(tmp_path):
    runs = _write_runs(tmp_path / "data")
    out, report = tmp_path / "out" / "learned.json", tmp_path / "out" / "report.json"
    result = CliRunner().invoke(main, ["learn-score", *runs, "--out", str(out), "--report", str(report), "--penalty", "5"])
    assert result.exit_code == 0, result.output
    learned = LearnedScore.load(out)
    assert learned.trained_on == ["ma", "mb", "mc"] and learned.rank_models == ["ma", "mb", "mc"]
    saved = json.loads(report.read_text())
    assert saved["rys_forge_learned_score"] == 1 and [m["model"] for m in saved["models"]] == ["ma", "mb", "mc"]
    for m in saved["models"]:  # the table prints prior / in-sample / out-of-model side by side
        figures = "/".join(f"{m[k]['spearman']:+.2f}" for k in ("prior", "learned_in_sample", "learned_out_of_model"))
        assert figures in result.output
        assert m["learned_out_of_model"]["spearman"] > 0.8 and m["wins"]
    assert saved["verdict"] in result.output and saved["ship"] is True
    assert f"wrote {out}" in result.output and f"wrote {report}" in result.output
    first = out.read_bytes()
    again = CliRunner().invoke(main, ["learn-score", *runs[:8], "--out", str(out), "--transform", "zscore"])
    assert again.exit_code == 0, again.output  # replaced its own earlier file
    replaced = LearnedScore.load(out)
    assert replaced.trained_on == ["ma", "mb"] and out.read_bytes() != first
    assert replaced.feature_transform == replaced.target_transform == "zscore" and replaced.cv["scheme"].endswith("windows")


@pytest.mark.parametrize("case", ["missing rank", "missing sweep", "one model", "same model twice", "garbled rank",
                                  "garbled sweep csv", "out is another file", "out is a folder", "report is another file",
                                  "unknown target", "negative penalty", "top fraction 0"])
def test_learn_score_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    runs = _write_runs(tmp_path / "data")
    out, report = tmp_path / "learned.json", tmp_path / "report.json"
    extra: list[str] = []
    if case == "missing rank":
        runs[2] = str(tmp_path / "nope")
    elif case == "missing sweep":
        runs[3] = str(tmp_path / "nope")
    elif case == "one model":
        runs = runs[:4]
    elif case == "same model twice":
        runs[5] = "ma"
    elif case == "garbled rank":
        (Path(runs[2]) / "windows.json").write_text("{not json")
    elif case == "garbled sweep csv":
        (tmp_path / "sweep.csv").write_bytes(b"window,combined_z\n\xff\xfe,1\n")
        runs[3] = str(tmp_path / "sweep.csv")
    elif case == "out is another file":
        out.write_text('{"alpha": 5}\n')
    elif case == "out is a folder":
        out.mkdir()
    elif case == "report is another file":
        report.write_text("mine\n")
    elif case == "unknown target":
        extra = ["--target", "z:nope"]
    elif case == "negative penalty":
        extra = ["--penalty", "-1"]
    elif case == "top fraction 0":
        extra = ["--top-fraction", "0"]
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    result = CliRunner().invoke(main, ["learn-score", *runs, "--out", str(out), "--report", str(report), *extra])
    _one_line(result, 2)
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert out.is_dir() if case == "out is a folder" else (out.exists() == (case == "out is another file"))


# --------------------------------------------------------------------------- rank and validate


def test_rank_with_a_bad_learned_score_fails_before_any_model_loads(tmp_path, monkeypatch):
    import rys_forge.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before --learned-score was checked")

    monkeypatch.setattr(models, "load_model", refuse)
    bad = tmp_path / "bad.json"
    bad.write_text('{"rys_forge_surrogate": 1, "columns": ["d_kl"]}')
    for path, fragment in ((bad, "missing key"), (tmp_path / "none.json", "not found"), (tmp_path, "is a folder")):
        result = CliRunner().invoke(main, ["rank", "--model", "tiny", "--out", str(tmp_path / "run"),
                                           "--learned-score", str(path)])
        _one_line(result, 2, "learned score", fragment)
    assert not (tmp_path / "run").exists()


def test_rank_hands_the_learned_score_to_the_pipeline(fitted, tmp_path, monkeypatch):
    import rys_forge.models as models
    import rys_forge.rank as rank

    fitted.save(tmp_path / "s.json")
    seen = {}

    def fake_rank(*args, **kwargs):
        seen.update(kwargs)
        raise RysForgeError("stopped here")

    monkeypatch.setattr(models, "load_model", lambda *a, **k: SimpleNamespace(model=None, tokenizer=None, info={}, path="p"))
    monkeypatch.setattr(rank, "rank_windows", fake_rank)
    result = CliRunner().invoke(main, ["rank", "--model", "tiny", "--out", str(tmp_path / "run"),
                                       "--learned-score", str(tmp_path / "s.json"), "--no-progress"])
    _one_line(result, 1, "stopped here")
    assert seen["learned_score"] == fitted and seen["learned_score"].origin["file"] == "s.json"


def test_print_top_names_the_learned_score(capsys):
    from rys_forge.cli.framework import print_top
    from rys_forge.rank import RankResult

    row = {"window": "2:5", "rank": 1, "learned_score": 0.25, "score": 0.5, "class": "refinement"}
    ordering = {"ordering_score": "learned", "file": "s.json"}
    print_top(RankResult(rows=[row], summary={"ordering": ordering}), 1)
    shown = capsys.readouterr().out
    assert "by learned score (s.json)" in shown and "0.25" in shown
    print_top(RankResult(rows=[row], summary={"ordering": prior_ordering()}), 1)
    assert "by Score(B)" in capsys.readouterr().out


def test_validate_judges_a_learned_score_in_and_out_of_sample(fitted, tmp_path):
    runs = _write_runs(tmp_path)
    rank_c, sweep_c, rank_a, sweep_a = runs[10], runs[11], runs[2], runs[3]
    report = validate_runs(rank_c, sweep_c, n_permutations=50, learned_score=fitted)
    rows = json.loads((Path(rank_c) / "windows.json").read_text())
    z = {r["window"]: r["combined_z"] for r in json.loads((Path(sweep_c) / "sweep.json").read_text())["rows"]}
    expected = stats.spearmanr(fitted.predict(rows, 11), [z[r["window"]] for r in rows])[0]
    assert report.correlations["score"]["combined_z"]["spearman"] == pytest.approx(expected)
    assert report.correlations["prior_score"]["combined_z"]["n"] == len(rows)  # the prior, beside it
    assert report.calibration["in_sample"] is False and "learned score fitted on ma, mb" in report.verdict
    assert report.settings["ordering"]["ordering_score"] == "learned"
    assert validate_runs(rank_a, sweep_a, n_permutations=50, learned_score=fitted).calibration["in_sample"] is True
    prior = validate_runs(rank_c, sweep_c, n_permutations=50)
    assert prior.settings["ordering"]["ordering_score"] == "the rank run's score"
    assert prior.correlations["score"]["combined_z"]["spearman"] < 0.3 < expected


def test_validate_learned_score_errors_are_one_line(fitted, tmp_path):
    runs = _write_runs(tmp_path)
    fitted.save(tmp_path / "s.json")
    (tmp_path / "c.json").write_text('{"alpha": 5}')
    (tmp_path / "bad.json").write_text("[1]")
    base = ["validate", runs[10], runs[11], "--out", str(tmp_path / "v")]
    _one_line(CliRunner().invoke(main, [*base, "--learned-score", str(tmp_path / "bad.json")]), 2, "not a learned-score file")
    _one_line(CliRunner().invoke(main, [*base, "--learned-score", str(tmp_path / "s.json"), "--score-config",
                                        str(tmp_path / "c.json")]), 2, "not both")
    assert not (tmp_path / "v").exists()
    ok = CliRunner().invoke(main, [*base, "--learned-score", str(tmp_path / "s.json"), "--permutations", "50"])
    assert ok.exit_code == 0, ok.output
    assert "Out-of-sample: learned score fitted on ma, mb, validated on mc" in ok.output
    assert json.loads((tmp_path / "v" / "validation.json").read_text())["settings"]["ordering"]["file"] == "s.json"
