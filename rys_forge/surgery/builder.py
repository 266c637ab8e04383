"""`build`: a LayerPlan -> a real checkpoint (layer-list or mergekit), verified before it lands.

The export is written into a hidden staging sibling of `out`, verified there, and renamed into place only
when verification passes; a failed or interrupted build (Ctrl-C, SIGTERM) leaves no folder at `out` and no
staging folder (a failed verification's report is kept beside it as `<out>.verification-failed.json`, unless a
file of that name is someone else's).

What `--out` may be is checked before anything is loaded (`artifacts.check_replaceable`): a new folder, or with
`force` an empty one or an export rys-forge wrote, never the base model, the adapter or the current directory
(nor a folder holding them), never a file. A `recipes_dir` copy of a mergekit recipe is written only after the
build succeeded, and replaces only a recipe rys-forge wrote.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rys_forge.artifacts import (
    RECIPE_FILE,
    VERIFICATION_FILE,
    RysRecord,
    check_replaceable,
    read_report,
    write_gguf_record,
    rys_forge_version,
    timestamp,
    update_rys,
    weight_bytes,
)
from rys_forge.errors import OutputError, RysForgeError, UsageError, VerificationError, os_error_message, output_problem
from rys_forge.files import staging_dir, swapped_in, write_atomic
from rys_forge.models import LoadedModel, canonical_source, load_model, offloaded
from rys_forge.plan import LayerPlan, Window, resolve_damping
from rys_forge.gguf_file import gguf_base_or_none
from rys_forge.surgery.gguf_export import export_gguf, gguf_file_name
from rys_forge.surgery.gguf_from_hf import export_gguf_from_hf
from rys_forge.surgery.layerlist import export_layerlist
from rys_forge.surgery.mergekit_export import check_recipe_copy, default_recipe_name, export_mergekit, save_recipe_copy
from rys_forge.verify import OFFLOAD_LAYERLIST
from rys_forge.verify import verify as run_verify

FORMATS = ("layerlist", "mergekit", "gguf")


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


def _check_gguf_build(model: str | LoadedModel, windows: list[str] | LayerPlan, scale: float, adapter: str | None,
                      dtype: str, placement: dict[str, Any] | None) -> Path | None:
    """What `--format gguf` needs, checked before anything loads; returns the base GGUF file (None: a transformers
    base, written in float32 by `gguf_from_hf`).

    Raises:
        UsageError: a damped plan, an adapter on a GGUF base, a dtype other than float32, a device map.
    """
    base = gguf_base_or_none(model.source if isinstance(model, LoadedModel) else model)
    scaled = windows.scaled if isinstance(windows, LayerPlan) else scale != 1.0
    if scaled:
        raise UsageError("GGUF has no per-visit residual scale: --alpha/--substeps need --format layerlist or mergekit")
    if base is not None and (adapter or (isinstance(model, LoadedModel) and model.info.get("adapter"))):
        raise UsageError("--format gguf copies the base's quantised blocks byte for byte; an adapter cannot be merged"
                         " into them (use --format layerlist or mergekit)")
    if dtype != "float32" or placement:
        raise UsageError("--format gguf is verified in float32 on one device (transformers dequantises the file);"
                         " drop --dtype/--device-map")
    return base


def _export_bytes(loaded: LoadedModel, plan: LayerPlan, fmt: str, base_gguf: Path | None) -> int:
    """About how many bytes the export writes: the base's weights (a GGUF: its file) once for a layer list, once
    per visit for the formats that store every visit."""
    base = (base_gguf.stat().st_size if base_gguf is not None else weight_bytes(loaded.path)) \
        or sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    return int(base * (len(plan.order) / plan.num_layers if fmt in ("mergekit", "gguf") else 1))


def _existing_ancestor(path: Path) -> Path:
    """`path` or its nearest parent that exists."""
    return next(p for p in (path, *path.parents) if os.path.lexists(p))


def _check_out_parent(out: Path) -> None:
    """The folder `out` goes into can be made and written to (`errors.output_problem`, before any work)."""
    problem = output_problem(out.parent, folder=True)
    if problem is not None:
        raise OutputError(f"cannot write --out {out}: {problem}")


def _check_disk(out: Path, needed: int) -> None:
    where = _existing_ancestor(out.parent)
    free = shutil.disk_usage(where).free
    if needed and free < needed * 1.1:
        raise RysForgeError(f"not enough disk space in {where}: need ~{needed / 1e9:.2f} GB, {free / 1e9:.2f} GB free")


def _protected(model: str | LoadedModel, adapter: str | None) -> dict[str, Path]:
    """Folders `--out` must neither be nor contain: the current directory, the base model and the adapter."""
    found: dict[str, Path] = {}
    with contextlib.suppress(OSError):
        found["the current directory"] = Path.cwd().resolve()
    base = model.path if isinstance(model, LoadedModel) else model
    for label, spec in (("the base model", base), ("the adapter", adapter)):
        if isinstance(spec, (str, Path)) and spec and Path(spec).expanduser().exists():
            found[label] = Path(spec).expanduser().resolve()
    return found


def _recipe_copy(recipes_dir: str | Path | None, model: str | LoadedModel, windows: list[str] | LayerPlan,
                 repeats: int, alpha: float) -> Path | None:
    """Where the mergekit recipe's copy goes (`recipes_dir/<name>.yml`), checked before any work: it may replace
    only a recipe rys-forge wrote. The name needs the plan's windows only, not the model's depth."""
    if recipes_dir is None:
        return None
    source = model.source if isinstance(model, LoadedModel) else canonical_source(str(model))
    if not isinstance(windows, LayerPlan):
        depth = max((Window.parse(w).end for w in windows), default=1)
        windows = LayerPlan.from_windows(windows, depth, repeats, alpha)
    path = Path(recipes_dir).expanduser() / f"{default_recipe_name(source, windows)}.yml"
    check_recipe_copy(path)
    return path


def _keep_failed_report(target: Path, out: Path) -> None:
    """Keep a failed verification's report beside `out` as `<out>.verification-failed.json`, unless a file of that
    name is there that rys-forge did not write (someone's own file is never replaced)."""
    failed, keep = target / VERIFICATION_FILE, out.with_name(f"{out.name}.verification-failed.json")
    if not failed.is_file():
        return
    if os.path.lexists(keep):
        try:
            read_report(keep)
        except VerificationError:
            return
        if keep.is_symlink():
            return
    with contextlib.suppress(OSError):  # a convenience: never in the way of the verification's own error
        write_atomic(keep, failed.read_bytes())


def build(
    model: str | LoadedModel,
    windows: list[str] | LayerPlan,
    out: str | Path,
    *,
    format: str = "layerlist",
    repeats: int = 2,
    alpha: float | None = None,
    substeps: int | None = None,
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
        out: output folder; refused if it exists unless `force` (see `artifacts.check_replaceable`).
        format: `layerlist` (weights stored once, `trust_remote_code`), `mergekit` (passthrough) or `gguf` (one
            `.gguf` file plus `rys.json`: from a GGUF base its blocks copied byte for byte, from a transformers base
            of a covered architecture (`gguf_from_hf`) written in float32; float32 verification, no damped plan).
        repeats: visits of each window's block.
        alpha: residual scale of the repeated visits (the second and later passes over each window; the first
            stays 1): each scaled visit adds `alpha * attn` and `alpha * mlp` to the stream. Default 1 (plain RYS).
        substeps: replace each window's second pass by `substeps` damped sub-steps at `1/substeps` each
            (the same as `repeats=substeps + 1, alpha=1/substeps`); not with `alpha` or `repeats` other than 2.
        force: replace an existing `out` that rys-forge wrote (only after the new build verified).
        dtype, device: for loading the base and for verification.
        recipes_dir: a folder where a copy of the mergekit recipe is kept as well (`<name>.yml`, written after
            the build succeeded; an existing file there is replaced only if rys-forge wrote it); without it the
            recipe is only `out/rys_recipe.yml` and nothing is written outside `out`.
        verify: run verification (a failed verification raises and leaves `out` untouched).
        adapter: a PEFT adapter merged into the base before the plan (with a model spec; an already
            loaded model carries its own record in `info["adapter"]`). Recorded as `rys.adapter`.
        placement: `load_model` big-model keywords (`device_map`, `max_memory`, `offload_folder`) for the
            base and the verification; replaces `device`.

    Raises:
        UsageError: bad format/windows/alpha/substeps, an `out` or recipe copy that may not be written or replaced.
        VerificationError: the export does not match the in-memory repeat.
    """
    if format not in FORMATS:
        raise UsageError(f"unknown format '{format}'; choose one of {', '.join(FORMATS)}")
    if isinstance(windows, LayerPlan) and (alpha is not None or substeps is not None):
        raise UsageError("alpha and substeps go with windows; a ready LayerPlan carries its own residual scales")
    repeats, scale = resolve_damping(repeats, alpha, substeps)
    out = Path(out).expanduser().resolve()
    gguf_base = _check_gguf_build(model, windows, scale, adapter, dtype, placement) if format == "gguf" else None
    protected = _protected(model, adapter) | ({"the base GGUF": gguf_base} if gguf_base else {})
    check_replaceable(out, force, protected)  # before any work: never the base, never someone's own files
    _check_out_parent(out)
    recipe_copy = _recipe_copy(recipes_dir, model, windows, repeats, scale) if format == "mergekit" else None
    timings, t0 = {}, time.perf_counter()
    if adapter and isinstance(model, LoadedModel):  # a loaded model carries its own adapter record
        raise UsageError("pass the adapter to load_model(..., adapter=...) when giving an already loaded model")
    loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device, adapter=adapter, **(placement or {}))
    if format == "layerlist" and offloaded(loaded.model):
        raise UsageError(OFFLOAD_LAYERLIST)
    num_layers = loaded.model.config.get_text_config(decoder=True).num_hidden_layers
    plan = windows if isinstance(windows, LayerPlan) else LayerPlan.from_windows(windows, num_layers, repeats, scale)
    if plan.num_layers != num_layers:
        raise UsageError(f"plan is for {plan.num_layers} layers but {loaded.source} has {num_layers}")
    _check_disk(out, _export_bytes(loaded, plan, format, protected.get("the base GGUF")))
    timings["load_s"] = time.perf_counter() - t0
    with staging_dir(out.parent, out.name) as staging:  # removed whatever happens, SIGTERM included
        target = staging / "export"
        report = _export_and_verify(loaded, plan, format, target, out, timings,
                                    dict(dtype=dtype, device=device, placement=placement) if verify else None)
        check_replaceable(out, force, protected)  # again: the folder may have changed while building
        with swapped_in(target, out, staging / "previous"):  # the previous `out` goes with the staging folder
            pass
    if recipe_copy is not None:
        save_recipe_copy(recipe_copy, (out / RECIPE_FILE).read_text(encoding="utf-8"))
    return BuildResult(path=out, plan=plan, format=format, verification=report, seconds=timings)


def _export_and_verify(loaded: LoadedModel, plan: LayerPlan, fmt: str, target: Path, out: Path,
                       timings: dict[str, float], verify: dict[str, Any] | None) -> dict[str, Any] | None:
    """Write the export into `target` and verify it there (`verify`: the verification's keywords, None to skip);
    the report, or None. A failed verification's report is kept beside `out` (`_keep_failed_report`)."""
    t0 = time.perf_counter()
    try:
        _export(loaded, plan, fmt, target)
    except OSError as exc:  # a full disk, a quota: one line naming the file, nothing left behind
        raise RysForgeError(f"could not write the export of {out}: {os_error_message(exc)}") from None
    timings["export_s"] = time.perf_counter() - t0
    if verify is None:
        return None
    t0 = time.perf_counter()
    try:
        report = run_verify(target, loaded, **verify).to_dict()
    except RysForgeError:
        _keep_failed_report(target, out)
        raise
    timings["verify_s"] = time.perf_counter() - t0
    return report


def _export(loaded: LoadedModel, plan: LayerPlan, fmt: str, target: Path) -> None:
    """Write the export of `plan` into `target` (a new folder inside the build's staging folder)."""
    record = _record(loaded, fmt)
    if fmt == "gguf":
        target.mkdir()
        base = gguf_base_or_none(loaded.source)
        record.plan = plan.to_dict()
        if base is not None:  # the base's quantised blocks, byte for byte
            written = export_gguf(base, plan, target / gguf_file_name(base.stem, plan))
            record.extra = {"gguf_file": written.path.name, "base_gguf_sha256": written.base_sha256}
        else:  # transformers weights (any merged adapter included), float32
            path = export_gguf_from_hf(loaded.model, loaded.tokenizer, plan,
                                       target / gguf_file_name(Path(loaded.source.rstrip("/")).name, plan),
                                       outtype="f32", base_model=loaded.source)
            record.extra = {"gguf_file": path.name, "gguf_source": "transformers", "outtype": "f32"}
        record.extra["model_type"] = loaded.model.config.model_type
        write_gguf_record(target, record)
        return
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
        source_path, plan, target,
        base_label=loaded.source + (f" + adapter {record.adapter['path']} (merged into a temporary copy)"
                                    if record.adapter else ""),
    )
    # The mergekit exporter records the plan, format and recipe; the base and the build's provenance come from here.
    update_rys(target, **{k: v for k, v in asdict(record).items() if k not in ("format", "extra") and v is not None})
