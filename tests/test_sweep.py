"""rys_forge.research.sweep on a tiny llama and the offline rys_arc_easy task (4 items), plus its pure helpers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from rys_forge.research import sweep as sweep_mod  # noqa: E402
from rys_forge.errors import UsageError  # noqa: E402
from rys_forge.repeat import applied_plan_active  # noqa: E402
from rys_forge.research.sweep import read_sweep, report_unfinished, sweep_windows  # noqa: E402
from rys_forge.research.sweep_rows import pick_metric, reported_tasks  # noqa: E402
from rys_forge.research.validate import validate_runs  # noqa: E402
from rys_forge.stats import combine_z, fit_repeat_curve, task_z  # noqa: E402

TASK = "rys_arc_easy"
LIMIT = 4
WINDOWS = ["1:3", "2:5", "3:6"]
# Windows are evaluated in a seeded random order (seed 0), so that a sweep cut short is an unbiased sample.
EVAL_ORDER = [WINDOWS[k] for k in np.random.default_rng(0).permutation(len(WINDOWS))]


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs, single_thread_loader):
    return single_thread_loader(tiny_model_dirs["llama"])


def _counting(monkeypatch, fail_at: int | None = None) -> list[bool]:
    """Count lm-eval runs (True: under a repeat plan); raise KeyboardInterrupt on call number `fail_at`."""
    calls: list[bool] = []
    original = sweep_mod._evaluate_once

    def wrapper(model, *args, **kwargs):
        calls.append(applied_plan_active(model))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return original(model, *args, **kwargs)

    monkeypatch.setattr(sweep_mod, "_evaluate_once", wrapper)
    return calls


def _run(loaded, out, **kwargs):
    kwargs.setdefault("windows", WINDOWS)
    kwargs.setdefault("engine", "lm-eval")  # one lm-eval run per window (the cached engine: test_sweep_engine)
    return sweep_windows(
        loaded.model, loaded.tokenizer, tasks=[TASK], limit=LIMIT, out_dir=out, progress=False,
        model_info={"source": loaded.source}, **kwargs,
    )


def test_sweep_rows_deltas_and_files(loaded, tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    out = tmp_path / "sweep"
    result = _run(loaded, out)
    assert len(calls) == 1 + len(WINDOWS)  # the base once, then one run per window
    assert [r["window"] for r in result.rows] == WINDOWS
    assert result.summary["metrics"] == {TASK: "acc_norm"}  # acc_norm preferred over acc
    base = result.base[TASK]
    assert len(base["items"]) == LIMIT and base["value"] == pytest.approx(np.mean(base["items"]))
    for row in result.rows:
        entry = row["tasks"][TASK]
        assert entry["metric"] == "acc_norm" and entry["base"] == base["value"]
        assert entry["delta"] == pytest.approx(entry["rys"] - entry["base"])
        assert entry["rys"] == pytest.approx(np.mean(entry["items"]))
        assert set(entry["items"]) <= {0.0, 1.0} and len(entry["items"]) == LIMIT
        assert row[f"delta:{TASK}"] == entry["delta"]
        assert 0.0 <= entry["p_value"] <= 1.0 and entry["test"] == "mcnemar_exact"
        se = math.hypot(entry["base_stderr"], entry["rys_stderr"])  # the definition, independently
        assert entry["z"] == pytest.approx(entry["delta"] / se if se > 0 else (0.0 if entry["delta"] == 0 else entry["delta"] * 2 * LIMIT))
        assert row["combined_z"] == pytest.approx(entry["z"]) or (math.isnan(row["combined_z"]) and math.isnan(entry["z"]))
        assert row["single_task_verdict"] is False  # one task: never a single-task verdict
    logged = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert [r["key"] for r in logged] == [f"{w}x2" for w in EVAL_ORDER] and sorted(EVAL_ORDER) == sorted(WINDOWS)
    table = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["window"] for r in table] == WINDOWS
    csv_lines = (out / "sweep.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(WINDOWS) and f"delta:{TASK}" in csv_lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base"][TASK]["value"] == base["value"] and set(summary["timings"]["per_window_s"]) == {f"{w}x2" for w in WINDOWS}
    for name in (f"heatmap_delta_{TASK}.png", "heatmap_combined_z.png", "base.json", "run.json"):
        assert (out / name).is_file()
    rows, _ = read_sweep(out)
    assert [r["window"] for r in rows] == WINDOWS

    # validate reads this sweep next to a (hand-made) rank run of the same windows
    rank = tmp_path / "rank"
    rank.mkdir()
    rank_rows = [{"window": w, "i": int(w.split(":")[0]), "j": int(w.split(":")[1]), "score": float(k), "cka_plateau": 0.9}
                 for k, w in enumerate(WINDOWS)]
    (rank / "windows.json").write_text(json.dumps(rank_rows))
    report = validate_runs(rank, out, n_permutations=50, out_dir=tmp_path / "val")
    assert report.n_windows == len(WINDOWS) and (tmp_path / "val" / "validation.json").is_file()


def test_resume_skips_finished_windows(loaded, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    calls = _counting(monkeypatch, fail_at=3)  # base, first window, then interrupted on the second
    with pytest.raises(KeyboardInterrupt):
        _run(loaded, out)
    assert calls == [False, True, True]
    logged = (out / "sweep.jsonl").read_text().splitlines()
    assert len(logged) == 1 and json.loads(logged[0])["window"] == EVAL_ORDER[0]
    first = json.loads(logged[0])
    partial, summary = read_sweep(out)  # an unfinished sweep is read from its log
    assert [r["window"] for r in partial] == EVAL_ORDER[:1] and summary == {}
    report = report_unfinished(out)  # outputs of the finished window, no model
    assert report.summary["complete"] is False
    assert (report.summary["windows_done"], report.summary["windows_planned"]) == (1, len(WINDOWS))
    assert report.summary["best"]["window"] == EVAL_ORDER[0] and report.base[TASK]["n"] == LIMIT
    assert (out / "heatmap_combined_z.png").is_file() and len((out / "sweep.csv").read_text().splitlines()) == 2
    assert [r["window"] for r in read_sweep(out)[0]] == EVAL_ORDER[:1]
    # a resume with other settings is refused
    with pytest.raises(UsageError, match="settings differ"):
        _run(loaded, out, resume=True, windows=WINDOWS[:2])
    with pytest.raises(UsageError, match="--resume"):
        _run(loaded, out)
    monkeypatch.undo()
    calls = _counting(monkeypatch)
    result = _run(loaded, out, resume=True)
    assert calls == [True, True]  # no base run, only the two unfinished windows
    assert result.summary["timings"]["base_reused"] is True
    assert result.summary["timings"]["windows_evaluated_this_session"] == 2
    assert [r["window"] for r in result.rows] == WINDOWS
    again = next(r for r in result.rows if r["window"] == first["window"])
    assert again["tasks"][TASK]["delta"] == first["tasks"][TASK]["delta"]
    assert len((out / "sweep.jsonl").read_text().splitlines()) == len(WINDOWS)
    assert "complete" not in result.summary  # the finished sweep replaced the unfinished report
    with pytest.raises(UsageError, match="finished sweep"):
        report_unfinished(out)
    with pytest.raises(UsageError, match="not a sweep run folder"):
        report_unfinished(tmp_path)


def test_repeats_curves(loaded, tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    out = tmp_path / "sweep"
    result = _run(loaded, out, windows=["2:4"], repeats="2,3")
    assert len(calls) == 3
    assert [(r["window"], r["repeats"]) for r in result.rows] == [("2:4", 2), ("2:4", 3)]
    fit = result.fits["2:4"][TASK]
    deltas = [r["tasks"][TASK]["delta"] for r in result.rows]
    # two points, two unknowns: the fit passes through both
    assert fit["a"] * 1 - fit["b"] * 1 == pytest.approx(deltas[0], abs=1e-12)
    assert fit["a"] * 2 - fit["b"] * 4 == pytest.approx(deltas[1], abs=1e-12)
    assert (out / "repeats_fit.png").is_file() and (out / "heatmap_combined_z_x3.png").is_file()
    with pytest.raises(UsageError, match="repeats"):
        _run(loaded, tmp_path / "bad", windows=["2:4"], repeats="1,2")


def test_fit_recovers_a_and_b_exactly():
    a, b = 0.12, 0.03
    visits = [1, 2, 3, 4, 5]
    perf1 = 0.40
    perf = [perf1 + a * (n - 1) - b * (n - 1) ** 2 for n in visits]
    fit = fit_repeat_curve(visits, [p - perf1 for p in perf])
    assert fit["a"] == pytest.approx(a, abs=1e-12) and fit["b"] == pytest.approx(b, abs=1e-12)
    assert fit["n_peak"] == pytest.approx(1 + a / (2 * b)) and fit["residual_rms"] == pytest.approx(0.0, abs=1e-12)
    assert not fit["underdetermined"]
    single = fit_repeat_curve([1, 2], [0.0, 0.05])
    assert single["underdetermined"] and single["a"] == pytest.approx(0.05) and single["b"] == 0.0


def test_single_task_flag():
    flagged = combine_z({"gsm": 3.0, "musr": -0.5, "ifeval": -0.5})
    assert flagged["single_task_verdict"] is True and flagged["dominant_task"] == "gsm"
    assert flagged["combined_z"] == pytest.approx(2.0 / math.sqrt(3))
    assert flagged["dominant_share"] == pytest.approx(1.5)
    broad = combine_z({"gsm": 2.0, "musr": 1.8, "ifeval": 1.5})
    assert broad["single_task_verdict"] is False and broad["combined_z"] == pytest.approx(5.3 / math.sqrt(3))
    assert combine_z({"gsm": 3.0})["single_task_verdict"] is False  # one task: nothing to compare
    assert combine_z({"gsm": 0.4, "musr": -0.3})["single_task_verdict"] is False  # nothing really moved
    assert combine_z({"gsm": 2.0, "musr": 0.5})["single_task_verdict"] is True  # 2.0 / 2.5 = 80%


def test_task_z_and_metric_choice():
    assert task_z(0.1, 0.03, 0.04) == pytest.approx(0.1 / 0.05)
    assert task_z(0.0, 0.0, 0.0, 4) == 0.0
    assert task_z(0.25, 0.0, 0.0, 4) == pytest.approx(0.25 / (1 / 8))  # floored at half an item
    assert math.isnan(task_z(None, 0.1, 0.1))
    rows = [
        {"task": "t", "metric": "acc", "filter": "none", "base": 0.5, "rys": 0.6},
        {"task": "t", "metric": "acc_norm", "filter": "none", "base": 0.4, "rys": 0.5},
        {"task": "u", "metric": "exact_match", "filter": "strict", "base": 0.1, "rys": 0.2},
        {"task": "u", "metric": "exact_match", "filter": "none", "base": 0.1, "rys": 0.3},
    ]
    assert pick_metric(rows, "t")["metric"] == "acc_norm"
    assert pick_metric(rows, "u")["filter"] == "none"
    assert pick_metric(rows, "missing") is None


def test_group_is_scored_by_its_members():
    rows = [{"task": "g", "in_group": False}, {"task": "a", "in_group": True}, {"task": "b", "in_group": True},
            {"task": "c", "in_group": False}]
    assert reported_tasks(rows, {"g": ["a", "b"]}) == ["a", "b", "c"]
    assert reported_tasks(rows, {}) == ["g", "c"]


def test_cli_sweep_rank_validate(tiny_model_dirs, tmp_path):
    from click.testing import CliRunner

    from rys_forge.cli import main

    model = str(tiny_model_dirs["llama"])
    windows = ["--window", "1:3", "--window", "2:5", "--window", "3:6"]
    runner = CliRunner()
    swept = runner.invoke(main, ["sweep", "--model", model, "--tasks", "rys_arc_easy", "--limit", "4", *windows,
                                 "--out", str(tmp_path / "sweep"), "--no-progress"])
    assert swept.exit_code == 0, swept.output
    ranked = runner.invoke(main, ["rank", "--model", model, *windows, "--prompts-per-family", "1", "--max-tokens", "12",
                                  "--jacobian", "none", "--out", str(tmp_path / "rank"), "--no-progress"])
    assert ranked.exit_code == 0, ranked.output
    checked = runner.invoke(main, ["validate", str(tmp_path / "rank"), str(tmp_path / "sweep"), "--permutations", "200"])
    assert checked.exit_code == 0, checked.output
    assert "enrichment" in checked.output
    assert (tmp_path / "sweep" / "validation" / "validation.json").exists()


def test_mean_delta_is_over_accuracies_only():
    """A perplexity's delta (another scale, lower is better) stays out of `mean_delta`, also for rows logged
    before the rule (`restore_record` recomputes it)."""
    from rys_forge.research.sweep_outputs import restore_record
    from rys_forge.research.sweep_rows import accuracy_mean_delta

    tasks = {"arc": {"delta": 0.02, "test": "mcnemar_exact"}, "piqa": {"delta": -0.01, "test": "mcnemar_exact"},
             "gsm8k_ll": {"delta": -3.0e5, "test": "paired_bootstrap"}, "bad": {"delta": None, "test": "mcnemar_exact"}}
    assert accuracy_mean_delta(tasks) == pytest.approx(0.005)
    assert math.isnan(accuracy_mean_delta({"gsm8k_ll": tasks["gsm8k_ll"]}))
    old = {"window": "1:3", "combined_z": None, "mean_delta": -75000.0, "tasks": tasks}
    assert restore_record(old)["mean_delta"] == pytest.approx(0.005) and math.isnan(restore_record(old)["combined_z"])
