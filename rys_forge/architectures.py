"""Architecture facts, in a table: where the decoder layers live and which config fields follow a plan.

Adding an architecture is one row in `ARCHITECTURES`. Every field named here is remapped through the
LayerPlan whenever layers are repeated (in memory, in exports), because a field left at the base
length either raises (transformers checks `len(layer_types) == num_hidden_layers`) or, worse, silently
gives a repeated visit the wrong attention type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from rys_forge.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """Where an architecture keeps its decoder layers and per-layer config fields.

    Attributes:
        layers_path: dotted attribute path from the `*ForCausalLM` model to its `nn.ModuleList` of layers.
        config_path: dotted path from the top-level config to the config holding the layer fields
            ("" for the top-level config itself, "text_config" for multimodal wrappers).
        per_layer_fields: config fields that are lists with one entry per layer; remapped as
            `new[p] = old[plan[p]]`.
        prefix_count_fields: integer fields meaning "the first K layers are special" (qwen2's
            `max_window_layers`); remapped to the first plan position whose base layer is >= K.
            `layer_types` stays authoritative when the plan makes that set a non-prefix.
        final_norm_path: dotted path to the final norm applied to `x_L` before the LM head.
        embed_path: dotted path to the token embedding module.
        branch_outputs: modules of a decoder layer whose output is a residual branch's update, exactly as it is
            added to the stream (attention, then MLP): a damped visit multiplies their outputs by its scale
            (for a tuple output, its first element). Pre-norm layers: the attention and MLP modules; layers
            with a post-norm before the residual add (gemma2/3): that norm, since the norm undoes any scale
            applied before it.
        branch_weights: modules of a decoder layer whose parameters scale a branch update linearly, for exports
            that bake a scale into the weights (mergekit): the output projections (`weight` and any `bias`)
            of pre-norm layers; the post-norms of post-norm layers (`weight`).
        norm_offset: the post-norms multiply by `norm_offset + weight` (gemma: `1 + w`), so scaling them by
            `a` stores `a * (norm_offset + w) - norm_offset`; 0 for output projections.
    """

    layers_path: str = "model.layers"
    config_path: str = ""
    per_layer_fields: tuple[str, ...] = ()
    prefix_count_fields: tuple[str, ...] = ()
    final_norm_path: str = "model.norm"
    embed_path: str = "model.embed_tokens"
    branch_outputs: tuple[str, ...] = ("self_attn", "mlp")
    branch_weights: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    norm_offset: float = 0.0
    notes: str = field(default="", compare=False)


#: gemma2/3 normalise each branch's output before the residual add (`post_attention_layernorm`,
#: `post_feedforward_layernorm`, weights applied as `1 + w`): a residual scale goes after those norms.
_GEMMA_POST_NORMS = dict(
    branch_outputs=("post_attention_layernorm", "post_feedforward_layernorm"),
    branch_weights=("post_attention_layernorm", "post_feedforward_layernorm"),
    norm_offset=1.0,
)


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(notes="Llama 2/3, SmolLM2"),
    "mistral": ArchSpec(notes="uniform sliding window; no per-layer fields"),
    "qwen2": ArchSpec(per_layer_fields=("layer_types",), prefix_count_fields=("max_window_layers",)),
    "qwen3": ArchSpec(per_layer_fields=("layer_types",), prefix_count_fields=("max_window_layers",)),
    "gemma2": ArchSpec(per_layer_fields=("layer_types",), **_GEMMA_POST_NORMS, notes="alternating sliding/full attention"),
    "gemma3_text": ArchSpec(per_layer_fields=("layer_types",), **_GEMMA_POST_NORMS, notes="5 sliding : 1 full attention"),
    "phi3": ArchSpec(notes="fused qkv / gate_up projections; resid dropout after the branches (identity at eval)"),
}


def supported_model_types() -> list[str]:
    """The `model_type` values rys-forge knows how to repeat and export."""
    return sorted(ARCHITECTURES)


def arch_spec(model_type: str) -> ArchSpec:
    """Look up an architecture by `model_type`.

    Raises:
        UnsupportedArchitectureError: the type is not in the table.
    """
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{model_type}'; supported model types: {', '.join(supported_model_types())}"
        ) from None


def get_path(root: Any, dotted: str) -> Any:
    """Follow a dotted attribute path ("" returns `root`)."""
    obj = root
    for part in filter(None, dotted.split(".")):
        obj = getattr(obj, part)
    return obj


def set_path(root: Any, dotted: str, value: Any) -> None:
    """Set the attribute at a dotted path."""
    parent_path, _, name = dotted.rpartition(".")
    setattr(get_path(root, parent_path), name, value)


def spec_for_model(model: nn.Module) -> ArchSpec:
    """The ArchSpec of a loaded model, checked against the model's actual structure."""
    spec = arch_spec(model.config.model_type)
    try:
        layers = get_path(model, spec.layers_path)
    except AttributeError:
        raise UnsupportedArchitectureError(
            f"model of type '{model.config.model_type}' has no decoder layers at '{spec.layers_path}'"
            " (is it a *ForCausalLM model?)"
        ) from None
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(f"'{spec.layers_path}' is a {type(layers).__name__}, not an nn.ModuleList")
    return spec


def layer_config(config: Any, spec: ArchSpec) -> Any:
    """The (sub-)config holding the layer count and per-layer fields."""
    return get_path(config, spec.config_path)
