"""GGUF export of a LayerPlan: a new GGUF whose blocks follow the plan's visit order, for llama.cpp and friends.

From a GGUF base, every tensor is copied byte for byte in its original quantisation (no re-quantisation):
`blk.{order[n]}.*` becomes `blk.{n}.*`, all other tensors stay as they are. The metadata is the base's, with
`{arch}.block_count` and every per-layer array (a `{arch}.*` array of length block_count) remapped through the
plan; for architectures whose sliding-window layers llama.cpp derives from the layer index (gemma2/3: a period),
the pattern is written out as an explicit per-layer array, remapped too. `general.name` gets `-RYS-<windows>`,
and the `rys.*` keys record the plan (`rys.plan`, the `LayerPlan.to_dict` JSON, is the source of truth), the
base file's sha256 and the rys-forge version. GGUF has no per-visit residual scale, so damped plans are refused.
Reading and checking such files: `rys_forge.gguf_file`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rys_forge.errors import OutputError, UnsupportedArchitectureError, UsageError, output_problem
from rys_forge.files import sha256_file
from rys_forge.gguf_file import (BLOCK_RE, GGUF_SWA_PERIODS, extra_block_bytes, gguf_blocks, gguf_field, open_gguf,
                                 rys_keys, swa_pattern)
from rys_forge.plan import LayerPlan


@dataclass(frozen=True)
class GgufExport:
    """A written RYS GGUF.

    Attributes:
        path: the file.
        sha256: hex digest of the file (for publish's tamper check).
        base_sha256: hex digest of the base GGUF.
        size: bytes of the file.
        base_size: bytes of the base GGUF.
        extra_tensor_bytes: bytes of the repeated blocks' tensors (`expected_extra_bytes`).
    """

    path: Path
    sha256: str
    base_sha256: str
    size: int
    base_size: int
    extra_tensor_bytes: int

    @property
    def overhead(self) -> int:
        """Bytes beyond base + repeated tensors: metadata (rys keys, names, arrays) and alignment padding."""
        return self.size - self.base_size - self.extra_tensor_bytes


def plan_label(plan: LayerPlan) -> str:
    """`4:8` / `4:8,12:14x3` for a window plan, `order` for an explicit one (the `general.name` suffix)."""
    label = ",".join(str(w) for w in plan.windows) or "order"
    return label + (f"x{plan.repeats}" if plan.windows and plan.repeats != 2 else "")


def gguf_file_name(base_name: str, plan: LayerPlan) -> str:
    """The export's file name: the base's name (a GGUF's stem, a folder's or hub repo's name) and the plan, e.g.
    `gemma-3-270m-q4_k_m-rys-4-8.gguf`."""
    label = plan_label(plan).replace(":", "-").replace(",", "_")
    return f"{base_name}-rys-{label}.gguf"


def _metadata(reader: Any, arch: str, block_count: int, plan: LayerPlan, base_gguf: Path,
              base_sha: str) -> tuple[dict[str, tuple[Any, Any, Any]], dict[str, tuple[Any, Any, Any]]]:
    """The base's keys that change (`key -> (value, type, sub_type)`: block count, per-layer arrays and the
    sliding-window pattern remapped through the plan, `general.name`) and the new `rys.*` keys."""
    from gguf import GGUFValueType

    order = list(plan.order)
    new_values: dict[str, tuple[Any, Any, Any]] = {f"{arch}.block_count": (len(order), GGUFValueType.UINT32, None)}
    pattern = swa_pattern(reader, arch, block_count)
    if pattern is not None:
        new_values[f"{arch}.attention.sliding_window_pattern"] = (
            [pattern[k] for k in order], GGUFValueType.ARRAY, GGUFValueType.BOOL)
    for field in reader.fields.values():
        types = field.types
        if field.name.startswith(f"{arch}.") and types and types[0] == GGUFValueType.ARRAY \
                and len(field.data) == block_count and field.name not in new_values:
            values = field.contents()
            new_values[field.name] = ([values[k] for k in order], GGUFValueType.ARRAY, types[-1])
    base_name = gguf_field(reader, "general.name") or base_gguf.stem
    new_values["general.name"] = (f"{base_name}-RYS-{plan_label(plan)}", GGUFValueType.STRING, None)
    rys_values = rys_keys(plan, str(base_name), base_sha256=base_sha)
    return new_values, rys_values


def _tensors_in_plan_order(reader: Any, blocks: dict[int, list[Any]], order: list[int]) -> list[tuple[str, Any]]:
    """`(new name, base tensor)` of every tensor: the blocks in plan order, renamed `blk.{n}.*`, where the base's
    first block tensor stood; the rest in place."""
    tensors: list[tuple[str, Any]] = []
    placed = False
    for tensor in reader.tensors:
        if not BLOCK_RE.match(tensor.name):
            tensors.append((tensor.name, tensor))
        elif not placed:
            placed = True
            for n, k in enumerate(order):
                tensors.extend((f"blk.{n}.{BLOCK_RE.match(t.name).group(2)}", t) for t in blocks[k])
    return tensors


def export_gguf(base_gguf: Path, plan: LayerPlan, out_file: Path) -> GgufExport:
    """Write the RYS GGUF of `plan` over `base_gguf` to `out_file` (via a temporary sibling, renamed into place).

    Args:
        base_gguf: the base GGUF file (`base_gguf_path` resolves built-in names).
        plan: the plan; its `num_layers` must be the file's block count and every scale 1.
        out_file: the file to write (replaced if it exists).

    Returns:
        The written file's path, sha256 and sizes.

    Raises:
        UsageError: a damped plan, a plan for another layer count, or a base this export cannot copy.
        UnsupportedArchitectureError: the GGUF architecture is not in `GGUF_SWA_PERIODS`.
        OutputError: `out_file` cannot be written.
    """
    from gguf import GGUFValueType, GGUFWriter

    base_gguf, out_file = Path(base_gguf), Path(out_file)
    if plan.scaled:
        raise UsageError(
            "GGUF has no per-visit residual scale, so a damped plan (scales != 1) cannot be exported to GGUF;"
            " use --format layerlist, or a plan with alpha 1"
        )
    problem = output_problem(out_file)
    if problem:
        raise OutputError(problem)
    if out_file.exists() and out_file.resolve() == base_gguf.resolve():
        raise OutputError(f"{out_file} is the base GGUF itself; write the export to another file")
    reader = open_gguf(base_gguf)
    arch = str(gguf_field(reader, "general.architecture"))
    if arch not in GGUF_SWA_PERIODS:
        raise UnsupportedArchitectureError(
            f"GGUF architecture '{arch}' is not supported by the GGUF export; supported: {', '.join(GGUF_SWA_PERIODS)}"
        )
    block_count = int(gguf_field(reader, f"{arch}.block_count"))
    if plan.num_layers != block_count:
        raise UsageError(f"plan is for {plan.num_layers} layers but {base_gguf.name} has {block_count} blocks")
    blocks = gguf_blocks(reader, block_count)
    order = list(plan.order)
    base_sha = sha256_file(base_gguf)
    new_values, rys_values = _metadata(reader, arch, block_count, plan, base_gguf, base_sha)
    tensors = _tensors_in_plan_order(reader, blocks, order)

    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(tmp, arch, endianess=reader.endianess)
    writer.data_alignment = int(reader.alignment)  # `general.alignment`, if set, is copied with the fields
    try:
        for field in reader.fields.values():
            # The writer adds general.architecture itself; GGUF.* are the reader's virtual header fields; a RYS
            # base's own rys.* keys give way to this plan's (its `general.name` keeps the earlier suffix).
            if field.name == "general.architecture" or field.name.startswith(("GGUF.", "rys.")):
                continue
            if field.name in new_values:
                writer.add_key_value(field.name, *new_values.pop(field.name))
                continue
            types = field.types
            sub = types[-1] if types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), types[0], sub_type=sub)
        for key, value in {**new_values, **rys_values}.items():
            writer.add_key_value(key, *value)
        for name, tensor in tensors:
            # raw_dtype keeps the quantisation type; uint8 byte shapes are turned back into element shapes.
            writer.add_tensor_info(name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, tensor in tensors:
            writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
        writer.close()
        os.replace(tmp, out_file)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return GgufExport(out_file, sha256_file(out_file), base_sha, out_file.stat().st_size,
                      base_gguf.stat().st_size, extra_block_bytes(blocks, plan.order))
