"""Compare two `rys-forge rank` run folders window by window: did a change keep what rank finds?

For every numeric column of windows.csv present in both runs: the largest absolute and relative
difference over the windows (relative to the larger magnitude of the two values), the window where it
occurs, and whether every window is within `atol + rtol * |reference|` (NaN must match NaN). Then the top
10 (raw order and the short list), the Spearman correlation of the scores, the classes, and the timings
from summary.json. Writes a markdown table and a JSON file.

    python bench/compare_rank_runs.py REFERENCE_RUN NEW_RUN [--rtol 1e-4] [--atol 1e-6] \\
        [--md docs/results/rank_speed/x.md] [--json docs/results/rank_speed/x.json] [--note "how the runs were made"]

Timing columns (`probe_s`) and the rank positions are not held to the tolerance (positions are
compared through the top-10 checks).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

#: Columns that are not results: the time a window took, and bookkeeping compared separately.
NOT_RESULTS = {"probe_s", "rank", "shortlist", "i", "j", "width", "jac_iters"}


def read_rows(folder: Path) -> dict[str, dict[str, str]]:
    """windows.csv of a run folder, keyed by window."""
    with (folder / "windows.csv").open(newline="") as handle:
        return {row["window"]: row for row in csv.DictReader(handle)}


def _number(text: str | None) -> float | None:
    if text is None or text == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        return None


def column_diffs(ref: dict[str, dict[str, str]], new: dict[str, dict[str, str]], rtol: float, atol: float) -> list[dict[str, Any]]:
    """One entry per numeric column shared by both runs: max abs/rel difference, where, and within tolerance."""
    windows = sorted(set(ref) & set(new))
    columns = [c for c in next(iter(ref.values())) if c in next(iter(new.values())) and c not in NOT_RESULTS]
    out = []
    for column in columns:
        pairs = [(w, _number(ref[w].get(column)), _number(new[w].get(column))) for w in windows]
        if any(a is None or b is None for _, a, b in pairs):
            continue  # text column (window, class)
        worst_abs = worst_rel = 0.0
        at_abs = at_rel = ""
        nan_mismatch = failures = compared = 0
        for window, a, b in pairs:
            if math.isnan(a) or math.isnan(b):
                nan_mismatch += math.isnan(a) != math.isnan(b)
                continue
            compared += 1
            diff = abs(a - b)
            rel = diff / max(abs(a), abs(b)) if diff else 0.0
            if diff > worst_abs:
                worst_abs, at_abs = diff, window
            if rel > worst_rel:
                worst_rel, at_rel = rel, window
            failures += diff > atol + rtol * abs(a)
        out.append({
            "column": column, "compared": compared, "max_abs": worst_abs, "max_abs_window": at_abs,
            "max_rel": worst_rel, "max_rel_window": at_rel, "nan_mismatch": nan_mismatch,
            "outside_tolerance": failures, "ok": failures == 0 and nan_mismatch == 0,
        })
    return out


def _ordered(rows: dict[str, dict[str, str]], key: str) -> list[str]:
    ranked = [(float(r[key]), w) for w, r in rows.items() if r.get(key) not in (None, "")]
    return [w for _, w in sorted(ranked)]


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (scipy)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def compare(reference: Path, new: Path, rtol: float, atol: float) -> dict[str, Any]:
    """Everything the report shows, as one dict."""
    ref_rows, new_rows = read_rows(reference), read_rows(new)
    shared = sorted(set(ref_rows) & set(new_rows))
    scores = [(float(ref_rows[w]["score"]), float(new_rows[w]["score"])) for w in shared]
    finite = [(a, b) for a, b in scores if math.isfinite(a) and math.isfinite(b)]
    top_ref, top_new = _ordered(ref_rows, "rank")[:10], _ordered(new_rows, "rank")[:10]
    short_ref, short_new = _ordered(ref_rows, "shortlist")[:10], _ordered(new_rows, "shortlist")[:10]
    summaries = [json.loads((p / "summary.json").read_text()) for p in (reference, new)]
    return {
        "reference": str(reference), "new": str(new), "rtol": rtol, "atol": atol,
        "windows": {"reference": len(ref_rows), "new": len(new_rows), "shared": len(shared)},
        "columns": column_diffs(ref_rows, new_rows, rtol, atol),
        "top10_raw": {"reference": top_ref, "new": top_new, "equal": top_ref == top_new},
        "top10_shortlist": {"reference": short_ref, "new": short_new, "equal": short_ref == short_new},
        "spearman_score": spearman([a for a, _ in finite], [b for _, b in finite]) if len(finite) > 2 else math.nan,
        "class_changes": [w for w in shared if ref_rows[w].get("class") != new_rows[w].get("class")],
        "timings": {"reference": summaries[0].get("timings", {}), "new": summaries[1].get("timings", {})},
    }


def markdown(result: dict[str, Any]) -> str:
    """The report as markdown: verdicts first, then the per-column table and the timings."""
    lines = [
        f"# rank: {result['new']} against {result['reference']}", "",
        *[f"- {note}" for note in result.get("notes", [])], *([""] if result.get("notes") else []),
        f"Tolerance per value: |new - ref| <= {result['atol']:g} + {result['rtol']:g} |ref|; NaN must stay NaN.", "",
        f"- windows: {result['windows']}",
        f"- top 10 (raw score order) equal: **{result['top10_raw']['equal']}**"
        f" ({', '.join(result['top10_raw']['new'])})",
        f"- short list (top 10) equal: **{result['top10_shortlist']['equal']}**"
        f" ({', '.join(result['top10_shortlist']['new'])})",
        f"- Spearman of the scores: **{result['spearman_score']:.8f}**",
        f"- windows whose class changed: {result['class_changes'] or 'none'}",
        f"- columns within tolerance: **{sum(c['ok'] for c in result['columns'])} of {len(result['columns'])}**", "",
        "| column | max abs diff | at | max rel diff | at | outside tol. | NaN mismatch |",
        "|---|---:|---|---:|---|---:|---:|",
    ]
    for c in result["columns"]:
        lines.append(f"| {c['column']} | {c['max_abs']:.3g} | {c['max_abs_window']} | {c['max_rel']:.3g} | "
                     f"{c['max_rel_window']} | {c['outside_tolerance']} | {c['nan_mismatch']} |")
    lines += ["", "| timing (s) | reference | new |", "|---|---:|---:|"]
    ref_t, new_t = result["timings"]["reference"], result["timings"]["new"]
    for key in ("base_pass_s", "windows_s", "per_window_s", "jacobian_s", "repeat_curves_s", "total_s"):
        if key in ref_t or key in new_t:
            lines.append(f"| {key} | {ref_t.get(key, math.nan):.2f} | {new_t.get(key, math.nan):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path, help="run folder of the reference (e.g. the code before a change)")
    parser.add_argument("new", type=Path, help="run folder to compare with it")
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--atol", type=float, default=1e-6)
    parser.add_argument("--md", type=Path, default=None, help="write the markdown report here too")
    parser.add_argument("--json", type=Path, default=None, help="write the full comparison as JSON here")
    parser.add_argument("--note", action="append", default=[], help="a line on how the runs were made (repeatable)")
    args = parser.parse_args()
    result = compare(args.reference, args.new, args.rtol, args.atol)
    result["notes"] = args.note
    text = markdown(result)
    print(text)
    for path, content in ((args.md, text), (args.json, json.dumps(result, indent=2) + "\n")):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)


if __name__ == "__main__":
    main()
