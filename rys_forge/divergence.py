"""The one KL of next-token distributions, used by rank's probes, verify and heal."""

from __future__ import annotations

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
