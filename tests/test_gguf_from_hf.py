"""GGUF export from a transformers base (`rys_forge.surgery.gguf_from_hf`) on tiny random models.

Each export is read back with gguf's own reader (structure, metadata, which base layer fills each block) and run
by llama.cpp (llama-cpp-python; skipped when missing), whose logits are compared with the in-memory repeat of the
same transformers model. The tiny qwen2/mistral models have their 8-token sliding window switched off
(`full_attention`): llama.cpp runs these architectures with full attention, so the export refuses a model whose
sliding window is on (tested below).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from rys_forge.errors import UnsupportedArchitectureError, UsageError
from rys_forge.gguf_file import llamacpp_available, read_gguf_plan
from rys_forge.plan import LayerPlan
from rys_forge.repeat import repeated
from rys_forge.surgery.gguf_from_hf import SUPPORTED_HF_ARCHS, HfGgufArch, export_gguf_from_hf
from tiny import make_tiny_model

ARCHS = ("llama", "qwen2", "mistral")
PLANS = {"identity": None, "one": ["2:4"], "two": ["1:3", "4:6"]}
#: f32 llama.cpp against float32 transformers: measured max KL per position 6e-8 .. 3.5e-7 on these models.
KL_MAX_F32 = 1e-5
#: f16 matrices: measured max KL per position 4e-7 .. 1.9e-6 on these models.
KL_MAX_F16 = 1e-4
TEXT = "The quick brown fox jumps"

needs_llamacpp = pytest.mark.skipif(not llamacpp_available(), reason="llama-cpp-python is not installed")


def full_attention(folder):
    """The tiny model with its sliding window switched off (the tiny qwen2/mistral use an 8-token window, which a
    GGUF for llama.cpp cannot express: the export refuses such models)."""
    import json

    config = json.loads((folder / "config.json").read_text())
    config.update(sliding_window=None, use_sliding_window=False)
    config.pop("layer_types", None)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """`model_type -> (model, tokenizer)`: tiny float32 models, built on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache: dict[str, tuple] = {}

    def get(model_type: str):
        if model_type not in cache:
            folder = full_attention(make_tiny_model(model_type, tmp_path_factory.mktemp(model_type)))
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
            cache[model_type] = (model.eval(), AutoTokenizer.from_pretrained(folder))
        return cache[model_type]

    return get


def make_plan(name: str, layers: int = 6) -> LayerPlan:
    windows = PLANS[name]
    return LayerPlan.identity(layers) if windows is None else LayerPlan.from_windows(windows, layers)


@pytest.fixture(scope="module")
def exports(bases, tmp_path_factory):
    """`(model_type, plan name, outtype) -> (path, plan)`: each export written once."""
    cache: dict[tuple[str, str, str], tuple] = {}

    def get(model_type: str, plan_name: str, outtype: str = "f32"):
        key = (model_type, plan_name, outtype)
        if key not in cache:
            model, tokenizer = bases(model_type)
            plan = make_plan(plan_name)
            out = tmp_path_factory.mktemp("gguf") / f"{model_type}-{plan_name}-{outtype}.gguf"
            cache[key] = (export_gguf_from_hf(model, tokenizer, plan, out, outtype=outtype), plan)
        return cache[key]

    return get


def llama_logits(path, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits `[T, V]` at every position of `ids`."""
    from llama_cpp import Llama

    with contextlib.redirect_stderr(io.StringIO()):
        llm = Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=1, verbose=False, seed=0)
    llm.eval(ids)
    logits = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    llm.close()
    return logits


def kl_per_position(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) at every position, `[T]`, through torch.distributions."""
    p = torch.distributions.Categorical(logits=reference.double())
    q = torch.distributions.Categorical(logits=other.double())
    return torch.distributions.kl_divergence(p, q)


def prompt_ids(tokenizer) -> list[int]:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)[:8]
    assert 4 <= len(ids) <= 8
    return ids


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("plan_name", ["one", "two"])
def test_read_back(exports, bases, model_type, plan_name):
    from gguf import GGUFReader

    path, plan = exports(model_type, plan_name)
    model, _ = bases(model_type)
    reader = GGUFReader(path)
    arch = SUPPORTED_HF_ARCHS[model_type].gguf_arch
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field("general.architecture") == arch
    assert field(f"{arch}.block_count") == len(plan.order)
    assert field("rys.order") == list(plan.order)
    assert reader.get_field("rys.order").types[-1].name == "UINT32"  # as gguf_export writes it
    assert field("rys.scales") == [1.0] * len(plan.order) and field("rys.base_model") == model.config._name_or_path
    assert field("rys.base_block_count") == 6
    assert read_gguf_plan(path) == plan
    per_block = {t.name.split(".", 2)[2] for t in reader.tensors if t.name.startswith("blk.0.")}
    others = [t.name for t in reader.tensors if not t.name.startswith("blk.")]
    assert sorted(others) == ["output.weight", "output_norm.weight", "token_embd.weight"]
    assert len(reader.tensors) == len(others) + len(per_block) * len(plan.order)
    layers = model.model.layers
    for n, k in enumerate(plan.order):
        norm = reader.get_tensor(next(i for i, t in enumerate(reader.tensors) if t.name == f"blk.{n}.attn_norm.weight"))
        np.testing.assert_array_equal(np.asarray(norm.data), layers[k].input_layernorm.weight.detach().numpy())
    assert all(t.tensor_type.name == "F32" for t in reader.tensors)


@needs_llamacpp
@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_llamacpp_matches_in_memory_repeat(exports, bases, model_type, plan_name):
    path, plan = exports(model_type, plan_name)
    model, tokenizer = bases(model_type)
    ids = prompt_ids(tokenizer)
    with torch.no_grad(), repeated(model, plan):
        reference = model(torch.tensor([ids])).logits[0]
    kl = kl_per_position(reference, llama_logits(path, ids))
    assert kl.max().item() <= KL_MAX_F32, f"{model_type} {plan_name}: max KL {kl.max().item():.3g}"
    if plan_name == "identity":  # and the plain model, without the repeat machinery
        with torch.no_grad():
            plain = model(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(plain, reference, rtol=0, atol=0)


@needs_llamacpp
def test_repeat_is_not_the_base(exports, bases):
    """The check above can tell plans apart: llama.cpp on the two-window export is far from the plain model."""
    path, _ = exports("llama", "two")
    model, tokenizer = bases("llama")
    ids = prompt_ids(tokenizer)
    with torch.no_grad():
        plain = model(torch.tensor([ids])).logits[0]
    assert kl_per_position(plain, llama_logits(path, ids)).max().item() > 100 * KL_MAX_F32


@needs_llamacpp
def test_llama_needs_the_qk_permutation(bases, tmp_path, monkeypatch):
    """Written without llama.cpp's q/k permutation, a llama export is measurably wrong (so the rule matters)."""
    model, tokenizer = bases("llama")
    plan = make_plan("one")
    monkeypatch.setitem(SUPPORTED_HF_ARCHS, "llama", HfGgufArch("llama", False))
    path = export_gguf_from_hf(model, tokenizer, plan, tmp_path / "unpermuted.gguf", outtype="f32")
    ids = prompt_ids(tokenizer)
    with torch.no_grad(), repeated(model, plan):
        reference = model(torch.tensor([ids])).logits[0]
    assert kl_per_position(reference, llama_logits(path, ids))[1:].max().item() > 100 * KL_MAX_F32


@needs_llamacpp
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_f16(exports, bases, model_type):
    from gguf import GGUFReader

    path, plan = exports(model_type, "one", "f16")
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    model, tokenizer = bases(model_type)
    ids = prompt_ids(tokenizer)
    with torch.no_grad(), repeated(model, plan):
        reference = model(torch.tensor([ids])).logits[0]
    assert kl_per_position(reference, llama_logits(path, ids)).max().item() <= KL_MAX_F16


@needs_llamacpp
def test_tied_embeddings(bases, tmp_path):
    """A tied model has no output.weight; llama.cpp falls back to the embedding and still matches."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    base, tokenizer = bases("qwen2")
    config = base.config.__class__.from_dict({**base.config.to_dict(), "tie_word_embeddings": True})
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15)
    plan = make_plan("one")
    path = export_gguf_from_hf(model, tokenizer, plan, tmp_path / "tied.gguf", outtype="f32")
    assert "output.weight" not in {t.name for t in GGUFReader(path).tensors}
    ids = prompt_ids(tokenizer)
    with torch.no_grad(), repeated(model, plan):
        reference = model(torch.tensor([ids])).logits[0]
    assert kl_per_position(reference, llama_logits(path, ids)).max().item() <= KL_MAX_F32


def variant(base, **changes):
    """A model like `base` with config `changes` and the same weights."""
    from transformers import AutoModelForCausalLM

    config = base.config.__class__.from_dict({**base.config.to_dict(), **changes})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    model.load_state_dict(base.state_dict())
    return model


@needs_llamacpp
def test_llama3_rope_scaling(bases, tmp_path):
    """Llama-3 rope scaling is written as `rope_freqs.weight` (the convert script's way) and llama.cpp matches;
    the scaling is visible at these positions (the unscaled model is far off)."""
    base, tokenizer = bases("llama")
    rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=64, rope_theta=10000.0)
    model = variant(base, rope_parameters=rope)
    plan = make_plan("one")
    path = export_gguf_from_hf(model, tokenizer, plan, tmp_path / "rope.gguf", outtype="f32")
    ids = prompt_ids(tokenizer)
    with torch.no_grad(), repeated(model, plan):
        reference = model(torch.tensor([ids])).logits[0]
    with torch.no_grad(), repeated(base, plan):
        unscaled = base(torch.tensor([ids])).logits[0]
    assert kl_per_position(reference, llama_logits(path, ids)).max().item() <= KL_MAX_F32
    assert kl_per_position(reference, unscaled).max().item() > 100 * KL_MAX_F32


def test_refuses_other_rope_scaling(bases, tmp_path):
    base, tokenizer = bases("llama")
    model = variant(base, rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0))
    with pytest.raises(UsageError, match="rope scaling 'linear'"):
        export_gguf_from_hf(model, tokenizer, make_plan("one"), tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


@needs_llamacpp
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_llamacpp_tokenizes_like_transformers(exports, bases, model_type):
    from llama_cpp import Llama

    path, _ = exports(model_type, "one")
    _, tokenizer = bases(model_type)
    with contextlib.redirect_stderr(io.StringIO()):
        llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in [TEXT, "def add(a, b):\n    return a + b", "2 + 2 = 4, and 10 / 4 = 2.5"]:
        expected = tokenizer.encode(text, add_special_tokens=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == expected, text
    assert llm.token_bos() == tokenizer.bos_token_id and llm.token_eos() == tokenizer.eos_token_id
    llm.close()


def test_refuses_unsupported_architecture(bases, tmp_path):
    model, tokenizer = bases("phi3")
    with pytest.raises(UnsupportedArchitectureError) as info:
        export_gguf_from_hf(model, tokenizer, make_plan("one"), tmp_path / "x.gguf")
    message = str(info.value)
    assert "\n" not in message and all(name in message for name in ("llama", "mistral", "qwen2", "phi3"))
    assert not (tmp_path / "x.gguf").exists()


def test_refuses_damped_plan_and_bad_options(bases, tmp_path):
    model, tokenizer = bases("llama")
    damped = LayerPlan.from_windows(["2:4"], 6, alpha=0.5)
    cases = [(damped, "f16", "residual scale"), (make_plan("one"), "q4_0", "f32, f16"),
             (LayerPlan.from_windows(["2:4"], 8), "f16", "8 layers")]
    for plan, outtype, words in cases:
        with pytest.raises(UsageError) as info:
            export_gguf_from_hf(model, tokenizer, plan, tmp_path / "x.gguf", outtype=outtype)
        assert "\n" not in str(info.value) and words in str(info.value)
    with pytest.raises(UsageError, match="applied in memory"), repeated(model, make_plan("one")):
        export_gguf_from_hf(model, tokenizer, make_plan("one"), tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_refuses_non_bpe_tokenizer(bases, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model, _ = bases("llama")
    wordlevel = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    with pytest.raises(UsageError, match="byte-level BPE") as info:
        export_gguf_from_hf(model, wordlevel, make_plan("one"), tmp_path / "x.gguf")
    assert "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())


def test_sliding_window_models_are_refused(tmp_path):
    """A model whose sliding window is on cannot be written (llama.cpp would run it with full attention)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny_model("qwen2", tmp_path / "qwen2")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with pytest.raises(UnsupportedArchitectureError, match="sliding-window attention"):
        export_gguf_from_hf(model, AutoTokenizer.from_pretrained(folder), LayerPlan.from_windows(["2:4"], 6),
                            tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_build_gguf_from_a_transformers_base_verifies_and_publishes(tmp_path):
    """`build --format gguf` from a tiny llama folder (two windows): a float32 GGUF that verify passes (KL 0 through
    transformers' GGUF loader; llama.cpp within LLAMACPP_KL_MAX_FLOAT where installed); a flipped bit makes publish
    refuse it."""
    import json

    from click.testing import CliRunner

    from rys_forge.cli import main
    from rys_forge.gguf_file import LLAMACPP_KL_MAX_FLOAT

    base = make_tiny_model("llama", tmp_path / "llama")
    out = tmp_path / "export"
    runner = CliRunner()
    result = runner.invoke(main, ["build", "-m", str(base), "--window", "1:3", "--window", "4:6", "--format", "gguf",
                                  "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "verification.json").read_text())
    record = json.loads((out / "rys.json").read_text())
    assert report["passed"] and report["metrics"]["kl_max"] <= 1e-6 and report["metrics"]["generate_equals_in_memory"]
    assert record["gguf_source"] == "transformers" and record["outtype"] == "f32"
    gguf = out / record["gguf_file"]
    assert read_gguf_plan(gguf) == LayerPlan.from_windows(["1:3", "4:6"], 6)
    if llamacpp_available():
        assert report["metrics"]["llamacpp_kl_max"] <= LLAMACPP_KL_MAX_FLOAT and "llamacpp_kl_ratio" not in report["metrics"]
    with gguf.open("r+b") as handle:
        handle.seek(gguf.stat().st_size - 5)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x01]))
    refused = runner.invoke(main, ["publish", str(out), "--repo-id", "me/x", "--dry-run"])
    assert refused.exit_code != 0 and "changed since verification" in refused.output
