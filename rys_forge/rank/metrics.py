"""Representation metrics for probing "Repeat Your Self" (RYS) layer windows.

Notation (the design notes'): ``x_l`` is the residual stream entering layer ``l``, pooled over
tokens as an ``[N, d]`` matrix (N tokens, d features). For a window ``B = [i, j)`` the iterates are
``z_0 = x_i`` and ``z_{n+1} = T_B(z_n)``.

What lives here:

* :func:`relative_step` -- ``delta_n = ||z_{n+1} - z_n||_F / ||z_n||_F``.
* :func:`linear_cka`, :func:`debiased_cka`, :func:`cka_matrix` -- linear CKA with token centring
  (Kornblith et al. 2019) and its debiased estimator (unbiased HSIC, Song et al. 2012; Davari et
  al. 2022).
* :func:`frobenius_cosine`, :func:`residual_force`, :func:`raw_cosine_closed_form` -- the residual
  force ``S = x_j - x_i`` of a window, its size ``rho`` and angle ``cos_phi`` to ``x_i``.
* :func:`stationarity` -- how the step changes between two passes through the window.
* :func:`mmd2_rbf`, :func:`ledoit_wolf_shrinkage`, :func:`shrunk_covariance`,
  :func:`mahalanobis_shift` -- junction mismatch between two token samples.
* :func:`quadratic_fit` -- ``y = a n^2 + b n + c`` and ``y = a' n^2`` fits of ``1 - CKA(z_n, z_0)``.
* :func:`top_singular_values` -- leading singular values of a Jacobian from Jacobian-vector and
  vector-Jacobian products only (block power iteration on ``J^T J`` plus Rayleigh-Ritz).

Conventions:

* Inputs are torch tensors of any float dtype on any device; the arithmetic runs in float64 on the
  input's device unless a ``dtype`` keyword says otherwise. Scalars come back as Python floats.
* Everything is computed in feature space (``d x d`` products and ``O(N d)`` vectors): no
  ``N x N`` token Gram matrix is ever formed, since ``N`` may be 10^4-10^5 tokens. The only
  exception is :func:`mmd2_rbf`, whose kernel matrices live on a subsample of at most
  ``max_samples`` rows per side.
* Bad arguments (wrong rank, mismatched shapes or devices, too few rows) raise ``ValueError``
  naming the offending value. A value that is mathematically undefined for valid input (a zero
  norm in a denominator, a constant representation, a constant ``y`` in an R^2) comes back as
  ``nan`` rather than raising, so a sweep over many windows does not stop on one degenerate case.
* Randomness (subsampling, start vectors) only ever uses an explicit ``torch.Generator``; when none
  is given a fresh one seeded with ``seed`` is made. The global RNG is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_DTYPE",
    "JacobianSpectrum",
    "MahalanobisReference",
    "MahalanobisShift",
    "MMDResult",
    "QuadraticFit",
    "ResidualForce",
    "ShrunkCovariance",
    "Stationarity",
    "cka_matrix",
    "debiased_cka",
    "frobenius_cosine",
    "ledoit_wolf_shrinkage",
    "linear_cka",
    "mahalanobis_reference",
    "mahalanobis_shift",
    "mmd2_rbf",
    "quadratic_fit",
    "raw_cosine_closed_form",
    "relative_step",
    "residual_force",
    "shrunk_covariance",
    "stationarity",
    "tf32_matmul",
    "top_singular_values",
]

DEFAULT_DTYPE = torch.float64
"""Arithmetic dtype of every metric unless its ``dtype`` keyword overrides it."""

_NAN = float("nan")

#: Beyond this many bytes, `cka_matrix` re-centres layers on demand instead of holding them all.
_CKA_HOLD_BYTES = 2**31


@contextmanager
def tf32_matmul(enabled: bool = True) -> Iterator[None]:
    """While active, float32 matmuls on CUDA may run on TF32 tensor cores (inputs rounded to a 10-bit
    mantissa, float32 accumulation): about 5x the float32/float64 rate of an H100. No effect on CPU or
    on other dtypes; the previous setting is restored on exit."""
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 spells the switch `fp32_precision`; older versions `allow_tf32`.
    name, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    old = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, old)


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


def _as_real(x: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a tensor of ``dtype`` on its own device; rejects non-tensors, complex, empty."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise ValueError(f"{name} must be real, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    return x.to(dtype)


def _as_matrix(x: torch.Tensor, name: str, dtype: torch.dtype, min_rows: int = 1) -> torch.Tensor:
    """Return ``x`` as an ``[N, d]`` matrix of ``dtype``; raise if it is not 2-D or too short."""
    if isinstance(x, torch.Tensor) and x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [N, d] tensor, got shape {tuple(x.shape)}")
    x = _as_real(x, name, dtype)
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows (tokens), got N={x.shape[0]}")
    return x


def _same_device(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")


def _same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}"
        )


def _pair_of_matrices(
    x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, min_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two ``[N, d_x]`` / ``[N, d_y]`` matrices with the same N (token-aligned)."""
    xm = _as_matrix(x, "x", dtype, min_rows)
    ym = _as_matrix(y, "y", dtype, min_rows)
    _same_device(xm, ym, "x", "y")
    if xm.shape[0] != ym.shape[0]:
        raise ValueError(
            "x and y must have the same number of rows (tokens): "
            f"N={xm.shape[0]} vs N={ym.shape[0]}"
        )
    return xm, ym


def _ratio(num: float, den: float) -> float:
    """``num / den`` as a float, ``nan`` when ``den`` is zero or not finite."""
    if den == 0.0 or not math.isfinite(den):
        return _NAN
    return num / den


def _make_generator(generator: torch.Generator | None, seed: int) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(int(seed))


# --------------------------------------------------------------------------------------------
# Norms, steps, cosines
# --------------------------------------------------------------------------------------------


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
    a = _as_real(z_n, "z_n", dtype)
    b = _as_real(z_next, "z_next", dtype)
    _same_shape(a, b, "z_n", "z_next")
    _same_device(a, b, "z_n", "z_next")
    return _ratio(torch.linalg.vector_norm(b - a).item(), torch.linalg.vector_norm(a).item())


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
    ta = _as_real(a, "a", dtype)
    tb = _as_real(b, "b", dtype)
    _same_shape(ta, tb, "a", "b")
    _same_device(ta, tb, "a", "b")
    den = (torch.linalg.vector_norm(ta) * torch.linalg.vector_norm(tb)).item()
    return _ratio(torch.sum(ta * tb).item(), den)


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
        return _NAN
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
    a = _as_real(x_i, "x_i", dtype)
    b = _as_real(x_j, "x_j", dtype)
    _same_shape(a, b, "x_i", "x_j")
    _same_device(a, b, "x_i", "x_j")
    s = b - a
    norm_x = torch.linalg.vector_norm(a).item()
    norm_s = torch.linalg.vector_norm(s).item()
    if norm_x == 0.0:
        return ResidualForce(_NAN, _NAN, _NAN)
    rho = norm_s / norm_x
    cos_phi = _ratio(torch.sum(a * s).item(), norm_x * norm_s)
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
    a = _as_real(z0, "z0", dtype)
    b = _as_real(z1, "z1", dtype)
    c = _as_real(z2, "z2", dtype)
    _same_shape(a, b, "z0", "z1")
    _same_shape(a, c, "z0", "z2")
    _same_device(a, b, "z0", "z1")
    _same_device(a, c, "z0", "z2")
    s0 = b - a
    s1 = c - b
    n0 = torch.linalg.vector_norm(s0).item()
    n1 = torch.linalg.vector_norm(s1).item()
    cosine = _ratio(torch.sum(s0 * s1).item(), n0 * n1)
    return Stationarity(norm_ratio=_ratio(n1, n0), cosine=cosine)


# --------------------------------------------------------------------------------------------
# CKA
# --------------------------------------------------------------------------------------------


def _centre(x: torch.Tensor) -> torch.Tensor:
    """Subtract the column (per-feature) means of an ``[N, d]`` matrix."""
    return x - x.mean(dim=0, keepdim=True)


def _cross_sq_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a^T b||_F^2`` for ``a: [N, d_a]``, ``b: [N, d_b]``, as a 0-d tensor.

    Uses the ``d_a x d_b`` product; when N is smaller than both feature dims the identical
    ``<a a^T, b b^T>_F`` is cheaper (its ``N x N`` matrices are then smaller than ``d x d`` ones).
    """
    n, da = a.shape
    db = b.shape[1]
    if n < da and n < db:
        return torch.sum((a @ a.T) * (b @ b.T))
    return torch.sum((a.T @ b) ** 2)


def _linear_cka_centred(xc: torch.Tensor, yc: torch.Tensor, norm_x: float, norm_y: float) -> float:
    return _ratio(_cross_sq_norm(xc, yc).item(), norm_x * norm_y)


def linear_cka(
    x: torch.Tensor, y: torch.Tensor, *, dtype: torch.dtype = DEFAULT_DTYPE
) -> float:
    """Linear CKA with token centring (Kornblith et al. 2019).

    ``CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with ``Xc`` = ``X`` minus its
    column means. Computed in feature space; no ``N x N`` matrix is formed.

    Args:
        x: ``[N, d_x]`` representation (rows are tokens).
        y: ``[N, d_y]`` representation of the same tokens.
        dtype: Arithmetic dtype.

    Returns:
        CKA in ``[0, 1]``; ``nan`` if either representation is constant over tokens.

    Raises:
        ValueError: If an input is not 2-D, the row counts or devices differ.
    """
    xm, ym = _pair_of_matrices(x, y, dtype, min_rows=1)
    xc, yc = _centre(xm), _centre(ym)
    norm_x = math.sqrt(_cross_sq_norm(xc, xc).item())
    norm_y = math.sqrt(_cross_sq_norm(yc, yc).item())
    return _linear_cka_centred(xc, yc, norm_x, norm_y)


@dataclass(frozen=True)
class _HsicStats:
    """Per-representation pieces of the unbiased HSIC, all ``O(N)`` (for ``K = X X^T``)."""

    kdiag: torch.Tensor  # [N] diag(K) = squared row norms
    k1: torch.Tensor  # [N] K~ 1 = X (X^T 1) - diag(K)
    one_k_one: float  # 1^T K~ 1


def _hsic_stats(xc: torch.Tensor) -> _HsicStats:
    kdiag = torch.sum(xc * xc, dim=1)
    colsum = xc.sum(dim=0)
    k1 = xc @ colsum - kdiag
    one_k_one = (torch.dot(colsum, colsum) - kdiag.sum()).item()
    return _HsicStats(kdiag=kdiag, k1=k1, one_k_one=one_k_one)


def _hsic1(
    xc: torch.Tensor, yc: torch.Tensor, sx: _HsicStats, sy: _HsicStats, cross: float | None = None
) -> float:
    """Unbiased HSIC_1(K, L) for ``K = X X^T``, ``L = Y Y^T`` from feature-space pieces."""
    n = xc.shape[0]
    if cross is None:
        cross = _cross_sq_norm(xc, yc).item()
    tr_kl = cross - torch.dot(sx.kdiag, sy.kdiag).item()
    middle = sx.one_k_one * sy.one_k_one / ((n - 1) * (n - 2))
    last = 2.0 / (n - 2) * torch.dot(sx.k1, sy.k1).item()
    return (tr_kl + middle - last) / (n * (n - 3))


def _debiased_from_parts(h_xy: float, h_xx: float, h_yy: float) -> float:
    prod = h_xx * h_yy
    if not prod > 0.0:
        return _NAN
    return h_xy / math.sqrt(prod)


def debiased_cka(
    x: torch.Tensor, y: torch.Tensor, *, dtype: torch.dtype = DEFAULT_DTYPE
) -> float:
    """Debiased linear CKA from the unbiased HSIC estimator (Song et al. 2012; Davari et al. 2022).

    ``HSIC_1(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1)/((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1]
    / (n(n-3))`` with ``K = X X^T`` and ``K~`` its zero-diagonal copy;
    ``CKA = HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L))``. Evaluated in feature space:
    ``tr(K~ L~) = ||X^T Y||_F^2 - sum_i ||x_i||^2 ||y_i||^2`` and ``K~ 1 = X (X^T 1) - diag(K)``.
    The estimator is invariant to per-feature translations, so the columns are centred first
    purely for numerical stability (residual streams carry large mean components).

    Args:
        x: ``[N, d_x]`` representation, ``N >= 4``.
        y: ``[N, d_y]`` representation of the same tokens.
        dtype: Arithmetic dtype.

    Returns:
        Debiased CKA (may be slightly negative); ``nan`` if a self-HSIC is not positive.

    Raises:
        ValueError: If an input is not 2-D, ``N < 4``, or the row counts or devices differ.
    """
    xm, ym = _pair_of_matrices(x, y, dtype, min_rows=4)
    xc, yc = _centre(xm), _centre(ym)
    sx, sy = _hsic_stats(xc), _hsic_stats(yc)
    h_xy = _hsic1(xc, yc, sx, sy)
    return _debiased_from_parts(h_xy, _hsic1(xc, xc, sx, sx), _hsic1(yc, yc, sy, sy))


def cka_matrix(
    xs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    debiased: bool = False,
    dtype: torch.dtype = DEFAULT_DTYPE,
    tf32: bool = False,
) -> torch.Tensor:
    """Layer-by-layer CKA matrix.

    The per-layer pieces (centred self-norm ``||Xc^T Xc||_F``, or the ``O(N)`` unbiased-HSIC
    vectors and self-HSIC) are computed once per layer; each pair then costs one cross product.
    The centred layers are held in ``dtype`` when they fit in 2 GiB; beyond that only two at a time
    (re-centred on demand), so memory stays ``O(N d)``.

    Args:
        xs: ``L`` representations ``[N, d_l]`` of the same N tokens (a list, or an ``[L, N, d]``
            tensor), all on one device.
        debiased: Use :func:`debiased_cka` instead of :func:`linear_cka` (needs ``N >= 4``).
        dtype: Arithmetic dtype.
        tf32: With float32 on CUDA, run the products on TF32 tensor cores (:func:`tf32_matmul`).

    Returns:
        ``[L, L]`` symmetric tensor of ``dtype`` on the inputs' device, 1 on the diagonal (``nan``
        on the diagonal and in the row/column of a constant layer).

    Raises:
        ValueError: If ``xs`` is empty, a layer is not 2-D, or row counts or devices differ.
    """
    layers = list(xs)
    if not layers:
        raise ValueError("xs is empty: need at least one [N, d] layer")
    min_rows = 4 if debiased else 1
    for idx, layer in enumerate(layers):
        if not isinstance(layer, torch.Tensor) or layer.dim() != 2:
            shape = tuple(layer.shape) if isinstance(layer, torch.Tensor) else type(layer).__name__
            raise ValueError(f"xs[{idx}] must be a 2-D [N, d] tensor, got {shape}")
    first = layers[0]
    if first.shape[0] < min_rows:
        raise ValueError(f"xs[0] needs at least {min_rows} rows (tokens), got N={first.shape[0]}")
    for idx, layer in enumerate(layers):
        if layer.shape[0] != first.shape[0]:
            raise ValueError(
                f"xs[{idx}] has N={layer.shape[0]} rows but xs[0] has N={first.shape[0]}"
            )
        if layer.device != first.device:
            raise ValueError(f"xs[{idx}] is on {layer.device} but xs[0] is on {first.device}")

    def centre(idx: int) -> torch.Tensor:
        return _centre(_as_real(layers[idx], f"xs[{idx}]", dtype))

    count = len(layers)
    itemsize = torch.empty((), dtype=dtype).element_size()
    n, dims = first.shape[0], [x.shape[1] for x in layers]
    held = [centre(i) for i in range(count)] if sum(x.numel() for x in layers) * itemsize <= _CKA_HOLD_BYTES else None
    centred = held.__getitem__ if held is not None else centre
    # Token-space Grams, each formed once, beat one feature-space product per pair when
    # K N^2 < sum over pairs of N d_a d_b (few tokens, wide layers, several layers).
    pair_cost = sum(dims[a] * dims[b] for a in range(count) for b in range(a, count))
    with tf32_matmul(tf32):
        if not debiased and held is not None and count * n * n < pair_cost and count * n * n * itemsize <= _CKA_HOLD_BYTES:
            return _cka_from_grams([x @ x.T for x in held], dtype, first.device)
        return _cka_pairs(count, centred, debiased, dtype, first.device)


def _cka_from_grams(grams: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Linear CKA from centred token Grams ``K_a = Xc_a Xc_a^T``: ``||Xc_a^T Xc_b||_F^2 = <K_a, K_b>_F``."""
    count = len(grams)
    inner = torch.empty(count, count, dtype=dtype, device=device)
    for a in range(count):
        for b in range(a, count):
            inner[a, b] = inner[b, a] = torch.sum(grams[a] * grams[b])
    norms = inner.diagonal().sqrt()
    out = inner / torch.outer(norms, norms)  # a constant layer: 0/0 = NaN in its row and column
    out.diagonal().copy_(torch.where(norms > 0, 1.0, _NAN))
    return out


def _cka_pairs(
    count: int, centred: Callable[[int], torch.Tensor], debiased: bool, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The body of :func:`cka_matrix`: self terms once per layer, then one cross product per pair."""
    stats: list[_HsicStats] = []
    self_terms: list[float] = []
    for idx in range(count):
        xc = centred(idx)
        if debiased:
            st = _hsic_stats(xc)
            stats.append(st)
            self_terms.append(_hsic1(xc, xc, st, st))
        else:
            self_terms.append(math.sqrt(_cross_sq_norm(xc, xc).item()))

    out = torch.empty(count, count, dtype=dtype, device=device)
    for a in range(count):
        xa = centred(a)
        out[a, a] = 1.0 if self_terms[a] > 0.0 else _NAN
        for b in range(a + 1, count):
            xb = centred(b)
            if debiased:
                h_ab = _hsic1(xa, xb, stats[a], stats[b])
                value = _debiased_from_parts(h_ab, self_terms[a], self_terms[b])
            else:
                value = _linear_cka_centred(xa, xb, self_terms[a], self_terms[b])
            out[a, b] = value
            out[b, a] = value
    return out


# --------------------------------------------------------------------------------------------
# Junction mismatch: MMD and Mahalanobis
# --------------------------------------------------------------------------------------------


def _subsample(
    x: torch.Tensor, max_samples: int | None, generator: torch.Generator
) -> torch.Tensor:
    """At most ``max_samples`` distinct random rows of ``x`` (all rows, in order, if it fits)."""
    if max_samples is None or x.shape[0] <= max_samples:
        return x
    idx = torch.randperm(x.shape[0], generator=generator, device=generator.device)[:max_samples]
    return x[idx.to(x.device)]


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[n_a, n_b]`` squared Euclidean distances, clamped at 0."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return d2.clamp_min_(0.0)


def _median(values: torch.Tensor) -> float:
    """Median of a 1-D tensor (mean of the two middle values for an even count, like numpy)."""
    v, _ = torch.sort(values)
    m = v.numel()
    if m % 2:
        return v[m // 2].item()
    return 0.5 * (v[m // 2 - 1].item() + v[m // 2].item())


@dataclass(frozen=True)
class MMDResult:
    """Unbiased RBF-kernel MMD^2 between two token samples.

    Attributes:
        mmd2: The unbiased U-statistic ``MMD^2_u`` (can be slightly negative when equal in law).
        bandwidth: ``sigma`` of ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2))``.
        n_x: Rows of ``x`` used (after subsampling).
        n_y: Rows of ``y`` used (after subsampling).
    """

    mmd2: float
    bandwidth: float
    n_x: int
    n_y: int


def mmd2_rbf(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    max_samples: int | None = 1024,
    bandwidth: float | None = None,
    generator: torch.Generator | None = None,
    seed: int = 0,
    dtype: torch.dtype = DEFAULT_DTYPE,
) -> MMDResult:
    """Unbiased MMD^2 with an RBF kernel and the median-heuristic bandwidth.

    ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2))`` and
    ``MMD^2_u = sum_{i!=j} k(x_i, x_j)/(m(m-1)) + sum_{i!=j} k(y_i, y_j)/(n(n-1))
    - 2 sum_{i,j} k(x_i, y_j)/(m n)``. Unless given, ``sigma`` is the median of the pairwise
    distances ``||u - v||`` over all distinct pairs of the pooled subsample (1 if that median is 0).
    Each side is first reduced to at most ``max_samples`` random rows without replacement: ``x``
    first, then ``y``, from the same generator.

    Args:
        x: ``[N_x, d]`` reference sample (e.g. tokens of ``x_i``).
        y: ``[N_y, d]`` other sample (e.g. tokens of ``x_j``); N_y may differ from N_x.
        max_samples: Row cap per side; ``None`` uses all rows (``O(N^2)`` memory).
        bandwidth: Fixed ``sigma > 0`` instead of the median heuristic.
        generator: Generator for the subsample (its device is used for ``randperm``).
        seed: Seed of a fresh CPU generator when ``generator`` is ``None``.
        dtype: Arithmetic dtype.

    Returns:
        An :class:`MMDResult`.

    Raises:
        ValueError: If an input is not 2-D, has fewer than 2 rows, the feature dims or devices
            differ, ``max_samples < 2`` or ``bandwidth <= 0``.
    """
    if max_samples is not None and max_samples < 2:
        raise ValueError(f"max_samples must be >= 2 or None, got {max_samples}")
    if bandwidth is not None and not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    xm = _as_matrix(x, "x", dtype, min_rows=2)
    ym = _as_matrix(y, "y", dtype, min_rows=2)
    _same_device(xm, ym, "x", "y")
    if xm.shape[1] != ym.shape[1]:
        raise ValueError(f"x has d={xm.shape[1]} features but y has d={ym.shape[1]}")
    gen = _make_generator(generator, seed)
    xs = _subsample(xm, max_samples, gen)
    ys = _subsample(ym, max_samples, gen)
    m, n = xs.shape[0], ys.shape[0]

    d_xx = _sq_dists(xs, xs)
    d_yy = _sq_dists(ys, ys)
    d_xy = _sq_dists(xs, ys)
    if bandwidth is None:
        iu_x = torch.triu_indices(m, m, offset=1, device=xs.device)
        iu_y = torch.triu_indices(n, n, offset=1, device=xs.device)
        pooled = torch.cat(
            [d_xx[iu_x[0], iu_x[1]], d_yy[iu_y[0], iu_y[1]], d_xy.reshape(-1)]
        ).sqrt_()
        sigma = _median(pooled)
        if not sigma > 0.0:
            sigma = 1.0
    else:
        sigma = float(bandwidth)

    scale = -1.0 / (2.0 * sigma * sigma)
    k_xx = torch.exp(d_xx * scale)
    k_yy = torch.exp(d_yy * scale)
    k_xy = torch.exp(d_xy * scale)
    term_x = (k_xx.sum() - k_xx.diagonal().sum()).item() / (m * (m - 1))
    term_y = (k_yy.sum() - k_yy.diagonal().sum()).item() / (n * (n - 1))
    term_xy = k_xy.sum().item() / (m * n)
    return MMDResult(mmd2=term_x + term_y - 2.0 * term_xy, bandwidth=sigma, n_x=m, n_y=n)


def ledoit_wolf_shrinkage(x: torch.Tensor, *, dtype: torch.dtype = DEFAULT_DTYPE) -> float:
    """Ledoit-Wolf shrinkage intensity towards a scaled identity (as ``sklearn.covariance``).

    With ``Xc`` the centred data, ``S = Xc^T Xc / N`` (maximum-likelihood covariance) and
    ``mu = tr(S)/d``, the target is ``mu I`` and the returned ``s`` in ``[0, 1]`` minimises the
    estimated Frobenius risk of ``(1 - s) S + s mu I``. Uses ``sum_i ||x_i||^4`` (``O(N d)``) and
    ``||S||_F^2`` (one ``d x d`` product).

    Args:
        x: ``[N, d]`` sample, ``N >= 2``.
        dtype: Arithmetic dtype.

    Returns:
        The shrinkage ``s``; 0 for a constant sample.

    Raises:
        ValueError: If ``x`` is not 2-D or has fewer than 2 rows.
    """
    xm = _as_matrix(x, "x", dtype, min_rows=2)
    xc = _centre(xm)
    return _lw_shrinkage(xc, _cross_sq_norm(xc, xc).item())


def _lw_shrinkage(xc: torch.Tensor, gram_sq: float) -> float:
    """Ledoit-Wolf shrinkage from centred data and ``||Xc^T Xc||_F^2``."""
    n, d = xc.shape
    if d == 1:  # nothing to shrink towards (sklearn returns 0 too)
        return 0.0
    row_sq = torch.sum(xc * xc, dim=1)
    trace_s = row_sq.sum().item() / n
    mu = trace_s / d
    beta_raw = torch.sum(row_sq * row_sq).item()  # = sum((X^2)^T X^2)
    delta_raw = gram_sq / (n * n)  # ||S||_F^2
    beta = (beta_raw / n - delta_raw) / (d * n)
    delta = (delta_raw - 2.0 * mu * trace_s + d * mu * mu) / d  # ||S - mu I||_F^2 / d
    beta = min(beta, delta)
    if beta == 0.0 or delta <= 0.0:
        return 0.0
    return max(0.0, beta / delta)


@dataclass(frozen=True)
class ShrunkCovariance:
    """A Ledoit-Wolf shrunk covariance ``(1 - s) S + s mu I``.

    Attributes:
        covariance: ``[d, d]`` shrunk covariance.
        mean: ``[d]`` column mean of the sample.
        shrinkage: The ``s`` used.
    """

    covariance: torch.Tensor
    mean: torch.Tensor
    shrinkage: float


def shrunk_covariance(
    x: torch.Tensor, *, shrinkage: float | None = None, dtype: torch.dtype = DEFAULT_DTYPE
) -> ShrunkCovariance:
    """Mean and Ledoit-Wolf shrunk covariance of a sample.

    Args:
        x: ``[N, d]`` sample, ``N >= 2``.
        shrinkage: Fixed ``s`` in ``[0, 1]`` instead of the Ledoit-Wolf estimate.
        dtype: Arithmetic dtype.

    Returns:
        A :class:`ShrunkCovariance` on ``x``'s device. The ``d x d`` covariance costs
        ``8 d^2`` bytes in float64 (512 MiB at ``d = 8192``).

    Raises:
        ValueError: If ``x`` is not 2-D, has fewer than 2 rows, or ``shrinkage`` is outside [0, 1].
    """
    if shrinkage is not None and not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    xm = _as_matrix(x, "x", dtype, min_rows=2)
    mean = xm.mean(dim=0)
    xc = xm - mean
    n, d = xc.shape
    emp = (xc.T @ xc) / n
    if shrinkage is None:
        shrinkage = _lw_shrinkage(xc, torch.sum(emp * emp).item() * n * n)
    mu = torch.diagonal(emp).sum().item() / d
    cov = emp * (1.0 - shrinkage)
    cov.diagonal().add_(shrinkage * mu)
    return ShrunkCovariance(covariance=cov, mean=mean, shrinkage=float(shrinkage))


@dataclass(frozen=True)
class MahalanobisShift:
    """Mahalanobis distances of one sample from another's mean.

    Attributes:
        mean_distance: Mean over rows ``y_k`` of ``sqrt((y_k - m_x)^T C^-1 (y_k - m_x))``.
        reference_mean_distance: The same for the rows of ``x`` itself (an in-sample baseline;
            about ``sqrt(d)`` for well-sampled Gaussian data without shrinkage).
        shrinkage: Ledoit-Wolf shrinkage ``s`` of ``C`` (or the one given).
        n_x: Rows of ``x`` used.
        n_y: Rows of ``y`` used.
    """

    mean_distance: float
    reference_mean_distance: float
    shrinkage: float
    n_x: int
    n_y: int


def _mahalanobis_rows(
    chol: torch.Tensor, mean: torch.Tensor, rows: torch.Tensor, whitener: torch.Tensor | None = None
) -> torch.Tensor:
    """``[M]`` distances of ``rows: [M, d]`` from ``mean`` under ``C = chol chol^T``: a triangular
    solve, or with ``whitener = chol^{-1}`` one matmul on TF32 tensor cores (CUDA)."""
    if whitener is not None:
        with tf32_matmul():
            return torch.linalg.vector_norm((rows - mean) @ whitener.T, dim=1)
    w = torch.linalg.solve_triangular(chol, (rows - mean).T, upper=False)
    return torch.linalg.vector_norm(w, dim=0)


def mahalanobis_shift(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    shrinkage: float | None = None,
    max_samples: int | None = None,
    generator: torch.Generator | None = None,
    seed: int = 0,
    dtype: torch.dtype = DEFAULT_DTYPE,
    reference: "MahalanobisReference | None" = None,
) -> MahalanobisShift:
    """Mean Mahalanobis distance of the rows of ``y`` from the mean of ``x``.

    The metric is ``C``, the Ledoit-Wolf shrunk covariance of ``x`` (:func:`shrunk_covariance`),
    which stays invertible when ``d > N``. Distances use a Cholesky factor and a triangular solve
    (or, with a ``reference`` built with ``tf32=True``, the inverse factor in one TF32 matmul).

    Args:
        x: ``[N_x, d]`` reference sample (e.g. tokens of ``x_i``), ``N_x >= 2``.
        y: ``[N_y, d]`` sample to measure (e.g. tokens of ``x_j``).
        shrinkage: Fixed shrinkage in ``[0, 1]`` instead of the Ledoit-Wolf estimate.
        max_samples: Optional row cap per side (random rows without replacement, ``x`` first);
            ``None`` uses every row.
        generator: Generator for the subsample.
        seed: Seed of a fresh CPU generator when ``generator`` is ``None``.
        dtype: Arithmetic dtype.

    Returns:
        A :class:`MahalanobisShift`; distances are ``nan`` if ``C`` is singular (a constant ``x``,
        or ``shrinkage=0`` with ``d >= N_x``).

    Raises:
        ValueError: If an input is not 2-D, ``x`` has fewer than 2 rows, the feature dims or
            devices differ, ``max_samples < 2`` or ``shrinkage`` is outside [0, 1].
    """
    if max_samples is not None and max_samples < 2:
        raise ValueError(f"max_samples must be >= 2 or None, got {max_samples}")
    xm = _as_matrix(x, "x", dtype, min_rows=2)
    ym = _as_matrix(y, "y", dtype, min_rows=1)
    _same_device(xm, ym, "x", "y")
    if xm.shape[1] != ym.shape[1]:
        raise ValueError(f"x has d={xm.shape[1]} features but y has d={ym.shape[1]}")
    gen = _make_generator(generator, seed)
    xs = _subsample(xm, max_samples, gen)
    ys = _subsample(ym, max_samples, gen)
    ref = reference if reference is not None else mahalanobis_reference(xs, shrinkage=shrinkage, dtype=dtype)
    if ref.cholesky is None:
        return MahalanobisShift(_NAN, _NAN, ref.shrinkage, ref.n, ys.shape[0])
    dist_y = _mahalanobis_rows(ref.cholesky, ref.mean, ys, ref.whitener)
    return MahalanobisShift(
        mean_distance=dist_y.mean().item(),
        reference_mean_distance=ref.reference_mean_distance,
        shrinkage=ref.shrinkage,
        n_x=ref.n,
        n_y=ys.shape[0],
    )


@dataclass(frozen=True)
class MahalanobisReference:
    """The reference side of :func:`mahalanobis_shift`, reusable across many ``y`` samples.

    Attributes:
        mean: ``[d]`` mean of the reference sample.
        cholesky: ``[d, d]`` lower Cholesky factor of its shrunk covariance (None if not PD).
        shrinkage: Ledoit-Wolf shrinkage used.
        reference_mean_distance: Mean distance of the reference rows themselves.
        n: Reference rows used.
        whitener: ``cholesky^{-1}`` when distances are to run as TF32 matmuls, else None.
    """

    mean: torch.Tensor
    cholesky: torch.Tensor | None
    shrinkage: float
    reference_mean_distance: float
    n: int
    whitener: torch.Tensor | None = None


def mahalanobis_reference(
    x: torch.Tensor, *, shrinkage: float | None = None, dtype: torch.dtype = DEFAULT_DTYPE, tf32: bool = False
) -> MahalanobisReference:
    """Mean, shrunk-covariance Cholesky factor and in-sample mean distance of ``x: [N, d]``.

    Computing this once per reference layer saves a ``d^3`` factorisation per window. With ``tf32``
    (float32 on CUDA) it also keeps ``chol^{-1}``, so each window's distances are one TF32 matmul
    instead of a float32 triangular solve.
    """
    xm = _as_matrix(x, "x", dtype, min_rows=2)
    sc = shrunk_covariance(xm, shrinkage=shrinkage, dtype=dtype)
    chol, info = torch.linalg.cholesky_ex(sc.covariance)
    if int(info.item()) != 0:
        return MahalanobisReference(sc.mean, None, sc.shrinkage, _NAN, xm.shape[0])
    whitener = None
    if tf32:
        eye = torch.eye(chol.shape[0], dtype=chol.dtype, device=chol.device)
        whitener = torch.linalg.solve_triangular(chol, eye, upper=False)
    ref_distance = _mahalanobis_rows(chol, sc.mean, xm, whitener).mean().item()
    return MahalanobisReference(sc.mean, chol, sc.shrinkage, ref_distance, xm.shape[0], whitener)


# --------------------------------------------------------------------------------------------
# Quadratic amplification fit
# --------------------------------------------------------------------------------------------


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
        return _NAN
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


# --------------------------------------------------------------------------------------------
# Jacobian spectrum
# --------------------------------------------------------------------------------------------


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
    if not isinstance(z0, torch.Tensor) or not z0.is_floating_point():
        got = getattr(z0, "dtype", type(z0).__name__)
        raise ValueError(f"z0 must be a floating-point tensor, got {got}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if oversample < 0:
        raise ValueError(f"oversample must be >= 0, got {oversample}")
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

    def ritz(jv: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(jv)[:k]

    gen = _make_generator(generator, seed)
    start = torch.randn(dim_in, block, generator=gen, device=gen.device, dtype=torch.float64)
    v = torch.linalg.qr(start.to(z0.device)).Q

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
