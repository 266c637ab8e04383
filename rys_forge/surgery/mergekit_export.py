"""Export a LayerPlan as a mergekit passthrough merge: a plain duplicated-weights checkpoint.

The plan's explicit order becomes mergekit `slices` (`recipe.py`: the recipe text and name), written as a recipe
YAML and run through mergekit's Python API. What stock mergekit 0.1.5 gets wrong, and what is fixed here:

* it sets `num_hidden_layers` to the new visit count but leaves `layer_types` (gemma2, gemma3, qwen2,
  qwen3 under transformers 5) at the base length. `run_merge` then dies in `cfg_out.save_pretrained`
  (transformers validates "num_hidden_layers (9) must be equal to the number of layer_types (6)")
  *after* the weights are written, with no config.json and no tokenizer in the folder. `max_window_layers`
  is not remapped either. Here mergekit's output config is patched through the plan while `run_merge`
  runs (so it finishes and copies the tokenizer), and config.json is then rewritten from the base's own
  config.json with every per-layer field of the architecture table remapped by `remap_layer_fields`,
  plus an `rys` block recording the plan;
* tied embeddings: mergekit's architecture definitions mark `lm_head.weight` optional, so a base that
  stores no lm_head gets none; this is checked after the merge, and `tie_word_embeddings` comes from the
  base config;
* the folder is built in a temporary sibling and renamed into place only when complete;
* residual scales of a damped plan: mergekit's `parameters: scale` multiplies the output projections of the
  scaled slices; gemma's `1 + w` post-norms cannot be scaled by a factor on `w`, so their weights are set
  here after the merge (`bake_norm_scales`: `a * (1 + w) - 1`).

Usage::

    plan = LayerPlan.from_windows(["6:10"], 18)
    export = export_mergekit("/path/to/base", plan, Path("out/gemma-rys-6-10"))  # recipe: out/.../rys_recipe.yml

The recipe is written into the export folder; a copy goes elsewhere only to a folder named with `recipes_dir`.
`recipe_yaml` (`recipe.py`, re-exported here) gives the text without building anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rys_forge.architectures import ArchSpec, arch_spec, layer_config
from rys_forge.artifacts import (
    CONFIG_FILE,
    RECIPE_FILE,
    SIDECAR_FILES,
    RysRecord,
    rys_forge_version,
    safetensors_header,
    write_config,
)
from rys_forge.errors import MergekitExportError, ModelLoadError, UsageError, WindowError, first_line
from rys_forge.files import staging_dir
from rys_forge.models import parse_dtype, resolve_source
from rys_forge.plan import LayerPlan
from rys_forge.repeat import remap_layer_fields
from rys_forge.surgery.recipe import (
    RECIPE_HEADER,
    WINDOW_CONVENTION_LINE,
    bakes_norms,
    check_recipe_copy,
    default_recipe_name,
    plan_to_slices,
    recipe_yaml,
    save_recipe_copy,
)

__all__ = [
    "RECIPE_HEADER", "WINDOW_CONVENTION_LINE", "MergekitExport", "bake_norm_scales", "check_recipe_copy",
    "default_recipe_name", "export_mergekit", "plan_to_slices", "recipe_yaml", "save_recipe_copy",
]

# Files copied from the base when mergekit did not (mergekit copies most of these itself): `artifacts.SIDECAR_FILES`.

# mergekit's own dtype names.
_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}

_PATCH_LOCK = threading.Lock()


@dataclass(frozen=True)
class MergekitExport:
    """Result of `export_mergekit`.

    Attributes:
        path: the finished output folder.
        recipe_path: the recipe under `recipes_dir` when one was given, else the copy in `path`.
        slices: mergekit `layer_range`s in order, half-open `(a, b)`.
        seconds: wall time of the whole export.
    """

    path: Path
    recipe_path: Path
    slices: tuple[tuple[int, int], ...]
    seconds: float


def _resolve_base(base: str | Path) -> Path:
    """A local folder holding the base's config and weights (built-ins/GGUF via the conversion cache,
    hub ids via a snapshot download)."""
    source, _info = resolve_source(str(base))
    path = Path(source).expanduser()
    if not path.is_dir():  # a hub id
        try:
            from huggingface_hub import snapshot_download

            path = Path(
                snapshot_download(
                    source,
                    allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
                )
            )
        except Exception as exc:  # hub errors are long and varied
            raise ModelLoadError(f"could not download '{source}' for mergekit: {first_line(exc)}") from None
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder {path} has no config.json")
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise ModelLoadError(f"model folder {path} holds no *.safetensors (or pytorch_model*.bin) weights")
    return path.resolve()


def _dtype_name(dtype: str | None, config: Any) -> str:
    if dtype is None:
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
        try:
            dtype = parse_dtype(stored)
        except UsageError:  # e.g. float64 or "auto" in the base config: not the user's choice
            dtype = "float32"
    name = str(parse_dtype(dtype)).replace("torch.", "")
    return _DTYPE_NAMES[name]


def _safetensors_sizes(folder: Path) -> dict[str, int]:
    """Tensor name -> data bytes, read from the safetensors headers only."""
    return {name: meta["data_offsets"][1] - meta["data_offsets"][0] for name, meta in safetensors_header(folder).items()}


def _config_section(data: dict, dotted: str) -> dict:
    section = data
    for part in filter(None, dotted.split(".")):
        section = section.setdefault(part, {})
    return section


def _ties_embeddings(config: Any, spec: ArchSpec) -> bool:
    top = getattr(config, "tie_word_embeddings", False)
    return bool(top or getattr(layer_config(config, spec), "tie_word_embeddings", False))


@contextmanager
def _mergekit_out_config_fixed(spec: ArchSpec, new_fields: dict[str, Any]) -> Iterator[None]:
    """While `run_merge` runs, give the config it builds the plan's per-layer fields.

    mergekit 0.1.5 builds its output config in `mergekit.merge._model_out_config` (base config with
    `num_hidden_layers` = sum of slice lengths) and saves it after writing the weights; transformers'
    validation then rejects the base-length `layer_types`. The wrapper applies the remapped fields
    to that config object. config.json is rewritten afterwards anyway; this only lets `run_merge`
    finish (it copies the tokenizer after saving the config).
    """
    import mergekit.merge as mk_merge

    original = getattr(mk_merge, "_model_out_config", None)
    if original is None:  # a mergekit without this hook: run as is
        yield
        return

    def patched(*args: Any, **kwargs: Any) -> Any:
        cfg = original(*args, **kwargs)
        target = layer_config(cfg, spec)
        for name, value in new_fields.items():
            object.__setattr__(target, name, value)
        return cfg

    with _PATCH_LOCK:
        mk_merge._model_out_config = patched
        try:
            yield
        finally:
            mk_merge._model_out_config = original


def _write_config(
    base_dir: Path,
    out_dir: Path,
    spec: ArchSpec,
    new_fields: dict[str, Any],
    dtype: str,
    plan: LayerPlan,
    version: str,
) -> None:
    """config.json = the base's config.json, per-layer fields remapped, dtype set, `rys` block added; a base's
    `auto_map` (remote code for an architecture transformers now ships) is left out: a mergekit export runs no
    code of its own (`artifacts.check_export_code`)."""
    data = json.loads((base_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    _config_section(data, spec.config_path).update(new_fields)
    data.pop("torch_dtype", None)
    for section in (data, *(v for v in data.values() if isinstance(v, dict))):
        section.pop("auto_map", None)
    data["dtype"] = dtype
    data["rys"] = RysRecord(format="mergekit", plan=plan.to_dict(), rys_forge_version=version, recipe=RECIPE_FILE).to_dict()
    write_config(out_dir, data)


def _check_output(
    base_dir: Path, out_dir: Path, spec: ArchSpec, plan: LayerPlan, new_fields: dict[str, Any], ties: bool
) -> None:
    """The folder holds one layer per visit, keeps the embedding tie, and its config validates."""
    from transformers import AutoConfig

    out_sizes = _safetensors_sizes(out_dir)
    if not out_sizes:
        raise MergekitExportError(f"mergekit wrote no safetensors weights into {out_dir}")
    layer_key = re.compile(rf"^{re.escape(spec.layers_path)}\.(\d+)\.")
    visits = {int(m[1]) for name in out_sizes if (m := layer_key.match(name))}
    if visits != set(range(len(plan.order))):
        raise MergekitExportError(
            f"mergekit wrote {len(visits)} layers under '{spec.layers_path}', the plan has {len(plan.order)} visits"
        )
    base_names = set(_safetensors_sizes(base_dir)) if any(base_dir.glob("*.safetensors")) else None
    if ties and base_names is not None:
        extra = sorted(n for n in out_sizes if not layer_key.match(n) and n not in base_names)
        if extra:
            raise MergekitExportError(
                f"mergekit wrote tensors the tied base does not have ({', '.join(extra)});"
                " the embedding tie would break"
            )
    try:
        config = AutoConfig.from_pretrained(out_dir)
    except Exception as exc:
        raise MergekitExportError(f"the exported config.json does not load: {first_line(exc)}") from None
    cfg = layer_config(config, spec)
    for name, value in new_fields.items():
        if getattr(cfg, name, None) != value:
            raise MergekitExportError(f"exported config.{name} is {getattr(cfg, name, None)!r}, expected {value!r}")
    if _ties_embeddings(config, spec) != ties:
        raise MergekitExportError("exported config changed tie_word_embeddings")


def bake_norm_scales(folder: Path, spec: ArchSpec, plan: LayerPlan) -> None:
    """Give the scaled visits of a merged checkpoint their residual scales in the post-norm weights: a norm applying
    `offset + w` (gemma: `1 + w`) then applies `a * (offset + w)`, so `w' = a * (offset + w) - offset` (computed
    in float32, stored in the tensor's dtype). Rewrites only the shards that hold such tensors.

    Raises:
        MergekitExportError: a tensor the plan needs is not in the checkpoint.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    offset = spec.norm_offset
    wanted = {f"{spec.layers_path}.{p}.{module}.weight": scale for p, scale in enumerate(plan.scales) if scale != 1.0
              for module in spec.branch_weights}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            names, metadata = set(handle.keys()), handle.metadata()
        if not names & wanted.keys():
            continue
        tensors = load_file(str(shard))
        for name in names & wanted.keys():
            tensor = tensors[name]
            tensors[name] = (wanted.pop(name) * (offset + tensor.float()) - offset).to(tensor.dtype)
        save_file(tensors, str(shard), metadata=metadata)
    if wanted:
        raise MergekitExportError(f"the merged checkpoint lacks {sorted(wanted)[0]}, whose residual scale the plan sets")


def _merge_setup(text: str, config: Any, quiet: bool) -> tuple[Any, Any]:
    """mergekit's configuration of the recipe and its options, after checking mergekit knows the architecture.

    Raises:
        MergekitExportError: mergekit rejects the recipe.
        UsageError: mergekit has no (layer) definition for the model type.
    """
    import yaml
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions

    try:
        merge_config = MergeConfiguration.model_validate(yaml.safe_load(text))
    except Exception as exc:
        raise MergekitExportError(f"mergekit rejected the recipe: {first_line(exc)}") from None
    options = MergeOptions(
        device="cpu",
        cuda=False,
        copy_tokenizer=True,
        clone_tensors=True,  # a repeated layer is the same tensor twice; safetensors needs copies
        lazy_unpickle=False,
        write_model_card=False,  # rys-forge writes its own card
        trust_remote_code=False,
        quiet=quiet,
    )
    architectures = ", ".join(getattr(config, "architectures", None) or ["?"])
    try:
        arch_info = get_architecture_info(merge_config, options)
    except Exception as exc:
        raise UsageError(
            f"mergekit cannot handle model type '{config.model_type}' ({architectures}): {first_line(exc)};"
            " use the layer-list format instead"
        ) from None
    if not any(module.architecture.num_layers_config_key() for module in arch_info.modules.values()):
        raise UsageError(
            f"mergekit has no layer definition for model type '{config.model_type}' ({architectures});"
            " use the layer-list format instead"
        )
    return merge_config, options


def _merge_into(out_dir: Path, base_dir: Path, text: str, merge_config: Any, options: Any, spec: ArchSpec,
                plan: LayerPlan, new_fields: dict[str, Any], dtype_name: str, version: str, ties: bool) -> None:
    """Run the merge in a staging sibling of `out_dir`, fix its config, add the sidecar files and the recipe,
    check it, and rename it into place (the staging folder is removed whatever happens, SIGTERM included)."""
    from mergekit.merge import run_merge

    with staging_dir(out_dir.parent, out_dir.name) as staging:
        tmp = staging / "export"
        tmp.mkdir()
        try:
            with _mergekit_out_config_fixed(spec, new_fields):
                run_merge(merge_config, str(tmp), options=options, config_source=text)
        except Exception as exc:
            raise MergekitExportError(f"mergekit passthrough merge failed: {first_line(exc)}") from None
        if plan.scaled and bakes_norms(spec):
            bake_norm_scales(tmp, spec, plan)
        _write_config(base_dir, tmp, spec, new_fields, dtype_name, plan, version)
        for name in SIDECAR_FILES:
            if (base_dir / name).is_file() and not (tmp / name).exists():
                shutil.copy2(base_dir / name, tmp / name)
        (tmp / RECIPE_FILE).write_text(text, encoding="utf-8")
        _check_output(base_dir, tmp, spec, plan, new_fields, ties)
        if out_dir.exists() or out_dir.is_symlink():
            raise UsageError(f"output folder {out_dir} appeared while exporting; not replacing it")
        os.replace(tmp, out_dir)


def export_mergekit(
    base: str | Path,
    plan: LayerPlan,
    out_dir: str | Path,
    *,
    recipe_name: str | None = None,
    recipes_dir: str | Path | None = None,
    dtype: str | None = None,
    rys_version: str | None = None,
    base_label: str | None = None,
    quiet: bool = True,
) -> MergekitExport:
    """Build the duplicated-weights checkpoint of `plan` with mergekit's passthrough merge.

    Args:
        base: local model folder (safetensors), built-in short name, `.gguf` file or hub id.
        plan: the layer plan (its `num_layers` must equal the base's layer count).
        out_dir: the folder to create; must not exist.
        recipe_name: file stem of the recipe under `recipes_dir` (default `default_recipe_name`).
        recipes_dir: also write the recipe to `recipes_dir/<recipe_name>.yml` (after success; an existing file
            there is replaced only if rys-forge wrote it, `check_recipe_copy`); without it, nothing is written
            outside `out_dir`.
        dtype: output dtype (`float32`, `bfloat16`, `float16`); default the base config's dtype.
        rys_version: version recorded in the recipe and config (default: the installed rys-forge).
        base_label: how the recipe header names the base (default `str(base)`; pass the user's
            spec, e.g. `gemma-3-270m`, when `base` is a resolved cache folder).
        quiet: hide mergekit's progress bars.

    Returns:
        MergekitExport(path, recipe_path, slices, seconds).

    Raises:
        UsageError: out_dir exists; the architecture is not supported (by rys-forge or mergekit).
        WindowError: the plan was made for another layer count.
        ModelLoadError: the base is missing or unreadable.
        MergekitExportError: mergekit failed or wrote something other than the plan.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() or out_dir.is_symlink():
        raise UsageError(f"output folder {out_dir} already exists; remove it or choose another")
    version = rys_version if rys_version is not None else rys_forge_version()

    from transformers import AutoConfig

    base_dir = _resolve_base(base)
    try:
        config = AutoConfig.from_pretrained(base_dir)
    except Exception as exc:
        raise ModelLoadError(f"could not read the config of '{base}': {first_line(exc)}") from None
    spec = arch_spec(config.model_type)
    cfg = layer_config(config, spec)
    if cfg.num_hidden_layers != plan.num_layers:
        raise WindowError(f"plan is for {plan.num_layers} layers but '{base}' has {cfg.num_hidden_layers}")
    new_fields = remap_layer_fields(cfg, spec, plan.order)
    ties = _ties_embeddings(config, spec)
    dtype_name = _dtype_name(dtype, config)
    slices = tuple(plan_to_slices(plan.order))
    text = recipe_yaml(str(base_dir), plan, dtype_name, version, base_label=str(base) if base_label is None else base_label,
                       spec=spec)

    merge_config, options = _merge_setup(text, config, quiet)
    copy = None if recipes_dir is None else Path(recipes_dir).expanduser() / f"{recipe_name or default_recipe_name(base, plan)}.yml"
    if copy is not None:
        check_recipe_copy(copy)  # before the merge: someone's own file of that name is never replaced
    _merge_into(out_dir, base_dir, text, merge_config, options, spec, plan, new_fields, dtype_name, version, ties)
    recipe_path = out_dir / RECIPE_FILE if copy is None else save_recipe_copy(copy, text)
    return MergekitExport(
        path=out_dir, recipe_path=recipe_path, slices=slices, seconds=time.perf_counter() - started
    )
