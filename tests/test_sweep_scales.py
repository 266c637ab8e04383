"""Damped visits in `sweep` (--alphas, --substeps) on a tiny gemma3 and two offline tasks.

References: the cached engine's damped replay against a whole-model forward under the in-memory repeat
(`repeated` with `LayerPlan.from_windows(..., alpha)`); damped sweep rows against the same sweep through lm-eval
(one full run per window under that repeat); the best-scale table against a recomputation from the rows with
scipy's binomial test.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

pytest.importorskip("lm_eval")

from rys_forge.errors import UsageError  # noqa: E402
from rys_forge.plan import LayerPlan, Window  # noqa: E402
from rys_forge.repeat import repeated  # noqa: E402
from rys_forge.research import sweep as sweep_mod  # noqa: E402
from rys_forge.research.sweep import read_sweep, report_unfinished, sweep_visits, sweep_windows  # noqa: E402
from rys_forge.research.sweep_engine import LoglikelihoodEngine  # noqa: E402
from rys_forge.research.sweep_rows import Visits, parse_alphas, parse_substeps  # noqa: E402
from rys_forge.research.validate import validate_runs  # noqa: E402

TASKS = ["rys_arc_easy", "rys_lambada_openai"]
WINDOWS = ["1:3", "2:6", "3:6"]
MAX_LENGTH = 20


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs, single_thread_loader):
    return single_thread_loader(tiny_model_dirs["gemma3_text"])


def _sweep(loaded, out, engine="auto", **kwargs):
    kwargs.setdefault("windows", WINDOWS)
    return sweep_windows(loaded.model, loaded.tokenizer, tasks=TASKS, limit=6, out_dir=out, progress=False,
                         engine=engine, model_info={"source": loaded.source}, **kwargs)


def _same_row(a: dict, b: dict) -> None:
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_scale_options_parse_and_refuse():
    assert parse_alphas(None) == [1.0] and parse_alphas("0.5") == [1.0, 0.5]
    assert parse_alphas("0.25, 1,0.75,0.5,0.5") == [1.0, 0.75, 0.5, 0.25]
    assert parse_substeps(None) == [] and parse_substeps("4,2") == [2, 4]
    for bad in ("0", "1,-0.5", "abc", "nan", "inf", ""):
        with pytest.raises(UsageError, match="--alphas takes residual scales"):
            parse_alphas(bad)
    for bad in ("0", "1", "1.5", "two"):
        with pytest.raises(UsageError, match="--substeps takes integers >= 2"):
            parse_substeps(bad)
    assert sweep_visits("2,3", "1,0.5") == [Visits(2), Visits(2, 0.5), Visits(3), Visits(3, 0.5)]
    assert sweep_visits(2, None, "2,3") == [Visits(2), Visits(3, 0.5, 2), Visits(4, 1 / 3, 3)]
    with pytest.raises(UsageError, match="cannot be combined with --repeats 2,3"):
        sweep_visits("2,3", None, "2")
    with pytest.raises(UsageError, match="--race races plain repeats only"):
        sweep_visits(2, "0.5", None, race=True)
    assert sweep_visits(2, "1", None, race=True) == [Visits(2)]
    # keys and file suffixes: a plain repeat's are what they were
    assert [v.key("1:3") for v in sweep_visits("2,3", "1,0.5", None)] == ["1:3x2", "1:3x2a0.5", "1:3x3", "1:3x3a0.5"]
    assert [v.suffix for v in sweep_visits("2,3", "1,0.5", None)] == ["", "_a0.5", "_x3", "_x3_a0.5"]
    assert Visits(3, 0.5, 2).key("1:3") == "1:3x3s2" and Visits(3, 0.5, 2).suffix == "_s2"
    assert Visits(3, 0.5, 2).reference == Visits(2) and Visits(3, 0.5).reference == Visits(3)
    # sub-steps are the plan's own: K + 1 visits at 1/K
    plan = LayerPlan.from_windows(["1:3"], 6, Visits(3, 0.5, 2).repeats, Visits(3, 0.5, 2).alpha)
    assert plan.substeps == 2


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_damped_replay_matches_the_in_memory_repeat(tiny_model_dirs, single_thread_loader, model_type):
    model = single_thread_loader(tiny_model_dirs[model_type]).model
    n = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(5)
    requests = []
    for ctx_len, cont_len in [(5, 1), (12, 3), (3, 4), (15, 2)]:
        tokens = torch.randint(4, model.config.vocab_size, (ctx_len + cont_len,), generator=g).tolist()
        requests.append((tokens[:ctx_len], tokens[ctx_len:]))
    windows = [(1, 3, 2, 1.0), (1, 3, 2, 0.5), (0, 4, 3, 0.25), (2, n, 2, 1.5)]
    engine = LoglikelihoodEngine(model, requests, max_length=MAX_LENGTH, batch_tokens=40)
    runs = engine.run(windows)
    for (i, j, visits, alpha), run in zip(windows, runs):
        lls = []
        with repeated(model, LayerPlan.from_windows([Window(i, j)], n, visits, alpha)), torch.no_grad():
            for ctx, cont in requests:
                full = (ctx + cont)[-(MAX_LENGTH + 1):]
                logprobs = torch.log_softmax(model(torch.tensor([full[:-1]])).logits[0].double(), -1)[-len(cont):]
                lls.append(float(logprobs.gather(1, torch.tensor(cont)[:, None]).sum()))
        np.testing.assert_allclose(run.loglikelihood, lls, rtol=1e-5, atol=1e-4)
    assert np.abs(runs[1].loglikelihood - runs[0].loglikelihood).max() > 1e-3  # the scale really moves the numbers


@pytest.fixture(scope="module")
def damped(loaded, tmp_path_factory):
    """A cached sweep at alphas 1, 0.5 and 2 sub-steps, counting lm-eval runs and activation captures."""
    calls, captures = [], []
    original_eval, original_capture = sweep_mod._evaluate_once, LoglikelihoodEngine._capture
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep_mod, "_evaluate_once", lambda *a, **k: calls.append(1) or original_eval(*a, **k))
        mp.setattr(LoglikelihoodEngine, "_capture", lambda self, batch: captures.append(id(batch)) or original_capture(self, batch))
        out = tmp_path_factory.mktemp("damped") / "sweep"
        result = _sweep(loaded, out, alphas="1,0.5", substeps="2")
    return result, out, calls, captures


def test_damped_sweep_shares_the_base_and_keeps_plain_rows(loaded, damped, tmp_path):
    result, out, calls, captures = damped
    assert calls == [1] and len(captures) == len(set(captures))  # one base run; each batch captured once
    assert [(r["window"], Visits.of(r)) for r in result.rows] == [
        (w, v) for v in (Visits(2), Visits(2, 0.5), Visits(3, 0.5, 2)) for w in WINDOWS]
    assert all("alpha" not in r for r in result.rows[:3]) and result.rows[3]["alpha"] == 0.5
    assert result.rows[6]["substeps"] == 2 and result.rows[6]["repeats"] == 3
    plain = _sweep(loaded, tmp_path / "plain")
    for a, b in zip(result.rows[:3], plain.rows):
        _same_row(a, b)
    # alpha 1 alone is today's sweep: the same settings and table
    ones = _sweep(loaded, tmp_path / "ones", alphas="1")
    assert (tmp_path / "ones" / "run.json").read_bytes() == (tmp_path / "plain" / "run.json").read_bytes()
    header = (tmp_path / "plain" / "sweep.csv").read_text().splitlines()[0]
    assert (tmp_path / "ones" / "sweep.csv").read_text().splitlines()[0] == header and "alpha" not in header
    assert "scales" not in ones.summary and not (tmp_path / "ones" / "best_scale.csv").exists()
    for a, b in zip(ones.rows, plain.rows):
        _same_row(a, b)
    # the damped folder: an alpha column (1 on plain rows), per-scale heatmaps, plain rows for the readers
    with (out / "sweep.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [float(r["alpha"]) for r in table] == [1.0] * 3 + [0.5] * 3 + [0.5] * 3
    assert [r["substeps"] for r in table] == [""] * 6 + ["2"] * 3
    for name in ("heatmap_combined_z.png", "heatmap_combined_z_a0.5.png", "heatmap_combined_z_s2.png",
                 "heatmap_delta_rys_arc_easy_a0.5.png", "best_scale.csv", "best_scale.md"):
        assert (out / name).is_file(), name
    assert not (out / "repeats_fit.png").exists() and result.fits == {}
    rows, summary = read_sweep(out)
    assert [r["key"] for r in rows] == [f"{w}x2" for w in WINDOWS]
    assert len(read_sweep(out, all_scales=True)[0]) == 9 and summary["settings"]["alphas"] == [1.0, 0.5]
    rank = tmp_path / "rank"
    rank.mkdir()
    (rank / "windows.json").write_text(json.dumps([{"window": w, "i": int(w[0]), "j": int(w[2]), "score": float(k),
                                                    "cka_plateau": 0.9} for k, w in enumerate(WINDOWS)]))
    assert validate_runs(rank, out, n_permutations=20, out_dir=tmp_path / "val").n_windows == len(WINDOWS)


def test_damped_rows_equal_the_lm_eval_path(loaded, damped, tmp_path):
    result, *_ = damped
    reference = _sweep(loaded, tmp_path / "lm_eval", "lm-eval", windows=WINDOWS[1:], alphas="0.5", substeps="2")
    cached = {r["key"]: r for r in result.rows}
    plain = {r["window"]: r for r in reference.rows if Visits.of(r).plain}
    # the comparison is not vacuous: some scale moves some item away from the plain repeat
    assert any(r["tasks"][t]["items"] != plain[r["window"]]["tasks"][t]["items"]
               for r in reference.rows if not Visits.of(r).plain for t in TASKS)
    for row in reference.rows:
        other = cached[row["key"]]
        assert Visits.of(other) == Visits.of(row)
        for task in TASKS:
            a, b = other["tasks"][task], row["tasks"][task]
            assert a["items"] == b["items"], (row["key"], task)
            for key in ("rys", "delta", "rys_stderr", "p_value", "z"):
                assert a[key] == pytest.approx(b[key], abs=1e-12), (row["key"], task, key)


def _mcnemar(plain: list[float], other: list[float]) -> float:
    b = sum(p == 1 and o == 0 for p, o in zip(plain, other))
    c = sum(p == 0 and o == 1 for p, o in zip(plain, other))
    return 1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5).pvalue


def test_best_scale_table_against_the_rows(damped):
    result, out, *_ = damped
    with (out / "best_scale.csv").open() as handle:
        table = {r["window"]: r for r in csv.DictReader(handle)}
    assert sorted(table) == sorted(WINDOWS)
    better = {t: 0 for t in TASKS}
    for window in WINDOWS:
        rows = [r for r in result.rows if r["window"] == window]  # plain first
        finite = [r for r in rows if not math.isnan(r["combined_z"])]
        best = max(finite, key=lambda r: r["combined_z"])
        plain = rows[0]
        entry = table[window]
        assert float(entry["best_alpha"]) == pytest.approx(best.get("alpha", 1.0))
        assert int(entry["best_repeats"]) == best["repeats"] and entry["repeats"] == "2" and entry["scales"] == "3"
        assert float(entry["best_combined_z"]) == pytest.approx(best["combined_z"])
        assert float(entry["plain_combined_z"]) == pytest.approx(plain["combined_z"])
        for task in TASKS:
            delta = best["tasks"][task]["rys"] - plain["tasks"][task]["rys"]
            assert float(entry[f"delta:{task}"]) == pytest.approx(delta, abs=1e-12)
            assert float(entry[f"p:{task}"]) == pytest.approx(_mcnemar(plain["tasks"][task]["items"], best["tasks"][task]["items"]))
            gains = [(r["tasks"][task]["rys"] - plain["tasks"][task]["rys"],
                      _mcnemar(plain["tasks"][task]["items"], r["tasks"][task]["items"])) for r in rows[1:]]
            assert (entry[f"damped_higher:{task}"] == "True") == any(g > 0 for g, _ in gains)
            found = any(g > 0 and p < 0.05 for g, p in gains)
            assert (entry[f"damped_better:{task}"] == "True") == found
            better[task] += found
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scales"]["better"] == better and summary["scales"]["windows"] == len(WINDOWS)
    assert "| " + WINDOWS[0] + " | x2 |" in (out / "best_scale.md").read_text()


def test_damped_sweep_resumes(loaded, damped, tmp_path, interrupt_scoring):
    result, *_ = damped
    out = tmp_path / "sweep"
    disarm = interrupt_scoring(4)
    with pytest.raises(KeyboardInterrupt):
        _sweep(loaded, out, alphas="1,0.5", substeps="2")
    assert len((out / "sweep.jsonl").read_text().splitlines()) == 3
    report = report_unfinished(out)  # the unfinished report plans every scale
    assert (report.summary["windows_done"], report.summary["windows_planned"]) == (3, 9)
    disarm()
    with pytest.raises(UsageError, match="settings differ"):
        _sweep(loaded, out, resume=True, alphas="1,0.25", substeps="2")
    resumed = _sweep(loaded, out, resume=True, alphas="1,0.5", substeps="2")
    assert resumed.summary["timings"]["windows_evaluated_this_session"] == 6
    for a, b in zip(resumed.rows, result.rows):
        assert a["key"] == b["key"] and a["tasks"] == b["tasks"]
    keys = [json.loads(line)["key"] for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert sorted(keys) == sorted(r["key"] for r in result.rows)


def test_cli_bad_scales_are_one_line_and_write_nothing(tiny_model_dirs, tmp_path):
    from click.testing import CliRunner

    from rys_forge.cli import main

    model = str(tiny_model_dirs["llama"])
    runner = CliRunner()
    cases = [(["--alphas", "0"], "--alphas takes residual scales"), (["--alphas=-0.5"], "--alphas takes residual scales"),
             (["--alphas", "1,abc"], "--alphas takes residual scales"), (["--substeps", "0"], "--substeps takes integers"),
             (["--substeps", "2", "--repeats", "2,3"], "cannot be combined with --repeats 2,3"),
             (["--alphas", "0.5", "--race"], "--race races plain repeats only")]
    for args, fragment in cases:
        out = tmp_path / "sweep"
        result = runner.invoke(main, ["sweep", "--model", model, "--tasks", "rys_arc_easy", "--limit", "2",
                                      "--window", "1:3", "--out", str(out), "--no-progress", *args])
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.output.strip().splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith("rys-forge: error:") and fragment in lines[0], result.output
        assert not out.exists()
