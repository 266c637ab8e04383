"""The cached engine behind `sweep`: lm-eval's loglikelihood requests for every window from one base pass.

A window's repeat `[i, j)` leaves layers `0..j-1` of the base pass untouched: the repeated model's
stream after the first visit of the block *is* the base `x_j`. So the engine runs the base model once
over every request (lm-eval's own token encoding, captured from ``HFLM``), caches `x_0..x_L` with each
layer's arguments (masks, rotary embeddings), and for a window with `n` visits replays the block
`n-1` more times from the cached `x_j`, then layers `j..L-1`: `L - i + (n-2)(j-i)` layer passes instead
of `L + (n-1)(j-i)` for a full forward. Damped visits (repeated passes at residual scale `alpha`) replay the
block through the in-memory repeat's scaled visits (:func:`rys_forge.repeat.scaled_visit`) from the same
cache. The LM head (262k rows on gemma) runs only at continuation positions, in float32, where lm-eval's
``HFLM`` runs it at every position.

Batches (`rys_forge.research.engine_batching`): requests are packed into rows of whole sequences, each sequence's
position ids restarting at 0 (transformers then masks the sequences apart), so almost no token is padding;
long requests and other attention kernels get a row each. A race's small looks stack several two-visit windows
along a batch (they share the layers `i..L-1` from their cached `x_j`) and score them with one LM-head call.

Requests are scored with lm-eval's own task code (`rys_forge.research.window_scorer`: filters, ``process_results``,
``aggregation``, ``stderr_for_metric``), so a window's metrics are what ``simple_evaluate`` reports for
the same loglikelihoods (tested). Only loglikelihood-type tasks (``multiple_choice``,
``loglikelihood``) qualify; generation tasks need the ``lm-eval`` engine (one full run per window).

Memory: the cache holds `(L+1) * tokens * hidden` activations. When that exceeds ``max_cache_bytes``,
requests form several cache groups, each captured again for every group of windows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from rys_forge.rank.activations import capture_layer_inputs, head_logits, replay_layers, run_decoder, tile_layer_kwargs
from rys_forge.architectures import get_path, spec_for_model
from rys_forge.errors import TaskError
from rys_forge.plan import Window
from rys_forge.repeat import scaled_visit
from rys_forge.research.engine_batching import EngineBatch, batch_overhead, lay_out, make_batch, stack_size
from rys_forge.research.sweep_rows import Visits, trim_run, window_record  # trim_run: race imports it here
from rys_forge.research.window_scorer import WindowScorer

__all__ = [
    "CACHED_OUTPUT_TYPES", "LoglikelihoodEngine", "WindowRun", "WindowScorer", "capturing_lm", "check_cached_tasks",
    "leaf_tasks", "score_cached_windows", "trim_run", "uncached_tasks",
]

#: Attention implementations whose layer arguments stack along the batch (:func:`tile_layer_kwargs`).
STACKED_ATTENTION = ("eager", "sdpa")

#: lm-eval output types the cached engine can answer.
CACHED_OUTPUT_TYPES = ("multiple_choice", "loglikelihood")


@dataclass
class WindowRun:
    """Per-request results of one run: summed continuation log-likelihood and greedy exact match."""

    loglikelihood: np.ndarray  # float64 [N]
    is_greedy: np.ndarray  # bool [N]
    # the engine's wall time for this window: since the previous stack's results, shared by its stack's windows
    # (on a GPU it includes the previous stack's scoring, which runs while this stack's layers do)
    seconds: float = 0.0

    def as_responses(self) -> list[tuple[float, bool]]:
        return [(float(a), bool(b)) for a, b in zip(self.loglikelihood, self.is_greedy)]


class LoglikelihoodEngine:
    """Continuation log-likelihoods of lm-eval token requests under the base model and any window repeat.

    Args:
        model: a ``*ForCausalLM`` from the architecture table, without a plan applied.
        requests: ``(context_tokens, continuation_tokens)`` per request, as ``HFLM`` encodes them.
        max_length: ``HFLM.max_length`` (inputs are left-truncated to it, as ``HFLM`` does).
        pad_id: padding token id (right padding; causal attention never sees it).
        batch_tokens: padded tokens per forward batch.
        pack: pack requests of at most ``hidden_size`` tokens into rows of whole sequences as long as the longest
            of them (:func:`pack_rows`; transformers keeps attention within each sequence, from the position ids
            restarting at 0): almost no padding. None: with eager or sdpa attention. Longer requests, or all
            without packing, have a row of their own, padded:
        batch_overhead_tokens: (rows of their own) what one more forward batch costs, in padded tokens (None: measured
            once per model, :func:`batch_overhead`): requests are cut into batches minimising padded tokens plus
            this per batch (:func:`cut_by_length`). A GPU pays a fixed launch cost per batch, so a small request
            set (a race's early look) goes in a few padded batches; on a CPU, where a token costs more than a
            launch, batches hold requests of nearly one length.
        max_cache_bytes: activation cache budget (None: 60% of free GPU memory, or 8 GiB on CPU).
        head_chunk: continuation positions per LM-head call (bounds the `[K, V]` float32 logits).
        stack: at most this many two-visit windows run stacked on a batch (:meth:`run`). 1 (a sweep): one window
            at a time, so that on a GPU each window's scoring overlaps the next window's layers; a race's small
            looks stack up to :data:`~rys_forge.research.engine_batching.MAX_STACK`.
    """

    def __init__(
        self,
        model: nn.Module,
        requests: Sequence[tuple[Sequence[int], Sequence[int]]],
        *,
        max_length: int,
        pad_id: int = 0,
        batch_tokens: int = 16384,
        batch_overhead_tokens: int | None = None,
        max_cache_bytes: int | None = None,
        head_chunk: int = 2048,
        stack: int = 1,
        pack: bool | None = None,
    ):
        self.model = model
        self.spec = spec_for_model(model)
        self.layers = get_path(model, self.spec.layers_path)
        self.num_layers = len(self.layers)
        self.device = next(model.parameters()).device
        self.n_requests = len(requests)
        self.head_chunk = head_chunk
        inputs: list[list[int]] = []
        conts: list[list[int]] = []
        for context, continuation in requests:
            if not continuation:
                raise TaskError("an lm-eval request has an empty continuation")
            full = (list(context) + list(continuation))[-(max_length + 1) :]
            if len(full) <= len(continuation):
                raise TaskError(f"an lm-eval request's continuation ({len(continuation)} tokens) leaves no context "
                                f"token within max_length {max_length}")
            inputs.append(full[:-1])
            conts.append(list(continuation))
        self.batch_tokens = batch_tokens
        if not (isinstance(stack, int) and stack >= 1):
            raise ValueError(f"stack must be a positive integer, got {stack!r}")
        self.stack = stack
        # eager/sdpa layer arguments are batch-major tensors: windows stack along the batch, and rows can be packed
        self.stackable = getattr(model.config, "_attn_implementation", "eager") in STACKED_ATTENTION
        self.packed = self.stackable if pack is None else bool(pack)
        self.batch_overhead_tokens = batch_overhead_tokens
        hidden_size = int(model.config.get_text_config().hidden_size)
        self.row_cap = hidden_size if self.packed else 0  # a row's attention then adds at most ~1/6 of a layer's work
        if any(len(seq) > self.row_cap for seq in inputs) and self.batch_overhead_tokens is None:
            self.batch_overhead_tokens = batch_overhead(model, batch_tokens)
        batches = lay_out([len(seq) for seq in inputs], batch_tokens, self.row_cap, self.batch_overhead_tokens or 0)
        width = next(model.parameters()).element_size()
        per_token = (self.num_layers + 1) * hidden_size * width
        if max_cache_bytes is None:
            if self.device.type == "cuda":
                free, _total = torch.cuda.mem_get_info(self.device)
                max_cache_bytes = int(0.6 * free)
            else:
                max_cache_bytes = 8 << 30
        # Consecutive batches form cache groups whose activations fit the budget.
        self.batches: list[EngineBatch] = []
        self._scaled: dict[float, list[nn.Module]] = {}  # alpha -> every layer as a damped visit
        self._bounds = [0]
        used = 0
        for batch, packed in batches:
            made = make_batch(batch, inputs, conts, pad_id, packed, self.device)
            size = made.input_ids.numel() * (per_token + 2 * made.input_ids.shape[1] * width)  # + two [B,1,T,T] masks
            if used and used + size > max_cache_bytes:
                self._bounds.append(len(self.batches))
                used = 0
            self.batches.append(made)
            used += size
        self._bounds.append(len(self.batches))
        self.tokens = sum(b.tokens for b in self.batches)  # real (unpadded) tokens of every batch

    @property
    def groups(self) -> list[list[EngineBatch]]:
        """Batches cached together (one group when everything fits: captured once and kept)."""
        b = self._bounds
        return [self.batches[b[k] : b[k + 1]] for k in range(len(b) - 1)]

    @property
    def padded_tokens(self) -> int:
        """Tokens of every batch, padding included (``tokens``: without it)."""
        return sum(batch.input_ids.numel() for batch in self.batches)

    @property
    def padding(self) -> float:
        """The share of the batches' tokens that is padding."""
        return 1 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    @torch.no_grad()
    def _capture(self, batch: EngineBatch) -> None:
        with capture_layer_inputs(self.model, self.spec) as captured:
            run_decoder(self.model, self.spec, batch.input_ids, batch.attention_mask, batch.position_ids)
            batch.hidden = [captured[k][0] for k in range(self.num_layers + 1)]
            batch.layer_kwargs = [captured[k][1] for k in range(self.num_layers)]
        if batch.shared_rows and batch.layer_kwargs[0].get("attention_mask") is None:
            raise TaskError(f"{type(self.model).__name__} did not mask packed sequences apart (no attention mask "
                            "from its position ids); run the engine with pack=False")

    def _release(self, batches: Sequence[EngineBatch]) -> None:
        for batch in batches:
            batch.hidden = batch.layer_kwargs = None

    @torch.no_grad()
    def _score(self, batch: EngineBatch, z: torch.Tensor, ll: torch.Tensor, misses: torch.Tensor, order: list[int]) -> None:
        """Score ``z`` (``[len(order) * rows, T, d]``: copies of the batch's stream) into ``ll``/``misses``
        (``[W, n_requests]``): copy ``c`` into row ``order[c]``. The LM head runs over every copy's
        continuation positions together, ``head_chunk`` positions a call."""
        rows, positions = batch.input_ids.shape[0], batch.rows.numel()
        copy = torch.arange(len(order), device=self.device).repeat_interleave(positions)
        position = torch.arange(positions, device=self.device).repeat(len(order))
        z_rows, z_cols = copy * rows + batch.rows[position], batch.cols[position]
        targets = batch.targets[position]
        owner = torch.tensor(order, device=self.device)[copy] * self.n_requests + batch.owner[position]
        ll_flat, misses_flat = ll.view(-1), misses.view(-1)
        for f in range(0, z_rows.numel(), self.head_chunk):
            part = slice(f, f + self.head_chunk)
            logits = head_logits(self.model, self.spec, z[z_rows[part], z_cols[part]])
            token_ll = logits.gather(1, targets[part, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
            ll_flat.index_add_(0, owner[part], token_ll.double())
            misses_flat.index_add_(0, owner[part], (logits.argmax(-1) != targets[part]).int())

    @torch.no_grad()
    def run(
        self,
        windows: Sequence[tuple[int, int, int] | tuple[int, int, int, float] | None],
        on_done: Callable[[int, WindowRun], None] | None = None,
        group_size: int = 16,
    ) -> list[WindowRun]:
        """Results for each entry of ``windows``: ``None`` is the base model, ``(i, j, visits)`` the
        repeat of layers ``i..j-1`` ``visits`` times, ``(i, j, visits, alpha)`` with the repeated visits at
        residual scale ``alpha``. ``on_done(index, run)`` is called as each finishes (in groups of
        ``group_size`` windows when the cache needs several groups).

        Two-visit windows at full scale run layers ``i..L-1`` from the cached ``x_j``: on a batch smaller than
        ``batch_tokens`` several of them are stacked along the batch (:meth:`_stacked_on_batch`). On a GPU a
        window's results are handed to ``on_done`` while the next window's layers run."""
        for w in windows:
            if w is not None:
                i, j, n, *alpha = w
                if not (0 <= i < j <= self.num_layers and n >= 1) or (alpha and not alpha[0] > 0):
                    raise ValueError(f"bad window {w} for {self.num_layers} layers")
        results: list[WindowRun | None] = [None] * len(windows)
        groups = self.groups
        step = max(1, len(windows) if len(groups) == 1 else group_size)
        clock = [time.perf_counter()]

        def deliver(copied: tuple[list[list[int]], list[tuple[torch.Tensor, torch.Tensor]], Any]) -> None:
            stacks, outputs, event = copied
            if event is not None:
                event.synchronize()
            now = time.perf_counter()
            share, clock[0] = (now - clock[0]) / sum(len(stack) for stack in stacks), now
            rows = sorted((k, ll[r], misses[r])
                          for stack, (ll, misses) in zip(stacks, outputs) for r, k in enumerate(stack))
            for k, ll, misses in rows:  # in the order given; copied, so the pinned blocks go back
                results[k] = WindowRun(ll.numpy().copy(), (misses == 0).numpy(), share)
                if on_done:
                    on_done(k, results[k])

        for first in range(0, len(windows), step):
            stacks = self._stacks(windows, list(range(first, min(first + step, len(windows)))))
            acc = {s: self._accumulators(len(stack)) for s, stack in enumerate(stacks)}
            pending = None
            for group in groups:
                for batch in group:
                    if batch.hidden is None:
                        self._capture(batch)
                for s, stack in enumerate(stacks):
                    for batch in group:
                        self._stacked_on_batch(batch, [windows[k] for k in stack], *acc[s])
                    if len(groups) == 1:  # everything cached: the stack is final; hand over the previous one
                        copied = self._copy_out([stack], [acc.pop(s)])
                        if pending is not None:
                            deliver(pending)
                        pending = copied
                if len(groups) > 1:
                    self._release(group)
            if pending is not None:
                deliver(pending)
            if acc:
                deliver(self._copy_out([stacks[s] for s in acc], list(acc.values())))
        return results  # type: ignore[return-value]

    def _stacks(self, windows: Sequence[tuple[int, ...] | None], todo: list[int]) -> list[list[int]]:
        """``todo`` in stacks replayed together: two-visit windows at full scale (layers ``i..L-1`` from
        ``x_j``) by start, as many as the smallest batch can stack and ``stack`` allows; every other window
        alone. In order of each stack's first window in ``todo``."""
        smallest = min(b.input_ids.numel() for b in self.batches) if self.batches else self.batch_tokens
        size = min(self.stack, stack_size(smallest, self.batch_tokens))
        if not self.stackable:
            size = 1  # other kernels take masks that are not batch-major tensors (flex's BlockMask)

        def plain(w: tuple[int, ...] | None) -> bool:
            return w is not None and w[2] == 2 and (len(w) == 3 or float(w[3]) == 1.0)

        together = sorted((k for k in todo if plain(windows[k])), key=lambda k: windows[k][0])  # type: ignore[index]
        stacks = [together[a : a + size] for a in range(0, len(together), size)]
        stacks += [[k] for k in todo if not plain(windows[k])]
        return sorted(stacks, key=min)

    def _copy_out(self, stacks: list[list[int]], accs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[Any, ...]:
        """Start copying stacks' accumulators (``[len(stack), n_requests]`` each) to the host; the event (on a
        GPU) marks them done."""
        if self.device.type != "cuda":
            return stacks, [(ll.cpu(), misses.cpu()) for ll, misses in accs], None
        outputs = []
        for ll, misses in accs:
            host = (torch.empty(ll.shape, dtype=ll.dtype, pin_memory=True),
                    torch.empty(misses.shape, dtype=misses.dtype, pin_memory=True))
            host[0].copy_(ll, non_blocking=True)
            host[1].copy_(misses, non_blocking=True)
            outputs.append(host)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))  # the copies' stream, not the current device's
        return stacks, outputs, event

    def _accumulators(self, windows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-likelihoods and missed greedy tokens of ``windows`` windows: ``[windows, n_requests]``."""
        return (
            torch.zeros((windows, self.n_requests), dtype=torch.float64, device=self.device),
            torch.zeros((windows, self.n_requests), dtype=torch.int32, device=self.device),
        )

    def _repeated_layers(self, alpha: float) -> Sequence[nn.Module]:
        """The layers the repeated visits run: the base layers at scale 1, else damped copies (made once per alpha)."""
        if alpha != 1.0 and alpha not in self._scaled:
            self._scaled[alpha] = [scaled_visit(layer, k, alpha, self.spec) for k, layer in enumerate(self.layers)]
        return self._scaled[alpha] if alpha != 1.0 else self.layers

    def _window_on_batch(self, batch: EngineBatch, window: tuple[int, ...] | None, ll: torch.Tensor,
                         misses: torch.Tensor) -> None:
        """One window on one batch, scored into row 0 of ``ll``/``misses``."""
        assert batch.hidden is not None and batch.layer_kwargs is not None
        if window is None:
            z = batch.hidden[self.num_layers]
        else:
            i, j, visits, *alpha = window
            repeated = self._repeated_layers(float(alpha[0]) if alpha else 1.0)
            z = batch.hidden[j]
            for _ in range(visits - 1):
                z = replay_layers(repeated, batch.layer_kwargs, i, j, z)
            z = replay_layers(self.layers, batch.layer_kwargs, j, self.num_layers, z)
        self._score(batch, z, ll, misses, [0])

    def _stacked_on_batch(self, batch: EngineBatch, windows: list[tuple[int, ...] | None], ll: torch.Tensor,
                          misses: torch.Tensor) -> None:
        """A stack of two-visit windows on one batch (window ``w`` scored into row ``w`` of ``ll``/``misses``), as
        many at a time as fit ``batch_tokens``: rows of each window's ``x_j`` join the stacked stream at its start
        layer ``i`` and run the layers up to ``L-1``."""
        assert batch.hidden is not None and batch.layer_kwargs is not None
        rows = batch.input_ids.shape[0]
        per_pass = stack_size(batch.input_ids.numel(), self.batch_tokens)
        for a in range(0, len(windows), per_pass):
            part, part_ll, part_misses = windows[a : a + per_pass], ll[a : a + per_pass], misses[a : a + per_pass]
            if len(part) == 1:
                self._window_on_batch(batch, part[0], part_ll, part_misses)
                continue
            starts = sorted({w[0] for w in part})  # type: ignore[index]
            order = [r for start in starts for r, w in enumerate(part) if w[0] == start]  # type: ignore[index]
            z: torch.Tensor | None = None
            for p, start in enumerate(starts):
                memo: dict[tuple[int, int], Any] = {}  # this phase's tiled arguments only
                joining = [batch.hidden[w[1]] for w in part if w[0] == start]  # type: ignore[index]
                z = torch.cat(([z] if z is not None else []) + joining)
                end = starts[p + 1] if p + 1 < len(starts) else self.num_layers
                copies = z.shape[0] // rows
                tiled = [tile_layer_kwargs(kwargs, rows, copies, memo) if start <= k < end else kwargs
                         for k, kwargs in enumerate(batch.layer_kwargs)]
                z = replay_layers(self.layers, tiled, start, end, z)
            assert z is not None
            self._score(batch, z, part_ll, part_misses, order)  # the stacked rows are in order of joining

    def release(self) -> None:
        """Drop every cached activation (and the damped visit copies)."""
        self._release(self.batches)
        self._scaled.clear()


# --------------------------------------------------------------------------- lm-eval side


def uncached_tasks(task_objects: Sequence[Any]) -> list[str]:
    """The tasks the cached engine cannot answer (not loglikelihood-only)."""
    return [t.task_name for t in leaf_tasks(task_objects) if getattr(t, "OUTPUT_TYPE", None) not in CACHED_OUTPUT_TYPES]


def check_cached_tasks(task_objects: Sequence[Any]) -> None:
    """Raise :class:`TaskError` unless every task is answered by loglikelihood requests alone."""
    bad = uncached_tasks(task_objects)
    if bad:
        raise TaskError(
            f"the cached sweep engine handles loglikelihood tasks only; {', '.join(bad)} need --engine lm-eval"
        )


def leaf_tasks(task_objects: Sequence[Any]) -> list[Any]:
    """The tasks inside lm-eval's top-level Task / Group objects."""
    out: list[Any] = []
    for obj in task_objects:
        out.extend(obj.get_all_tasks() if hasattr(obj, "get_all_tasks") else [obj])
    return out


def capturing_lm(model: nn.Module, tokenizer: Any, **engine_kwargs: Any) -> Any:
    """An lm-eval ``HFLM`` whose loglikelihood requests are answered by a :class:`LoglikelihoodEngine`
    (the base model); afterwards ``lm.engine`` holds the engine and ``lm.instances`` the requests, in
    the engine's order, ``lm.request_tokens`` their ``(context, continuation)`` tokens. Token encoding,
    truncation and everything else stay ``HFLM``'s."""
    from lm_eval.models.huggingface import HFLM

    class _CapturingLM(HFLM):
        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            self.instances = list(requests)
            return super().loglikelihood(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False, override_bs: Any = None):
            pad = self.tokenizer.pad_token_id
            self.request_tokens = [(context, continuation) for _, context, continuation in requests]
            self.engine = LoglikelihoodEngine(
                self.model,
                [(context, continuation) for _, context, continuation in requests],
                max_length=self.max_length,
                pad_id=pad if pad is not None else 0,
                **engine_kwargs,
            )
            (base,) = self.engine.run([None])
            return base.as_responses()

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            raise TaskError("the cached sweep engine does not answer loglikelihood_rolling (use --engine lm-eval)")

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            raise TaskError("the cached sweep engine does not generate (use --engine lm-eval)")

    lm = _CapturingLM(pretrained=model, tokenizer=tokenizer, batch_size=1, backend="causal")
    lm.engine, lm.instances, lm.request_tokens, lm.engine_kwargs = None, [], [], dict(engine_kwargs)
    return lm


# --------------------------------------------------------------------------- a sweep's windows


def score_cached_windows(
    lm: Any, task_objects: Sequence[Any], todo: Sequence[tuple[Window, Visits]], base_run: dict[str, Any],
    base: dict[str, Any], reported: Sequence[str], *, limit: int | None, seed: int,
    on_record: Callable[[dict[str, Any]], None],
) -> float:
    """Every (window, visits) in ``todo`` through the engine of ``lm`` (:func:`capturing_lm`, after its base
    pass), scored with lm-eval's task code; the cache is released afterwards. Every scale of every window
    replays from the one base pass.

    Args:
        lm, task_objects: the capturing ``HFLM`` and the top-level task objects of its base pass.
        todo: ``(window, visits)`` pairs to score (:class:`~rys_forge.research.sweep_rows.Visits`: repeats and scale).
        base_run, base: the normalised base run and the sweep's per-task base summary (kept metrics).
        reported: the tasks scored.
        limit, seed: the base run's ``limit``; the paired bootstrap's seed.
        on_record: receives each window's row (:func:`rys_forge.research.sweep_rows.window_record`) as it
            finishes.

    Returns:
        The seconds spent in lm-eval's scoring (``WindowScorer.seconds``), part of the windows' time.
    """
    if not todo:  # nothing left to score (a resumed or empty share): just free the cache
        lm.engine.release()
        return 0.0
    keep = {t: f"{base[t]['metric']},{base[t]['filter']}" for t in reported}
    trimmed = trim_run(base_run, keep)
    scorer = WindowScorer(leaf_tasks(task_objects), lm.instances, limit, keep, base_run["items"])

    def finish(index: int, run: WindowRun) -> None:
        (window, visits), rys_run = todo[index], scorer(run)
        on_record(window_record(window, visits.repeats, trimmed, rys_run, reported, seed, run.seconds,
                                alpha=visits.alpha, substeps=visits.substeps))

    try:
        lm.engine.run([(w.start, w.end, v.repeats, v.alpha) for w, v in todo], on_done=finish)
    finally:
        lm.engine.release()
    return scorer.seconds
