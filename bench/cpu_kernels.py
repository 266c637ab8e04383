"""The CPU kernels behind `rank`'s cost per window, one table: a decoder layer's matrix products in float32 and in
oneDNN's bf16 math mode (`rank --matmul`), the KL of a window against the base (the float64 formula before #17
against `divergence.kl_rows` with cached base terms), and top-1 agreement (`argmax` against `top1_agrees`).

    PYTHONPATH=. python bench/cpu_kernels.py [--threads 1] [--tokens 736] [--rows 40] [--vocab 262144]

Shapes default to gemma-3-270m's (hidden 640, MLP 2048, 262k vocabulary) at one of rank's batches; times are the
best of `--repeats` after a warm-up. Used for docs/results/rank_speed (session 7, a 2-core Intel Xeon with AMX).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from rys_forge.divergence import BaseDistribution, kl_rows, top1_agrees
from rys_forge.rank.fast_linear import bf16_math_available, matmul_precision


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def old_kl_rows(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """rank's KL before #17: `sum p (log p - log q)` in float64 a row at a time, only the log-normaliser cached."""
    base_lse = torch.logsumexp(base_logits.double(), dim=-1)
    out = []
    for row in range(logits.shape[0]):
        log_p = base_logits[row].double() - base_lse[row]
        q = logits[row].double()
        log_q = q - torch.logsumexp(q, dim=-1)
        p = log_p.exp()
        out.append(torch.where(p > 0, p * (log_p - log_q), 0.0).sum())
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=736, help="tokens in one product (one of rank's batches)")
    parser.add_argument("--rows", type=int, default=40, help="KL positions in one batch")
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), bf16 math mode available: {bf16_math_available()}\n")
    print("| kernel | shape | time | rate | against the first row of its group |")
    print("|---|---|---:|---:|---:|")
    for name, (k, n) in {"MLP up/gate": (640, 2048), "MLP down": (2048, 640), "attention q": (640, 1024)}.items():
        x = torch.randn(args.tokens, k, generator=generator)
        w = torch.randn(n, k, generator=generator)
        flops = 2 * args.tokens * k * n
        plain = best_seconds(lambda: torch.nn.functional.linear(x, w), args.repeats)
        print(f"| {name}, float32 | [{args.tokens}, {k}] x [{k}, {n}] | {plain * 1e3:.2f} ms | {flops / plain / 1e9:.0f} GFLOP/s | 1.00x |")
        if bf16_math_available():
            with matmul_precision("bf16"):
                fast = best_seconds(lambda: torch.nn.functional.linear(x, w), args.repeats)
            print(f"| {name}, bf16 math mode | | {fast * 1e3:.2f} ms | {flops / fast / 1e9:.0f} GFLOP/s | {plain / fast:.2f}x |")
    base = 3.0 * torch.randn(args.rows, args.vocab, generator=generator)
    other = base + 0.3 * torch.randn(args.rows, args.vocab, generator=generator)
    cached = BaseDistribution.of(base)
    before = best_seconds(lambda: old_kl_rows(base, other), args.repeats)
    after = best_seconds(lambda: kl_rows(cached, other), args.repeats)
    gap = (kl_rows(cached, other) - old_kl_rows(base, other)).abs().max().item()
    print(f"| KL, float64, before #17 | [{args.rows}, {args.vocab}] | {before * 1e3:.1f} ms | | 1.00x |")
    print(f"| KL, float64, cached base terms (`kl_rows`) | | {after * 1e3:.1f} ms | | {before / after:.2f}x (max difference {gap:.1e}) |")
    top1 = base.argmax(-1)
    slow = best_seconds(lambda: other.argmax(-1) == top1, args.repeats)
    quick = best_seconds(lambda: top1_agrees(other, top1), args.repeats)
    print(f"| top-1 agreement, `argmax` | [{args.rows}, {args.vocab}] | {slow * 1e3:.1f} ms | | 1.00x |")
    print(f"| top-1 agreement, `top1_agrees` | | {quick * 1e3:.1f} ms | | {slow / quick:.2f}x |")


if __name__ == "__main__":
    main()
