# coding=utf-8
"""RYS ("Repeat Your Self") layer-list model, written by rys-forge into a weight-tied export.

Self-contained: it needs transformers and torch only (no rys-forge). The base model's weights are
stored once under their base names; `config.rys` holds the explicit execution order of base layers
(`plan.layer_order`) and the base values of every per-layer config field. Each visit of a layer is a
shallow copy of the base layer (parameters shared, own `layer_idx`), so every visit has its own
KV-cache slot, while `config.num_hidden_layers` and per-layer fields such as `layer_types` follow the
plan. Load with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
"""

import copy

import torch
import transformers
from torch import nn

_BASE_CLASS = "LlamaForCausalLM"  # replaced at export time
_LAYERS_PATH = "model.layers"  # replaced at export time


def _get(root, dotted):
    for part in filter(None, dotted.split(".")):
        root = getattr(root, part)
    return root


def visit_copy(module, layer_idx):
    """Shallow copy of a layer for one visit: parameters shared, own hook dicts, own `layer_idx`."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = dict(module._modules)
    clone._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for name, value in module.__dict__.items():
        if "hooks" in name and isinstance(value, dict):
            clone.__dict__[name] = type(value)(value)
    if "layer_idx" in module.__dict__:
        clone.layer_idx = layer_idx
    for name, child in module._modules.items():
        if child is not None and any("layer_idx" in m.__dict__ for m in child.modules()):
            clone._modules[name] = visit_copy(child, layer_idx)
    return clone


class VisitList(nn.ModuleList):
    """Registers the base layers (so weights keep their base names, stored once) but iterates,
    indexes and counts the visits of the plan."""

    def __init__(self, base_layers, order):
        super().__init__()
        for index, layer in enumerate(base_layers):
            self.add_module(str(index), layer)
        self._order = list(order)
        self._rebuild()

    def _rebuild(self):
        base = list(self._modules.values())
        self.__dict__["_visits"] = [visit_copy(base[k], p) for p, k in enumerate(self._order)]

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._rebuild()  # buffers may have been replaced by new tensors
        return out

    def __iter__(self):
        return iter(self.__dict__["_visits"])

    def __len__(self):
        return len(self.__dict__["_visits"])

    def __getitem__(self, idx):
        return self.__dict__["_visits"][idx]

    def base_layers(self):
        return list(self._modules.values())


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
