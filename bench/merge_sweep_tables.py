"""Merge sweep tables (`sweep.csv` of several run folders, or committed copies) into one table for `validate`
and `calibrate`, e.g. the 278 qwen2.5-coder-1.5b windows swept on 2026-12-02 and the 100 swept later with
`sweep --window ...`. Rows keep their values; columns are the union (a column one table lacks stays empty);
a window found in two tables is refused unless its numbers agree, and so are tables of different task lists.

    python bench/merge_sweep_tables.py A.csv B.csv --out all.csv
"""

from __future__ import annotations

import argparse
import csv
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


if __name__ == "__main__":
    main()
