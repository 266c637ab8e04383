"""Norms, steps and cosines of a window's iterates: ``delta_n``, the residual force ``S = x_j - x_i``
(size ``rho``, angle ``cos_phi``, the raw cosine in closed form) and the stationarity of the step.

All are ``O(N d)`` elementwise reductions of tensors of any shape (typically ``[N, d]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rys_forge.rank.metrics.conventions import DEFAULT_DTYPE, NAN, as_real_alike, ratio_or_nan


def relative_step(
    z_n: torch.Tensor, z_next: torch.Tensor, *, dtype: torch.dtype = DEFAULT_DTYPE
) -> float:
    """Relative step ``delta_n = ||z_{n+1} - z_n||_F / ||z_n||_F``.

    Args:
        z_n: Current iterate, any shape (typically ``[N, d]``).
        z_next: Next iterate ``T_B(z_n)``, same shape as ``z_n``.
        dtype: Arithmetic dtype.

    Returns:
        The relative step; ``nan`` if ``||z_n||_F == 0``.

    Raises:
        ValueError: If the shapes or devices differ.
    """
    a, b = as_real_alike(dtype, z_n=z_n, z_next=z_next)
    return ratio_or_nan(torch.linalg.vector_norm(b - a).item(), torch.linalg.vector_norm(a).item())


def frobenius_cosine(
    a: torch.Tensor, b: torch.Tensor, *, dtype: torch.dtype = DEFAULT_DTYPE
) -> float:
    """Raw (uncentred) Frobenius cosine ``<a, b>_F / (||a||_F ||b||_F)``.

    Args:
        a: Any shape.
        b: Same shape as ``a``.
        dtype: Arithmetic dtype.

    Returns:
        The cosine in ``[-1, 1]``; ``nan`` if either tensor is zero.

    Raises:
        ValueError: If the shapes or devices differ.
    """
    ta, tb = as_real_alike(dtype, a=a, b=b)
    den = (torch.linalg.vector_norm(ta) * torch.linalg.vector_norm(tb)).item()
    return ratio_or_nan(torch.sum(ta * tb).item(), den)


@dataclass(frozen=True)
class ResidualForce:
    """Residual force ``S = x_j - x_i`` of a window, relative to its input ``x_i``.

    Attributes:
        rho: ``||S||_F / ||x_i||_F``.
        cos_phi: ``<x_i, S>_F / (||x_i||_F ||S||_F)``; ``nan`` when ``S == 0``.
        raw_cosine: ``C = (1 + rho cos_phi) / sqrt(1 + rho^2 + 2 rho cos_phi)``, the closed form of
            the raw Frobenius cosine between ``x_i`` and ``x_j`` (1 when ``S == 0``).
    """

    rho: float
    cos_phi: float
    raw_cosine: float


def raw_cosine_closed_form(rho: float, cos_phi: float) -> float:
    """Raw cosine between ``x`` and ``x + S`` from ``rho = |S|/|x|`` and ``cos_phi = cos(x, S)``.

    ``C = (1 + rho cos_phi) / sqrt(1 + rho^2 + 2 rho cos_phi)``. With ``rho == 0`` the result is 1
    whatever ``cos_phi`` is (even ``nan``).

    Args:
        rho: Relative size of the step, ``>= 0``.
        cos_phi: Cosine between the base and the step, in ``[-1, 1]``.

    Returns:
        The cosine; ``nan`` if ``x + S`` is zero (``rho == 1`` and ``cos_phi == -1``).

    Raises:
        ValueError: If ``rho`` is negative.
    """
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    if rho == 0:
        return 1.0
    rc = rho * cos_phi
    den_sq = 1.0 + rho * rho + 2.0 * rc
    if den_sq <= 0.0:
        return NAN
    return (1.0 + rc) / math.sqrt(den_sq)


def residual_force(
    x_i: torch.Tensor, x_j: torch.Tensor, *, dtype: torch.dtype = DEFAULT_DTYPE
) -> ResidualForce:
    """Size and direction of the residual force ``S = x_j - x_i`` of a window ``[i, j)``.

    Args:
        x_i: Residual stream entering the window, any shape (typically ``[N, d]``).
        x_j: Residual stream leaving it, same shape.
        dtype: Arithmetic dtype.

    Returns:
        A :class:`ResidualForce`; ``rho``/``cos_phi``/``raw_cosine`` are ``nan`` if ``x_i == 0``.

    Raises:
        ValueError: If the shapes or devices differ.
    """
    a, b = as_real_alike(dtype, x_i=x_i, x_j=x_j)
    s = b - a
    norm_x = torch.linalg.vector_norm(a).item()
    norm_s = torch.linalg.vector_norm(s).item()
    if norm_x == 0.0:
        return ResidualForce(NAN, NAN, NAN)
    rho = norm_s / norm_x
    cos_phi = ratio_or_nan(torch.sum(a * s).item(), norm_x * norm_s)
    return ResidualForce(rho=rho, cos_phi=cos_phi, raw_cosine=raw_cosine_closed_form(rho, cos_phi))


@dataclass(frozen=True)
class Stationarity:
    """How the window's step changes between the first and the second pass.

    Attributes:
        norm_ratio: ``||S1||_F / ||S0||_F`` with ``S0 = z_1 - z_0`` and ``S1 = z_2 - z_1``.
        cosine: Frobenius cosine between ``S0`` and ``S1``.
    """

    norm_ratio: float
    cosine: float


def stationarity(
    z0: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, *, dtype: torch.dtype = DEFAULT_DTYPE
) -> Stationarity:
    """Compare consecutive steps ``S0 = z_1 - z_0`` and ``S1 = z_2 - z_1``.

    Args:
        z0: ``z_0 = x_i``, any shape.
        z1: ``T_B(z_0)``, same shape.
        z2: ``T_B(z_1)``, same shape.
        dtype: Arithmetic dtype.

    Returns:
        A :class:`Stationarity`; ``norm_ratio`` is ``nan`` if ``S0 == 0`` and ``cosine`` is ``nan``
        if either step is zero.

    Raises:
        ValueError: If the shapes or devices differ.
    """
    a, b, c = as_real_alike(dtype, z0=z0, z1=z1, z2=z2)
    s0 = b - a
    s1 = c - b
    n0 = torch.linalg.vector_norm(s0).item()
    n1 = torch.linalg.vector_norm(s1).item()
    cosine = ratio_or_nan(torch.sum(s0 * s1).item(), n0 * n1)
    return Stationarity(norm_ratio=ratio_or_nan(n1, n0), cosine=cosine)
