"""Evaluate a RYS variant against its base model with lm-evaluation-harness, with paired significance.

Two ways to name the RYS model:

* an exported folder (``evaluate("out/my-rys", tasks=[...])``): a rys-forge export whose ``config.json``
  carries an ``rys`` block (plan, format, base model). It is loaded with ``trust_remote_code=True`` (the
  layer-list format ships its own modelling code); the base is ``base=`` or the export's recorded
  ``rys.base_model``;
* the in-memory repeat (``evaluate(model="gemma-3-270m", windows=["6:10"], tasks=[...])``): the model is
  loaded once, evaluated as is, then evaluated again under :func:`rys_forge.repeat.repeated` (the same
  object; no second load, no extra weights).

Both runs use the same lm-eval settings (tasks, limit, few-shot count, seeds, batch size, device, dtype),
through ``lm_eval.evaluator.simple_evaluate`` with an ``HFLM`` wrapping the already-loaded model. For every
task and metric the report gives the base value, the RYS value, the delta (RYS - base), lm-eval's standard
errors, and a paired test on the per-item results (``log_samples``; items matched by ``doc_id``):

* 0/1 per-item scores (``acc``, ``acc_norm``, ``exact_match``, ...): exact McNemar test;
* other scalar per-item scores (``perplexity``'s per-item log-likelihoods, ...): paired bootstrap of the
  task's aggregation (``mean``, or ``exp(-mean)`` for ``perplexity``), with a confidence interval;
* corpus-level metrics whose per-item values are not numbers (BLEU, F1 over (gold, pred) pairs, ...) and
  group aggregates: no paired test (the report's ``notes`` say why).

Base results (aggregates and per-item scores) are cached under ``cache_dir()/eval/<sha256>.json``, keyed by
the base model's identity (a local folder: its path and the size and mtime of its files; a built-in or hub
name: the name), the tasks (with a fingerprint of their configs and local data files), limit, few-shot count,
dtype, device type, batch size, lm-eval version, seed and bootstrap iterations: evaluating several variants of
one base runs the base once.

Adapters: ``adapter=`` (with ``model``) merges a PEFT adapter into the model before both runs (its identity is
part of the base-cache key); an export built with ``--adapter`` has its base loaded with the recorded adapter.
A healed export (``DIR/heal``, see :mod:`rys_forge.heal`) is evaluated before and after healing: the export
without and with its per-visit LoRA adapters (one load); the main rows compare base and healed, and
``healing_rows`` compare unhealed and healed with the same paired tests.

``eval.json`` is written atomically (temporary file + ``os.replace``) into ``out`` and, for a local export
folder, into the folder; nothing is written when anything fails.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from rys_forge import stats
from rys_forge.files import json_safe
from rys_forge.errors import EvaluationError, ModelLoadError, RysForgeError, TaskError, UsageError, first_line
from rys_forge.evaluate.local_tasks import offline_env, resolve_tasks, task_data_files, task_manager
from rys_forge.models import BUILTIN_MODELS, cache_dir, load_model, parse_device, parse_dtype, resolve_source
from rys_forge.plan import LayerPlan

__all__ = [
    "EVAL_FILE",
    "EvalReport",
    "EvaluationError",
    "base_cache_key",
    "base_identity",
    "evaluate",
    "format_table",
]

#: Name of the report file written into ``out`` and export folders.
EVAL_FILE = "eval.json"
#: Version of the ``eval.json`` layout.
EVAL_FORMAT = 1
#: Version of the base-cache entry layout (part of the cache key).
CACHE_FORMAT = 1
#: Aggregations whose per-item values rys-forge can resample, as vectorised statistics (last axis).
_STATISTICS: dict[str, Any] = {
    "mean": lambda x: np.mean(x, axis=-1),
    "nanmean": lambda x: np.mean(x, axis=-1),
    "perplexity": lambda x: np.exp(-np.mean(x, axis=-1)),
}
#: Aggregations for which McNemar's test applies when the per-item values are 0/1.
_MEAN_AGGREGATIONS = ("mean", "nanmean")
#: Top-level files of a model folder that identify its weights (for the base-cache key).
_IDENTITY_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt", ".py", ".tiktoken")
_IDENTITY_SKIP = frozenset({EVAL_FILE})
_LOG = logging.getLogger("rys_forge.evaluate")




# --------------------------------------------------------------------------- report


@dataclass
class EvalReport:
    """Base vs RYS on lm-eval tasks.

    Attributes:
        rows: one dict per (task, metric, filter): ``task``, ``metric``, ``filter``, ``base``, ``rys``,
            ``delta`` (rys - base), ``base_stderr``, ``rys_stderr`` (lm-eval's), ``test``
            (``mcnemar_exact`` / ``paired_bootstrap`` / None), ``p_value``, ``n`` (paired items),
            ``higher_is_better``, ``is_group``, and per test ``b``/``c`` (discordant counts) or
            ``ci_low``/``ci_high`` (bootstrap interval of the delta); ``note`` when no test was run.
        settings: what was evaluated and how (models, plan, tasks, lm-eval settings, versions, base cache).
        timings: seconds per stage (``base_load``, ``base_eval``, ``rys_load``, ``rys_eval``, ``total``).
        notes: human-readable remarks (metrics without a paired test and why, mismatched items, ...).
        items: paired per-item scores, ``{task: {filter: {"doc_ids": [...], metric: {"base": [...],
            "rys": [...]}}}}``, for metrics with scalar per-item values.
        saved_to: the ``eval.json`` files written.
        healing_rows: for a healed export, unhealed vs healed per task and metric: the row layout above with
            ``unhealed``/``healed`` (and their ``_stderr``) in place of ``base``/``rys``; else empty.
    """

    rows: list[dict[str, Any]]
    settings: dict[str, Any]
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)
    items: dict[str, Any] = field(default_factory=dict)
    saved_to: list[str] = field(default_factory=list)
    healing_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def base_cache_reused(self) -> bool:
        """Whether the base results came from the cache (no base evaluation ran)."""
        return bool(self.settings.get("base_cache", {}).get("reused"))

    def row(self, task: str, metric: str, filter: str = "none") -> dict[str, Any]:  # noqa: A002
        """The row of one task and metric.

        Raises:
            KeyError: no such row.
        """
        for row in self.rows:
            if row["task"] == task and row["metric"] == metric and row["filter"] == filter:
                return row
        raise KeyError(f"no row for task {task!r}, metric {metric!r}, filter {filter!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (non-finite floats become None)."""
        return json_safe(
            {
                "rys_forge_eval": EVAL_FORMAT,
                "settings": self.settings,
                "timings": self.timings,
                "rows": self.rows,
                **({"healing_rows": self.healing_rows} if self.healing_rows else {}),
                "notes": self.notes,
                "items": self.items,
            }
        )

    def save(self, path: str | Path) -> Path:
        """Write the report atomically; ``path`` is a folder (``path/eval.json``) or a ``.json`` file.

        Returns:
            The file written.
        """
        target = _report_path(path)
        _atomic_write_texts({target: self._json_text()})
        self.saved_to.append(str(target))
        return target

    def _json_text(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"


def _report_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path if path.suffix == ".json" else path / EVAL_FILE


def _atomic_write_texts(files: Mapping[Path, str]) -> None:
    """Write every file to a temporary sibling first, then rename all into place (all or nothing on
    write errors; a rename failure after the first leaves earlier ones written)."""
    staged: list[tuple[Path, Path]] = []
    try:
        for target, text in files.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            staged.append((Path(tmp_name), target))
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
        for tmp, target in staged:
            os.replace(tmp, target)
    except OSError as exc:
        raise RysForgeError(f"could not write {EVAL_FILE}: {exc}") from None
    finally:
        for tmp, _target in staged:
            tmp.unlink(missing_ok=True)




# --------------------------------------------------------------------------- formatting


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    value = float(value)
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


def _fmt_p(p: Any) -> str:
    if p is None or (isinstance(p, float) and not math.isfinite(p)):
        return "-"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def format_table(report: EvalReport) -> str:
    """Plain-text table for the terminal: task, metric, base ± se, rys ± se, delta, p, test.

    Notes (metrics without a paired test, base cache reuse) follow the table.
    """
    header = ["task", "metric", "base ± se", "rys ± se", "delta", "p", "test"]
    lines: list[list[str]] = []
    for row in report.rows:
        metric = row["metric"] if row["filter"] in ("none", None) else f"{row['metric']},{row['filter']}"
        if row.get("higher_is_better") is not None:
            metric += " ↑" if row["higher_is_better"] else " ↓"
        base = _fmt(row["base"]) + (f" ± {_fmt(row['base_stderr'])}" if row.get("base_stderr") is not None else "")
        rys = _fmt(row["rys"]) + (f" ± {_fmt(row['rys_stderr'])}" if row.get("rys_stderr") is not None else "")
        delta = row.get("delta")
        delta_text = "-" if delta is None else (("+" if delta > 0 else "") + _fmt(delta))
        test = {"mcnemar_exact": "McNemar", "paired_bootstrap": "bootstrap"}.get(row.get("test") or "", "-")
        task = ("  " if row.get("is_group") is False and row.get("in_group") else "") + row["task"]
        lines.append([task, metric, base, rys, delta_text, _fmt_p(row.get("p_value")), test])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]

    def render(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    out = [render(header), render(["-" * w for w in widths])]
    out.extend(render(line) for line in lines)
    settings = report.settings
    footer = [
        f"base: {settings.get('base')}  rys: {settings.get('rys')}"
        + (f"  plan: {settings['plan_description']}" if settings.get("plan_description") else ""),
        f"n = {settings.get('limit') or 'all'} items per task, {settings.get('num_fewshot_effective')}"
        f"; delta = rys - base; p: paired test on per-item results"
        + ("; base results reused from cache" if report.base_cache_reused else ""),
    ]
    if settings.get("adapter"):
        footer.append(f"adapter merged into the base: {settings['adapter'].get('path')}")
    if settings.get("heal"):
        footer.append(f"rys = healed (per-visit LoRA in {settings['heal'].get('adapter')}/); see the healing table")
    if report.healing_rows:
        out += ["", "healing (same tasks): unhealed vs healed; delta = healed - unhealed"]
        heal_lines = [
            [row["task"], row["metric"] if row["filter"] in ("none", None) else f"{row['metric']},{row['filter']}",
             _fmt(row["unhealed"]), _fmt(row["healed"]),
             "-" if row.get("delta") is None else ("+" if row["delta"] > 0 else "") + _fmt(row["delta"]),
             _fmt_p(row.get("p_value"))]
            for row in report.healing_rows
        ]
        heal_header = ["task", "metric", "unhealed", "healed", "delta", "p"]
        heal_widths = [max(len(h), *(len(line[i]) for line in heal_lines)) for i, h in enumerate(heal_header)]
        out.append("  ".join(c.ljust(w) for c, w in zip(heal_header, heal_widths)).rstrip())
        out.extend("  ".join(c.ljust(w) for c, w in zip(line, heal_widths)).rstrip() for line in heal_lines)
    out.append("")
    out.extend(footer)
    out.extend(f"note: {note}" for note in report.notes)
    return "\n".join(out)


# --------------------------------------------------------------------------- identity and cache


def _lm_eval_version() -> str:
    try:
        return version("lm_eval")
    except PackageNotFoundError:  # pragma: no cover - lm-eval is a dependency
        return "unknown"


def _rys_forge_version() -> str:
    from rys_forge import __version__

    return __version__


def base_identity(source: str) -> dict[str, Any]:
    """What identifies a base model's results: a local folder or file by its path and the name, size and
    mtime of its weight/config/tokenizer files; a built-in short name or hub id by the name."""
    if source in BUILTIN_MODELS:
        return {"builtin": source}
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file():
            files = [path]
        else:
            files = sorted(
                p
                for p in path.iterdir()
                if p.is_file() and p.suffix in _IDENTITY_SUFFIXES and p.name not in _IDENTITY_SKIP
            )
        return {
            "path": str(path.resolve()),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        }
    return {"name": source}


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _task_fingerprint(names: Sequence[str], manager: Any) -> dict[str, Any]:
    """Hash of every named task's config (group members included) and its local data files' size/mtime."""
    configs: dict[str, str] = {}
    index = getattr(manager, "task_index", {}) or {}

    def walk(name: str) -> None:
        if name in configs:
            return
        entry = index.get(name)
        if entry is None:  # a YAML file path or an unindexed name: hash the file when there is one
            path = Path(name).expanduser()
            configs[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "?"
            return
        cfg = entry.cfg if isinstance(entry.cfg, dict) else {}
        configs[name] = _sha(cfg)
        kind = getattr(entry.kind, "name", "")
        members: list[str] = []
        if kind == "TAG":
            members = sorted(entry.tags)
        elif kind == "GROUP":
            listed = cfg.get("task")
            for member in listed if isinstance(listed, list) else [listed]:
                if isinstance(member, str):
                    members.append(member)
                elif isinstance(member, dict) and isinstance(member.get("group") or member.get("task"), str):
                    members.append(member.get("group") or member.get("task"))
        for member in members:
            walk(member)

    data: dict[str, Any] = {}
    for name in names:
        walk(name)
        files = []
        for path in task_data_files(name, manager):
            try:
                stat = path.stat()
                files.append([str(path), stat.st_size, stat.st_mtime_ns])
            except OSError:
                files.append([str(path), None, None])
        data[name] = files
    return {"configs": configs, "data_files": data}


def base_cache_key(
    base: str,
    tasks: Sequence[str],
    *,
    manager: Any = None,
    limit: int | None,
    num_fewshot: int | None,
    dtype: str,
    device_type: str,
    batch_size: int | str,
    seed: int,
    bootstrap_iters: int,
    attn_implementation: str | None,
    adapter: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The settings that determine a base model's lm-eval results (hashed into the cache file name).

    ``adapter`` is the identity of a PEFT adapter merged into the base (``adapters.identity``); keys without
    an adapter are unchanged, so earlier cache entries stay valid.
    """
    key = {
        "cache_format": CACHE_FORMAT,
        "base": base_identity(base),
        "tasks": list(tasks),
        "task_fingerprint": _task_fingerprint(tasks, manager) if manager is not None else None,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "dtype": dtype,
        "device_type": device_type,
        "batch_size": str(batch_size),
        "lm_eval": _lm_eval_version(),
        "seed": seed,
        "bootstrap_iters": bootstrap_iters,
        "attn_implementation": attn_implementation,
    }
    if adapter is not None:
        key["adapter"] = adapter
    return key


def _cache_path(key: dict[str, Any]) -> Path:
    return cache_dir() / "eval" / f"{_sha(key)}.json"


def _read_cache(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != json_safe(key) or not isinstance(data.get("run"), dict):
        return None
    return data["run"]


def _write_cache(path: Path, key: dict[str, Any], run: dict[str, Any]) -> bool:
    """Store a base run; a cache that cannot be written only costs a re-run later (returns False)."""
    try:
        _atomic_write_texts(
            {path: json.dumps(json_safe({"key": key, "run": run, "created": time.time()}), allow_nan=False)}
        )
    except RysForgeError as exc:
        _LOG.warning("could not write the base-results cache %s: %s", path, exc)
        return False
    return True


# --------------------------------------------------------------------------- running lm-eval


def _light_env_info(storage: dict[str, Any]) -> None:
    """Stand-in for lm-eval's ``add_env_info``: versions only. The original runs torch's
    ``collect_env`` (pip, conda, nvidia-smi subprocesses; seconds per call), whose text rys-forge drops."""
    import transformers

    storage.update({"transformers_version": transformers.__version__, "lm_eval_version": _lm_eval_version()})


class _Discard(io.TextIOBase):
    """A text stream that drops everything (quiet runs: lm-eval's bars and prints)."""

    def write(self, text: str) -> int:
        return len(text)

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def _lm_eval_environment(progress: bool) -> Iterator[None]:
    """The process state one lm-eval run needs, restored afterwards.

    * Hugging Face offline variables where the user set none (:func:`rys_forge.local_tasks.offline_env`);
    * ``DISABLE_MULTIPROC=1`` unless set: lm-eval's bootstrap stderr otherwise forks a process pool from a
      process that holds the model (and maybe a CUDA context);
    * lm-eval's ``print`` output (stdout) goes to stderr, so a caller's stdout (tables, JSON) stays clean;
      without ``progress``, progress bars (written to ``sys.stderr``) are dropped and lm-eval's INFO logging
      is muted (warnings still reach logging's handlers);
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
    patched = []
    for attr, replacement in (("add_env_info", _light_env_info), ("get_git_commit_hash", lambda: None)):
        if hasattr(evaluator, attr):
            patched.append((attr, getattr(evaluator, attr)))
            setattr(evaluator, attr, replacement)
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        with contextlib.ExitStack() as stack:
            sink: Any = sys.stderr if progress else _Discard()
            stack.enter_context(contextlib.redirect_stdout(sink))
            if not progress:
                stack.enter_context(contextlib.redirect_stderr(sink))
            stack.enter_context(offline_env())
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
        for var in env_added:
            os.environ.pop(var, None)



def _load_task_objects(manager: Any, names: Sequence[str]) -> list[Any]:
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


def _run_lm_eval(
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
    """One lm-eval run of an already-loaded model; returns the normalised run (see :func:`_normalise`).

    ``lm`` replaces the default ``HFLM`` around ``model`` (the sweep's cached engine); ``task_objects``
    are already-loaded tasks (else they are loaded from ``names``)."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    with _lm_eval_environment(progress):
        if task_objects is None:
            task_objects = _load_task_objects(manager, names)
        try:
            if lm is None:
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
            # Under torchrun lm-eval would shard the requests across processes (and answer only on
            # LOCAL_RANK 0); a rys-forge process evaluates its own windows in full: a world of one.
            lm._rank, lm._world_size = 0, 1
            local_rank = os.environ.pop("LOCAL_RANK", None)
            try:
                results = evaluator.simple_evaluate(
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
        except RysForgeError:
            raise
        except Exception as exc:
            raise EvaluationError(f"lm-eval failed on {', '.join(names)}: {first_line(exc)}") from None
    if not results:
        raise EvaluationError("lm-eval returned no results (not the main process?)")
    return _normalise(results)


def _scalar(value: Any) -> float | None:
    """A per-item or aggregate metric value as a float, or None when it is not a plain number."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    return None


def _normalise(results: dict[str, Any]) -> dict[str, Any]:
    """Keep what the comparison and the cache need from ``simple_evaluate``'s output (JSON-safe)."""
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
                record["values"][metric] = _scalar(sample.get(metric))
            per_filter.setdefault(str(sample.get("filter", "none")), {})[str(sample["doc_id"])] = record
        items[task] = per_filter
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


# --------------------------------------------------------------------------- comparison


def _doc_sort_key(doc_id: str) -> tuple[int, Any]:
    return (0, int(doc_id)) if doc_id.lstrip("-").isdigit() else (1, doc_id)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) or (math.isinf(a) and a == b)


def _compare(
    base: dict[str, Any], rys: dict[str, Any], *, n_resamples: int, seed: int
) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """Rows, paired per-item data and notes from two normalised runs."""
    rows: list[dict[str, Any]] = []
    paired_items: dict[str, Any] = {}
    notes: list[str] = []
    groups = base.get("groups") or {}
    members = {m for subtasks in groups.values() for m in subtasks}
    for task in _ordered_names(base["results"], groups):
        base_entry = base["results"][task]
        rys_entry = rys["results"].get(task)
        if rys_entry is None:
            notes.append(f"{task}: missing from the RYS results")
            continue
        is_group = task in groups or task not in base.get("items", {})
        for key, raw in base_entry.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            base_value, rys_value = _scalar(raw), _scalar(rys_entry.get(key))
            if base_value is None and rys_value is None:
                continue
            info = (base.get("metric_info", {}).get(task) or {}).get(metric) or {}
            row: dict[str, Any] = {
                "task": task,
                "metric": metric,
                "filter": filt,
                "base": base_value,
                "rys": rys_value,
                "delta": None if base_value is None or rys_value is None else rys_value - base_value,
                "base_stderr": _scalar(base_entry.get(f"{metric}_stderr,{filt}")),
                "rys_stderr": _scalar(rys_entry.get(f"{metric}_stderr,{filt}")),
                "test": None,
                "p_value": None,
                "n": None,
                "higher_is_better": info.get("higher_is_better"),
                "is_group": is_group,
                "in_group": task in members,
            }
            if is_group:
                row["note"] = "group aggregate: no per-item paired test (see its member tasks)"
            else:
                _paired_test(row, task, metric, filt, base, rys, info, paired_items, notes, n_resamples, seed)
            rows.append(row)
    return rows, paired_items, notes


def _ordered_names(results: Mapping[str, Any], groups: Mapping[str, Sequence[str]]) -> list[str]:
    """Result names with every group directly followed by its members (lm-eval lists groups last)."""
    members = {m for subtasks in groups.values() for m in subtasks}
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in ordered or name not in results:
            return
        ordered.append(name)
        for member in groups.get(name, ()):
            visit(member)

    for name in results:
        if name not in members:
            visit(name)
    for name in results:  # members of groups that are not in the results themselves
        visit(name)
    return ordered


def _paired_test(
    row: dict[str, Any],
    task: str,
    metric: str,
    filt: str,
    base: dict[str, Any],
    rys: dict[str, Any],
    info: dict[str, Any],
    paired_items: dict[str, Any],
    notes: list[str],
    n_resamples: int,
    seed: int,
) -> None:
    """Fill ``row`` with the paired test of one metric (or a note saying why there is none)."""
    base_items = (base["items"].get(task) or {}).get(filt) or {}
    rys_items = (rys["items"].get(task) or {}).get(filt) or {}
    common = sorted(set(base_items) & set(rys_items), key=_doc_sort_key)
    label = f"{task} {metric}" + ("" if filt == "none" else f",{filt}")
    if len(common) != len(base_items) or len(common) != len(rys_items):
        notes.append(
            f"{label}: {len(base_items)} base items and {len(rys_items)} RYS items; the test uses the"
            f" {len(common)} with the same doc_id"
        )
    mismatched = [d for d in common if base_items[d].get("doc_hash") != rys_items[d].get("doc_hash")]
    if mismatched:
        row["note"] = f"{len(mismatched)} items differ between the runs (doc_hash); no paired test"
        notes.append(f"{label}: {row['note']}")
        return
    if not common:
        row["note"] = "no per-item results to pair"
        notes.append(f"{label}: {row['note']}")
        return
    base_values = [base_items[d]["values"].get(metric) for d in common]
    rys_values = [rys_items[d]["values"].get(metric) for d in common]
    if any(v is None for v in base_values + rys_values):
        row["note"] = "corpus-level metric (per-item values are not numbers): no paired test"
        notes.append(f"{label}: {row['note']}")
        return
    if not all(math.isfinite(v) for v in base_values + rys_values):
        row["note"] = "non-finite per-item values: no paired test"
        notes.append(f"{label}: {row['note']}")
        return
    aggregation = info.get("aggregation")
    statistic = _STATISTICS.get(aggregation or "mean")
    if statistic is None:
        row["note"] = f"aggregation '{aggregation}' is not resampled by rys-forge: no paired test"
        notes.append(f"{label}: {row['note']}")
        return
    full = len(common) == len(base_items) == len(rys_items)
    with np.errstate(over="ignore"):
        reproduced = [
            float(statistic(np.asarray(values, dtype=np.float64))) for values in (base_values, rys_values)
        ]
    if full and not (
        row["base"] is not None
        and row["rys"] is not None
        and _close(reproduced[0], row["base"])
        and _close(reproduced[1], row["rys"])
    ):
        row["note"] = (
            f"per-item values do not reproduce the aggregate (aggregation '{aggregation or 'unknown'}'):"
            " no paired test"
        )
        notes.append(f"{label}: {row['note']}")
        return
    paired = paired_items.setdefault(task, {}).setdefault(filt, {"doc_ids": [_doc_id(d) for d in common]})
    paired[metric] = {"base": base_values, "rys": rys_values}
    row["n"] = len(common)
    if (aggregation or "mean") in _MEAN_AGGREGATIONS and stats.is_binary(base_values) and stats.is_binary(rys_values):
        result = stats.mcnemar_from_pairs(base_values, rys_values)
        row.update(test="mcnemar_exact", p_value=result["p_value"], b=result["b"], c=result["c"])
    else:
        result = stats.paired_bootstrap(base_values, rys_values, n_resamples=n_resamples, seed=seed, statistic=statistic)
        row.update(
            test="paired_bootstrap",
            p_value=result["p_value"],
            ci_low=result["ci_low"],
            ci_high=result["ci_high"],
            statistic=aggregation or "mean",
        )


def _doc_id(doc_id: str) -> int | str:
    return int(doc_id) if doc_id.lstrip("-").isdigit() else doc_id


# --------------------------------------------------------------------------- entry point


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[rys-forge eval] {message}", file=sys.stderr, flush=True)


def _check_batch_size(batch_size: int | str) -> int | str:
    if isinstance(batch_size, bool):
        raise UsageError(f"bad batch size {batch_size!r}; use a positive integer, 'auto' or 'auto:N'")
    if isinstance(batch_size, int):
        value: int | str = batch_size
    else:
        text = str(batch_size).strip()
        value = int(text) if text.isdigit() else text
    if isinstance(value, int):
        if value < 1:
            raise UsageError(f"bad batch size {batch_size!r}; use a positive integer, 'auto' or 'auto:N'")
        return value
    if value == "auto" or (value.startswith("auto:") and value[5:].replace(".", "", 1).isdigit()):
        return value
    raise UsageError(f"bad batch size {batch_size!r}; use a positive integer, 'auto' or 'auto:N'")


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def _read_target_config(target: str) -> tuple[str, dict[str, Any]]:
    """Resolve an export target and read its config (a local folder's config.json, else the hub config).

    Raises:
        ModelLoadError: the target does not exist or its config cannot be read.
    """
    folder, _info = resolve_source(target)
    config_file = Path(folder) / "config.json"
    if config_file.is_file():
        try:
            return folder, json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not read {config_file}: {first_line(exc)}") from None
    try:
        from transformers import AutoConfig

        return folder, AutoConfig.from_pretrained(folder, trust_remote_code=True).to_dict()
    except Exception as exc:
        raise ModelLoadError(f"could not read the config of '{target}': {first_line(exc)}") from None


def _num_layers(model: Any) -> int:
    from rys_forge.architectures import get_path, spec_for_model

    return len(get_path(model, spec_for_model(model).layers_path))


def _free(model_holder: list[Any]) -> None:
    model_holder.clear()
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass


def evaluate(
    target: str | None = None,
    *,
    model: str | None = None,
    windows: Sequence[str] = (),
    repeats: int = 2,
    base: str | None = None,
    tasks: Sequence[str],
    limit: int | None = None,
    num_fewshot: int | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    batch_size: int | str = 1,
    device: str = "cpu",
    dtype: str = "float32",
    out: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    bootstrap_iters: int = 1000,
    n_resamples: int = 10000,
    attn_implementation: str | None = "eager",
    use_cache: bool = True,
    adapter: str | None = None,
    heal: bool = True,
) -> EvalReport:
    """Evaluate a RYS variant and its base with lm-eval and compare them item by item.

    Args:
        target: a rys-forge export (local folder or hub id). Its base is ``base`` or the export's recorded
            ``rys.base_model``. Mutually exclusive with ``model``.
        model: a model (built-in name, folder, ``.gguf`` file or hub id) whose in-memory repeat over
            ``windows`` is evaluated against the model itself (one load).
        windows: with ``model``: windows ``i:j`` (0-based, half-open: layers i..j-1).
        repeats: with ``model``: visits of each window's block (2 = RYS).
        base: with ``target``: the base model (overrides the export's record).
        tasks: lm-eval task, group or tag names (comma-separated entries allowed): the offline ``rys_*``
            tasks or anything in lm-eval's registry / ``include_path``.
        limit: items per task (None: all); the same items for both models.
        num_fewshot: few-shot examples (None: each task's default).
        include_path: extra folder(s) of lm-eval task YAMLs.
        batch_size: lm-eval batch size (an int, ``auto`` or ``auto:N``).
        device: ``cpu``, ``cuda[:N]``, ``mps`` or ``auto``.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        out: folder (or ``.json`` file) for ``eval.json``; a local export folder gets one too.
        seed: lm-eval's seeds are ``(seed, seed + 1234, seed + 1234, seed + 1234)`` for python, numpy, torch
            and few-shot sampling (seed 0 = lm-eval's own defaults); also the bootstrap seed.
        progress: print stage messages and lm-eval's progress bars (stderr).
        bootstrap_iters: lm-eval's bootstrap iterations for the stderr of non-mean metrics (perplexity).
        n_resamples: resamples of rys-forge's paired bootstrap test.
        attn_implementation: transformers attention backend for loading (``eager``: exact; ``sdpa``: faster).
        use_cache: reuse (and store) cached base results.
        adapter: with ``model``: a PEFT adapter merged into the model before both runs.
        heal: with a healed ``target`` (``DIR/heal``): evaluate it before and after healing (False: ignore
            the heal adapter and evaluate the plain export).

    Returns:
        The report (also saved as ``eval.json`` where described above).

    Raises:
        UsageError: inconsistent arguments (both or neither of target/model, no windows, unknown base, ...).
        WindowError: a window does not fit the model, or the export's plan does not fit the base.
        TaskError: an unknown task, a missing local data file, task data that cannot be loaded.
        ModelLoadError: a model cannot be found or loaded.
        EvaluationError: lm-eval failed while running a model.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    windows = [windows] if isinstance(windows, str) else list(windows)
    if (target is None) == (model is None):
        raise UsageError("give either an exported folder TARGET or --model M with --window i:j (not both)")
    if model is not None and not windows:
        raise UsageError("--model needs at least one --window i:j (0-based, half-open: layers i..j-1)")
    if target is not None and windows:
        raise UsageError("--window applies to --model only; an export's plan is stored in its config")
    if model is not None and base is not None:
        raise UsageError("--base applies to an exported TARGET; with --model the base is the model itself")
    if target is not None and adapter is not None:
        raise UsageError("--adapter applies to --model; an export records the adapter its base was built with")
    if limit is not None and not _is_count(limit, 1):
        raise UsageError(f"--limit must be a positive integer (items per task), got {limit!r}")
    if num_fewshot is not None and not _is_count(num_fewshot, 0):
        raise UsageError(f"--num-fewshot must be a non-negative integer, got {num_fewshot!r}")
    if bootstrap_iters < 0 or n_resamples < 1:
        raise UsageError("bootstrap_iters must be >= 0 and n_resamples >= 1")
    batch_size = _check_batch_size(batch_size)
    torch_dtype = parse_dtype(dtype)
    dtype_name = str(torch_dtype).replace("torch.", "")
    torch_device = parse_device(device)

    # Tasks first: a typo fails in a second, before any model is loaded. lm-eval's built-in registry is
    # indexed (several seconds) only when a name is not a local / include-path task.
    t0 = time.perf_counter()
    manager = task_manager(include_path, include_defaults=False)
    try:
        names = resolve_tasks(tasks, manager)
    except TaskError:
        requested = [part.strip() for item in tasks for part in str(item).split(",") if part.strip()]
        known = set(manager.all_tasks)
        if all(name in known for name in requested):
            raise  # a known name with a problem (missing data file): lm-eval's registry will not help
        manager = task_manager(include_path, include_defaults=True)
        names = resolve_tasks(tasks, manager)
    timings["tasks"] = time.perf_counter() - t0

    plan: LayerPlan | None = None
    export_info: dict[str, Any] = {}
    target_folder: str | None = None
    adapter_rec: dict[str, Any] | None = None
    heal_dir: Path | None = None
    if target is not None:
        target_folder, config = _read_target_config(target)
        block = config.get("rys") if isinstance(config.get("rys"), dict) else None
        if block is None:
            config_text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
            block = config_text.get("rys") if isinstance(config_text.get("rys"), dict) else None
        if block is not None:
            export_info = {k: v for k, v in block.items() if k != "plan"}
            if isinstance(block.get("plan"), dict):
                plan = LayerPlan.from_dict(block["plan"])
        recorded = (block or {}).get("base_model")
        base_source = base or recorded
        if not base_source:
            raise UsageError(
                f"no base model for {target}: its config records none (rys.base_model); pass --base M"
            )
        base_source = str(base_source)
        if base is None and not Path(base_source).expanduser().exists():
            beside = Path(target_folder) / base_source  # a relative path recorded relative to the export
            if not Path(base_source).is_absolute() and (beside / "config.json").is_file():
                base_source = str(beside)
        rys_label = target
        if isinstance((block or {}).get("adapter"), dict):
            from rys_forge.adapters import check_adapter

            adapter_rec = block["adapter"]
            check_adapter(adapter_rec)
        if heal and Path(target_folder).is_dir():
            from rys_forge.heal import heal_adapter_dir

            heal_dir = heal_adapter_dir(target_folder)
    else:
        base_source = str(model)
        rys_label = f"{model} with {', '.join(str(w) for w in windows)} x{repeats} (in memory)"
        if adapter is not None:
            from rys_forge.adapters import adapter_record

            adapter_rec = adapter_record(adapter)

    key = base_cache_key(
        base_source,
        names,
        manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        dtype=dtype_name,
        device_type=torch_device.type,
        batch_size=batch_size,
        seed=seed,
        bootstrap_iters=bootstrap_iters,
        attn_implementation=attn_implementation,
        adapter=_adapter_identity(adapter_rec),
    )
    cache_file = _cache_path(key)
    base_run = _read_cache(cache_file, key) if use_cache else None
    reused = base_run is not None
    run_kwargs = dict(
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        seed=seed,
        bootstrap_iters=bootstrap_iters,
        progress=progress,
    )
    holder: list[Any] = []

    def load(source: str, trust: bool, adapter_path: str | None = None) -> Any:
        return load_model(
            source, dtype=torch_dtype, device=torch_device, trust_remote_code=trust,
            attn_implementation=attn_implementation, adapter=adapter_path,
        )

    base_adapter_path = adapter_rec["path"] if adapter_rec else None
    unhealed_run: dict[str, Any] | None = None

    if model is not None:
        _say(progress, f"loading {model}")
        t0 = time.perf_counter()
        loaded = load(str(model), False, base_adapter_path)
        holder.append(loaded)
        timings["base_load"] = time.perf_counter() - t0
        plan = LayerPlan.from_windows(list(windows), _num_layers(loaded.model), repeats)
        if base_run is None:
            _say(progress, f"evaluating the base model on {', '.join(names)}")
            t0 = time.perf_counter()
            base_run = _run_lm_eval(loaded.model, loaded.tokenizer, manager, names, **run_kwargs)
            base_run["num_layers"] = plan.num_layers
            timings["base_eval"] = time.perf_counter() - t0
            if use_cache:
                _write_cache(cache_file, key, base_run)
        else:
            _say(progress, "base results reused from the cache")
        from rys_forge.repeat import repeated

        _say(progress, f"evaluating the repeat {plan.describe()}")
        t0 = time.perf_counter()
        with repeated(loaded.model, plan):
            rys_run = _run_lm_eval(loaded.model, loaded.tokenizer, manager, names, **run_kwargs)
        timings["rys_eval"] = time.perf_counter() - t0
        del loaded
        _free(holder)
    else:
        if base_run is None:
            _say(progress, f"loading the base model {base_source}")
            t0 = time.perf_counter()
            holder.append(load(base_source, False, base_adapter_path))
            timings["base_load"] = time.perf_counter() - t0
            base_layers = _num_layers(holder[0].model)
            if plan is not None and plan.num_layers != base_layers:
                raise UsageError(
                    f"{target} was built from a {plan.num_layers}-layer model, but base {base_source} has"
                    f" {base_layers} layers; pass the right --base"
                )
            _say(progress, f"evaluating the base model on {', '.join(names)}")
            t0 = time.perf_counter()
            base_run = _run_lm_eval(holder[0].model, holder[0].tokenizer, manager, names, **run_kwargs)
            base_run["num_layers"] = base_layers
            timings["base_eval"] = time.perf_counter() - t0
            _free(holder)
            if use_cache:
                _write_cache(cache_file, key, base_run)
        else:
            _say(progress, "base results reused from the cache")
            cached_layers = base_run.get("num_layers")
            if plan is not None and cached_layers is not None and plan.num_layers != cached_layers:
                raise UsageError(
                    f"{target} was built from a {plan.num_layers}-layer model, but base {base_source} has"
                    f" {cached_layers} layers; pass the right --base"
                )
        _say(progress, f"loading {target}")
        t0 = time.perf_counter()
        holder.append(load(str(target), True))
        timings["rys_load"] = time.perf_counter() - t0
        _say(progress, f"evaluating {target}{' before healing' if heal_dir else ''} on {', '.join(names)}")
        t0 = time.perf_counter()
        rys_run = _run_lm_eval(holder[0].model, holder[0].tokenizer, manager, names, **run_kwargs)
        timings["rys_eval"] = time.perf_counter() - t0
        if heal_dir is not None:
            unhealed_run = rys_run
            _say(progress, f"evaluating {target} after healing (adapters in {heal_dir.name}/)")
            t0 = time.perf_counter()
            healed = _with_heal_adapter(holder[0].model, heal_dir)
            rys_run = _run_lm_eval(healed, holder[0].tokenizer, manager, names, **run_kwargs)
            timings["healed_eval"] = time.perf_counter() - t0
            del healed
        _free(holder)

    rows, paired_items, notes = _compare(base_run, rys_run, n_resamples=n_resamples, seed=seed)
    if not rows:
        raise EvaluationError(f"lm-eval produced no metrics for {', '.join(names)}")
    healing_rows: list[dict[str, Any]] = []
    if unhealed_run is not None:
        raw_rows, _, heal_notes = _compare(unhealed_run, rys_run, n_resamples=n_resamples, seed=seed)
        healing_rows = [_healing_row(row) for row in raw_rows]
        notes.extend(f"healing: {note}" for note in heal_notes)
    n_shot = rys_run.get("n_shot") or {}
    settings: dict[str, Any] = {
        "mode": "export" if target is not None else "in_memory",
        "base": base_source,
        "rys": rys_label,
        "target": target,
        "model": model,
        "plan": plan.to_dict() if plan is not None else None,
        "plan_description": plan.describe() if plan is not None else None,
        "export": export_info or None,
        "adapter": adapter_rec,
        "heal": _heal_settings(heal_dir) if heal_dir is not None else None,
        "tasks_requested": [str(t) for t in tasks],
        "tasks": list(names),
        "limit": limit,
        "num_fewshot": num_fewshot,
        "n_shot": n_shot,
        "num_fewshot_effective": _fewshot_text(n_shot, num_fewshot),
        "n_samples": rys_run.get("n_samples"),
        "task_versions": rys_run.get("versions"),
        "include_path": [str(p) for p in include_path] if isinstance(include_path, (list, tuple)) else include_path,
        "batch_size": batch_size,
        "device": str(torch_device),
        "dtype": dtype_name,
        "attn_implementation": attn_implementation,
        "seed": seed,
        "lm_eval_seeds": {"random": seed, "numpy": seed + 1234, "torch": seed + 1234, "fewshot": seed + 1234},
        "bootstrap_iters": bootstrap_iters,
        "paired_bootstrap_resamples": n_resamples,
        "tests": {
            "binary": "exact McNemar on discordant items (two-sided)",
            "other": "paired bootstrap of the task aggregation; two-sided p from the centred bootstrap distribution",
        },
        "versions": {
            "rys_forge": _rys_forge_version(),
            "lm_eval": _lm_eval_version(),
            "transformers": _package_version("transformers"),
            "torch": _package_version("torch"),
        },
        "base_cache": {"enabled": use_cache, "reused": reused, "key": _sha(key), "path": str(cache_file)},
    }
    timings["total"] = time.perf_counter() - started
    report = EvalReport(
        rows=rows,
        settings=json_safe(settings),
        timings={k: round(v, 3) for k, v in timings.items()},
        notes=notes,
        items=json_safe(paired_items),
        healing_rows=json_safe(healing_rows),
    )
    destinations: list[Path] = []
    if out is not None:
        destinations.append(_report_path(out))
    if target_folder is not None and Path(target_folder).is_dir() and not _is_builtin_cache(target, target_folder):
        destinations.append(Path(target_folder) / EVAL_FILE)
    destinations = list(dict.fromkeys(p.resolve() for p in destinations))
    if destinations:
        text = report._json_text()
        _atomic_write_texts({path: text for path in destinations})
        report.saved_to.extend(str(p) for p in destinations)
        _say(progress, "wrote " + ", ".join(report.saved_to))
    return report


def _adapter_identity(record: dict[str, Any] | None) -> dict[str, Any] | None:
    from rys_forge.adapters import identity

    return identity(record)


def _with_heal_adapter(model: Any, heal_dir: Path) -> Any:
    """The loaded export with its per-visit LoRA adapters (peft injects them into the model's own modules,
    so the returned transformers model runs them; lm-eval's HFLM takes it as is)."""
    from rys_forge.adapters import adapter_record, apply_adapter

    return apply_adapter(model, adapter_record(heal_dir)).get_base_model().eval()


def _healing_row(row: dict[str, Any]) -> dict[str, Any]:
    names = {"base": "unhealed", "rys": "healed", "base_stderr": "unhealed_stderr", "rys_stderr": "healed_stderr"}
    return {names.get(key, key): value for key, value in row.items()}


def _heal_settings(heal_dir: Path) -> dict[str, Any]:
    """What heal.json says about the adapters (settings, data, visits, loss before/after), without the curve."""
    from rys_forge.heal import HEAL_FILE

    try:
        record = json.loads((heal_dir / HEAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"adapter": heal_dir.name}
    loss = {k: v for k, v in (record.get("loss") or {}).items() if k != "curve"}
    return {"adapter": heal_dir.name, "settings": record.get("settings"), "data": record.get("data"),
            "visits": (record.get("adapter") or {}).get("visits"), "loss": loss}


def _is_builtin_cache(target: str, folder: str) -> bool:
    """Whether the target resolved to another folder than the one named (a built-in or a converted GGUF
    in rys-forge's cache): that is not an export folder the user owns, so no eval.json is written there."""
    return Path(target).expanduser().resolve() != Path(folder).resolve()


def _fewshot_text(n_shot: Mapping[str, Any], requested: int | None) -> str:
    values = sorted({v for v in n_shot.values() if isinstance(v, int)})
    if len(values) == 1:
        return f"{values[0]}-shot"
    if values:
        return "few-shot per task: " + ", ".join(f"{k}={v}" for k, v in n_shot.items())
    return f"{requested}-shot" if requested is not None else "task-default few-shot"


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None
