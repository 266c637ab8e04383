"""The cached sweep engine against independent references.

Per-request log-likelihoods are checked against a separate model whose layer list materialises the repeat
(own weights, one unpadded sequence at a time, full-vocabulary log-softmax); sweep rows from the cached
engine against the same sweep through lm-eval's ``HFLM`` (one full run per window).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from rys_forge.models import load_model
from rys_forge.plan import LayerPlan, Window
from rys_forge.research.sweep_engine import LoglikelihoodEngine
from test_repeat import materialised_reference
from tiny import MODEL_TYPES

pytest.importorskip("lm_eval")

from rys_forge.research import engine_batching  # noqa: E402
from rys_forge.errors import TaskError, UsageError  # noqa: E402
from rys_forge.research.sweep import sweep_windows  # noqa: E402

MAX_LENGTH = 20


def _requests(vocab: int, seed: int = 3) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for ctx_len, cont_len in [(5, 1), (12, 3), (3, 4), (9, 2), (24, 2), (1, 1), (15, 5), (7, 1)]:
        tokens = torch.randint(4, vocab, (ctx_len + cont_len,), generator=g).tolist()
        out.append((tokens[:ctx_len], tokens[ctx_len:]))
    return out


def _reference(model, requests, order=None, max_length: int = MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """Sum of continuation log-probs and greedy match, one sequence at a time, on a materialised model."""
    ref = materialised_reference(model, order) if order is not None else model
    lls, greedy = [], []
    with torch.no_grad():
        for ctx, cont in requests:
            full = (ctx + cont)[-(max_length + 1) :]
            inp = torch.tensor([full[:-1]])
            logprobs = torch.log_softmax(ref(inp).logits[0].double(), dim=-1)[-len(cont) :]
            target = torch.tensor(cont)
            lls.append(float(logprobs.gather(1, target[:, None]).sum()))
            greedy.append(bool((logprobs.argmax(-1) == target).all()))
    return np.array(lls), np.array(greedy)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_engine_matches_materialised_repeat(tiny_model_dirs, model_type, monkeypatch, tmp_path):
    monkeypatch.setenv("RYS_FORGE_CACHE", str(tmp_path))
    loaded = load_model(str(tiny_model_dirs[model_type]))
    model = loaded.model
    n = model.config.num_hidden_layers
    requests = _requests(model.config.vocab_size)
    windows = [None, (1, 3, 2), (0, 2, 2), (2, n, 2), (1, 4, 3)]
    # a small batch budget (several padded batches) and a cache budget that forces several groups
    for cache_bytes in (None, 4096):
        engine = LoglikelihoodEngine(model, requests, max_length=MAX_LENGTH, batch_tokens=40, max_cache_bytes=cache_bytes)
        assert (len(engine.groups) > 1) == (cache_bytes is not None)
        done: list[int] = []
        runs = engine.run(windows, on_done=lambda k, run: done.append(k), group_size=2)
        assert sorted(done) == list(range(len(windows)))
        for window, run in zip(windows, runs):
            order = None
            if window is not None:
                i, j, visits = window
                order = LayerPlan.from_windows([Window(i, j)], n, visits).order
            ll, greedy = _reference(model, requests, order)
            np.testing.assert_allclose(run.loglikelihood, ll, rtol=1e-5, atol=1e-4)
            assert (run.is_greedy == greedy).all()
    # a repeat that changes nothing is not what is being measured: windows really move the numbers
    assert np.abs(runs[1].loglikelihood - runs[0].loglikelihood).max() > 1e-3


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs, single_thread_loader):
    return single_thread_loader(tiny_model_dirs["gemma3_text"])


TASKS = ["rys_arc_easy", "rys_lambada_openai"]
WINDOWS = ["1:3", "0:4", "2:6", "3:6"]


def _sweep(loaded, out, engine, **kwargs):
    kwargs.setdefault("windows", WINDOWS)
    return sweep_windows(
        loaded.model, loaded.tokenizer, tasks=TASKS, limit=6, out_dir=out, progress=False, engine=engine,
        model_info={"source": loaded.source}, **kwargs,
    )


def test_cached_sweep_equals_lm_eval_sweep(loaded, tmp_path):
    cached = _sweep(loaded, tmp_path / "cached", "auto", repeats="2,3")
    assert cached.summary["settings"]["engine"] == "cached"
    reference = _sweep(loaded, tmp_path / "lm_eval", "lm-eval", repeats="2,3")
    assert cached.summary["metrics"] == reference.summary["metrics"] == {"rys_arc_easy": "acc_norm", "rys_lambada_openai": "acc"}
    for task in TASKS:
        assert cached.base[task]["items"] == reference.base[task]["items"]
    moved = 0
    for a, b in zip(cached.rows, reference.rows):
        assert (a["window"], a["repeats"]) == (b["window"], b["repeats"])
        for task in TASKS:
            ta, tb = a["tasks"][task], b["tasks"][task]
            assert ta["items"] == tb["items"]
            for key in ("rys", "delta", "rys_stderr", "p_value", "z"):
                assert ta[key] == pytest.approx(tb[key], abs=1e-12), (a["window"], task, key)
            moved += ta["delta"] != 0
        assert a["combined_z"] == pytest.approx(b["combined_z"], abs=1e-12) or (np.isnan(a["combined_z"]) and np.isnan(b["combined_z"]))
    assert moved > 0  # the comparison is not between two all-zero tables


def test_cached_sweep_resumes_after_interrupt(loaded, tmp_path, interrupt_scoring):
    out = tmp_path / "sweep"
    disarm = interrupt_scoring(3)
    with pytest.raises(KeyboardInterrupt):
        _sweep(loaded, out, "cached")
    assert len((out / "sweep.jsonl").read_text().splitlines()) == 2
    disarm()
    resumed = _sweep(loaded, out, "cached", resume=True)
    assert resumed.summary["timings"]["windows_evaluated_this_session"] == 2
    fresh = _sweep(loaded, tmp_path / "fresh", "cached")
    for a, b in zip(resumed.rows, fresh.rows):
        assert a["tasks"] == b["tasks"]
    # the summary records how the batches were laid out: packed rows (eager attention), and their padding
    recorded = json.loads((tmp_path / "fresh" / "summary.json").read_text())["timings"]
    assert recorded["packed"] is True and 0 <= recorded["padding"] < 0.5
    keys = [json.loads(line)["key"] for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert sorted(keys) == sorted(f"{w}x2" for w in WINDOWS)


def test_cached_engine_refuses_generation_tasks(loaded, tmp_path):
    with pytest.raises(TaskError, match="loglikelihood tasks only"):
        sweep_windows(loaded.model, loaded.tokenizer, tasks=["rys_gsm8k"], limit=2, windows=["1:3"], engine="cached",
                      progress=False)
    with pytest.raises(UsageError, match="--engine must be one of auto, cached, lm-eval"):
        sweep_windows(loaded.model, loaded.tokenizer, tasks=["rys_arc_easy"], limit=2, windows=["1:3"], engine="bogus",
                      progress=False)



def test_memoised_document_accessors_never_answer_for_another_document():
    """A task outlives its scorers (a race builds one per look): once a scorer's documents are freed, CPython
    reuses their ids for the next look's documents, which must get their own choices, not a freed one's (a
    race once failed on a 3-choice question given a 4-choice one's choices, and the same mix-up with equal
    choice counts would silently swap gold answers)."""
    from types import SimpleNamespace

    from rys_forge.research.window_scorer import _memoise

    task = SimpleNamespace(doc_to_choice=lambda doc: list(doc["choices"]))
    _memoise(task, "doc_to_choice")
    for k in range(300):
        doc = {"choices": [f"answer {k}"] * (k % 4 + 2)}
        assert task.doc_to_choice(doc) == doc["choices"]
        assert task.doc_to_choice(doc) == doc["choices"]  # the cached answer, for this document
        del doc  # freed: the next document may take its id


def _cheapest_cut(lengths: list[int], cap: int, overhead: int) -> int:
    """Brute force over every cut of the sorted lengths into consecutive batches (the reference)."""
    best = None
    for mask in range(1 << (len(lengths) - 1)):
        cuts = [0] + [k + 1 for k in range(len(lengths) - 1) if mask >> k & 1] + [len(lengths)]
        parts = list(zip(cuts, cuts[1:]))
        if all((b - a) * lengths[a] <= max(cap, lengths[a]) for a, b in parts):
            cost = sum((b - a) * lengths[a] + overhead for a, b in parts)
            best = cost if best is None else min(best, cost)
    return best


def test_cut_by_length_minimises_padding_plus_batch_overhead():
    """`cut_by_length` against brute force over every cut: optimal when one batch could hold everything,
    within 2% when the batch limit binds (it splits a run of one length greedily), always within the limit."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        lengths = sorted(rng.integers(1, 40, rng.integers(1, 10)).tolist(), reverse=True)
        overhead = int(rng.choice([0, 5, 30, 500]))
        cap = int(rng.integers(1, 120)) if trial % 2 else sum(lengths) * max(lengths)
        items = [100 + k for k in range(len(lengths))]
        batches = engine_batching.cut_by_length(items, lengths, cap, overhead)
        assert [k for batch in batches for k in batch] == items
        first = [items.index(batch[0]) for batch in batches]
        assert all(len(b) * lengths[f] <= max(cap, lengths[f]) for b, f in zip(batches, first))
        cost = sum(len(b) * lengths[f] + overhead for b, f in zip(batches, first))
        reference = _cheapest_cut(lengths, cap, overhead)
        assert cost == reference if trial % 2 == 0 else reference <= cost <= 1.02 * reference


def _fewest_rows(lengths: list[int], row_length: int) -> int:
    """The fewest rows of ``row_length`` tokens holding every sequence whole (brute force over placements)."""
    best = len(lengths)

    def place(k: int, rows: list[int]) -> None:
        nonlocal best
        if len(rows) >= best:
            return
        if k == len(lengths):
            best = len(rows)
            return
        for r in range(len(rows)):
            if rows[r] + lengths[k] <= row_length:
                rows[r] += lengths[k]
                place(k + 1, rows)
                rows[r] -= lengths[k]
        place(k + 1, rows + [lengths[k]])

    place(0, [])
    return best


def test_pack_rows_keeps_sequences_whole_within_rows_and_near_the_fewest_rows():
    """Every sequence in exactly one row, no row over its length, and at most 11/9 of the fewest rows plus 6/9
    (best fit decreasing's bound) against brute force; a sequence longer than a row is refused."""
    rng = np.random.default_rng(2)
    for _ in range(300):
        row_length = int(rng.integers(4, 60))
        lengths = rng.integers(1, row_length + 1, rng.integers(1, 9)).tolist()
        rows = engine_batching.pack_rows(lengths, row_length)
        assert sorted(k for row in rows for k in row) == list(range(len(lengths)))
        assert all(sum(lengths[k] for k in row) <= row_length for row in rows)
        assert len(rows) <= 11 / 9 * _fewest_rows(lengths, row_length) + 6 / 9
    with pytest.raises(ValueError, match="does not fit"):
        engine_batching.pack_rows([3, 9], 8)
    # lay_out: requests up to the cap packed (rows as long as the longest of them), longer ones alone
    lengths = [5, 40, 3, 33, 12, 32, 7]
    layout = engine_batching.lay_out(lengths, batch_tokens=64, row_cap=32, overhead=0)
    assert sorted(k for rows, _ in layout for row in rows for k in row) == list(range(len(lengths)))
    for rows, packed in layout:
        assert packed == all(lengths[k] <= 32 for row in rows for k in row)
        assert packed or all(len(row) == 1 for row in rows)
        assert not packed or all(sum(lengths[k] for k in row) <= 32 for row in rows)
    assert all(not packed for rows, packed in engine_batching.lay_out(lengths, 64, 0, 0))


def test_batches_follow_their_overhead_and_give_the_same_numbers(tiny_model_dirs, monkeypatch, tmp_path):
    """With no batch overhead every batch holds one length (no padding); with a huge one, the fewest batches
    the limit allows (a race's early look on a GPU). The measured overhead is cached per model. Batching
    changes no number."""
    monkeypatch.setenv("RYS_FORGE_CACHE", str(tmp_path))
    model = load_model(str(tiny_model_dirs["llama"])).model
    requests = _requests(model.config.vocab_size)
    lengths = [len((c + t)[-(MAX_LENGTH + 1):]) - 1 for c, t in requests]
    tight = LoglikelihoodEngine(model, requests, max_length=MAX_LENGTH, batch_tokens=10_000, batch_overhead_tokens=0,
                                pack=False)
    loose = LoglikelihoodEngine(model, requests, max_length=MAX_LENGTH, batch_tokens=10_000,
                                batch_overhead_tokens=10**9, pack=False)
    assert len(loose.batches) == 1 and len(tight.batches) == len(set(lengths)) > 1
    for batch in tight.batches:
        assert {lengths[k] for k in batch.owner.tolist()} == {batch.input_ids.shape[1]}
    measured = LoglikelihoodEngine(model, requests, max_length=MAX_LENGTH, batch_tokens=10_000, pack=False)
    assert 0 <= measured.batch_overhead_tokens <= 10_000
    forwards = []
    with monkeypatch.context() as patch:
        patch.setattr(engine_batching, "run_decoder", lambda *a, **k: forwards.append(a))
        assert engine_batching.batch_overhead(model, 10_000) == measured.batch_overhead_tokens and not forwards  # cached
        engine_batching.batch_overhead(model, 20_000)
        assert forwards  # another batch size is measured (the counter sees the forwards)
    reference, _ = _reference(model, requests)
    for engine in (tight, loose, measured):
        run = engine.run([None])[0]
        np.testing.assert_allclose(run.loglikelihood, reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("model_type,attn", [(m, "eager") for m in MODEL_TYPES] + [("llama", "sdpa"), ("gemma3_text", "sdpa")])
def test_stacked_windows_match_materialised_repeat(tiny_model_dirs, model_type, attn, monkeypatch, tmp_path):
    """Two-visit windows share the layers `i..L-1` from their cached `x_j`: in one batch they run stacked (fewer
    layer calls), and every window's numbers are still those of its own materialised model; 3-visit and damped
    windows, which run alone, give what an engine that never stacks gives."""
    monkeypatch.setenv("RYS_FORGE_CACHE", str(tmp_path))
    model = load_model(str(tiny_model_dirs[model_type]), attn_implementation=attn).model
    n = model.config.num_hidden_layers
    requests = _requests(model.config.vocab_size)
    windows = [(1, 3, 2), (0, 2, 2), None, (2, n, 2), (1, 4, 3), (1, 4, 2), (0, 3, 2, 0.5), (3, n, 2)]
    stacked = LoglikelihoodEngine(model, requests, max_length=MAX_LENGTH, batch_tokens=10_000, stack=32)
    alone = LoglikelihoodEngine(model, requests, max_length=MAX_LENGTH, batch_tokens=10_000)  # both packed: one batch
    assert stacked.packed and sum(b.input_ids.shape[0] for b in stacked.batches) < len(requests)  # rows shared
    calls, head_calls = [], []
    hooks = [layer.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in stacked.layers]
    hooks.append(model.lm_head.register_forward_pre_hook(lambda *_: head_calls.append(1)))
    try:
        done: list[int] = []
        started = time.perf_counter()
        runs = stacked.run(windows, on_done=lambda k, run: done.append(k))
        wall = time.perf_counter() - started
        stacked_calls, stacked_heads = len(calls), len(head_calls)
        calls.clear()
        head_calls.clear()
        single = alone.run(windows)
        alone_calls, alone_heads = len(calls), len(head_calls)
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(done) == list(range(len(windows))) and 0 < sum(run.seconds for run in runs) <= wall
    # one pass: capture (n) + the five 2-visit windows from their lowest start (n) + 3 visits (n - 1 + 3) + damped (n)
    assert stacked_calls == n + n + (n - 1 + 3) + n, stacked_calls
    assert alone_calls > stacked_calls + n
    assert (stacked_heads, alone_heads) == (4, 8)  # one head call for the stack's five windows (one batch)
    for window, run, lone in zip(windows, runs, single):
        if window is not None and len(window) == 3:
            order = LayerPlan.from_windows([Window(window[0], window[1])], n, window[2]).order
            ll, greedy = _reference(model, requests, order)
            np.testing.assert_allclose(run.loglikelihood, ll, rtol=1e-5, atol=1e-4)
            assert (run.is_greedy == greedy).all()
        np.testing.assert_allclose(run.loglikelihood, lone.loglikelihood, rtol=1e-5, atol=1e-4)
    # a cache too small for every batch (groups captured again per group of windows), head calls of 7 positions
    # straddling the stacked windows: the same numbers
    grouped = LoglikelihoodEngine(model, requests, max_length=MAX_LENGTH, batch_tokens=40, batch_overhead_tokens=0,
                                  max_cache_bytes=4096, stack=32, head_chunk=7)
    assert len(grouped.groups) > 1
    for run, again in zip(runs, grouped.run(windows, group_size=3)):
        np.testing.assert_allclose(again.loglikelihood, run.loglikelihood, rtol=1e-5, atol=1e-4)
        assert (again.is_greedy == run.is_greedy).all()


@pytest.mark.parametrize("model_type,attn", [("llama", "sdpa"), ("gemma3_text", "eager")])
def test_requests_longer_than_the_row_cap_get_rows_of_their_own(tiny_model_dirs, model_type, attn, monkeypatch,
                                                                tmp_path):
    """Requests longer than ``hidden_size`` tokens (32 here) are not packed (a packed row's attention grows with
    its length): one engine holds packed and one-request batches, and both give the materialised model's numbers,
    stacked too."""
    monkeypatch.setenv("RYS_FORGE_CACHE", str(tmp_path))
    model = load_model(str(tiny_model_dirs[model_type]), attn_implementation=attn).model
    g = torch.Generator().manual_seed(5)
    requests = _requests(model.config.vocab_size) + [
        (torch.randint(4, model.config.vocab_size, (n,), generator=g).tolist(), [7, 9]) for n in (40, 55, 61)]
    engine = LoglikelihoodEngine(model, requests, max_length=80, batch_tokens=400, stack=8)
    assert engine.packed and engine.row_cap == model.config.hidden_size == 32
    kinds = {(b.position_ids is not None, b.input_ids.shape[1] > 32) for b in engine.batches}
    assert kinds == {(True, False), (False, True)}  # packed short rows, long requests alone
    n = model.config.num_hidden_layers
    windows = [None, (1, 3, 2), (2, 4, 2), (0, n, 2)]
    for window, run in zip(windows, engine.run(windows)):
        order = LayerPlan.from_windows([Window(window[0], window[1])], n, 2).order if window else None
        ll, greedy = _reference(model, requests, order, max_length=80)
        np.testing.assert_allclose(run.loglikelihood, ll, rtol=1e-5, atol=1e-4)
        assert (run.is_greedy == greedy).all()


def test_packing_is_refused_when_the_model_does_not_mask_sequences_apart(tiny_model_dirs, monkeypatch, tmp_path):
    """If a model's forward built no mask from the packed position ids, its sequences would attend to each other:
    the capture stops with a one-line error instead. And a continuation that leaves no context token is refused."""
    monkeypatch.setenv("RYS_FORGE_CACHE", str(tmp_path))
    from rys_forge.research import sweep_engine

    model = load_model(str(tiny_model_dirs["llama"]), attn_implementation="sdpa").model
    requests = _requests(model.config.vocab_size)
    real = sweep_engine.run_decoder
    monkeypatch.setattr(sweep_engine, "run_decoder", lambda m, spec, ids, mask, positions=None: real(m, spec, ids, mask))
    with pytest.raises(TaskError, match="did not mask packed sequences apart"):
        LoglikelihoodEngine(model, requests, max_length=MAX_LENGTH).run([None])
    monkeypatch.setattr(sweep_engine, "run_decoder", real)
    with pytest.raises(TaskError, match="leaves no context token"):
        LoglikelihoodEngine(model, [([], [5, 6])], max_length=MAX_LENGTH)
    with pytest.raises(TaskError, match="leaves no context token"):
        LoglikelihoodEngine(model, [([4, 5], list(range(4, 4 + MAX_LENGTH + 1)))], max_length=MAX_LENGTH)


def test_tile_layer_kwargs_repeats_only_batch_major_tensors():
    """Batch-major tensors (2+ dimensions, first = the batch's rows) are repeated along the batch, in nested tuples
    and dicts too; broadcast rows, 1-D positions and flags are kept; one tensor shared by layers is tiled once."""
    from rys_forge.rank.activations import tile_layer_kwargs

    mask = torch.arange(2 * 1 * 3 * 3.0).reshape(2, 1, 3, 3)
    cos = torch.randn(1, 3, 4)
    positions = torch.arange(2)  # 1-D, of length rows by coincidence: not a batch
    kwargs = {"attention_mask": mask, "position_embeddings": (cos, torch.randn(2, 3, 4)), "cache_position": positions,
              "masks": {"sliding": mask}, "use_cache": False, "past_key_values": None}
    memo: dict = {}
    tiled = tile_layer_kwargs(kwargs, rows=2, copies=3, memo=memo)
    assert tiled["attention_mask"].shape == (6, 1, 3, 3)
    assert torch.equal(tiled["attention_mask"][4:], mask) and torch.equal(tiled["attention_mask"][:2], mask)
    assert tiled["position_embeddings"][0] is cos and tiled["position_embeddings"][1].shape == (6, 3, 4)
    assert tiled["cache_position"] is positions and tiled["use_cache"] is False and tiled["past_key_values"] is None
    assert tiled["masks"]["sliding"] is tiled["attention_mask"]  # the shared mask tiled once
    again = tile_layer_kwargs(kwargs, rows=2, copies=3, memo=memo)
    assert again["attention_mask"] is tiled["attention_mask"]
    assert tile_layer_kwargs(kwargs, rows=2, copies=2, memo=memo)["attention_mask"].shape == (4, 1, 3, 3)
    assert tile_layer_kwargs(kwargs, rows=2, copies=1)["attention_mask"] is mask
