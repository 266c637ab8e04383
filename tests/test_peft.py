"""PEFT adapters on tiny models: a merged adapter equals peft's own forward; per-visit LoRA healing on layer-list
exports (distinct LoRA per visit over one shared base storage, zero LoRA-B leaves the model unchanged exactly,
training lowers the loss on a fixed batch), checked against a model materialised with per-visit merged weights."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from rys_forge.artifacts import HEAL_DIR, HEAL_FILE, check_verified
from rys_forge.cli import main
from rys_forge.errors import ModelLoadError, UsageError, VerificationError
from rys_forge.heal import HealSettings, attach_heal_lora, heal, token_blocks
from rys_forge.models import load_model
from rys_forge.plan import LayerPlan
from rys_forge.surgery.builder import build
from rys_forge.verify import verify
from test_repeat import materialised_reference
from tiny import SLIDING_WINDOW

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
WINDOW = "2:5"
TEXT = "The quick brown fox jumps over the lazy dog. Repeat your self: run a block of layers twice."


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _auto(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, attn_implementation="eager").eval()


def _ids(seed: int = 3, length: int = 3 * SLIDING_WINDOW) -> torch.Tensor:
    return torch.randint(4, 300, (2, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _next_token_loss(model, ids) -> float:
    """Mean next-token cross-entropy, computed here (not heal's own function)."""
    logits = _logits(model, ids).float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


@pytest.fixture(scope="module")
def lora_adapter(tiny_model_dirs, tmp_path_factory):
    """A LoRA adapter on the tiny llama with random (non-zero) A and B, saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapter") / "lora"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], attn_implementation="eager")
    torch.manual_seed(11)
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                               init_lora_weights=False))
    wrapped.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exports(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("heal_exports")
    return {mt: build(str(tiny_model_dirs[mt]), [WINDOW], root / mt).path for mt in ("llama", "gemma3_text")}


@pytest.fixture(scope="module")
def healed(exports, tmp_path_factory):
    """A copy of the llama export healed for 12 steps on one fixed block (the whole text fits in it)."""
    folder = tmp_path_factory.mktemp("healed") / "llama"
    shutil.copytree(exports["llama"], folder)
    data = folder.parent / "data.txt"
    data.write_text(TEXT + "\n")
    settings = HealSettings(rank=4, alpha=8, steps=12, lr=1e-2, max_length=256, visits="second", kl_weight=0.1)
    return heal(folder, data, settings), data


# --------------------------------------------------------------------------- adapters on the way in


def test_merged_adapter_equals_peft_forward(tiny_model_dirs, lora_adapter):
    from peft import PeftModel

    base_dir = tiny_model_dirs["llama"]
    merged = load_model(str(base_dir), adapter=str(lora_adapter))
    reference = PeftModel.from_pretrained(load_model(str(base_dir)).model, str(lora_adapter)).eval()
    plain = load_model(str(base_dir)).model
    ids = _ids()
    got, want = _logits(merged.model, ids), _logits(reference, ids)
    assert (got - want).abs().max().item() <= 1e-5
    assert (got - _logits(plain, ids)).abs().max().item() > 1e-2  # the adapter does change the model
    record = merged.info["adapter"]
    weights = lora_adapter / "adapter_model.safetensors"
    assert record["files"]["adapter_model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["config"]["r"] == 4 and record["path"] == str(lora_adapter.resolve())


def test_build_with_adapter_records_verifies_and_cards(tiny_model_dirs, lora_adapter, tmp_path):
    from rys_forge.publish import render_card

    base_dir = tiny_model_dirs["llama"]
    result = build(str(base_dir), [WINDOW], tmp_path / "export", adapter=str(lora_adapter))
    assert result.verification["passed"] and result.verification["settings"]["base_adapter"] == str(lora_adapter.resolve())
    rys = json.loads((result.path / "config.json").read_text())["rys"]
    assert rys["adapter"]["config"]["lora_alpha"] == 8 and "adapter" not in rys["base_info"]
    # Independent reference: the merged base materialised with duplicated weights in plan order.
    merged = load_model(str(base_dir), adapter=str(lora_adapter)).model
    reference = materialised_reference(merged, result.plan.order)
    ids = _ids()
    assert (_logits(_auto(result.path), ids) - _logits(reference, ids)).abs().max().item() <= 1e-5
    card = render_card(result.path).text
    assert "Adapter: `lora` (LORA r=4 alpha=8 on down_proj, q_proj), merged" in card
    assert "No weight was trained" not in card
    # The recorded adapter is part of what the export is: a changed adapter file is refused.
    moved = tmp_path / "lora-edited"
    shutil.copytree(lora_adapter, moved)
    config = json.loads((result.path / "config.json").read_text())
    config["rys"]["adapter"]["path"] = str(moved)
    (result.path / "config.json").write_text(json.dumps(config))
    (moved / "adapter_model.safetensors").write_bytes((moved / "adapter_model.safetensors").read_bytes()[:-8] + bytes(8))
    with pytest.raises(VerificationError, match="changed since the export was built"):
        verify(result.path)


def test_mergekit_build_with_adapter(tiny_model_dirs, lora_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = tiny_model_dirs["llama"]
    result = build(str(base_dir), [WINDOW], tmp_path / "mk", format="mergekit", adapter=str(lora_adapter),
                   recipes_dir=tmp_path / "recipes")
    assert result.verification["passed"]
    reference = materialised_reference(load_model(str(base_dir), adapter=str(lora_adapter)).model, result.plan.order)
    merged = AutoModelForCausalLM.from_pretrained(result.path, attn_implementation="eager").eval()
    ids = _ids()
    assert (_logits(merged, ids) - _logits(reference, ids)).abs().max().item() <= 1e-5
    assert "adapter" in (tmp_path / "mk" / "rys_recipe.yml").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the merged copy of the base is gone


def test_adapter_cli_and_errors(tiny_model_dirs, lora_adapter, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["info", "--model", str(tiny_model_dirs["llama"]), "--adapter", str(lora_adapter)])
    assert ok.exit_code == 0, ok.output
    assert "adapter      LORA r=4 alpha=8 on down_proj, q_proj" in ok.output
    bad = runner.invoke(main, ["info", "--model", str(tiny_model_dirs["llama"]), "--adapter", str(tmp_path)])
    _one_line_error(bad, 1, "has no adapter_config.json")
    # An adapter for another architecture does not fit: one line, no traceback.
    with pytest.raises(ModelLoadError, match="does not load onto this model"):
        load_model(str(tiny_model_dirs["phi3"]), adapter=str(lora_adapter))


# --------------------------------------------------------------------------- per-visit LoRA


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_per_visit_lora_is_distinct_over_one_base_storage(exports, model_type):
    model = _auto(exports[model_type])
    plan = LayerPlan.from_dict(model.config.rys["plan"])
    order = list(plan.order)
    unhealed = _logits(model, _ids())
    wrapped = attach_heal_lora(model, plan, HealSettings(rank=2, visits="all", modules=("q_proj", "down_proj")))
    visits = model.model.layers
    first, second = order.index(3), len(order) - 1 - order[::-1].index(3)  # both visits of base layer 3
    a, b = visits[first].self_attn.q_proj, visits[second].self_attn.q_proj
    base_weight = visits.base_layers()[3].self_attn.q_proj.weight
    assert a is not b and a.lora_A["default"].weight is not b.lora_A["default"].weight
    assert a.lora_A["default"].weight.data_ptr() != b.lora_A["default"].weight.data_ptr()
    assert not torch.equal(a.lora_A["default"].weight, b.lora_A["default"].weight)  # independently initialised
    assert a.base_layer.weight.data_ptr() == b.base_layer.weight.data_ptr() == base_weight.data_ptr()
    assert not base_weight.requires_grad
    # Trainable parameters: r x (in + out) per adapted module, counted from the shapes here.
    adapted = [p for p, k in enumerate(order) if order.count(k) > 1]
    per_layer = sum(2 * (m.in_features + m.out_features) for m in (_base_module(visits, "self_attn.q_proj"),
                                                                  _base_module(visits, "mlp.down_proj")))
    assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == len(adapted) * per_layer
    # peft's default LoRA-B = 0: exactly the unhealed model.
    assert torch.equal(_logits(wrapped, _ids()), unhealed)
    # The base weights are still stored once.
    assert sorted(k for k in model.state_dict() if "lora_" not in k) == sorted(_auto(exports[model_type]).state_dict())


def _base_module(visits, name):
    return visits.base_layers()[0].get_submodule(name)


def test_second_visits_only_and_zero_b_round_trip(exports, tmp_path):
    from peft import PeftModel

    model = _auto(exports["llama"])
    plan = LayerPlan.from_dict(model.config.rys["plan"])
    unhealed = _logits(model, _ids())
    wrapped = attach_heal_lora(model, plan, HealSettings(rank=2))
    assert wrapped.rys_heal["visits"] == [5, 6, 7]  # [0, 1, 2, 3, 4, 2, 3, 4, 5]: the second visits of 2..4
    layers = model.model.layers
    assert not hasattr(layers[2].mlp.down_proj, "lora_A") and hasattr(layers[5].mlp.down_proj, "lora_A")
    wrapped.save_pretrained(tmp_path / "zero")
    reloaded = PeftModel.from_pretrained(_auto(exports["llama"]), str(tmp_path / "zero")).eval()
    assert torch.equal(_logits(reloaded, _ids()), unhealed)
    prompt = _ids()[:1, :6]
    plain = _auto(exports["llama"])
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(reloaded.generate(input_ids=prompt, **kwargs), plain.generate(input_ids=prompt, **kwargs))


# --------------------------------------------------------------------------- heal end to end


def _per_visit_merged_reference(base_dir, order, adapter_dir):
    """The base materialised in plan order, each adapted visit's Linear weights W + (alpha/r) B A (no peft)."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    reference = materialised_reference(load_model(str(base_dir)).model, order)
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.visits."
    with torch.no_grad():
        for key, a in weights.items():
            if ".lora_A." not in key:
                continue
            visit, _, module = key[len(prefix):].split(".lora_A.")[0].partition(".")
            b = weights[key.replace(".lora_A.", ".lora_B.")]
            reference.model.layers[int(visit)].get_submodule(module).weight += scaling * b @ a
    return reference


def test_heal_lowers_the_loss_and_reloads_with_plain_peft(healed, exports, tiny_model_dirs):
    from peft import PeftModel

    result, data = healed
    folder = result.path.parent
    record = json.loads((result.path / HEAL_FILE).read_text())
    probe = folder.parent / "mode_probe"
    probe.mkdir(exist_ok=True)
    assert result.path.stat().st_mode == probe.stat().st_mode  # a normal folder, not mkdtemp's 0700
    assert [v["visit"] for v in record["adapter"]["visits"]] == [5, 6, 7]
    assert len(record["loss"]["curve"]) == 12 and record["data"]["blocks"] == 1
    assert record["loss"]["curve"][0]["kl"] == 0.0 and record["loss"]["curve"][-1]["kl"] > 0  # B = 0 at step 1
    unhealed = _auto(folder)
    healed_model = PeftModel.from_pretrained(_auto(folder), str(folder / HEAL_DIR)).eval()
    batch = token_blocks(_tokenizer(folder), [TEXT], 256)  # the one fixed training batch
    before, after = _next_token_loss(unhealed, batch), _next_token_loss(healed_model, batch)
    assert after < before - 0.05
    assert record["loss"]["before"] == pytest.approx(before, abs=1e-5) and record["loss"]["after"] == pytest.approx(after, abs=1e-5)
    # Independent reference: per-visit merged weights in a materialised model.
    ids = _ids()
    reference = _per_visit_merged_reference(tiny_model_dirs["llama"], _order(folder), folder / HEAL_DIR)
    got = _logits(healed_model, ids)
    assert (got - _logits(reference, ids)).abs().max().item() <= 1e-4
    assert (got - _logits(unhealed, ids)).abs().max().item() > 1e-3
    # Trained LoRAs of two visits are different numbers; the base weights are untouched on disk.
    b5 = healed_model.base_model.model.model.layers[5].self_attn.q_proj.lora_B["default"].weight
    b6 = healed_model.base_model.model.model.layers[6].self_attn.q_proj.lora_B["default"].weight
    assert b5.abs().max() > 0 and not torch.equal(b5, b6)
    original = exports["llama"] / "model.safetensors"
    assert (folder / "model.safetensors").read_bytes() == original.read_bytes()
    # Verified with the adapters on both sides; the publish gate accepts the folder.
    assert result.verification["passed"] and result.verification["settings"]["heal_adapter"] == HEAL_DIR
    assert result.verification["metrics"]["generate_equals_in_memory"]
    assert "heal/adapter_model.safetensors" in check_verified(folder)["files"]


def test_heal_of_a_damped_export_scales_the_whole_healed_branch(tiny_model_dirs, tmp_path):
    """heal on a layer-list export with damped visits (alpha 0.5, #19): verified with the adapters on both
    sides, and equal to an independent reference: per-visit merged weights, then each damped visit's output
    projections times its scale (the scale multiplies the visit's whole branch, its LoRA included)."""
    from peft import PeftModel

    base = tiny_model_dirs["llama"]
    folder = build(str(base), [WINDOW], tmp_path / "damped", alpha=0.5).path
    data = tmp_path / "data.txt"
    data.write_text(TEXT + "\n")
    result = heal(folder, data, HealSettings(rank=4, alpha=8, steps=6, lr=1e-2, max_length=256, visits="second"))
    assert result.verification["passed"], result.verification["failures"]
    plan = json.loads((folder / "config.json").read_text())["rys"]["plan"]
    assert sorted(set(plan["residual_scales"])) == [0.5, 1.0]
    reference = _per_visit_merged_reference(base, plan["layer_order"], folder / HEAL_DIR)
    with torch.no_grad():
        for visit, scale in enumerate(plan["residual_scales"]):
            layer = reference.model.layers[visit]
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    healed_model = PeftModel.from_pretrained(_auto(folder), str(folder / HEAL_DIR)).eval()
    ids = _ids()
    got = _logits(healed_model, ids)
    assert (got - _logits(reference, ids)).abs().max().item() <= 1e-4
    assert (got - _logits(_auto(folder), ids)).abs().max().item() > 1e-3  # the healing changed the model


def test_heal_adapter_in_memory_on_a_hooked_base(healed, tiny_model_dirs):
    """The in-memory repeat with the per-visit LoRA, on a base whose layers carry accelerate hooks (as a
    model dispatched over several devices has), equals the per-visit merged reference: the deep visit
    copies get hooks of their own instead of a `forward` still bound to the layer they were copied from."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from rys_forge.adapters import attach_visit_adapters
    from rys_forge.repeat import repeated

    result, _ = healed
    folder, base = result.path.parent, tiny_model_dirs["llama"]
    hooked = load_model(str(base)).model
    for layer in hooked.model.layers:
        add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    plan = LayerPlan.from_dict(json.loads((folder / "config.json").read_text())["rys"]["plan"])
    ids = _ids()
    reference = _per_visit_merged_reference(base, _order(folder), folder / HEAL_DIR)
    with torch.no_grad(), repeated(hooked, plan):
        attach_visit_adapters(hooked, folder / HEAL_DIR)
        got = _logits(hooked, ids)
    assert (got - _logits(reference, ids)).abs().max().item() <= 1e-4


def _tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _order(folder):
    return json.loads((folder / "config.json").read_text())["rys"]["plan"]["layer_order"]


def test_healed_card(healed):
    from rys_forge.publish import render_card

    card = render_card(healed[0].path.parent, repo_id="me/tiny-healed").text
    assert "## Healing" in card and 'PeftModel.from_pretrained(model, "me/tiny-healed", subfolder="heal")' in card
    assert "5 (layer 2), 6 (layer 3), 7 (layer 4)" in card and "No weight was trained" not in card
    assert "- peft" in card and "per-visit LoRA adapters of `heal/`" in card


def test_tampered_heal_adapter_fails_verification(healed, tmp_path):
    folder = tmp_path / "tampered"
    shutil.copytree(healed[0].path.parent, folder)
    config = json.loads((folder / HEAL_DIR / "adapter_config.json").read_text())
    config["target_modules"] = config["target_modules"].replace("5|6|7", "5|6")
    (folder / HEAL_DIR / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(VerificationError, match="changed since verification"):
        check_verified(folder)
    with pytest.raises(VerificationError, match="heal adapter .* 14 of its weights match no module"):
        verify(folder)  # visit 7's LoRA (7 linear layers x A, B) is in the weights but would no longer be applied


# --------------------------------------------------------------------------- CLI and errors


def _one_line_error(result, code, fragment):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("rys-forge: error:"), result.output
    assert fragment in lines[0]


def test_heal_cli_and_one_line_errors(exports, tiny_model_dirs, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(exports["gemma3_text"], folder)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": TEXT}) + "\n" + json.dumps({"text": TEXT[::-1]}) + "\n")
    runner = CliRunner()
    args = ["heal", str(folder), "--data", str(data), "--steps", "2", "--max-length", "16", "--no-progress",
            "--modules", "v_proj", "--visits", "all"]
    ok = runner.invoke(main, args)
    assert ok.exit_code == 0, ok.output
    assert "loss on the data:" in ok.output and "verification PASSED" in ok.output
    assert "modules: self_attn.v_proj" in ok.output
    _one_line_error(runner.invoke(main, args), 2, "pass --force")
    _one_line_error(runner.invoke(main, ["heal", str(tmp_path / "nope"), "--data", str(data)]), 2, "export folder not found")
    _one_line_error(runner.invoke(main, ["heal", str(tiny_model_dirs["llama"]), "--data", str(data)]), 2,
                    "not a rys-forge export")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    _one_line_error(runner.invoke(main, ["heal", str(folder), "--data", str(empty), "--force"]), 2, "holds no text")
    _one_line_error(runner.invoke(main, ["heal", str(folder), "--data", str(data), "--rank", "0"]), 2,
                    "--rank must be a positive integer")
    _one_line_error(runner.invoke(main, ["heal", str(folder), "--data", str(data), "--steps", "-1"]), 2,
                    "--steps must be a positive integer")
    _one_line_error(runner.invoke(main, ["heal", str(folder), "--data", str(data), "--modules", "qkv", "--force"]), 2,
                    "choose from")
    config = json.loads((folder / "config.json").read_text())
    config["rys"]["format"] = "mergekit"
    (folder / "config.json").write_text(json.dumps(config))
    _one_line_error(runner.invoke(main, ["heal", str(folder), "--data", str(data), "--force"]), 2,
                    "heal needs a layer-list export")
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_heal_settings_validation():
    for bad, fragment in [(dict(lr=0.0), "--lr"), (dict(kl_weight=-1.0), "--kl-weight"), (dict(visits="first"), "--visits"),
                          (dict(max_length=1), "--max-length"), (dict(alpha=0.0), "--alpha")]:
        with pytest.raises(UsageError, match=fragment):
            HealSettings(**bad).validate()


# --------------------------------------------------------------------------- eval before/after healing


def test_eval_reports_before_and_after_healing(healed, tiny_model_dirs, lora_adapter, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from rys_forge.evaluate import evaluate, format_table

    monkeypatch.setenv("RYS_FORGE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "healed"
    shutil.copytree(healed[0].path.parent, folder)
    kwargs = dict(tasks=["rys_lambada_openai"], limit=3, progress=False)
    plain = evaluate(str(folder), heal=False, **kwargs)
    report = evaluate(str(folder), **kwargs)  # base results from the cache; eval.json replaced
    assert report.settings["heal"]["visits"] and plain.settings["heal"] is None and not plain.healing_rows
    row = next(r for r in report.healing_rows if r["metric"] == "perplexity")
    items = report.items["rys_lambada_openai"]["none"]["perplexity"]
    # "unhealed" is the plain export's RYS result; "healed" is the main rows' RYS result.
    assert row["unhealed"] == pytest.approx(plain.row("rys_lambada_openai", "perplexity")["rys"], rel=1e-6)
    assert row["healed"] == pytest.approx(report.row("rys_lambada_openai", "perplexity")["rys"], rel=1e-6)
    assert row["healed"] != pytest.approx(row["unhealed"], rel=1e-6)
    assert items["base"] == plain.items["rys_lambada_openai"]["none"]["perplexity"]["base"]
    assert "healing (same tasks): unhealed vs healed" in format_table(report)
    assert json.loads((folder / "eval.json").read_text())["healing_rows"] == json.loads(json.dumps(report.healing_rows))
    # In memory with --adapter: the merged model is another base (no cache reuse), and is recorded.
    merged = evaluate(model=str(tiny_model_dirs["llama"]), windows=[WINDOW], adapter=str(lora_adapter), **kwargs)
    assert not merged.base_cache_reused and merged.settings["adapter"]["path"] == str(lora_adapter.resolve())
    assert merged.row("rys_lambada_openai", "perplexity")["base"] != pytest.approx(
        plain.row("rys_lambada_openai", "perplexity")["base"], rel=1e-6)
