"""Replay `sweep --race` on a finished (or unfinished) exhaustive sweep's recorded per-item results.

The race's decisions depend only on the paired per-item differences it has seen, so replaying its schedule on
the items an exhaustive sweep recorded gives exactly the race's calls and costs on that model (wall time aside).
Per seed (the race's item order) it prints the item-evaluations spent against the exhaustive sweep's, whether
the exhaustive best window (by the race's statistic, the mean paired difference over the tasks) was kept to the
end or its interval overlaps the race's best, and the windows called positive against those the exhaustive
sweep calls positive (the mean difference's one-sided z > 1.96 with every item, and combined z > 1.96).

Usage: PYTHONPATH=. python bench/race_replay.py SWEEP_DIR [--tasks a,b] [--looks 4] [--alpha 0.05] [--seeds 5]
       [--margin 0.005] [--growth 1.41] [--out FILE.json]
Tasks default to those whose kept metric is a per-item mean (acc, acc_norm): a race needs per-item means.

With `--race-log`, SWEEP_DIR is a *raced* sweep: its `race.jsonl` (every window's items up to where it stopped)
is replayed under another schedule, in the race's own item order. A window that the new schedule would run past
the items its race evaluated gets only those; the output counts such windows and the items they lacked (the cost
is then a lower bound by that many items). The recorded schedule itself replays the race exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from rys_forge.files import json_safe, write_atomic
from rys_forge.research.race import RaceSettings, WindowTally, critical_z, look_sizes, run_race
from rys_forge.research.sweep import read_sweep
from rys_forge.stats import combine_z


def recorded(folder: Path, tasks: list[str] | None) -> tuple[dict[str, dict[str, np.ndarray]], list[str], dict[str, float]]:
    """Per window and task the recorded paired differences (rys - base per item), the tasks, and the
    exhaustive combined z over those tasks."""
    rows, _ = read_sweep(folder)
    rows = [r for r in rows if r.get("repeats", 2) == 2 and r.get("tasks")]
    first = rows[0]["tasks"]
    if tasks is None:
        tasks = [t for t, e in first.items() if e.get("metric") in ("acc", "acc_norm")]
    base = json.loads((folder / "base.json").read_text())["run"]["items"]
    diffs: dict[str, dict[str, np.ndarray]] = {}
    combined: dict[str, float] = {}
    for row in rows:
        per_task = {}
        for task in tasks:
            entry = row["tasks"][task]
            metric = entry["metric"]
            filt = entry.get("filter", "none")
            base_items = base[task][filt]
            doc_ids = sorted(base_items, key=lambda d: (len(d), d))
            base_values = np.array([float(base_items[d]["values"][metric]) for d in doc_ids])
            per_task[task] = np.asarray(entry["items"], dtype=float) - base_values
        diffs[row["window"]] = per_task
        combined[row["window"]] = combine_z({t: row["tasks"][t]["z"] for t in tasks})["combined_z"]
    return diffs, tasks, combined


def race_log(folder: Path) -> tuple[dict[str, dict[str, np.ndarray]], list[str], dict[str, int]]:
    """A raced sweep's recorded paired differences per window and task in the race's item order (up to where
    each window stopped), the tasks, and each task's full item count."""
    summary = json.loads((folder / "summary.json").read_text())
    base = json.loads((folder / "base.json").read_text())["run"]["items"]
    keep = {t: (e["metric"], e.get("filter", "none")) for t, e in summary["base"].items()}
    records = [json.loads(line) for line in (folder / "race.jsonl").read_text().splitlines() if line.strip()]
    diffs: dict[str, dict[str, list[float]]] = {}
    for record in sorted(records, key=lambda r: r["look"]):  # stable: the race's window order within a look
        for task, values in record["values"].items():
            metric, filt = keep[task]
            diffs.setdefault(record["window_key"], {}).setdefault(task, []).extend(
                v - base[task][filt][doc]["values"][metric] for doc, v in values.items())
    full = {t: len(base[t][keep[t][1]]) for t in keep}
    return {w: {t: np.asarray(v) for t, v in per_task.items()} for w, per_task in diffs.items()}, list(keep), full


def replay(diffs: dict[str, dict[str, np.ndarray]], tasks: list[str], settings: RaceSettings, seed: int | None,
           n_items: dict[str, int] | None = None) -> dict:
    """One race over the recorded differences, items in a seeded order per task (as the race takes them), or in
    the recorded order (``seed`` None: a race log, ``n_items`` the tasks' full sizes). Windows whose recorded
    items run out get what there is (``short``: how many windows, ``missing``: how many items)."""
    n_items = n_items or {t: len(next(iter(diffs.values()))[t]) for t in tasks}
    rng = np.random.default_rng(seed)
    order = {t: (np.arange(n_items[t]) if seed is None else rng.permutation(n_items[t])) for t in tasks}
    sizes = {t: look_sizes(n_items[t], settings.looks, settings.growth) for t in tasks}
    z = critical_z(settings.alpha, settings.looks)
    tallies = {w: WindowTally() for w in diffs}
    spent, short, missing = [0], set(), [0]

    def evaluate(k: int, running: list[str]) -> bool:
        for w in running:
            for t in tasks:
                lo = sizes[t][k - 1] if k else 0
                chunk = diffs[w][t][order[t][lo:min(sizes[t][k], len(diffs[w][t]))]]
                tallies[w].add(t, chunk)
                spent[0] += len(chunk)
                if len(chunk) < sizes[t][k] - lo:
                    short.add(w)
                    missing[0] += sizes[t][k] - lo - len(chunk)
        return True

    stopped: dict[str, tuple[str, int]] = {}
    positive: set[str] = set()
    run_race(tallies, list(diffs), settings.looks, z, evaluate, lambda w, r, k: stopped.__setitem__(w, (r, k)), positive,
             drop_z=settings.drop_z, margin=settings.margin)
    return {"stopped": stopped, "positive": positive, "spent": spent[0], "tallies": tallies, "z": z,
            "short": sorted(short), "missing": missing[0]}


def judge(diffs: dict, tasks: list[str], combined: dict[str, float], result: dict) -> dict:
    exhaustive = len(diffs) * sum(len(v) for v in next(iter(diffs.values())).values())
    full = {w: WindowTally() for w in diffs}
    for w, per_task in diffs.items():
        for t in tasks:
            full[w].add(t, per_task[t])
    mean = {w: full[w].estimate() for w in diffs}
    best = max(mean, key=lambda w: mean[w][0])
    completed = [w for w, (reason, _) in result["stopped"].items() if reason == "completed"]
    race_best = max(completed, key=lambda w: result["tallies"][w].estimate()[0])
    lo_best = result["tallies"][race_best].interval(result["z"])
    lo_true = result["tallies"][best].interval(result["z"])
    truly_positive = {w for w, (d, se) in mean.items() if se > 0 and d / se > 1.96}
    return {
        "windows": len(diffs), "spent": result["spent"], "exhaustive": exhaustive,
        "fraction": result["spent"] / exhaustive,
        "dropped": sum(r == "dropped" for r, _ in result["stopped"].values()), "completed": len(completed),
        "exhaustive_best": best, "exhaustive_best_mean_diff": mean[best][0], "race_best": race_best,
        "best_kept": result["stopped"][best][0] == "completed",
        "best_overlaps": bool(lo_true[2] >= lo_best[1]),
        "race_positive": sorted(result["positive"]), "exhaustive_positive_mean_diff": sorted(truly_positive),
        "exhaustive_positive_combined_z": sorted(w for w, c in combined.items() if c > 1.96),
        "positives_kept": sorted(truly_positive & set(completed)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--tasks", default=None)
    parser.add_argument("--looks", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--drop-confidence", type=float, default=0.9)
    parser.add_argument("--margin", type=float, default=0.0, help="the race's indifference margin (--race-margin)")
    parser.add_argument("--growth", type=float, default=2.0, help="items grow by this factor from look to look (--race-growth)")
    parser.add_argument("--race-log", action="store_true", help="SWEEP_DIR is a raced sweep: replay its race.jsonl")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.race_log:
        return replay_race_log(args)
    diffs, tasks, combined = recorded(args.sweep_dir, args.tasks.split(",") if args.tasks else None)
    settings = RaceSettings(alpha=args.alpha, looks=args.looks, drop_confidence=args.drop_confidence, margin=args.margin,
                            growth=args.growth)
    results = [judge(diffs, tasks, combined, replay(diffs, tasks, settings, seed)) for seed in range(args.seeds)]
    print(f"{args.sweep_dir}: {len(diffs)} windows, tasks {', '.join(tasks)}; looks {args.looks}, alpha {args.alpha},"
          f" drop confidence {args.drop_confidence}, margin {args.margin}, growth {args.growth}")
    print("| seed | item-evals | of exhaustive | dropped | completed | exhaustive best | kept | overlaps | race positive |"
          " exhaustive positive (mean diff) | kept |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for seed, r in enumerate(results):
        print(f"| {seed} | {r['spent']} | {r['fraction']:.1%} | {r['dropped']} | {r['completed']} | {r['exhaustive_best']} "
              f"({r['exhaustive_best_mean_diff']:+.4f}) | {r['best_kept']} | {r['best_overlaps']} | "
              f"{len(r['race_positive'])} | {len(r['exhaustive_positive_mean_diff'])} | {len(r['positives_kept'])} |")
    if args.out:
        write_atomic(args.out, json.dumps(json_safe({"tasks": tasks, "looks": args.looks, "alpha": args.alpha,
                                                     "drop_confidence": args.drop_confidence, "margin": args.margin, "growth": args.growth,
                                                     "seeds": results}), indent=1))
    return 0 if all(math.isfinite(r["fraction"]) for r in results) else 1


def replay_race_log(args: argparse.Namespace) -> int:
    """`--race-log`: the recorded race under the given schedule, one line."""
    diffs, tasks, full = race_log(args.sweep_dir)
    settings = RaceSettings(alpha=args.alpha, looks=args.looks, drop_confidence=args.drop_confidence, margin=args.margin,
                            growth=args.growth)
    result = replay(diffs, tasks, settings, None, full)
    exhaustive = len(diffs) * sum(full.values())
    recorded_items = sum(len(v) for per_task in diffs.values() for v in per_task.values())
    completed = sorted(w for w, (reason, _) in result["stopped"].items() if reason == "completed")
    best = max(completed, key=lambda w: result["tallies"][w].estimate()[0]) if completed else None
    line = {"windows": len(diffs), "looks": args.looks, "growth": args.growth, "margin": args.margin,
            "spent": result["spent"], "fraction": result["spent"] / exhaustive,
            "recorded": recorded_items, "recorded_fraction": recorded_items / exhaustive,
            "short_windows": len(result["short"]), "missing_items": result["missing"],
            "completed": completed, "best_completed": best, "positive": sorted(result["positive"])}
    print(f"{args.sweep_dir}: {len(diffs)} windows; looks {args.looks}, growth {args.growth}, margin {args.margin}: "
          f"{result['spent']} item-evaluations = {line['fraction']:.1%} of exhaustive (the recorded race: "
          f"{line['recorded_fraction']:.1%}); {len(completed)} completed, best {best}; {len(result['positive'])} positive; "
          f"{len(result['short'])} windows short of recorded items by {result['missing']} items in all")
    if args.out:
        write_atomic(args.out, json.dumps(json_safe(line), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
