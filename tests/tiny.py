"""Tiny random causal LMs built from real architecture configs, saved with a byte-level BPE tokenizer.

Every architecture in rys-forge's table gets one (hidden 32, 6-8 layers). Sliding-window models use a
window of 8 tokens so that test prompts longer than that really exercise sliding attention.
"""

from __future__ import annotations

from pathlib import Path

import torch

SLIDING_WINDOW = 8
VOCAB_SIZE = 320

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Repeat your self: run a block of layers twice and see what happens.",
    "def add(a, b):\n    return a + b",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "2 + 2 = 4, 3 * 7 = 21, and 10 / 4 = 2.5",
    "Residual streams, layer windows, and linear CKA between activations.",
]

ARCH_CONFIGS: dict[str, dict] = {
    "llama": dict(num_hidden_layers=6),
    "mistral": dict(num_hidden_layers=6, sliding_window=SLIDING_WINDOW),
    "qwen2": dict(num_hidden_layers=6, use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=3),
    "qwen3": dict(
        num_hidden_layers=6, use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=2, head_dim=8
    ),
    "gemma2": dict(num_hidden_layers=6, sliding_window=SLIDING_WINDOW, head_dim=8, query_pre_attn_scalar=8),
    "gemma3_text": dict(
        num_hidden_layers=8,
        sliding_window=SLIDING_WINDOW,
        head_dim=8,
        query_pre_attn_scalar=8,
        layer_types=["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3 + ["full_attention"],
    ),
    "phi3": dict(num_hidden_layers=6, sliding_window=SLIDING_WINDOW, pad_token_id=0),
}

MODEL_TYPES = tuple(ARCH_CONFIGS)


def make_tokenizer(folder: Path):
    """Train a small byte-level BPE tokenizer and wrap it as a transformers fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_CORPUS * 4, vocab_size=VOCAB_SIZE - 4, min_frequency=1, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    return tokenizer


def make_tiny_model(model_type: str, folder: Path, seed: int = 0) -> Path:
    """Build, save and return the folder of a tiny random model of `model_type`."""
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING

    folder = Path(folder)
    tokenizer = make_tokenizer(folder)
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=model_type.startswith("gemma"),
    )
    kwargs.update(ARCH_CONFIGS[model_type])
    config = CONFIG_MAPPING[model_type](**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    # Random init is tiny by default; scale the residual writers up a little so that layers move the
    # stream visibly and the repeat makes a measurable difference.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.normal_(0.0, 0.15)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
