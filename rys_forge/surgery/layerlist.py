"""Weight-tied layer-list export: base weights stored once, the plan in config.json, and a
self-contained `modeling_rys.py` that runs the plan (`trust_remote_code=True`).

Folder layout::

    config.json          base config, plan view of the per-layer fields, `rys` block (with per-visit residual
                         scales for a damped plan), `auto_map`
    model.safetensors    the base weights under their base names (size ~ the base model's)
    modeling_rys.py      RysForCausalLM (needs transformers + torch only)
    tokenizer files, generation_config.json
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from rys_forge.architectures import arch_spec, layer_config
from rys_forge.artifacts import LAYERLIST_AUTO_MAP, MODELING_FILE, RysRecord, modeling_code, write_config
from rys_forge.plan import LayerPlan
from rys_forge.repeat import remap_layer_fields


def render_modeling(model: nn.Module, scaled: bool = False) -> str:
    """`modeling_rys.py` for this model's class and layer path (`artifacts.modeling_code`: the one rendering,
    which every loader of an export compares the folder's file with before running it); `scaled` for a damped plan
    (the file then applies the per-visit residual scales)."""
    return modeling_code(type(model).__name__, arch_spec(model.config.model_type).layers_path, scaled=scaled)


def layerlist_config(model: nn.Module, plan: LayerPlan, record: RysRecord) -> dict[str, Any]:
    """config.json of the export: the base config with the plan's per-layer fields and the `rys` block
    (`record` with this format, the plan and the base values of the per-layer fields; for a damped plan, the
    modules whose outputs a visit's residual scale multiplies)."""
    spec = arch_spec(model.config.model_type)
    base = model.config.to_dict()
    cfg = layer_config(model.config, spec)
    plan_fields = remap_layer_fields(cfg, spec, plan.order)
    base_fields = {name: getattr(cfg, name) for name in plan_fields}
    target = base if not spec.config_path else base[spec.config_path]
    target.update(plan_fields)
    base["architectures"] = ["RysForCausalLM"]
    base["auto_map"] = dict(LAYERLIST_AUTO_MAP)
    outputs = list(spec.branch_outputs) if plan.scaled else None
    base["rys"] = replace(record, format="layerlist", plan=plan.to_dict(), base_fields=base_fields,
                          residual_outputs=outputs).to_dict()
    return base


def export_layerlist(model: nn.Module, tokenizer: Any, plan: LayerPlan, folder: Path, record: RysRecord) -> None:
    """Write a layer-list export of `model` (no plan applied) into an existing empty `folder`."""
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    write_config(folder, layerlist_config(model, plan, record))
    (folder / MODELING_FILE).write_bytes(render_modeling(model, scaled=plan.scaled).encode("utf-8"))
