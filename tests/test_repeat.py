"""The in-memory repeat against an independent reference: a model built with len(plan) layers whose
weights are copied from the base in plan order (a duplicated-weights checkpoint, materialised)."""

from __future__ import annotations

import re

import pytest
import torch

from rys_forge.models import load_model
from rys_forge.plan import LayerPlan
from rys_forge.repeat import apply_plan, repeated, restore
from tiny import MODEL_TYPES, SLIDING_WINDOW

LAYER_KEY = re.compile(r"^(model\.layers\.)(\d+)(\..*)$")


def materialised_reference(model, order):
    """A fresh model of len(order) layers with its own weights, copied from base layer order[p]."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    base_types = getattr(model.config, "layer_types", None)
    config.num_hidden_layers = len(order)
    if base_types is not None:
        config.layer_types = [base_types[k] for k in order]
    reference = type(model)(config).eval()
    base_state = model.state_dict()
    state = {}
    for key in reference.state_dict():
        match = LAYER_KEY.match(key)
        source = f"{match[1]}{order[int(match[2])]}{match[3]}" if match else key
        state[key] = base_state[source].clone()
    reference.load_state_dict(state, strict=True)
    return reference


def _prompt(length: int, vocab: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (2, length), generator=generator)


def _incremental_logits(model, ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """Prefill `prefix` tokens with the KV cache, then feed the rest one token at a time."""
    out = model(ids[:, :prefix], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    for t in range(prefix, ids.shape[1]):
        out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    return torch.cat(steps, dim=1)


PLANS = {
    "rys": (["2:5"], 2),
    "triple": (["1:3"], 3),
    "two-windows": (["0:2", "3:5"], 2),
}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_repeat_matches_materialised_reference(tiny_model_dirs, model_type, plan_name):
    loaded = load_model(str(tiny_model_dirs[model_type]))
    model = loaded.model
    windows, repeats = PLANS[plan_name]
    plan = LayerPlan.from_windows(windows, model.config.num_hidden_layers, repeats)
    reference = materialised_reference(model, plan.order)
    ids = _prompt(3 * SLIDING_WINDOW, model.config.vocab_size)
    assert ids.shape[1] > SLIDING_WINDOW

    n_params = sum(p.numel() for p in model.parameters())
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base_logits = model(ids).logits
        with repeated(model, plan):
            assert sum(p.numel() for p in model.parameters()) == n_params
            assert model.num_parameters() == n_params
            no_cache = model(ids, use_cache=False).logits
            with_cache = _incremental_logits(model, ids, prefix=SLIDING_WINDOW + 3)
            generated = model.generate(ids[:, :6], max_new_tokens=2 * SLIDING_WINDOW, do_sample=False, min_new_tokens=2 * SLIDING_WINDOW)
        ref_no_cache = reference(ids, use_cache=False).logits
        ref_with_cache = _incremental_logits(reference, ids, prefix=SLIDING_WINDOW + 3)
        ref_generated = reference.generate(ids[:, :6], max_new_tokens=2 * SLIDING_WINDOW, do_sample=False, min_new_tokens=2 * SLIDING_WINDOW)
        after_logits = model(ids).logits

    assert (no_cache - ref_no_cache).abs().max().item() <= 1e-5
    assert (with_cache - ref_with_cache).abs().max().item() <= 1e-5
    assert (with_cache - no_cache).abs().max().item() <= 1e-4
    assert torch.equal(generated, ref_generated)
    # The repeat really changes the model (otherwise the checks above are vacuous).
    assert (no_cache - base_logits).abs().max().item() > 1e-3
    # Restored exactly: same tensors, same config, same outputs.
    assert torch.equal(after_logits, base_logits)
    after_state = model.state_dict()
    assert base_state.keys() == after_state.keys()
    assert all(torch.equal(base_state[k], after_state[k]) for k in base_state)
    assert model.config.num_hidden_layers == plan.num_layers
    assert len(model.model.layers) == plan.num_layers
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(plan.num_layers))


def test_sharing_modules_without_copies_is_wrong_with_cache(tiny_model_dirs):
    """Why visits are copied: reusing the same module objects shares a KV slot between two visits."""
    model = load_model(str(tiny_model_dirs["llama"])).model
    plan = LayerPlan.from_windows(["2:5"], 6)
    reference = materialised_reference(model, plan.order)
    ids = _prompt(12, model.config.vocab_size)
    layers = model.model.layers
    with torch.no_grad():
        model.model.layers = torch.nn.ModuleList(layers[k] for k in plan.order)
        model.config.num_hidden_layers = len(plan.order)
        no_cache = model(ids, use_cache=False).logits
        try:
            cached = _incremental_logits(model, ids, prefix=5)
        except RuntimeError:  # two visits appended to one cache slot: shapes no longer match
            cached = None
        model.model.layers, model.config.num_hidden_layers = layers, 6
        ref = reference(ids, use_cache=False).logits
    assert (no_cache - ref).abs().max().item() <= 1e-5
    assert cached is None or (cached - ref).abs().max().item() > 1e-3


def test_identity_plan_reproduces_base(tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["gemma3_text"])).model
    ids = _prompt(20, model.config.vocab_size)
    with torch.no_grad():
        base = model(ids).logits
        with repeated(model, LayerPlan.identity(8)):
            same = model(ids).logits
    assert torch.equal(base, same)


def test_apply_twice_refused_and_restore_after_error(tiny_model_dirs):
    from rys_forge.errors import UsageError, WindowError

    model = load_model(str(tiny_model_dirs["qwen2"])).model
    original_types = list(model.config.layer_types)
    apply_plan(model, LayerPlan.from_windows(["1:4"], 6))
    assert model.config.layer_types == [original_types[k] for k in (0, 1, 2, 3, 1, 2, 3, 4, 5)]
    assert model.config.max_window_layers == 3 + 0  # layers 0..2 full; first visit of a layer >= 3 is position 3
    with pytest.raises(UsageError):
        apply_plan(model, LayerPlan.from_windows(["1:4"], 6))
    restore(model)
    assert model.config.layer_types == original_types
    assert model.config.max_window_layers == 3
    with pytest.raises(WindowError):
        apply_plan(model, LayerPlan.from_windows(["1:4"], 7))
    with pytest.raises(RuntimeError):
        with repeated(model, LayerPlan.from_windows(["1:4"], 6)):
            raise RuntimeError("boom")
    assert len(model.model.layers) == 6 and model.config.num_hidden_layers == 6


def test_hooks_are_per_visit(tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["llama"])).model
    calls = {"base": 0, "visit": 0}
    handle = model.model.layers[2].register_forward_pre_hook(lambda *a: calls.__setitem__("base", calls["base"] + 1))
    with torch.no_grad(), repeated(model, LayerPlan.from_windows(["2:5"], 6)):
        visit = model.model.layers[5].register_forward_pre_hook(lambda *a: calls.__setitem__("visit", calls["visit"] + 1))
        model(_prompt(5, model.config.vocab_size))
        visit.remove()
    handle.remove()
    assert calls == {"base": 2, "visit": 1}  # a base hook fires on both visits; a visit's hook on its own
    assert not model.model.layers[2]._forward_pre_hooks
