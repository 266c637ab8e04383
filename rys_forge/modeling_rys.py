# coding=utf-8
"""RYS ("Repeat Your Self") layer-list model, written by rys-forge into a weight-tied export.

Self-contained: it needs transformers and torch only (no rys-forge). The base model's weights are
stored once under their base names; `config.rys` holds the explicit execution order of base layers
(`plan.layer_order`) and the base values of every per-layer config field. Each visit of a layer is a
copy of the base layer (parameters shared, own `layer_idx`), so every visit has its own KV-cache slot,
while `config.num_hidden_layers` and per-layer fields such as `layer_types` follow the plan. Load with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.

Every visit's modules are named `<layers>.visits.<p>.<module>` (`p` = position in the execution order), so
a PEFT adapter can target one visit: `PeftModel.from_pretrained(model, folder + "/heal")` applies the
per-visit LoRA adapters `rys-forge heal` trains, while the base weights stay one shared tensor.
"""

import copy

import transformers
from torch import nn

_BASE_CLASS = "LlamaForCausalLM"  # replaced at export time
_LAYERS_PATH = "model.layers"  # replaced at export time


def _get(root, dotted):
    for part in filter(None, dotted.split(".")):
        root = getattr(root, part)
    return root


def _skip_state(*args, **kwargs):
    """A visit's modules store nothing: their parameters are the base layer's, saved under base names."""


def visit_copy(module, layer_idx, deep=False):
    """Shallow copy of a layer for one visit: parameters shared, own hook dicts, own `layer_idx`.

    Shallow (`deep=False`): only the path to modules that carry a `layer_idx` is copied; everything else
    (MLP, norms, linear layers) is the base layer's own object. Deep: every submodule is copied, sharing
    the base module's parameter and buffer dicts (a tensor replaced in the base, by loading or `.to()`,
    is the visit's too), so each visit has its own module objects that an adapter can wrap on its own;
    deep copies leave themselves out of `state_dict` (the weights are saved once, under base names).
    """
    clone = copy.copy(module)
    if deep:
        clone._save_to_state_dict = _skip_state
        clone._load_from_state_dict = _skip_state
    else:
        clone._parameters = dict(module._parameters)
        clone._buffers = dict(module._buffers)
        clone._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    clone._modules = dict(module._modules)
    for name, value in module.__dict__.items():
        if "hooks" in name and isinstance(value, dict):
            clone.__dict__[name] = type(value)(value)
    if "layer_idx" in module.__dict__:
        clone.layer_idx = layer_idx
    for name, child in module._modules.items():
        if child is not None and (deep or any("layer_idx" in m.__dict__ for m in child.modules())):
            clone._modules[name] = visit_copy(child, layer_idx, deep)
    return clone


# >>> residual scales: only in exports whose plan scales a visit (rys-forge leaves the marked blocks out otherwise)
class ResidualScale:
    """Forward hook multiplying a residual branch's update by a visit's scale (a tuple output: its first element)."""

    def __init__(self, scale):
        self.scale = float(scale)

    def __call__(self, module, args, output):
        if isinstance(output, tuple):
            return (output[0] * self.scale, *output[1:])
        return output * self.scale


def scale_branches(visit, paths, scale, base=None):
    """Scale the residual branch updates of one visit: `x + scale * branch(x)` for each module at `paths`
    (`config.rys["residual_outputs"]`: the attention and MLP modules, or the post-norms before the residual add).

    A module the visit shares with `base` (a shallow visit copy) is copied first, so the hook is the visit's own.
    """
    for path in paths:
        module, original = visit, base
        for name in path.split("."):
            child = module._modules[name]
            original = None if original is None else original._modules.get(name)
            if child is original:
                child = visit_copy(child, getattr(child, "layer_idx", None))
                module._modules[name] = child
            module = child
        module.register_forward_hook(ResidualScale(scale))
# <<< residual scales


class VisitList(nn.ModuleList):
    """Registers the base layers (so weights keep their base names, stored once) but iterates, indexes
    and counts the visits of the plan. The visits are registered too, as `visits.<p>` (deep copies that
    share the base tensors and stay out of `state_dict`), so each visit's modules have a name of their
    own: a PEFT adapter targeting `...layers.visits.<p>.<module>` applies to that visit only."""

    def __init__(self, base_layers, order):
        super().__init__()
        for index, layer in enumerate(base_layers):
            self.add_module(str(index), layer)
        self.add_module("visits", nn.ModuleList(visit_copy(base_layers[k], p, deep=True) for p, k in enumerate(order)))

    def __iter__(self):
        return iter(self._modules["visits"])

    def __len__(self):
        return len(self._modules["visits"])

    def __getitem__(self, idx):
        visits = self._modules["visits"]
        return list(visits)[idx] if isinstance(idx, slice) else visits[idx]

    def base_layers(self):
        return [module for name, module in self._modules.items() if name != "visits"]


_Base = getattr(transformers, _BASE_CLASS)


class RysForCausalLM(_Base):
    """`_BASE_CLASS` whose decoder runs the layers in `config.rys["plan"]["layer_order"]`."""

    def __init__(self, config):
        rys = config.rys
        order = [int(k) for k in rys["plan"]["layer_order"]]
        base_fields = rys["base_fields"]
        target = config.get_text_config(decoder=True)
        plan_fields = {name: copy.deepcopy(getattr(target, name)) for name in base_fields}
        if plan_fields.get("num_hidden_layers") != len(order):
            raise ValueError(
                f"config.num_hidden_layers={plan_fields.get('num_hidden_layers')} but the plan has {len(order)} visits"
            )
        for name, value in base_fields.items():  # build the base-shaped model first
            object.__setattr__(target, name, copy.deepcopy(value))
        super().__init__(config)
        parent_path, _, attr = _LAYERS_PATH.rpartition(".")
        parent = _get(self, parent_path)
        setattr(parent, attr, VisitList(list(getattr(parent, attr)), order))
        target = self.config.get_text_config(decoder=True)
        for name, value in plan_fields.items():  # then the plan's view of the per-layer fields
            object.__setattr__(target, name, value)
        # >>> residual scales
        for visit, scale in zip(getattr(parent, attr), rys["plan"]["residual_scales"]):
            if float(scale) != 1.0:
                scale_branches(visit, rys["residual_outputs"], scale)
        # <<< residual scales
