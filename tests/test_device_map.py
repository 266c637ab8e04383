"""Big-model placement: a tiny model split by accelerate between the CPU and disk offload (hooks that move
weights in at each layer's forward). The in-memory repeat must stay exact: a visit copy of an offloaded
layer needs its own accelerate hook, else it runs with the weights of no device (or a stale one)."""

from __future__ import annotations

import pytest
import torch

from rys_forge.models import load_model
from rys_forge.plan import LayerPlan, Window
from rys_forge.repeat import repeated
from test_repeat import materialised_reference

pytest.importorskip("accelerate")


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_repeat_on_an_offloaded_model_matches_the_materialised_reference(tiny_model_dirs, model_type, tmp_path, monkeypatch):
    monkeypatch.setenv("RYS_FORGE_CACHE", str(tmp_path / "cache"))
    folder = tiny_model_dirs[model_type]
    plain = load_model(str(folder)).model
    n = plain.config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "cpu", "model.rotary_emb": "cpu"}
    for k in range(n):
        device_map[f"model.layers.{k}"] = "disk" if k % 2 else "cpu"  # odd layers offloaded
    split = load_model(str(folder), device_map=device_map, offload_folder=str(tmp_path / "offload")).model
    assert any("_hf_hook" in layer.__dict__ for layer in split.model.layers), "accelerate hooks expected"
    ids = torch.randint(4, plain.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    plan = LayerPlan.from_windows([Window(1, 4)], n, 2)
    reference = materialised_reference(plain, plan.order)
    with torch.no_grad():
        expected = reference(ids).logits
        with repeated(split, plan):
            got = split(ids).logits
            cached = split.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
        again = split(ids).logits
    assert (got - expected).abs().max() < 1e-4
    assert torch.equal(cached, reference.generate(ids[:1, :8], max_new_tokens=6, do_sample=False))
    assert (again - plain(ids).logits).abs().max() < 1e-5  # restored
