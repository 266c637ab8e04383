"""Benchmark: `sweep --race` against the exhaustive sweep, in one process on one model (issue #18's measurement).

Runs `sweep_windows` exhaustively (cached engine) and then as a race over the same windows, tasks and items
(the base pass runs once per sweep, as a user's two commands would), and prints a table: item-evaluations and
window time of each, their ratios, the exhaustive best window and whether the race kept it or a window whose
interval holds its mean paired difference, and the exhaustive sweep's positive windows the race called positive.
Writes JSON to $OUT (or ./bench_out). Usage (GPU machine, see ../shared/GPU.md):

    PYTHONPATH=. python bench/race_bench.py --model ~/st/smollm2-135m.gguf --device cuda --dtype bfloat16 \\
        --tasks rys_arc_easy,rys_arc_challenge,rys_piqa,rys_openbookqa,rys_hellaswag,rys_lambada_openai \\
        --limit 500 --looks 6 --margin 0.005 [--growth 2] [--order-from RANK_RUN] [--windows 0:2,4:8 | --max-width 8]

`--exhaustive SWEEP_RUN` takes the exhaustive rows (and window time) from an earlier sweep run folder (or its
committed CSV) of the same settings instead of sweeping again. With `--time-sample N` the exhaustive window time
is measured here instead, in the same process as the race: N windows drawn at random (seeded) are swept on
every item and their mean time is scaled to all windows (what a short device session can afford when the
exhaustive rows already exist). On CPU with a tiny model it runs as is (a smoke test).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

from bench_options import add_model_options  # bench/ is on sys.path when a bench runs as a script


def mean_paired_difference(row: dict[str, Any], tasks: list[str]) -> float:
    """An exhaustive row's mean over tasks of its mean per-item difference from the base (the race's estimate)."""
    return float(sum(row["tasks"][t]["delta"] for t in tasks) / len(tasks))


def rank_order(path: Path) -> list[str]:
    """Windows of a rank run folder, or of its committed ``windows.csv`` copy (rows sorted by score), best first."""
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return [row["window"] for row in csv.DictReader(handle)]
    from rys_forge.rank.outputs import read_rank_run
    return [str(r["window"]) for r in read_rank_run(path)[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser, model="smollm2-135m")
    parser.add_argument("--windows", default=None, help="comma list (default: every window of --max-width or less)")
    parser.add_argument("--max-width", type=int, default=None)
    parser.add_argument("--looks", type=int, default=6)
    parser.add_argument("--margin", type=float, default=0.005)
    parser.add_argument("--growth", type=float, default=2.0, help="items grow by this factor from look to look")
    parser.add_argument("--order-from", type=Path, default=None, help="a rank run folder or its windows CSV: the race's order")
    parser.add_argument("--exhaustive", type=Path, default=None, help="an earlier exhaustive sweep run folder")
    parser.add_argument("--time-sample", type=int, default=0,
                        help="with --exhaustive: measure the exhaustive window time on this many random windows here")
    parser.add_argument("--batch-tokens", type=int, default=16384)
    args = parser.parse_args()

    from rys_forge.models import load_model
    from rys_forge.research.race import RaceSettings
    from rys_forge.research.sweep import read_sweep, sweep_windows

    out = Path(os.environ.get("OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn)
    tasks = args.tasks.split(",")
    windows = args.windows.split(",") if args.windows else None
    order = rank_order(args.order_from) if args.order_from else None
    common = dict(tasks=tasks, limit=args.limit, windows=windows, max_width=args.max_width, progress=False,
                  engine="cached", batch_tokens=args.batch_tokens, model_info={"source": loaded.source})
    if args.exhaustive:
        rows, summary = read_sweep(args.exhaustive)
    else:
        start = time.perf_counter()
        full = sweep_windows(loaded.model, loaded.tokenizer, out_dir=out / "exhaustive", **common)
        rows, summary = full.rows, full.summary
        print(f"exhaustive: {len(rows)} windows in {time.perf_counter() - start:.1f} s")
    exhaustive_s = float(summary.get("timings", {}).get("windows_s", math.nan))
    start = time.perf_counter()
    raced = sweep_windows(loaded.model, loaded.tokenizer, out_dir=out / "race", order=order,
                          race=RaceSettings(looks=args.looks, margin=args.margin, growth=args.growth), **common)
    print(f"race: {len(raced.rows)} windows in {time.perf_counter() - start:.1f} s")
    race_info = raced.summary["timings"]["race"]
    race_s = float(raced.summary["timings"]["windows_s"])
    raced_windows = {r["window"].split("x")[0] for r in raced.rows}
    rows = [r for r in rows if r["window"] in raced_windows]  # an earlier sweep may hold more windows
    exhaustive_source = "this process" if not args.exhaustive else f"{args.exhaustive} (its own timings)"
    exhaustive_scoring = float(summary.get("timings", {}).get("scoring_s", math.nan))
    sample_drift = by_depth_s = math.nan
    if args.exhaustive and args.time_sample:
        sample = random.Random(0).sample([str(r["window"]) for r in rows], min(args.time_sample, len(rows)))
        timed = sweep_windows(loaded.model, loaded.tokenizer, out_dir=out / "time_sample",
                              **{**common, "windows": sample, "max_width": None})
        per_window = float(timed.summary["timings"]["windows_s"]) / len(sample)
        exhaustive_scoring = timed.summary["timings"].get("scoring_s", math.nan) / len(sample) * len(rows)
        exhaustive_s = per_window * len(rows)
        # a window replays layers i..L-1: scaled by the replayed depth, the sample's time stands for every window
        # (a ratio estimator; the plain mean above is off by the sample's mean depth against the population's)
        layers = loaded.model.config.get_text_config().num_hidden_layers

        def depth(window: str) -> int:
            return layers - int(window.split(":")[0])

        by_depth_s = float(timed.summary["timings"]["windows_s"]) * sum(depth(str(r["window"])) for r in rows) / sum(
            depth(w) for w in sample)
        exhaustive_source = f"{len(sample)} random windows swept on every item here, {per_window:.2f} s each"
        print(f"time sample: {len(sample)} windows, {per_window:.2f} s per window")
        # the same windows in the committed sweep: this process's engine must reproduce them (bf16: up to a few items)
        committed = {str(r["window"]): r for r in rows}
        sample_drift = max(abs(mean_paired_difference(r, tasks) - mean_paired_difference(committed[str(r["window"])], tasks))
                           for r in timed.rows)
        print(f"time sample against the committed rows: max |mean paired difference change| {sample_drift:.4f}")

    by_window = {r["window"]: r for r in raced.rows}
    ranked = [r for r in rows if math.isfinite(r.get("combined_z", math.nan))]
    best = max(ranked, key=lambda r: r["combined_z"])
    best_d = mean_paired_difference(best, tasks)
    race_best = max((r for r in raced.rows if r["race_reason"] == "completed"), key=lambda r: r["race_estimate"])
    kept = by_window[best["window"]]["race_reason"] == "completed"
    held = race_best["race_lower"] <= best_d <= race_best["race_upper"]
    positives = [r["window"] for r in ranked if r["combined_z"] > 1.96]
    called = set(race_info.get("positive") or [])
    result = {
        "model": loaded.source, "tasks": tasks, "limit": args.limit, "looks": args.looks, "margin": args.margin, "growth": args.growth,
        "windows": len(rows), "order": str(args.order_from) if args.order_from else "seeded random",
        "items_exhaustive": race_info["exhaustive"], "items_race": race_info["spent"],
        "items_ratio": race_info["spent"] / race_info["exhaustive"],
        "windows_s_exhaustive": exhaustive_s, "windows_s_exhaustive_from": exhaustive_source,
        "time_sample_max_difference_change": sample_drift,
        "windows_s_race": race_s, "time_ratio": race_s / exhaustive_s,
        "windows_s_exhaustive_by_depth": by_depth_s, "time_ratio_by_depth": race_s / by_depth_s,
        "base_s_race": raced.summary["timings"]["base_eval_s"],
        # lm-eval's scoring inside each side's window time (CPU work the GPU waits for)
        "scoring_s_exhaustive": exhaustive_scoring, "scoring_s_race": raced.summary["timings"].get("scoring_s", math.nan),
        "exhaustive_best": best["window"], "exhaustive_best_combined_z": best["combined_z"],
        "exhaustive_best_mean_difference": best_d, "race_best": race_best["window"],
        "race_best_interval": [race_best["race_lower"], race_best["race_upper"]],
        "best_kept": kept, "best_inside_race_best_interval": held,
        "exhaustive_positive": positives, "race_positive": sorted(called),
        "positives_found": all(any(p == w.split("x")[0] for w in called) for p in positives),
        "race_windows": race_info["windows"], "race_looks": race_info.get("looks") or [],
    }
    (out / "race_bench.json").write_text(json.dumps(result, indent=2))
    print()
    print("| what | exhaustive | race | race / exhaustive |")
    print("|---|---:|---:|---:|")
    print(f"| item-evaluations | {result['items_exhaustive']} | {result['items_race']} | {result['items_ratio']:.3f} |")
    print(f"| window time (s) | {exhaustive_s:.1f} | {race_s:.1f} | {result['time_ratio']:.3f} |")
    if math.isfinite(by_depth_s):
        print(f"| the same, exhaustive scaled by replayed depth (s) | {by_depth_s:.1f} | {race_s:.1f} | "
              f"{race_s / by_depth_s:.3f} |")
    print(f"| of it lm-eval scoring (s) | {exhaustive_scoring:.1f} | {result['scoring_s_race']:.1f} | "
          f"{result['scoring_s_race'] / exhaustive_scoring if exhaustive_scoring else math.nan:.3f} |")
    print(f"| best window | {best['window']} (z {best['combined_z']:+.2f}, d {best_d:+.4f}) | {race_best['window']} "
          f"[{race_best['race_lower']:+.4f}, {race_best['race_upper']:+.4f}] | kept: {kept}, inside: {held} |")
    print(f"| positive windows | {len(positives)} | {len(called)} | all found: {result['positives_found']} |")
    print_looks(race_info.get("looks") or [])


def print_looks(looks: list[dict]) -> None:
    """Where the race's time went, per look: its engine's batches and padding, building it, running it."""
    print()
    print("| look | windows | requests | batches | padding | setup (s) | engine (s) | of it scoring (s) | ms per window |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for look in looks:
        per_window = 1000 * look["engine_s"] / max(look["windows"], 1)
        print(f"| {look['look'] + 1} | {look['windows']} | {look['requests']} | {look['batches']} | {look['padding']:.1%} | "
              f"{look['setup_s']:.2f} | {look['engine_s']:.1f} | {look['scoring_s']:.1f} | {per_window:.1f} |")


if __name__ == "__main__":
    main()
