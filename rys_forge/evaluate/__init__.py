"""evaluate: lm-eval on the base and the RYS model, with paired significance tests."""

from rys_forge.evaluate.harness import evaluate, format_table

__all__ = ["evaluate", "format_table"]
