"""Learn a window score across models: a thin wrapper of ``rys-forge learn-score``, plus a synthetic smoke test.

The arguments are those of ``rys-forge learn-score`` (see ``rys-forge learn-score -h``): for each
``--run MODEL RANK_DIR SWEEP`` (a finished ``rank`` run folder, and a ``sweep`` run folder or its flat CSV table
such as ``docs/results/sweep_gemma-3-270m_h100.csv`` with ``..._summary.json`` beside it) the windows are joined;
per model a ridge score is fitted on the other models (out-of-model) and on all of them (in-sample), and both
are compared with the hand-set prior. The model and the verdict's rule: :mod:`rys_forge.research.surrogate`.

Usage (CPU, seconds; no model is loaded):

    PYTHONPATH=. python bench/learn_score.py \\
        --run gemma-3-270m runs/rank-gemma docs/results/sweep_gemma-3-270m_h100.csv \\
        --run smollm2-135m runs/rank-smollm2 docs/results/sweep_smollm2-135m_h100.csv \\
        --run qwen2.5-coder-1.5b runs/rank-qwen runs/sweep-qwen \\
        --out bench/results/learned_score.json --report bench/results/learn_score.json

``--synthetic`` adds three made-up models (rank and sweep folders written to a temporary folder) and, without
``--out``, writes the score there too: a smoke test of the whole command.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from rys_forge.cli import main as cli_main


def synthetic_models(seed: int = 0) -> list[tuple[str, list[dict], list[dict]]]:
    """Three made-up models ``(name, rank rows, sweep rows)`` whose combined z follows ``delta_0 - d_kl`` (plus
    noise), at other probe scales; the prior ``score`` is unrelated noise."""
    rng = np.random.default_rng(seed)
    models = []
    for name, layers, scale in (("synthetic-a", 12, 1.0), ("synthetic-b", 16, 40.0), ("synthetic-c", 14, 0.02)):
        rows, sweep = [], []
        for i in range(layers):
            for j in range(i + 2, layers + 1):
                probes = {p: float(rng.normal()) for p in ("cka_plateau", "delta_0", "r_0", "d_dec", "d_kl")}
                z = probes["delta_0"] - probes["d_kl"] + float(rng.normal(0, 0.7))
                window = {"window": f"{i}:{j}", "i": i, "j": j, "width": j - i}
                rows.append({**window, "score": float(rng.uniform()), **{k: v * scale for k, v in probes.items()}})
                sweep.append({**window, "repeats": 2, "combined_z": z, "tasks": {}})
        models.append((name, rows, sweep))
    return models


def write_synthetic(folder: Path, seed: int = 0) -> list[str]:
    """Rank and sweep run folders of :func:`synthetic_models` under ``folder``; the ``--run`` arguments for them."""
    args = []
    for name, rows, sweep in synthetic_models(seed):
        rank_dir, sweep_dir = folder / f"rank-{name}", folder / f"sweep-{name}"
        rank_dir.mkdir(parents=True)
        sweep_dir.mkdir(parents=True)
        (rank_dir / "windows.json").write_text(json.dumps(rows))
        (rank_dir / "summary.json").write_text(json.dumps({"model": {"source": name}}))
        (sweep_dir / "sweep.json").write_text(json.dumps({"rows": sweep}))
        (sweep_dir / "summary.json").write_text(json.dumps({"tasks": [], "model": {"source": name}}))
        args += ["--run", name, str(rank_dir), str(sweep_dir)]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run ``rys-forge learn-score`` with ``argv`` (``--synthetic``: on made-up models); its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        if "--synthetic" in args:
            args.remove("--synthetic")
            args = [*write_synthetic(Path(tmp)), *args]
            if "--out" not in args and "-o" not in args:
                args += ["--out", str(Path(tmp) / "learned_score.json")]
        try:
            cli_main(["learn-score", *args], prog_name="rys-forge")
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
