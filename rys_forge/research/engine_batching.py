"""How the cached engine lays requests out in forward batches (`sweep`, `sweep --race`): packed into rows of
whole sequences (:func:`pack_rows`; attention kept within each sequence by its position ids), or one request a row,
cut by padded tokens against a per-batch cost measured on the model (:func:`cut_by_length`)."""

from __future__ import annotations

import bisect
import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from rys_forge.architectures import spec_for_model
from rys_forge.rank.activations import run_decoder

__all__ = [
    "MAX_STACK", "EngineBatch", "batch_overhead", "cut_by_length", "lay_out", "make_batch", "pack_rows", "stack_size",
]


#: The most two-visit windows the engine stacks along one batch.
MAX_STACK = 32


def stack_size(tokens: int, batch_tokens: int) -> int:
    """How many windows run stacked on a batch of ``tokens`` padded tokens: as many as fit ``batch_tokens``."""
    return max(1, min(MAX_STACK, batch_tokens // max(1, tokens)))


def pack_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Indices of ``lengths`` packed into rows of at most ``row_length`` tokens, whole sequences only: best fit,
    longest first (each sequence goes to the open row it fills most tightly). Rows in order of creation."""
    if any(n > row_length for n in lengths):
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit rows of {row_length}")
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row), sorted: the open rows
    for k in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        at = bisect.bisect_left(room, (lengths[k], -1))
        if at < len(room):
            left, row = room.pop(at)
        else:
            left, row = row_length, len(rows)
            rows.append([])
        rows[row].append(k)
        if left - lengths[k] > 0:
            bisect.insort(room, (left - lengths[k], row))
    return rows


@dataclass
class EngineBatch:
    """One forward batch of the cached engine, and (once captured) its layer inputs."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | None  # [B, T] padding mask of one-request rows; None when packed
    position_ids: torch.Tensor | None  # [B, T] positions within each packed sequence; None when not packed
    rows: torch.Tensor  # [K] row of each continuation position
    cols: torch.Tensor  # [K] position whose logits predict the target
    targets: torch.Tensor  # [K] continuation token
    owner: torch.Tensor  # [K] request index (0..N-1) of each position
    tokens: int  # real (unpadded) tokens
    shared_rows: bool  # packed, and some row holds more than one sequence (its padding counts as one)
    hidden: list[torch.Tensor] | None = None
    layer_kwargs: list[dict[str, Any]] | None = None


def lay_out(lengths: Sequence[int], batch_tokens: int, row_cap: int, overhead: int) -> list[tuple[list[list[int]], bool]]:
    """Batches of rows of request indices, each with whether its rows are packed: requests of at most ``row_cap``
    tokens packed into rows as long as the longest of them (:func:`pack_rows`), as many a batch as fit
    ``batch_tokens``; longer requests (all with ``row_cap`` 0) one a row, cut by length against ``overhead``
    (:func:`cut_by_length`). A packed row attends over its whole length (``T^2`` per row), so the cap bounds
    what packing adds to the attention's work."""
    short = [k for k, n in enumerate(lengths) if n <= row_cap]
    out: list[tuple[list[list[int]], bool]] = []
    if short:
        row_length = max(lengths[k] for k in short)
        rows = [[short[k] for k in row] for row in pack_rows([lengths[k] for k in short], row_length)]
        per_batch = max(1, batch_tokens // row_length)
        out += [(rows[a : a + per_batch], True) for a in range(0, len(rows), per_batch)]
    long = sorted((k for k, n in enumerate(lengths) if n > row_cap), key=lambda k: -lengths[k])
    if long:
        cut = cut_by_length(long, [lengths[k] for k in long], batch_tokens, overhead)
        out += [([[k] for k in batch], False) for batch in cut]
    return out


def make_batch(batch: list[list[int]], inputs: list[list[int]], conts: list[list[int]], pad_id: int, packed: bool,
               device: torch.device) -> EngineBatch:
    """One batch's tensors: its rows' sequences one after another (position ids restarting at 0 for each
    sequence and for the padding after them when packed), and where each continuation token is predicted
    (``conts[k]`` are the last tokens of ``inputs[k]`` plus the one after it)."""
    length = max(sum(len(inputs[k]) for k in row) for row in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    positions = torch.zeros((len(batch), length), dtype=torch.long)
    rows, cols, targets, owner = [], [], [], []
    for r, row in enumerate(batch):
        offset = 0
        for k in row:
            seq, cont = inputs[k], conts[k]
            ids[r, offset : offset + len(seq)] = torch.tensor(seq)
            mask[r, offset : offset + len(seq)] = 1
            positions[r, offset : offset + len(seq)] = torch.arange(len(seq))
            for o, token in enumerate(cont):
                rows.append(r)
                cols.append(offset + len(seq) - len(cont) + o)
                targets.append(token)
                owner.append(k)
            offset += len(seq)
        positions[r, offset:] = torch.arange(length - offset)  # the padding: a sequence of its own

    def to(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    shared = packed and any(len(row) > 1 or sum(len(inputs[k]) for k in row) < length for row in batch)
    return EngineBatch(ids.to(device), None if packed else mask.to(device), positions.to(device) if packed else None,
                       to(rows), to(cols), to(targets), to(owner), int(mask.sum()), shared)


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
