"""PNG figures of a rank run: window heatmaps in Ng's layout, the layer CKA matrix, repeat curves.

Window heatmaps put the window end `j` on the x axis and the start `i` on the y axis (David Ng's
layout); each cell is the window `i:j` (layers i..j-1). Cells without a value are blank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm, TwoSlopeNorm  # noqa: E402


def save_figure(fig: Any, path: Path) -> None:
    """Save a figure atomically (temporary sibling, then rename) and close it."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def window_heatmap(
    rows: Sequence[dict[str, Any]],
    metric: str,
    num_layers: int,
    path: Path,
    title: str,
    log: bool = False,
    highlight: Sequence[str] = (),
    centre: float | None = None,
) -> None:
    """Heatmap of `metric` over windows i:j (x: end j, y: start i); `highlight` windows get a marker."""
    grid = np.full((num_layers, num_layers + 1), np.nan)
    for row in rows:
        value = row.get(metric)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            grid[row["i"], row["j"]] = value
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    finite = grid[np.isfinite(grid)]
    kwargs: dict[str, Any] = {"cmap": "viridis"}
    if log and finite.size and (finite > 0).any():
        positive = finite[finite > 0]
        kwargs["norm"] = LogNorm(vmin=max(positive.min(), 1e-6), vmax=positive.max())
        grid = np.where(grid > 0, grid, np.nan)
    elif centre is not None and finite.size and finite.min() < centre < finite.max():
        kwargs = {"cmap": "RdBu_r", "norm": TwoSlopeNorm(vcenter=centre, vmin=finite.min(), vmax=finite.max())}
    image = ax.imshow(np.ma.masked_invalid(grid), origin="upper", aspect="auto", interpolation="nearest", **kwargs)
    fig.colorbar(image, ax=ax, label=metric)
    for name in highlight:
        i, j = (int(v) for v in name.split(":"))
        ax.plot(j, i, marker="o", markersize=7, markerfacecolor="none", markeredgecolor="red", markeredgewidth=1.5)
    ax.set_xlabel("window end j (exclusive)")
    ax.set_ylabel("window start i")
    ax.set_xlim(0.5, num_layers + 0.5)
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def layer_cka_heatmap(matrix: np.ndarray, path: Path, title: str) -> None:
    """The layer-by-layer CKA matrix over the residual stream x_0..x_L."""
    fig, ax = plt.subplots(figsize=(5.6, 4.8))
    image = ax.imshow(matrix, origin="upper", cmap="magma", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="linear CKA")
    ax.set_xlabel("layer l (x_l enters layer l)")
    ax.set_ylabel("layer l")
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def repeat_curves(curves: dict[str, dict[str, list[float]]], path: Path, title: str) -> None:
    """Per top window: 1-CKA(z_n, z_0) with its n^2 fit, delta_n, and KL against the number of visits."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for name, curve in curves.items():
        n = np.arange(1, len(curve["cka_drift"]) + 1)
        line = axes[0].plot(n, curve["cka_drift"], marker="o", label=name)[0]
        if "n2_a_pure" in curve:
            fine = np.linspace(1, n[-1], 50)
            axes[0].plot(fine, curve["n2_a_pure"][0] * fine**2, linestyle=":", color=line.get_color())
        axes[1].plot(np.arange(len(curve["delta"])), curve["delta"], marker="o", color=line.get_color())
        if curve.get("kl"):
            axes[2].plot(np.arange(1, len(curve["kl"]) + 1), curve["kl"], marker="o", color=line.get_color())
    axes[0].set(xlabel="n (applications of T_B)", ylabel="1 - CKA(z_n, z_0)", title="drift (dotted: a n^2)")
    axes[1].set(xlabel="n", ylabel="delta_n", title="update size")
    axes[2].set(xlabel="visits of the block", ylabel="KL(base || RYS) nats/token", title="logit KL")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
