"""How a model card writes numbers and tables, and the parameter counts it states: one place for both.

Every formatter takes any value and writes `-` for a missing or non-finite number, so a report with holes
still renders.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rys_forge.artifacts import safetensors_header
from rys_forge.plan import LayerPlan

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def finite(value: Any) -> float | None:
    """A finite float, or None (missing, a bool, not a number, NaN or infinite)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def compact(value: Any, digits: int = 4) -> str:
    """Compact float (`.4g`); `-` for missing or non-finite."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    number = finite(value)
    return "-" if number is None else f"{number:.{digits}g}"


def fixed(value: Any) -> str:
    """Scores and standard errors: 4 decimals, scientific outside [1e-3, 1e4)."""
    number = finite(value)
    if number is None:
        return "-"
    if number != 0 and not 1e-3 <= abs(number) < 1e4:
        return f"{number:.3e}"
    return f"{number:.4f}"


def signed(value: Any) -> str:
    """`fixed` with an explicit `+` for a positive number (deltas)."""
    number = finite(value)
    return "-" if number is None else ("+" if number > 0 else "") + fixed(number)


def p_value(value: Any) -> str:
    """p-values: 3 decimals, scientific below 1e-3."""
    number = finite(value)
    if number is None:
        return "-"
    return f"{number:.2e}" if number < 1e-3 else f"{number:.3f}"


def ratio(value: Any) -> str:
    """`1.234x`."""
    number = finite(value)
    return "-" if number is None else f"{number:.3f}x"


def human(count: int) -> str:
    """`135.0M`: a count with a K/M/B suffix."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def byte_size(count: Any) -> str:
    """`1.23 GB`: decimal units."""
    number = finite(count)
    if number is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if number >= size:
            return f"{number / size:.2f} {unit}"
    return f"{int(number)} B"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (`|` in a cell escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


# --------------------------------------------------------------------------- parameters


@dataclass
class ParameterCount:
    """Parameters of an export from its safetensors headers.

    Attributes:
        unique: parameters of the base model (each stored tensor once; tied embeddings once).
        effective: parameters executed per token, counting each visit of a layer (the size of the equivalent
            model with duplicated layers).
        base_layers: parameters of the base's decoder layers (all of them, once).
        visit_layers: parameters of the decoder layers summed over the plan's visits.
    """

    unique: int
    effective: int
    base_layers: int
    visit_layers: int

    @property
    def extra_layer_fraction(self) -> float:
        """Extra decoder-layer FLOPs (and KV cache) per token relative to the base."""
        return self.visit_layers / self.base_layers - 1 if self.base_layers else float("nan")


def count_parameters(folder: str | Path, plan: LayerPlan, *, per_visit: bool | None = None) -> ParameterCount | None:
    """Unique and effective parameter counts of an export from its safetensors headers (no model load).

    Layer tensors are found by name (`...layers.<n>....`). A layer-list export stores base layers (indices
    `0..L-1`); a mergekit export stores one copy per visit (indices `0..len(order)-1`), mapped back to base
    layers through the plan. `per_visit` says which (default: guessed from the largest layer index).
    Returns None when the folder has no safetensors files.
    """
    shapes = {name: list(meta["shape"]) for name, meta in safetensors_header(folder).items()}
    if not shapes:
        return None
    per_index: dict[int, int] = {}
    other = 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        match = _LAYER_RE.search(name)
        if match:
            per_index[int(match.group(1))] = per_index.get(int(match.group(1)), 0) + numel
        else:
            other += numel
    visits = len(plan.order)
    if per_visit is None:
        per_visit = bool(per_index) and max(per_index) + 1 == visits and visits != plan.num_layers
    if per_visit:
        # One stored copy per visit (mergekit passthrough): base layer k is the first visit of k.
        per_base = {}
        for v, k in enumerate(plan.order):
            per_base.setdefault(k, per_index.get(v, 0))
        visit_layers = sum(per_index.values())
    else:
        per_base = per_index
        visit_layers = sum(per_base.get(k, 0) for k in plan.order)
    base_layers = sum(per_base.values())
    return ParameterCount(other + base_layers, other + visit_layers, base_layers, visit_layers)
