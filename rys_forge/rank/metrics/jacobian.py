"""Leading singular values of a Jacobian from Jacobian-vector and vector-Jacobian products only
(block power iteration on ``J^T J`` plus Rayleigh-Ritz); the Jacobian is never formed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rys_forge.rank.metrics.conventions import make_generator


@dataclass(frozen=True)
class JacobianSpectrum:
    """Leading singular values of a Jacobian.

    Attributes:
        values: ``[k]`` float64 singular values, descending, on ``z0``'s device.
        iterations: Power steps (applications of ``J^T J`` to the block) performed.
        converged: Whether the relative change of the Ritz values fell below ``tol``.
    """

    values: torch.Tensor
    iterations: int
    converged: bool


def _per_column(op: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """`op` applied to every row of `rows`, batched with `torch.func.vmap` (one pass of the layers for
    the whole block instead of one per vector); falls back to a loop for an op vmap cannot batch."""
    try:
        return torch.func.vmap(op)(rows.contiguous())
    except (RuntimeError, NotImplementedError):  # an op without a batching rule
        return torch.stack([op(r) for r in rows])


def top_singular_values(
    fn: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    k: int = 3,
    iters: int = 20,
    generator: torch.Generator | None = None,
    tol: float = 1e-7,
    *,
    oversample: int = 2,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> JacobianSpectrum:
    """Top-``k`` singular values of ``J = d fn / d z`` at ``z0`` by block power iteration.

    Only ``torch.func.jvp`` (``J v``) and ``torch.func.vjp`` (``J^T u``) are used; the Jacobian
    is never formed. A block of ``p = min(k + oversample, dim)`` orthonormal vectors ``V`` is
    iterated as ``V <- qr(J^T J V)``. Each step the Ritz values ``svdvals(J V)`` (Rayleigh-Ritz
    for ``J^T J`` on ``span V``) are computed; iteration stops when the largest relative change
    of the top ``k`` falls below ``tol``, or after ``iters`` steps followed by a final
    Rayleigh-Ritz. Cost per step: ``p`` jvps + ``p`` vjps, each set batched into one ``vmap`` call
    (the forward of ``fn`` at ``z0`` for the vjp is done once). Oversampling speeds up convergence
    of the ``k``-th value when it is close to the ``(k+1)``-th. ``fn`` must support forward-mode AD.

    Args:
        fn: Map from tensors shaped like ``z0`` to tensors of any shape (typically the same:
            ``R^shape -> R^shape``), e.g. one pass through a window.
        z0: Point of linearisation, any shape (flattened internally).
        k: Number of singular values wanted, ``1 <= k <= min(dim in, dim out)``.
        iters: Maximum power steps, ``>= 1``.
        generator: Generator for the random start block.
        tol: Early-stop threshold on the relative change of the Ritz values.
        oversample: Extra block columns beyond ``k``.
        seed: Seed of a fresh CPU generator when ``generator`` is ``None``.
        dtype: Compute dtype; default ``z0.dtype`` (``fn``'s parameters must accept it).

    Returns:
        A :class:`JacobianSpectrum` with ``values`` (``[k]``, descending, float64), the number of
        power steps performed and the convergence flag.

    Raises:
        ValueError: If ``k``, ``iters`` or ``oversample`` are out of range or ``z0`` is not float.
    """
    _check_arguments(z0, iters, oversample)
    work_dtype = dtype if dtype is not None else z0.dtype
    shape = z0.shape
    z_flat = z0.detach().to(work_dtype).reshape(-1)

    def flat_fn(v: torch.Tensor) -> torch.Tensor:
        return fn(v.reshape(shape)).reshape(-1)

    out_flat, vjp_fn = torch.func.vjp(flat_fn, z_flat)
    dim_in, dim_out = z_flat.numel(), out_flat.numel()
    if not 1 <= k <= min(dim_in, dim_out):
        raise ValueError(f"k must be in [1, {min(dim_in, dim_out)}] for this Jacobian, got {k}")
    block = min(k + oversample, dim_in, dim_out)

    # The block algebra (QR, SVD) runs in float64; only the products see ``work_dtype``.
    def apply_j(vs: torch.Tensor) -> torch.Tensor:  # [dim_in, p] -> [dim_out, p]
        cols = _per_column(lambda v: torch.func.jvp(flat_fn, (z_flat,), (v,))[1], vs.T.to(work_dtype))
        return cols.T.detach().to(torch.float64)

    def apply_jt(us: torch.Tensor) -> torch.Tensor:  # [dim_out, p] -> [dim_in, p]
        cols = _per_column(lambda u: vjp_fn(u)[0], us.T.to(out_flat.dtype))
        return cols.T.detach().to(torch.float64)

    gen = make_generator(generator, seed)
    start = torch.randn(dim_in, block, generator=gen, device=gen.device, dtype=torch.float64)
    return _block_power_iteration(apply_j, apply_jt, torch.linalg.qr(start.to(z0.device)).Q, k, iters, tol)


def _check_arguments(z0: torch.Tensor, iters: int, oversample: int) -> None:
    if not isinstance(z0, torch.Tensor) or not z0.is_floating_point():
        got = getattr(z0, "dtype", type(z0).__name__)
        raise ValueError(f"z0 must be a floating-point tensor, got {got}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if oversample < 0:
        raise ValueError(f"oversample must be >= 0, got {oversample}")


def _block_power_iteration(
    apply_j: Callable[[torch.Tensor], torch.Tensor],
    apply_jt: Callable[[torch.Tensor], torch.Tensor],
    v: torch.Tensor,
    k: int,
    iters: int,
    tol: float,
) -> JacobianSpectrum:
    """``V <- qr(J^T J V)`` from the orthonormal float64 block ``v: [dim_in, p]``, with the Ritz values
    ``svdvals(J V)[:k]`` after every step; stops early when their largest relative change is below ``tol``."""

    def ritz(jv: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(jv)[:k]

    previous: torch.Tensor | None = None
    jv = apply_j(v)
    for step in range(1, iters + 1):
        v = torch.linalg.qr(apply_jt(jv)).Q
        jv = apply_j(v)
        current = ritz(jv)
        if previous is not None:
            tiny = torch.finfo(torch.float64).tiny
            change = torch.max(torch.abs(current - previous) / current.clamp_min(tiny)).item()
            if change < tol:
                return JacobianSpectrum(values=current, iterations=step, converged=True)
        previous = current
    return JacobianSpectrum(values=ritz(jv), iterations=iters, converged=False)
