"""`build`: a LayerPlan -> a real checkpoint (layer-list or mergekit), verified before it lands.

The export is written into a temporary sibling of `out`, verified there, and renamed into place only
when verification passes; a failed build leaves no folder at `out` (its report is kept beside it as
`<out>.verification-failed.json`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rys_forge.errors import RysForgeError, UsageError
from rys_forge.models import LoadedModel, load_model, offloaded
from rys_forge.plan import LayerPlan
from rys_forge.surgery.layerlist import export_layerlist

FORMATS = ("layerlist", "mergekit")


@dataclass
class BuildResult:
    """Where the export went, its plan and format, its verification, and timings."""

    path: Path
    plan: LayerPlan
    format: str
    verification: dict[str, Any] | None
    seconds: dict[str, float]


def _rys_block(loaded: LoadedModel, fmt: str) -> dict[str, Any]:
    from rys_forge import __version__

    block = {
        "format": fmt,
        "rys_forge_version": __version__,
        "base_model": loaded.source,
        "base_info": {k: v for k, v in loaded.info.items() if k not in ("source", "adapter")},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if loaded.info.get("adapter"):  # merged into the base before the plan; verify re-applies it
        block["adapter"] = loaded.info["adapter"]
    return block


def _check_disk(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out.parent).free
    if needed and free < needed * 1.1:
        raise RysForgeError(f"not enough disk space in {out.parent}: need ~{needed / 1e9:.2f} GB, {free / 1e9:.2f} GB free")


def build(
    model: str | LoadedModel,
    windows: list[str] | LayerPlan,
    out: str | Path,
    *,
    format: str = "layerlist",
    repeats: int = 2,
    force: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    recipes_dir: str | Path | None = None,
    verify: bool = True,
    adapter: str | None = None,
    placement: dict[str, Any] | None = None,
) -> BuildResult:
    """Export a RYS plan of `model` to `out` and verify it.

    Args:
        model: a model spec (built-in name, folder, .gguf, hub id) or an already loaded model.
        windows: `["i:j", ...]` or a ready `LayerPlan`.
        out: output folder; refused if it exists unless `force`.
        format: `layerlist` (weights stored once, `trust_remote_code`) or `mergekit` (passthrough).
        repeats: visits of each window's block.
        force: replace an existing `out` (only after the new build verified).
        dtype, device: for loading the base and for verification.
        recipes_dir: where the mergekit recipe YAML is kept as well (the repo's `recipes/`).
        verify: run verification (a failed verification raises and leaves `out` untouched).
        adapter: a PEFT adapter merged into the base before the plan (with a model spec; an already
            loaded model carries its own record in `info["adapter"]`). Recorded as `rys.adapter`.
        placement: `load_model` big-model keywords (`device_map`, `max_memory`, `offload_folder`) for the
            base and the verification; replaces `device`.

    Raises:
        UsageError: bad format/windows, existing `out` without `force`.
        VerificationError: the export does not match the in-memory repeat.
    """
    if format not in FORMATS:
        raise UsageError(f"unknown format '{format}'; choose one of {', '.join(FORMATS)}")
    out = Path(out).expanduser().resolve()
    if out.exists() and not force:
        raise UsageError(f"output folder {out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if adapter and isinstance(model, LoadedModel):
        raise UsageError("pass the adapter to load_model(..., adapter=...) when giving an already loaded model")
    loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device, adapter=adapter, **(placement or {}))
    if format == "layerlist" and offloaded(loaded.model):
        from rys_forge.verify import OFFLOAD_LAYERLIST

        raise UsageError(OFFLOAD_LAYERLIST)
    num_layers = loaded.model.config.get_text_config(decoder=True).num_hidden_layers
    plan = windows if isinstance(windows, LayerPlan) else LayerPlan.from_windows(windows, num_layers, repeats)
    if plan.num_layers != num_layers:
        raise UsageError(f"plan is for {plan.num_layers} layers but {loaded.source} has {num_layers}")
    from rys_forge.verify import REPORT, weight_bytes

    base_bytes = weight_bytes(loaded.path) or sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    _check_disk(out, base_bytes * (len(plan.order) / plan.num_layers if format == "mergekit" else 1))
    timings["load_s"] = time.perf_counter() - t0
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    target = staging / "export"
    try:
        t0 = time.perf_counter()
        block = _rys_block(loaded, format)
        if format == "layerlist":
            target.mkdir()
            export_layerlist(loaded.model, loaded.tokenizer, plan, target, block)
        else:
            from rys_forge.surgery.mergekit_export import default_recipe_name, export_mergekit

            source_path = loaded.path
            if block.get("adapter"):  # mergekit reads weights from disk: give it the merged base
                source_path = str(staging / "merged-base")
                loaded.model.save_pretrained(source_path)
                loaded.tokenizer.save_pretrained(source_path)
            export_mergekit(
                source_path, plan, target, recipe_name=default_recipe_name(loaded.source, plan),
                recipes_dir=Path(recipes_dir) if recipes_dir else None,
                base_label=loaded.source + (f" + adapter {block['adapter']['path']} (merged into a temporary copy)"
                                            if block.get("adapter") else ""),
            )
            config_file = target / "config.json"
            config = json.loads(config_file.read_text())
            config.setdefault("rys", {}).update({k: v for k, v in block.items() if k != "format"})
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        timings["export_s"] = time.perf_counter() - t0
        report = None
        if verify:
            from rys_forge.verify import verify as run_verify

            t0 = time.perf_counter()
            try:
                report = run_verify(target, loaded, dtype=dtype, device=device, placement=placement).to_dict()
            except RysForgeError:
                failed = target / REPORT
                if failed.exists():
                    shutil.copyfile(failed, out.with_name(f"{out.name}.verification-failed.json"))
                raise
            timings["verify_s"] = time.perf_counter() - t0
        if out.exists():
            shutil.rmtree(out)
        os.replace(target, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return BuildResult(path=out, plan=plan, format=format, verification=report, seconds=timings)
