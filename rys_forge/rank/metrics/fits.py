"""Least-squares fits of the drift ``y_n = 1 - CKA(z_n, z_0)`` against the pass count ``n``:
``y = a n^2 + b n + c`` and the pure ``y = a' n^2`` (float64, CPU; a handful of points)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rys_forge.rank.metrics.conventions import NAN


@dataclass(frozen=True)
class QuadraticFit:
    """Least-squares fits of ``y_n = 1 - CKA(z_n, z_0)`` against the pass count ``n``.

    Attributes:
        a: Quadratic coefficient of ``y = a n^2 + b n + c``.
        b: Linear coefficient.
        c: Constant.
        r2: ``1 - SS_res/SS_tot`` of that fit.
        a_pure: Coefficient of the pure model ``y = a' n^2`` (least squares through the origin).
        r2_pure: ``1 - SS_res/SS_tot`` of the pure model, ``SS_tot`` taken about the mean of ``y``
            (so it can be negative when the pure model is worse than a constant).

    Both R^2 values are ``nan`` when ``y`` is constant (``SS_tot`` zero to rounding).
    """

    a: float
    b: float
    c: float
    r2: float
    a_pure: float
    r2_pure: float


def _r_squared(y: torch.Tensor, fitted: torch.Tensor) -> float:
    ss_res = torch.sum((y - fitted) ** 2).item()
    ss_tot = torch.sum((y - y.mean()) ** 2).item()
    eps = torch.finfo(y.dtype).eps
    if ss_tot <= (64.0 * eps) ** 2 * torch.sum(y * y).item():
        return NAN
    return 1.0 - ss_res / ss_tot


def quadratic_fit(
    y: Sequence[float] | torch.Tensor, n: Sequence[float] | torch.Tensor | None = None
) -> QuadraticFit:
    """Fit ``y = a n^2 + b n + c`` and ``y = a' n^2`` by least squares (float64, CPU).

    Args:
        y: ``[M]`` values, typically ``1 - CKA(z_n, z_0)`` for ``n = 1..4``.
        n: ``[M]`` abscissae; defaults to ``1, 2, ..., M``.

    Returns:
        A :class:`QuadraticFit`.

    Raises:
        ValueError: If the lengths differ, fewer than 3 distinct ``n`` are given, or a value is
            not finite.
    """
    yt = torch.as_tensor(y, dtype=torch.float64).detach().cpu().reshape(-1)
    if n is None:
        nt = torch.arange(1, yt.numel() + 1, dtype=torch.float64)
    else:
        nt = torch.as_tensor(n, dtype=torch.float64).detach().cpu().reshape(-1)
    if nt.numel() != yt.numel():
        raise ValueError(f"n has {nt.numel()} values but y has {yt.numel()}")
    if not (torch.isfinite(yt).all() and torch.isfinite(nt).all()):
        raise ValueError(f"n and y must be finite, got n={nt.tolist()} y={yt.tolist()}")
    if torch.unique(nt).numel() < 3:
        raise ValueError(f"a quadratic fit needs at least 3 distinct n, got n={nt.tolist()}")
    design = torch.stack([nt * nt, nt, torch.ones_like(nt)], dim=1)
    coef = torch.linalg.lstsq(design, yt[:, None], driver="gelsd").solution[:, 0]
    fitted = design @ coef
    n2 = nt * nt
    a_pure = (torch.dot(n2, yt) / torch.dot(n2, n2)).item()
    return QuadraticFit(
        a=coef[0].item(),
        b=coef[1].item(),
        c=coef[2].item(),
        r2=_r_squared(yt, fitted),
        a_pure=a_pure,
        r2_pure=_r_squared(yt, a_pure * n2),
    )
