"""Where `rank`'s time per window goes on CPU: layer passes, statistics, the LM head and KL, Python overhead.

Loads the model as `rys-forge rank` does (float32, eager attention, CPU), caches the base pass over the
default prompt set with the default settings, then probes `--windows N` windows spread evenly over the
run's window list (so the mix of widths and tails is the full run's) and times every stage by wrapping
the functions that do the work. Times are exclusive (a wrapped call inside another is charged to its
own row only); "python / other" is what the rows leave of the probe wall time. Prints one table, per
window and as a share of the total; `--cprofile N` adds cProfile's top N functions by internal time.

    PYTHONPATH=. python bench/profile_rank.py [--model gemma-3-270m] [--windows 12] [--threads 1] [--ops 15]

Linears run as rank runs them (`--matmul auto` as rank's default; `fast_linears`: oneDNN on CPU where torch has
it; `--torch-linears` keeps torch's default BLAS). The same script profiles older code too (stages it lacks are skipped), e.g. with
`PYTHONPATH=<checkout of 10969a6>`.

On a machine busy with other work the absolute times are inflated; the shares are what to read.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import pstats
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from rys_forge.models import load_model
from rys_forge.plan import select_windows
from rys_forge.rank import activations, metrics, probes
from rys_forge.rank.activations import ActivationCache, cache_activations
from rys_forge.rank.metrics import cka, distances
from rys_forge.rank.pipeline import RankSettings
from rys_forge.rank.prompts import DEFAULT_PER_FAMILY, load_prompts


class StageClock:
    """Exclusive wall time per stage label: a wrapped call's time minus that of wrapped calls inside it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list[Any]] = []  # [label, child seconds]

    def wrap(self, fn: Callable[..., Any], label: str | Callable[["StageClock"], str]) -> Callable[..., Any]:
        """`fn` timed under `label` (or under `label(self)`, chosen at call time from the enclosing stages)."""

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            name = label(self) if callable(label) else label
            self.stack.append([name, 0.0])
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                _, children = self.stack.pop()
                self.seconds[name] += elapsed - children
                self.calls[name] += 1
                if self.stack:
                    self.stack[-1][1] += elapsed

        return timed

    def inside(self, label: str) -> bool:
        return any(frame[0] == label for frame in self.stack)


def _layer_label(clock: StageClock) -> str:
    return "layers: KL tail (j..L-1)" if clock.inside("kl tail") else "layers: iterates z_2..z_n"


def instrument(clock: StageClock) -> list[tuple[Any, str, Any]]:
    """Wrap the stages in place (those this version of the code has); returns what to restore."""
    targets: list[tuple[Any, str, str | Callable[[StageClock], str]]] = [
        (activations, "replay_layers", _layer_label),
        (ActivationCache, "logits_from", "kl tail"),  # before the batched head (10969a6)
        (ActivationCache, "tail_states", "kl tail"),
        (activations, "head_logits", "lm head"),
        (activations, "kl_from_logits", "kl (float64)"),  # before the row-wise KL (10969a6)
        (activations, "kl_rows", "kl (float64)"),
        (cka, "cka_matrix", "cka matrices"),
        (metrics, "cka_matrix", "cka matrices"),
        (distances, "mmd2_rbf", "mmd (rbf kernels)"),
        (metrics, "mmd2_rbf", "mmd (rbf kernels)"),
        (metrics, "mahalanobis_reference", "mahalanobis (ledoit-wolf + cholesky)"),
        (metrics, "mahalanobis_shift", "mahalanobis (per-window solve)"),
        (metrics, "relative_step", "norms (delta, force, stationarity)"),
        (metrics, "residual_force", "norms (delta, force, stationarity)"),
        (metrics, "stationarity", "norms (delta, force, stationarity)"),
        (metrics, "quadratic_fit", "n2 fit"),
        (probes.Trajectory, "z", "pooling (gather valid tokens)"),
    ]
    originals = []
    for owner, name, label in targets:
        original = getattr(owner, name, None)
        if original is None:  # a stage this version of the code does not have
            continue
        originals.append((owner, name, original))
        setattr(owner, name, clock.wrap(original, label))
    return originals


def restore(originals: list[tuple[Any, str, Any]]) -> None:
    for owner, name, original in reversed(originals):
        setattr(owner, name, original)


def _table(clock: StageClock, total: float, windows: int) -> str:
    rows = sorted(clock.seconds.items(), key=lambda kv: -kv[1])
    other = total - sum(clock.seconds.values())
    lines = ["| stage | s per window | share | calls per window |", "|---|---:|---:|---:|"]
    for name, seconds in rows + [("python / other", other)]:
        calls = clock.calls.get(name, 0) / windows
        lines.append(f"| {name} | {seconds / windows:.3f} | {100 * seconds / total:.1f}% | {calls:.1f} |")
    lines.append(f"| **total** | **{total / windows:.3f}** | 100% | |")
    return "\n".join(lines)


def _ops_table(cache: ActivationCache, window: Any, names: list[str], settings: RankSettings, rows: int) -> str:
    """torch.profiler's view of one window: which ops the time goes to (matrix products vs the rest)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        probes.probe_window(cache, window.start, window.end, names, settings.probe_settings())
    return f"ops of window {window}:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--windows", type=int, default=12, help="windows probed, spread evenly over the run's list")
    parser.add_argument("--stats-dtype", default=None, help="override RankSettings' stats dtype (float64, float32)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cprofile", type=int, default=0, help="also print cProfile's top N functions (tottime)")
    parser.add_argument("--ops", type=int, default=0, help="also print torch.profiler's top N ops of one window")
    parser.add_argument("--torch-linears", action="store_true", help="keep torch's default linears (no oneDNN switch)")
    parser.add_argument("--matmul", default="auto", help="rank --matmul: auto, float32 or bf16 (trees before it: ignored)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = RankSettings() if args.stats_dtype is None else RankSettings(stats_dtype=args.stats_dtype)
    loaded = load_model(args.model)
    prompts = load_prompts(limit_per_family=DEFAULT_PER_FAMILY)
    stack = contextlib.ExitStack()  # rank's own switch of the float32 CPU linears to oneDNN, where it exists
    try:  # rys_forge.rank.fast_linear now; earlier trees had it in activations, older ones not at all
        from rys_forge.rank.fast_linear import fast_linears as fast
    except ImportError:
        fast = getattr(activations, "fast_linears", None)
    try:  # rank --matmul (#17); older trees ran float32 only
        from rys_forge.rank.fast_linear import matmul_precision, resolve_matmul
    except ImportError:
        matmul = "float32"
    else:
        matmul = resolve_matmul(args.matmul, loaded.model)
        stack.enter_context(matmul_precision(matmul))
    switched = stack.enter_context(fast(loaded.model)) if fast and not args.torch_linears else 0
    t0 = time.perf_counter()
    cache = cache_activations(
        loaded.model, loaded.tokenizer, [p.text for p in prompts], [p.family for p in prompts],
        max_tokens=settings.max_tokens, batch_size=settings.batch_size, kl_positions=settings.kl_positions,
        seed=settings.seed, deep_fraction=settings.deep_fraction, kl_fraction=settings.kl_fraction,
        outlier_factor=settings.outlier_factor,
    )
    base_s = time.perf_counter() - t0
    every = select_windows(cache.num_layers, None, settings.min_width, None)
    count = min(args.windows, len(every))
    chosen = [every[int((k + 0.5) * len(every) / count)] for k in range(count)]
    clock = StageClock()
    originals = instrument(clock)
    profiler = cProfile.Profile() if args.cprofile else None
    names = probes.select_probes(None)
    try:
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        for window in chosen:
            probes.probe_window(cache, window.start, window.end, names, settings.probe_settings())
        if profiler:
            profiler.disable()
        total = time.perf_counter() - started
    finally:
        restore(originals)
    ops = _ops_table(cache, chosen[len(chosen) // 2], names, settings, args.ops) if args.ops else ""
    stack.close()
    print(f"model {args.model}: {cache.num_layers} layers, {cache.tokens} tokens, "
          f"batches {[len(b.prompt_ids) for b in cache.batches]}, threads {torch.get_num_threads()}, "
          f"stats {settings.stats_dtype}, matmul {matmul}, linears on oneDNN: {switched}; base pass {base_s:.1f}s")
    print(f"windows probed: {', '.join(str(w) for w in chosen)} (of {len(every)})\n")
    print(_table(clock, total, count))
    print(f"\nestimated probe time for all {len(every)} windows: {total / count * len(every):.0f}s")
    if ops:
        print(ops)
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.cprofile)
        print(out.getvalue())


if __name__ == "__main__":
    main()
