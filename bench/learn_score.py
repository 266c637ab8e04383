"""Learn a window score from every probe column across models and judge it leave-one-model-out.

For each ``--run MODEL RANK_DIR SWEEP`` (a finished ``rank`` run folder, and a ``sweep`` run folder or its flat
CSV table such as ``docs/results/sweep_gemma-3-270m_h100.csv`` with ``..._summary.json`` beside it), the
windows are joined; for each model a ridge score is fitted on the other models (out-of-model) and on all of
them (in-sample), and both are compared with the hand-set prior (the rank rows' ``score``): Spearman,
evaluations in score order to 90% of the best outcome, benchmark-positive windows in the top decile.
See :mod:`rys_forge.research.surrogate` for the model and the rule of the verdict.

Usage (CPU, seconds; no model is loaded):

    PYTHONPATH=. python bench/learn_score.py \\
        --run gemma-3-270m runs/rank-gemma docs/results/sweep_gemma-3-270m_h100.csv \\
        --run smollm2-135m runs/rank-smollm2 docs/results/sweep_smollm2-135m_h100.csv \\
        --run qwen2.5-coder-1.5b runs/rank-qwen runs/sweep-qwen \\
        --out bench/results/learn_score.json --surrogate-out bench/results/learned_score.json

``--synthetic`` runs it on three made-up models instead (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from rys_forge.errors import RysForgeError
from rys_forge.files import write_atomic
from rys_forge.research.surrogate import TRANSFORMS, ModelRun, learn_score, leave_one_model_out


def synthetic_runs(seed: int = 0) -> list[ModelRun]:
    """Three made-up models whose combined z follows ``delta_0 - d_kl`` (plus noise), at other probe scales;
    the prior ``score`` is unrelated noise."""
    rng = np.random.default_rng(seed)
    runs = []
    for name, layers, scale in (("synthetic-a", 12, 1.0), ("synthetic-b", 16, 40.0), ("synthetic-c", 14, 0.02)):
        rows, outcome = [], {}
        for i in range(layers):
            for j in range(i + 2, layers + 1):
                probes = {p: float(rng.normal()) for p in ("cka_plateau", "delta_0", "r_0", "d_dec", "d_kl")}
                z = probes["delta_0"] - probes["d_kl"] + float(rng.normal(0, 0.7))
                rows.append({"window": f"{i}:{j}", "i": i, "j": j, "width": j - i, "score": float(rng.uniform()),
                             **{k: v * scale for k, v in probes.items()}})
                outcome[f"{i}:{j}"] = (z, z > 1.96)
        runs.append(ModelRun(rows=rows, outcomes={"combined_z": outcome}, model=name))
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", nargs=3, action="append", default=[], metavar=("MODEL", "RANK_DIR", "SWEEP"),
                        help="a model's name, its rank run folder and its sweep folder or CSV table (repeatable)")
    parser.add_argument("--synthetic", action="store_true", help="three made-up models instead of --run")
    parser.add_argument("--target", default="combined_z", help="combined_z, delta:<task> or z:<task>")
    parser.add_argument("--repeats", type=int, default=None, help="sweep rows with this many visits (default 2)")
    parser.add_argument("--feature-transform", choices=TRANSFORMS, default="rank", help="per-model probe transform")
    parser.add_argument("--target-transform", choices=TRANSFORMS, default="rank", help="per-model target transform")
    parser.add_argument("--penalty", type=float, default=None, help="fixed ridge penalty (default: inner CV)")
    parser.add_argument("--max-missing", type=float, default=0.5, help="largest NaN share of a used column")
    parser.add_argument("--top-fraction", type=float, default=0.1, help="top set of the enrichment figures")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inner folds (and of --synthetic)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report")
    parser.add_argument("--surrogate-out", type=Path, default=None, help="JSON of the score fitted on every model")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = dict(target=args.target, top_fraction=args.top_fraction, penalty=args.penalty, seed=args.seed,
                   feature_transform=args.feature_transform, target_transform=args.target_transform,
                   max_missing=args.max_missing)
    try:
        if args.synthetic:
            report = leave_one_model_out(synthetic_runs(args.seed), **options)
            for path, text in ((args.surrogate_out, report.surrogate.to_json()),
                               (args.out, json.dumps(report.to_dict(), indent=2) + "\n")):
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_atomic(path, text)
                    report.saved_to.append(str(path))
        else:
            report = learn_score(args.run, out=args.surrogate_out, report_out=args.out, repeats=args.repeats, **options)
    except RysForgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.format_text())
    weights = list(report.surrogate.weights().items())[:8]
    print("weights of the fit on every model (per sd): " + ", ".join(f"{k} {v:+.3f}" for k, v in weights))
    print("\n".join(f"wrote {path}" for path in report.saved_to))
    if args.surrogate_out is not None and not report.ship:
        print("note: the verdict says do not ship; the surrogate file is for inspection, not a default")
    return 0


if __name__ == "__main__":
    sys.exit(main())
