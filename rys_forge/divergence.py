"""The one KL of next-token distributions, used by rank's probes, verify and heal: `kl_from_logits` between
two sets of logits, and rank's form for many windows against one base (`BaseDistribution`, `kl_rows`), with
its top-1 agreement (`top1_agrees`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def kl_from_logits(
    logits_p: torch.Tensor, logits_q: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Per-position ``KL(p || q)`` with ``p = softmax(logits_p)``, ``q = softmax(logits_q)``.

    Uses ``log_softmax`` in ``dtype`` (float32 by default to keep ``[B, T, V]`` logits with
    large vocabularies affordable; pass ``torch.float64`` for tiny KLs). Vocabulary entries where
    ``p`` is exactly zero (``-inf`` logits) contribute 0.

    Args:
        logits_p: ``[..., V]`` logits of the reference distribution.
        logits_q: ``[..., V]`` logits of the other distribution, same shape.
        dtype: Dtype of the ``log_softmax`` and the sum.

    Returns:
        ``[...]`` tensor of KL values (nats) in ``dtype`` on the inputs' device.

    Raises:
        ValueError: If the shapes or devices differ or the logits are 0-D.
    """
    if not isinstance(logits_p, torch.Tensor) or not isinstance(logits_q, torch.Tensor):
        raise ValueError("logits_p and logits_q must be torch.Tensors")
    if logits_p.dim() == 0:
        raise ValueError("logits must have a vocabulary dimension, got a 0-D tensor")
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits_p has shape {tuple(logits_p.shape)} but logits_q has shape {tuple(logits_q.shape)}")
    if logits_p.device != logits_q.device:
        raise ValueError(f"logits_p and logits_q are on different devices: {logits_p.device} vs {logits_q.device}")
    log_p = torch.log_softmax(logits_p.to(dtype), dim=-1)
    log_q = torch.log_softmax(logits_q.to(dtype), dim=-1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros((), dtype=dtype, device=p.device))
    return terms.sum(dim=-1)


@dataclass(frozen=True)
class BaseDistribution:
    """The base model's next-token distributions at `K` positions, in the float64 terms that every window's
    KL against them reuses (`kl_rows`), computed once per base pass.

    Attributes:
        lse: `[K]` log-normaliser (logsumexp) of the base logits `b`.
        probs: `[K, V]` probabilities `p = softmax(b)` (8 bytes a vocabulary entry and position: 335 MB for
            gemma's 262k vocabulary at 160 positions).
        cross: `[K]` `sum_v p_v b_v`.
    """

    lse: torch.Tensor
    probs: torch.Tensor
    cross: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor) -> "BaseDistribution":
        """The terms of `[K, V]` float32 `logits`, in float64."""
        b = logits.double()
        lse = torch.logsumexp(b, dim=-1)
        probs = (b - lse[:, None]).exp_()
        return cls(lse=lse, probs=probs, cross=torch.where(probs > 0, probs * b, 0.0).sum(dim=-1))  # 0 log 0 = 0


def top1_agrees(logits: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
    """`[K]` bool: `logits.argmax(-1) == top1`, from a maximum and a gather (`argmax` over a 262k vocabulary is
    several times slower than `amax` on CPU). A row whose `top1` entry attains the maximum agrees unless an
    earlier entry attains it too (`argmax` picks the first maximal index): only that prefix is scanned."""
    top = logits.amax(dim=-1)
    index = top1.to(logits.device)
    agree = logits.gather(-1, index[:, None]).squeeze(-1) == top
    rows = agree.nonzero().flatten()
    for row, first in zip(rows.tolist(), index[rows].tolist()):  # one transfer of the indices, not one a row
        if first and bool((logits[row, :first] == top[row]).any()):
            agree[row] = False
    return agree


def kl_rows(base: BaseDistribution, logits: torch.Tensor) -> torch.Tensor:
    """`[K]` float64 KL(p || softmax(logits)) against the base distribution `base`, from float32 `[K, V]`
    logits `q`, a row at a time on CPU.

    `KL = sum p (log p - log q) = (sum p b - sum p q) + (lse(q) - lse(b))`: with the base's terms cached
    (`BaseDistribution`), a window's row costs one float64 logsumexp and one dot product, where computing
    `sum p (log p - log q)` from the logits took two exponentials and four passes more (3x slower). The
    same float64 numbers as `rys_forge.divergence.kl_from_logits(..., dtype=torch.float64)` up to summation
    order; a row whose dot product is not finite (a `-inf` logit where `p` is 0) is summed term by term
    with `0 log 0 = 0`. A row of float64 temporaries (2 MiB at a 262k vocabulary) stays in cache.
    """
    if base.probs.shape != logits.shape:
        raise ValueError(f"base distribution has shape {tuple(base.probs.shape)} but logits {tuple(logits.shape)}")
    step = 1 if logits.device.type == "cpu" else max(1, logits.shape[0])  # a GPU takes the whole matrix at once
    out = []
    for first in range(0, logits.shape[0], step):
        rows = slice(first, first + step)
        p = base.probs[rows].to(logits.device)
        q = logits[rows].double()
        lse = torch.logsumexp(q, dim=-1)
        dot = (p * q).sum(dim=-1)
        if not torch.isfinite(dot).all():
            dot = torch.where(p > 0, p * q, 0.0).sum(dim=-1)
        out.append(base.cross[rows].to(logits.device) - dot + lse - base.lse[rows].to(logits.device))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=logits.device)
