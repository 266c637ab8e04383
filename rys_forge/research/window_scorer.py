"""Scoring of the cached engine's runs with lm-eval's own task code, per window (`sweep`, `sweep --race`).

A run (:class:`rys_forge.research.sweep_engine.WindowRun`: per-request log-likelihoods and greedy matches) is
turned into what ``simple_evaluate`` reports for the same loglikelihoods: lm-eval's filters, each task's
``process_results``, ``aggregation`` and ``stderr_for_metric``.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["WindowScorer"]


@dataclass
class _TaskPlan:
    """One kept task of a :class:`WindowScorer`: its requests, documents, kept metric and lm-eval's
    aggregation and stderr functions for it, and the base run's items (for the document hashes)."""

    task: Any
    pairs: list[tuple[Any, int]]
    docs: list[tuple[int, Any, list[Any]]]
    metric: str
    filt: str
    aggregate: Callable[[list[Any]], Any]
    stderr: Callable[[list[Any]], Any] | None
    base_items: dict[str, Any]


class WindowScorer:
    """Scores runs of the engine with lm-eval's task code (``apply_filters``, ``process_results``,
    ``aggregation``, ``stderr_for_metric``); the result is a normalised run (the shape
    :func:`rys_forge.evaluate.runner.normalise_results` makes) holding the kept metric of each task.

    The documents are read once and the tasks' per-document accessors (``doc_to_choice``,
    ``doc_to_target``, ``doc_to_text``, jinja templates compiled on every call) are memoised for
    those documents: per window only ``process_results`` on fresh log-likelihoods runs.

    Args:
        tasks: leaf task objects (the ones the base run's instances belong to).
        instances: the base run's lm-eval instances, in the order the engine's requests were made.
        limit: the base run's ``limit`` (the same documents).
        keep: task -> ``"metric,filter"`` to report.
        base_items: the base run's ``items`` (document hashes are copied from there).
        only_docs: task -> document ids (as strings) to score; None: every document of the run (a race scores
            the documents of one look, with ``instances`` those documents' requests).

    ``seconds`` adds up the time spent in calls (lm-eval's filters and ``process_results``: CPU work that a GPU
    waits for between windows).
    """

    def __init__(
        self,
        tasks: Sequence[Any],
        instances: Sequence[Any],
        limit: int | None,
        keep: dict[str, str],
        base_items: dict[str, dict[str, dict[str, Any]]],
        only_docs: dict[str, set[str]] | None = None,
    ):
        from lm_eval.api.metrics import mean, stderr_for_metric

        self.seconds = 0.0
        by_task: dict[str, list[tuple[Any, int]]] = defaultdict(list)
        for index, inst in enumerate(instances):
            by_task[inst.task_name].append((inst, index))
        self.plans: list[_TaskPlan] = []
        for task in tasks:
            if task.task_name not in keep:
                continue
            metric, filt = keep[task.task_name].split(",", 1)
            aggregate = task.aggregation().get(metric, mean)
            pairs = by_task.get(task.task_name) or []
            per_doc: dict[int, list[Any]] = defaultdict(list)
            for inst, _ in pairs:
                per_doc[inst.doc_id].append(inst)
            wanted = None if only_docs is None else only_docs.get(task.task_name, set())
            docs = [
                (doc_id, doc, sorted(per_doc[doc_id], key=lambda x: x.idx))
                for doc_id, doc in task.doc_iterator(rank=0, limit=limit, world_size=1)
                if wanted is None or str(doc_id) in wanted
            ]
            for name in ("doc_to_choice", "doc_to_target", "doc_to_text"):
                _memoise(task, name)
            self.plans.append(_TaskPlan(
                task, pairs, docs, metric, filt, aggregate, stderr_for_metric(metric=aggregate, bootstrap_iters=1000),
                (base_items.get(task.task_name) or {}).get(filt) or {},
            ))

    def __call__(self, run: Any) -> dict[str, Any]:
        started = time.perf_counter()
        results: dict[str, dict[str, Any]] = {}
        items: dict[str, dict[str, dict[str, Any]]] = {}
        for plan in self.plans:
            task, pairs, docs, metric, filt = plan.task, plan.pairs, plan.docs, plan.metric, plan.filt
            name = task.task_name
            for inst, index in pairs:
                inst.resps = [(float(run.loglikelihood[index]), bool(run.is_greedy[index]))]
                inst.filtered_resps = {}
            _apply_filters(task, [inst for inst, _ in pairs])
            values: list[Any] = []
            per_item: dict[str, dict[str, Any]] = {}
            for doc_id, doc, requests in docs:
                metrics = task.process_results(doc, [req.filtered_resps[filt] for req in requests])
                if metric not in metrics:
                    continue
                value = metrics[metric]
                values.append(value)
                known = plan.base_items.get(str(doc_id)) or {}
                per_item[str(doc_id)] = {
                    "doc_hash": known.get("doc_hash"),
                    "prompt_hash": known.get("prompt_hash"),
                    "values": {metric: _plain(value)},
                }
            results[name] = {
                f"{metric},{filt}": _plain(plan.aggregate(values)),
                f"{metric}_stderr,{filt}": _plain(plan.stderr(values)) if plan.stderr and len(values) > 1 else "N/A",
            }
            items[name] = {filt: per_item}
        self.seconds += time.perf_counter() - started
        return {"results": results, "items": items}


def _apply_filters(task: Any, instances: list[Any]) -> None:
    """lm-eval's ``task.apply_filters()`` on ``instances`` only: it filters every instance of the task, and a
    race scoring one look's documents per window would pay for all of them (the task's filter ensembles are
    applied the same way, per instance)."""
    ensembles = getattr(task, "_filters", None)
    if ensembles is None:
        task.apply_filters()
        return
    if instances:
        for ensemble in ensembles:
            ensemble.apply(instances)


def _memoise(task: Any, name: str) -> None:
    """Shadow ``task.<name>(doc)`` with a cache keyed by the document object.

    The cache holds each document beside its value and checks identity: a task outlives its scorers (a race
    makes one per look), and a freed document's ``id`` can be reused by another document, which must not get
    the first one's choices or target.
    """
    original = getattr(task, name, None)
    if original is None or getattr(original, "_rys_memoised", False):
        return
    cache: dict[int, tuple[Any, Any]] = {}

    def memoised(doc: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return original(doc, *args, **kwargs)
        hit = cache.get(id(doc))
        if hit is None or hit[0] is not doc:
            hit = cache[id(doc)] = (doc, original(doc))
        return hit[1]

    memoised._rys_memoised = True  # type: ignore[attr-defined]
    setattr(task, name, memoised)


def _plain(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value
