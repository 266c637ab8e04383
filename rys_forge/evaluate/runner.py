"""lm-eval plumbing: one ``simple_evaluate`` run of an already-loaded model, normalised for comparison.

:func:`run_lm_eval` wraps the model in an ``HFLM`` (or takes a caller's ``lm``, e.g. the sweep's cached
engine), runs ``lm_eval.evaluator.simple_evaluate`` with ``log_samples`` inside
:func:`lm_eval_environment` (offline, quiet, RNG states restored) and returns a *normalised run*, the
JSON-safe dict that :mod:`rys_forge.evaluate.compare` and the base cache work on::

    {"results": {task: {"metric,filter": value, "metric_stderr,filter": se, ...}},
     "groups": {group: [member, ...]},
     "metric_info": {task: {metric: {"aggregation", "higher_is_better"}}},
     "n_samples", "n_shot", "versions": {task: ...},
     "items": {task: {filter: {doc_id: {"doc_hash", "prompt_hash", "values": {metric: float | None}}}}}}

Also here: task-name resolution (:func:`resolve_task_names`), the checks of lm-eval settings shared by
``eval`` and ``sweep`` (:func:`check_counts`, :func:`check_batch_size`), stage messages (:func:`say`) and
lm-eval's version (part of cache keys and reports).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import sys
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from rys_forge.errors import EvaluationError, RysForgeError, TaskError, UsageError, first_line
from rys_forge.evaluate.local_tasks import resolve_tasks, task_manager
from rys_forge.files import json_safe

__all__ = [
    "LM_EVAL_NOTICES",
    "OFFLINE_ENV_VARS",
    "check_batch_size",
    "check_counts",
    "is_count",
    "lm_eval_environment",
    "lm_eval_version",
    "load_task_objects",
    "normalise_results",
    "offline_env",
    "resolve_task_names",
    "run_lm_eval",
    "say",
    "scalar",
]


# --------------------------------------------------------------------------- versions and messages


def lm_eval_version() -> str:
    """The installed lm-eval version (``unknown`` if its metadata is missing)."""
    try:
        return version("lm_eval")
    except PackageNotFoundError:  # pragma: no cover - lm-eval is a dependency
        return "unknown"


def say(progress: bool, message: str) -> None:
    """A stage message on stderr (``[rys-forge eval] ...``) when ``progress`` is on."""
    if progress:
        print(f"[rys-forge eval] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- settings checks


def is_count(value: Any, minimum: int) -> bool:
    """Whether ``value`` is an integer (not a bool) of at least ``minimum``."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def check_counts(limit: int | None, num_fewshot: int | None) -> None:
    """Raise :class:`UsageError` unless ``limit`` is None or >= 1 and ``num_fewshot`` None or >= 0."""
    if limit is not None and not is_count(limit, 1):
        raise UsageError(f"--limit must be a positive integer (items per task), got {limit!r}")
    if num_fewshot is not None and not is_count(num_fewshot, 0):
        raise UsageError(f"--num-fewshot must be a non-negative integer, got {num_fewshot!r}")


def check_batch_size(batch_size: int | str) -> int | str:
    """lm-eval's batch size as an int (``"8"`` -> 8), ``auto`` or ``auto:N``.

    Raises:
        UsageError: anything else (a bool, a number below 1, other text).
    """
    bad = UsageError(f"bad batch size {batch_size!r}; use a positive integer, 'auto' or 'auto:N'")
    if isinstance(batch_size, bool):
        raise bad
    if isinstance(batch_size, int):
        value: int | str = batch_size
    else:
        text = str(batch_size).strip()
        value = int(text) if text.isdigit() else text
    if isinstance(value, int):
        if value < 1:
            raise bad
        return value
    if value == "auto" or (value.startswith("auto:") and value[5:].replace(".", "", 1).isdigit()):
        return value
    raise bad


# --------------------------------------------------------------------------- tasks


def resolve_task_names(tasks: Sequence[str], include_path: str | Path | Sequence[str | Path] | None) -> tuple[Any, list[str]]:
    """lm-eval task manager and validated task names.

    Local (``rys_*``) and ``include_path`` tasks are tried first; lm-eval's built-in registry is indexed
    (several seconds) only when a name is not one of them.

    Raises:
        TaskError: an unknown name, or a known task with a problem (a missing local data file).
    """
    manager = task_manager(include_path, include_defaults=False)
    try:
        return manager, resolve_tasks(tasks, manager)
    except TaskError:
        requested = [part.strip() for item in tasks for part in str(item).split(",") if part.strip()]
        known = set(manager.all_tasks)
        if all(name in known for name in requested):
            raise  # a known name with a problem (missing data file): lm-eval's registry will not help
        manager = task_manager(include_path, include_defaults=True)
        return manager, resolve_tasks(tasks, manager)


def load_task_objects(manager: Any, names: Sequence[str]) -> list[Any]:
    """Load the tasks (reading their data) and return the top-level Task/Group objects for
    ``simple_evaluate`` (so data-loading failures surface here, as TaskError)."""
    try:
        loaded = manager.load(list(names))
    except RysForgeError:
        raise
    except Exception as exc:
        raise TaskError(
            f"could not load the data of task(s) {', '.join(names)}: {first_line(exc)}"
            " (hub-backed lm-eval tasks need their dataset in the Hugging Face cache, or network access with"
            " HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0)"
        ) from None
    groups = loaded.get("groups", {}) or {}
    children = {child for group in groups.values() for child in getattr(group, "child_names", [])}
    in_groups = {task.task_name for group in groups.values() for task in group.get_all_tasks()}
    top: list[Any] = [group for name, group in groups.items() if name not in children]
    top.extend(task for name, task in loaded["tasks"].items() if name not in in_groups)
    return top


# --------------------------------------------------------------------------- offline environment

#: Variables :func:`offline_env` sets to ``1`` when the user has not set them.
OFFLINE_ENV_VARS: tuple[str, ...] = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def _loaded_offline_flags(added: set[str]) -> list[tuple[Any, str]]:
    """Module attributes that cache the offline variables at import time and need the same treatment."""
    targets: list[tuple[Any, str]] = []
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None and "HF_HUB_OFFLINE" in added:
        targets.append((hub_constants, "HF_HUB_OFFLINE"))
    # datasets derives its flags from HF_DATASETS_OFFLINE when set, else from huggingface_hub's flag.
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None and "HF_DATASETS_OFFLINE" in added:
        targets.extend((datasets_config, attr) for attr in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return [(module, attr) for module, attr in targets if hasattr(module, attr)]


@contextlib.contextmanager
def offline_env() -> Iterator[dict[str, str]]:
    """Run a block with Hugging Face hub access switched off, unless the user decided otherwise.

    Sets ``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1`` for the block, but only those the user has not
    set (any value the user set, even ``0`` or an empty string, is left alone; a set ``TRANSFORMERS_OFFLINE``
    counts as the user's choice for ``HF_HUB_OFFLINE``). ``datasets`` and ``huggingface_hub`` read these
    variables once, at import; when they are already imported, the flags they cached are switched the same
    way for the block. Everything is restored on exit. Not thread-safe (it changes process-wide state).

    Yields:
        The variables this call set, mapped to the value it gave them (empty when the user set both).
    """
    added: dict[str, str] = {}
    for var in OFFLINE_ENV_VARS:
        if var in os.environ:
            continue
        if var == "HF_HUB_OFFLINE" and "TRANSFORMERS_OFFLINE" in os.environ:
            continue
        os.environ[var] = "1"
        added[var] = "1"
    patched = [(module, attr, getattr(module, attr)) for module, attr in _loaded_offline_flags(set(added))]
    for module, attr, _old in patched:
        setattr(module, attr, True)
    try:
        yield dict(added)
    finally:
        for module, attr, old in reversed(patched):
            setattr(module, attr, old)
        for var in added:
            os.environ.pop(var, None)


# --------------------------------------------------------------------------- the lm-eval run


def _light_env_info(storage: dict[str, Any]) -> None:
    """Stand-in for lm-eval's ``add_env_info``: versions only. The original runs torch's
    ``collect_env`` (pip, conda, nvidia-smi subprocesses; seconds per call), whose text rys-forge drops."""
    import transformers

    storage.update({"transformers_version": transformers.__version__, "lm_eval_version": lm_eval_version()})


#: lm-eval log lines about how rys-forge hands it the model (an already-loaded one, on purpose): not the
#: user's business. Matched at the start of the message.
LM_EVAL_NOTICES = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)
#: The loggers lm-eval writes them to (its model module; older lm-eval versions used one "lm-eval" logger).
_NOTICE_LOGGERS = ("lm_eval.models.huggingface", "lm_eval", "lm-eval")


class _DropNotices(logging.Filter):
    """Drops the records of :data:`LM_EVAL_NOTICES`; everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(LM_EVAL_NOTICES)


class _Discard(io.TextIOBase):
    """A text stream that drops everything (quiet runs: lm-eval's bars and prints)."""

    def write(self, text: str) -> int:
        return len(text)

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def _quiet_output(progress: bool) -> Iterator[None]:
    """lm-eval's ``print`` output (stdout) to stderr; without ``progress`` both are dropped; offline env."""
    with contextlib.ExitStack() as stack:
        sink: Any = sys.stderr if progress else _Discard()
        stack.enter_context(contextlib.redirect_stdout(sink))
        if not progress:
            stack.enter_context(contextlib.redirect_stderr(sink))
        stack.enter_context(offline_env())
        yield


@contextlib.contextmanager
def lm_eval_environment(progress: bool) -> Iterator[None]:
    """The process state one lm-eval run needs, restored afterwards.

    * Hugging Face offline variables where the user set none (:func:`offline_env`);
    * ``DISABLE_MULTIPROC=1`` unless set: lm-eval's bootstrap stderr otherwise forks a process pool from a
      process that holds the model (and maybe a CUDA context);
    * lm-eval's ``print`` output (stdout) goes to stderr, so a caller's stdout (tables, JSON) stays clean;
      without ``progress``, progress bars (written to ``sys.stderr``) are dropped and lm-eval's INFO logging
      is muted (warnings still reach logging's handlers); lm-eval's notices about being handed an
      already-loaded model (:data:`LM_EVAL_NOTICES`) are dropped either way;
    * lm-eval's environment dump (``collect_env`` subprocesses) and ``git describe`` replaced by cheap stand-ins;
    * the caller's ``random``/``numpy``/``torch`` RNG states: ``simple_evaluate`` seeds them globally.
    """
    import torch
    from lm_eval import evaluator

    env_added: list[str] = []
    for var, value in {"DISABLE_MULTIPROC": "1"}.items():
        if var not in os.environ:
            os.environ[var] = value
            env_added.append(var)
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    if not progress:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
    notices, notice_loggers = _DropNotices(), [logging.getLogger(name) for name in _NOTICE_LOGGERS]
    for lg in notice_loggers:
        lg.addFilter(notices)
    patched = []
    for attr, replacement in (("add_env_info", _light_env_info), ("get_git_commit_hash", lambda: None)):
        if hasattr(evaluator, attr):
            patched.append((attr, getattr(evaluator, attr)))
            setattr(evaluator, attr, replacement)
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        with _quiet_output(progress):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        for attr, original in patched:
            setattr(evaluator, attr, original)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        for lg in notice_loggers:
            lg.removeFilter(notices)
        for var in env_added:
            os.environ.pop(var, None)


def _simple_evaluate(lm: Any, task_objects: list[Any], manager: Any, *, limit: int | None,
                     num_fewshot: int | None, bootstrap_iters: int, seed: int) -> dict[str, Any] | None:
    """``simple_evaluate`` with per-item logging and rys-forge's seeds, in a world of one process."""
    from lm_eval import evaluator

    # Under torchrun lm-eval would shard the requests across processes (and answer only on
    # LOCAL_RANK 0); a rys-forge process evaluates its own windows in full: a world of one. HFLM keeps
    # its rank and world size in these attributes and offers no public setter.
    lm._rank, lm._world_size = 0, 1
    local_rank = os.environ.pop("LOCAL_RANK", None)
    try:
        return evaluator.simple_evaluate(
            model=lm,
            tasks=task_objects,
            task_manager=manager,
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=True,
            bootstrap_iters=bootstrap_iters,
            random_seed=seed,
            numpy_random_seed=seed + 1234,
            torch_random_seed=seed + 1234,
            fewshot_random_seed=seed + 1234,
        )
    finally:
        if local_rank is not None:
            os.environ["LOCAL_RANK"] = local_rank


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    manager: Any,
    names: Sequence[str],
    *,
    limit: int | None,
    num_fewshot: int | None,
    batch_size: int | str,
    seed: int,
    bootstrap_iters: int,
    progress: bool,
    lm: Any = None,
    task_objects: list[Any] | None = None,
) -> dict[str, Any]:
    """One lm-eval run of an already-loaded model, as it is now (a repeat plan applied or not).

    Args:
        model, tokenizer: the loaded model and its tokenizer.
        manager, names: lm-eval task manager and task names (:func:`resolve_task_names`).
        limit, num_fewshot, batch_size, bootstrap_iters: lm-eval settings.
        seed: lm-eval's seeds are ``(seed, seed + 1234, seed + 1234, seed + 1234)``.
        progress: lm-eval's progress bars and INFO logging on stderr.
        lm: replaces the default ``HFLM`` around ``model`` (the sweep's cached engine).
        task_objects: already-loaded tasks (:func:`load_task_objects`); else loaded from ``names``.

    Returns:
        The normalised run (module docstring).

    Raises:
        TaskError: task data cannot be loaded.
        EvaluationError: lm-eval failed or returned nothing.
    """
    from lm_eval.models.huggingface import HFLM

    with lm_eval_environment(progress):
        if task_objects is None:
            task_objects = load_task_objects(manager, names)
        try:
            if lm is None:
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
            results = _simple_evaluate(lm, task_objects, manager, limit=limit, num_fewshot=num_fewshot,
                                       bootstrap_iters=bootstrap_iters, seed=seed)
        except RysForgeError:
            raise
        except Exception as exc:
            raise EvaluationError(f"lm-eval failed on {', '.join(names)}: {first_line(exc)}") from None
    if not results:
        raise EvaluationError("lm-eval returned no results (not the main process?)")
    return normalise_results(results)


# --------------------------------------------------------------------------- normalised runs


def scalar(value: Any) -> float | None:
    """A per-item or aggregate metric value as a float, or None when it is not a plain number."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    return None


def _metric_info(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task and metric: the aggregation name (or None) and ``higher_is_better``."""
    metric_info: dict[str, dict[str, Any]] = {}
    for task, config in (results.get("configs") or {}).items():
        info: dict[str, Any] = {}
        for entry in (config or {}).get("metric_list") or []:
            if isinstance(entry, dict) and "metric" in entry:
                aggregation = entry.get("aggregation")
                info[str(entry["metric"])] = {
                    "aggregation": aggregation if isinstance(aggregation, str) else None,
                    "higher_is_better": entry.get("higher_is_better"),
                }
        metric_info[task] = info
    for task, flags in (results.get("higher_is_better") or {}).items():
        for metric, flag in (flags or {}).items():
            metric_info.setdefault(task, {}).setdefault(metric, {"aggregation": None, "higher_is_better": None})
            if metric_info[task][metric].get("higher_is_better") is None:
                metric_info[task][metric]["higher_is_better"] = flag
    return metric_info


def _items(results: dict[str, Any]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """Per task, filter and doc_id: the document and prompt hashes and the per-item metric values."""
    items: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for task, samples in (results.get("samples") or {}).items():
        per_filter: dict[str, dict[str, dict[str, Any]]] = {}
        for sample in samples:
            record: dict[str, Any] = {
                "doc_hash": sample.get("doc_hash"),
                "prompt_hash": sample.get("prompt_hash"),
                "values": {},
            }
            for metric in sample.get("metrics") or []:
                record["values"][metric] = scalar(sample.get(metric))
            per_filter.setdefault(str(sample.get("filter", "none")), {})[str(sample["doc_id"])] = record
        items[task] = per_filter
    return items


def normalise_results(results: dict[str, Any]) -> dict[str, Any]:
    """Keep what the comparison and the cache need from ``simple_evaluate``'s output (JSON-safe; the
    layout is in the module docstring)."""
    metric_info = _metric_info(results)
    items = _items(results)
    return json_safe(
        {
            "results": results.get("results") or {},
            "groups": results.get("group_subtasks") or {},
            "metric_info": metric_info,
            "n_samples": results.get("n-samples") or {},
            "n_shot": results.get("n-shot") or {},
            "versions": results.get("versions") or {},
            "items": items,
        }
    )
