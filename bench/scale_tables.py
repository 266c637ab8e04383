"""Per-configuration, per-task table of a scale sweep (`sweep --alphas ... --substeps ...`), as Markdown.

For each configuration (plain repeat `x2`, damped `x2a0.5`, sub-steps `x3s2`, ...): how many windows, the best
combined z and how many windows have combined z > 1.96, the median combined z, and per task how many windows beat
the base (paired p < 0.05, delta > 0) and are worse than it (p < 0.05, delta < 0), with the largest gain of any
window. A combined z can hide a single-task gain, so read the task columns.

Usage: PYTHONPATH=. python bench/scale_tables.py SWEEP (run folder or sweep CSV) [--out FILE.md]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from rys_forge.errors import RysForgeError
from rys_forge.files import write_atomic
from rys_forge.research.sweep import read_sweep
from rys_forge.research.sweep_rows import Visits

ALPHA = 0.05


def configuration(row: dict) -> str:
    """`x2`, `x2a0.5`, `x3s2`: the part of a row's key after the window."""
    return "x" + Visits.of(row).key(row["window"]).split("x", 1)[1]


def table(rows: list[dict]) -> str:
    """The Markdown table, one line per configuration in the order first seen."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if math.isfinite(float(row.get("combined_z", math.nan))):
            groups[configuration(row)].append(row)
    if not groups:
        raise RysForgeError("no finished window in the sweep")
    tasks = list(next(iter(groups.values()))[0]["tasks"])
    head = ("| configuration | windows | best combined z (window) | combined z > 1.96 | median combined z |"
            + "".join(f" {t}: better / worse (p<{ALPHA}) / best delta |" for t in tasks))
    lines = [head, "|---|---:|---|---:|---:|" + "---|" * len(tasks)]
    for name, group in groups.items():
        z = np.array([r["combined_z"] for r in group], dtype=float)
        best = group[int(np.argmax(z))]
        cells = []
        for task in tasks:
            entries = [(r["window"], r["tasks"][task]) for r in group if task in r["tasks"]]
            better = sum(1 for _, e in entries if e["delta"] > 0 and e["p_value"] < ALPHA)
            worse = sum(1 for _, e in entries if e["delta"] < 0 and e["p_value"] < ALPHA)
            window, top = max(entries, key=lambda we: we[1]["delta"])
            cells.append(f" {better} / {worse} / {top['delta']:+.3f} (`{window}`, p {top['p_value']:.2g}) |")
        lines.append(f"| `{name}` | {len(group)} | {best['combined_z']:+.2f} (`{best['window']}`) | "
                     f"{int(np.sum(z > 1.96))} | {float(np.median(z)):+.2f} |" + "".join(cells))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        rows, _summary = read_sweep(args.sweep, all_scales=True)
        text = table(rows)
    except RysForgeError as error:
        print(f"scale_tables: error: {error}", file=sys.stderr)
        return 2
    if args.out:
        write_atomic(args.out, text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
