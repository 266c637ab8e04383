"""`rank`: one cached activation pass, every window probed, scored, classified, saved and plotted.

Run folder (`--out`, default `runs/rank-<model>-<time>`):

* `windows.jsonl`: one line per finished window, appended as it finishes (the resume log);
* `windows.csv`, `windows.json`: the final table, one row per window with every metric;
* `summary.json`: model, prompts, settings, score constants, which score ordered the windows, versions,
  timings, top-k, self-check, layer CKA matrix, family overlap;
* PNG heatmaps over i x j (score, KL, plateau CKA, delta_0, r_0), layer CKA, top-k repeat curves.

An interrupted run keeps every finished window; `--resume` continues it after checking that the
settings and the model (weights, dtype, attention, device type) are the same; a run that fails before
its first window leaves no folder, and one process at a time works in a folder
(`rys_forge.runs.RunFolder`). Inputs the score needs are checked first (`check_score_inputs`), and a
run in which no window got a finite score fails (`check_scored`). `rys_forge.rank.outputs` writes the files.
"""

from __future__ import annotations

import hashlib
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rys_forge.architectures import get_path, spec_for_model
from rys_forge.artifacts import RUN_FILE, read_json, versions
from rys_forge.runs import RunFolder
from rys_forge.distributed import current_shard
from rys_forge.errors import UsageError, WindowError
from rys_forge.plan import WINDOW_CONVENTION, Window, check_scale, select_windows
from rys_forge.progress import progress_bar
from rys_forge.rank import metrics
from rys_forge.rank.activations import ActivationCache, cache_activations
from rys_forge.rank.fast_linear import check_matmul_mode, fast_linears, matmul_precision, resolve_matmul
from rys_forge.rank.outputs import write_outputs
from rys_forge.rank.probes import (
    ProbeSettings, in_order, jacobian_spectrum, probe_window, repeat_curves, select_probes, torch_threads,
    window_workers,
)
from rys_forge.rank.prompts import Prompt
from rys_forge.rank.learned import LearnedScore, order_rows
from rys_forge.rank.score import ScoreConfig, check_score_inputs, check_scored, classify, score
from rys_forge.rank.shortlist import distinct_regions, family_overlap, shortlist

#: `--stats-dtype` choices: float64, float32, or float32 with TF32 tensor-core CKA products (CUDA).
STATS_DTYPES = ("float64", "float32", "tf32")


#: Smallest allowed value of each integer setting. Two tokens per prompt at least: the first is often a BOS
#: token (left out of every statistic), and a one-token context never exercises attention.
MINIMUMS = {
    "max_tokens": 2, "batch_size": 1, "kl_positions": 0, "mmd_samples": 2, "top_k": 1, "jacobian_top": 1,
    "jacobian_prompts": 1, "jacobian_tokens": 2, "jacobian_k": 1, "jacobian_iters": 1, "seed": 0,
}


@dataclass
class RankSettings:
    """Everything that determines a rank run's numbers (stored in the run folder, checked on resume)."""

    windows: list[str] | None = None
    min_width: int = 2
    max_width: int | None = None
    probes: list[str] | None = None
    iterations: int = 4
    max_tokens: int = 48
    batch_size: int = 16
    kl_positions: int = 4
    kl_fraction: float = 1.0
    deep_fraction: float = 0.5
    debiased_cka: bool = False
    mmd_samples: int = 512
    jacobian: str = "top"
    jacobian_top: int = 5
    jacobian_prompts: int = 2
    jacobian_tokens: int = 24
    jacobian_k: int = 3
    jacobian_iters: int = 8
    top_k: int = 10
    overlap_families: tuple[str, ...] = ()
    stats_dtype: str = "float64"
    outlier_factor: float = 5.0
    shortlist_overlap: float = 0.3
    seed: int = 0
    alpha: float = 1.0
    matmul: str = "float32"
    visit_fraction: float = 1.0

    def probe_settings(self) -> ProbeSettings:
        """The probes' knobs: the fields of the same name, and the statistics dtype as a torch dtype (+ TF32)."""
        named = {f.name: getattr(self, f.name) for f in fields(ProbeSettings) if f.name not in ("stats_dtype", "tf32")}
        return ProbeSettings(**{**named, "alpha": float(self.alpha)}, tf32=self.stats_dtype == "tf32",
                             stats_dtype=torch.float64 if self.stats_dtype == "float64" else torch.float32)

    def kl_positions_probed(self) -> int:
        """KL positions per prompt the base pass picks: `kl_positions`, or 0 when the KL probe is not selected."""
        return self.kl_positions if "kl" in select_probes(self.probes) else 0

    def validate(self) -> None:
        if not 2 <= self.iterations <= 8:
            raise UsageError(f"--iterations {self.iterations} is out of range; allowed 2..8 (z_2 is needed for r_0)")
        if self.jacobian not in ("top", "all", "none"):
            raise UsageError(f"--jacobian {self.jacobian!r}: choose top, all or none")
        if self.stats_dtype not in STATS_DTYPES:
            raise UsageError(f"--stats-dtype {self.stats_dtype!r}: choose {', '.join(STATS_DTYPES)}")
        for name, low in MINIMUMS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        for name in ("deep_fraction", "kl_fraction", "visit_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)} is out of range; allowed (0, 1]")
        replayed = max(self.deep_fraction, self.kl_fraction if self.kl_positions_probed() else 0.0)
        if self.visit_fraction < replayed:
            raise UsageError(f"--visit-fraction {self.visit_fraction} is below the deep or KL share ({replayed}): those "
                             f"prompts replay from z_2; use --visit-fraction {replayed} or more")
        if not (self.outlier_factor == 0 or 1.0 < self.outlier_factor < math.inf):
            raise UsageError(f"--outlier-factor {self.outlier_factor} is out of range; allowed 0 (keep every token) or > 1")
        if not 0.0 <= self.shortlist_overlap <= 1.0:
            raise UsageError(f"--shortlist-overlap {self.shortlist_overlap} is out of range; allowed [0, 1] (1: no suppression)")
        try:
            check_scale(self.alpha, "--alpha")
        except WindowError as exc:
            raise UsageError(str(exc)) from None
        check_matmul_mode(self.matmul)
        if self.overlap_families and len(self.overlap_families) != 2:
            raise UsageError("--overlap takes exactly two prompt families, e.g. math,reasoning")


@dataclass
class RankResult:
    """The ranked windows of one run (`rows` sorted by score, best first) and the run's summary."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    out_dir: Path | None = None

    def top(self, k: int = 10) -> list[dict[str, Any]]:
        """The short list: the best `k` windows that cover distinct regions (see `shortlist`)."""
        ranked = [r for r in self.rows if r.get("shortlist")]
        return sorted(ranked, key=lambda r: r["shortlist"])[:k] if ranked else self.rows[:k]

    def to_dataframe(self) -> Any:
        """The table as a pandas DataFrame (pandas comes with lm-eval)."""
        import pandas as pd

        return pd.DataFrame(self.rows)


def _prompt_digest(prompts: Sequence[Prompt]) -> str:
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(f"{prompt.id}\x00{prompt.family}\x00{prompt.text}\x01".encode())
    return digest.hexdigest()[:16]


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def rank_windows(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    settings: RankSettings | None = None,
    score_config: ScoreConfig | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    model_info: dict[str, Any] | None = None,
    learned_score: LearnedScore | None = None,
    workers: int = 1,
) -> RankResult:
    """Probe and score every selected window of `model` from one cached activation pass.

    The steps: check the settings and open the run folder; one base pass (`cache_activations`); the
    per-window probes (`_probe_windows`, sharded over processes under torchrun); score and sort; then
    on rank 0 only the Jacobian shortlist, the repeat curves, the summary and the output files.

    Args:
        model: a loaded `*ForCausalLM` (no plan applied); eager attention for exact Jacobians.
        tokenizer: its tokenizer.
        prompts: the probe prompts (`rys_forge.rank.load_prompts`).
        settings: windows, probes and budgets (`RankSettings`).
        score_config: constants of the score and classes.
        out_dir: run folder; None keeps everything in memory.
        resume: continue an interrupted run in `out_dir`.
        progress: show a progress bar.
        model_info: provenance stored in the summary (source, path, ...).
        learned_score: order the windows by this learned score (`rank.learned`) instead of the prior.
        workers: on CPU, windows probed at once, each in a thread of its own sharing out torch's threads
            (`rys_forge.rank.probes.in_order`); 0: `window_workers` picks. Ignored on other devices.

    Returns:
        A `RankResult` whose rows are sorted by score (best first).

    Raises:
        UsageError: bad windows, probes, settings (one the score needs switched off), or a resume with
            different settings or model (`RunFolder.session`).
        RysForgeError: no window got a finite score; a run-folder write failed (the records stay).
    """
    settings, score_config = settings or RankSettings(), score_config or ScoreConfig()
    settings.validate()
    settings = replace(settings, matmul=_run_matmul(settings.matmul, model, out_dir, resume, current_shard().parallel))
    workers = window_workers(workers, model)
    probes = select_probes(settings.probes)
    check_score_inputs(probes, settings.kl_positions, score_config)
    num_layers = len(get_path(model, spec_for_model(model).layers_path))
    windows = select_windows(num_layers, settings.windows, settings.min_width, settings.max_width)
    _check_overlap_families(prompts, settings.overlap_families)
    shard = current_shard()
    fingerprint = _fingerprint(model_info, num_layers, prompts, settings, windows)
    with RunFolder.session(out_dir, fingerprint, resume, shard, model=model, model_info=model_info) as folder, \
            matmul_precision(settings.matmul), fast_linears(model) as onednn:
        started = time.perf_counter()
        done = folder.finished() if folder else {}
        shard.barrier()  # every process reads the same finished windows before any of them probes
        cache = _base_pass(model, tokenizer, prompts, settings)
        todo = [w for w in windows if "probe_s" not in done.get(str(w), {})]  # jacobian-only records do not count
        mine = shard.take(todo)  # this process's share
        window_seconds = _probe_windows(cache, mine, len(windows), probes, settings, done, folder, progress, workers)
        if shard.parallel:
            shard.barrier()
            done = folder.finished()  # type: ignore[union-attr]
        rows = _ranked_rows(done, windows, score_config)
        check_scored(rows, score_config)
        rows, ordering = _final_order(rows, learned_score, num_layers)
        shortlist(rows, settings.top_k, settings.shortlist_overlap)
        out = Path(out_dir) if out_dir else None
        if shard.rank != 0:  # rank 0 finishes: shortlist Jacobians, curves, outputs
            return RankResult(rows=rows, summary={"shard": {"rank": shard.rank, "world": shard.world}}, out_dir=out)
        timings = {"base_pass_s": cache.timings["base_pass_s"], "windows_s": window_seconds,
                   "windows_probed_this_session": len(todo), "processes": shard.world, "window_workers": workers,
                   "onednn_linears": onednn, "per_window_s": window_seconds / max(1, len(mine)),
                   "jacobian_s": _shortlist_jacobians(model, tokenizer, prompts, rows, probes, settings, folder, progress, workers)}
        summary = _summary(model, model_info, prompts, cache, settings, probes, score_config, rows,
                           _self_check(cache, windows[0]), timings, started) | {"ordering": ordering}
        if folder:
            write_outputs(folder, rows, summary, num_layers)
        return RankResult(rows=rows, summary=summary, out_dir=out)


def _run_matmul(mode: str, model: nn.Module, out_dir: str | Path | None, resume: bool, parallel: bool) -> str:
    """The `--matmul` precision of this run. `auto` continues a resumed run in the precision it started with
    (a timing that came out otherwise today must not refuse the resume) and is float32 in a run sharded over
    processes (each would time its own); else `resolve_matmul`."""
    stored = Path(out_dir) / RUN_FILE if out_dir is not None else None
    if mode == "auto" and resume and stored is not None and stored.is_file():
        mode = read_json(stored, "run settings").get("settings", {}).get("matmul", "float32")
    if mode == "auto" and parallel:
        mode = "float32"
    return resolve_matmul(mode, model)


def _base_pass(model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], settings: RankSettings) -> ActivationCache:
    """The one cached base pass of a run, with the run's prompt budget, KL positions and shares."""
    return cache_activations(
        model, tokenizer, [p.text for p in prompts], [p.family for p in prompts], max_tokens=settings.max_tokens,
        batch_size=settings.batch_size, kl_positions=settings.kl_positions_probed(),
        seed=settings.seed, deep_fraction=settings.deep_fraction, kl_fraction=settings.kl_fraction,
        outlier_factor=settings.outlier_factor, visit_fraction=settings.visit_fraction,
    )


def _check_overlap_families(prompts: Sequence[Prompt], overlap_families: Sequence[str]) -> None:
    families = sorted({p.family for p in prompts})
    for family in overlap_families:
        if family not in families:
            raise UsageError(f"--overlap family '{family}' is not among the prompt families: {', '.join(families)}")


def _settings_record(settings: RankSettings) -> dict[str, Any]:
    """`settings` as stored in run.json: `alpha` only when it is not 1, `matmul` only when it is not float32
    and `visit_fraction` only when it is not 1, so that runs from before those options existed still resume."""
    record = asdict(settings)
    for name, default in (("alpha", 1), ("matmul", "float32"), ("visit_fraction", 1)):
        if record[name] == default:
            record.pop(name)
    return record


def _fingerprint(
    model_info: dict[str, Any] | None, num_layers: int, prompts: Sequence[Prompt], settings: RankSettings,
    windows: Sequence[Window],
) -> dict[str, Any]:
    """What a resumed run must share with the original, besides the model's identity (weights, dtype,
    attention, device: `RunFolder.model_identity`): stored as the run folder's run.json."""
    return {
        "model": (model_info or {}).get("source"),
        "num_layers": num_layers,
        "prompts": {"count": len(prompts), "sha256": _prompt_digest(prompts)},
        "settings": _settings_record(settings),
        "windows": [str(w) for w in windows],
    }


def _probe_windows(
    cache: ActivationCache, windows: Sequence[Window], total: int, probes: list[str], settings: RankSettings,
    done: dict[str, dict[str, Any]], folder: RunFolder | None, progress: bool, workers: int,
) -> float:
    """Probe each of `windows` (of `total` in the run; `workers` at once, `in_order`), record its row in `done`
    and append it to the run folder's log as it finishes, in window order. Returns the seconds spent."""
    probe_settings = settings.probe_settings()
    started = time.perf_counter()

    def probe(window: Window) -> dict[str, Any]:
        t0 = time.perf_counter()
        row = probe_window(cache, window.start, window.end, probes, probe_settings, settings.overlap_families)
        return {"window": str(window), "i": window.start, "j": window.end, "width": window.width, **row,
                "probe_s": time.perf_counter() - t0}

    with progress_bar(progress, total, total - len(windows), "probing windows") as advance:
        for window, record in in_order(probe, windows, workers):
            done[str(window)] = record
            if folder:
                folder.append(record)
            advance()
    return time.perf_counter() - started


def _final_order(rows: list[dict[str, Any]], learned: LearnedScore | None,
                 num_layers: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows in their final order (a learned score's, else the prior's), numbered; summary.json's `ordering`."""
    rows, ordering = order_rows(rows, learned, num_layers)
    for position, row in enumerate(rows, start=1):
        row["rank"] = position
    return rows, ordering


def _ranked_rows(done: dict[str, dict[str, Any]], windows: Sequence[Window], config: ScoreConfig) -> list[dict[str, Any]]:
    """Every window's row with its score and class, best score first (NaN scores last)."""
    rows = [_finish_row(done[str(w)], config) for w in windows]
    rows.sort(key=lambda r: -_num(r.get("score")) if not math.isnan(_num(r.get("score"))) else math.inf)
    return rows


def _shortlist_jacobians(
    model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], rows: list[dict[str, Any]], probes: list[str],
    settings: RankSettings, folder: RunFolder | None, progress: bool, workers: int,
) -> float:
    """Jacobian spectra of the top windows (or all, per `--jacobian`) on a small cache of their own (few
    prompts, few tokens); updates `rows` in place and logs each. Returns the seconds spent. One window at a
    time (forward-mode AD is not thread-safe), on a window worker's share of the threads: the tensors are
    small, and on a busy machine a thread hand-off at every op costs far more than the second core gives."""
    if "jacobian" not in probes or settings.jacobian == "none":
        return 0.0
    targets = rows if settings.jacobian == "all" else RankResult(rows, {}).top(settings.jacobian_top)
    targets = [r for r in targets if "jac_sv_1" not in r]
    if not targets:
        return 0.0
    t0 = time.perf_counter()
    probe_settings = settings.probe_settings()
    small = cache_activations(
        model, tokenizer, [p.text for p in prompts[:: max(1, len(prompts) // settings.jacobian_prompts)]][: settings.jacobian_prompts],
        max_tokens=settings.jacobian_tokens, batch_size=settings.jacobian_prompts, kl_positions=0, seed=settings.seed,
    )
    with progress_bar(progress, len(targets), 0, "jacobian spectra") as advance, \
            torch_threads(max(1, torch.get_num_threads() // workers)):
        for row in targets:
            values = jacobian_spectrum(small, row["i"], row["j"], probe_settings)
            row.update(values)
            if folder:
                folder.append({"window": row["window"], **values})
            advance()
    return time.perf_counter() - t0


def _summary(
    model: nn.Module, model_info: dict[str, Any] | None, prompts: Sequence[Prompt], cache: ActivationCache,
    settings: RankSettings, probes: list[str], score_config: ScoreConfig, rows: list[dict[str, Any]],
    self_check: dict[str, float], timings: dict[str, float], started: float,
) -> dict[str, Any]:
    """summary.json: model, convention, prompts and token counts, settings, the ranking at a glance, the
    self-check, the top windows' repeat curves, the layer CKA matrix, timings (completed here: the curves
    and the total since `started`), versions and, with `--overlap`, the family overlap."""
    num_layers = cache.num_layers
    probe_settings = settings.probe_settings()
    t0 = time.perf_counter()
    top = RankResult(rows, {}).top(settings.top_k)
    curves = repeat_curves(cache, top, probe_settings, "kl" in probes, timings["window_workers"])  # as windows ran
    timings["repeat_curves_s"] = time.perf_counter() - t0
    layer_cka = metrics.cka_matrix(
        [cache.pooled(l) for l in range(num_layers + 1)], dtype=probe_settings.stats_dtype, tf32=probe_settings.tf32
    )
    # The same matrix with the outlier positions put back: what the statistics would see without the exclusion.
    layer_cka_all = metrics.cka_matrix(
        [cache.pooled(l, with_outliers=True) for l in range(num_layers + 1)],
        dtype=probe_settings.stats_dtype, tf32=probe_settings.tf32,
    ) if cache.outliers else layer_cka
    families = sorted({p.family for p in prompts})
    summary = {
        "model": model_info or {},
        "architecture": {"model_type": model.config.model_type, "num_layers": num_layers},
        "convention": WINDOW_CONVENTION.replace("L", str(num_layers)),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "prompts": {
            "count": len(prompts),
            "families": {f: sum(p.family == f for p in prompts) for f in families},
            "tokens": cache.tokens,
            "visit_tokens": int(sum(b.valid.sum() for b in cache.batches if b.visit)),
            "deep_tokens": int(sum(b.valid.sum() for b in cache.batches if b.deep)),
            "kl_prompts": sum(len(b.prompt_ids) for b in cache.batches if b.kl_index.numel()),
            "kl_tokens": int(sum(b.valid.sum() for b in cache.batches if b.kl_index.numel())),
            "kl_positions": sum(int(b.kl_index.shape[0]) for b in cache.batches),
            "outlier_tokens": cache.outliers,
            "outlier_positions": _outlier_positions(cache),
            "sha256": _prompt_digest(prompts),
        },
        "settings": asdict(settings),
        "probes": probes,
        "score_config": score_config.to_dict(),
        "windows": len(rows),
        "top_k": [_brief(r) for r in top],
        "top_k_raw": [_brief(r) for r in rows[: settings.top_k]],
        "shortlist_regions": distinct_regions(top),
        "classes": {c: sum(r["class"] == c for r in rows) for c in sorted({r["class"] for r in rows})},
        "self_check": self_check,
        "repeat_curves": curves,
        "layer_cka": layer_cka.tolist(),
        "layer_cka_with_outliers": layer_cka_all.tolist(),
        "timings": {**timings, "total_s": time.perf_counter() - started},
        "versions": {**versions("torch", "transformers"), "python": platform.python_version()},
    }
    if settings.overlap_families:
        summary["family_overlap"] = family_overlap(rows, settings.overlap_families, score_config, settings.top_k)
    return summary


def _outlier_positions(cache: ActivationCache) -> dict[str, int]:
    """How many excluded outlier tokens sit at each position of their prompt (position 0: the first token)."""
    counts: dict[str, int] = {}
    for b in cache.batches:
        if b.outlier is not None:
            for position in b.outlier.nonzero()[:, 1].tolist():
                counts[str(position)] = counts.get(str(position), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))


def _self_check(cache: ActivationCache, window: Window) -> dict[str, float]:
    """`z_1 = T_B(x_i)` must reproduce the cached `x_j`: checks the replayed block map."""
    batch = cache.batches[0]
    with torch.no_grad():
        z1 = cache.block(batch, window.start, window.end, batch.hidden[window.start])
    target = batch.hidden[window.end][batch.valid]
    diff = (z1[batch.valid] - target).abs().max().item()
    return {"window": str(window), "max_abs_diff": diff, "relative": diff / max(target.abs().max().item(), 1e-30)}


def _finish_row(record: dict[str, Any], config: ScoreConfig) -> dict[str, Any]:
    row = {k: (math.nan if v is None else v) for k, v in record.items()}
    row.update(score(row, config))
    row["class"] = classify(row, config)
    return row


def _brief(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("window", "score", "class", "cka_plateau", "delta_0", "r_0", "d_dec", "d_kl", "jac_sv_1")
    return {k: row.get(k) for k in keys if k in row}
