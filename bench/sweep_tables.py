"""Per-task tables of a sweep run folder (finished or not), as Markdown.

For every task: the base value, how many windows move it significantly (paired p < 0.05) up and down, the
median delta, and the best windows by z; then the windows by combined z. A combined z can hide a real
single-task gain (or rest on one task), so read the task tables first.

SWEEP may also be a sweep's CSV table with its `<stem>_summary.json` beside it (e.g. one merged by
`bench/merge_sweep_tables.py`); `--figures DIR` also draws the combined-z and per-task delta heatmaps there.

Usage: PYTHONPATH=. python bench/sweep_tables.py SWEEP [--top 5] [--out FILE.md] [--figures DIR --prefix NAME]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from rys_forge.errors import RysForgeError
from rys_forge.files import write_atomic
from rys_forge.research.sweep import read_sweep

ALPHA = 0.05


def _number(value: float) -> str:
    if not math.isfinite(value):
        return "nan"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def task_table(rows: list[dict], task: str, top: int, base: dict | None = None) -> list[str]:
    """One task's counts and its best windows by z (z > 0 = better, whatever the metric's direction); the
    metric, base value and n from the rows, else from `base` (the summary's, for a CSV table)."""
    entries = [(r["window"], r["tasks"][task]) for r in rows if task in r["tasks"]]
    first = {**(base or {}).get(task, {}), **{k: v for k, v in entries[0][1].items() if v is not None}}
    first.setdefault("base", first.get("value"))
    up = sum(1 for _, e in entries if e["z"] > 0 and e["p_value"] < ALPHA)
    down = sum(1 for _, e in entries if e["z"] < 0 and e["p_value"] < ALPHA)
    deltas = np.array([e["delta"] for _, e in entries], dtype=float)
    lines = [f"### {task} ({first['metric']}, {'higher' if first['higher_is_better'] else 'lower'} is better; "
             f"base {_number(first['base'])}, n = {first['n']})", "",
             f"{len(entries)} windows: {up} better and {down} worse at paired p < {ALPHA}; median delta "
             f"{_number(float(np.median(deltas)))}.", "",
             "| window | delta | z | paired p |", "|---|---|---|---|"]
    for window, e in sorted(entries, key=lambda we: -we[1]["z"])[:top]:
        lines.append(f"| {window} | {_number(e['delta'])} | {e['z']:+.2f} | {_number(e['p_value'])} |")
    return lines + [""]


def tables(folder: Path, top: int) -> str:
    rows, summary = read_sweep(folder)
    rows = [r for r in rows if math.isfinite(float(r.get("combined_z", math.nan)))]  # a race's stopped windows aside
    if not rows:
        raise RysForgeError(f"{folder}: no finished window")
    tasks = list(rows[0]["tasks"])
    done = summary.get("windows_done", len(rows))
    planned = summary.get("windows_planned", len(rows))
    lines = [f"# Sweep per task: {summary.get('model', {}).get('source', folder)}", "",
             f"{done} of {planned} windows" + (" (unfinished; windows ran in a seeded random order, so an unbiased"
                                               " sample)" if done < planned else "") + ".", ""]
    for task in tasks:
        lines += task_table(rows, task, top, summary.get("base"))
    lines += ["### combined z (Stouffer over the tasks)", "", "| window | combined z | dominant task | single-task |"
              + "".join(f" z {t} |" for t in tasks), "|---|---|---|---|" + "---|" * len(tasks)]
    for r in sorted(rows, key=lambda r: -r["combined_z"] if math.isfinite(r["combined_z"]) else math.inf)[:top * 2]:
        lines.append(f"| {r['window']} | {r['combined_z']:+.2f} | {r.get('dominant_task')} | "
                     f"{'yes' if r.get('single_task_verdict') else 'no'} |"
                     + "".join(f" {r['tasks'][t]['z']:+.1f} |" for t in tasks))
    return "\n".join(lines) + "\n"


def figures(folder: Path, out: Path, prefix: str) -> list[Path]:
    """The combined-z heatmap (o = single-task verdict) and one delta heatmap per task, as `sweep` draws them."""
    from rys_forge.plots import window_heatmap

    rows, summary = read_sweep(folder)
    layers = int((summary.get("architecture") or {}).get("num_layers") or max(int(r["j"]) for r in rows))
    name = (summary.get("model") or {}).get("source", str(folder))
    planned = {f"{i}:{j}" for i in range(layers) for j in range(i + 2, layers + 1)}
    missing = sorted(planned - {r["window"] for r in rows})
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{prefix}_combined_z.png"]
    window_heatmap(rows, "combined_z", layers, written[0], f"{name}: combined z, {len(rows)} windows; o = single-task",
                   highlight=[r["window"] for r in rows if r.get("single_task_verdict") is True], centre=0.0,
                   missing=missing)
    for task in summary.get("tasks") or list(rows[0]["tasks"]):
        path = out / f"{prefix}_delta_{task}.png"
        window_heatmap(rows, f"delta:{task}", layers, path, f"{name}: {task} delta (rys - base)", centre=0.0,
                       missing=missing)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--figures", type=Path, help="folder for the heatmaps")
    parser.add_argument("--prefix", default="sweep", help="file name prefix of the heatmaps")
    args = parser.parse_args(argv)
    try:
        text = tables(args.sweep_dir, args.top)
        if args.figures:
            for path in figures(args.sweep_dir, args.figures, args.prefix):
                print(f"wrote {path}", file=sys.stderr)
    except RysForgeError as exc:
        print(f"sweep_tables: error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        write_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
