"""How the cached engine cuts requests into forward batches: padded tokens against a per-batch cost measured on
the model (`sweep`, `sweep --race`)."""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from rys_forge.architectures import spec_for_model
from rys_forge.rank.activations import run_decoder

__all__ = ["MAX_STACK", "batch_overhead", "cut_by_length", "stack_size"]


#: The most two-visit windows the engine stacks along one batch.
MAX_STACK = 32


def stack_size(tokens: int, batch_tokens: int) -> int:
    """How many windows run stacked on a batch of ``tokens`` padded tokens: as many as fit ``batch_tokens``."""
    return max(1, min(MAX_STACK, batch_tokens // max(1, tokens)))


def cut_by_length(items: Sequence[int], lengths: Sequence[int], batch_tokens: int, overhead: int) -> list[list[int]]:
    """Cut ``items`` (sorted by ``lengths``, longest first) into consecutive batches of at most
    ``max(batch_tokens, longest)`` padded tokens that minimise padded tokens plus ``overhead`` per batch.

    Exact over cuts at length changes (a DP over the runs of equal length, O(runs^2)); a run of groups
    too big for one batch is split greedily at the batch limit.
    """
    runs: list[tuple[int, int]] = []  # (length, count), longest first
    for length in lengths:
        if runs and runs[-1][0] == length:
            runs[-1] = (length, runs[-1][1] + 1)
        else:
            runs.append((length, 1))
    best, start = [0.0] + [float("inf")] * len(runs), [0] * (len(runs) + 1)
    real = np.cumsum([0] + [length * count for length, count in runs]).tolist()  # unpadded tokens of runs[:r]
    for end in range(1, len(runs) + 1):
        rows = 0
        for first in range(end - 1, -1, -1):  # the group runs[first:end], padded to runs[first]'s length
            rows += runs[first][1]
            longest = runs[first][0]
            # any cut costs at least its unpadded tokens, and a longer group pads more: none beats best[end]
            if real[first] + rows * longest >= best[end]:
                break
            per_batch = max(1, max(batch_tokens, longest) // longest)
            cost = best[first] + rows * longest + -(-rows // per_batch) * overhead
            if cost < best[end]:
                best[end], start[end] = cost, first
    bounds, end = [], len(runs)
    while end > 0:
        bounds.append((start[end], end))
        end = start[end]
    offsets = np.cumsum([0] + [count for _, count in runs]).tolist()
    batches: list[list[int]] = []
    for first, end in reversed(bounds):
        group = list(range(offsets[first], offsets[end]))
        while group:
            per_batch = max(1, max(batch_tokens, lengths[group[0]]) // lengths[group[0]])
            batches.append([items[k] for k in group[:per_batch]])
            group = group[per_batch:]
    return batches


_OVERHEADS: "weakref.WeakKeyDictionary[nn.Module, dict[int, int]]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def batch_overhead(model: nn.Module, batch_tokens: int) -> int:
    """The fixed cost of one forward batch of ``model``, in tokens: a forward of 8 tokens against one of
    ``probe`` tokens (``batch_tokens`` on a GPU, where small batches cost their launches; 512 on a CPU),
    the fastest of three (two) after a warm-up; ``t_small / ((t_big - t_small) / (probe - 8))``, at most
    ``batch_tokens``, rounded to a power of 2 (so that timing noise rarely changes the batches of two runs).
    Measured once per model and batch size."""
    known = _OVERHEADS.setdefault(model, {})
    if batch_tokens not in known:
        spec = spec_for_model(model)
        device = next(model.parameters()).device
        probe = max(64, batch_tokens if device.type == "cuda" else min(batch_tokens, 512))
        length = min(256, probe)

        def fastest(rows: int, tokens: int, repeats: int) -> float:
            ids = torch.ones((rows, tokens), dtype=torch.long, device=device)
            times = []
            for _ in range(repeats + 1):  # the first is a warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                run_decoder(model, spec, ids, torch.ones_like(ids))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            return min(times[1:])

        small, big = fastest(1, 8, 3), fastest(probe // length, length, 2)
        per_token = max(big - small, 1e-12) / max(1, (probe // length) * length - 8)
        tokens = min(batch_tokens, small / per_token)
        rounded = 0 if tokens < 1 else int(2 ** round(math.log2(tokens)))  # a power of 2: stable across runs
        known[batch_tokens] = min(batch_tokens, rounded)
    return known[batch_tokens]
