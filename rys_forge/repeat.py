"""Apply a LayerPlan to a loaded model in memory, exactly and reversibly.

The repeated model is exactly what a duplicated-weights checkpoint would compute, with and without
the KV cache, while every parameter stays shared with the base model:

* each visit is a shallow copy of its base layer (own `_modules` dict, own attention module) with
  its own `layer_idx`, so two visits of one layer never share a KV-cache slot (sharing the module
  objects is exact without cache and silently wrong with `use_cache=True` / `generate()`);
* the layer count and every per-layer config field of the architecture table (`layer_types`, ...)
  are remapped through the plan (swapping the ModuleList alone runs only the first `L` visits).
* a damped visit (residual scale `a != 1`) gets a forward hook multiplying the outputs of the modules the
  architecture table names as its residual branch updates (`ArchSpec.branch_outputs`: attention and MLP,
  or gemma's post-norms) by `a`; those modules are copied for that visit first, so the base and the
  other visits never see the hook, and no weight changes.

Usage::

    with repeated(model, LayerPlan.from_windows(["6:10"], 18)):
        logits = model(input_ids).logits
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

from rys_forge.architectures import ArchSpec, get_path, layer_config, set_path, spec_for_model
from rys_forge.errors import UnsupportedArchitectureError, UsageError, WindowError
from rys_forge.plan import LayerPlan
from rys_forge.modeling_rys import scale_branches
from rys_forge.modeling_rys import visit_copy as template_visit_copy

_STATE_ATTR = "_rys_forge_original"


@dataclass
class _SavedState:
    layers: nn.ModuleList
    config_fields: dict[str, Any]


def visit_copy(module: nn.Module, layer_idx: int, deep: bool = False) -> nn.Module:
    """Shallow copy of `module` for one visit: parameters shared, `layer_idx` set on every copied
    submodule that has one (the attention module, and the layer itself where it keeps one).

    Only the path to modules that carry a `layer_idx` is copied; everything else (MLP, norms) is the
    same object as in the base layer. Hooks present on the base layer fire on every visit; a hook
    added to one visit stays on it. The copying itself is the exported `modeling_rys.py`'s (one
    implementation for the in-memory repeat and the layer-list checkpoint); accelerate hooks are
    re-attached here, since a copied hooked `forward` would still be bound to the original module.
    With `deep`, every submodule is copied (own module objects sharing the base tensors), as `heal`
    needs to give one visit its own adapter.
    """
    clone = template_visit_copy(module, layer_idx, deep)
    _rehook_tree(module, clone)
    return clone


def scaled_visit(layer: nn.Module, position: int, scale: float, spec: ArchSpec) -> nn.Module:
    """The visit at `position` of base `layer` (`visit_copy`), its residual branch updates multiplied by `scale`.

    Raises:
        UnsupportedArchitectureError: the layer lacks a module the table names as a branch output.
    """
    if scale == 1.0:
        return visit_copy(layer, position)
    for path in spec.branch_outputs:
        try:
            get_path(layer, path)
        except AttributeError:
            raise UnsupportedArchitectureError(
                f"{type(layer).__name__} has no '{path}' module, where the architecture table puts the residual"
                " branch output that a residual scale multiplies"
            ) from None
    clone = template_visit_copy(layer, position)
    scale_branches(clone, spec.branch_outputs, scale, base=layer)
    _rehook_tree(layer, clone)
    return clone


def _rehook_tree(original: nn.Module, clone: nn.Module) -> None:
    if clone is original:
        return
    if "_hf_hook" in original.__dict__:
        from accelerate.hooks import add_hook_to_module

        for name in ("forward", "_old_forward", "_hf_hook"):
            clone.__dict__.pop(name, None)
        add_hook_to_module(clone, original._hf_hook)
    for name, child in original._modules.items():
        if child is not None:
            _rehook_tree(child, clone._modules[name])


def remap_layer_fields(cfg: Any, spec: ArchSpec, order: tuple[int, ...]) -> dict[str, Any]:
    """New values of the layer count and per-layer config fields for a plan (nothing is mutated).

    Args:
        cfg: the config holding the layer fields (`layer_config(config, spec)`), at the base length.
        spec: the architecture's table row.
        order: the plan's execution order (base layer index per visit).
    """
    base_layers = cfg.num_hidden_layers
    new: dict[str, Any] = {"num_hidden_layers": len(order)}
    for name in spec.per_layer_fields:
        values = getattr(cfg, name, None)
        if values is None:
            continue
        if len(values) != base_layers:
            raise UsageError(f"config.{name} has {len(values)} entries for {base_layers} layers")
        new[name] = [values[k] for k in order]
    for name in spec.prefix_count_fields:
        count = getattr(cfg, name, None)
        if count is None:
            continue
        new[name] = next((p for p, k in enumerate(order) if k >= count), len(order))
    return new


def _set_config_fields(cfg: Any, values: dict[str, Any]) -> None:
    for name, value in values.items():
        # Plain attribute set: no validation hook may observe a half-updated (count, list) pair.
        object.__setattr__(cfg, name, value)


def apply_plan(model: nn.Module, plan: LayerPlan) -> None:
    """Apply `plan` to `model` in place; undo with `restore(model)`.

    Raises:
        WindowError: the plan was made for another layer count.
        UsageError: the model already has a plan applied.
    """
    if getattr(model, _STATE_ATTR, None) is not None:
        raise UsageError("this model already has a layer plan applied; restore it first")
    spec = spec_for_model(model)
    cfg = layer_config(model.config, spec)
    if getattr(cfg, "is_heterogeneous", False):
        raise UsageError("models with heterogeneous per-layer configs (per_layer_config) are not supported")
    layers: nn.ModuleList = get_path(model, spec.layers_path)
    if plan.num_layers != len(layers) or cfg.num_hidden_layers != len(layers):
        raise WindowError(
            f"plan is for {plan.num_layers} layers but the model has {len(layers)}"
            f" (config says {cfg.num_hidden_layers})"
        )
    new_fields = remap_layer_fields(cfg, spec, plan.order)
    saved = _SavedState(layers=layers, config_fields={k: getattr(cfg, k) for k in new_fields})
    visits = nn.ModuleList(scaled_visit(layers[k], p, plan.scales[p], spec) for p, k in enumerate(plan.order))
    set_path(model, spec.layers_path, visits)
    _set_config_fields(cfg, new_fields)
    object.__setattr__(model, _STATE_ATTR, saved)


def restore(model: nn.Module) -> None:
    """Undo `apply_plan`: the original layer list and config fields come back (same objects)."""
    saved: _SavedState | None = getattr(model, _STATE_ATTR, None)
    if saved is None:
        return
    spec = spec_for_model(model)
    set_path(model, spec.layers_path, saved.layers)
    _set_config_fields(layer_config(model.config, spec), saved.config_fields)
    object.__delattr__(model, _STATE_ATTR)


def applied_plan_active(model: nn.Module) -> bool:
    """Whether a plan is currently applied to `model`."""
    return getattr(model, _STATE_ATTR, None) is not None


@contextmanager
def repeated(model: nn.Module, plan: LayerPlan) -> Iterator[nn.Module]:
    """Context manager: the model runs `plan` inside the block and is restored exactly after."""
    apply_plan(model, plan)
    try:
        yield model
    finally:
        restore(model)
