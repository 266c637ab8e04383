"""Merge sweep tables (`sweep.csv` of several run folders, or committed copies) into one table for `validate`
and `calibrate`, e.g. the 278 qwen2.5-coder-1.5b windows swept on 2026-12-02 and the 100 swept later with
`sweep --window ...`. Rows keep their values; columns are the union (a column one table lacks stays empty);
a window found in two tables is refused unless its numbers agree, and so are tables of different task lists.
Where every table has its summary beside it (`<stem>_summary.json`, or `summary.json` in a run folder) the
merged summary goes beside the output (`<out stem>_summary.json`): refused unless the base scores are the
same (the same model, items and settings), with the best window, the counts and the per-window timings
recomputed over the merged rows.

    python bench/merge_sweep_tables.py A.csv B.csv --out all.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path


def task_columns(header: list[str]) -> set[str]:
    """The `delta:<task>` columns of a sweep table: which tasks it covers."""
    return {c for c in header if c.startswith("delta:")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    header: list[str] = []
    rows: dict[str, dict[str, str]] = {}
    tasks: set[str] | None = None
    for table in args.tables:
        with table.open(newline="") as handle:
            reader = csv.DictReader(handle)
            fields = list(reader.fieldnames or [])
            if tasks is not None and task_columns(fields) != tasks:
                sys.exit(f"{table}: other tasks than the first table ({sorted(task_columns(fields) ^ tasks)})")
            tasks = task_columns(fields)
            header += [c for c in fields if c not in header]
            for row in reader:
                seen = rows.get(row["window"])
                if seen is not None and any(seen.get(k) != v for k, v in row.items() if k != "seconds"):
                    sys.exit(f"{table}: window {row['window']} is already in an earlier table with other numbers")
                rows[row["window"]] = row
    ordered = sorted(rows.values(), key=lambda r: (int(r["i"]), int(r["j"]), r.get("repeats", "")))
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(ordered)
    print(f"{len(ordered)} windows from {len(args.tables)} tables -> {args.out}")
    summaries = [summary_beside(table) for table in args.tables]
    if all(summaries):
        merged = merge_summaries(summaries, ordered, [str(t) for t in args.tables])  # type: ignore[arg-type]
        target = args.out.with_name(f"{args.out.stem}_summary.json")
        target.write_text(json.dumps(merged, indent=2) + "\n")
        print(f"summary ({merged['windows_done']} of {merged['windows_planned']} windows) -> {target}")


def summary_beside(table: Path) -> dict | None:
    """The summary a sweep table reads with (`<stem>_summary.json`, else `summary.json` beside it), or None."""
    for candidate in (table.with_name(f"{table.stem}_summary.json"), table.with_name("summary.json")):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def merge_summaries(summaries: list[dict], rows: list[dict[str, str]], sources: list[str]) -> dict:
    """The first summary with what depends on the rows recomputed over the merged ones; exits if the bases differ."""
    first = summaries[0]
    for other, source in zip(summaries[1:], sources[1:]):
        if other.get("base") != first.get("base"):
            sys.exit(f"{source}: other base scores than {sources[0]} (another model, items or settings)")

    def number(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            return math.nan

    ranked = [r for r in rows if math.isfinite(number(r.get("combined_z", "")))]
    best = max(ranked, key=lambda r: number(r["combined_z"]), default=None)
    tasks = first.get("tasks") or []
    per_window: dict = {}
    for summary in summaries:
        per_window.update((summary.get("timings") or {}).get("per_window_s") or {})
    planned = max(int(s.get("windows_planned") or s.get("windows") or 0) for s in summaries)
    merged = {**first, "windows": len(rows), "rows": len(rows), "windows_done": len(rows),
              "windows_planned": max(planned, len(rows)), "complete": len(rows) >= planned,
              "single_task_flags": sum(r.get("single_task_verdict") == "True" for r in rows),
              "timings": {"per_window_s": per_window,
                          "mean_per_window_s": sum(per_window.values()) / len(per_window) if per_window else math.nan},
              "merged_from": sources}
    merged["best"] = None if best is None else {
        "window": best["window"], "repeats": int(best.get("repeats") or 2), "combined_z": number(best["combined_z"]),
        "dominant_task": best.get("dominant_task"), "delta": {t: number(best.get(f"delta:{t}", "")) for t in tasks}}
    merged.pop("note", None)
    return merged


if __name__ == "__main__":
    main()
