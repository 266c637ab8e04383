"""The research commands: sweep (brute-force ground truth), validate, calibrate, learn-score."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from rys_forge.plan import WINDOW_CONVENTION
from rys_forge.cli.framework import (
    print_learned,
    model_options,
    output_check,
    placement_options,
    resumable,
    run_setup,
    split,
)


@click.command()
@model_options
@click.option("--tasks", default=None, help="Comma list of tasks (local rys_* tasks, or lm-eval names when online); required.")
@click.option("--window", "windows", multiple=True, help=f"Sweep only these windows (repeatable). {WINDOW_CONVENTION}.")
@click.option("--min-width", default=2, show_default=True, type=int, help="Smallest window width j-i.")
@click.option("--max-width", default=None, type=int, help="Largest window width (default: all).")
@click.option("--repeats", default="2", show_default=True, help="Visits of the block, e.g. 2 or 2,3,4 (with a Perf(n) fit).")
@click.option("--alphas", default="1", show_default=True, help="Residual scales of the repeated visits, e.g. 1,0.75,0.5 (each adds alpha x its attention and MLP updates), each swept at every --repeats; 1, the plain repeat, is always included.")
@click.option("--substeps", default=None, help="Sub-step counts, e.g. 2 or 2,4: each K adds K+1 visits, the repeated ones at 1/K (with --repeats 2).")
@click.option("--limit", default=None, type=int, help="Items per task.")
@click.option("--num-fewshot", default=None, type=int, help="Few-shot examples (default: the task's).")
@click.option("--batch-size", default="1", show_default=True, help="lm-eval batch size.")
@click.option("--out", default=None, type=click.Path(), callback=output_check(folder=True), help="Run folder (default: runs/sweep-<model>-<time>).")
@click.option("--resume", is_flag=True, help="Continue an interrupted sweep in --out.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--engine", default="auto", show_default=True, type=click.Choice(["auto", "cached", "lm-eval"]),
              help="cached: one base pass, each window replayed from the cached stream (loglikelihood tasks);"
              " lm-eval: one full lm-eval run per window (any task); auto: cached when the tasks allow.")
@click.option("--batch-tokens", default=16384, show_default=True, type=int, help="Padded tokens per batch (cached engine).")
@click.option("--attn", "attn_implementation", default="eager", show_default=True, type=click.Choice(["eager", "sdpa"]),
              help="Attention kernels (sdpa is faster on GPU).")
@click.option("--race", is_flag=True, help="Race the windows: growing item subsets, harmful windows dropped early (cached engine).")
@click.option("--budget", default=None, help="With --race: stop after this many item-evaluations (e.g. 20000) or seconds (600s).")
@click.option("--race-alpha", default=0.05, show_default=True, type=float, help="With --race: one-sided level of a positive call.")
@click.option("--race-looks", default=4, show_default=True, type=int, help="With --race: looks (item subsets growing by --race-growth up to --limit).")
@click.option("--race-growth", default=2.0, show_default=True, type=float, help="With --race: items grow by this factor from look to look (e.g. 1.41 with 11 looks: the first look of 6 at 2, finer steps after it).")
@click.option("--drop-confidence", default=0.9, show_default=True, type=float, help="With --race: one-sided confidence of a drop (worse than the base and the best).")
@click.option("--race-margin", default=0.0, show_default=True, type=float, help="With --race: indifference margin (mean paired difference, e.g. 0.005 = half a point): also drop windows that can no longer gain this much over the base or the best.")
@click.option("--order-from", default=None, type=click.Path(), help="Evaluate windows in this rank run's order (default: seeded random).")
@click.option("--report-unfinished", is_flag=True, help="Only write the table, summary and heatmaps of the windows the unfinished sweep in --out has finished (no model is loaded).")
@placement_options
def sweep(model_name: str, dtype: str, device: str, tasks: str | None, windows: tuple[str, ...], min_width: int,
          max_width: int | None, repeats: str, alphas: str, substeps: str | None, limit: int | None,
          num_fewshot: int | None, batch_size: str, out: str | None, resume: bool, no_progress: bool, engine: str,
          batch_tokens: int, attn_implementation: str, race: bool, budget: str | None, race_alpha: float, race_looks: int,
          race_growth: float, drop_confidence: float, race_margin: float, order_from: str | None, report_unfinished: bool, placement: dict[str, Any]) -> None:
    """Brute force, Ng-style: evaluate every window in memory on the tasks (deltas, z-scores, heatmaps).

    The yardstick `validate` compares a rank run against. Resumable (--resume --out DIR). With
    loglikelihood tasks (all the local rys_* tasks but rys_gsm8k) the cached engine runs the base once
    and replays each window from the cached residual stream at its end. --race stops clearly harmful
    windows early (valid positive calls at --race-alpha). --alphas / --substeps also sweep damped repeated
    visits (per-scale heatmaps and best_scale.csv beside the plain repeat).
    """
    from rys_forge.models import load_model
    from rys_forge.rank.outputs import read_rank_run
    from rys_forge.research.race import RaceSettings
    from rys_forge.research.sweep import report_unfinished as report, sweep_visits, sweep_windows
    from rys_forge.research.sweep_rows import SCALE_P

    from rys_forge.errors import UsageError

    if report_unfinished:
        if out is None:
            raise UsageError("--report-unfinished needs --out (the unfinished sweep's run folder)")
        result = report(out)
        click.echo(f"{result.summary['windows_done']} of {result.summary['windows_planned']} windows reported; "
                   f"best: {result.summary.get('best')}\nrun folder: {out}")
        return
    if not tasks:
        raise UsageError("Missing option '--tasks' (a comma list of tasks)")
    sweep_visits(repeats, alphas, substeps, race)  # bad scales: one line before anything loads
    race_settings = RaceSettings.from_options(race, budget, race_alpha, race_looks, drop_confidence, race_margin,
                                              race_growth)
    order = [str(r["window"]) for r in read_rank_run(Path(order_from))[0]] if order_from else None
    shard, out, device = run_setup("sweep", model_name, out, device, resume)
    loaded = load_model(model_name, dtype=dtype, device=device, attn_implementation=attn_implementation, **placement)
    with resumable("sweep", out):
        result = sweep_windows(
            loaded.model, loaded.tokenizer, tasks=split(tasks), windows=list(windows) or None, min_width=min_width,
            max_width=max_width, repeats=repeats, alphas=alphas, substeps=substeps, limit=limit,
            num_fewshot=num_fewshot, batch_size=batch_size, out_dir=out, resume=resume, progress=not no_progress and shard.rank == 0,
            model_info={**loaded.info, "path": loaded.path}, engine=engine, batch_tokens=batch_tokens,
            race=race_settings, order=order,
        )
    if shard.rank != 0:
        return
    best = result.summary.get("best")
    click.echo(f"{len(result.rows)} rows; best: {best}")
    if "race" in result.summary["timings"]:
        info = result.summary["timings"]["race"]
        click.echo(f"race: {info['spent']} of {info['exhaustive']} item-evaluations ({info['spent'] / max(info['exhaustive'], 1):.0%});"
                   f" windows {info['windows']}; positive at one-sided {info['alpha']}: {', '.join(info['positive']) or 'none'}")
    if "scales" in result.summary:
        gains = result.summary["scales"]
        click.echo(f"damped scales: of {gains['windows']} windows, better at some alpha < 1 than at alpha 1 (paired"
                   f" p < {SCALE_P}), per task: " + ", ".join(f"{t} {n}" for t, n in gains["better"].items())
                   + f"; table: {result.out_dir}/best_scale.md")
    flagged = sum(bool(r.get("single_task_verdict")) for r in result.rows)
    if flagged:
        click.echo(f"{flagged} windows move mostly one task (single_task_verdict): read them as calibration shifts, not reasoning")
    click.echo(f"run folder: {result.out_dir}")


@click.command()
@click.argument("rank_run", type=click.Path())
@click.argument("sweep_run", type=click.Path())
@click.option("--out", default=None, type=click.Path(), callback=output_check(folder=True), help="Where validation.json and plots go (default: SWEEP_RUN/validation).")
@click.option("--top-fraction", default=0.1, show_default=True, type=float, help="Top share of windows by score (the seeds' decile).")
@click.option("--permutations", default=10000, show_default=True, type=int, help="Draws for the CKA-matched baseline.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the permutation test.")
@click.option("--score-config", default=None, type=click.Path(), help="Re-score the rank rows with these constants (e.g. from calibrate).")
@click.option("--learned-score", default=None, type=click.Path(), help="Judge this learned score (from learn-score) instead of the rank run's score.")
def validate(rank_run: str, sweep_run: str, out: str | None, top_fraction: float, permutations: int, seed: int,
             score_config: str | None, learned_score: str | None) -> None:
    """Does the ranking find the benchmark-positive windows? Correlations, enrichment, evaluations-to-best.

    SWEEP_RUN is a sweep run folder or its .csv table (with `<stem>_summary.json` beside it; then give --out).

    Says so plainly when it does not.
    """
    from rys_forge.rank import LearnedScore, ScoreConfig
    from rys_forge.research.validate import validate_runs

    if out is None and Path(sweep_run).suffix == ".csv" and not Path(sweep_run).is_dir():
        raise click.UsageError("with a sweep table (.csv) give --out: where validation.json and the plots go")
    config = ScoreConfig.from_json(score_config) if score_config else None
    learned = LearnedScore.load(learned_score) if learned_score else None
    report = validate_runs(rank_run, sweep_run, out_dir=out or str(Path(sweep_run) / "validation"),
                           top_fraction=top_fraction, n_permutations=permutations, seed=seed, score_config=config,
                           learned_score=learned)
    click.echo(report.format_text())


@click.command()
@click.argument("sweep_run", type=click.Path())
@click.argument("rank_run", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(), callback=output_check(folder=False), help="Where the fitted score config (JSON) goes; an existing file must be an earlier calibrate output.")
@click.option("--target", default="combined_z", show_default=True, help="Sweep column: combined_z, mean_delta or delta:<task>.")
@click.option("--repeats", default=2, show_default=True, type=int, help="Sweep rows with this many visits.")
@click.option("--trials", default=2000, show_default=True, type=int, help="Random candidates of the search (per fit).")
@click.option("--folds", default=5, show_default=True, type=int, help="Folds of the cross-validated Spearman (0: none).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the search and the folds.")
def calibrate(sweep_run: str, rank_run: str, out: str, target: str, repeats: int, trials: int, folds: int, seed: int) -> None:
    """Fit the score constants on a calibration model (its sweep and rank runs); freeze them for others.

    Use the output with `rank --score-config` or `validate --score-config`; validating on the calibration
    model itself is in-sample and `validate` says so.
    """
    from rys_forge.research.calibrate import calibrate_score

    result = calibrate_score(sweep_run, rank_run, out=out, target=target, repeats=repeats, trials=trials,
                             folds=folds, seed=seed)
    click.echo(result.format_text())
    click.echo(f"score config: {out}")


@click.command(name="learn-score")
@click.option("--run", "runs", type=(str, click.Path(), click.Path()), multiple=True, required=True,
              metavar="MODEL RANK_DIR SWEEP", help="A model's name, its rank run folder and its sweep run folder (or the sweep's CSV table); two or more.")
@click.option("--out", "-o", required=True, type=click.Path(), callback=output_check(folder=False), help="Where the learned score (JSON) goes; an existing file must be an earlier learned score.")
@click.option("--report", default=None, type=click.Path(), callback=output_check(folder=False), help="Also write the leave-one-model-out report (JSON).")
@click.option("--target", default="combined_z", show_default=True, help="Sweep outcome to learn: combined_z, delta:<task> or z:<task>.")
@click.option("--transform", default="rank", show_default=True, type=click.Choice(["rank", "zscore", "none"]), help="Per-model transform of the probe columns and the target.")
@click.option("--repeats", default=None, type=int, help="Sweep rows with this many visits (default: 2 if present).")
@click.option("--penalty", default=None, type=float, help="Fixed ridge penalty (default: chosen by inner cross-validation).")
@click.option("--top-fraction", default=0.1, show_default=True, type=float, help="Top share of windows for the positives count.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the inner cross-validation folds.")
def learn_score(runs: tuple[tuple[str, str, str], ...], out: str, report: str | None, target: str, transform: str,
                repeats: int | None, penalty: float | None, top_fraction: float, seed: int) -> None:
    """Learn a window score from every probe column of several models' rank runs and sweeps.

    Judges it leave-one-model-out: per model, the hand-set prior, the fit on all models (in-sample) and the
    fit on the others (out-of-model), side by side: Spearman, evaluations to 90% of the best window, top-decile
    positives. Writes the fit on all models to --out for `rank --learned-score` and `validate --learned-score`.
    """
    from rys_forge.research.surrogate import learn_score as run_learn_score

    result = run_learn_score(list(runs), out=out, report_out=report, repeats=repeats, target=target, penalty=penalty,
                             feature_transform=transform, target_transform=transform, top_fraction=top_fraction, seed=seed)
    print_learned(result)
