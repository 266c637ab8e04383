"""Sweep racing: evaluate windows on growing item subsets and stop the clearly harmful ones early.

The race is a fixed schedule of ``looks`` (default 4). At look ``k`` every window still running has been
evaluated on the first ``n_k = ceil(N * g^(k - looks))`` items of each task (``N`` = the task's items; ``g`` the
growth between looks, ``--race-growth``, default 2; the items are taken in a seeded random order fixed in
advance, the same for every window), so the last look is the whole set. A smaller growth with more looks (e.g.
11 looks at ``g = 1.41``: about the first look of 6 at 2) stops a window nearer the item count at which its
bounds decide it, for a slightly larger critical ``z`` (Bonferroni over more looks). A window's statistic is the
**mean paired difference** against the base on the same items, averaged over the tasks with equal weight:

    d = (1/T) sum_t mean_i (rys_ti - base_ti),   se = sqrt(sum_t s_t^2 / n_t) / T

where ``s_t^2`` is the variance of task ``t``'s differences with one ``+1`` and one ``-1`` pseudo-difference
added (so that a handful of equal differences cannot give a zero-width interval). Intervals are
``d +- z se`` with ``z = Phi^-1(1 - alpha / looks)``: a Bonferroni split of ``alpha`` over the looks fixed in
advance, so that "positive" (the lower bound above 0 at any look) has one-sided level ``alpha`` per window
however many looks are taken (tested by simulation in ``tests/test_race.py``). After each look a window is

* **dropped** when it is confidently worse than the base (its upper bound below 0) *and* than the running
  window with the best estimate (the upper bound of their paired per-item gap, ``rys_w - rys_best`` on the same
  items, below 0). Drops use their own one-sided confidence (``drop_confidence``, default 0.9, no multiplicity
  correction): a wrong drop can lose a window, never make a false positive call, whose level rests on the
  Bonferroni bounds alone;
* with an indifference margin ``m > 0`` (``--race-margin``), dropped as soon as neither its gain over the base nor
  its lead over the best can reach ``m`` (both upper bounds below ``m``). A window then ends the race only while
  it may still gain at least ``m``: the race finds every window whose gain is clearly above ``m`` and a best window
  within about ``m`` of the exhaustive best, at a lower cost; a positive window whose gain is below ``m`` may be
  dropped (its positive call, if made before, stands). ``m = 0`` (the default) is the rule above;
* kept otherwise; windows that reach the last look are ``completed`` (their full sweep row is written).

A ``budget`` in item-evaluations (one window on one item of one task = 1) or seconds ends the race early;
windows not yet decided then carry the interval they have (reason ``budget``), never a full-sweep score.
Only tasks whose kept metric is a per-item mean (``acc``, ``acc_norm``, ...) can be raced.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from rys_forge.errors import UsageError
from rys_forge.evaluate import is_count
from rys_forge.plan import Window
from rys_forge.research.sweep_rows import trim_run, window_record
from rys_forge.runs import RunFolder
from rys_forge.stats import mean_stderr

__all__ = [
    "RACE_REASONS", "RaceLog", "RaceSettings", "WindowTally", "check_raceable", "critical_z", "decide", "look_sizes",
    "paired_gap", "race_cached_windows", "race_record", "run_race",
]

#: Why a window stopped: dropped (confidently worse than the base and the best), completed (every item),
#: budget (the race's budget ran out first).
RACE_REASONS = ("dropped", "completed", "budget")


@dataclass(frozen=True)
class RaceSettings:
    """The race's level, looks and budget (``budget_items``: item-evaluations; ``budget_seconds``)."""

    alpha: float = 0.05
    looks: int = 4
    budget_items: int | None = None
    budget_seconds: float | None = None
    drop_confidence: float = 0.9
    margin: float = 0.0
    growth: float = 2.0

    def __post_init__(self) -> None:
        if not (isinstance(self.growth, float) and 1.0 < self.growth <= 4.0):
            raise UsageError(f"--race-growth must be in (1, 4] (items grow by this factor from look to look), got"
                             f" {self.growth!r}")
        if not (isinstance(self.margin, float) and 0.0 <= self.margin < 0.5):
            raise UsageError(f"--race-margin must be in [0, 0.5) (a mean paired difference, e.g. 0.005 for half a"
                             f" point), got {self.margin!r}")
        if not (isinstance(self.alpha, float) and 0.0 < self.alpha < 0.5):
            raise UsageError(f"--race-alpha must be in (0, 0.5), got {self.alpha!r}")
        if not (isinstance(self.drop_confidence, float) and 0.5 <= self.drop_confidence < 1.0):
            raise UsageError(f"--drop-confidence must be in [0.5, 1), got {self.drop_confidence!r}")
        if not is_count(self.looks, 1) or self.looks > 12:
            raise UsageError(f"--race-looks must be an integer in 1..12, got {self.looks!r}")
        if self.budget_items is not None and not is_count(self.budget_items, 1):
            raise UsageError(f"--budget must be a positive number of item-evaluations, got {self.budget_items!r}")
        if self.budget_seconds is not None and not (math.isfinite(self.budget_seconds) and self.budget_seconds > 0):
            raise UsageError(f"--budget must be a positive number of seconds, got {self.budget_seconds!r}")

    @classmethod
    def from_options(cls, race: bool, budget: str | None, alpha: float, looks: int, drop_confidence: float = 0.9,
                     margin: float = 0.0, growth: float = 2.0) -> "RaceSettings | None":
        """The CLI's --race, --budget, --race-alpha, --race-looks, --drop-confidence, --race-margin, --race-growth
        (None without --race; the others need it)."""
        if not race:
            if (budget is not None or alpha != 0.05 or looks != 4 or drop_confidence != 0.9 or margin != 0
                    or growth != 2):
                raise UsageError("--budget, --race-alpha, --race-looks, --drop-confidence, --race-margin and"
                                 " --race-growth need --race")
            return None
        items, seconds = cls.parse_budget(budget)
        return cls(alpha=float(alpha), looks=looks, budget_items=items, budget_seconds=seconds,
                   drop_confidence=float(drop_confidence), margin=float(margin), growth=float(growth))

    @classmethod
    def parse_budget(cls, text: str | None) -> tuple[int | None, float | None]:
        """``"20000"`` -> item-evaluations; ``"600s"`` -> seconds; None -> no budget."""
        if text is None:
            return None, None
        value = text.strip().lower()
        try:
            if value.endswith("s"):
                return None, float(value[:-1])
            return int(value), None
        except ValueError:
            raise UsageError(f"--budget must be item-evaluations (e.g. 20000) or seconds (e.g. 600s), got {text!r}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "looks": self.looks, "budget_items": self.budget_items,
                "budget_seconds": self.budget_seconds, "critical_z": critical_z(self.alpha, self.looks),
                "drop_confidence": self.drop_confidence, "drop_z": self.drop_z,
                **({"margin": self.margin} if self.margin else {}),  # runs from before the margin still resume
                **({"growth": self.growth} if self.growth != 2.0 else {})}

    @property
    def drop_z(self) -> float:
        """One-sided normal quantile of the drop decisions."""
        return NormalDist().inv_cdf(self.drop_confidence)


def critical_z(alpha: float, looks: int) -> float:
    """One-sided normal quantile of the Bonferroni split of ``alpha`` over ``looks``."""
    return NormalDist().inv_cdf(1.0 - alpha / looks)


def look_sizes(n_items: int, looks: int, growth: float = 2.0) -> list[int]:
    """Items evaluated by look ``1..looks``: ``ceil(n * growth^(k - looks))``, at least 1, ending at ``n``."""
    if n_items < 1:
        return [0] * looks
    sizes = [max(1, math.ceil(n_items * growth ** (k - looks))) for k in range(1, looks + 1)]
    return [min(s, n_items) for s in sizes]


@dataclass
class WindowTally:
    """One window's paired differences so far, per task (in the race's item order)."""

    diffs: dict[str, list[float]] = field(default_factory=dict)

    def add(self, task: str, values: Sequence[float]) -> None:
        self.diffs.setdefault(task, []).extend(float(v) for v in values)

    @property
    def items(self) -> int:
        return sum(len(v) for v in self.diffs.values())

    def estimate(self) -> tuple[float, float]:
        """``(d, se)`` as in the module docstring; ``(nan, inf)`` before any item."""
        tasks = [v for v in self.diffs.values() if v]
        if not tasks:
            return math.nan, math.inf
        means, variances = [], []
        for values in tasks:
            padded = np.asarray([*values, 1.0, -1.0], dtype=float)
            means.append(float(np.mean(values)))
            variances.append(float(np.var(padded, ddof=1)) / len(values))
        return float(np.mean(means)), math.sqrt(sum(variances)) / len(tasks)

    def interval(self, z: float) -> tuple[float, float, float]:
        d, se = self.estimate()
        return d, d - z * se, d + z * se


def paired_gap(a: WindowTally, b: WindowTally) -> WindowTally:
    """The per-item differences between two windows on the items both have seen (``rys_a - rys_b``: the base
    cancels, so this is a paired comparison of the two windows)."""
    gap = WindowTally()
    for task, values in a.diffs.items():
        n = min(len(values), len(b.diffs.get(task, ())))
        if n:
            gap.add(task, np.asarray(values[:n]) - np.asarray(b.diffs[task][:n]))
    return gap


def decide(tallies: dict[str, WindowTally], running: Sequence[str], z: float, margin: float = 0.0) -> dict[str, str]:
    """After a look: ``{window: "dropped"}`` for each running window confidently worse than the base (its
    upper bound below ``margin``, default 0) and than the running window with the best estimate (the upper bound
    of their paired per-item gap below ``margin``)."""
    live = [w for w in running if w in tallies and tallies[w].items]
    if not live:
        return {}
    best = max(live, key=lambda w: tallies[w].estimate()[0])
    dropped = {}
    for w in live:
        if w != best and tallies[w].interval(z)[2] < margin and paired_gap(tallies[w], tallies[best]).interval(z)[2] < margin:
            dropped[w] = "dropped"
    return dropped


def run_race(tallies: dict[str, WindowTally], running: Sequence[str], looks: int, z: float,
             evaluate: Callable[[int, list[str]], bool], emit: Callable[[str, str, int], None],
             positive: set[str], drop_z: float | None = None, margin: float = 0.0) -> None:
    """The schedule. At look ``k`` (0-based) ``evaluate(k, keys)`` adds that look's differences of the running
    windows to their ``tallies`` (False: the budget ran out; the running windows stop with reason ``budget``);
    a window whose lower bound (at ``z``) is above 0 joins ``positive``; then :func:`decide` drops windows at
    ``drop_z`` (default ``z``) and ``margin``. ``emit(key, reason, looks_done)`` is called once per window as it stops."""
    running = list(running)
    for k in range(looks):
        if not evaluate(k, running):
            for key in running:
                emit(key, "budget", k)
            return
        positive.update(key for key in running if tallies[key].interval(z)[1] > 0)
        if k + 1 < looks:
            for key in decide({key: t for key, t in tallies.items() if t.items}, running, z if drop_z is None else drop_z,
                              margin):
                emit(key, "dropped", k + 1)
                running.remove(key)
    for key in running:
        emit(key, "completed", looks)


def race_record(window: str, tally: WindowTally, z: float, reason: str, look: int, looks: int,
                task_items: dict[str, int]) -> dict[str, Any]:
    """The race fields of a window's row: items per task, the interval, where and why it stopped."""
    d, low, high = tally.interval(z)
    return {
        "race_reason": reason,
        "race_look": look,
        "race_looks": looks,
        "race_items": tally.items,
        "race_items_per_task": {t: len(v) for t, v in tally.diffs.items()},
        "race_items_full": sum(task_items.values()),
        "race_estimate": d,
        "race_lower": low,
        "race_upper": high,
        "race_positive": bool(low > 0),
        "race_mean_diff": {t: float(np.mean(v)) if v else math.nan for t, v in tally.diffs.items()},
    }


# --------------------------------------------------------------------------- the race on the cached engine


class RaceLog(RunFolder):
    """The race's per-look log (``race.jsonl``) beside the sweep's: one record per (window, look) with the
    per-document values of that look's new documents, so that ``--resume`` rebuilds every tally."""

    stem, key, merge = "race", "key", False


@dataclass
class _Look:
    """One look's new documents per task and the engine requests that score them."""

    docs: dict[str, list[str]]
    requests: list[int]


def _looks(base_run: dict[str, Any], keep: dict[str, str], instances: Sequence[Any], looks: int,
           seed: int, growth: float = 2.0) -> tuple[list[_Look], dict[str, int]]:
    """The fixed schedule: each task's documents in a seeded random order, cut at :func:`look_sizes`."""
    rng = np.random.default_rng(seed)
    order: dict[str, list[str]] = {}
    for task, key in keep.items():
        filt = key.split(",", 1)[1]
        doc_ids = sorted((base_run["items"].get(task) or {}).get(filt) or {}, key=lambda d: (len(d), d))
        order[task] = [doc_ids[k] for k in rng.permutation(len(doc_ids))]
    by_doc: dict[tuple[str, str], list[int]] = {}
    for index, inst in enumerate(instances):
        by_doc.setdefault((inst.task_name, str(inst.doc_id)), []).append(index)
    sizes = {task: look_sizes(len(ids), looks, growth) for task, ids in order.items()}
    schedule = []
    for k in range(looks):
        docs = {t: ids[(sizes[t][k - 1] if k else 0):sizes[t][k]] for t, ids in order.items()}
        requests = sorted(i for t, ids in docs.items() for d in ids for i in by_doc.get((t, d), []))
        schedule.append(_Look(docs, requests))
    return schedule, {t: len(ids) for t, ids in order.items()}


def _base_values(base_run: dict[str, Any], keep: dict[str, str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for task, key in keep.items():
        metric, filt = key.split(",", 1)
        items = (base_run["items"].get(task) or {}).get(filt) or {}
        out[task] = {d: float(rec["values"][metric]) for d, rec in items.items()}
    return out


def check_raceable(base_run: dict[str, Any], keep: dict[str, str]) -> None:
    """Racing needs per-item means: every kept metric's aggregate must equal the mean of its item values."""
    values = _base_values(base_run, keep)
    bad = []
    for task, key in keep.items():
        reported = base_run["results"][task].get(key)
        items = list(values[task].values())
        if not items or not isinstance(reported, (int, float)) or abs(float(np.mean(items)) - reported) > 1e-9:
            bad.append(f"{task} ({key.split(',')[0]})")
    if bad:
        raise UsageError(f"--race needs tasks scored by a per-item mean; not: {', '.join(bad)}")


def _full_run(values: dict[str, dict[str, float]], keep: dict[str, str], base_run: dict[str, Any]) -> dict[str, Any]:
    """A normalised run holding a completed window's per-document values (what ``window_record`` compares)."""
    results: dict[str, Any] = {}
    items: dict[str, Any] = {}
    for task, key in keep.items():
        metric, filt = key.split(",", 1)
        base_items = (base_run["items"].get(task) or {}).get(filt) or {}
        mean, stderr = mean_stderr(list(values[task].values()))
        results[task] = {key: mean, f"{metric}_stderr,{filt}": stderr}
        items[task] = {filt: {d: {"doc_hash": base_items.get(d, {}).get("doc_hash"),
                                  "prompt_hash": base_items.get(d, {}).get("prompt_hash"),
                                  "values": {metric: v}} for d, v in values[task].items()}}
    return {"results": results, "items": items}


@dataclass
class _Racer:
    """The state of one race: tallies, per-document values and the log, per window key ``<window>x<visits>``."""

    windows: dict[str, tuple[Window, int]]
    keep: dict[str, str]
    base_values: dict[str, dict[str, float]]
    z: float
    log: RaceLog | None
    logged: dict[tuple[str, int], dict[str, dict[str, float]]]
    tallies: dict[str, WindowTally] = field(default_factory=dict)
    values: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    positive: set[str] = field(default_factory=set)
    spent: int = 0
    scoring_s: float = 0.0
    looks: list[dict[str, Any]] = field(default_factory=list)  # what each look's engine did, and its seconds

    def add(self, key: str, look: int, docs: dict[str, list[str]], values: dict[str, dict[str, float]]) -> None:
        """One look's values of one window (from the engine or the log): tally the paired differences."""
        tally = self.tallies.setdefault(key, WindowTally())
        store = self.values.setdefault(key, {t: {} for t in self.keep})
        for task, ids in docs.items():
            tally.add(task, [values[task][d] - self.base_values[task][d] for d in ids])
            store[task].update({d: values[task][d] for d in ids})
            self.spent += len(ids)
        if self.log is not None and (key, look) not in self.logged:
            self.log.append({"key": f"{key}#{look}", "window_key": key, "look": look, "values": values})

    def row(self, key: str, reason: str, look: int, looks: int, task_items: dict[str, int], base_run: dict[str, Any],
            reported: Sequence[str], seed: int) -> dict[str, Any]:
        window, visits = self.windows[key]
        race = race_record(str(window), self.tallies.get(key, WindowTally()), self.z, reason, look, looks, task_items)
        race["race_positive"] = key in self.positive
        if reason == "completed":
            full = _full_run(self.values[key], self.keep, base_run)
            return {**window_record(window, visits, trim_run(base_run, self.keep), full, reported, seed,
                                    self.seconds.get(key, 0.0)), **race}
        return {"window": str(window), "i": window.start, "j": window.end, "width": window.width, "repeats": visits,
                "key": key, "tasks": {}, "combined_z": math.nan, "mean_delta": math.nan,
                "seconds": self.seconds.get(key, 0.0), **race}


def _logged_values(folder: Path | None) -> dict[tuple[str, int], dict[str, dict[str, float]]]:
    if folder is None or not folder.is_dir():
        return {}
    out = {}
    for record in RaceLog.records(folder).values():
        if isinstance(record.get("window_key"), str) and isinstance(record.get("look"), int):
            out[(record["window_key"], record["look"])] = record.get("values") or {}
    return out


def _score_look(lm: Any, task_objects: Sequence[Any], racer: _Racer, look: _Look, k: int, keys: list[str],
                limit: int | None, settings: RaceSettings, started: float) -> bool:
    """Evaluate ``keys`` on look ``k``'s documents (in chunks, checking the budget); False if it ran out."""
    from rys_forge.research.engine_batching import MAX_STACK
    from rys_forge.research.sweep_engine import LoglikelihoodEngine, leaf_tasks
    from rys_forge.research.window_scorer import WindowScorer

    if not keys:
        return True
    cost = sum(len(ids) for ids in look.docs.values())
    pad = lm.tokenizer.pad_token_id
    setup_started = time.perf_counter()
    engine = LoglikelihoodEngine(lm.model, [lm.request_tokens[i] for i in look.requests], max_length=lm.max_length,
                                 pad_id=pad if pad is not None else 0, stack=MAX_STACK, **lm.engine_kwargs)
    scorer = WindowScorer(leaf_tasks(task_objects), [lm.instances[i] for i in look.requests], limit, racer.keep,
                          {}, only_docs={t: set(ids) for t, ids in look.docs.items()})
    record = {"look": k, "windows": 0, "requests": len(look.requests), "batches": len(engine.batches),
              "tokens": engine.tokens, "padded_tokens": engine.padded_tokens, "padding": engine.padding,
              "setup_s": time.perf_counter() - setup_started, "engine_s": 0.0}
    try:
        position = 0
        while position < len(keys):
            affordable = len(keys) - position
            if settings.budget_items is not None:
                affordable = min(affordable, max(0, (settings.budget_items - racer.spent) // max(cost, 1)))
            if settings.budget_seconds is not None and time.perf_counter() - started > settings.budget_seconds:
                affordable = 0
            if affordable == 0:
                return False
            # with a time budget, chunks of 8 windows; else every affordable window in one call (stacked replays)
            chunk = keys[position:position + (min(affordable, 8) if settings.budget_seconds is not None else affordable)]

            def finish(index: int, run: Any, chunk: list[str] = chunk) -> None:
                scored = scorer(run)
                values = {}
                for task, key in racer.keep.items():
                    metric, filt = key.split(",", 1)
                    items = scored["items"][task][filt]
                    values[task] = {d: float(items[d]["values"][metric]) for d in look.docs[task]}
                racer.add(chunk[index], k, look.docs, values)
                racer.seconds[chunk[index]] = racer.seconds.get(chunk[index], 0.0) + run.seconds

            engine_started = time.perf_counter()
            engine.run([(racer.windows[key][0].start, racer.windows[key][0].end, racer.windows[key][1]) for key in chunk],
                       on_done=finish)
            record["engine_s"] += time.perf_counter() - engine_started
            record["windows"] += len(chunk)
            position += len(chunk)
        return True
    finally:
        racer.scoring_s += scorer.seconds
        racer.looks.append({**record, "scoring_s": scorer.seconds})
        engine.release()


def race_cached_windows(
    lm: Any, task_objects: Sequence[Any], todo: Sequence[tuple[Window, int]], base_run: dict[str, Any],
    base: dict[str, Any], reported: Sequence[str], *, limit: int | None, seed: int, settings: RaceSettings,
    folder: Path | None, on_record: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Race ``todo`` (in the order given) on the engine of ``lm`` (:func:`capturing_lm` after its base pass).

    Each window's final row goes to ``on_record`` when it stops (dropped, completed or budget); windows
    finished in an earlier session are not in ``todo`` but their logged looks still count for the best
    lower bound. Returns the race's totals (item-evaluations spent and the exhaustive equivalent, and the seconds
    of lm-eval scoring, ``scoring_s``) and ``looks``: per look of this session, its windows, requests, batches,
    real and padded tokens, and the seconds of building its engine (``setup_s``), of the engine's runs
    (``engine_s``, lm-eval's scoring included) and of that scoring (``scoring_s``).
    """
    lm.engine.release()
    keep = {t: f"{base[t]['metric']},{base[t]['filter']}" for t in reported}
    check_raceable(base_run, keep)
    schedule, task_items = _looks(base_run, keep, lm.instances, settings.looks, seed, settings.growth)
    logged = _logged_values(folder)
    windows = {f"{w}x{n}": (w, n) for w, n in todo}
    for key, _look in logged:
        if key not in windows:
            window = Window.parse(key.rsplit("x", 1)[0])
            windows[key] = (window, int(key.rsplit("x", 1)[1]))
    racer = _Racer(windows, keep, _base_values(base_run, keep), critical_z(settings.alpha, settings.looks),
                   RaceLog(folder) if folder is not None else None, logged)
    started = time.perf_counter()
    stopped: list[str] = []

    def evaluate(k: int, running: list[str]) -> bool:
        for key in windows:
            if (key, k) in logged:
                racer.add(key, k, schedule[k].docs, logged[(key, k)])
        fresh = [key for key in running if (key, k) not in logged]
        return _score_look(lm, task_objects, racer, schedule[k], k, fresh, limit, settings, started)

    def emit(key: str, reason: str, looks_done: int) -> None:
        stopped.append(reason)
        on_record(racer.row(key, reason, looks_done, settings.looks, task_items, base_run, reported, seed))

    run_race(racer.tallies, [f"{w}x{n}" for w, n in todo], settings.looks, racer.z, evaluate, emit, racer.positive,
             drop_z=settings.drop_z, margin=settings.margin)
    return {"spent_this_session": racer.spent - sum(len(v) for vals in logged.values() for v in vals.values()),
            "spent": racer.spent, "exhaustive": len(windows) * sum(task_items.values()),
            "stopped_by_budget": "budget" in stopped, "scoring_s": racer.scoring_s, "looks": racer.looks}
