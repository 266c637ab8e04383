"""Junction mismatch between two token samples: unbiased RBF-kernel MMD^2 (median heuristic),
the Ledoit-Wolf shrunk covariance, and Mahalanobis distances under it.

MMD's kernel matrices are the one place where sample-by-sample matrices are formed by design: on a
random subsample of at most ``max_samples`` rows per side. The covariance side works in ``d x d``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rys_forge.rank.metrics.cka import centre, cross_sq_norm
from rys_forge.rank.metrics.conventions import DEFAULT_DTYPE, NAN, as_matrix, make_generator, same_device, tf32_matmul


def _subsample(
    x: torch.Tensor, max_samples: int | None, generator: torch.Generator
) -> torch.Tensor:
    """At most ``max_samples`` distinct random rows of ``x`` (all rows, in order, if it fits)."""
    if max_samples is None or x.shape[0] <= max_samples:
        return x
    idx = torch.randperm(x.shape[0], generator=generator, device=generator.device)[:max_samples]
    return x[idx.to(x.device)]


def _paired_samples(
    x: torch.Tensor, y: torch.Tensor, min_rows_y: int, dtype: torch.dtype, max_samples: int | None,
    generator: torch.Generator | None, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both samples as ``[N, d]`` matrices of ``dtype`` (same device and width checked), each subsampled to
    ``max_samples`` rows with one generator, ``x`` first."""
    xm = as_matrix(x, "x", dtype, min_rows=2)
    ym = as_matrix(y, "y", dtype, min_rows=min_rows_y)
    same_device(xm, ym, "x", "y")
    if xm.shape[1] != ym.shape[1]:
        raise ValueError(f"x has d={xm.shape[1]} features but y has d={ym.shape[1]}")
    gen = make_generator(generator, seed)
    return _subsample(xm, max_samples, gen), _subsample(ym, max_samples, gen)


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
    xs, ys = _paired_samples(x, y, 2, dtype, max_samples, generator, seed)
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
    xm = as_matrix(x, "x", dtype, min_rows=2)
    xc = centre(xm)
    return _lw_shrinkage(xc, cross_sq_norm(xc, xc).item())


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
    xm = as_matrix(x, "x", dtype, min_rows=2)
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
    xs, ys = _paired_samples(x, y, 1, dtype, max_samples, generator, seed)
    ref = reference if reference is not None else mahalanobis_reference(xs, shrinkage=shrinkage, dtype=dtype)
    if ref.cholesky is None:
        return MahalanobisShift(NAN, NAN, ref.shrinkage, ref.n, ys.shape[0])
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
    xm = as_matrix(x, "x", dtype, min_rows=2)
    sc = shrunk_covariance(xm, shrinkage=shrinkage, dtype=dtype)
    chol, info = torch.linalg.cholesky_ex(sc.covariance)
    if int(info.item()) != 0:
        return MahalanobisReference(sc.mean, None, sc.shrinkage, NAN, xm.shape[0])
    whitener = None
    if tf32:
        eye = torch.eye(chol.shape[0], dtype=chol.dtype, device=chol.device)
        whitener = torch.linalg.solve_triangular(chol, eye, upper=False)
    ref_distance = _mahalanobis_rows(chol, sc.mean, xm, whitener).mean().item()
    return MahalanobisReference(sc.mean, chol, sc.shrinkage, ref_distance, xm.shape[0], whitener)
