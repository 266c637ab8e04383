"""What a rank run writes into its folder: windows.csv and windows.json (one row per window, best
first), summary.json, and the figures (window heatmaps over i x j, the layer CKA matrix, the repeat
curves of the top windows). Every file is written atomically (a temporary name renamed into place)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from rys_forge import plots
from rys_forge.artifacts import SUMMARY_FILE, WINDOWS_FILE
from rys_forge.files import json_safe, write_atomic

#: metric -> (title, log colour scale, centre of a diverging colour scale or None).
HEATMAPS = {
    "score": ("Score(B) = P*A*S*D", False, None),
    "d_kl": ("D_KL: mean KL(base || RYS), nats/token", True, None),
    "cka_plateau": ("plateau CKA(x_i, x_j)", False, None),
    "delta_0": ("delta_0 = ||x_j - x_i|| / ||x_i||", True, None),
    "r_0": ("r_0 = delta_1 / delta_0 (<1: contracting)", False, 1.0),
}


def write_outputs(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any], num_layers: int) -> None:
    """Table (CSV, JSON), summary and figures into the run folder `out`, each written atomically.

    Args:
        out: the run folder.
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
    write_atomic(out / "windows.csv", buffer.getvalue())
    write_atomic(out / WINDOWS_FILE, json.dumps(json_safe(rows), indent=1))
    write_atomic(out / SUMMARY_FILE, json.dumps(json_safe(summary), indent=2))
    top = [r["window"] for r in summary["top_k"]]
    name = summary["model"].get("source", "")
    for metric, (title, log, centre) in HEATMAPS.items():
        if any(metric in r and r[metric] is not None and not math.isnan(float(r[metric])) for r in rows):
            plots.window_heatmap(
                rows, metric, num_layers, out / f"heatmap_{metric}.png", f"{name}: {title}", log=log,
                highlight=top if metric == "score" else (), centre=centre,
            )
    import numpy as np

    outliers = summary["prompts"].get("outlier_tokens", 0)
    plots.layer_cka_heatmap(
        np.array(summary["layer_cka"], dtype=float), out / "layer_cka.png",
        f"{name}: CKA(x_a, x_b)" + (f", {outliers} outlier tokens excluded" if outliers else ""),
    )
    if outliers:
        plots.layer_cka_heatmap(
            np.array(summary["layer_cka_with_outliers"], dtype=float), out / "layer_cka_with_outliers.png",
            f"{name}: CKA(x_a, x_b), all tokens",
        )
    if summary["repeat_curves"]:
        plots.repeat_curves(summary["repeat_curves"], out / "repeat_curves.png", f"{name}: top windows")
