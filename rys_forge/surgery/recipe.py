"""The mergekit passthrough recipe of a LayerPlan: its text, its file name, and where copies of it may go.

The plan's explicit order becomes mergekit `slices` (maximal runs of consecutive base layers; mergekit's
`layer_range: [a, b]` is half-open like rys-forge's `i:j`). A damped plan also splits the runs where the
residual scale changes, and a scaled slice of a pre-norm architecture carries mergekit's per-tensor
`parameters: scale` on its output projections (`ArchSpec.branch_weights`), which multiplies the branch
updates exactly. Post-norm architectures whose norms apply `1 + w` (gemma2/3) cannot be expressed that way
(`a * (1 + w) - 1` is no multiple of `w`): their recipe says so, and `export_mergekit` sets those norm weights
after the merge. `recipe_yaml` gives the text without building anything (the repository's `recipes/` is
regenerated from it by `python bench/reference_recipes.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from rys_forge.architectures import ArchSpec
from rys_forge.errors import UsageError, WindowError
from rys_forge.files import write_atomic
from rys_forge.plan import LayerPlan

WINDOW_CONVENTION_LINE = "i:j = layers i..j-1, 0-based, half-open"
#: The first line of every recipe rys-forge writes: how a recipe copy it may replace is recognised.
RECIPE_HEADER = "# rys-forge mergekit passthrough recipe"


def plan_to_slices(order: Sequence[int], scales: Sequence[float] | None = None) -> list[tuple[int, int]]:
    """Maximal runs of consecutive increasing base indices, as half-open `(a, b)` layer ranges; with per-visit
    `scales`, a run also ends where the scale changes (one scale per slice).

    RYS `i:j` on `L` layers (`[0..j-1] + [i..L-1]`) gives `[(0, j), (i, L)]`; damped, `[(0, j), (i, j), (j, L)]`.
    """
    if not order:
        raise WindowError("a plan must visit at least one layer")
    slices: list[tuple[int, int]] = []
    start = prev = int(order[0])
    for p, k in enumerate(order[1:], 1):
        k = int(k)
        if k == prev + 1 and (scales is None or scales[p] == scales[p - 1]):
            prev = k
            continue
        slices.append((start, prev + 1))
        start = prev = k
    slices.append((start, prev + 1))
    return slices


def _yaml_str(text: str) -> str:
    """A YAML double-quoted scalar (JSON string syntax is valid YAML)."""
    return json.dumps(str(text), ensure_ascii=False)


def recipe_yaml(
    model_path: str,
    plan: LayerPlan,
    dtype: str,
    rys_version: str,
    base_label: str | None = None,
    spec: ArchSpec | None = None,
) -> str:
    """The passthrough recipe text for `plan` (deterministic; the same text goes to every copy).

    Args:
        model_path: what mergekit reads (a local folder).
        plan: the layer plan.
        dtype: mergekit dtype name (`float32`, `bfloat16`, `float16`).
        rys_version: rys-forge version recorded in the header.
        base_label: the base as the user named it (defaults to `model_path`).
        spec: the base's architecture row (needed for a damped plan: where its residual scales go).
    """
    model = _yaml_str(model_path)
    lines = [
        f"{RECIPE_HEADER} (Repeat Your Self: a window of layers runs again)",
        f"# plan: {plan.describe()}",
        f"# window convention: {WINDOW_CONVENTION_LINE}; mergekit's layer_range [a, b] is half-open too",
        f"# layer order (base layer index of each visit): [{', '.join(str(k) for k in plan.order)}]",
        f"# base model: {base_label if base_label is not None else model_path}",
        f"# rys-forge version: {rys_version}",
        "# rebuild with: rys-forge build --format mergekit (stock mergekit-yaml leaves per-layer config",
        "# fields such as layer_types at the base length; rys-forge remaps them from the plan)",
    ]
    lines += scale_comment(plan, spec)
    lines.append("slices:")
    position = 0
    for a, b in plan_to_slices(plan.order, plan.scales if plan.scaled else None):
        lines += [
            "  - sources:",
            f"      - model: {model}",
            f"        layer_range: [{a}, {b}]",
        ]
        lines += slice_scale_parameters(plan.scales[position], spec)
        position += b - a
    lines += ["merge_method: passthrough", f"dtype: {dtype}", ""]
    return "\n".join(lines)


def bakes_norms(spec: ArchSpec) -> bool:
    """Whether a scaled visit's branch weights are `offset + w` norms that mergekit's `scale` cannot express
    (gemma): `export_mergekit` then sets them after the merge."""
    return spec.norm_offset != 0.0


def slice_scale_parameters(scale: float, spec: ArchSpec | None) -> list[str]:
    """The recipe lines of a slice at residual `scale`: mergekit's `parameters: scale` on the branch weights
    (none at scale 1, and none where `bakes_norms`)."""
    if scale == 1.0 or spec is None or bakes_norms(spec):
        return []
    lines = ["        parameters:", "          scale:"]
    for module in spec.branch_weights:  # `filter` matches a substring of the tensor name: weight and bias
        lines += [f"            - filter: {_yaml_str(module + '.')}", f"              value: {scale!r}"]
    return lines


def scale_comment(plan: LayerPlan, spec: ArchSpec | None) -> list[str]:
    """Header lines stating a damped plan's residual scales and how the recipe applies them (none when plain).

    Raises:
        UsageError: a damped plan without the architecture's table row.
    """
    if not plan.scaled:
        return []
    if spec is None:
        raise UsageError("a recipe of a damped plan needs the architecture (spec) to place its residual scales")
    lines = [f"# residual scales (per visit): [{', '.join(f'{a:g}' for a in plan.scales)}]"]
    if bakes_norms(spec):
        return lines + [
            f"# the scaled visits' post-norms ({', '.join(spec.branch_weights)}) apply {spec.norm_offset:g} + w, which",
            "# mergekit's scale cannot express: rys-forge sets them to a * (1 + w) - 1 after the merge (stock",
            "# mergekit-yaml builds this recipe unscaled)",
        ]
    return lines + [f"# scaled slices multiply {', '.join(spec.branch_weights)} (weight and bias) by their scale"]


def default_recipe_name(base: str | Path, plan: LayerPlan) -> str:
    """`<base name>-rys-<i>-<j>[_<i>-<j>...][-x<n>][-a<alpha>]` (`-s<K>` for K damped sub-steps), or
    `<base name>-rys-order-<hash>` for explicit orders."""
    name = Path(str(base).rstrip("/")).name or "model"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
    if plan.windows:
        tag = "_".join(f"{w.start}-{w.end}" for w in plan.windows)
        if plan.substeps:
            tag += f"-s{plan.substeps}"
        else:
            tag += f"-x{plan.repeats}" if plan.repeats != 2 else ""
            tag += f"-a{plan.alpha:g}" if plan.alpha != 1.0 else ""
    else:
        key = list(plan.order) if not plan.scaled else [list(plan.order), list(plan.scales)]
        tag = "order-" + hashlib.sha256(json.dumps(key).encode()).hexdigest()[:8]
    return f"{name}-rys-{tag}"


def check_recipe_copy(path: Path) -> None:
    """A recipe copy (`--recipes-dir`) may replace only a recipe rys-forge wrote: a regular file starting with
    `RECIPE_HEADER`; a folder of that name, or its parent being a file, is refused too.

    Raises:
        UsageError: naming the file that is someone else's.
    """
    parent = next((p for p in path.parents if os.path.lexists(p)), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"--recipes-dir: {parent} is a file, not a folder; choose another --recipes-dir")
    if not os.path.lexists(path):
        return
    try:
        ours = path.is_file() and not path.is_symlink() and path.read_text(encoding="utf-8").startswith(RECIPE_HEADER)
    except (OSError, UnicodeDecodeError):
        ours = False
    if not ours:
        raise UsageError(f"not overwriting {path}: rys-forge did not write it; move it away or choose another"
                         " --recipes-dir")


def save_recipe_copy(path: Path, text: str) -> Path:
    """Write a recipe copy (after `check_recipe_copy`, creating its folder) and return its path."""
    check_recipe_copy(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)
    except OSError as exc:
        raise UsageError(f"cannot write the recipe copy {path}: {exc}") from None
    return path


