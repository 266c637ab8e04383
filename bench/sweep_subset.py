"""A sweep's flat table restricted to some of its tasks, with the combined z recomputed over them.

Models swept on different task sets are compared (``learn-score``, ``validate``) on the tasks they share: e.g.
qwen2.5-coder-1.5b's sweep adds ``rys_gsm8k_ll`` to the six accuracy tasks of the gemma-3-270m and smollm2-135m
sweeps. Writes ``OUT.csv`` and ``OUT_summary.json`` (the form ``learn-score --run`` reads).

Usage: PYTHONPATH=. python bench/sweep_subset.py SWEEP_DIR --tasks a,b,c --out docs/results/.../sweep_x.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path

from rys_forge.files import json_safe, write_atomic
from rys_forge.research.sweep import read_sweep
from rys_forge.stats import combine_z


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows, summary = read_sweep(args.sweep_dir)
    tasks = args.tasks.split(",")
    missing = [t for t in tasks if t not in rows[0]["tasks"]]
    if missing:
        print(f"sweep_subset: error: not in the sweep: {', '.join(missing)}", file=sys.stderr)
        return 2
    columns = ["window", "i", "j", "width", "repeats", "combined_z", "single_task_verdict", "dominant_task",
               "dominant_share"] + [f"{k}:{t}" for t in tasks for k in ("rys", "delta", "z", "p")]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        out = {k: row.get(k) for k in ("window", "i", "j", "width", "repeats")}
        out.update(combine_z({t: row["tasks"][t]["z"] for t in tasks}))
        for t in tasks:
            for k in ("rys", "delta", "z", "p"):
                out[f"{k}:{t}"] = row.get(f"{k}:{t}")
        writer.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in out.items()})
    write_atomic(args.out, buffer.getvalue())
    sub = {**summary, "tasks": tasks, "base": {t: summary["base"][t] for t in tasks},
           "metrics": {t: summary["metrics"][t] for t in tasks}, "derived_from": str(args.sweep_dir),
           "note": f"combined z recomputed over {', '.join(tasks)}"}
    sub.pop("best", None)
    write_atomic(args.out.with_name(f"{args.out.stem}_summary.json"), json.dumps(json_safe(sub), indent=2))
    print(f"{len(rows)} windows, {len(tasks)} tasks -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
