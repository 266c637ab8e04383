"""Linear CKA with token centring (Kornblith et al. 2019), its debiased estimator (unbiased HSIC,
Song et al. 2012; Davari et al. 2022), and the layer-by-layer CKA matrix.

Every CKA reduces to ``||Xc^T Yc||_F^2`` (:func:`cross_sq_norm`), which equals ``<Xc Xc^T, Yc Yc^T>_F``:
the ``d_x x d_y`` feature-space product is used unless the ``N x N`` token Grams are the smaller
objects (fewer tokens than features), see the package docstring on memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rys_forge.rank.metrics.conventions import DEFAULT_DTYPE, NAN, as_real, pair_of_matrices, ratio_or_nan, tf32_matmul

#: Beyond this many bytes, `cka_matrix` re-centres layers on demand instead of holding them all;
#: its token Grams (the few-tokens path) must fit in this budget too.
CKA_HOLD_BYTES = 2**31


def centre(x: torch.Tensor) -> torch.Tensor:
    """Subtract the column (per-feature) means of an ``[N, d]`` matrix."""
    return x - x.mean(dim=0, keepdim=True)


def cross_sq_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
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
    return ratio_or_nan(cross_sq_norm(xc, yc).item(), norm_x * norm_y)


def linear_cka(
    x: torch.Tensor, y: torch.Tensor, *, dtype: torch.dtype = DEFAULT_DTYPE
) -> float:
    """Linear CKA with token centring (Kornblith et al. 2019).

    ``CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with ``Xc`` = ``X`` minus its
    column means. Computed by :func:`cross_sq_norm`: in feature space (``d x d`` products), or with
    ``N x N`` token Grams only when N is below both feature dims (they are then the smaller matrices).

    Args:
        x: ``[N, d_x]`` representation (rows are tokens).
        y: ``[N, d_y]`` representation of the same tokens.
        dtype: Arithmetic dtype.

    Returns:
        CKA in ``[0, 1]``; ``nan`` if either representation is constant over tokens.

    Raises:
        ValueError: If an input is not 2-D, the row counts or devices differ.
    """
    xm, ym = pair_of_matrices(x, y, dtype, min_rows=1)
    xc, yc = centre(xm), centre(ym)
    norm_x = math.sqrt(cross_sq_norm(xc, xc).item())
    norm_y = math.sqrt(cross_sq_norm(yc, yc).item())
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
        cross = cross_sq_norm(xc, yc).item()
    tr_kl = cross - torch.dot(sx.kdiag, sy.kdiag).item()
    middle = sx.one_k_one * sy.one_k_one / ((n - 1) * (n - 2))
    last = 2.0 / (n - 2) * torch.dot(sx.k1, sy.k1).item()
    return (tr_kl + middle - last) / (n * (n - 3))


def _debiased_from_parts(h_xy: float, h_xx: float, h_yy: float) -> float:
    prod = h_xx * h_yy
    if not prod > 0.0:
        return NAN
    return h_xy / math.sqrt(prod)


def debiased_cka(
    x: torch.Tensor, y: torch.Tensor, *, dtype: torch.dtype = DEFAULT_DTYPE
) -> float:
    """Debiased linear CKA from the unbiased HSIC estimator (Song et al. 2012; Davari et al. 2022).

    ``HSIC_1(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1)/((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1]
    / (n(n-3))`` with ``K = X X^T`` and ``K~`` its zero-diagonal copy;
    ``CKA = HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L))``. ``K`` and ``L`` are never formed:
    ``tr(K~ L~) = ||X^T Y||_F^2 - sum_i ||x_i||^2 ||y_i||^2`` (the first term by :func:`cross_sq_norm`)
    and ``K~ 1 = X (X^T 1) - diag(K)``.
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
    xm, ym = pair_of_matrices(x, y, dtype, min_rows=4)
    xc, yc = centre(xm), centre(ym)
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
    (re-centred on demand), so memory stays ``O(N d)``. For linear CKA with few tokens (when
    ``L N^2`` is below the summed pair cost ``sum_{a<=b} d_a d_b``) the ``L`` centred token Grams
    ``Xc Xc^T`` (``[N, N]`` each, 2 GiB at most together) are formed once instead and each pair is
    one elementwise product of two Grams.

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

    def centre_layer(idx: int) -> torch.Tensor:
        return centre(as_real(layers[idx], f"xs[{idx}]", dtype))

    count = len(layers)
    itemsize = torch.empty((), dtype=dtype).element_size()
    n, dims = first.shape[0], [x.shape[1] for x in layers]
    held = [centre_layer(i) for i in range(count)] if sum(x.numel() for x in layers) * itemsize <= CKA_HOLD_BYTES else None
    centred = held.__getitem__ if held is not None else centre_layer
    # Token-space Grams, each formed once, beat one feature-space product per pair when
    # K N^2 < sum over pairs of N d_a d_b (few tokens, wide layers, several layers).
    pair_cost = sum(dims[a] * dims[b] for a in range(count) for b in range(a, count))
    with tf32_matmul(tf32):
        if not debiased and held is not None and count * n * n < pair_cost and count * n * n * itemsize <= CKA_HOLD_BYTES:
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
    out.diagonal().copy_(torch.where(norms > 0, 1.0, NAN))
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
            self_terms.append(math.sqrt(cross_sq_norm(xc, xc).item()))

    out = torch.empty(count, count, dtype=dtype, device=device)
    for a in range(count):
        xa = centred(a)
        out[a, a] = 1.0 if self_terms[a] > 0.0 else NAN
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
