"""Benchmark: the sweep's cached engine against one lm-eval run per window, on a real model.

Runs `sweep_windows` twice over the same windows, tasks and items: `--engine cached` (one base pass, each
window replayed from the cached stream at its end, LM head at continuation positions only) and
`--engine lm-eval` (lm-eval's HFLM over the in-memory repeat, once per window). Prints a table (base time,
seconds per window, speed-up) and the largest difference between the two engines' per-task values, and
writes JSON to $OUT (or ./bench_out). Usage (GPU machine, see ../shared/GPU.md):

    PYTHONPATH=. python bench/sweep_bench.py --model ~/st/gemma-3-270m.gguf --device cuda --dtype bfloat16 \\
        --tasks rys_arc_easy,rys_piqa --limit 200 --windows 6:10,13:15,0:2

On CPU with the built-in default model it runs as is (slowly).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench_options import add_model_options  # bench/ is on sys.path when a bench runs as a script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser, model="gemma-3-270m")
    parser.add_argument("--windows", default="6:10,13:15,0:2")
    parser.add_argument("--batch-size", default="64", help="lm-eval batch size of the lm-eval engine")
    args = parser.parse_args()

    from rys_forge.models import load_model
    from rys_forge.research.sweep import sweep_windows

    loaded = load_model(args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn)
    tasks, windows = args.tasks.split(","), args.windows.split(",")
    runs = {}
    for engine in ("cached", "lm-eval"):
        started = time.perf_counter()
        result = sweep_windows(loaded.model, loaded.tokenizer, tasks=tasks, windows=windows, limit=args.limit,
                               engine=engine, batch_size=int(args.batch_size), progress=False)
        runs[engine] = {"result": result, "wall_s": time.perf_counter() - started}
    cached, reference = runs["cached"]["result"], runs["lm-eval"]["result"]
    worst = 0.0
    for a, b in zip(cached.rows, reference.rows):
        for task in a["tasks"]:
            worst = max(worst, abs(a["tasks"][task]["rys"] - b["tasks"][task]["rys"]))
    worst_base = max(abs(cached.base[t]["value"] - reference.base[t]["value"]) for t in cached.base)
    table = []
    for engine, run in runs.items():
        timings = run["result"].summary["timings"]
        table.append({"engine": engine, "base_s": timings["base_eval_s"], "per_window_s": timings["mean_per_window_s"],
                      "wall_s": run["wall_s"]})
    speedup = table[1]["per_window_s"] / table[0]["per_window_s"]
    out = Path(os.environ.get("OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "table": table, "per_window_speedup": speedup, "max_abs_diff_rys": worst,
              "max_abs_diff_base": worst_base, "metrics": cached.summary["metrics"]}
    (out / "sweep_bench.json").write_text(json.dumps(report, indent=2))
    print(f"model {args.model} ({args.dtype}, {args.device}), tasks {args.tasks} x {args.limit} items, windows {args.windows}")
    print(f"{'engine':10s} {'base s':>8s} {'s/window':>9s} {'wall s':>8s}")
    for row in table:
        print(f"{row['engine']:10s} {row['base_s']:8.1f} {row['per_window_s']:9.2f} {row['wall_s']:8.1f}")
    print(f"per-window speed-up {speedup:.1f}x; max |value difference| between engines: windows {worst:.4f},"
          f" base {worst_base:.4f} (same items; differences come from bf16 rounding and batch padding)")


if __name__ == "__main__":
    main()
