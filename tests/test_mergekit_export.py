"""mergekit passthrough export: the checkpoint equals a materialised duplicated-weights reference,
keeps per-layer config fields and embedding ties right, and is written atomically."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch

from rys_forge.artifacts import RECIPE_FILE
from rys_forge.errors import (
    MergekitExportError,
    ModelLoadError,
    RysForgeError,
    UnsupportedArchitectureError,
    UsageError,
    WindowError,
)
from rys_forge.models import load_model
from rys_forge.plan import LayerPlan
from rys_forge.surgery.mergekit_export import (
    MergekitExport,
    default_recipe_name,
    export_mergekit,
    plan_to_slices,
)
from test_repeat import materialised_reference
from tiny import MODEL_TYPES, SLIDING_WINDOW, VOCAB_SIZE, make_tokenizer

GOLDEN = Path(__file__).parent / "golden"
VERSION = "0.0.0-test"


def _safetensors_sizes(folder: Path) -> dict[str, int]:
    sizes = {}
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, meta in header.items():
            if name != "__metadata__":
                sizes[name] = meta["data_offsets"][1] - meta["data_offsets"][0]
    return sizes


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def _prompt(length: int, vocab: int, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (2, length), generator=generator)


def _no_temp_left(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]


def _check_export(base_dir: Path, out: Path, plan: LayerPlan) -> None:
    """Logits, cache, config, ties and size of an export against the materialised reference."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = load_model(str(base_dir)).model
    reference = materialised_reference(base, plan.order)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert exported.config.num_hidden_layers == len(plan.order)

    ids = _prompt(3 * SLIDING_WINDOW, base.config.vocab_size)
    assert ids.shape[1] > SLIDING_WINDOW
    with torch.no_grad():
        ref_logits = reference(ids, use_cache=False).logits
        out_logits = exported(ids, use_cache=False).logits
        base_logits = base(ids).logits
        kwargs = dict(max_new_tokens=2 * SLIDING_WINDOW, min_new_tokens=2 * SLIDING_WINDOW, do_sample=False)
        gen_cache = exported.generate(ids[:, :6], use_cache=True, **kwargs)
        gen_plain = exported.generate(ids[:, :6], use_cache=False, **kwargs)
        gen_ref = reference.generate(ids[:, :6], **kwargs)
    assert (out_logits - ref_logits).abs().max().item() <= 1e-5
    kl = torch.nn.functional.kl_div(
        out_logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    assert kl.mean().item() <= 1e-6
    assert (out_logits - base_logits).abs().max().item() > 1e-3  # the repeat really changes the model
    assert torch.equal(gen_cache, gen_plain)
    assert torch.equal(gen_cache, gen_ref)

    # Config: the base's fields, per-layer fields remapped, the plan recorded.
    base_json = json.loads((base_dir / "config.json").read_text())
    out_json = json.loads((out / "config.json").read_text())
    assert out_json["rys"] == {
        "plan": plan.to_dict(),
        "format": "mergekit",
        "rys_forge_version": VERSION,
        "recipe": RECIPE_FILE,
    }
    changed = {k for k in base_json if base_json[k] != out_json.get(k)}
    assert changed <= {"num_hidden_layers", "layer_types", "max_window_layers", "dtype", "torch_dtype"}
    base_types = getattr(base.config, "layer_types", None)
    if base_types is not None:
        assert out_json["layer_types"] == [base_types[k] for k in plan.order]
        assert exported.config.layer_types == [base_types[k] for k in plan.order]
    config = AutoConfig.from_pretrained(out)
    assert config.rys["plan"]["layer_order"] == list(plan.order)
    assert LayerPlan.from_dict(config.rys["plan"]) == plan

    # Embeddings: tied stays tied, and no separate lm_head tensor appears.
    base_sizes, out_sizes = _safetensors_sizes(base_dir), _safetensors_sizes(out)
    assert exported.config.tie_word_embeddings == base.config.tie_word_embeddings
    if base.config.tie_word_embeddings:
        head, embed = exported.lm_head.weight, exported.model.embed_tokens.weight
        assert head is embed or torch.equal(head, embed)
        assert ("lm_head.weight" in out_sizes) == ("lm_head.weight" in base_sizes)
    else:
        assert "lm_head.weight" in out_sizes
        assert not torch.equal(exported.lm_head.weight, exported.model.embed_tokens.weight)

    # Size: base bytes plus one copy of every repeated visit's layer.
    layer_bytes: dict[int, int] = {}
    for name, size in base_sizes.items():
        if (k := _layer_of(name)) is not None:
            layer_bytes[k] = layer_bytes.get(k, 0) + size
    expected = sum(base_sizes.values()) + sum(layer_bytes[k] for k in plan.order) - sum(layer_bytes.values())
    assert abs(sum(out_sizes.values()) - expected) <= 0.02 * expected
    on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert abs(on_disk - expected) <= 0.1 * expected  # headers included
    assert sum(out_sizes.values()) > sum(base_sizes.values())

    # Tokenizer and generation config came along.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (base_dir / name).read_bytes()
    assert (out / RECIPE_FILE).is_file()


def test_plan_to_slices():
    assert plan_to_slices(LayerPlan.from_windows(["2:5"], 6).order) == [(0, 5), (2, 6)]
    assert plan_to_slices(LayerPlan.from_windows(["1:3"], 6, repeats=3).order) == [(0, 3), (1, 3), (1, 6)]
    assert plan_to_slices(LayerPlan.from_windows(["0:2", "3:5"], 6).order) == [(0, 2), (0, 5), (3, 6)]
    assert plan_to_slices(LayerPlan.from_windows(["5:6"], 6).order) == [(0, 6), (5, 6)]
    assert plan_to_slices(LayerPlan.identity(4).order) == [(0, 4)]
    assert plan_to_slices([3, 1, 2, 0]) == [(3, 4), (1, 3), (0, 1)]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_rys_export_matches_reference(tiny_model_dirs, tmp_path, model_type, monkeypatch):
    monkeypatch.chdir(tmp_path)  # without recipes_dir nothing may land outside the export folder
    base_dir = tiny_model_dirs[model_type]
    num_layers = json.loads((base_dir / "config.json").read_text())["num_hidden_layers"]
    plan = LayerPlan.from_windows(["2:5"], num_layers)
    result = export_mergekit(base_dir, plan, tmp_path / "out", rys_version=VERSION)
    assert isinstance(result, MergekitExport)
    assert result.path == tmp_path / "out" and result.recipe_path == tmp_path / "out" / RECIPE_FILE
    assert result.slices == ((0, 5), (2, num_layers))
    assert result.seconds > 0
    assert _no_temp_left(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    _check_export(base_dir, result.path, plan)


@pytest.mark.parametrize(
    "model_type,windows,repeats",
    [("gemma3_text", ["1:4"], 3), ("qwen2", ["0:2", "3:5"], 2), ("phi3", ["1:3"], 3), ("qwen3", ["0:1", "2:4"], 3)],
)
def test_multi_window_and_repeats(tiny_model_dirs, tmp_path, model_type, windows, repeats):
    base_dir = tiny_model_dirs[model_type]
    num_layers = json.loads((base_dir / "config.json").read_text())["num_hidden_layers"]
    plan = LayerPlan.from_windows(windows, num_layers, repeats)
    result = export_mergekit(base_dir, plan, tmp_path / "out", rys_version=VERSION)
    assert len(result.slices) > 2
    assert [k for a, b in result.slices for k in range(a, b)] == list(plan.order)
    _check_export(base_dir, result.path, plan)


def test_tied_llama_keeps_tie(tmp_path):
    """A SmolLM2-style llama (tied embeddings, no lm_head tensor) stays tied."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    base_dir = tmp_path / "tied-llama"
    tokenizer = make_tokenizer(base_dir)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=6, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.normal_(0.0, 0.15)
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    assert "lm_head.weight" not in _safetensors_sizes(base_dir)
    plan = LayerPlan.from_windows(["2:5"], 6)
    result = export_mergekit(base_dir, plan, tmp_path / "out", rys_version=VERSION)
    assert "lm_head.weight" not in _safetensors_sizes(result.path)
    assert json.loads((result.path / "config.json").read_text())["tie_word_embeddings"] is True
    _check_export(base_dir, result.path, plan)


def test_recipe_golden(tiny_model_dirs, tmp_path):
    """The recipe text for llama 2:5 on 6 layers (base path replaced by <BASE>)."""
    base_dir = tiny_model_dirs["llama"]
    plan = LayerPlan.from_windows(["2:5"], 6)
    recipes = tmp_path / "recipes"
    result = export_mergekit(base_dir, plan, tmp_path / "out", recipes_dir=recipes, rys_version=VERSION)
    assert result.recipe_path == recipes / f"{default_recipe_name(base_dir, plan)}.yml"
    assert result.recipe_path.name == "llama-rys-2-5.yml"
    text = result.recipe_path.read_text()
    assert (result.path / RECIPE_FILE).read_text() == text
    normalised = text.replace(str(base_dir.resolve()), "<BASE>").replace(str(base_dir), "<BASE>")
    golden = GOLDEN / "recipe_llama_2-5.yml"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(normalised)
    assert normalised == golden.read_text()

    # The recipe is a valid mergekit configuration describing the plan.
    import yaml
    from mergekit.config import MergeConfiguration

    parsed = MergeConfiguration.model_validate(yaml.safe_load(text))
    assert parsed.merge_method == "passthrough"
    assert [tuple(s.sources[0].layer_range) for s in parsed.slices] == [(0, 5), (2, 6)]


def test_recipe_name_and_dtype(tiny_model_dirs, tmp_path):
    base_dir = tiny_model_dirs["mistral"]
    plan = LayerPlan.from_windows(["1:3"], 6, repeats=3)
    assert default_recipe_name(base_dir, plan) == "mistral-rys-1-3-x3"
    result = export_mergekit(
        base_dir, plan, tmp_path / "out", recipes_dir=tmp_path / "r", recipe_name="mine", dtype="bf16",
        rys_version=VERSION,
    )  # fmt: skip
    assert result.recipe_path == tmp_path / "r" / "mine.yml"
    assert "dtype: bfloat16" in result.recipe_path.read_text()
    assert json.loads((result.path / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(result.path / "model.safetensors"), "pt") as handle:
        assert handle.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "BF16"


def _one_line(exc: BaseException) -> bool:
    return "\n" not in str(exc) and str(exc).strip() != ""


def test_missing_base(tmp_path):
    plan = LayerPlan.from_windows(["2:5"], 6)
    with pytest.raises(ModelLoadError) as info:
        export_mergekit(tmp_path / "no-such-model", plan, tmp_path / "out")
    assert _one_line(info.value) and "no-such-model" in str(info.value)
    assert not (tmp_path / "out").exists() and _no_temp_left(tmp_path)


def test_existing_out_dir(tiny_model_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError) as info:
        export_mergekit(tiny_model_dirs["llama"], LayerPlan.from_windows(["2:5"], 6), out)
    assert _one_line(info.value) and "already exists" in str(info.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and _no_temp_left(tmp_path)


def test_plan_for_other_layer_count(tiny_model_dirs, tmp_path):
    with pytest.raises(WindowError) as info:
        export_mergekit(tiny_model_dirs["gemma3_text"], LayerPlan.from_windows(["2:5"], 6), tmp_path / "out")
    assert _one_line(info.value) and "8" in str(info.value)
    assert not (tmp_path / "out").exists() and _no_temp_left(tmp_path)


def test_mergekit_failure_cleans_up(tiny_model_dirs, tmp_path, monkeypatch):
    import mergekit.merge

    def failing_merge(config, out_path, options, config_source=None):
        Path(out_path, "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full\nsecond line of a long traceback")

    monkeypatch.setattr(mergekit.merge, "run_merge", failing_merge)
    with pytest.raises(MergekitExportError) as info:
        export_mergekit(tiny_model_dirs["llama"], LayerPlan.from_windows(["2:5"], 6), tmp_path / "out")
    assert isinstance(info.value, RysForgeError)
    assert _one_line(info.value) and "disk full" in str(info.value)
    assert not (tmp_path / "out").exists() and _no_temp_left(tmp_path)


def test_architecture_unknown_to_mergekit(tiny_model_dirs, tmp_path, monkeypatch):
    import mergekit.architecture

    def unknown(config, options):
        raise RuntimeError("No architecture definition")

    monkeypatch.setattr(mergekit.architecture, "get_architecture_info", unknown)
    with pytest.raises(UsageError) as info:
        export_mergekit(tiny_model_dirs["phi3"], LayerPlan.from_windows(["2:5"], 6), tmp_path / "out")
    assert _one_line(info.value) and "phi3" in str(info.value)
    assert not (tmp_path / "out").exists() and _no_temp_left(tmp_path)


def test_architecture_unknown_to_rys_forge(tiny_model_dirs, tmp_path):
    base = tmp_path / "gpt2ish"
    base.mkdir()
    for f in tiny_model_dirs["llama"].iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_layer=6)
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError) as info:
        export_mergekit(base, LayerPlan.from_windows(["2:5"], 6), tmp_path / "out")
    assert _one_line(info.value) and "gpt2" in str(info.value)
    assert not (tmp_path / "out").exists() and _no_temp_left(tmp_path)
