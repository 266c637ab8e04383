"""One cached base pass over a prompt set, and the block map `T_B` replayed from the cache.

The base model runs once; forward pre-hooks record the residual stream entering every decoder layer
(`x_0..x_{L-1}`), the stream entering the final norm (`x_L`), and the exact keyword arguments each
layer received (attention masks per attention type, rotary position embeddings, position ids). The
block map `T_B` for `B=[i,j)` then applies layers `i..j-1` to any `[B, T, d]` state with those same
arguments, which is exactly what the repeated model does on a second visit (no KV cache involved).

Statistics pool the valid tokens only: padding and special tokens (BOS, whose residual is the same for
every prompt and often orders of magnitude larger) are excluded, and so are outlier positions: tokens
whose residual norm at some layer exceeds `outlier_factor` times that layer's median token norm. These
are the "massive activations" of Sun et al. (2024): attention-sink tokens (typically the first token
of a prompt, BOS or not) whose norms run 10-1000x the rest and would otherwise dominate every statistic
summed over tokens (a layer-CKA matrix of all ones, deltas that only see the sink). Logits are only materialised at a
fixed random subsample of positions (`kl_positions` per prompt): gemma's vocabulary has 262k entries,
and the LM head over every token would cost ~30 decoder layers. With `kl_fraction < 1` only a share
of the prompts (spread evenly over lengths, batched apart) carry KL positions, so the tail pass
(layers j..L-1 from z_2) that the KL needs runs on those prompts only. With `visit_fraction < 1` the second
visit `z_2` itself runs on a share of the prompts that holds every deep and KL prompt (the GPU budget: `z_2`
on every prompt is half of a window's layer passes there).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rys_forge.architectures import ArchSpec, get_path, spec_for_model
from rys_forge.divergence import BaseDistribution, kl_rows, top1_agrees
from rys_forge.errors import PromptError
from rys_forge.repeat import scaled_visit


@dataclass
class CachedBatch:
    """One padded batch of the base pass.

    Attributes:
        input_ids: `[B, T]` token ids (right-padded).
        valid: `[B, T]` bool, True for tokens that enter statistics (not padding, special or outlier).
        outlier: `[B, T]` bool, True for the excluded outlier positions (massive activations).
        hidden: `L+1` tensors `[B, T, d]`: `hidden[l]` is `x_l`, the stream entering layer `l`
            (`hidden[L]` enters the final norm).
        layer_kwargs: per layer, the keyword arguments the base pass gave it.
        kl_index: `[K, 2]` (row, position) pairs where logits are compared.
        base_logits: `[K, V]` float32 logits of the base model at `kl_index` (None without KL positions).
        base_top1: `[K]` the base model's argmax token.
        base: the base distribution at `kl_index` in the float64 terms every window's KL reuses
            (`BaseDistribution`; None without KL positions).
        families: prompt family of each row.
        prompt_ids: index of each row's prompt in the input list.
        deep: whether the deeper iterates `z_3..z_n` are computed on this batch.
        visit: whether the second visit `z_2` is computed on this batch (every deep or KL batch is one).
    """

    input_ids: torch.Tensor
    valid: torch.Tensor
    hidden: list[torch.Tensor]
    layer_kwargs: list[dict[str, Any]]
    kl_index: torch.Tensor
    base_logits: torch.Tensor | None
    base_top1: torch.Tensor | None
    families: list[str]
    prompt_ids: list[int] = field(default_factory=list)
    deep: bool = True
    outlier: torch.Tensor | None = None
    base: BaseDistribution | None = None
    visit: bool = True


@dataclass
class ActivationCache:
    """The residual stream of a base pass, with everything needed to replay any block of layers."""

    model: nn.Module
    spec: ArchSpec
    batches: list[CachedBatch]
    num_layers: int
    tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    memo: dict[Any, Any] = field(default_factory=dict)  # per-layer statistics shared by windows (`shared`)
    memo_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    damped: dict[tuple[int, float], nn.Module] = field(default_factory=dict, repr=False)  # (layer, scale) -> visit

    def shared(self, key: Any, compute: Callable[[], Any], keep: int = 4) -> Any:
        """`compute()`, memoised under `key` for the windows that follow (e.g. one factorisation per start
        layer). Safe when windows are probed in several threads (two may each compute a missing key once);
        the oldest entries beyond `keep` are dropped (windows come grouped by start layer)."""
        with self.memo_lock:
            if key in self.memo:
                return self.memo[key]
        value = compute()
        with self.memo_lock:
            self.memo[key] = value
            while len(self.memo) > keep:
                self.memo.pop(next(iter(self.memo)))
        return value

    @property
    def layers(self) -> nn.ModuleList:
        return get_path(self.model, self.spec.layers_path)

    def pooled(self, layer: int, with_outliers: bool = False) -> torch.Tensor:
        """`x_layer` over all valid tokens (`with_outliers`: plus the excluded outlier positions): `[N, d]`."""
        def keep(b: CachedBatch) -> torch.Tensor:
            return b.valid | b.outlier if with_outliers and b.outlier is not None else b.valid

        return torch.cat([b.hidden[layer].to(b.valid.device)[keep(b)] for b in self.batches])

    @property
    def outliers(self) -> int:
        """Number of outlier positions excluded from the statistics."""
        return int(sum(b.outlier.sum() for b in self.batches if b.outlier is not None))

    def block(self, batch: CachedBatch, start: int, end: int, z: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Apply base layers `start..end-1` to `z` (`[B, T, d]`) with the batch's base-pass arguments; with
        `scale != 1`, the damped visits of those layers (each residual branch update multiplied by `scale`,
        `rys_forge.repeat.scaled_visit`: what a plan's repeated visit at that scale computes)."""
        if scale == 1.0:
            return replay_layers(self.layers, batch.layer_kwargs, start, end, z)
        layers = list(self.layers)
        for k in range(start, end):
            layers[k] = self.damped_layer(k, scale)
        return replay_layers(layers, batch.layer_kwargs, start, end, z)

    def damped_layer(self, k: int, scale: float) -> nn.Module:
        """Layer `k`'s visit at residual scale `scale` (made once, shared by every window and thread)."""
        with self.memo_lock:
            if (k, scale) not in self.damped:
                self.damped[k, scale] = scaled_visit(self.layers[k], k, scale, self.spec)
            return self.damped[k, scale]

    def tail_states(self, batch: CachedBatch, start: int, z: torch.Tensor) -> torch.Tensor:
        """Run layers `start..L-1` from `z` (the stream entering layer `start`) and keep the batch's KL
        positions: `[K, d]`, the input of the final norm and LM head there."""
        z = self.block(batch, start, self.num_layers, z)
        rows, cols = batch.kl_index.to(z.device).unbind(1)
        return z[rows, cols]

    def kl_from(
        self, batches: Sequence[CachedBatch], start: int, states: Sequence[torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`kl_to_base` for several batches at once: each batch's tail (`tail_states` from `states`), then one
        LM-head call over every batch's KL positions (the `[V, d]` head weight is read once, not once per
        batch). Returns `(kl, top-1 agreement)` per batch, as `kl_to_base`."""
        if not batches:
            return []
        finals = [self.tail_states(b, start, z) for b, z in zip(batches, states)]
        device = finals[0].device
        logits = head_logits(self.model, self.spec, torch.cat([f.to(device) for f in finals]))
        sizes = [f.shape[0] for f in finals]
        return [self.kl_to_base(b, part) for b, part in zip(batches, logits.split(sizes))]

    @staticmethod
    def kl_to_base(batch: CachedBatch, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position KL(p_base || softmax(logits)) (`[K]` float32, nats) and top-1 agreement (`[K]` bool).

        `logits`: `[K, V]` at the batch's KL positions. In float64 (`kl_rows`): windows that barely change
        the model give KLs far below what a float32 log-softmax over a large vocabulary resolves.
        """
        base = batch.base if batch.base is not None else BaseDistribution.of(batch.base_logits)
        kl = kl_rows(base, logits)
        return kl.clamp_min(0.0).float(), top1_agrees(logits, batch.base_top1)


def replay_layers(
    layers: Sequence[nn.Module], layer_kwargs: Sequence[dict[str, Any]], start: int, end: int, z: torch.Tensor
) -> torch.Tensor:
    """Apply `layers[start:end]` to `z`, each with the keyword arguments the base pass gave it."""
    for k in range(start, end):
        out = layers[k](z, **layer_kwargs[k])
        z = out[0] if isinstance(out, tuple) else out
    return z


def tile_layer_kwargs(kwargs: dict[str, Any], rows: int, copies: int,
                      memo: dict[tuple[int, int], Any] | None = None) -> dict[str, Any]:
    """A layer's keyword arguments for ``copies`` batches of ``rows`` rows stacked along the batch: every tensor
    of 2 or more dimensions whose first is ``rows`` (masks, rotary tables, position ids) is repeated along it;
    the rest (broadcast rows, cache positions, flags) is kept. ``memo`` (by tensor id) tiles a tensor shared by
    several layers once per count of copies."""
    memo = {} if memo is None else memo

    def tile(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if copies == 1 or value.dim() < 2 or value.shape[0] != rows:
                return value
            key = (id(value), copies)
            if key not in memo:
                memo[key] = (value, value.repeat(copies, *([1] * (value.dim() - 1))))
            return memo[key][1]
        if isinstance(value, (tuple, list)):
            return type(value)(tile(v) for v in value)
        if isinstance(value, dict):
            return {k: tile(v) for k, v in value.items()}
        return value

    return {k: tile(v) for k, v in kwargs.items()}


@contextmanager
def capture_layer_inputs(model: nn.Module, spec: ArchSpec) -> Iterator[dict[int, tuple[torch.Tensor, dict[str, Any]]]]:
    """While active, every forward fills the yielded dict: `k -> (x_k, kwargs of layer k)` for each decoder
    layer (with the KV cache switched off in the kwargs, so they can be replayed), and `L -> (x_L, {})`
    for the stream entering the final norm."""
    layers = get_path(model, spec.layers_path)
    num_layers = len(layers)
    captured: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            rest["past_key_values"] = None
            rest["use_cache"] = False
            captured[index] = (hidden.detach(), rest)

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(k), with_kwargs=True) for k, layer in enumerate(layers)]
    norm = get_path(model, spec.final_norm_path)
    handles.append(norm.register_forward_pre_hook(lambda m, args: captured.__setitem__(num_layers, (args[0].detach(), {}))))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def run_decoder(model: nn.Module, spec: ArchSpec, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None = None) -> None:
    """The decoder stack alone (embeddings, layers, final norm): no full-vocabulary logits for every token. With
    ``position_ids`` restarting at 0 and no ``attention_mask``, rows hold packed sequences (transformers keeps
    attention within each)."""
    extra = {"position_ids": position_ids} if position_ids is not None else {}
    get_path(model, spec.layers_path.rsplit(".", 1)[0])(input_ids=input_ids, attention_mask=attention_mask,
                                                        use_cache=False, **extra)


def head_logits(model: nn.Module, spec: ArchSpec, x_last: torch.Tensor) -> torch.Tensor:
    """Final norm, LM head and (where the config has one) logit soft-capping on `[K, d]` states."""
    logits = model.lm_head(get_path(model, spec.final_norm_path)(x_last)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


#: Characters kept of a prompt before tokenising, per token kept: no tokenizer's token covers more than a
#: few dozen characters, so the first `max_tokens` tokens are those of the whole text, and a huge prompt
#: line (megabytes) costs no more than a short one.
CHARS_PER_TOKEN = 64


def tokenize(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> Any:
    """The first `max_tokens` tokens of each text (ids and special-token masks), tokenising only the first
    `CHARS_PER_TOKEN * max_tokens` characters of it."""
    cut = [text[: CHARS_PER_TOKEN * max_tokens] for text in texts]
    return tokenizer(cut, truncation=True, max_length=max_tokens, return_special_tokens_mask=True)


def _kl_positions(valid: torch.Tensor, per_row: int, prompt_ids: list[int], seed: int) -> torch.Tensor:
    """`per_row` random valid positions of each row, a function of (seed, prompt index) only, so
    they do not depend on how prompts were batched."""
    picks = []
    for row, prompt in enumerate(prompt_ids):
        positions = valid[row].nonzero().flatten().cpu()
        if per_row <= 0 or positions.numel() == 0:
            continue
        generator = torch.Generator().manual_seed(seed * 1_000_003 + prompt)
        chosen = positions[torch.randperm(positions.numel(), generator=generator)[:per_row]]
        picks.extend((row, int(p)) for p in chosen.sort().values)
    return torch.tensor(picks, dtype=torch.long).reshape(-1, 2)


def _evenly(items: Sequence[int], count: int) -> list[int]:
    """`count` of `items`, spread evenly over them (order kept)."""
    if count >= len(items):
        return list(items)
    return [items[int((k + 0.5) * len(items) / count)] for k in range(count)]


def _kl_prompts(by_length: Sequence[int], deep_set: Sequence[int], kl_fraction: float) -> set[int]:
    """The prompts that carry KL positions: `round(kl_fraction * n)` (at least one), spread evenly over
    lengths and nested with the deep prompts, so the repeat curves' KL (deep batches) has positions."""
    count = max(1, round(kl_fraction * len(by_length)))
    if count <= len(deep_set):
        return set(_evenly(deep_set, count))
    deep = set(deep_set)
    rest = [k for k in by_length if k not in deep]
    return deep | set(_evenly(rest, count - len(deep_set)))


def _visit_prompts(by_length: Sequence[int], needed: set[int], visit_fraction: float, families: Sequence[str]) -> set[int]:
    """The prompts whose second visit `z_2` is replayed: every prompt in `needed` (the deep and KL prompts,
    which replay from `z_2`) and, per prompt family, others spread evenly over lengths up to
    `round(visit_fraction * n_family)` (at least one a family, so that per-family statistics, `rank --overlap`,
    have a second visit)."""
    chosen = set(needed)
    for family in dict.fromkeys(families):
        members = [k for k in by_length if families[k] == family]
        count = max(1, round(visit_fraction * len(members)))
        rest = [k for k in members if k not in needed]
        chosen |= set(_evenly(rest, max(0, count - (len(members) - len(rest)))))
    return chosen


@torch.no_grad()
def cache_activations(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    families: Sequence[str] | None = None,
    max_tokens: int = 64,
    batch_size: int = 16,
    kl_positions: int = 4,
    seed: int = 0,
    deep_fraction: float = 1.0,
    kl_fraction: float = 1.0,
    outlier_factor: float = 0.0,
    visit_fraction: float = 1.0,
) -> ActivationCache:
    """Run the base model once over `texts` and cache the residual stream and layer arguments.

    Args:
        model: a `*ForCausalLM` from the architecture table, without a plan applied.
        tokenizer: its tokenizer.
        texts: prompts; each is truncated to `max_tokens` tokens.
        families: family label per prompt (for per-family analyses).
        max_tokens: truncation length per prompt.
        batch_size: prompts per padded batch (prompts are sorted by length to limit padding).
        kl_positions: random valid positions per prompt where logits are compared (0: no KL).
        seed: seed of the position subsample.
        deep_fraction: share of the prompts (spread evenly over lengths, batched apart) that also get `z_3..z_n`.
        kl_fraction: share of the prompts that carry KL positions (spread evenly over lengths,
            nested with the deep share: the smaller of the two sets lies inside the larger).
        outlier_factor: exclude positions whose norm at some layer exceeds this x the layer's median (0: none).
        visit_fraction: share of the prompts that get the second visit `z_2` (at least the deep and KL prompts).

    Raises:
        PromptError: no prompt has a valid (non-special, non-outlier) token.
    """
    import time

    if not texts:
        raise PromptError("no prompts to probe with")
    spec = spec_for_model(model)
    num_layers = len(get_path(model, spec.layers_path))
    device = next(model.parameters()).device
    families = list(families) if families is not None else ["prompts"] * len(texts)
    encoded = tokenize(tokenizer, texts, max_tokens)
    chunks = _batch_plan([len(ids) for ids in encoded["input_ids"]], batch_size, kl_positions, deep_fraction, kl_fraction,
                         visit_fraction, families)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches: list[CachedBatch] = []
    started = time.perf_counter()
    with capture_layer_inputs(model, spec) as captured:
        for rows, visit, deep, kl in chunks:
            ids, mask, valid = _padded(encoded, rows, pad_id)
            captured.clear()
            # The decoder alone: no full-vocabulary logits for every token.
            run_decoder(model, spec, ids.to(device), mask.to(device))
            kl_index = _kl_positions(valid, kl_positions if kl else 0, rows, seed).to(device)
            hidden = [captured[k][0] for k in range(num_layers + 1)]
            logits = top1 = base = None
            if kl_index.numel():
                at_row, at_col = kl_index.to(hidden[num_layers].device).unbind(1)
                logits = head_logits(model, spec, hidden[num_layers][at_row, at_col])
                top1 = logits.argmax(-1)
                base = BaseDistribution.of(logits)
            batches.append(CachedBatch(
                input_ids=ids, valid=valid.to(device), hidden=hidden, layer_kwargs=[captured[k][1] for k in range(num_layers)],
                kl_index=kl_index, base_logits=logits, base_top1=top1, base=base, families=[families[k] for k in rows],
                prompt_ids=list(rows), deep=deep, visit=visit,
            ))
    cache = ActivationCache(model=model, spec=spec, batches=batches, num_layers=num_layers)
    mark_outliers(batches, num_layers, outlier_factor) if outlier_factor > 0 else None
    cache.tokens = _check_tokens(cache)
    cache.timings["base_pass_s"] = time.perf_counter() - started
    return cache


def _check_tokens(cache: ActivationCache) -> int:
    """The number of tokens that enter the statistics, which must not all be one token (every CKA, every
    relative step would be 0/0).

    Raises:
        PromptError: no such token, or the same token everywhere (e.g. `--max-tokens 2` on prompts that all
            start alike).
    """
    tokens = int(sum(b.valid.sum() for b in cache.batches))
    if tokens == 0:
        raise PromptError("the prompts contain no tokens besides special tokens")
    embedded = cache.pooled(0)
    if (embedded - embedded[:1]).abs().max() == 0:
        raise PromptError(f"the prompts' {tokens} tokens are all the same token; use more --max-tokens or other prompts")
    return tokens


def mark_outliers(batches: Sequence[CachedBatch], num_layers: int, factor: float) -> None:
    """Move the positions whose norm exceeds `factor` x the layer's median token norm, at any layer
    1..L, from `valid` to `outlier` (in place). The embeddings (layer 0) are not judged: massive
    activations form inside the stack."""
    medians = []
    for layer in range(1, num_layers + 1):
        norms = torch.cat([b.hidden[layer].float().norm(dim=-1)[b.valid].cpu() for b in batches])
        medians.append(float(norms.median()) if norms.numel() else 0.0)
    for b in batches:
        worst = torch.zeros(b.valid.shape, device=b.valid.device)
        for layer, median in zip(range(1, num_layers + 1), medians):
            if median > 0:
                ratio = b.hidden[layer].float().norm(dim=-1).to(worst.device) / median
                worst = torch.maximum(worst, ratio)
        b.outlier = b.valid & (worst > factor)
        b.valid = b.valid & ~b.outlier


def _batch_plan(
    lengths: Sequence[int], batch_size: int, kl_positions: int, deep_fraction: float, kl_fraction: float,
    visit_fraction: float, families: Sequence[str],
) -> list[tuple[list[int], bool, bool, bool]]:
    """`(prompt indices, visit, deep, kl)` per padded batch: prompts sorted by token count, split into the
    second-visit share and the rest, the deep share and the rest, the KL share and the rest, then cut into
    batches of at most `batch_size` prompts of similar lengths (`cut_batches`)."""
    by_length = sorted(range(len(lengths)), key=lambda k: lengths[k])
    for name, value in (("deep", deep_fraction), ("KL", kl_fraction), ("visit", visit_fraction)):
        if not 0.0 < value <= 1.0:
            raise PromptError(f"{name} fraction must be in (0, 1], got {value}")
    is_deep = [int((r + 1) * deep_fraction) > int(r * deep_fraction) for r in range(len(by_length))]
    if by_length and not any(is_deep):  # a share of very few prompts rounds to none: the deep probes need one
        is_deep[len(is_deep) // 2] = True
    deep_set = [k for k, d in zip(by_length, is_deep) if d]
    deep_members = set(deep_set)
    kl_set = _kl_prompts(by_length, deep_set, kl_fraction if kl_positions > 0 else 1.0)
    visit_set = _visit_prompts(by_length, deep_members | (kl_set if kl_positions > 0 else set()), visit_fraction, families)
    groups = [
        ([k for k in by_length if (k in visit_set) == visit and (k in deep_members) == deep and (k in kl_set) == kl], visit, deep, kl)
        for visit in (True, False) for deep in (True, False) for kl in (True, False)
    ]
    return [(rows, visit, deep, kl) for group, visit, deep, kl in groups
            for rows in cut_batches([lengths[k] for k in group], group, batch_size)]


#: What one more padded batch costs, in padded tokens: the overhead of a layer replay call (2-3 ms against
#: 0.1 ms a token on one CPU core, gemma-3-270m). `cut_batches` trades it against padding.
BATCH_OVERHEAD_TOKENS = 32


def cut_batches(lengths: Sequence[int], items: Sequence[int], batch_size: int) -> list[list[int]]:
    """Cut `items` (sorted by their `lengths`, ascending) into consecutive batches of at most `batch_size`
    that minimise the padded tokens (rows x longest length) plus `BATCH_OVERHEAD_TOKENS` per batch: every
    layer replay of every window runs on the padded batches, so padding is paid ~20 layer passes a window."""
    count = len(items)
    best, start = [0.0] + [math.inf] * count, [0] * (count + 1)  # best[k]: cheapest cut of the first k items
    for k in range(1, count + 1):
        for s in range(max(0, k - batch_size), k):
            cost = best[s] + (k - s) * lengths[k - 1] + BATCH_OVERHEAD_TOKENS
            if cost < best[k]:
                best[k], start[k] = cost, s
    cuts, k = [], count
    while k > 0:
        cuts.append(list(items[start[k] : k]))
        k = start[k]
    return cuts[::-1]


def _padded(encoded: Any, rows: Sequence[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `[B, T]` token ids, attention mask and valid-token mask (no padding, no special tokens)."""
    length = max(len(encoded["input_ids"][k]) for k in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    valid = torch.zeros((len(rows), length), dtype=torch.bool)
    for r, k in enumerate(rows):
        seq = encoded["input_ids"][k]
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        valid[r, : len(seq)] = ~torch.tensor(encoded["special_tokens_mask"][k], dtype=torch.bool)
    return ids, mask, valid
