"""Layer-by-layer CKA of the residual stream with and without the outlier positions (massive activations).

One base pass over rank's default prompt set (the same cache rank builds), then the CKA matrix over
x_0..x_L on every valid token, and again with the outlier positions excluded (`--outlier-factor`, rank's
default 5). Prints a table per model (outlier tokens and the prompt positions they sit at, mean and minimum
off-diagonal CKA between layers 2..L-2) and writes both heatmaps plus a JSON under --out.

    python bench/layer_cka.py --model gemma-3-270m --model smollm2-135m --out docs/results/layer_cka
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from rys_forge import plots
from rys_forge.models import load_model
from rys_forge.rank import load_prompts
from rys_forge.rank.activations import cache_activations
from rys_forge.rank.metrics import cka_matrix


def measure(name: str, factor: float, out: Path) -> dict:
    loaded = load_model(name)
    prompts = load_prompts(None, None, 8)  # rank's default: every family, 8 prompts each
    cache = cache_activations(loaded.model, loaded.tokenizer, [p.text for p in prompts], max_tokens=48,
                              kl_positions=0, outlier_factor=factor)
    L = cache.num_layers
    kept = cka_matrix([cache.pooled(k) for k in range(L + 1)]).numpy()
    every = cka_matrix([cache.pooled(k, with_outliers=True) for k in range(L + 1)]).numpy()
    positions: dict[int, int] = {}
    for b in cache.batches:
        for p in b.outlier.nonzero()[:, 1].tolist():
            positions[p] = positions.get(p, 0) + 1
    inner = ~np.eye(L - 3, dtype=bool)

    def offdiag(m: np.ndarray) -> tuple[float, float]:
        block = np.asarray(m)[2 : L - 1, 2 : L - 1]
        return float(block[inner].mean()), float(block.min())

    stem = name.replace("/", "_")
    plots.layer_cka_heatmap(np.asarray(every), out / f"{stem}_layer_cka_all_tokens.png", f"{stem}: CKA(x_a, x_b), all tokens")
    plots.layer_cka_heatmap(np.asarray(kept), out / f"{stem}_layer_cka_outliers_excluded.png",
                            f"{stem}: CKA(x_a, x_b), {cache.outliers} outlier tokens excluded")
    return {
        "model": name, "layers": L, "tokens": cache.tokens + cache.outliers, "outlier_tokens": cache.outliers,
        "outlier_positions": dict(sorted(positions.items())), "outlier_factor": factor,
        "all_tokens": dict(zip(("mean_offdiag", "min_offdiag"), offdiag(every))),
        "outliers_excluded": dict(zip(("mean_offdiag", "min_offdiag"), offdiag(kept))),
        "layer_cka_all_tokens": np.asarray(every).tolist(), "layer_cka_outliers_excluded": np.asarray(kept).tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="built-in name, folder or .gguf (repeatable)")
    parser.add_argument("--outlier-factor", type=float, default=5.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    results = [measure(name, args.outlier_factor, args.out) for name in args.model]
    (args.out / "layer_cka.json").write_text(json.dumps(results, indent=1))
    print(f"{'model':22s} {'tokens':>6s} {'outliers':>8s} {'at positions':24s} {'all: mean/min':>14s} {'excluded: mean/min':>19s}")
    for r in results:
        where = ", ".join(f"{p}:{n}" for p, n in list(r["outlier_positions"].items())[:4])
        print(f"{r['model']:22s} {r['tokens']:6d} {r['outlier_tokens']:8d} {where:24s} "
              f"{r['all_tokens']['mean_offdiag']:6.3f}/{r['all_tokens']['min_offdiag']:.3f} "
              f"{r['outliers_excluded']['mean_offdiag']:11.3f}/{r['outliers_excluded']['min_offdiag']:.3f}")


if __name__ == "__main__":
    main()
