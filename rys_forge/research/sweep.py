"""`sweep`: Ng-style brute force. Evaluate every window's in-memory repeat on lm-eval benchmark tasks.

The loaded model is evaluated once as is (the base), then once per (window, repeats) under
:func:`rys_forge.repeat.repeated` (same object, no reload, no extra weights), through the evaluate stage's
public API (:func:`rys_forge.evaluate.run_lm_eval`; rows from :mod:`rys_forge.research.sweep_rows`), so a
sweep row and an ``rys-forge eval --model M --window i:j`` report agree number for number. The ``cached``
engine (:mod:`rys_forge.research.sweep_engine`) answers loglikelihood tasks from one base pass instead.

Per task one metric is kept: ``acc_norm`` where the task has it, else ``acc``, else the task's first
metric (filter ``none`` first); the output names it (``summary.json`` -> ``metrics``). Per
(window, repeats) and task the row records the value, lm-eval's stderr, the per-item 0/1 results, the
delta (rys - base), the paired test's p-value (exact McNemar for 0/1 items), and

* ``z = delta / sqrt(se_base^2 + se_rys^2)``, negated for a lower-is-better metric (an unpaired,
  conservative z: the pairing only makes the true standard error of the difference smaller; when both
  stderrs are 0, e.g. all items right in both runs, the denominator is floored at ``1 / (2 n)``, half an
  item);
* ``combined_z = sum_t z_t / sqrt(#tasks)`` (Stouffer);
* ``single_task_verdict``: with two or more tasks, one task's ``|z|`` is more than
  ``SINGLE_TASK_SHARE`` (70%) of ``|sum_t z_t|`` and at least ``SINGLE_TASK_MIN_Z`` (1.0). This is the
  calibration-shift warning: on small models a repeat often moves one binary task by 10-20 points while
  the others drop, so a "positive" combined score that rests on one task is not a general gain.

Run folder (``out_dir``; written by :mod:`rys_forge.research.sweep_outputs`, which also reports an unfinished
sweep's windows without a model):

* ``run.json``: the settings fingerprint (checked on ``resume``);
* ``base.json``: the base run (written once; a resumed sweep never re-evaluates the base);
* ``sweep.jsonl``: one line per finished (window, repeats), appended as it finishes (the resume log);
* ``sweep.json`` / ``sweep.csv``: the final table (CSV: flat columns ``delta:<task>``, ``z:<task>``, ...);
* ``summary.json``: base scores, metrics used, settings, repeats fits, per-window seconds, versions;
* ``heatmap_delta_<task>[_xN].png``, ``heatmap_combined_z[_xN].png``: i x j heatmaps (Ng's layout),
  diverging colours centred on 0 (= the base score);
* ``repeats_fit.png`` (with two or more repeat counts): delta against visits per window, with the fit
  ``Perf(n) = Perf(1) + a (n-1) - b (n-1)^2`` (n = visits of the block, ``Perf(1)`` = the base).

Damped visits (``alphas``, ``substeps``; see :mod:`rys_forge.plan`): every window is also evaluated with its
repeated visits at each residual scale ``alpha`` (each repeat count at each scale; 1, the plain repeat, always
included as the reference) and as ``K`` sub-steps of ``1/K`` (x2 only), reusing the one base run (and, with the
cached engine, the one base pass and its cached prefix). Such rows carry ``alpha`` (and ``substeps``) beside
``repeats``; plain rows are what they were. The folder then also holds per-scale heatmaps
(``heatmap_*_a<alpha>.png``, ``heatmap_*_s<K>.png``), ``best_scale.csv`` / ``best_scale.md`` (per window: the
scale with the best combined z beside the plain repeat, with paired tests per task) and ``summary.json`` ->
``scales`` (per task, the windows better at some alpha < 1 than at alpha 1). ``read_sweep`` returns the plain
rows unless asked for every scale, so ``validate``, ``calibrate`` and ``learn-score`` read plain rows.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rys_forge.architectures import get_path, spec_for_model
from rys_forge.distributed import Shard, current_shard
from rys_forge.errors import EvaluationError, UsageError
from rys_forge.evaluate import (check_batch_size, check_counts, compare_runs, is_count, lm_eval_environment,
                                lm_eval_version, load_task_objects, resolve_task_names, run_lm_eval, say)
from rys_forge.files import json_safe
from rys_forge.plan import LayerPlan, Window, select_windows
from rys_forge.progress import progress_bar
from rys_forge.repeat import repeated
from rys_forge.research.sweep_outputs import (BASE_FILE, SWEEP_FORMAT, SweepFolder, SweepResult, read_stored_base,
                                              read_sweep, report_unfinished, restore_record, summarise,
                                              write_outputs)
from rys_forge.research.sweep_rows import (Visits, base_summary, best_scales, parse_alphas, parse_repeats,
                                          parse_substeps, repeat_fits, reported_tasks, sweep_configs, window_record)

if TYPE_CHECKING:
    from rys_forge.research.race import RaceSettings

__all__ = ["SweepResult", "read_sweep", "report_unfinished", "sweep_visits", "sweep_windows", "write_outputs"]

#: Sweep engines (see :func:`sweep_windows`).
ENGINES = ("auto", "cached", "lm-eval")


@dataclass
class _Context:
    """What every run of one sweep shares: the model, its tasks and lm-eval settings, the run folder and
    the records finished so far (``done``, by :meth:`Visits.key`: ``"<window>x<repeats>"`` for a plain repeat)."""

    model: Any
    tokenizer: Any
    manager: Any
    names: list[str]
    task_objects: list[Any] | None
    run_kwargs: dict[str, Any]
    folder: SweepFolder | None
    done: dict[str, Any]
    seed: int
    limit: int | None


@dataclass
class _Base:
    """The base run, the seconds it took here, whether it came from ``base.json``, and the cached
    engine's ``HFLM`` (None with the lm-eval engine)."""

    run: dict[str, Any]
    seconds: float
    reused: bool
    lm: Any = None


def _evaluate_once(model: Any, tokenizer: Any, manager: Any, names: Sequence[str], **kwargs: Any) -> dict[str, Any]:
    """One lm-eval run of the model as it is now (tests count or interrupt calls here)."""
    return run_lm_eval(model, tokenizer, manager, names, **kwargs)


def _choose_engine(engine: str, manager: Any, names: list[str]) -> tuple[str, list[Any] | None]:
    """The engine to use (``auto`` resolved) and, for the cached engine, the loaded task objects."""
    if engine == "lm-eval":
        return engine, None
    from rys_forge.research.sweep_engine import check_cached_tasks, uncached_tasks

    with lm_eval_environment(False):
        task_objects = load_task_objects(manager, names)
    if engine == "cached":
        check_cached_tasks(task_objects)
        return engine, task_objects
    if uncached_tasks(task_objects):  # auto: a generation task needs one lm-eval run per window
        return "lm-eval", None
    return "cached", task_objects


# --------------------------------------------------------------------------- the runs




def _run_base(ctx: _Context, engine: str, pending: bool, batch_tokens: int, progress: bool, shard: Shard) -> _Base:
    """The base run: read from ``base.json``, else evaluated (and stored by rank 0). The cached engine
    runs its base pass whenever windows are ``pending`` (it fills the activation cache)."""
    stored = read_stored_base(ctx.folder)
    base = _Base(run=stored, seconds=0.0, reused=stored is not None)  # type: ignore[arg-type]
    if engine == "cached" and (pending or stored is None):
        from rys_forge.research.sweep_engine import capturing_lm

        base.lm = capturing_lm(ctx.model, ctx.tokenizer, batch_tokens=batch_tokens)
        say(progress, f"base pass and activation cache over {', '.join(ctx.names)}")
        t0 = time.perf_counter()
        fresh = _evaluate_once(ctx.model, ctx.tokenizer, ctx.manager, ctx.names, lm=base.lm,
                               task_objects=ctx.task_objects, **ctx.run_kwargs)
        base.seconds = time.perf_counter() - t0
        base.run = base.run or fresh
    if base.run is None:
        say(progress, f"evaluating the base model on {', '.join(ctx.names)}")
        t0 = time.perf_counter()
        base.run = _evaluate_once(ctx.model, ctx.tokenizer, ctx.manager, ctx.names, **ctx.run_kwargs)
        base.seconds = time.perf_counter() - t0
    if not base.reused and ctx.folder is not None and shard.rank == 0:
        ctx.folder.write(BASE_FILE, json.dumps(json_safe({"run": base.run, "seconds": base.seconds})))
    return base


def _finish_window(ctx: _Context, record: dict[str, Any], advance: Any) -> None:
    ctx.done[record["key"]] = record
    if ctx.folder:
        ctx.folder.append(record)
    advance()


def _lm_eval_windows(ctx: _Context, todo: Sequence[tuple[Window, Visits]], base_run: dict[str, Any],
                     reported: Sequence[str], num_layers: int, advance: Any) -> None:
    """Every (window, visits) in ``todo`` as one full lm-eval run under its repeat (damped visits included)."""
    for window, visits in todo:
        plan = LayerPlan.from_windows([window], num_layers, visits.repeats, visits.alpha)
        t0 = time.perf_counter()
        with repeated(ctx.model, plan):
            rys_run = _evaluate_once(ctx.model, ctx.tokenizer, ctx.manager, ctx.names, **ctx.run_kwargs)
        seconds = time.perf_counter() - t0
        record = window_record(window, visits.repeats, base_run, rys_run, reported, ctx.seed, seconds,
                               alpha=visits.alpha, substeps=visits.substeps)
        _finish_window(ctx, record, advance)


# --------------------------------------------------------------------------- entry point


def sweep_visits(repeats: Any = 2, alphas: Any = None, substeps: Any = None, race: bool = False) -> list[Visits]:
    """The configurations of the visits a sweep evaluates: each repeat count at each scale (plain first), then each
    sub-step count (:func:`~rys_forge.research.sweep_rows.sweep_configs`); cheap, so a CLI checks it before loading.

    Raises:
        UsageError: a bad repeat count, scale or sub-step count, sub-steps beside repeats other than 2, or damped
            visits in a race (it races plain repeats only).
    """
    configs = sweep_configs(parse_repeats(repeats), parse_alphas(alphas), parse_substeps(substeps))
    if race and not all(v.plain for v in configs):
        raise UsageError("--race races plain repeats only; drop --alphas/--substeps (race, then sweep the scales of"
                         " the windows it keeps with --window)")
    return configs


def _check_arguments(model: Any, windows: Sequence[str] | None, min_width: int, max_width: int | None, repeats: Any,
                     alphas: Any, substeps: Any, race: RaceSettings | None, limit: int | None, num_fewshot: int | None,
                     batch_size: int | str, engine: str, batch_tokens: int, seed: int) -> tuple[list[Visits], int | str, int, list[Window]]:
    """Configurations of the visits, checked batch size, the model's depth and the windows to sweep (UsageError,
    WindowError)."""
    configs = sweep_visits(repeats, alphas, substeps, race is not None)
    check_counts(limit, num_fewshot)
    batch_size = check_batch_size(batch_size)
    num_layers = len(get_path(model, spec_for_model(model).layers_path))
    chosen = select_windows(num_layers, windows, min_width, max_width)
    if engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if not is_count(batch_tokens, 1):
        raise UsageError(f"--batch-tokens must be a positive integer, got {batch_tokens!r}")
    if not is_count(seed, 0):
        raise UsageError(f"--seed must be an integer >= 0, got {seed!r}")
    return configs, batch_size, num_layers, chosen


def _scored_base(ctx: _Context, engine: str, pending: bool, batch_tokens: int, progress: bool,
                 shard: Shard) -> tuple[_Base, dict[str, Any]]:
    """The base run and its per-task summary (:func:`~rys_forge.research.sweep_rows.base_summary`)."""
    base_run = _run_base(ctx, engine, pending, batch_tokens, progress, shard)
    base_rows, base_paired, _ = compare_runs(base_run.run, base_run.run, n_resamples=1, seed=0)
    base = base_summary(base_rows, base_paired, reported_tasks(base_rows, base_run.run.get("groups")))
    if not base:
        raise EvaluationError(f"lm-eval produced no usable metric for {', '.join(ctx.names)}")
    return base_run, base


def _evaluate_windows(ctx: _Context, base_run: _Base, base: dict[str, Any], todo: list[tuple[Window, Visits]],
                      total: int, num_layers: int, progress: bool,
                      race: RaceSettings | None) -> tuple[float, Any, float | None]:
    """Every (window, visits) in ``todo`` with the base run's engine (raced when ``race``); returns the
    seconds taken, the race's totals (None without a race) and the seconds of lm-eval scoring in them (the
    cached engine's; None with the lm-eval engine)."""
    started = time.perf_counter()
    reported = list(base)
    totals, scoring = None, None
    with progress_bar(progress, total, total - len(todo), "racing windows" if race else "evaluating windows") as advance:
        if base_run.lm is not None and race is not None:
            from rys_forge.research.race import race_cached_windows

            plain = [(w, v.repeats) for w, v in todo]  # _check_race: a race sweeps plain repeats only
            totals = race_cached_windows(base_run.lm, ctx.task_objects or [], plain, base_run.run, base, reported,
                                         limit=ctx.limit, seed=ctx.seed, settings=race,
                                         folder=ctx.folder.path if ctx.folder else None,
                                         on_record=lambda record: _finish_window(ctx, record, advance))
            scoring = totals.pop("scoring_s")
        elif base_run.lm is not None:
            from rys_forge.research.sweep_engine import score_cached_windows

            scoring = score_cached_windows(base_run.lm, ctx.task_objects or [], todo, base_run.run, base, reported,
                                           limit=ctx.limit, seed=ctx.seed,
                                           on_record=lambda record: _finish_window(ctx, record, advance))
        else:
            _lm_eval_windows(ctx, todo, base_run.run, reported, num_layers, advance)
    return time.perf_counter() - started, totals, scoring


def _check_race(race: RaceSettings | None, engine: str) -> None:
    """A race needs the cached engine and one process (each look needs every window's results)."""
    if race is not None and engine != "cached":
        raise UsageError("--race needs the cached engine (loglikelihood tasks only, --engine auto or cached)")
    if race is not None and current_shard().parallel:
        raise UsageError("--race runs in one process (each look needs every window's results); drop torchrun")


def _engine_timings(base_run: _Base, scoring: float | None) -> dict[str, Any]:
    """How the base engine laid out its batches (packed rows, and/or cut by the measured cost of one batch) and the
    share of padding, and the seconds of lm-eval scoring inside the windows' time (CPU work the engine waits
    for; cached engine only)."""
    engine = getattr(base_run.lm, "engine", None)
    out: dict[str, Any] = {}
    if engine is not None:
        out["packed"] = engine.packed
        if engine.batch_overhead_tokens is not None:  # measured: some requests had rows of their own
            out["batch_overhead_tokens"] = engine.batch_overhead_tokens
        out["padding"] = engine.padding
    return {**out, "scoring_s": scoring} if scoring is not None else out


def _race_summary(race: RaceSettings, totals: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The race's settings and totals, windows per stopping reason, and the windows called positive."""
    reasons = [r.get("race_reason") for r in rows]
    return {**race.to_dict(), **totals, "windows": {k: reasons.count(k) for k in ("completed", "dropped", "budget")},
            "positive": [r["window"] for r in rows if r.get("race_positive")]}


def _ordered(items: list[tuple[Window, Visits]], seed: int, order: Sequence[str] | None) -> list[tuple[Window, Visits]]:
    """`items` in the given window order (e.g. a rank run's; the rest after it), else in a seeded random
    order, so that a sweep cut short (time limit, Ctrl-C, a race's budget) is an unbiased sample."""
    shuffled = [items[k] for k in np.random.default_rng(seed).permutation(len(items))]
    if not order:
        return shuffled
    position = {w: k for k, w in enumerate(order)}
    return sorted(shuffled, key=lambda item: position.get(str(item[0]), len(position)))


def _fingerprint(info: dict[str, Any], model: Any, num_layers: int, names: Sequence[str], chosen: Sequence[Window],
                 configs: list[Visits], engine: str, race: RaceSettings | None, order: Sequence[str] | None,
                 **settings: Any) -> dict[str, Any]:
    """run.json's settings (with the model's identity, added by RunFolder.session, a resume must match them); the
    scales appear only when some are damped, so a plain sweep's settings are what they were."""
    repeat_list = sorted({v.repeats for v in configs if not v.substeps})
    alphas = list(dict.fromkeys(v.alpha for v in configs if not v.substeps))
    substeps = [v.substeps for v in configs if v.substeps]
    fingerprint = {
        "format": SWEEP_FORMAT, "model": str(info.get("source") or info.get("path") or type(model).__name__),
        "num_layers": num_layers, "tasks": list(names), **settings, "windows": [str(w) for w in chosen],
        "repeats": repeat_list, "lm_eval": lm_eval_version(), "engine": engine,
        **({"alphas": alphas} if alphas != [1.0] else {}), **({"substeps": substeps} if substeps else {}),
    }
    if race is not None:  # the budget may change between sessions; the schedule and the order may not
        fingerprint["race"] = {"alpha": race.alpha, "looks": race.looks, "order": list(order) if order else None,
                               **({"growth": race.growth} if race.growth != 2.0 else {})}  # older runs still resume
    return fingerprint


def _result(model: Any, info: dict[str, Any], num_layers: int, settings: dict[str, Any], base: dict[str, Any],
            rows: list[dict[str, Any]], configs: Sequence[Visits], timings: dict[str, Any], seed: int,
            out: Path | None) -> SweepResult:
    """The sweep's result: its rows, the repeats fits (several plain repeat counts), the best scale per window
    (damped visits) and the summary."""
    fits = repeat_fits(rows, list(base)) if len({v.repeats for v in configs if v.plain}) > 1 else {}
    scales = best_scales(rows, list(base), seed)
    summary = summarise(getattr(model.config, "model_type", None), info, num_layers, settings, base, rows, fits,
                        timings, scales)
    return SweepResult(rows=rows, base=base, summary=summary, out_dir=out, fits=fits, scales=scales)


def sweep_windows(
    model: Any, tokenizer: Any, *, tasks: Sequence[str] | str, windows: Sequence[str] | None = None,
    min_width: int = 2, max_width: int | None = None, repeats: Sequence[int] | int | str = (2,),
    alphas: Sequence[float] | float | str | None = None, substeps: Sequence[int] | int | str | None = None,
    limit: int | None = None, num_fewshot: int | None = None, out_dir: str | Path | None = None, resume: bool = False,
    progress: bool = True, seed: int = 0, batch_size: int | str = 1, include_path: Any = None,
    bootstrap_iters: int = 1000, model_info: dict[str, Any] | None = None, engine: str = "auto",
    batch_tokens: int = 16384, race: RaceSettings | None = None, order: Sequence[str] | None = None,
) -> SweepResult:
    """Evaluate the base once, then every window's in-memory repeat, on lm-eval tasks.

    Args:
        model: a loaded ``*ForCausalLM`` (no plan applied); nothing is loaded here.
        tokenizer: its tokenizer.
        tasks: lm-eval task / group / tag names (the offline ``rys_*`` tasks or lm-eval's registry).
        windows: explicit windows ``i:j``; None: every window with ``min_width <= j-i <= max_width``.
        repeats: visit counts of the block (2 = RYS); several (``2,3,4``) give per-window repeat curves.
        alphas, substeps: residual scales of the repeated visits (``1,0.75,0.5``; 1 always included), each at every
            repeat count; sub-step counts ``K`` (``2,4``), each K+1 visits, the repeated ones at 1/K (repeats 2 only).
        limit: items per task (None: all); the same items for every run.
        num_fewshot: few-shot examples (None: each task's default).
        out_dir: run folder; None keeps everything in memory.
        resume: continue an interrupted sweep in ``out_dir`` (the settings must match; the base is reused).
        progress: progress bar and stage messages on stderr.
        seed: lm-eval's seeds (as in ``rys-forge eval``) and the paired bootstrap's.
        batch_size, include_path, bootstrap_iters: lm-eval's batch size, extra task folder(s), stderr bootstrap.
        model_info: provenance (``source``, ``path``, ...) stored in the summary and the fingerprint.
        engine: ``cached`` (one base pass, each window replayed from the cached stream at its end; see
            :mod:`rys_forge.research.sweep_engine`), ``lm-eval`` (one full lm-eval run per window, any task
            type), or ``auto`` (``cached`` when every task is a loglikelihood task).
        batch_tokens: padded tokens per forward batch of the cached engine.
        race, order: race the windows (:mod:`rys_forge.research.race`), in this order (None: seeded random).

    Returns:
        A :class:`SweepResult` (also written to ``out_dir``).

    Raises:
        UsageError / WindowError / TaskError: bad arguments, windows, tasks, or a resume with other settings.
        EvaluationError: lm-eval failed.
    """
    started, tasks = time.perf_counter(), [tasks] if isinstance(tasks, str) else list(tasks)
    configs, batch_size, num_layers, chosen = _check_arguments(model, windows, min_width, max_width, repeats, alphas,
        substeps, race, limit, num_fewshot, batch_size, engine, batch_tokens, seed)
    manager, names = resolve_task_names(tasks, include_path)
    engine, task_objects = _choose_engine(engine, manager, names)
    _check_race(race, engine)
    info = dict(model_info or {})
    fingerprint = _fingerprint(info, model, num_layers, names, chosen, configs, engine, race, order, limit=limit,
                               num_fewshot=num_fewshot, seed=seed, batch_size=str(batch_size),
                               bootstrap_iters=bootstrap_iters, batch_tokens=batch_tokens,
                               include_path=None if include_path is None else str(include_path))
    shard = current_shard()
    with SweepFolder.session(out_dir, fingerprint, resume, shard, model=model, model_info=info) as folder:
        done = {k: r for k, r in (folder.finished() if folder else {}).items() if r.get("race_reason") != "budget"}
        ctx = _Context(model, tokenizer, manager, names, task_objects, folder=folder, done=done,
                       run_kwargs=dict(limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, seed=seed,
                                       bootstrap_iters=bootstrap_iters, progress=False), seed=seed, limit=limit)
        shard.barrier()  # every process reads the same finished windows before any of them evaluates
        plan_items = [(w, v) for v in configs for w in chosen]
        todo_all = _ordered([(w, v) for w, v in plan_items if v.key(w) not in ctx.done], seed, order)
        todo = shard.take(todo_all)  # under torchrun: this process's share
        base_run, base = _scored_base(ctx, engine, bool(todo), batch_tokens, progress, shard)
        sweep_seconds, race_totals, scoring = _evaluate_windows(ctx, base_run, base, todo, len(plan_items), num_layers, progress, race)
        out = Path(out_dir) if out_dir else None
        if shard.parallel:
            shard.barrier()
            ctx.done = folder.finished()  # type: ignore[union-attr]
        rows = [restore_record(ctx.done[v.key(w)]) for w, v in plan_items if v.key(w) in ctx.done]
        if shard.rank != 0:  # rank 0 writes the merged outputs
            return SweepResult(rows=rows, base={}, summary={"shard": {"rank": shard.rank, "world": shard.world}}, out_dir=out)
        timings = {"base_eval_s": base_run.seconds, "base_reused": base_run.reused, "windows_s": sweep_seconds,
                   "windows_evaluated_this_session": len(todo_all), "processes": shard.world,
                   "total_s": time.perf_counter() - started, **_engine_timings(base_run, scoring)}
        if race is not None and race_totals is not None:
            timings["race"] = _race_summary(race, race_totals, rows)
        settings = {**fingerprint, "tasks_requested": tasks, "min_width": min_width, "max_width": max_width}
        result = _result(model, info, num_layers, settings, base, rows, configs, timings, seed, out)
        if folder:
            write_outputs(result, num_layers)
        return result


