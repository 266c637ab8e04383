"""`sweep`: Ng-style brute force. Evaluate every window's in-memory repeat on lm-eval benchmark tasks.

The loaded model is evaluated once as is (the base), then once per (window, repeats) under
:func:`rys_forge.repeat.repeated` (same object, no reload, no extra weights). lm-eval runs through
:mod:`rys_forge.evaluate`'s internals (``_run_lm_eval`` for one in-memory run, ``_compare`` for the
per-task rows, per-item pairing and McNemar / paired-bootstrap tests), so a sweep row and an
``rys-forge eval --model M --window i:j`` report agree number for number.

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

Run folder (``out_dir``):

* ``run.json``: the settings fingerprint (checked on ``resume``);
* ``base.json``: the base run (written once; a resumed sweep never re-evaluates the base);
* ``sweep.jsonl``: one line per finished (window, repeats), appended as it finishes (the resume log);
* ``sweep.json`` / ``sweep.csv``: the final table (CSV: flat columns ``delta:<task>``, ``z:<task>``, ...);
* ``summary.json``: base scores, metrics used, settings, repeats fits, per-window seconds, versions;
* ``heatmap_delta_<task>[_xN].png``, ``heatmap_combined_z[_xN].png``: i x j heatmaps (Ng's layout),
  diverging colours centred on 0 (= the base score);
* ``repeats_fit.png`` (with two or more repeat counts): delta against visits per window, with the fit
  ``Perf(n) = Perf(1) + a (n-1) - b (n-1)^2`` (n = visits of the block, ``Perf(1)`` = the base).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from rys_forge.evaluate import harness as _ev
from rys_forge.distributed import current_shard
from rys_forge.errors import TaskError, UsageError
from rys_forge.evaluate.local_tasks import resolve_tasks, task_manager
from rys_forge.plan import WINDOW_CONVENTION, LayerPlan, Window
from rys_forge.stats import is_finite_number
from rys_forge.files import json_safe, write_atomic
from rys_forge.artifacts import RunFolder
from rys_forge.plan import select_windows
from rys_forge.progress import progress_bar
from rys_forge.repeat import repeated

__all__ = [
    "SINGLE_TASK_MIN_Z",
    "SINGLE_TASK_SHARE",
    "SweepResult",
    "combine_z",
    "fit_repeat_curve",
    "pick_metric",
    "read_sweep",
    "sweep_windows",
    "task_z",
]

SWEEP_LOG = "sweep.jsonl"
BASE_FILE = "base.json"
SWEEP_FORMAT = 1
#: Sweep engines (see :func:`sweep_windows`).
ENGINES = ("auto", "cached", "lm-eval")
#: One task's share of |sum z| above which a window's verdict rests on a single task.
SINGLE_TASK_SHARE = 0.7
#: ... provided that task really moved (|z| at least this).
SINGLE_TASK_MIN_Z = 1.0
#: Metric preference per task.
METRIC_PREFERENCE = ("acc_norm", "acc")


@dataclass
class SweepResult:
    """Rows of a sweep (one per window and repeat count, in evaluation order) and its summary.

    Attributes:
        rows: ``window``, ``i``, ``j``, ``width``, ``repeats``, ``tasks`` ({task: {metric, base, rys, delta,
            base_stderr, rys_stderr, p_value, test, n, z, items}}), ``combined_z``, ``mean_delta``,
            ``single_task_verdict``, ``dominant_task``, ``dominant_share``, ``seconds``, and flat copies
            ``delta:<task>``, ``z:<task>``, ``p:<task>``, ``rys:<task>``.
        base: per task: ``metric``, ``filter``, ``value``, ``stderr``, ``n``, ``doc_ids``, ``items``.
        summary: settings, base scores, metrics used, repeats fits, timings.
        out_dir: the run folder (None: in memory only).
    """

    rows: list[dict[str, Any]]
    base: dict[str, Any]
    summary: dict[str, Any]
    out_dir: Path | None = None
    fits: dict[str, Any] = field(default_factory=dict)



# --------------------------------------------------------------------------- pure helpers




def pick_metric(rows: Sequence[dict[str, Any]], task: str) -> dict[str, Any] | None:
    """The row of ``task`` the sweep keeps: ``acc_norm``, else ``acc``, else the first metric (filter
    ``none`` preferred within each choice); None when the task has no numeric row."""
    candidates = [r for r in rows if r["task"] == task and r.get("base") is not None and r.get("rys") is not None]
    if not candidates:
        return None
    candidates.sort(key=lambda r: 0 if r["filter"] in ("none", None) else 1)
    for metric in METRIC_PREFERENCE:
        for row in candidates:
            if row["metric"] == metric:
                return row
    return candidates[0]


def task_z(delta: float | None, se_base: float | None, se_rys: float | None, n: int | None = None) -> float:
    """``delta / sqrt(se_base^2 + se_rys^2)``; missing stderrs count as 0, a zero denominator is floored at
    ``1 / (2 n)`` (half an item) when ``n`` is known; NaN when nothing can be said."""
    if delta is None or not is_finite_number(delta):
        return math.nan
    var = sum(float(s) ** 2 for s in (se_base, se_rys) if is_finite_number(s))
    denom = math.sqrt(var)
    if denom <= 0.0:
        if delta == 0.0:
            return 0.0
        if not n:
            return math.nan
        denom = 1.0 / (2.0 * n)
    return float(delta) / denom


def combine_z(
    z_by_task: dict[str, float], share: float = SINGLE_TASK_SHARE, min_z: float = SINGLE_TASK_MIN_Z
) -> dict[str, Any]:
    """Stouffer's combination of per-task z-scores and the single-task flag.

    Returns:
        ``combined_z`` = sum z / sqrt(#tasks) over the finite z's; ``dominant_task`` (largest |z|);
        ``dominant_share`` = its |z| / |sum z| (above 1 when the other tasks move the other way; inf when
        the sum is 0); ``single_task_verdict``: two or more tasks, ``dominant_share > share`` and the
        dominant |z| >= ``min_z``.
    """
    finite = {t: float(z) for t, z in z_by_task.items() if is_finite_number(z)}
    if not finite:
        return {"combined_z": math.nan, "dominant_task": None, "dominant_share": math.nan, "single_task_verdict": False}
    total = sum(finite.values())
    combined = total / math.sqrt(len(finite))
    dominant = max(finite, key=lambda t: abs(finite[t]))
    top = abs(finite[dominant])
    ratio = top / abs(total) if total != 0 else (math.inf if top > 0 else math.nan)
    flag = len(finite) >= 2 and top >= min_z and ratio > share
    return {"combined_z": combined, "dominant_task": dominant, "dominant_share": ratio, "single_task_verdict": bool(flag)}


def fit_repeat_curve(visits: Sequence[int], deltas: Sequence[float]) -> dict[str, Any]:
    """Least-squares fit of ``Perf(n) - Perf(1) = a (n-1) - b (n-1)^2`` (n = visits; ``Perf(1)`` = base).

    Points with n = 1 (delta 0 by definition) may be included; they do not move the fit. ``a`` and ``b``
    need two distinct n > 1; with one, only ``a`` is fitted (``b`` = 0, ``underdetermined``).

    Returns:
        ``a``, ``b``, ``n_peak`` (``1 + a / (2 b)`` for ``b > 0``, the visits at the fitted maximum),
        ``perf_peak`` (fitted delta there), ``residual_rms``, ``points``, ``underdetermined``.
    """
    pairs = [(int(n), float(d)) for n, d in zip(visits, deltas) if is_finite_number(d)]
    x = np.array([n - 1 for n, _ in pairs], dtype=float)
    y = np.array([d for _, d in pairs], dtype=float)
    distinct = {v for v in x.tolist() if v > 0}
    out: dict[str, Any] = {"points": [[n, d] for n, d in pairs], "underdetermined": len(distinct) < 2}
    if not distinct:
        return {**out, "a": math.nan, "b": math.nan, "n_peak": math.nan, "perf_peak": math.nan, "residual_rms": math.nan}
    if len(distinct) < 2:
        design = x[:, None]
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        a, b = float(coef[0]), 0.0
    else:
        design = np.stack([x, -(x**2)], axis=1)
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        a, b = float(coef[0]), float(coef[1])
    fitted = a * x - b * x**2
    n_peak = 1.0 + a / (2.0 * b) if b > 0 else math.nan
    perf_peak = a * (n_peak - 1) - b * (n_peak - 1) ** 2 if b > 0 else math.nan
    return {
        **out,
        "a": a,
        "b": b,
        "n_peak": n_peak,
        "perf_peak": perf_peak,
        "residual_rms": float(np.sqrt(np.mean((y - fitted) ** 2))) if y.size else math.nan,
    }


def _task_slug(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", task)


# --------------------------------------------------------------------------- lm-eval glue


def _evaluate_once(model: Any, tokenizer: Any, manager: Any, names: Sequence[str], **kwargs: Any) -> dict[str, Any]:
    """One lm-eval run of the model as it is now (tests count or interrupt calls here)."""
    return _ev._run_lm_eval(model, tokenizer, manager, names, **kwargs)


def _resolve(tasks: Sequence[str], include_path: Any) -> tuple[Any, list[str]]:
    """Task manager and validated names; lm-eval's registry is indexed only when a name is not local
    (the same fallback as ``rys_forge.evaluate.evaluate``)."""
    manager = task_manager(include_path, include_defaults=False)
    try:
        return manager, resolve_tasks(tasks, manager)
    except TaskError:
        requested = [part.strip() for item in tasks for part in str(item).split(",") if part.strip()]
        if all(name in set(manager.all_tasks) for name in requested):
            raise
        manager = task_manager(include_path, include_defaults=True)
        return manager, resolve_tasks(tasks, manager)


def _reported_tasks(rows: Sequence[dict[str, Any]], groups: dict[str, Any] | None = None) -> list[str]:
    """The tasks a sweep scores: every top-level task, and for a top-level group its direct members
    (``rys_suite`` -> its six tasks; ``mmlu`` -> its four category groups, scored by their aggregates), so
    the per-task z-scores and the single-task flag see the benchmarks one by one."""
    groups = groups or {}
    seen: list[str] = []
    for row in rows:
        if row.get("in_group") or row["task"] in seen:
            continue
        members = [m for m in groups.get(row["task"]) or [] if any(r["task"] == m for r in rows)]
        for name in members or [row["task"]]:
            if name not in seen:
                seen.append(name)
    return seen


def _kept(rows: Sequence[dict[str, Any]], paired: dict[str, Any], tasks: Sequence[str]):
    """``(task, row, entry)`` for each task with a kept metric: its comparison row and its paired items."""
    for task in tasks:
        row = pick_metric(rows, task)
        if row is not None:
            yield task, row, (paired.get(task) or {}).get(row["filter"]) or {}


def _base_summary(rows: Sequence[dict[str, Any]], paired: dict[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """Per task with a kept metric: its base value, stderr and per-item results (from the base run's
    self-comparison ``rows, paired``)."""
    out: dict[str, Any] = {}
    for task, row, entry in _kept(rows, paired, tasks):
        out[task] = {
            "metric": row["metric"],
            "filter": row["filter"],
            "value": row["base"],
            "stderr": row["base_stderr"],
            "n": row.get("n"),
            "higher_is_better": row.get("higher_is_better"),
            "doc_ids": entry.get("doc_ids"),
            "items": (entry.get(row["metric"]) or {}).get("base"),
        }
    return out


def _window_record(
    window: Window, repeats: int, base_run: dict[str, Any], rys_run: dict[str, Any], tasks: Sequence[str],
    seed: int, seconds: float,
) -> dict[str, Any]:
    rows, paired, notes = _ev._compare(base_run, rys_run, n_resamples=2000, seed=seed)
    per_task: dict[str, Any] = {}
    for task, row, entry in _kept(rows, paired, tasks):
        items = (entry.get(row["metric"]) or {}).get("rys")
        n = row.get("n") or (len(items) if items else None)
        per_task[task] = {
            "metric": row["metric"],
            "filter": row["filter"],
            "base": row["base"],
            "rys": row["rys"],
            "delta": row["delta"],
            "base_stderr": row["base_stderr"],
            "rys_stderr": row["rys_stderr"],
            "test": row.get("test"),
            "p_value": row.get("p_value"),
            "n": n,
            "b": row.get("b"),
            "c": row.get("c"),
            "higher_is_better": row.get("higher_is_better"),
            # z is oriented so that positive = better (a lower-is-better metric's delta is negated)
            "z": (-1.0 if row.get("higher_is_better") is False else 1.0)
            * task_z(row["delta"], row["base_stderr"], row["rys_stderr"], n),
            "items": items,
        }
    combined = combine_z({t: v["z"] for t, v in per_task.items()})
    deltas = [v["delta"] for v in per_task.values() if is_finite_number(v["delta"])]
    record: dict[str, Any] = {
        "window": str(window),
        "i": window.start,
        "j": window.end,
        "width": window.width,
        "repeats": repeats,
        "key": f"{window}x{repeats}",
        "tasks": per_task,
        **combined,
        "mean_delta": float(np.mean(deltas)) if deltas else math.nan,
        "seconds": seconds,
    }
    if notes:
        record["notes"] = notes
    for task, values in per_task.items():
        for name, key in (("delta", "delta"), ("z", "z"), ("p", "p_value"), ("rys", "rys")):
            record[f"{name}:{task}"] = values[key]
    return record


class _SweepFolder(RunFolder):
    """rank's RunFolder with the log in ``sweep.jsonl`` and records keyed by (window, repeats), a later
    record replacing an earlier one."""

    stem, key, merge = "sweep", "key", False


def _parse_repeats(repeats: Any) -> list[int]:
    if isinstance(repeats, str):
        parts = [p.strip() for p in repeats.split(",") if p.strip()]
    elif isinstance(repeats, int):
        parts = [repeats]
    else:
        parts = list(repeats)
    try:
        values = sorted({int(p) for p in parts})
    except (TypeError, ValueError):
        raise UsageError(f"--repeats takes visit counts such as 2 or 2,3,4, got {repeats!r}") from None
    if not values or values[0] < 2:
        raise UsageError(f"--repeats values must be >= 2 (visits of the block; 2 = RYS), got {repeats!r}")
    return values


# --------------------------------------------------------------------------- entry point


def sweep_windows(
    model: Any,
    tokenizer: Any,
    *,
    tasks: Sequence[str] | str,
    windows: Sequence[str] | None = None,
    min_width: int = 2,
    max_width: int | None = None,
    repeats: Sequence[int] | int | str = (2,),
    limit: int | None = None,
    num_fewshot: int | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    seed: int = 0,
    batch_size: int | str = 1,
    include_path: Any = None,
    bootstrap_iters: int = 1000,
    model_info: dict[str, Any] | None = None,
    engine: str = "auto",
    batch_tokens: int = 16384,
) -> SweepResult:
    """Evaluate the base once, then every window's in-memory repeat, on lm-eval tasks.

    Args:
        model: a loaded ``*ForCausalLM`` (no plan applied); nothing is loaded here.
        tokenizer: its tokenizer.
        tasks: lm-eval task / group / tag names (the offline ``rys_*`` tasks or lm-eval's registry).
        windows: explicit windows ``i:j``; None: every window with ``min_width <= j-i <= max_width``.
        repeats: visit counts of the block (2 = RYS); several (``2,3,4``) give per-window repeat curves.
        limit: items per task (None: all); the same items for every run.
        num_fewshot: few-shot examples (None: each task's default).
        out_dir: run folder; None keeps everything in memory.
        resume: continue an interrupted sweep in ``out_dir`` (the settings must match; the base is reused).
        progress: progress bar and stage messages on stderr.
        seed: lm-eval's seeds (as in ``rys-forge eval``) and the paired bootstrap's.
        batch_size: lm-eval batch size.
        include_path: extra folder(s) of lm-eval task YAMLs.
        bootstrap_iters: lm-eval's stderr bootstrap iterations (non-mean metrics).
        model_info: provenance (``source``, ``path``, ...) stored in the summary and the fingerprint.
        engine: ``cached`` (one base pass, each window replayed from the cached stream at its end; see
            :mod:`rys_forge.sweep_engine`), ``lm-eval`` (one full lm-eval run per window, any task type),
            or ``auto`` (``cached`` when every task is a loglikelihood task).
        batch_tokens: padded tokens per forward batch of the cached engine.

    Returns:
        A :class:`SweepResult` (also written to ``out_dir``).

    Raises:
        UsageError / WindowError / TaskError: bad arguments, windows, tasks, or a resume with other settings.
        EvaluationError: lm-eval failed.
    """
    started = time.perf_counter()
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    repeat_list = _parse_repeats(repeats)
    if limit is not None and not _ev._is_count(limit, 1):
        raise UsageError(f"--limit must be a positive integer (items per task), got {limit!r}")
    if num_fewshot is not None and not _ev._is_count(num_fewshot, 0):
        raise UsageError(f"--num-fewshot must be a non-negative integer, got {num_fewshot!r}")
    batch_size = _ev._check_batch_size(batch_size)
    num_layers = _ev._num_layers(model)
    chosen = select_windows(num_layers, windows, min_width, max_width)
    if engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if not _ev._is_count(batch_tokens, 1):
        raise UsageError(f"--batch-tokens must be a positive integer, got {batch_tokens!r}")
    manager, names = _resolve(tasks, include_path)
    task_objects = None
    if engine != "lm-eval":
        from rys_forge.research.sweep_engine import check_cached_tasks, uncached_tasks

        with _ev._lm_eval_environment(False):
            task_objects = _ev._load_task_objects(manager, names)
        if engine == "cached":
            check_cached_tasks(task_objects)
        elif uncached_tasks(task_objects):  # auto: a generation task needs one lm-eval run per window
            engine, task_objects = "lm-eval", None
        else:
            engine = "cached"
    info = dict(model_info or {})
    source = info.get("source") or info.get("path") or type(model).__name__
    fingerprint = {
        "format": SWEEP_FORMAT,
        "model": str(source),
        "adapter": info.get("adapter"),  # a resume with another adapter is refused
        "num_layers": num_layers,
        "tasks": list(names),
        "limit": limit,
        "num_fewshot": num_fewshot,
        "seed": seed,
        "batch_size": str(batch_size),
        "bootstrap_iters": bootstrap_iters,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "windows": [str(w) for w in chosen],
        "repeats": repeat_list,
        "lm_eval": _ev._lm_eval_version(),
        "engine": engine,
    }
    shard = current_shard()
    folder = _SweepFolder.open(out_dir, fingerprint, resume, shard)
    done = folder.finished() if folder else {}
    run_kwargs = dict(
        limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, seed=seed, bootstrap_iters=bootstrap_iters,
        progress=False,
    )

    base_run: dict[str, Any] | None = None
    base_file = folder.path / BASE_FILE if folder else None
    base_seconds = 0.0
    if base_file is not None and base_file.exists():
        try:
            base_run = json.loads(base_file.read_text())["run"]
        except (OSError, ValueError, KeyError, TypeError):
            base_run = None
    base_reused = base_run is not None
    plan_items = [(w, r) for r in repeat_list for w in chosen]
    todo_all = [(w, r) for w, r in plan_items if f"{w}x{r}" not in done]
    todo = shard.take(todo_all)  # under torchrun: this process's share
    lm = None
    if engine == "cached" and (todo or base_run is None):
        from rys_forge.research.sweep_engine import capturing_lm

        lm = capturing_lm(model, tokenizer, batch_tokens=batch_tokens)
        _ev._say(progress, f"base pass and activation cache over {', '.join(names)}")
        t0 = time.perf_counter()
        fresh = _evaluate_once(model, tokenizer, manager, names, lm=lm, task_objects=task_objects, **run_kwargs)
        base_seconds = time.perf_counter() - t0
        base_run = base_run or fresh
    if base_run is None:
        _ev._say(progress, f"evaluating the base model on {', '.join(names)}")
        t0 = time.perf_counter()
        base_run = _evaluate_once(model, tokenizer, manager, names, **run_kwargs)
        base_seconds = time.perf_counter() - t0
    if not base_reused and base_file is not None and shard.rank == 0:
        write_atomic(base_file, json.dumps(json_safe({"run": base_run, "seconds": base_seconds})))
    base_rows, base_paired, _ = _ev._compare(base_run, base_run, n_resamples=1, seed=0)
    base = _base_summary(base_rows, base_paired, _reported_tasks(base_rows, base_run.get("groups")))
    reported = list(base)
    if not reported:
        raise _ev.EvaluationError(f"lm-eval produced no usable metric for {', '.join(names)}")

    sweep_started = time.perf_counter()
    with progress_bar(progress, len(plan_items), len(plan_items) - len(todo), "evaluating windows") as advance:
        if lm is not None:
            _cached_windows(lm, task_objects, todo, base_run, base, reported, limit, seed, folder, done, advance)
            todo_lm_eval: list[tuple[Window, int]] = []
        else:
            todo_lm_eval = todo
        for window, n_visits in todo_lm_eval:
            plan = LayerPlan.from_windows([window], num_layers, n_visits)
            t0 = time.perf_counter()
            with repeated(model, plan):
                rys_run = _evaluate_once(model, tokenizer, manager, names, **run_kwargs)
            seconds = time.perf_counter() - t0
            record = _window_record(window, n_visits, base_run, rys_run, reported, seed, seconds)
            done[record["key"]] = record
            if folder:
                folder.append(record)
            advance()
    sweep_seconds = time.perf_counter() - sweep_started
    if shard.parallel:
        shard.barrier()
        done = folder.finished()  # type: ignore[union-attr]
        if shard.rank != 0:  # rank 0 writes the merged outputs
            rows = [_restore(done[f"{w}x{r}"]) for w, r in plan_items]
            return SweepResult(rows=rows, base={}, summary={"shard": {"rank": shard.rank, "world": shard.world}},
                               out_dir=Path(out_dir) if out_dir else None)

    rows = [_restore(done[f"{w}x{r}"]) for w, r in plan_items]
    fits = repeat_fits(rows, reported) if len(repeat_list) > 1 else {}
    per_window = [r["seconds"] for r in rows if is_finite_number(r.get("seconds"))]
    summary = {
        "rys_forge_sweep": SWEEP_FORMAT,
        "model": info,
        "architecture": {"model_type": getattr(getattr(model, "config", None), "model_type", None), "num_layers": num_layers},
        "convention": WINDOW_CONVENTION.replace("L", str(num_layers)),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {**fingerprint, "tasks_requested": tasks, "min_width": min_width, "max_width": max_width,
                     "include_path": None if include_path is None else str(include_path)},
        "tasks": reported,
        "metrics": {t: base[t]["metric"] + ("" if base[t]["filter"] in ("none", None) else f",{base[t]['filter']}") for t in base},
        "metric_rule": "acc_norm where the task has it, else acc, else the task's first metric",
        "base": {t: {k: v for k, v in b.items() if k not in ("items", "doc_ids")} for t, b in base.items()},
        "definitions": {
            "delta": "rys - base of the task's metric",
            "p": "paired test on per-item results (exact McNemar for 0/1 items, else paired bootstrap)",
            "z": "delta / sqrt(se_base^2 + se_rys^2) (lm-eval stderrs; floored at 1/(2n) when both are 0);"
            " negated for lower-is-better metrics, so positive z = better",
            "combined_z": "Stouffer: sum of per-task z / sqrt(#tasks)",
            "single_task_verdict": f"one task's |z| > {SINGLE_TASK_SHARE:.0%} of |sum z| and >= {SINGLE_TASK_MIN_Z}"
            " (with >= 2 tasks): the gain rests on one task (calibration shift?)",
            "repeats_fit": "Perf(n) = Perf(1) + a(n-1) - b(n-1)^2, n = visits, Perf(1) = base; least squares",
        },
        "windows": len({r["window"] for r in rows}),
        "rows": len(rows),
        "best": _brief(max((r for r in rows if is_finite_number(r.get("combined_z"))), key=lambda r: r["combined_z"], default=None)),
        "single_task_flags": sum(bool(r.get("single_task_verdict")) for r in rows),
        "repeats_fits": fits,
        "timings": {
            "base_eval_s": base_seconds,
            "base_reused": base_reused,
            "windows_s": sweep_seconds,
            "windows_evaluated_this_session": len(todo_all),
            "processes": shard.world,
            "per_window_s": {r["key"]: r.get("seconds") for r in rows},
            "mean_per_window_s": float(np.mean(per_window)) if per_window else math.nan,
            "total_s": time.perf_counter() - started,
        },
        "versions": {"lm_eval": _ev._lm_eval_version(), "rys_forge": _ev._rys_forge_version()},
    }
    result = SweepResult(rows=rows, base=base, summary=summary, out_dir=Path(out_dir) if out_dir else None, fits=fits)
    if folder:
        write_outputs(result, num_layers)
    return result


def _trim_run(run: dict[str, Any], keep: dict[str, str]) -> dict[str, Any]:
    """``run`` reduced to the kept ``"metric,filter"`` of each task (what a cached-engine window run holds)."""
    out: dict[str, Any] = {"results": {}, "groups": {}, "metric_info": {}, "items": {}}
    for task, key in keep.items():
        metric, filt = key.split(",", 1)
        stderr_key = f"{metric}_stderr,{filt}"
        out["results"][task] = {k: v for k, v in run["results"][task].items() if k in (key, stderr_key)}
        out["metric_info"][task] = (run.get("metric_info") or {}).get(task) or {}
        items = (run["items"].get(task) or {}).get(filt) or {}
        out["items"][task] = {filt: {d: {**rec, "values": {metric: rec["values"].get(metric)}} for d, rec in items.items()}}
    return out


def _cached_windows(
    lm: Any, task_objects: Any, todo: Sequence[tuple[Window, int]], base_run: dict[str, Any], base: dict[str, Any],
    reported: Sequence[str], limit: int | None, seed: int, folder: _SweepFolder | None, done: dict[str, Any],
    advance: Any,
) -> None:
    """Every (window, visits) in ``todo`` through the cached engine, scored with lm-eval's task code."""
    from rys_forge.research.sweep_engine import WindowScorer, leaf_tasks

    if not todo:  # nothing left to score (a resumed or empty share): just free the cache
        lm.engine.release()
        return
    keep = {t: f"{base[t]['metric']},{base[t]['filter']}" for t in reported}
    trimmed = _trim_run(base_run, keep)
    scorer = WindowScorer(leaf_tasks(task_objects), lm.instances, limit, keep, base_run["items"])
    clock = [time.perf_counter()]

    def finish(index: int, run: Any) -> None:
        window, n_visits = todo[index]
        rys_run = scorer(run)
        now = time.perf_counter()
        record = _window_record(window, n_visits, trimmed, rys_run, reported, seed, now - clock[0])
        clock[0] = now
        done[record["key"]] = record
        if folder:
            folder.append(record)
        advance()

    try:
        lm.engine.run([(w.start, w.end, n) for w, n in todo], on_done=finish)
    finally:
        lm.engine.release()


def _restore(record: dict[str, Any]) -> dict[str, Any]:
    """A logged record with JSON nulls of float fields back to NaN (in-memory rows use NaN)."""
    row = dict(record)
    for key in ("combined_z", "mean_delta", "dominant_share", "seconds"):
        if row.get(key) is None:
            row[key] = math.nan
    return row


def _brief(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    keys = ("window", "repeats", "combined_z", "mean_delta", "single_task_verdict", "dominant_task")
    return {**{k: row.get(k) for k in keys}, "delta": {t: v["delta"] for t, v in row["tasks"].items()}}


def repeat_fits(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """Per window: the repeats fit of each task's delta and of the mean delta against visits."""
    by_window: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_window.setdefault(row["window"], []).append(row)
    fits: dict[str, Any] = {}
    for window, group in by_window.items():
        group = sorted(group, key=lambda r: r["repeats"])
        visits = [1] + [r["repeats"] for r in group]
        entry = {"mean_delta": fit_repeat_curve(visits, [0.0] + [r.get("mean_delta") for r in group])}
        for task in tasks:
            entry[task] = fit_repeat_curve(visits, [0.0] + [(r["tasks"].get(task) or {}).get("delta") for r in group])
        fits[window] = entry
    return fits


def read_sweep(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and summary of a sweep folder: ``sweep.json`` when the sweep finished, else the rows of
    ``sweep.jsonl`` (an interrupted sweep) and an empty summary."""
    folder = Path(path)
    table = folder / "sweep.json"
    summary_file = folder / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    if table.exists():
        rows = json.loads(table.read_text())["rows"]
    elif any(folder.glob("sweep*.jsonl")):
        rows = list(_SweepFolder.records(folder).values())
    else:
        raise UsageError(f"{folder} is not a sweep run folder (no sweep.json or {SWEEP_LOG})")
    return [_restore(r) for r in rows], summary


# --------------------------------------------------------------------------- outputs


def write_outputs(result: SweepResult, num_layers: int) -> None:
    """Table (JSON, CSV), summary and figures into the run folder, each written atomically."""
    out = result.out_dir
    assert out is not None
    tasks = list(result.summary["tasks"])
    write_atomic(out / "sweep.json", json.dumps(json_safe({"rows": result.rows}), indent=1))
    columns = ["window", "i", "j", "width", "repeats", "combined_z", "mean_delta", "single_task_verdict",
               "dominant_task", "dominant_share", "seconds"]
    for task in tasks:
        columns += [f"rys:{task}", f"delta:{task}", f"z:{task}", f"p:{task}"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in result.rows:
        writer.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in row.items()})
    write_atomic(out / "sweep.csv", buffer.getvalue())
    write_atomic(out / "summary.json", json.dumps(json_safe(result.summary), indent=2))
    _plots(result, num_layers, tasks)


def _plots(result: SweepResult, num_layers: int, tasks: Sequence[str]) -> None:
    from rys_forge import plots

    out = result.out_dir
    assert out is not None
    name = (result.summary.get("model") or {}).get("source", "")
    repeat_values = sorted({r["repeats"] for r in result.rows})
    for n_visits in repeat_values:
        rows = [r for r in result.rows if r["repeats"] == n_visits]
        suffix = "" if n_visits == 2 else f"_x{n_visits}"
        for task in tasks:
            metric = result.summary["metrics"].get(task, "")
            plots.window_heatmap(
                rows, f"delta:{task}", num_layers, out / f"heatmap_delta_{_task_slug(task)}{suffix}.png",
                f"{name}: {task} {metric} delta (rys - base), x{n_visits}", centre=0.0,
            )
        flagged = [r["window"] for r in rows if r.get("single_task_verdict")]
        plots.window_heatmap(
            rows, "combined_z", num_layers, out / f"heatmap_combined_z{suffix}.png",
            f"{name}: combined z (Stouffer over {len(tasks)} tasks), x{n_visits}; o = single-task",
            centre=0.0, highlight=flagged,
        )
    if len(repeat_values) > 1:
        repeats_plot(result, out / "repeats_fit.png", tasks)


def repeats_plot(result: SweepResult, path: Path, tasks: Sequence[str]) -> None:
    """Delta against visits, one line per window (dots: measured; line: the fit), per task and mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rys_forge.plots import save_figure

    panels = ["mean_delta", *tasks]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for window, fit in result.fits.items():
            entry = fit.get(panel) or {}
            points = entry.get("points") or []
            if not points:
                continue
            n = np.array([p[0] for p in points], dtype=float)
            d = np.array([p[1] for p in points], dtype=float)
            line = ax.plot(n, d, marker="o", linestyle="none", label=window)[0]
            if is_finite_number(entry.get("a")):
                fine = np.linspace(1, n.max(), 50)
                ax.plot(fine, entry["a"] * (fine - 1) - entry["b"] * (fine - 1) ** 2, color=line.get_color())
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set(xlabel="visits of the block n", ylabel="delta vs base", title=panel)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Perf(n) - Perf(1) = a(n-1) - b(n-1)^2", fontsize=10)
    save_figure(fig, path)
