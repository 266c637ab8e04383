"""Command-line options the benches share (`race_bench.py`, `sweep_bench.py`): the model and the lm-eval tasks."""

from __future__ import annotations

import argparse


def add_model_options(parser: argparse.ArgumentParser, model: str) -> None:
    """``--model`` (default ``model``), ``--device``, ``--dtype``, ``--attn``, ``--tasks`` and ``--limit``."""
    parser.add_argument("--model", default=model)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--tasks", default="rys_arc_easy,rys_piqa")
    parser.add_argument("--limit", type=int, default=200)
