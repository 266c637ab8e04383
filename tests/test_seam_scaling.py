"""Seam scaling (damped visits): per-visit residual scales in the plan, the in-memory repeat and both exports.

References are independent of rys-forge's architecture table: a materialised duplicated-weights model whose
scaled visits have their output projections multiplied by the scale (pre-norm architectures) or their
post-norm weights set to `a * (1 + w) - 1` (gemma's `1 + w` post-norms), written out per architecture here.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from rys_forge.artifacts import MODELING_FILE, RECIPE_FILE
from rys_forge.errors import UsageError, WindowError
from rys_forge.models import load_model
from rys_forge.plan import LayerPlan, resolve_damping
from rys_forge.repeat import repeated
from rys_forge.surgery.builder import build
from rys_forge.surgery.mergekit_export import default_recipe_name, plan_to_slices, recipe_yaml
from test_repeat import _incremental_logits, materialised_reference
from tiny import MODEL_TYPES, SLIDING_WINDOW

POST_NORM = {"gemma2": ("post_attention_layernorm", "post_feedforward_layernorm")}
POST_NORM["gemma3_text"] = POST_NORM["gemma2"]
OUTPUT_PROJECTIONS = ("self_attn.o_proj", "mlp.down_proj")


def scaled_reference(model, plan: LayerPlan):
    """The plan materialised with duplicated weights, each scaled visit's branch writers scaled by hand."""
    reference = materialised_reference(model, plan.order)
    state = reference.state_dict()
    model_type = model.config.model_type
    with torch.no_grad():
        for p, scale in enumerate(plan.scales):
            if scale == 1.0:
                continue
            if model_type in POST_NORM:  # gemma norms apply (1 + w): the branch update scales with (1 + w)
                for name in POST_NORM[model_type]:
                    weight = state[f"model.layers.{p}.{name}.weight"]
                    weight.copy_(scale * (1.0 + weight) - 1.0)
                continue
            for name in OUTPUT_PROJECTIONS:
                for kind in ("weight", "bias"):
                    tensor = state.get(f"model.layers.{p}.{name}.{kind}")
                    if tensor is not None:
                        tensor.mul_(scale)
    return reference


def _prompt(length: int, vocab: int) -> torch.Tensor:
    return torch.randint(4, vocab, (2, length), generator=torch.Generator().manual_seed(7))


# ------------------------------------------------------------------------------------------- the plan


def test_alpha_scales_the_repeated_visits_only():
    plan = LayerPlan.from_windows(["2:5"], 6, alpha=0.5)
    assert plan.order == (0, 1, 2, 3, 4, 2, 3, 4, 5)
    assert plan.scales == (1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 1)
    assert plan.scaled and plan.substeps is None
    assert plan.describe() == "2:5 x2, repeated visits at residual scale 0.5 on 6 layers -> 9 visits"
    two = LayerPlan.from_windows(["0:2", "3:5"], 6, repeats=3, alpha=0.25)
    assert two.scales == (1, 1, 0.25, 0.25, 0.25, 0.25, 1, 1, 1, 0.25, 0.25, 0.25, 0.25, 1)


def test_substeps_replace_the_second_pass():
    repeats, alpha = resolve_damping(substeps=3)
    assert (repeats, alpha) == (4, 1 / 3)
    plan = LayerPlan.from_windows(["2:4"], 6, repeats, alpha)
    assert plan.order == (0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 4, 5)
    assert plan.scales == (1, 1, 1, 1) + (1 / 3,) * 6 + (1, 1)
    assert math.isclose(sum(plan.scales[4:10]) / 2, 1.0)  # the sub-steps add up to one full pass of the block
    assert plan.substeps == 3 and "3 damped sub-steps of 1/3" in plan.describe()
    assert resolve_damping() == (2, 1.0) and resolve_damping(3, 0.5) == (3, 0.5) and resolve_damping(substeps=1) == (2, 1.0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(alpha=0.0), "positive finite"),
        (dict(alpha=-1.0), "positive finite"),
        (dict(alpha=float("nan")), "positive finite"),
        (dict(alpha=float("inf")), "positive finite"),
        (dict(repeats=1, alpha=0.5), "with repeats 1 there are none"),
        (dict(substeps=0), "substeps must be an integer >= 1"),
        (dict(substeps=2.5), "substeps must be an integer >= 1"),
        (dict(substeps=2, alpha=0.5), "not both"),
        (dict(substeps=2, repeats=3), "cannot be combined with repeats 3"),
    ],
)
def test_bad_damping_is_a_one_line_usage_error(kwargs, message):
    with pytest.raises(UsageError, match=message) as info:
        resolve_damping(**kwargs)
    assert "\n" not in str(info.value)
    if "substeps" not in kwargs:
        with pytest.raises(WindowError, match=message):
            LayerPlan.from_windows(["2:5"], 6, kwargs.get("repeats", 2), kwargs["alpha"])


def test_plain_plan_record_is_unchanged_and_damped_round_trips():
    plain = LayerPlan.from_windows(["2:5"], 6, alpha=1.0)
    assert plain == LayerPlan.from_windows(["2:5"], 6) and not plain.scaled
    assert list(plain.to_dict()) == ["layer_order", "base_num_layers", "windows", "repeats", "convention"]
    assert plain.describe() == "2:5 x2 on 6 layers -> 9 visits"
    for plan in (LayerPlan.from_windows(["1:3"], 6, *resolve_damping(substeps=3)),
                 LayerPlan.from_order([0, 1, 1, 2], 3, [1, 0.5, 0.5, 1])):
        data = json.loads(json.dumps(plan.to_dict()))
        assert LayerPlan.from_dict(data) == plan
    data = LayerPlan.from_windows(["2:5"], 6, alpha=0.5).to_dict()
    data["residual_scales"][5] = 0.25
    with pytest.raises(WindowError, match="inconsistent"):
        LayerPlan.from_dict(data)
    with pytest.raises(WindowError, match="one residual scale per visit"):
        LayerPlan.from_order([0, 1], 2, [1.0])
    assert LayerPlan.from_order([0, 1], 2, [1.0, 0.5]).is_identity is False


def test_recipe_slices_and_names_follow_the_scales(tiny_model_dirs):
    from rys_forge.architectures import arch_spec

    plan = LayerPlan.from_windows(["2:5"], 6, alpha=0.5)
    assert plan_to_slices(plan.order, plan.scales) == [(0, 5), (2, 5), (5, 6)]
    assert plan_to_slices(plan.order) == [(0, 5), (2, 6)]
    text = recipe_yaml("/base", plan, "float32", "0", spec=arch_spec("llama"))
    assert text.count("value: 0.5") == 2 and '- filter: "self_attn.o_proj."' in text
    gemma = recipe_yaml("/base", plan, "float32", "0", spec=arch_spec("gemma2"))
    assert "value:" not in gemma and "a * (1 + w) - 1" in gemma
    assert default_recipe_name("m", plan) == "m-rys-2-5-a0.5"
    assert default_recipe_name("m", LayerPlan.from_windows(["2:5"], 6, *resolve_damping(substeps=3))) == "m-rys-2-5-s3"
    assert default_recipe_name("m", LayerPlan.from_windows(["2:5"], 6, 3, 0.75)) == "m-rys-2-5-x3-a0.75"
    with pytest.raises(UsageError, match="needs the architecture"):
        recipe_yaml("/base", plan, "float32", "0")


# ------------------------------------------------------------------------------------------- in memory

DAMPED = {"alpha-0.5": (["2:5"], 2, 0.5), "substeps-3": (["1:3"], *resolve_damping(substeps=3))}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("damping", list(DAMPED))
def test_damped_repeat_matches_scaled_reference(tiny_model_dirs, model_type, damping):
    model = load_model(str(tiny_model_dirs[model_type])).model
    windows, repeats, alpha = DAMPED[damping]
    plan = LayerPlan.from_windows(windows, model.config.num_hidden_layers, repeats, alpha)
    plain = LayerPlan.from_windows(windows, model.config.num_hidden_layers, repeats)
    reference = scaled_reference(model, plan)
    ids = _prompt(3 * SLIDING_WINDOW, model.config.vocab_size)
    gen = dict(max_new_tokens=2 * SLIDING_WINDOW, min_new_tokens=2 * SLIDING_WINDOW, do_sample=False)
    with torch.no_grad():
        base_logits = model(ids).logits
        with repeated(model, plain):
            plain_logits = model(ids, use_cache=False).logits
        with repeated(model, plan):
            no_cache = model(ids, use_cache=False).logits
            with_cache = _incremental_logits(model, ids, prefix=SLIDING_WINDOW + 3)
            generated = model.generate(ids[:, :6], **gen)
        ref_no_cache = reference(ids, use_cache=False).logits
        ref_with_cache = _incremental_logits(reference, ids, prefix=SLIDING_WINDOW + 3)
        ref_generated = reference.generate(ids[:, :6], **gen)
        after = model(ids).logits
    assert (no_cache - ref_no_cache).abs().max().item() <= 1e-5
    assert (with_cache - ref_with_cache).abs().max().item() <= 1e-5
    assert torch.equal(generated, ref_generated)
    assert (no_cache - plain_logits).abs().max().item() > 1e-3  # the scale really acts
    assert torch.equal(after, base_logits)  # restored: no hook left on the base layers
    assert not any(m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------- exports


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_damped_exports_verify(tiny_model_dirs, tmp_path, model_type):
    """One damped plan per format (layer list at alpha 0.5, mergekit with 3 sub-steps): both verify against the
    in-memory repeat, and both compute what the scaled reference does."""
    from transformers import AutoModelForCausalLM

    base_dir = str(tiny_model_dirs[model_type])
    layerlist = build(base_dir, ["2:5"], tmp_path / "ll", alpha=0.5)
    mergekit = build(base_dir, ["1:3"], tmp_path / "mk", format="mergekit", substeps=3)
    base = load_model(base_dir).model
    ids = _prompt(3 * SLIDING_WINDOW, base.config.vocab_size)
    for result in (layerlist, mergekit):
        metrics = result.verification["metrics"]
        assert result.verification["passed"], result.verification["failures"]
        assert metrics["kl_mean"] <= 1e-6
        assert metrics["generate_cache_equals_no_cache"] and metrics["generate_equals_in_memory"]
        stored = json.loads((result.path / "config.json").read_text())["rys"]["plan"]
        assert stored["residual_scales"] == list(result.plan.scales)
        export = AutoModelForCausalLM.from_pretrained(
            result.path, trust_remote_code=result.format == "layerlist", attn_implementation="eager").eval()
        with torch.no_grad():
            gap = (export(ids).logits - scaled_reference(base, result.plan)(ids).logits).abs().max().item()
        assert gap <= 1e-5
    assert abs(layerlist.verification["metrics"]["bytes_ratio"] - 1.0) <= 0.01  # weights still stored once
    assert "residual scales" in (tmp_path / "mk" / RECIPE_FILE).read_text()


def test_damped_export_verifies_in_bfloat16(tiny_model_dirs, tmp_path):
    """A damped layer-list export verified in bfloat16 (as on a GPU, where its visits' scales meet bf16
    rounding): it passes verify's thresholds for that dtype."""
    from rys_forge.verify import verify

    base_dir = str(tiny_model_dirs["llama"])
    damped = build(base_dir, ["2:5"], tmp_path / "damped", alpha=0.5, verify=False)
    report = verify(damped.path, dtype="bfloat16", write_report=False)
    assert report.passed, report.failures
    assert report.settings["dtype"] == "bfloat16"


@pytest.mark.parametrize("fmt", ["layerlist", "mergekit"])
def test_alpha_one_exports_are_byte_identical(tiny_model_dirs, tmp_path, fmt):
    """alpha=1 is today's plain repeat, byte for byte: config.json (but its timestamp), recipe, code and weights."""
    base_dir = str(tiny_model_dirs["gemma3_text"])
    plain = build(base_dir, ["2:5"], tmp_path / "plain", format=fmt, verify=False)
    unit = build(base_dir, ["2:5"], tmp_path / "unit", format=fmt, alpha=1.0, verify=False)
    names = sorted(p.name for p in plain.path.iterdir())
    assert names == sorted(p.name for p in unit.path.iterdir())
    for name in names:
        a, b = (plain.path / name).read_bytes(), (unit.path / name).read_bytes()
        if name == "config.json":
            a, b = (json.loads(x) for x in (a, b))
            assert a["rys"].pop("created") and b["rys"].pop("created")
            assert "residual_scales" not in a["rys"]["plan"] and "residual_outputs" not in a["rys"]
        assert a == b, name
    if fmt == "layerlist":
        code = (plain.path / MODELING_FILE).read_text()
        assert "residual" not in code.lower() and "ResidualScale" not in code


def test_scales_edited_into_a_plain_export_are_refused(tiny_model_dirs, tmp_path):
    """A layer-list export's code follows its plan: scales edited into a plain export's config make its
    modeling_rys.py not the one rys-forge generates for that plan, so nothing of it runs."""
    from rys_forge.errors import VerificationError
    from rys_forge.verify import verify

    base_dir = str(tiny_model_dirs["llama"])
    result = build(base_dir, ["2:5"], tmp_path / "plain", verify=False)
    config_path = result.path / "config.json"
    config = json.loads(config_path.read_text())
    config["rys"]["plan"]["residual_scales"] = [1.0] * 5 + [0.5] * 3 + [1.0]
    config_path.write_text(json.dumps(config))
    with pytest.raises(VerificationError, match="not the modeling_rys.py rys-forge generates"):
        verify(result.path)


def test_build_refuses_scales_with_a_ready_plan(tiny_model_dirs, tmp_path):
    with pytest.raises(UsageError, match="ready LayerPlan"):
        build(str(tiny_model_dirs["llama"]), LayerPlan.from_windows(["2:5"], 6), tmp_path / "x", alpha=0.5)
    with pytest.raises(UsageError, match="with repeats 1"):
        build(str(tiny_model_dirs["llama"]), ["2:5"], tmp_path / "x", repeats=1, alpha=0.5)
    assert not (tmp_path / "x").exists()


def test_cli_build_alpha_and_substeps(tiny_model_dirs, tmp_path):
    from click.testing import CliRunner

    from rys_forge.cli import main

    model = str(tiny_model_dirs["llama"])
    runner = CliRunner()
    for extra, message in ((["--alpha", "0"], "alpha"), (["--alpha", "0.5", "--substeps", "2"], "not both"),
                           (["--substeps", "0"], "substeps")):
        refused = runner.invoke(main, ["build", "--model", model, "--window", "1:3", *extra, "--out", str(tmp_path / "x")])
        assert refused.exit_code == 2 and message in refused.output, refused.output
        assert len(refused.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    built = runner.invoke(main, ["build", "--model", model, "--window", "1:3", "--alpha", "0.5", "--out", str(tmp_path / "ok")])
    assert built.exit_code == 0, built.output
    assert "residual scales:" in built.output
    plan = json.loads((tmp_path / "ok" / "config.json").read_text())["rys"]["plan"]
    assert plan["alpha"] == 0.5 and plan["residual_scales"] == [1.0, 1.0, 1.0, 0.5, 0.5, 1.0, 1.0, 1.0]


def test_card_states_the_scales(tiny_model_dirs, tmp_path):
    from rys_forge.publish.card import render_card

    result = build(str(tiny_model_dirs["llama"]), ["1:3"], tmp_path / "damped", alpha=0.5)
    text = render_card(result.path).text
    assert "damped" in text and "[1.0, 1.0, 1.0, 0.5, 0.5, 1.0, 1.0, 1.0]" in text
    plain = build(str(tiny_model_dirs["llama"]), ["1:3"], tmp_path / "plain")
    assert "damped" not in render_card(plain.path).text.lower()
