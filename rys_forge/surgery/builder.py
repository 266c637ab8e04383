"""`build`: a LayerPlan -> a real checkpoint (layer-list or mergekit), verified before it lands.

The export is written into a temporary sibling of `out`, verified there, and renamed into place only
when verification passes; a failed build leaves no folder at `out` (its report is kept beside it as
`<out>.verification-failed.json`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rys_forge.artifacts import VERIFICATION_FILE, RysRecord, rys_forge_version, timestamp, update_rys, weight_bytes
from rys_forge.errors import RysForgeError, UsageError
from rys_forge.models import LoadedModel, load_model, offloaded
from rys_forge.plan import LayerPlan
from rys_forge.surgery.layerlist import export_layerlist
from rys_forge.surgery.mergekit_export import default_recipe_name, export_mergekit
from rys_forge.verify import OFFLOAD_LAYERLIST
from rys_forge.verify import verify as run_verify

FORMATS = ("layerlist", "mergekit")


@dataclass
class BuildResult:
    """Where the export went, its plan and format, its verification, and timings."""

    path: Path
    plan: LayerPlan
    format: str
    verification: dict[str, Any] | None
    seconds: dict[str, float]


def _record(loaded: LoadedModel, fmt: str) -> RysRecord:
    """The export's `rys` record: what the base was and who built it (the exporter adds the plan)."""
    return RysRecord(
        format=fmt,
        rys_forge_version=rys_forge_version(),
        base_model=loaded.source,
        base_info={k: v for k, v in loaded.info.items() if k not in ("source", "adapter")},
        created=timestamp(),
        # merged into the base before the plan; verify re-applies it
        adapter=loaded.info.get("adapter") or None,
    )


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
        recipes_dir: a folder where a copy of the mergekit recipe is kept as well (`<name>.yml`); without it the
            recipe is only `out/rys_recipe.yml` and nothing is written outside `out`.
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
        raise UsageError(OFFLOAD_LAYERLIST)
    num_layers = loaded.model.config.get_text_config(decoder=True).num_hidden_layers
    plan = windows if isinstance(windows, LayerPlan) else LayerPlan.from_windows(windows, num_layers, repeats)
    if plan.num_layers != num_layers:
        raise UsageError(f"plan is for {plan.num_layers} layers but {loaded.source} has {num_layers}")
    base_bytes = weight_bytes(loaded.path) or sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    _check_disk(out, base_bytes * (len(plan.order) / plan.num_layers if format == "mergekit" else 1))
    timings["load_s"] = time.perf_counter() - t0
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    target = staging / "export"
    try:
        t0 = time.perf_counter()
        _export(loaded, plan, format, target, recipes_dir)
        timings["export_s"] = time.perf_counter() - t0
        report = None
        if verify:
            t0 = time.perf_counter()
            try:
                report = run_verify(target, loaded, dtype=dtype, device=device, placement=placement).to_dict()
            except RysForgeError:
                failed = target / VERIFICATION_FILE
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


def _export(loaded: LoadedModel, plan: LayerPlan, fmt: str, target: Path, recipes_dir: str | Path | None) -> None:
    """Write the export of `plan` into `target` (a new folder inside the build's staging folder)."""
    record = _record(loaded, fmt)
    if fmt == "layerlist":
        target.mkdir()
        export_layerlist(loaded.model, loaded.tokenizer, plan, target, record)
        return
    source_path = loaded.path
    if record.adapter:  # mergekit reads weights from disk: give it the merged base
        source_path = str(target.parent / "merged-base")
        loaded.model.save_pretrained(source_path)
        loaded.tokenizer.save_pretrained(source_path)
    export_mergekit(
        source_path, plan, target, recipe_name=default_recipe_name(loaded.source, plan),
        recipes_dir=Path(recipes_dir) if recipes_dir else None,
        base_label=loaded.source + (f" + adapter {record.adapter['path']} (merged into a temporary copy)"
                                    if record.adapter else ""),
    )
    # The mergekit exporter records the plan, format and recipe; the base and the build's provenance come from here.
    update_rys(target, **{k: v for k, v in asdict(record).items() if k not in ("format", "extra") and v is not None})
