"""Benchmark: `rank` against the naive yardstick (one full forward per window with the plan applied).

Model: random-init Llama-3-8B-shaped (32 layers, hidden 4096, MLP 14336, 32 heads / 8 KV heads,
vocab 128256), bf16, on one GPU; probe set 32 prompts x 256 random tokens. Measures, in one process:

  (a) naive: for every window of width >= 2 (496), apply the plan in memory and run one full forward
      of all prompts, KL(base || RYS) over every position (the brute-force probe a user would write);
  (b) rank: the full probe suite (`rank_windows`: every metric, iterates n up to 4, Jacobian spectrum
      on the top windows' token subsample).

Prints a table (times, the (b)/(a) ratio, the achieved matmul throughput of the layer passes against
the measured bf16 peak) and writes JSON to $OUT (or ./bench_out). Usage on the GPU machine:

    PYTHONPATH=. python bench/rank_bench.py [--layers 32] [--windows all|N] [--profile]

With `--tiny` it runs on CPU with a 4-layer toy config (a smoke test of the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


class SyntheticTokenizer:
    """Stands in for a tokenizer: prompt `str(k)` maps to a fixed random sequence of token ids."""

    pad_token_id = 0

    def __init__(self, vocab: int, length: int, count: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.sequences = torch.randint(1, vocab, (count, length), generator=gen).tolist()

    def __call__(self, texts, **_):
        ids = [self.sequences[int(t)] for t in texts]
        return {"input_ids": ids, "special_tokens_mask": [[0] * len(s) for s in ids]}


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.tiny:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512)
    else:
        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                             max_position_embeddings=8192, rope_theta=500000.0)
    config._attn_implementation = args.attn
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if not args.tiny else torch.float32)
    return model.eval()


def matmul_peak(device: str) -> float:
    """Measured bf16 matmul TFLOP/s (8192^3, median of 10 after warm-up)."""
    if device == "cpu":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * 8192**3 / times[len(times) // 2] / 1e12


def sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def layer_flops(config, tokens: int, seq: int) -> float:
    """Matmul FLOPs of one decoder layer over `tokens` tokens (sequences of length `seq`)."""
    h, m = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    proj = 2 * tokens * (h * h * 2 + h * kv * 2 + 3 * h * m)
    attn = 2 * 2 * tokens * seq * h / 2  # QK^T and PV, causal half
    return proj + attn


@torch.no_grad()
def naive_sweep(model, ids, windows, device):
    """(a): one full forward per window with the plan applied, KL over all positions."""
    from rys_forge.divergence import kl_from_logits
    from rys_forge.plan import LayerPlan
    from rys_forge.repeat import repeated

    L = model.config.num_hidden_layers
    chunks = ids.split(8)
    base = [model(c).logits.float() for c in chunks]
    sync(device)
    start = time.perf_counter()
    kls = {}
    for w in windows:
        with repeated(model, LayerPlan.from_windows([w], L)):
            total = 0.0
            for c, base_logits in zip(chunks, base):
                total += kl_from_logits(base_logits, model(c).logits.float()).mean().item() / len(chunks)
        kls[str(w)] = total
    sync(device)
    return time.perf_counter() - start, kls


def time_rank(model, tokenizer, prompts, settings, windows, ids, args) -> tuple[dict, object]:
    """(b): one timed `rank_windows` run; its timings and the achieved throughput of its layer passes."""
    from rys_forge.rank import rank_windows

    L = model.config.num_hidden_layers
    sync(args.device)
    t0 = time.perf_counter()
    result = rank_windows(model, tokenizer, prompts, settings, progress=False)
    sync(args.device)
    rank_s = time.perf_counter() - t0
    # Layer passes of the probe loop, in full-batch units: z_2 on the visit prompts' tokens, z_3..z_n on the
    # deep prompts' tokens, and the tail (layers j..L-1) from z_2 for the KL on the KL prompts' tokens.
    n = settings.iterations
    counts = result.summary["prompts"]
    visit_share = counts["visit_tokens"] / counts["tokens"]
    deep_share, kl_share = counts["deep_tokens"] / counts["tokens"], counts["kl_tokens"] / counts["tokens"]
    passes = sum(w.width * (visit_share + (n - 2) * deep_share) + (L - w.end) * kl_share for w in windows)
    probe_flops = passes * layer_flops(model.config, ids.numel(), args.seq)
    timings = result.summary["timings"]
    return {"deep_fraction": settings.deep_fraction, "kl_fraction": settings.kl_fraction,
            "visit_fraction": settings.visit_fraction, "rank_s": rank_s,
            "rank_timings": timings, "probe_layer_passes": passes,
            "probe_tflops": probe_flops / timings["windows_s"] / 1e12}, result


#: Score inputs from the second visit (`--visit-fraction`) and diagnostics from the deeper iterates (never inputs
#: of the score): how well the fast run keeps them.
DIAGNOSTICS = ("r_0", "d_dec", "delta_2", "r_1", "cka_drift_4", "n2_a", "n2_r2_pure")


def compare_with_reference(model, tokenizer, prompts, settings, fast_runs, args) -> dict:
    """Rank again at full fidelity and measure what the fast settings change: top-10 overlap, Spearman
    of the scores, and the largest differences of the score inputs (plateau CKA and delta_0 come from
    the same cached tokens in both runs, so their difference is the statistics' arithmetic alone)."""
    from scipy.stats import spearmanr

    from rys_forge.rank import RankSettings, rank_windows

    full = RankSettings(**{**settings.__dict__, "deep_fraction": 1.0, "kl_fraction": 1.0, "visit_fraction": 1.0,
                           "kl_positions": 16, "stats_dtype": "float64", "jacobian": "none"})
    sync(args.device)
    t0 = time.perf_counter()
    ref = rank_windows(model, tokenizer, prompts, full, progress=False)
    sync(args.device)
    seconds = time.perf_counter() - t0
    b = {r["window"]: r for r in ref.rows}
    top = lambda rows: {r["window"] for r in rows[:10]}  # noqa: E731
    rho = lambda a, key: float(spearmanr([a[k][key] for k in sorted(b)], [b[k][key] for k in sorted(b)]).statistic)  # noqa: E731
    out = {"seconds": seconds, "settings": {k: v for k, v in full.__dict__.items() if k != "windows"}, "variants": []}
    for fast in fast_runs:
        a = {r["window"]: r for r in fast.rows}
        row = {
            "deep_fraction": fast.summary["settings"]["deep_fraction"],
            "visit_fraction": fast.summary["settings"]["visit_fraction"],
            "top10_overlap": len(top(fast.rows) & top(ref.rows)),
            "spearman_score": rho(a, "score"),
            "spearman_d_kl": rho(a, "d_kl"),
            **{f"spearman_{key}": rho(a, key) for key in DIAGNOSTICS},
        }
        for key in ("cka_plateau", "delta_0", "r_0", "d_dec", "d_kl", "score"):
            row[f"max_abs_diff_{key}"] = max(abs(a[k][key] - b[k][key]) for k in b)
            row[f"max_rel_diff_{key}"] = max(abs(a[k][key] - b[k][key]) / max(abs(b[k][key]), 1e-30) for k in b)
        out["variants"].append(row)
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--windows", default="all", help="all, or the first N windows (both (a) and (b))")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--stats-dtype", default="tf32", help="float64, float32 or tf32 (rank --stats-dtype)")
    parser.add_argument("--deep-fraction", type=float, default=0.25, help="rank --deep-fraction")
    parser.add_argument("--kl-fraction", type=float, default=0.25, help="rank --kl-fraction")
    parser.add_argument("--kl-positions", type=int, default=64, help="KL positions per KL prompt")
    parser.add_argument("--jacobian-top", type=int, default=5)
    parser.add_argument("--visit-fraction", type=float, default=1.0, help="rank --visit-fraction")
    parser.add_argument("--also-deep", type=float, nargs="*", default=[],
                        help="time (b) again with these deep fractions (same run, same (a))")
    parser.add_argument("--also", nargs="*", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                        help="time (b) again with these settings changed, e.g. visit_fraction=0.5,deep_fraction=0.125")
    parser.add_argument("--reference", action="store_true",
                        help="also rank at full fidelity (every prompt for every iterate and the KL, 16 KL positions "
                             "per prompt, float64 statistics) and report how far the fast settings move the ranking")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of (b) on 8 windows spread over the grid")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if args.tiny:
        args.prompts, args.seq = 4, 16
    return args


def forward_seconds(model, ids, device: str) -> float:
    """Plain forward of the decoder over `ids` (mean of 3 after 2 warm-ups): the reference point the issue
    quotes (~63% of peak)."""
    with torch.no_grad():
        for _ in range(2):
            model.model(ids)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            model.model(ids)
        sync(device)
    return (time.perf_counter() - t0) / 3


def main() -> None:
    args = parse_args()
    from rys_forge.plan import all_windows
    from rys_forge.rank import Prompt, RankSettings, rank_windows

    model = build_model(args)
    L = model.config.num_hidden_layers
    windows = all_windows(L)
    if args.windows != "all":
        windows = windows[: int(args.windows)]
    tokenizer = SyntheticTokenizer(model.config.vocab_size, args.seq, args.prompts)
    prompts = [Prompt(str(k), "synthetic", str(k)) for k in range(args.prompts)]
    ids = torch.tensor(tokenizer.sequences, device=args.device)
    peak = matmul_peak(args.device)
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "peak_bf16_tflops": peak,
               "layers": L, "windows": len(windows), "tokens": args.prompts * args.seq, "attn": args.attn}

    fwd = forward_seconds(model, ids, args.device)
    fwd_flops = L * layer_flops(model.config, ids.numel(), args.seq)
    results["forward_s"] = fwd
    results["forward_tflops"] = fwd_flops / fwd / 1e12

    if not args.skip_naive:
        naive_s, _ = naive_sweep(model, ids, windows, args.device)
        results["naive_s"] = naive_s
        print(f"(a) naive sweep: {naive_s:.1f} s", flush=True)  # as each part finishes: a cut run still says it

    settings = RankSettings(windows=[str(w) for w in windows], max_tokens=args.seq, batch_size=args.prompts,
                            kl_positions=args.kl_positions, kl_fraction=args.kl_fraction, deep_fraction=args.deep_fraction,
                            visit_fraction=args.visit_fraction,
                            stats_dtype=args.stats_dtype, jacobian="top", jacobian_top=args.jacobian_top,
                            jacobian_prompts=1, jacobian_tokens=64, jacobian_iters=8)
    results["settings"] = {k: v for k, v in settings.__dict__.items() if k != "windows"}
    variants = [settings]
    for spec in [f"deep_fraction={f}" for f in args.also_deep] + args.also:  # --also-deep F is --also deep_fraction=F
        changes = dict(part.split("=") for part in spec.split(","))
        variants.append(RankSettings(**{**settings.__dict__, **{k: float(v) for k, v in changes.items()}}))
    for variant in variants:
        variant.validate()
    results["variants"], fast_runs = [], []
    for variant in variants:
        row, result = time_rank(model, tokenizer, prompts, variant, windows, ids, args)
        row["rank_over_naive"] = row["rank_s"] / results["naive_s"] if "naive_s" in results else None
        results["variants"].append(row)
        fast_runs.append(result)
        print(f"(b) visit {variant.visit_fraction:g}, deep {variant.deep_fraction:g}: {row['rank_s']:.1f} s, "
              f"(b)/(a) {row['rank_over_naive'] or float('nan'):.3f}", flush=True)
    result = fast_runs[0]
    results.update({k: results["variants"][0][k] for k in ("rank_s", "rank_timings", "probe_layer_passes", "probe_tflops", "rank_over_naive")})
    if args.reference:
        results["reference"] = compare_with_reference(model, tokenizer, prompts, settings, fast_runs, args)

    if args.profile and args.device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        spread = windows[:: max(1, len(windows) // 8)][:8]  # windows of every depth and width
        few = RankSettings(**{**settings.__dict__, "windows": [str(w) for w in spread], "jacobian": "none"})
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            rank_windows(model, tokenizer, prompts, few, progress=False)
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
        results["profile"] = table
        print(table)

    out = Path(os.environ.get("OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "rank_bench.json").write_text(json.dumps(results, indent=2, default=str))
    print_table(results, peak, ids.numel(), len(windows), fwd)


def print_table(results: dict, peak: float, tokens: int, n_windows: int, fwd: float) -> None:
    """The measurements as a two-column table (percentages of the measured bf16 peak where it applies)."""
    pct = lambda v: f"{100 * v / peak:.0f}%" if peak == peak else "-"  # noqa: E731
    print(f"\n{'measure':52s} {'value':>12s}")
    print(f"{'device':52s} {results['device']:>12s}")
    print(f"{'measured bf16 matmul peak (TFLOP/s)':52s} {peak:12.1f}")
    print(f"{'plain forward, %d tokens (s)' % tokens:52s} {fwd:12.3f}  ({results['forward_tflops']:.0f} TFLOP/s, {pct(results['forward_tflops'])})")
    if "naive_s" in results:
        print(f"{'(a) naive sweep, %d windows (s)' % n_windows:52s} {results['naive_s']:12.1f}")
    for v in results["variants"]:
        t = v["rank_timings"]
        label = f"(b) rank, visit {v['visit_fraction']:g}, deep {v['deep_fraction']:g}, KL {v['kl_fraction']:g} (s)"
        print(f"{label:52s} {v['rank_s']:12.1f}")
        print(f"{'    base pass / windows / jacobian / curves':52s} {t['base_pass_s']:.1f} / {t['windows_s']:.1f} / {t['jacobian_s']:.1f} / {t['repeat_curves_s']:.1f}")
        print(f"{'    probe layer passes: achieved TFLOP/s':52s} {v['probe_tflops']:12.0f}  ({pct(v['probe_tflops'])} of peak)")
        if v["rank_over_naive"]:
            print(f"{'    (b) / (a)':52s} {v['rank_over_naive']:12.2f}  (target <= 0.35)")
    if "reference" in results:
        ref = results["reference"]
        print(f"{'full-fidelity rank (s)':52s} {ref['seconds']:12.1f}")
        for v in ref["variants"]:
            print(f"  visit {v['visit_fraction']:g}, deep {v['deep_fraction']:g}: top-10 overlap {v['top10_overlap']}, Spearman score {v['spearman_score']:.4f}, "
                  f"D_KL {v['spearman_d_kl']:.4f}; " + ", ".join(f"{k} {v['spearman_' + k]:.3f}" for k in DIAGNOSTICS))
            print(f"    max |diff| plateau CKA / delta_0 / d_dec: {v['max_abs_diff_cka_plateau']:.2e} / "
                  f"{v['max_abs_diff_delta_0']:.2e} / {v['max_abs_diff_d_dec']:.2e}")


if __name__ == "__main__":
    main()
