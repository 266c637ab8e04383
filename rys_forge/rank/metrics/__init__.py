"""Representation metrics for probing "Repeat Your Self" (RYS) layer windows.

Notation (the design notes'): ``x_l`` is the residual stream entering layer ``l``, pooled over
tokens as an ``[N, d]`` matrix (N tokens, d features). For a window ``B = [i, j)`` the iterates are
``z_0 = x_i`` and ``z_{n+1} = T_B(z_n)``.

What lives where (every name below is importable from this package):

* ``steps`` -- :func:`relative_step` (``delta_n = ||z_{n+1} - z_n||_F / ||z_n||_F``);
  :func:`frobenius_cosine`, :func:`residual_force`, :func:`raw_cosine_closed_form` (the residual
  force ``S = x_j - x_i`` of a window, its size ``rho`` and angle ``cos_phi`` to ``x_i``);
  :func:`stationarity` (how the step changes between two passes through the window).
* ``cka`` -- :func:`linear_cka`, :func:`debiased_cka`, :func:`cka_matrix`: linear CKA with token
  centring (Kornblith et al. 2019) and its debiased estimator (unbiased HSIC, Song et al. 2012;
  Davari et al. 2022).
* ``distances`` -- :func:`mmd2_rbf`, :func:`ledoit_wolf_shrinkage`, :func:`shrunk_covariance`,
  :func:`mahalanobis_reference`, :func:`mahalanobis_shift`: junction mismatch between two token samples.
* ``fits`` -- :func:`quadratic_fit`: ``y = a n^2 + b n + c`` and ``y = a' n^2`` fits of ``1 - CKA(z_n, z_0)``.
* ``jacobian`` -- :func:`top_singular_values`: leading singular values of a Jacobian from
  Jacobian-vector and vector-Jacobian products only (block power iteration on ``J^T J`` plus
  Rayleigh-Ritz).
* ``conventions`` -- :data:`DEFAULT_DTYPE`, :func:`tf32_matmul`, and the input checks that enforce the
  conventions below.

The KL of next-token distributions is not here: it is :func:`rys_forge.divergence.kl_from_logits`,
shared with verify and heal.

Conventions:

* Inputs are torch tensors of any float dtype on any device; the arithmetic runs in float64 on the
  input's device unless a ``dtype`` keyword says otherwise. Scalars come back as Python floats.
* Memory stays ``O(N d + d^2)``, since ``N`` may be 10^4-10^5 tokens: statistics are computed in
  feature space (``d x d`` products and ``O(N d)`` vectors). An ``N x N`` token Gram is formed only
  where it is the smaller object: in CKA when there are fewer tokens than features
  (:func:`rys_forge.rank.metrics.cka.cross_sq_norm`, and :func:`cka_matrix`'s few-tokens path,
  capped at 2 GiB). The other exception is :func:`mmd2_rbf`, whose kernel matrices live on a
  subsample of at most ``max_samples`` rows per side.
* Bad arguments (wrong rank, mismatched shapes or devices, too few rows) raise ``ValueError``
  naming the offending value. A value that is mathematically undefined for valid input (a zero
  norm in a denominator, a constant representation, a constant ``y`` in an R^2) comes back as
  ``nan`` rather than raising, so a sweep over many windows does not stop on one degenerate case.
* Randomness (subsampling, start vectors) only ever uses an explicit ``torch.Generator``; when none
  is given a fresh one seeded with ``seed`` is made. The global RNG is never touched.
"""

from __future__ import annotations

from rys_forge.rank.metrics.cka import cka_matrix, debiased_cka, linear_cka
from rys_forge.rank.metrics.conventions import DEFAULT_DTYPE, tf32_matmul
from rys_forge.rank.metrics.distances import (
    MahalanobisReference,
    MahalanobisShift,
    MMDResult,
    ShrunkCovariance,
    ledoit_wolf_shrinkage,
    mahalanobis_reference,
    mahalanobis_shift,
    mmd2_rbf,
    shrunk_covariance,
)
from rys_forge.rank.metrics.fits import QuadraticFit, quadratic_fit
from rys_forge.rank.metrics.jacobian import JacobianSpectrum, top_singular_values
from rys_forge.rank.metrics.steps import (
    ResidualForce,
    Stationarity,
    frobenius_cosine,
    raw_cosine_closed_form,
    relative_step,
    residual_force,
    stationarity,
)

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
