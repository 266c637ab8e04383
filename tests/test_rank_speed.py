"""rank's fast CPU path against references: float32 linears on oneDNN, the row-wise float64 KL with one
batched LM-head call, the padding-aware batch cut, the deep-only repeat curves and window-parallel probing
must give the numbers of the straightforward computation (fixed batches of `batch_size`, torch's linears,
a head call per batch and a float64 KL from `torch.distributions`, one window at a time) within stated
tolerances."""

from __future__ import annotations

import itertools
import math
import threading
import time

import pytest
import torch

from rys_forge.divergence import BaseDistribution, kl_from_logits, kl_rows, top1_agrees
from rys_forge.errors import UsageError
from rys_forge.models import load_model
from rys_forge.rank import Prompt, RankSettings, rank_windows
from rys_forge.rank import activations
from rys_forge.rank.activations import ActivationCache, cache_activations, head_logits, replay_layers
from rys_forge.rank.fast_linear import bf16_math_available, fast_linears, matmul_precision, resolve_matmul
from rys_forge.rank.probes import (
    AUTO_WORKERS_MAX, ProbeSettings, Trajectory, in_order, list_probes,
    probe_window, repeat_curves, torch_threads, window_workers,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog while the farmer watches.",
    "def add(a, b):\n    return a + b  # adds two numbers",
    "2 + 2 = 4, 3 * 7 = 21",
    "Le renard brun rapide saute par-dessus le chien paresseux, puis il dort longtemps sous l'arbre.",
    "Residual streams and layer windows.",
    "If every cat is a mammal and Tom is a cat, then Tom is a mammal, and so on.",
    "Repeat your self.",
    "The committee postponed its decision until the next meeting in March, citing missing reports.",
]

#: Tolerances of the fast path against the reference, per value: |fast - ref| <= ABS + REL |ref|. The two
#: differ only by float32 rounding (other batch shapes, oneDNN's products) and the KL's float64 summation
#: order; measured on these tiny models: at most 1.4e-6 relative (n2_c, a fit coefficient near 0, 9e-9
#: absolute), below 3e-7 for every other metric.
REL, ABS = 1e-5, 1e-7


@pytest.fixture(scope="module")
def gemma(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["gemma3_text"]))


def _fixed_chunks(lengths, items, batch_size):
    """The batch cut before the padding-aware one: consecutive chunks of `batch_size`."""
    return [list(items[f : f + batch_size]) for f in range(0, len(items), batch_size)]


def _reference_kl_from(self: ActivationCache, batches, start, states):
    """Per batch: the tail, the head on that batch alone, and the KL in float64 from torch.distributions."""
    out = []
    for batch, z in zip(batches, states):
        z = replay_layers(self.layers, batch.layer_kwargs, start, self.num_layers, z)
        rows, cols = batch.kl_index.unbind(1)
        logits = head_logits(self.model, self.spec, z[rows, cols])
        kl = torch.distributions.kl_divergence(
            torch.distributions.Categorical(logits=batch.base_logits.double()),
            torch.distributions.Categorical(logits=logits.double()),
        )
        out.append((kl.clamp_min(0.0).float(), logits.argmax(-1) == batch.base_top1))
    return out


def _cache(gemma, **kwargs):
    families = ["a", "b"] * (len(TEXTS) // 2)
    return cache_activations(gemma.model, gemma.tokenizer, TEXTS, families, max_tokens=24, batch_size=3, kl_positions=3,
                             deep_fraction=0.5, outlier_factor=5.0, **kwargs)


def _close(fast: float, ref: float) -> bool:
    if math.isnan(ref) or math.isnan(fast):
        return math.isnan(ref) and math.isnan(fast)
    return abs(fast - ref) <= ABS + REL * abs(ref)


def test_kl_rows_matches_torch_distributions_in_float64():
    gen = torch.Generator().manual_seed(0)
    vocab = 6000
    base = 4.0 * torch.randn(5, vocab, generator=gen)
    other = torch.stack([
        base[0] + 1e-6 * torch.randn(vocab, generator=gen),  # KL ~ 1e-13: far below float32 resolution
        base[1] + 1e-3 * torch.randn(vocab, generator=gen),
        base[2] + 3.0,  # a shift: KL 0 up to the float32 rounding of the sum (~1e-13)
        4.0 * torch.randn(vocab, generator=gen),  # unrelated
        base[4] + 200.0 * (torch.arange(vocab) == 7),  # one huge logit gap
    ])
    reference = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=base.double()), torch.distributions.Categorical(logits=other.double())
    )
    got = kl_rows(BaseDistribution.of(base), other)
    assert got.dtype == torch.float64
    # atol: the float64 floor, log-normalisers of size ~15 rounded at ~2e-15 shift every log-ratio alike.
    assert torch.allclose(got, reference, rtol=1e-7, atol=1e-14), (got, reference)
    assert got[0] > 0 and got[0] < 1e-10
    # The same numbers as the shared KL of rys_forge.divergence (the computation rank used before).
    assert torch.allclose(got, kl_from_logits(base, other, dtype=torch.float64), rtol=1e-9, atol=1e-14)
    with pytest.raises(ValueError, match="shape"):
        kl_rows(BaseDistribution.of(base), other[:, :10])
    # A -inf logit where the base has no mass: 0 log 0 = 0, not NaN; where it has mass: infinite.
    masked = other.clone()
    masked[3, base[3].argmin()] = -math.inf
    masked[1, base[1].argmax()] = -math.inf
    sparse = base.clone()
    sparse[3, base[3].argmin()] = -math.inf
    got = kl_rows(BaseDistribution.of(sparse), masked)
    assert torch.isfinite(got[3]) and got[1] == math.inf


def test_top1_agreement_is_argmax_with_ties_to_the_first():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=gen)
    top1 = logits.argmax(-1).clone()
    top1[1] = (top1[1] + 1) % 50  # disagrees
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1  # tied maximum: argmax takes 7
    top1[2] = 9
    logits[3, 4] = logits[3, 11] = logits[3].max() + 1
    top1[3] = 4
    assert torch.equal(top1_agrees(logits, top1), logits.argmax(-1) == top1)
    assert top1_agrees(logits, top1).tolist() == [True, False, False, True, True, True]


def test_cut_is_the_cheapest_partition_into_batches():
    gen = torch.Generator().manual_seed(1)
    for trial in range(30):
        count = int(torch.randint(1, 9, (1,), generator=gen))
        batch_size = int(torch.randint(1, 5, (1,), generator=gen))
        lengths = sorted(torch.randint(2, 60, (count,), generator=gen).tolist())
        cut = activations.cut_batches(lengths, list(range(count)), batch_size)

        def cost(parts):
            return sum(len(p) * lengths[p[-1]] + activations.BATCH_OVERHEAD_TOKENS for p in parts)

        assert [k for part in cut for k in part] == list(range(count))
        assert all(1 <= len(part) <= batch_size for part in cut)
        best = math.inf  # brute force: every composition of `count` into consecutive parts
        for mask in itertools.product((False, True), repeat=count - 1):
            parts, current = [], [0]
            for k, split in enumerate(mask, start=1):
                if split:
                    parts.append(current)
                    current = []
                current.append(k)
            parts.append(current)
            if all(len(p) <= batch_size for p in parts):
                best = min(best, cost(parts))
        assert cost(cut) == best, (trial, lengths, batch_size, cut)


def test_fast_rows_match_the_reference_path(gemma, monkeypatch):
    """Every metric of every window: fast path (padding-aware batches, linears on oneDNN, one head call,
    row-wise KL) against fixed batches of `batch_size`, torch's linears, a head call per batch and
    torch.distributions' KL."""
    windows = [(0, 2), (1, 4), (2, 7), (3, 5), (4, 8), (0, 8)]
    names = [p for p in list_probes() if p != "jacobian"]
    settings = ProbeSettings()
    with fast_linears(gemma.model) as switched:
        linears = [m for m in gemma.model.modules() if isinstance(m, torch.nn.Linear)]
        assert switched == (len(linears) if torch.backends.mkldnn.is_available() else 0)
        fast = _cache(gemma)
        got = [probe_window(fast, i, j, names, settings, ("a", "b")) for i, j in windows]
    with monkeypatch.context() as patch:
        patch.setattr(activations, "cut_batches", _fixed_chunks)
        patch.setattr(ActivationCache, "kl_from", _reference_kl_from)
        reference = _cache(gemma)
        want = [probe_window(reference, i, j, names, settings, ("a", "b")) for i, j in windows]
    assert [len(b.prompt_ids) for b in fast.batches] != [len(b.prompt_ids) for b in reference.batches]
    assert [k for b in fast.batches for k in b.prompt_ids] == [k for b in reference.batches for k in b.prompt_ids]
    worst = 0.0
    for window, fast_row, ref_row in zip(windows, got, want):
        assert fast_row.keys() == ref_row.keys()
        for key, value in ref_row.items():
            assert _close(fast_row[key], value), (window, key, fast_row[key], value)
            if math.isfinite(value) and value:
                worst = max(worst, abs(fast_row[key] - value) / abs(value))
    assert worst > 0.0  # the two paths really ran different arithmetic


def test_fast_linears_match_torch_and_leave_gradients_to_it(gemma):
    linear = gemma.model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 5, linear.in_features, generator=torch.Generator().manual_seed(2))
    weight = linear.weight.detach().double()
    want, want_tangent = x.double() @ weight.T, torch.ones_like(x).double() @ weight.T
    with fast_linears(gemma.model):
        assert ("forward" in linear.__dict__) == torch.backends.mkldnn.is_available()
        with torch.no_grad():
            fast = linear(x)
        slow = linear(x)  # gradients on: torch's own linear, so autograd (and the Jacobian's JVP) work
        assert slow.grad_fn is not None
        _, tangent = torch.func.jvp(linear, (x,), (torch.ones_like(x),))
    assert "forward" not in linear.__dict__  # switched back
    for got, ref in ((fast, want), (slow.detach(), want), (tangent.detach(), want_tangent)):
        assert (got.double() - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


def test_repeat_curves_replay_only_the_deep_batches(gemma, monkeypatch):
    cache = _cache(gemma)
    settings = ProbeSettings()
    rows = [{"window": "1:4", "i": 1, "j": 4}, {"window": "2:6", "i": 2, "j": 6}]
    replayed = []
    original = ActivationCache.block
    monkeypatch.setattr(ActivationCache, "block", lambda self, batch, *a: replayed.append(batch.deep) or original(self, batch, *a))
    curves = repeat_curves(cache, rows, settings, with_kl=True)
    monkeypatch.setattr(ActivationCache, "block", original)
    assert replayed and all(replayed)
    for row in rows:  # the reference: a full trajectory read on its deep batches, as the curves were computed before
        _check_curve(curves[row["window"]], Trajectory(cache, row["i"], row["j"], settings))


@torch.no_grad()
def _check_curve(curve: dict, t: Trajectory) -> None:
    m = t.cka(deep=True)
    assert curve["cka_drift"] == pytest.approx([1.0 - float(m[n, 0]) for n in range(1, 5)], rel=1e-12, abs=1e-15)
    deltas = [((t.z(n + 1, True).double() - t.z(n, True).double()).norm() / t.z(n, True).double().norm()).item()
              for n in range(4)]
    assert curve["delta"] == pytest.approx(deltas, rel=1e-9)
    kls = [0.0] + [float(t.kl_per_position(v, deep=True)[0].mean()) for v in range(2, 5)]
    assert curve["kl"] == pytest.approx(kls, rel=1e-6)


def test_in_order_runs_in_threads_keeps_the_order_and_raises_at_the_item():
    threads_before = torch.get_num_threads()
    seen: set[str] = set()

    def work(k: int) -> int:
        seen.add(threading.current_thread().name)
        assert torch.get_num_threads() == 1  # one torch thread per worker
        time.sleep(0.01 * ((7 * k) % 5))  # finish out of order
        if k == 6:
            raise KeyboardInterrupt
        return k * k

    got = []
    with torch_threads(2), pytest.raises(KeyboardInterrupt):  # 2 torch threads for 3 workers: 1 each
        for item, result in in_order(work, range(12), workers=3):
            got.append((item, result))
    assert got == [(k, k * k) for k in range(6)]
    assert len(seen) > 1 and torch.get_num_threads() == threads_before
    assert list(in_order(lambda k: -k, [3, 1, 2], workers=1)) == [(3, -3), (1, -1), (2, -2)]


def test_window_workers_follow_the_device_and_the_threads(gemma):
    assert window_workers(3, gemma.model) == 3
    with torch_threads(2):
        assert window_workers(0, gemma.model) == 2
    with torch_threads(16):
        assert window_workers(0, gemma.model) == AUTO_WORKERS_MAX
    with pytest.raises(UsageError, match="--workers must be an integer >= 0"):
        window_workers(-1, gemma.model)


def test_shared_memo_is_one_value_per_key_and_bounded():
    cache = ActivationCache(model=None, spec=None, batches=[], num_layers=0)  # type: ignore[arg-type]
    calls = []
    for key in [1, 1, 2, 1, 3, 4, 5, 1]:
        assert cache.shared(key, lambda key=key: calls.append(key) or key * 10, keep=3) == key * 10
    assert calls == [1, 2, 3, 4, 5, 1]  # 1 was dropped once three newer keys came
    assert len(cache.memo) == 3


def test_window_parallel_rank_equals_one_window_at_a_time(gemma):
    prompts = [Prompt(f"p{k}", "a" if k % 2 else "b", text) for k, text in enumerate(TEXTS)]
    settings = RankSettings(max_tokens=16, batch_size=3, jacobian="none", top_k=3)
    one = rank_windows(gemma.model, gemma.tokenizer, prompts, settings, progress=False)
    two = rank_windows(gemma.model, gemma.tokenizer, prompts, settings, progress=False, workers=2)
    assert [r["window"] for r in two.rows] == [r["window"] for r in one.rows]
    for a, b in zip(one.rows, two.rows):
        for key, value in a.items():
            if isinstance(value, float) and key != "probe_s":
                assert _close(b[key], value), (a["window"], key, b[key], value)


# ------------------------------------------------------------------ --matmul: bf16 math mode for float32 products

BF16_MATH = bf16_math_available()


def test_matmul_modes_resolve_and_refuse_in_one_line(gemma):
    assert resolve_matmul("float32", gemma.model) == "float32"
    assert resolve_matmul("auto", gemma.model) in ("float32", "bf16")
    with pytest.raises(UsageError, match="--matmul 'half'"):
        resolve_matmul("half", gemma.model)
    with pytest.raises(UsageError, match="--matmul 'half'"):
        RankSettings(matmul="half").validate()
    half = torch.nn.Linear(4, 4).to(torch.bfloat16)
    with pytest.raises(UsageError, match="float32 model on a CPU"):
        resolve_matmul("bf16", half)
    assert resolve_matmul("auto", half) == "float32"


def test_bf16_math_mode_counts_only_where_it_rounds_only_the_inputs(monkeypatch):
    """`bf16_math_available` checks the arithmetic, not just the flag: a bf16 math mode whose results carry more
    than the inputs' rounding (an AMD EPYC without AMX: ~3e-3 relative) is not offered."""
    import rys_forge.rank.fast_linear as fast_linear

    real_linear = torch.nn.functional.linear

    def emulated(rounds_outputs):
        def linear(x, w, *args):
            if torch.backends.mkldnn.matmul.fp32_precision != "bf16":
                return real_linear(x, w, *args)
            out = (x.bfloat16().double() @ w.bfloat16().double().T).float()
            return out.bfloat16().float() if rounds_outputs else out
        return linear

    for rounds_outputs, expected in ((False, True), (True, False)):
        fast_linear._rounds_only_the_inputs.cache_clear()
        monkeypatch.setattr(torch.nn.functional, "linear", emulated(rounds_outputs))
        try:
            assert fast_linear._rounds_only_the_inputs() is expected
        finally:
            monkeypatch.setattr(torch.nn.functional, "linear", real_linear)
            fast_linear._rounds_only_the_inputs.cache_clear()


@pytest.mark.skipif(not BF16_MATH, reason="this CPU or torch build has no oneDNN bf16 math mode")
def test_auto_weighs_bf16_against_the_float32_path_a_run_takes(gemma, monkeypatch):
    """auto's float32 side is the fastest float32 path the run would take: where oneDNN's op (what `fast_linears`
    switches to) is as fast as bf16, auto keeps float32 however slow torch's default linear is (an AMD EPYC's MKL)."""
    import rys_forge.rank.fast_linear as fast_linear

    ready = {}

    def instant_float32(x, w, *_):  # a float32 path faster than any product: bf16 cannot be 1.3x faster
        return ready.setdefault((x.shape, w.shape), torch.empty(x.shape[0], w.shape[0]))

    real_linear = torch.nn.functional.linear

    def slow_float32_linear(x, w, *args):  # torch's default float32 linear made slow, bf16 math mode untouched
        if torch.backends.mkldnn.matmul.fp32_precision != "bf16":
            time.sleep(0.05)
        return real_linear(x, w, *args)

    monkeypatch.setattr(torch.nn.functional, "linear", slow_float32_linear)
    monkeypatch.setattr(fast_linear, "_onednn_linear_op", lambda: instant_float32)
    assert resolve_matmul("auto", gemma.model) == "float32"
    monkeypatch.setattr(torch.nn.functional, "linear", real_linear)
    monkeypatch.setattr(fast_linear, "_onednn_linear_op", lambda: None)  # no oneDNN op: torch's linear decides
    assert resolve_matmul("auto", gemma.model) in ("float32", "bf16")


@pytest.mark.skipif(not BF16_MATH, reason="this CPU or torch build has no oneDNN bf16 math mode")
def test_bf16_matmul_rounds_the_inputs_only_and_is_restored(gemma):
    """Inside `matmul_precision("bf16")` a float32 product equals the float64 product of bfloat16-rounded
    inputs (float32 accumulation), not the exact one; outside it, exact float32 again."""
    generator = torch.Generator().manual_seed(3)
    x, w = torch.randn(64, 96, generator=generator), torch.randn(80, 96, generator=generator)
    exact = x.double() @ w.double().T
    rounded = x.bfloat16().double() @ w.bfloat16().double().T
    before = torch.backends.mkldnn.matmul.fp32_precision
    with matmul_precision("bf16"):
        fast = torch.nn.functional.linear(x, w).double()
        with fast_linears(gemma.model) as switched:
            assert switched == 0  # torch's linear takes oneDNN already
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    scale = exact.abs().max()
    assert (fast - rounded).abs().max() <= 1e-5 * scale  # the products of the rounded inputs, float32 sums
    assert (fast - exact).abs().max() >= 1e-4 * scale  # ... which are not the exact products
    plain = torch.nn.functional.linear(x, w).double()
    assert (plain - exact).abs().max() <= 1e-6 * scale


@pytest.mark.skipif(not BF16_MATH, reason="this CPU or torch build has no oneDNN bf16 math mode")
def test_bf16_rank_stays_close_to_float32_and_is_part_of_the_run(gemma, tmp_path):
    """A bf16 run: every column of every window within 5% of that column's range over the windows of the
    float32 run plus 1% of its value (a near-constant column has almost no range), `top1_agree` within two
    positions or 5% (measured on gemma-3-270m: every column within 4% of its range, most within 0.5%; 4 of 160
    positions flip at most; the same top 10 and short list),
    `matmul` stored in run.json, and a float32 resume of it refused."""
    prompts = [Prompt(f"p{k}", "a" if k % 2 else "b", text) for k, text in enumerate(TEXTS)]
    settings = RankSettings(max_tokens=16, batch_size=3, jacobian="none", top_k=3)
    plain = rank_windows(gemma.model, gemma.tokenizer, prompts, settings, progress=False)
    fast = rank_windows(gemma.model, gemma.tokenizer, prompts, RankSettings(**{**settings.__dict__, "matmul": "bf16"}),
                        out_dir=tmp_path / "run", progress=False)
    assert fast.summary["settings"]["matmul"] == "bf16" and plain.summary["settings"]["matmul"] == "float32"
    want = {r["window"]: r for r in plain.rows}
    rows = {r["window"]: r for r in fast.rows}
    columns = [k for k, v in plain.rows[0].items() if isinstance(v, float) and k != "probe_s"]
    flips = 2 / plain.summary["prompts"]["kl_positions"]  # top1_agree is a share of positions: two may flip
    for column in columns:
        ref = [want[w][column] for w in want if math.isfinite(want[w][column])]
        spread = max(ref) - min(ref) if ref else 0.0
        for w in want:
            a, b = want[w][column], rows[w][column]
            limit = max(flips, 0.05) if column == "top1_agree" else 0.05 * spread + 0.01 * abs(a) + 1e-9
            assert math.isnan(a) == math.isnan(b), (w, column)
            assert math.isnan(a) or abs(b - a) <= limit, (w, column, a, b, spread)
    got = {w: r["score"] for w, r in rows.items()}
    assert any(got[w] != want[w]["score"] for w in want)  # it really ran other arithmetic
    with pytest.raises(UsageError, match="matmul"):
        rank_windows(gemma.model, gemma.tokenizer, prompts, settings, out_dir=tmp_path / "run", resume=True,
                     progress=False)
    # auto continues a run in the precision it started with, whatever a timing would pick today
    resumed = rank_windows(gemma.model, gemma.tokenizer, prompts, RankSettings(**{**settings.__dict__, "matmul": "auto"}),
                           out_dir=tmp_path / "run", resume=True, progress=False)
    assert resumed.summary["settings"]["matmul"] == "bf16"
    assert {r["window"]: r["score"] for r in resumed.rows} == got
