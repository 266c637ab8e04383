"""The conventions every metric of :mod:`rys_forge.rank.metrics` follows, as code: the arithmetic dtype,
the input checks that raise ``ValueError`` naming the bad value, ``nan`` for a zero denominator, explicit
random generators, and the TF32 switch. The rules themselves are stated in the package docstring."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

DEFAULT_DTYPE = torch.float64
"""Arithmetic dtype of every metric unless its ``dtype`` keyword overrides it."""

NAN = float("nan")
"""What a mathematically undefined value comes back as."""


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


def as_real(x: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a tensor of ``dtype`` on its own device; rejects non-tensors, complex, empty."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise ValueError(f"{name} must be real, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    return x.to(dtype)


def as_matrix(x: torch.Tensor, name: str, dtype: torch.dtype, min_rows: int = 1) -> torch.Tensor:
    """Return ``x`` as an ``[N, d]`` matrix of ``dtype``; raise if it is not 2-D or too short."""
    if isinstance(x, torch.Tensor) and x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [N, d] tensor, got shape {tuple(x.shape)}")
    x = as_real(x, name, dtype)
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows (tokens), got N={x.shape[0]}")
    return x


def same_device(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` naming both tensors if they live on different devices."""
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")


def same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` naming both tensors and their shapes if the shapes differ."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}"
        )


def pair_of_matrices(
    x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, min_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two ``[N, d_x]`` / ``[N, d_y]`` matrices with the same N (token-aligned)."""
    xm = as_matrix(x, "x", dtype, min_rows)
    ym = as_matrix(y, "y", dtype, min_rows)
    same_device(xm, ym, "x", "y")
    if xm.shape[0] != ym.shape[0]:
        raise ValueError(
            "x and y must have the same number of rows (tokens): "
            f"N={xm.shape[0]} vs N={ym.shape[0]}"
        )
    return xm, ym


def ratio_or_nan(num: float, den: float) -> float:
    """``num / den`` as a float, ``nan`` when ``den`` is zero or not finite."""
    if den == 0.0 or not math.isfinite(den):
        return NAN
    return num / den


def make_generator(generator: torch.Generator | None, seed: int) -> torch.Generator:
    """``generator`` itself, or a fresh CPU generator seeded with ``seed``: the global RNG is never used."""
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(int(seed))


def as_real_alike(dtype: torch.dtype, **tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each named tensor through `as_real`, then checked against the first for shape and device (errors name
    both tensors)."""
    (first_name, first), *rest = [(name, as_real(x, name, dtype)) for name, x in tensors.items()]
    for name, x in rest:
        same_shape(first, x, first_name, name)
        same_device(first, x, first_name, name)
    return [first] + [x for _, x in rest]
