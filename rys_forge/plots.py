"""PNG figures: window heatmaps in Ng's layout, the layer CKA matrix and repeat curves of a rank run; the
repeats fit of a sweep; the score-order curves and score scatter of a validation.

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


def _finite(value: Any) -> bool:
    """A real, finite number (not a bool, None or text)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


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
    missing: Sequence[str] = (),
    crossed: Sequence[str] = (),
) -> None:
    """Heatmap of `metric` over windows i:j (x: end j, y: start i); `highlight` windows get a red circle,
    `crossed` ones (e.g. dropped by a race) a black cross, `missing` ones (planned, not evaluated) a grey cell."""
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
    if missing:
        gaps = np.full(grid.shape, np.nan)
        for name in missing:
            i, j = (int(v) for v in name.split(":"))
            gaps[i, j] = 1.0
        ax.imshow(np.ma.masked_invalid(gaps), origin="upper", aspect="auto", interpolation="nearest", cmap="Greys",
                  vmin=0.0, vmax=1.6)
        title = f"{title}\ngrey: {len(missing)} windows not evaluated yet"
    image = ax.imshow(np.ma.masked_invalid(grid), origin="upper", aspect="auto", interpolation="nearest", **kwargs)
    fig.colorbar(image, ax=ax, label=metric)
    for name in highlight:
        i, j = (int(v) for v in name.split(":"))
        ax.plot(j, i, marker="o", markersize=7, markerfacecolor="none", markeredgecolor="red", markeredgewidth=1.5)
    for name in crossed:
        i, j = (int(v) for v in name.split(":"))
        ax.plot(j, i, marker="x", markersize=5, color="black", markeredgewidth=1.0)
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


def repeat_fit_curves(fits: dict[str, dict[str, Any]], panels: Sequence[str], path: Path) -> None:
    """Delta against visits, one panel per entry of ``panels`` and one line per window (dots: measured;
    line: the fit ``a(n-1) - b(n-1)^2``); ``fits`` is ``{window: {panel: fit_repeat_curve(...)}}``."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for window, fit in fits.items():
            entry = fit.get(panel) or {}
            points = entry.get("points") or []
            if not points:
                continue
            n = np.array([p[0] for p in points], dtype=float)
            d = np.array([p[1] for p in points], dtype=float)
            line = ax.plot(n, d, marker="o", linestyle="none", label=window)[0]
            if _finite(entry.get("a")):
                fine = np.linspace(1, n.max(), 50)
                ax.plot(fine, entry["a"] * (fine - 1) - entry["b"] * (fine - 1) ** 2, color=line.get_color())
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set(xlabel="visits of the block n", ylabel="delta vs base", title=panel)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Perf(n) - Perf(1) = a(n-1) - b(n-1)^2", fontsize=10)
    save_figure(fig, path)


def best_so_far_curves(curves: dict[str, dict[str, Any] | None], path: Path) -> None:
    """Per outcome: the best value so far in score order vs random order (mean, 5-95% band), log x axis;
    ``curves`` maps an outcome to ``evaluations_to_best(...)["curve"]`` (None: an empty panel)."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4.6 * len(curves), 4), squeeze=False)
    for ax, (name, curve) in zip(axes[0], curves.items()):
        if not curve:
            continue
        x = np.arange(1, len(curve["score_order"]) + 1)
        ax.fill_between(x, curve["random_q05"], curve["random_q95"], color="grey", alpha=0.3, label="random order 5-95%")
        ax.plot(x, curve["random_mean"], color="grey", label="random order mean")
        ax.plot(x, curve["score_order"], color="C0", label="score order")
        ax.set(xlabel="windows evaluated", ylabel=f"best {name} so far", title=name)
        ax.set_xscale("log")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("evaluations to find the best window: score order vs random order", fontsize=10)
    save_figure(fig, path)


def outcome_scatter(panels: Sequence[dict[str, Any]], xlabel: str, path: Path) -> None:
    """One scatter per panel (``name``, ``title``, ``x``, ``y``, ``positive``: ``[n]`` each); positives red."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        y = [float(v) if _finite(v) else np.nan for v in panel["y"]]
        ax.scatter(panel["x"], y, s=12, c=["C3" if p else "C0" for p in panel["positive"]])
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set(xlabel=xlabel, ylabel=panel["name"], title=panel["title"])
    fig.suptitle("score vs sweep outcome (red: benchmark-positive)", fontsize=10)
    save_figure(fig, path)
