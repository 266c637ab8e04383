"""`eval`: evaluate a RYS variant against its base model with lm-evaluation-harness, with paired significance.

Two ways to name the RYS model:

* an exported folder (``evaluate("out/my-rys", tasks=[...])``): a rys-forge export whose ``config.json``
  carries an ``rys`` block (plan, format, base model). It is loaded with ``trust_remote_code=True`` (the
  layer-list format ships its own modelling code); the base is ``base=`` or the export's recorded
  ``rys.base_model``;
* the in-memory repeat (``evaluate(model="gemma-3-270m", windows=["6:10"], tasks=[...])``): the model is
  loaded once, evaluated as is, then evaluated again under :func:`rys_forge.repeat.repeated` (the same
  object; no second load, no extra weights).

Both runs use the same lm-eval settings (tasks, limit, few-shot count, seeds, batch size, device, dtype):
one :func:`~rys_forge.evaluate.runner.run_lm_eval` each, compared item by item by
:func:`~rys_forge.evaluate.compare.compare_runs` (McNemar for 0/1 items, else a paired bootstrap). Base
results are cached (:mod:`rys_forge.evaluate.cache`): evaluating several variants of one base runs the base
once.

Adapters: ``adapter=`` (with ``model``) merges a PEFT adapter into the model before both runs (its identity is
part of the base-cache key); an export built with ``--adapter`` has its base loaded with the recorded adapter.
A healed export (``DIR/heal``, see :mod:`rys_forge.heal`) is evaluated before and after healing: the export
without and with its per-visit LoRA adapters (one load); the main rows compare base and healed, and
``healing_rows`` compare unhealed and healed with the same paired tests.

``eval.json`` (:mod:`rys_forge.evaluate.report`) is written atomically into ``out`` and, for a local export
folder, into the folder; nothing is written when anything fails, and where it goes is checked for
writability before any model is loaded. Local models are recorded by absolute path
(:func:`rys_forge.models.canonical_source`).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rys_forge.artifacts import EVAL_FILE, heal_summary, versions
from rys_forge.errors import EvaluationError, UsageError, output_problem
from rys_forge.evaluate.cache import base_cache_key, cache_path, key_digest, read_cache, write_cache
from rys_forge.evaluate.compare import compare_runs
from rys_forge.evaluate.report import (
    EvalReport,
    check_writable,
    format_table,
    is_eval_report,
    report_path,
    write_texts_atomically,
)
from rys_forge.evaluate.runner import (
    check_batch_size,
    check_counts,
    resolve_task_names,
    run_lm_eval,
    say,
)
from rys_forge.evaluate.subject import Subject, export_subject, in_memory_subject, load_export
from rys_forge.files import json_safe
from rys_forge.models import canonical_source, load_model, parse_device, parse_dtype
from rys_forge.plan import LayerPlan, resolve_damping

# format_table is re-exported for callers that import it from here (cli.py, tests/test_peft.py).
__all__ = ["evaluate", "format_table"]


@dataclass
class _Options:
    """The arguments of :func:`evaluate` (see there), normalised by :meth:`check`."""

    target: str | None
    model: str | None
    windows: list[str]
    repeats: int
    alpha: float | None
    substeps: int | None
    base: str | None
    tasks: list[str]
    limit: int | None
    num_fewshot: int | None
    include_path: Any
    batch_size: int | str
    device: str
    dtype: str
    out: str | Path | None
    seed: int
    progress: bool
    bootstrap_iters: int
    n_resamples: int
    attn_implementation: str | None
    use_cache: bool
    adapter: str | None
    heal: bool
    torch_dtype: Any = None
    torch_device: Any = None

    def check(self) -> None:
        """Raise :class:`UsageError` on inconsistent arguments; parse batch size, dtype and device."""
        if (self.target is None) == (self.model is None):
            raise UsageError("give either an exported folder TARGET or --model M with --window i:j (not both)")
        if self.model is not None and not self.windows:
            raise UsageError("--model needs at least one --window i:j (0-based, half-open: layers i..j-1)")
        if self.target is not None and self.windows:
            raise UsageError("--window applies to --model only; an export's plan is stored in its config")
        if self.model is not None and self.base is not None:
            raise UsageError("--base applies to an exported TARGET; with --model the base is the model itself")
        if self.target is not None and (self.alpha is not None or self.substeps is not None):
            raise UsageError("--alpha and --substeps apply to --model; an export's residual scales are stored in its config")
        if self.model is not None:  # from here on a float (1.0: plain) for the in-memory repeat
            self.repeats, self.alpha = resolve_damping(self.repeats, self.alpha, self.substeps)
        if self.target is not None and self.adapter is not None:
            raise UsageError("--adapter applies to --model; an export records the adapter its base was built with")
        check_counts(self.limit, self.num_fewshot)
        if self.bootstrap_iters < 0 or self.n_resamples < 1:
            raise UsageError("bootstrap_iters must be >= 0 and n_resamples >= 1")
        self.batch_size = check_batch_size(self.batch_size)
        self.torch_dtype = parse_dtype(self.dtype)
        self.torch_device = parse_device(self.device)
        # Local models by absolute path: eval.json and the base cache name them from any working folder.
        self.target, self.model, self.base = (
            canonical_source(s) if s is not None else None for s in (self.target, self.model, self.base))

    @property
    def dtype_name(self) -> str:
        return str(self.torch_dtype).replace("torch.", "")

    @property
    def run_kwargs(self) -> dict[str, Any]:
        """The lm-eval settings of both runs (keyword arguments of :func:`run_lm_eval`)."""
        return dict(limit=self.limit, num_fewshot=self.num_fewshot, batch_size=self.batch_size, seed=self.seed,
                    bootstrap_iters=self.bootstrap_iters, progress=self.progress)


@dataclass
class _BaseCache:
    """The base-results cache entry of this evaluation (read and written only when ``enabled``)."""

    key: dict[str, Any]
    path: Path
    enabled: bool

    def read(self) -> dict[str, Any] | None:
        return read_cache(self.path, self.key) if self.enabled else None

    def write(self, run: dict[str, Any]) -> None:
        if self.enabled:
            write_cache(self.path, self.key, run)


@dataclass
class _Runs:
    """Normalised runs: base, RYS (healed, for a healed export) and, for a healed export, unhealed."""

    base: dict[str, Any]
    rys: dict[str, Any]
    unhealed: dict[str, Any] | None = None


def _base_cache(options: _Options, subject: Subject, manager: Any, names: list[str]) -> _BaseCache:
    """The cache entry of the base's results under these settings (a merged adapter's identity included)."""
    from rys_forge.adapters import identity

    key = base_cache_key(
        subject.base_source, names, manager=manager, limit=options.limit, num_fewshot=options.num_fewshot,
        dtype=options.dtype_name, device_type=options.torch_device.type, batch_size=options.batch_size,
        seed=options.seed, bootstrap_iters=options.bootstrap_iters,
        attn_implementation=options.attn_implementation, adapter=identity(subject.adapter),
    )
    return _BaseCache(key=key, path=cache_path(key), enabled=options.use_cache)


# --------------------------------------------------------------------------- the runs


def _load(options: _Options, source: str, trust: bool, adapter: dict[str, Any] | None = None) -> Any:
    return load_model(
        source, dtype=options.torch_dtype, device=options.torch_device, trust_remote_code=trust,
        attn_implementation=options.attn_implementation, adapter=adapter["path"] if adapter else None,
    )


def _num_layers(model: Any) -> int:
    from rys_forge.architectures import get_path, spec_for_model

    return len(get_path(model, spec_for_model(model).layers_path))


def _release_memory() -> None:
    """Collect the dropped model now (and return cached CUDA blocks) before the next load."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass


def _check_depth(target: str | None, plan: LayerPlan | None, base_source: str, layers: int | None) -> None:
    if plan is not None and layers is not None and plan.num_layers != layers:
        raise UsageError(
            f"{target} was built from a {plan.num_layers}-layer model, but base {base_source} has"
            f" {layers} layers; pass the right --base"
        )


def _timed_run(timings: dict[str, float], stage: str, model: Any, tokenizer: Any, manager: Any,
               names: list[str], options: _Options) -> dict[str, Any]:
    """One lm-eval run, its seconds stored as ``timings[stage]``."""
    t0 = time.perf_counter()
    run = run_lm_eval(model, tokenizer, manager, names, **options.run_kwargs)
    timings[stage] = time.perf_counter() - t0
    return run


def _run_in_memory(options: _Options, subject: Subject, manager: Any, names: list[str],
                   base_run: dict[str, Any] | None, cache: _BaseCache, timings: dict[str, float]) -> _Runs:
    """Load the model once; evaluate it as is (unless cached), then under its repeat plan."""
    from rys_forge.repeat import repeated

    say(options.progress, f"loading {options.model}")
    t0 = time.perf_counter()
    loaded = _load(options, str(options.model), False, subject.adapter)
    timings["base_load"] = time.perf_counter() - t0
    plan = subject.plan = LayerPlan.from_windows(list(options.windows), _num_layers(loaded.model), options.repeats,
                                                 options.alpha)
    if base_run is None:
        say(options.progress, f"evaluating the base model on {', '.join(names)}")
        base_run = _timed_run(timings, "base_eval", loaded.model, loaded.tokenizer, manager, names, options)
        base_run["num_layers"] = plan.num_layers
        cache.write(base_run)
    else:
        say(options.progress, "base results reused from the cache")
    say(options.progress, f"evaluating the repeat {plan.describe()}")
    with repeated(loaded.model, plan):
        rys_run = _timed_run(timings, "rys_eval", loaded.model, loaded.tokenizer, manager, names, options)
    del loaded
    _release_memory()
    return _Runs(base=base_run, rys=rys_run)


def _run_base(options: _Options, subject: Subject, manager: Any, names: list[str], cache: _BaseCache,
              timings: dict[str, float]) -> dict[str, Any]:
    """Load and evaluate an export's base model (its depth checked against the export's plan)."""
    say(options.progress, f"loading the base model {subject.base_source}")
    t0 = time.perf_counter()
    loaded = _load(options, subject.base_source, False, subject.adapter)
    timings["base_load"] = time.perf_counter() - t0
    base_layers = _num_layers(loaded.model)
    _check_depth(options.target, subject.plan, subject.base_source, base_layers)
    say(options.progress, f"evaluating the base model on {', '.join(names)}")
    base_run = _timed_run(timings, "base_eval", loaded.model, loaded.tokenizer, manager, names, options)
    base_run["num_layers"] = base_layers
    del loaded
    _release_memory()
    cache.write(base_run)
    return base_run


def _run_export(options: _Options, subject: Subject, manager: Any, names: list[str],
                base_run: dict[str, Any] | None, cache: _BaseCache, timings: dict[str, float]) -> _Runs:
    """Evaluate the base (unless cached), then the export, and a healed export after healing as well."""
    if base_run is None:
        base_run = _run_base(options, subject, manager, names, cache, timings)
    else:
        say(options.progress, "base results reused from the cache")
        _check_depth(options.target, subject.plan, subject.base_source, base_run.get("num_layers"))
    target, heal_dir = options.target, subject.heal_dir
    say(options.progress, f"loading {target}")
    t0 = time.perf_counter()
    loaded = load_export(subject.target_folder or str(target), subject.export_info.get("format"), options.torch_dtype,
                         options.torch_device, options.attn_implementation)
    timings["rys_load"] = time.perf_counter() - t0
    say(options.progress, f"evaluating {target}{' before healing' if heal_dir else ''} on {', '.join(names)}")
    runs = _Runs(base=base_run, rys=_timed_run(timings, "rys_eval", loaded.model, loaded.tokenizer, manager,
                                               names, options))
    if heal_dir is not None:
        runs.unhealed = runs.rys
        say(options.progress, f"evaluating {target} after healing (adapters in {heal_dir.name}/)")
        healed = _with_heal_adapter(loaded.model, heal_dir)
        runs.rys = _timed_run(timings, "healed_eval", healed, loaded.tokenizer, manager, names, options)
        del healed
    del loaded
    _release_memory()
    return runs


# --------------------------------------------------------------------------- heal glue


def _with_heal_adapter(model: Any, heal_dir: Path) -> Any:
    """The loaded export with its per-visit LoRA adapters (peft injects them into the model's own modules,
    so the returned transformers model runs them; lm-eval's HFLM takes it as is)."""
    from rys_forge.adapters import adapter_record, apply_adapter

    return apply_adapter(model, adapter_record(heal_dir)).get_base_model().eval()


def _healing_row(row: dict[str, Any]) -> dict[str, Any]:
    names = {"base": "unhealed", "rys": "healed", "base_stderr": "unhealed_stderr", "rys_stderr": "healed_stderr"}
    return {names.get(key, key): value for key, value in row.items()}


# --------------------------------------------------------------------------- the report


def _compare(
    runs: _Runs, options: _Options, names: list[str]
) -> tuple[list[dict[str, Any]], dict[str, Any], list[str], list[dict[str, Any]]]:
    """Rows, paired items and notes of base vs RYS, and the healing rows (unhealed vs healed)."""
    rows, paired_items, notes = compare_runs(runs.base, runs.rys, n_resamples=options.n_resamples, seed=options.seed)
    if not rows:
        raise EvaluationError(f"lm-eval produced no metrics for {', '.join(names)}")
    healing_rows: list[dict[str, Any]] = []
    if runs.unhealed is not None:
        raw_rows, _, heal_notes = compare_runs(runs.unhealed, runs.rys, n_resamples=options.n_resamples,
                                               seed=options.seed)
        healing_rows = [_healing_row(row) for row in raw_rows]
        notes.extend(f"healing: {note}" for note in heal_notes)
    return rows, paired_items, notes, healing_rows


def _fewshot_text(n_shot: dict[str, Any], requested: int | None) -> str:
    values = sorted({v for v in n_shot.values() if isinstance(v, int)})
    if len(values) == 1:
        return f"{values[0]}-shot"
    if values:
        return "few-shot per task: " + ", ".join(f"{k}={v}" for k, v in n_shot.items())
    return f"{requested}-shot" if requested is not None else "task-default few-shot"


def _settings(options: _Options, subject: Subject, names: list[str], rys_run: dict[str, Any],
              cache: _BaseCache, reused: bool) -> dict[str, Any]:
    """The report's ``settings``: what was evaluated and how."""
    plan, seed, include_path = subject.plan, options.seed, options.include_path
    n_shot = rys_run.get("n_shot") or {}
    return {
        "mode": "export" if options.target is not None else "in_memory",
        "base": subject.base_source,
        "rys": subject.rys_label,
        "target": options.target,
        "model": options.model,
        "plan": plan.to_dict() if plan is not None else None,
        "plan_description": plan.describe() if plan is not None else None,
        "export": subject.export_info or None,
        "adapter": subject.adapter,
        "heal": heal_summary(subject.heal_dir) if subject.heal_dir is not None else None,
        "tasks_requested": [str(t) for t in options.tasks],
        "tasks": list(names),
        "limit": options.limit,
        "num_fewshot": options.num_fewshot,
        "n_shot": n_shot,
        "num_fewshot_effective": _fewshot_text(n_shot, options.num_fewshot),
        "n_samples": rys_run.get("n_samples"),
        "task_versions": rys_run.get("versions"),
        "include_path": [str(p) for p in include_path] if isinstance(include_path, (list, tuple)) else include_path,
        "batch_size": options.batch_size,
        "device": str(options.torch_device),
        "dtype": options.dtype_name,
        "attn_implementation": options.attn_implementation,
        "seed": seed,
        "lm_eval_seeds": {"random": seed, "numpy": seed + 1234, "torch": seed + 1234, "fewshot": seed + 1234},
        "bootstrap_iters": options.bootstrap_iters,
        "paired_bootstrap_resamples": options.n_resamples,
        "tests": {
            "binary": "exact McNemar on discordant items (two-sided)",
            "other": "paired bootstrap of the task aggregation; two-sided p from the centred bootstrap distribution",
        },
        "versions": versions("lm_eval", "transformers", "torch"),
        "base_cache": {"enabled": cache.enabled, "reused": reused, "key": key_digest(cache.key), "path": str(cache.path)},
    }


def _is_builtin_cache(target: str, folder: str) -> bool:
    """Whether the target resolved to another folder than the one named (a built-in or a converted GGUF
    in rys-forge's cache): that is not an export folder the user owns, so no eval.json is written there."""
    return Path(target).expanduser().resolve() != Path(folder).resolve()


def _report_destinations(options: _Options, subject: Subject) -> list[Path]:
    """Where ``eval.json`` goes, checked before any work: ``out`` (must be writable) and a local export
    folder (skipped, with a stage message, when ``out`` is given and the folder is read-only; else it must be
    writable).

    Raises:
        OutputError: a destination cannot be written.
    """
    destinations: list[Path] = []
    if options.out is not None:
        destinations.append(report_path(options.out))
    folder = subject.target_folder
    if folder is not None and Path(folder).is_dir() and not _is_builtin_cache(str(options.target), folder):
        in_folder = Path(folder) / EVAL_FILE
        problem = output_problem(in_folder) if destinations else None
        if problem is None:
            destinations.append(in_folder)
        else:
            say(options.progress, f"not writing {in_folder} ({problem}); the report goes to {destinations[0]}")
    destinations = list(dict.fromkeys(p.expanduser().resolve() for p in destinations))
    check_writable(destinations)
    for path in destinations:
        if path.exists() and not is_eval_report(path):
            raise UsageError(f"{path} exists and is not an eval report rys-forge wrote; choose another --out or remove it")
    return destinations


def _write_report(report: EvalReport, options: _Options, destinations: list[Path]) -> None:
    """``eval.json`` into every destination (one atomic write for all)."""
    if destinations:
        text = report.to_json()
        write_texts_atomically({path: text for path in destinations})
        report.saved_to.extend(str(p) for p in destinations)
        say(options.progress, "wrote " + ", ".join(report.saved_to))


# --------------------------------------------------------------------------- entry point


def evaluate(
    target: str | None = None, *, model: str | None = None, windows: Sequence[str] = (), repeats: int = 2,
    alpha: float | None = None, substeps: int | None = None, base: str | None = None, tasks: Sequence[str], limit: int | None = None, num_fewshot: int | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None, batch_size: int | str = 1, device: str = "cpu",
    dtype: str = "float32", out: str | Path | None = None, seed: int = 0, progress: bool = True,
    bootstrap_iters: int = 1000, n_resamples: int = 10000, attn_implementation: str | None = "eager",
    use_cache: bool = True, adapter: str | None = None, heal: bool = True,
) -> EvalReport:
    """Evaluate a RYS variant and its base with lm-eval and compare them item by item.

    Args:
        target: a rys-forge export (local folder or hub id). Its base is ``base`` or the export's recorded
            ``rys.base_model``. Mutually exclusive with ``model``.
        model: a model (built-in name, folder, ``.gguf`` file or hub id) whose in-memory repeat over
            ``windows`` is evaluated against the model itself (one load).
        windows: with ``model``: windows ``i:j`` (0-based, half-open: layers i..j-1).
        repeats: with ``model``: visits of each window's block (2 = RYS).
        alpha, substeps: with ``model``: residual scale of the repeated visits (None or 1: plain RYS), or the
            second pass as ``substeps`` damped sub-steps at ``1/substeps``; as ``build``'s.
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
    as_list = lambda v: [v] if isinstance(v, str) else list(v)  # noqa: E731
    options = _Options(
        target=target, model=model, windows=as_list(windows), repeats=repeats, alpha=alpha, substeps=substeps,
        base=base, tasks=as_list(tasks), limit=limit, num_fewshot=num_fewshot, include_path=include_path,
        batch_size=batch_size, device=device, dtype=dtype, out=out, seed=seed, progress=progress,
        bootstrap_iters=bootstrap_iters, n_resamples=n_resamples, attn_implementation=attn_implementation,
        use_cache=use_cache, adapter=adapter, heal=heal,
    )
    options.check()
    t0 = time.perf_counter()  # tasks first: a typo fails in a second, before any model is loaded
    manager, names = resolve_task_names(options.tasks, include_path)
    timings = {"tasks": time.perf_counter() - t0}
    if target is not None:
        subject = export_subject(str(options.target), options.base, heal)
    else:
        subject = in_memory_subject(str(options.model), options.windows, options.repeats, adapter, options.alpha)
    subject.base_source = canonical_source(subject.base_source)
    destinations = _report_destinations(options, subject)  # an unwritable --out fails now, not at the end
    cache = _base_cache(options, subject, manager, names)
    cached_run = cache.read()
    run = _run_export if target is not None else _run_in_memory
    runs = run(options, subject, manager, names, cached_run, cache, timings)
    rows, paired_items, notes, healing_rows = _compare(runs, options, names)
    settings = _settings(options, subject, names, runs.rys, cache, reused=cached_run is not None)
    timings["total"] = time.perf_counter() - started
    report = EvalReport(rows=rows, settings=json_safe(settings), timings={k: round(v, 3) for k, v in timings.items()},
                        notes=notes, items=json_safe(paired_items), healing_rows=json_safe(healing_rows))
    _write_report(report, options, destinations)
    return report
