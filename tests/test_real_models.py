"""Integration tests on the real built-in models (GGUF in PyPI packages). Marked `real`: CI runs them;
deselect locally with `-m "not real"`. The first run converts each GGUF once into the cache (~1 min)."""

from __future__ import annotations

import pytest
import torch

from rys_forge.models import BUILTIN_MODELS, load_model
from rys_forge.plan import LayerPlan
from rys_forge.repeat import repeated
from test_repeat import _incremental_logits, materialised_reference

pytestmark = pytest.mark.real

CASES = {"gemma-3-270m": "6:10", "smollm2-135m": "12:18"}


@pytest.fixture(scope="module", params=list(CASES))
def real_model(request):
    try:
        BUILTIN_MODELS[request.param].gguf_path()
    except Exception as exc:  # pragma: no cover - the CI installs both packages
        pytest.skip(str(exc))
    return request.param, load_model(request.param)


def test_real_model_repeat_is_exact(real_model):
    name, loaded = real_model
    model, tokenizer = loaded.model, loaded.tokenizer
    plan = LayerPlan.from_windows([CASES[name]], model.config.num_hidden_layers)
    text = "The residual stream carries information from layer to layer. " * 70
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :600]
    window = getattr(model.config, "sliding_window", None) or 0
    assert ids.shape[1] > window
    prefix = ids.shape[1] - 6
    reference = materialised_reference(model, plan.order)
    with torch.no_grad():
        base = model(ids[:, -40:]).logits
        with repeated(model, plan):
            no_cache = model(ids, use_cache=False).logits
            cached = _incremental_logits(model, ids, prefix=prefix)
            short = tokenizer("The capital of France is", return_tensors="pt").input_ids
            generated = model.generate(short, max_new_tokens=12, do_sample=False)
        ref_no_cache = reference(ids, use_cache=False).logits
        ref_generated = reference.generate(short, max_new_tokens=12, do_sample=False)
        after = model(ids[:, -40:]).logits
    del reference
    # fp32 over a 262k vocabulary: allow float32 round-off relative to the logit scale (~20).
    scale = ref_no_cache.abs().max().item()
    assert (no_cache - ref_no_cache).abs().max().item() <= 1e-5 * scale
    assert (cached - no_cache).abs().max().item() <= 1e-4 * scale
    assert torch.equal(generated, ref_generated)
    assert torch.equal(after, base)
