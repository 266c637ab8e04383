"""rys_forge.research.validate on hand-made rank and sweep folders: every statistic against a hand or scipy value."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from rys_forge.errors import UsageError
from rys_forge.research.validate import validate_runs
from rys_forge.stats import (
    correlation,
    evaluations_to_reach,
    expected_first_hit,
    hypergeom_enrichment_p,
    matched_permutation,
    prob_hit_within,
    top_count,
)

L = 10


def _windows(n: int) -> list[tuple[int, int]]:
    out = [(i, j) for i in range(L) for j in range(i + 1, L + 1)]
    assert len(out) >= n
    return out[:n]


def make_runs(
    root: Path,
    scores,
    combined_z,
    *,
    cka=None,
    task_delta=None,
    task_p=None,
    fitted_on=None,
    model="tiny-llama",
    single=(),
) -> tuple[Path, Path]:
    """A rank folder (windows.json, summary.json) and a sweep folder (sweep.json, summary.json)."""
    n = len(scores)
    wins = _windows(n)
    cka = cka if cka is not None else np.linspace(0.5, 1.0, n)
    task_delta = task_delta if task_delta is not None else combined_z
    task_p = task_p if task_p is not None else [0.01] * n
    rank, sweep = root / "rank", root / "sweep"
    rank.mkdir(parents=True)
    sweep.mkdir(parents=True)
    rank_rows = [
        {"window": f"{i}:{j}", "i": i, "j": j, "width": j - i, "score": float(s), "cka_plateau": float(c),
         "delta_0": 0.1 * k, "probe_s": 0.01, "class": "refinement"}
        for k, ((i, j), s, c) in enumerate(zip(wins, scores, cka))
    ]
    summary = {"model": {"source": model}, "score_config": {"alpha": 5.0}}
    if fitted_on is not None:
        summary["score_config"]["fitted_on"] = fitted_on
    (rank / "windows.json").write_text(json.dumps(rank_rows))
    (rank / "summary.json").write_text(json.dumps(summary))
    sweep_rows = []
    for (i, j), z, d, p in zip(wins, combined_z, task_delta, task_p):
        window = f"{i}:{j}"
        sweep_rows.append({
            "window": window, "i": i, "j": j, "width": j - i, "repeats": 2, "key": f"{window}x2",
            "combined_z": float(z), "single_task_verdict": window in single,
            "tasks": {"t1": {"metric": "acc", "delta": float(d), "p_value": float(p), "higher_is_better": True}},
        })
    (sweep / "sweep.json").write_text(json.dumps({"rows": sweep_rows}))
    (sweep / "summary.json").write_text(json.dumps({"tasks": ["t1"], "model": {"source": model}}))
    return rank, sweep


def test_monotone_relation_gives_rank_correlation_one(tmp_path):
    n = 12
    scores = np.arange(n, dtype=float)
    rank, sweep = make_runs(tmp_path, scores, 2.0 * scores + 1.0, task_delta=np.exp(scores / 5))
    report = validate_runs(rank, sweep, n_permutations=200)
    for outcome in ("combined_z", "delta:t1"):
        c = report.correlations["score"][outcome]
        assert c["n"] == n
        assert c["spearman"] == pytest.approx(1.0)
        assert c["kendall"] == pytest.approx(1.0)
    # every numeric rank column is a predictor (delta_0 here is monotone in row order too); timings are not
    assert "delta_0" in report.correlations and "cka_plateau" in report.correlations
    assert "probe_s" not in report.correlations


def test_shuffled_relation_matches_scipy(tmp_path):
    scores = [0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.8, 0.4, 0.6, 0.05]
    outcome = [1.0, 0.5, 2.5, -1.0, 3.0, 0.0, 1.5, -0.5, 2.0, 0.7]
    rank, sweep = make_runs(tmp_path, scores, outcome)
    report = validate_runs(rank, sweep, n_permutations=200)
    c = report.correlations["score"]["combined_z"]
    rho, rho_p = stats.spearmanr(scores, outcome)
    tau, tau_p = stats.kendalltau(scores, outcome)
    assert c["spearman"] == pytest.approx(rho) and c["spearman_p"] == pytest.approx(rho_p)
    assert c["kendall"] == pytest.approx(tau) and c["kendall_p"] == pytest.approx(tau_p)
    # hand check of one value: 45 pairs, Kendall tau = (concordant - discordant) / 45
    pairs = list(itertools.combinations(range(10), 2))
    s = sum(np.sign(scores[a] - scores[b]) * np.sign(outcome[a] - outcome[b]) for a, b in pairs)
    assert c["kendall"] == pytest.approx(s / 45)


def test_correlation_drops_missing_and_constant():
    assert correlation([1, 2, None, 4, float("nan")], [1, 2, 3, 4, 5])["n"] == 3
    assert math.isnan(correlation([1, 1, 1, 1], [1, 2, 3, 4])["spearman"])


def test_hypergeometric_enrichment_by_hand(tmp_path):
    # N = 20 windows, 5 positive (z = 3), top decile = 2 windows, both positive:
    # P(X >= 2) = C(5,2) C(15,0) / C(20,2) = 10 / 190
    assert hypergeom_enrichment_p(20, 5, 2, 2) == pytest.approx(10 / 190)
    assert hypergeom_enrichment_p(20, 5, 2, 0) == pytest.approx(1.0)
    # P(X >= 1) = 1 - C(15,2)/C(20,2) = 1 - 105/190
    assert hypergeom_enrichment_p(20, 5, 2, 1) == pytest.approx(1 - 105 / 190)
    scores = np.arange(20, 0, -1, dtype=float)  # window 0 has the highest score
    z = [3.0, 3.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 3.0, 0, 0, 0, 0, 0, 0, -1.0]
    rank, sweep = make_runs(tmp_path, scores, z)
    report = validate_runs(rank, sweep, n_permutations=500)
    e = report.outcomes["combined_z"]["enrichment"]
    assert (e["n_windows"], e["n_positive"], e["k_top"], e["top_positive"]) == (20, 5, 2, 2)
    assert e["hypergeom_p"] == pytest.approx(10 / 190)
    assert e["top_rate"] == 1.0 and e["overall_rate"] == 0.25
    assert e["top_windows"] == ["0:1", "0:2"]
    # 10/190 = 0.053: not significant at 5%, and the verdict says so
    assert report.verdict.startswith("no enrichment") and "p=0.053" in report.verdict
    # 30 windows, 5 positive, top 3 all positive: p = C(5,3)/C(30,3) = 10/4060 -> enrichment
    z = [3.0] * 3 + [0.0] * 7 + [3.0] + [0.0] * 9 + [3.0] + [0.0] * 9
    rank, sweep = make_runs(tmp_path / "b", np.arange(30, 0, -1, dtype=float), z, cka=np.ones(30))
    report = validate_runs(rank, sweep, n_permutations=2000)
    e = report.outcomes["combined_z"]["enrichment"]
    assert e["hypergeom_p"] == pytest.approx(10 / 4060)
    assert report.verdict.startswith("enrichment (combined_z")


def test_top_count():
    assert top_count(20, 0.1) == 2
    assert top_count(21, 0.1) == 3
    assert top_count(5, 0.1) == 1
    assert top_count(0, 0.1) == 0
    assert top_count(10, 1.0) == 10


def test_evaluations_to_best_on_fixed_ordering(tmp_path):
    # values in score order (best score first)
    values = [0.1, 0.5, 0.2, 0.9, 0.3, 0.85, -0.2, 0.0]
    assert evaluations_to_reach(values, 0.9) == 4
    assert evaluations_to_reach(values, 0.81) == 4
    assert evaluations_to_reach(values, 0.4) == 2
    assert evaluations_to_reach(values, 5.0) is None
    scores = np.arange(len(values), 0, -1, dtype=float)
    rank, sweep = make_runs(tmp_path, scores, values)
    ev = validate_runs(rank, sweep, n_permutations=300).outcomes["combined_z"]["evaluations"]
    assert ev["best"]["score_order"] == 4 and ev["best"]["targets"] == 1
    assert ev["best"]["random_expected"] == pytest.approx((8 + 1) / (1 + 1))
    assert ev["best"]["p_value"] == pytest.approx(4 / 8)  # 1 - C(7,4)/C(8,4)
    # 90% of the best = 0.81: two windows reach it (0.9 and 0.85); the first in score order is 4th
    assert ev["best90"]["targets"] == 2 and ev["best90"]["score_order"] == 4
    assert ev["best90"]["random_expected"] == pytest.approx(9 / 3)
    assert ev["curve"]["score_order"] == pytest.approx([0.1, 0.5, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9])
    assert ev["curve"]["random_mean"][-1] == pytest.approx(0.9)
    # the first pick of a random order is a uniform draw: its mean is the mean outcome (4 s.e. of 300 draws)
    assert ev["curve"]["random_mean"][0] == pytest.approx(np.mean(values), abs=4 * np.std(values) / np.sqrt(300))


def test_expected_first_hit_closed_form_by_enumeration():
    for n, k in [(5, 1), (6, 2), (7, 3)]:
        firsts = [min(c) + 1 for c in itertools.combinations(range(n), k)]
        assert expected_first_hit(n, k) == pytest.approx(np.mean(firsts))
        for m in range(n + 1):
            assert prob_hit_within(n, k, m) == pytest.approx(np.mean([f <= m for f in firsts]))


def test_matched_cka_permutation_is_seeded_and_a_probability(tmp_path):
    rng = np.random.default_rng(7)
    n = 40
    cka = rng.uniform(0.6, 1.0, n)
    positive = rng.uniform(size=n) < 0.3
    top = np.zeros(n, dtype=bool)
    top[:4] = True
    a = matched_permutation(positive, cka, top, n_permutations=2000, seed=3)
    b = matched_permutation(positive, cka, top, n_permutations=2000, seed=3)
    assert a == b
    assert 0.0 < a["p_value"] <= 1.0
    assert 0.0 <= a["null_rate_mean"] <= 1.0
    assert a["observed"] == int(positive[:4].sum())
    # the matched draw never takes a top window: with every non-top window negative the null is 0
    only_top = np.zeros(n, dtype=bool)
    only_top[:4] = True
    c = matched_permutation(only_top, cka, top, n_permutations=500, seed=0)
    assert c["null_mean"] == 0.0 and c["p_value"] == pytest.approx(1 / 501)
    # through validate_runs: the same seed gives the same report
    scores = np.arange(n, 0, -1, dtype=float)
    z = np.where(positive, 3.0, 0.0)
    rank, sweep = make_runs(tmp_path, scores, z, cka=cka)
    r1 = validate_runs(rank, sweep, n_permutations=1000, seed=5)
    r2 = validate_runs(rank, sweep, n_permutations=1000, seed=5)
    assert r1.outcomes["combined_z"]["enrichment"]["matched"] == r2.outcomes["combined_z"]["enrichment"]["matched"]
    assert 0.0 <= r1.outcomes["combined_z"]["enrichment"]["matched"]["p_value"] <= 1.0


def test_low_cka_comparison(tmp_path):
    n = 20
    cka = np.linspace(1.0, 0.5, n)  # score order = CKA order; the bottom two by CKA are the last two
    z = [3.0, 3.0] + [0.0] * 16 + [3.0, 0.0]
    rank, sweep = make_runs(tmp_path, np.arange(n, 0, -1, dtype=float), z, cka=cka)
    low = validate_runs(rank, sweep, n_permutations=200).outcomes["combined_z"]["enrichment"]["low_cka"]
    assert low["k"] == 2 and low["positive"] == 1 and low["rate"] == 0.5
    assert low["windows"] == ["1:10", "2:3"]  # rows 18 and 19 (L = 10)
    assert low["fisher_p_top_greater"] == pytest.approx(stats.fisher_exact([[2, 0], [1, 1]], alternative="greater")[1])


def test_random_relation_says_no_enrichment(tmp_path):
    rng = np.random.default_rng(0)
    n = 36
    scores = rng.normal(size=n)
    z = rng.normal(size=n) * 1.5
    rank, sweep = make_runs(tmp_path, scores, z)
    report = validate_runs(rank, sweep, n_permutations=500)
    e = report.headline["enrichment"]
    assert e["hypergeom_p"] >= 0.05
    assert report.verdict.startswith("no enrichment")
    assert f"{e['top_rate']:.2f} vs {e['overall_rate']:.2f} overall" in report.verdict
    assert "Calibration model not recorded" in report.verdict


def test_no_positive_windows_verdict(tmp_path):
    rank, sweep = make_runs(tmp_path, np.arange(10.0), np.zeros(10))
    report = validate_runs(rank, sweep, n_permutations=100)
    assert report.verdict.startswith("no enrichment: no benchmark-positive window")


def test_in_sample_and_out_of_sample(tmp_path):
    rank, sweep = make_runs(tmp_path / "a", np.arange(10.0), np.arange(10.0), fitted_on="tiny-llama")
    report = validate_runs(rank, sweep, n_permutations=100)
    assert report.calibration["in_sample"] is True and "in-sample" in report.verdict.lower()
    rank, sweep = make_runs(tmp_path / "b", np.arange(10.0), np.arange(10.0), fitted_on={"model": "gemma-3-270m"})
    report = validate_runs(rank, sweep, n_permutations=100)
    assert report.calibration["in_sample"] is False and "out-of-sample" in report.verdict.lower()


def test_task_outcome_positive_rule_and_metric_choice(tmp_path):
    # t1 positive = delta > 0 and p < 0.05
    deltas = [0.2, 0.2, -0.1, 0.3, 0.0, 0.1, 0.1, 0.2, -0.3, 0.05]
    ps = [0.01, 0.2, 0.01, 0.04, 1.0, 0.001, 0.5, 0.02, 0.01, 0.3]
    rank, sweep = make_runs(tmp_path, np.arange(10, 0, -1.0), np.zeros(10), task_delta=deltas, task_p=ps)
    report = validate_runs(rank, sweep, n_permutations=100, metric="t1")
    assert report.metric == "delta:t1"
    e = report.headline["enrichment"]
    assert e["n_positive"] == 4  # windows 0, 3, 5, 7
    assert e["k_top"] == 1 and e["top_positive"] == 1
    assert e["hypergeom_p"] == pytest.approx(4 / 10)
    with pytest.raises(UsageError, match="unknown metric"):
        validate_runs(rank, sweep, metric="nope")


def test_single_task_positives_noted_and_files_written(tmp_path):
    n = 12
    z = [3.0] * 3 + [0.0] * 9
    rank, sweep = make_runs(tmp_path, np.arange(n, 0, -1.0), z, single=("0:1",))
    out = tmp_path / "val"
    report = validate_runs(rank, sweep, out_dir=out, n_permutations=200)
    assert any("rest on one task" in note for note in report.notes)
    data = json.loads((out / "validation.json").read_text())
    assert data["verdict"] == report.verdict and data["n_windows"] == n
    assert (out / "evaluations_to_best.png").stat().st_size > 0
    assert (out / "score_vs_outcome.png").stat().st_size > 0
    assert not list(out.glob(".*tmp*"))
    assert "Spearman" in report.format_text()


def test_partial_overlap_and_bad_folders(tmp_path):
    rank, sweep = make_runs(tmp_path, np.arange(10.0), np.arange(10.0))
    rows = json.loads((rank / "windows.json").read_text())
    (rank / "windows.json").write_text(json.dumps(rows[:6]))
    report = validate_runs(rank, sweep, n_permutations=100)
    assert report.n_windows == 6
    assert any("not in the rank run" in note for note in report.notes)
    with pytest.raises(UsageError):
        validate_runs(tmp_path / "missing", sweep)
    with pytest.raises(UsageError):
        validate_runs(rank, tmp_path / "missing")


def test_a_sweep_table_validates_as_its_folder(tmp_path):
    """`validate RANK sweep.csv` (a committed table, summary beside it) gives the folder's correlations and
    evaluations to the best; the CLI wants --out for a table (nothing is written beside it unasked)."""
    import csv

    from click.testing import CliRunner

    from rys_forge.cli import main

    n = 12
    scores = np.arange(n, dtype=float)
    rank, sweep = make_runs(tmp_path, scores, np.sin(scores), task_delta=np.cos(scores), task_p=[0.04, 0.5] * 6)
    rows = json.loads((sweep / "sweep.json").read_text())["rows"]
    table = tmp_path / "sweep_tiny.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["window", "i", "j", "width", "repeats", "combined_z", "delta:t1", "z:t1", "p:t1", "rys:t1"])
        for r in rows:
            t = r["tasks"]["t1"]
            writer.writerow([r["window"], r["i"], r["j"], r["width"], 2, r["combined_z"], t["delta"], "", t["p_value"], ""])
    (tmp_path / "sweep_tiny_summary.json").write_text((sweep / "summary.json").read_text())
    from_folder = validate_runs(rank, sweep, n_permutations=50)
    from_table = validate_runs(rank, table, n_permutations=50)
    for outcome in ("combined_z", "delta:t1"):
        assert from_table.correlations["score"][outcome] == from_folder.correlations["score"][outcome]
    assert from_table.format_text().splitlines()[2:] == from_folder.format_text().splitlines()[2:]
    refused = CliRunner().invoke(main, ["validate", str(rank), str(table)])
    assert refused.exit_code == 2 and "--out" in refused.output and not (tmp_path / "sweep_tiny_validation").exists()
