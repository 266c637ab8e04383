"""GGUF export of a LayerPlan from a transformers (safetensors) base: one f32 or f16 GGUF for llama.cpp.

Where `gguf_export` copies a GGUF base's blocks byte for byte, this writes a new GGUF from a loaded float32
transformers model through the gguf library's `GGUFWriter`, following llama.cpp's `convert_hf_to_gguf.py` for the
architectures whose conversion is a plain rename (`SUPPORTED_HF_ARCHS`): the block tensors of visit `n` come from
base layer `order[n]` (`model.layers.{order[n]}.*` -> `blk.{n}.*`, names through `gguf.get_tensor_name_map`); for
the `llama` GGUF architecture (llama, mistral) q_proj / k_proj are permuted into llama.cpp's rotary layout
(`LlamaModel.permute`), qwen2 is written as is. 1-D tensors are f32, matrices `outtype`; tied embeddings have no
`output.weight`. The tokenizer must be a byte-level BPE (written as `tokenizer.ggml.model = gpt2`).

Like the convert script, sliding-window settings (mistral's `sliding_window`, qwen2's `use_sliding_window`) are not
written: llama.cpp runs these architectures with full attention. The `rys.*` keys follow `gguf_export`, with
`rys.base_model` (the transformers source) in place of the base file's sha256. Usage:

    export_gguf_from_hf(loaded.model, loaded.tokenizer, plan, Path("out/model-rys.gguf"), outtype="f16")
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from rys_forge.gguf_file import rys_keys
from rys_forge.errors import OutputError, UnsupportedArchitectureError, UsageError, output_problem
from rys_forge.plan import LayerPlan
from rys_forge.repeat import applied_plan_active
from rys_forge.surgery.gguf_export import plan_label


@dataclass(frozen=True)
class HfGgufArch:
    """How one transformers `model_type` converts: its GGUF architecture and whether q/k are permuted."""

    gguf_arch: str
    permute_qk: bool


#: transformers `model_type` -> conversion rule (llama.cpp's convert script: LlamaModel, Qwen2Model).
SUPPORTED_HF_ARCHS: dict[str, HfGgufArch] = {
    "llama": HfGgufArch("llama", True),
    "mistral": HfGgufArch("llama", True),
    "qwen2": HfGgufArch("qwen2", False),
}
OUTTYPES = ("f32", "f16")

#: llama.cpp's pre-tokenizer probe (`get_vocab_base_pre`): the sha256 of the token ids of this text names the
#: pre-tokenizer. Only the entries of the supported families are kept here.
_CHKTXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b'
    '\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 33333'
    '33 33333333 3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f'
    '\u17a2\u17b6\u1785\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======='
    " \u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 ''''"
    '\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll'
    " make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
}
_LETTERS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
#: The `Split` regex of a tokenizer.json pre-tokenizer -> llama.cpp's pre-tokenizer with that split.
KNOWN_SPLIT_REGEXES: dict[str, str] = {
    _LETTERS + r"|\p{N}" + _REST: "qwen2",
    _LETTERS + r"|\p{N}{1,3}" + _REST: "llama-bpe",
}


def hf_arch(model: nn.Module) -> HfGgufArch:
    """The conversion rule of `model`'s `model_type`.

    Raises:
        UnsupportedArchitectureError: a `model_type` outside `SUPPORTED_HF_ARCHS`, or sliding-window attention.
    """
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_HF_ARCHS:
        raise UnsupportedArchitectureError(
            f"GGUF export from a transformers base supports {', '.join(SUPPORTED_HF_ARCHS)}, got '{model_type}';"
            " convert the base with llama.cpp's convert_hf_to_gguf.py and export from that .gguf"
        )
    window = getattr(config, "sliding_window", None)
    if window and (model_type != "qwen2" or getattr(config, "use_sliding_window", False)):
        raise UnsupportedArchitectureError(
            f"this {model_type} model uses sliding-window attention (window {window}), which a GGUF written for"
            " llama.cpp cannot express (it runs these models with full attention); export --format layerlist"
        )
    return SUPPORTED_HF_ARCHS[model_type]


def _permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute`: rotary halves `[h, 2, d/2]` interleaved as `[h, d/2, 2]` (rows of q or k)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _rope(config: Any) -> tuple[float, dict[str, Any]]:
    """The rope base and scaling dict of `config` (transformers 4.x `rope_theta`/`rope_scaling`, or 5.x
    `rope_parameters`)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0), params


def _llama3_rope_freqs(params: dict[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """`rope_freqs.weight` of a llama3-scaled rope (the convert script's `generate_extra_tensors`), `[head_dim/2]`."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_ctx = params.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _pre_tokenizer(tokenizer: Any, spec: dict[str, Any]) -> str:
    """`tokenizer.ggml.pre`: llama.cpp's name for a known probe hash; else by structure (a plain GPT-2 byte-level
    split is `gpt-2`, a known family's split regex that family); else `default` (llama.cpp's generic regex), with a
    warning since text may split differently."""
    digest = sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
    if digest in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[digest]
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not spec.get("normalizer"):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    regex = next((s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"), None)
    if regex in KNOWN_SPLIT_REGEXES:  # a known family's split on a vocabulary the hash table cannot know
        return KNOWN_SPLIT_REGEXES[regex]
    warnings.warn(f"unknown BPE pre-tokenizer (hash {digest[:12]}); writing tokenizer.ggml.pre = default, so"
                  " llama.cpp may split text differently from transformers (token ids given directly are exact)")
    return "default"


def _vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int], str]:
    """Tokens in id order (`[PAD{i}]` fillers up to the model's `vocab_size`), their llama.cpp token types and
    the pre-tokenizer name: the convert script's `get_vocab_base` for byte-level BPE tokenizers.

    Raises:
        UsageError: not a fast byte-level BPE tokenizer, or token ids past the model's vocabulary.
    """
    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else {}
    if (spec.get("model") or {}).get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UsageError("GGUF export from a transformers base needs a byte-level BPE tokenizer (tokenizer.json, gpt2"
                         f" style), got {type(tokenizer).__name__}; convert with llama.cpp's convert_hf_to_gguf.py")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UsageError(f"tokenizer has token id {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        kind = TokenType.NORMAL
        if token in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalised
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            kind = TokenType.CONTROL if decoder[i].special else TokenType.USER_DEFINED
        tokens.append(token)
        types.append(kind)
    return tokens, types, _pre_tokenizer(tokenizer, spec)


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """The `tokenizer.ggml.*` keys: model `gpt2`, tokens, types, merges and special ids (`gguf.SpecialVocab` on a
    saved copy of the tokenizer, so hub ids and in-memory tokenizers work alike)."""
    from gguf import SpecialVocab

    tokens, types, pre = _vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="rys-forge-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        SpecialVocab(Path(folder), load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _add_hparams(writer: Any, config: Any, arch: HfGgufArch, block_count: int, file_type: int) -> None:
    """The `{arch}.*` hyperparameters as `convert_hf_to_gguf.py` writes them (`TextModel.set_gguf_parameters`,
    plus `LlamaModel`'s vocab size and rope dimension count)."""
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    theta, _ = _rope(config)
    writer.add_block_count(block_count)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if getattr(config, "head_dim", None) is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch.gguf_arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(file_type)


def _add_rys_keys(writer: Any, plan: LayerPlan, base_name: str, base_model: str) -> None:
    """The `rys.*` keys (`gguf_file.rys_keys`), `rys.base_model` in place of a base file's sha256."""
    for key, value in rys_keys(plan, base_name, base_model=base_model).items():
        writer.add_key_value(key, *value)


def _tensors(model: nn.Module, plan: LayerPlan, arch: HfGgufArch) -> Iterator[tuple[str, torch.Tensor, int]]:
    """`(GGUF name, base tensor, heads)` of every tensor of the export, in file order: embeddings, the blocks of every
    visit (`blk.{n}.*` from base layer `order[n]`), final norm, output (unless tied). `heads` > 0: permute the
    rows with that head count when writing (llama's q/k; done late so that no visit's copy is held).

    Raises:
        UnsupportedArchitectureError: a parameter the gguf name map does not know.
    """
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    config = model.config
    gguf_arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == arch.gguf_arch)
    names = get_tensor_name_map(gguf_arch, len(plan.order))
    params = dict(model.named_parameters())
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    layers: dict[int, list[tuple[str, torch.Tensor]]] = {}
    rest: list[tuple[str, torch.Tensor]] = []
    for name, param in params.items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"] and parts[2].isdigit():
            layers.setdefault(int(parts[2]), []).append((".".join(parts[3:]), param))
        elif not (name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False)):
            rest.append((name, param))

    def mapped(hf_name: str) -> str:
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UnsupportedArchitectureError(
                f"tensor '{hf_name}' has no GGUF name for architecture {arch.gguf_arch}; not a plain"
                f" {config.model_type} checkpoint")
        return gguf_name

    yield from ((mapped(n), p, 0) for n, p in rest if "embed_tokens" in n)
    for n, k in enumerate(plan.order):
        for suffix, param in layers[k]:
            heads = {"self_attn.q_proj": n_head, "self_attn.k_proj": n_kv}.get(suffix.rsplit(".", 1)[0], 0)
            yield mapped(f"model.layers.{n}.{suffix}"), param, heads if arch.permute_qk else 0
    yield from ((mapped(n), p, 0) for n, p in rest if "embed_tokens" not in n)


def _check(model: nn.Module, plan: LayerPlan, outtype: str) -> HfGgufArch:
    """What the export needs before anything is written; returns the conversion rule.

    Raises:
        UsageError: a damped plan, an unknown outtype, a plan for another layer count, an applied plan, an
            unsupported rope scaling.
        UnsupportedArchitectureError: a `model_type` outside `SUPPORTED_HF_ARCHS`.
    """
    arch = hf_arch(model)
    if plan.scaled:
        raise UsageError("GGUF has no per-visit residual scale, so a damped plan (scales != 1) cannot be exported to"
                         " GGUF; use --format layerlist, or a plan with alpha 1")
    if outtype not in OUTTYPES:
        raise UsageError(f"outtype '{outtype}' is not supported; use one of {', '.join(OUTTYPES)}")
    if applied_plan_active(model):
        raise UsageError("the model has a plan applied in memory; export from the plain base model")
    layers = model.config.num_hidden_layers
    if plan.num_layers != layers:
        raise UsageError(f"plan is for {plan.num_layers} layers but the model has {layers}")
    rope_type = _rope(model.config)[1].get("rope_type", "default")
    if rope_type not in ("default", "llama3") or (rope_type == "llama3" and arch.gguf_arch != "llama"):
        raise UsageError(f"rope scaling '{rope_type}' is not supported by the GGUF export from a transformers base;"
                         " convert with llama.cpp's convert_hf_to_gguf.py")
    return arch


def export_gguf_from_hf(model: nn.Module, tokenizer: Any, plan: LayerPlan, out_file: Path, outtype: str = "f16",
                        base_model: str | None = None) -> Path:
    """Write the RYS GGUF of `plan` over a transformers model to `out_file` (via a temporary sibling).

    Args:
        model: a loaded causal LM of a `SUPPORTED_HF_ARCHS` type, without a plan applied (any float dtype; the
            tensors are converted from float32).
        tokenizer: its fast byte-level BPE tokenizer.
        plan: the plan; its `num_layers` must be the model's layer count and every scale 1.
        out_file: the file to write (replaced if it exists).
        outtype: `f16` (matrices in float16, 1-D tensors float32, like the convert script) or `f32`.
        base_model: the base's source, recorded as `rys.base_model` (default: the config's `_name_or_path`).

    Returns:
        `out_file`.

    Raises:
        UsageError: a damped plan, an unknown outtype, a plan for another layer count, a tokenizer that is not
            byte-level BPE, an unsupported rope scaling.
        UnsupportedArchitectureError: a `model_type` outside `SUPPORTED_HF_ARCHS`, or an unmapped tensor.
        OutputError: `out_file` cannot be written.
    """
    from gguf import GGUFWriter, LlamaFileType

    arch = _check(model, plan, outtype)
    out_file = Path(out_file)
    problem = output_problem(out_file)
    if problem:
        raise OutputError(problem)
    config = model.config
    source = base_model or str(getattr(config, "_name_or_path", "") or config.model_type)
    base_name = Path(source.rstrip("/")).name or config.model_type
    dtype = np.float16 if outtype == "f16" else np.float32
    file_type = LlamaFileType.MOSTLY_F16 if outtype == "f16" else LlamaFileType.ALL_F32

    tensors = list(_tensors(model, plan, arch))
    theta, rope = _rope(config)
    if rope.get("rope_type") == "llama3":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        tensors.insert(0, ("rope_freqs.weight", torch.from_numpy(_llama3_rope_freqs(rope, theta, head_dim)), 0))
    # The convert script's rule: 1-D tensors and norms stay float32 (llama.cpp's kernels expect it).
    kinds = [np.float32 if t.dim() <= 1 or name.endswith("_norm.weight") else dtype for name, t, _ in tensors]

    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(tmp, arch.gguf_arch)
    try:
        writer.add_name(f"{base_name}-RYS-{plan_label(plan)}")
        _add_hparams(writer, config, arch, len(plan.order), int(file_type))
        _add_tokenizer(writer, tokenizer, config.vocab_size)
        _add_rys_keys(writer, plan, base_name, source)
        for (name, tensor, _), kind in zip(tensors, kinds):
            # Only the metadata now; each tensor is converted as it is written, so memory stays near one tensor.
            writer.add_tensor_info(name, tuple(tensor.shape), np.dtype(kind), tensor.numel() * np.dtype(kind).itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (_, tensor, heads), kind in zip(tensors, kinds):
            data = tensor.detach().float().cpu()
            writer.write_tensor_data((_permute(data, heads) if heads else data).numpy().astype(kind))
        writer.close()
        os.replace(tmp, out_file)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out_file
