"""What a rank run writes into its folder, and reads back (`read_rank_run`): windows.csv and windows.json
(one row per window, best first), summary.json, and the figures (window heatmaps over i x j, the layer CKA
matrix, the repeat curves of the top windows). Every file goes through `RunFolder.write`: atomically (a
temporary name renamed into place), and a failed write (a full disk) is one line naming the file."""

from __future__ import annotations

import csv
import functools
import io
import json
import math
from pathlib import Path
from typing import Any

from rys_forge import plots
from rys_forge.artifacts import SUMMARY_FILE, WINDOWS_FILE, read_json
from rys_forge.runs import RunFolder
from rys_forge.errors import UsageError
from rys_forge.files import json_safe

#: metric -> (title, log colour scale, centre of a diverging colour scale or None).
HEATMAPS = {
    "score": ("Score(B) = P*A*S*D", False, None),
    "d_kl": ("D_KL: mean KL(base || RYS), nats/token", True, None),
    "cka_plateau": ("plateau CKA(x_i, x_j)", False, None),
    "delta_0": ("delta_0 = ||x_j - x_i|| / ||x_i||", True, None),
    "r_0": ("r_0 = delta_1 / delta_0 (<1: contracting)", False, 1.0),
}


def write_outputs(out: RunFolder, rows: list[dict[str, Any]], summary: dict[str, Any], num_layers: int) -> None:
    """Table (CSV, JSON), summary and figures into the run folder `out`, each written atomically.

    Args:
        out: the run folder (open: `RunFolder.session`).
        rows: one dict per window, sorted best first; NaN is written as an empty CSV cell and JSON null.
        summary: the run's summary (`top_k`, `model`, `layer_cka` and `repeat_curves` feed the figures).
        num_layers: the model's decoder layers (the heatmaps' axes).
    """
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    out.write("windows.csv", buffer.getvalue())
    out.write(WINDOWS_FILE, json.dumps(json_safe(rows), indent=1))
    out.write(SUMMARY_FILE, json.dumps(json_safe(summary), indent=2))
    top = [r["window"] for r in summary["top_k"]]
    name = summary["model"].get("source", "")
    for metric, (title, log, centre) in HEATMAPS.items():
        if any(metric in r and r[metric] is not None and not math.isnan(float(r[metric])) for r in rows):
            heatmap = functools.partial(plots.window_heatmap, rows, metric, num_layers, title=f"{name}: {title}", log=log,
                                        highlight=top if metric == "score" else (), centre=centre)
            out.write(f"heatmap_{metric}.png", lambda path, draw=heatmap: draw(path=path))
    import numpy as np

    outliers = summary["prompts"].get("outlier_tokens", 0)
    out.write("layer_cka.png", lambda path: plots.layer_cka_heatmap(
        np.array(summary["layer_cka"], dtype=float), path,
        f"{name}: CKA(x_a, x_b)" + (f", {outliers} outlier tokens excluded" if outliers else ""),
    ))
    if outliers:
        out.write("layer_cka_with_outliers.png", lambda path: plots.layer_cka_heatmap(
            np.array(summary["layer_cka_with_outliers"], dtype=float), path, f"{name}: CKA(x_a, x_b), all tokens",
        ))
    if summary["repeat_curves"]:
        out.write("repeat_curves.png", lambda path: plots.repeat_curves(summary["repeat_curves"], path, f"{name}: top windows"))


def read_rank_run(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (``windows.json``) and summary (``summary.json``, or ``{}``) of a finished rank run folder.

    Raises:
        UsageError: the folder has no ``windows.json``, or a file of it is unreadable, not JSON or of the wrong shape.
    """
    table = Path(path) / WINDOWS_FILE
    if not table.is_file():
        raise UsageError(f"{path} is not a finished rank run folder (no {WINDOWS_FILE})")
    rows = read_json(table, "rank table")
    summary_file = Path(path) / SUMMARY_FILE
    summary = read_json(summary_file, "rank summary") if summary_file.is_file() else {}
    if not isinstance(summary, dict) or not isinstance(rows, list) or not all(
            isinstance(r, dict) and isinstance(r.get("window"), str) for r in rows):
        raise UsageError(f"{path} is not a readable rank run folder: {WINDOWS_FILE} or {SUMMARY_FILE} has the wrong shape")
    return rows, summary
