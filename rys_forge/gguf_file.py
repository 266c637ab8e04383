"""RYS GGUF files: read their metadata and plan, compare them with their base, and run them.

A RYS GGUF (`surgery.gguf_export`) holds its base's blocks in the plan's visit order, copied byte for byte, with
`{arch}.block_count` and every per-layer array remapped and the plan recorded under `rys.*` (`rys.plan`, the
`LayerPlan.to_dict` JSON, is the source of truth). This module is what `verify` and `build` share:

* `compare_gguf_tensors`: metadata and tensor bytes against the base (no model run);
* `load_gguf_dequantised`: transformers' dequantising loader, with the file's per-layer sliding-window pattern
  applied (the loader ignores that key; llama.cpp reads it);
* `check_gguf_llamacpp`: llama.cpp itself (llama-cpp-python) on the export against the in-memory repeat of the
  dequantised base, beside llama.cpp on the base (its quantisation floor).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from rys_forge.artifacts import rys_forge_version
from rys_forge.errors import UsageError, VerificationError
from rys_forge.files import sha256_file
from rys_forge.plan import LayerPlan

BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

#: GGUF architectures the export knows, with llama.cpp's default sliding-window period for those that derive
#: sliding/full attention from the layer index (0: uniform layers, nothing to remap beyond the metadata arrays).
GGUF_SWA_PERIODS: dict[str, int] = {"llama": 0, "qwen2": 0, "qwen3": 0, "phi3": 0, "gemma2": 2, "gemma3": 6}

#: llama.cpp check: the export's mean KL to the in-memory repeat may be at most this factor times llama.cpp's own
#: quantisation floor on the base (plus `LLAMACPP_KL_SLACK`). llama.cpp quantises activations in every quantised
#: dot product, so its error grows with the layers run: a RYS model runs more of them (measured on both built-ins,
#: mean over `CHECK_TEXTS`: 1.52-1.78x the base's floor with the tensors proven byte-identical, and an identity
#: plan's export runs bitwise like its base). A wrong sliding-window pattern, the one metadata error seen in
#: development, gave 3.4x and 11 of 16 greedy tokens; 2.5 sits between.
LLAMACPP_KL_FACTOR = 2.5
LLAMACPP_KL_SLACK = 1e-4
#: llama.cpp check of a GGUF written from float32 transformers weights (no quantisation floor): max KL per position.
#: Measured on tiny llama/mistral/qwen2 models at most 3.5e-7 (f32 tensors; llama.cpp's own f32 arithmetic).
LLAMACPP_KL_MAX_FLOAT = 1e-3

#: Structure check threshold: transformers dequantises both sides to the same fp32 weights.
STRUCTURE_KL_MAX = 1e-6
CHECK_TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "A syllogism: all men are mortal; Socrates is a man; therefore",
]


def base_gguf_path(model: str | Path) -> Path:
    """The GGUF file of a built-in model name or a `.gguf` path.

    Raises:
        UsageError: a safetensors folder or hub id (GGUF export copies quantised blocks from a GGUF base).
        ModelLoadError: a built-in whose package is missing, or a `.gguf` path that does not exist.
    """
    from rys_forge.errors import ModelLoadError
    from rys_forge.models import BUILTIN_MODELS

    name = str(model)
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name].gguf_path()
    if name.endswith(".gguf"):
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {name}")
        return path
    raise UsageError(
        f"GGUF export needs a GGUF base (a built-in model or a .gguf file), got '{name}'; convert it with llama.cpp's"
        " convert_hf_to_gguf.py first, or build --format layerlist / mergekit"
    )


def gguf_base_or_none(model: str | Path) -> Path | None:
    """`base_gguf_path` for a built-in name or `.gguf` path; None for anything else (a transformers folder or hub id).

    Raises:
        ModelLoadError: a built-in whose package is missing, or a `.gguf` path that does not exist.
    """
    name = str(model)
    return base_gguf_path(name) if name.endswith(".gguf") or _is_builtin(name) else None


def _is_builtin(name: str) -> bool:
    from rys_forge.models import BUILTIN_MODELS

    return name in BUILTIN_MODELS


def open_gguf(path: Path) -> Any:
    """A `gguf.GGUFReader` of `path`. Parsing takes ~15 s on gemma's 262k-entry vocabulary and a build or verify
    reads the same files several times, so the readers of the two files read last are kept, keyed by path, size,
    modification time and inode (a file rewritten or replaced since is parsed again)."""
    try:
        stat = Path(path).stat()
        return _cached_reader(str(Path(path).resolve()), (stat.st_size, stat.st_mtime_ns, stat.st_ino))
    except (ValueError, OSError, IndexError) as exc:
        raise VerificationError(f"{path} is not a readable GGUF file: {exc}") from None


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, identity: tuple[int, int, int]) -> Any:
    from gguf import GGUFReader

    return GGUFReader(path)


def gguf_field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return field.contents() if field is not None else None


def gguf_blocks(reader: Any, block_count: int) -> dict[int, list[Any]]:
    """Base tensors per block index, in file order; refuses blocks outside 0..block_count-1 or empty ones."""
    blocks: dict[int, list[Any]] = {k: [] for k in range(block_count)}
    for tensor in reader.tensors:
        match = BLOCK_RE.match(tensor.name)
        if match:
            k = int(match.group(1))
            if k not in blocks:
                raise UsageError(f"tensor {tensor.name} lies outside the file's {block_count} blocks; not supported")
            blocks[k].append(tensor)
    empty = [k for k, tensors in blocks.items() if not tensors]
    if empty:
        raise UsageError(f"the base GGUF has no tensors for block {empty[0]}")
    return blocks


def swa_pattern(reader: Any, arch: str, block_count: int) -> list[bool] | None:
    """The base's per-layer sliding-window flags as llama.cpp reads them (None: no sliding-window pattern)."""
    period = GGUF_SWA_PERIODS[arch]
    value = gguf_field(reader, f"{arch}.attention.sliding_window_pattern")
    if isinstance(value, list):
        return [bool(v) for v in value]
    if not period or not (gguf_field(reader, f"{arch}.attention.sliding_window") or 0) > 0:
        return None
    period = int(value) if value is not None else period
    return [period == 0 or k % period < period - 1 for k in range(block_count)]


def gguf_block_count(base_gguf: Path) -> int:
    """`{arch}.block_count` of a GGUF file (the `num_layers` of a plan over it)."""
    reader = open_gguf(Path(base_gguf))
    return int(gguf_field(reader, f"{gguf_field(reader, 'general.architecture')}.block_count"))


def extra_block_bytes(blocks: dict[int, list[Any]], order: tuple[int, ...]) -> int:
    """Bytes of the block tensors a visit order adds to its base (`gguf_blocks`): each block times (visits - 1)."""
    visits = Counter(order)
    return sum((visits[k] - 1) * sum(int(t.n_bytes) for t in tensors) for k, tensors in blocks.items())


def expected_extra_bytes(base_gguf: Path, plan: LayerPlan) -> int:
    """Tensor bytes the plan adds: each block's tensor bytes times (visits - 1), summed (before alignment padding)."""
    reader = open_gguf(Path(base_gguf))
    arch = gguf_field(reader, "general.architecture")
    return extra_block_bytes(gguf_blocks(reader, int(gguf_field(reader, f"{arch}.block_count"))), plan.order)


def rys_keys(plan: LayerPlan, base_name: str, **source: str) -> dict[str, tuple[Any, Any, Any]]:
    """The `rys.*` keys of a RYS GGUF, `key -> (value, type, sub_type)` for `GGUFWriter.add_key_value`: the plan
    (`rys.plan`, the source of truth, and its order, scales, windows and repeats), the base's block count and name,
    the rys-forge version, and `source` (`base_sha256=` for a GGUF base, `base_model=` for a transformers one)."""
    from gguf import GGUFValueType

    string, uint32, array = GGUFValueType.STRING, GGUFValueType.UINT32, GGUFValueType.ARRAY
    keys = {
        "rys.plan": (json.dumps(plan.to_dict()), string, None),
        "rys.order": ([int(k) for k in plan.order], array, uint32),
        "rys.scales": ([float(a) for a in plan.scales], array, GGUFValueType.FLOAT32),
        "rys.windows": (",".join(str(w) for w in plan.windows) or "explicit order", string, None),
        "rys.repeats": (plan.repeats, uint32, None),
        "rys.base_block_count": (plan.num_layers, uint32, None),
        "rys.base_name": (str(base_name), string, None),
    }
    keys.update({f"rys.{name}": (str(value), string, None) for name, value in source.items()})
    keys["rys.rys_forge_version"] = (rys_forge_version(), string, None)
    return keys


def read_gguf_plan(rys_gguf: Path) -> LayerPlan:
    """The plan recorded in a RYS GGUF (`rys.plan`).

    Raises:
        VerificationError: the file has no (valid) `rys.plan`.
    """
    return _recorded_plan(open_gguf(Path(rys_gguf)), Path(rys_gguf))


def _recorded_plan(reader: Any, rys_gguf: Path) -> LayerPlan:
    from rys_forge.errors import WindowError

    text = gguf_field(reader, "rys.plan")
    if not text:
        raise VerificationError(f"{rys_gguf} has no rys.plan key; it was not written by rys-forge's GGUF export")
    try:
        return LayerPlan.from_dict(json.loads(text))
    except (json.JSONDecodeError, WindowError) as exc:
        raise VerificationError(f"{rys_gguf}: invalid rys.plan: {exc}") from None


def _field_bytes(reader: Any, field: Any) -> np.ndarray:
    """The field's bytes in the file (key, type and value), as one memory-mapped slice."""
    return reader.data[field.offset : field.offset + sum(int(p.nbytes) for p in field.parts)]


def compare_gguf_tensors(rys_gguf: Path, base_gguf: Path) -> dict[str, float]:
    """Metadata and tensor bytes of a RYS GGUF against its base (fast; no model is run).

    Returns:
        `tensor_mismatches` (tensors missing, extra, or whose type, shape or bytes differ from the base tensor
        they copy), `metadata_mismatches` (block count, per-layer arrays, other keys), `base_sha256_match`
        (1.0 when the recorded `rys.base_sha256` is the base file's), `visits`, `tensors`.
    """
    from gguf import GGUFValueType

    rys_gguf, base_gguf = Path(rys_gguf), Path(base_gguf)
    new, base = open_gguf(rys_gguf), open_gguf(base_gguf)
    plan = _recorded_plan(new, rys_gguf)
    arch = str(gguf_field(base, "general.architecture"))
    block_count = int(gguf_field(base, f"{arch}.block_count"))
    order = list(plan.order)
    bad_meta = int(gguf_field(new, f"{arch}.block_count") != len(order)) + int(gguf_field(new, "rys.order") != order)
    for name, field in base.fields.items():
        if name.startswith(("GGUF.", "general.name", "rys.")) or name == f"{arch}.block_count":
            continue
        other = new.get_field(name)
        if other is None:
            bad_meta += 1
        elif name.startswith(f"{arch}.") and field.types[0] == GGUFValueType.ARRAY and len(field.data) == block_count:
            want = field.contents()
            bad_meta += int(other.contents() != [want[k] for k in order])
        elif not name.endswith("sliding_window_pattern"):  # checked below, in its expanded form
            bad_meta += int(not np.array_equal(_field_bytes(base, field), _field_bytes(new, other)))
    pattern_key = f"{arch}.attention.sliding_window_pattern"
    bad_meta += sum(1 for name in new.fields if name not in base.fields
                    and not name.startswith(("GGUF.", "rys.")) and name != pattern_key)
    pattern = swa_pattern(base, arch, block_count) if arch in GGUF_SWA_PERIODS else None
    if pattern is not None:
        got = gguf_field(new, pattern_key)
        bad_meta += int([bool(v) for v in got or []] != [pattern[k] for k in order])
    base_tensors = {t.name: t for t in base.tensors}
    wanted = {t.name: t for t in base.tensors if not BLOCK_RE.match(t.name)}
    for n, k in enumerate(order):
        for t in base.tensors:
            match = BLOCK_RE.match(t.name)
            if match and int(match.group(1)) == k:
                wanted[f"blk.{n}.{match.group(2)}"] = base_tensors[t.name]
    got_tensors = {t.name: t for t in new.tensors}
    bad_tensors = len(set(wanted) ^ set(got_tensors))
    for name in set(wanted) & set(got_tensors):
        a, b = wanted[name], got_tensors[name]
        same = a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape) and a.n_bytes == b.n_bytes
        bad_tensors += int(not (same and np.array_equal(np.asarray(a.data).view(np.uint8),
                                                        np.asarray(b.data).view(np.uint8))))
    return {
        "tensor_mismatches": float(bad_tensors),
        "metadata_mismatches": float(bad_meta),
        "base_sha256_match": float(gguf_field(new, "rys.base_sha256") == sha256_file(base_gguf)),
        "visits": float(len(order)),
        "tensors": float(len(got_tensors)),
    }


def _layer_types_from_gguf(reader: Any, arch: str) -> list[str] | None:
    pattern = gguf_field(reader, f"{arch}.attention.sliding_window_pattern")
    if not isinstance(pattern, list):
        return None
    return ["sliding_attention" if v else "full_attention" for v in pattern]


def load_gguf_dequantised(gguf_file: Path, dtype: Any = None, attn_implementation: str = "eager") -> Any:
    """transformers' dequantising GGUF loader on `gguf_file` (float32 unless `dtype`), with the file's per-layer
    sliding-window pattern applied to `config.layer_types` (the loader ignores that key; llama.cpp reads it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    gguf_file = Path(gguf_file)
    folder, name = str(gguf_file.parent), gguf_file.name
    reader = open_gguf(gguf_file)
    layer_types = _layer_types_from_gguf(reader, str(gguf_field(reader, "general.architecture")))
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the loader's per-tensor bar: noise in a command's output
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        if layer_types is not None and hasattr(config, "layer_types"):
            config.layer_types = layer_types
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=dtype or torch.float32,
                                                     attn_implementation=attn_implementation)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.eval()


def gguf_tokenizer(gguf_file: Path) -> Any:
    """The tokenizer stored in a GGUF file (transformers' GGUF tokenizer conversion)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(gguf_file).parent), gguf_file=Path(gguf_file).name)


def _kl_stats(reference: Any, other: Any) -> dict[str, float]:
    import torch

    from rys_forge.divergence import kl_from_logits

    kl = kl_from_logits(reference, other, dtype=torch.float64)
    return {"kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
            "top1": (reference.argmax(-1) == other.argmax(-1)).double().mean().item()}


def check_gguf_structure(rys_gguf: Path, base: str | Path, texts: list[str] | None = None,
                         expected_sha256: str | None = None) -> dict[str, float]:
    """The RYS GGUF against the in-memory repeat of the dequantised base.

    transformers loads the export (`load_gguf_dequantised`, fp32); its logits at every position of each text
    are compared with those of the base (`models.load_model`, the same dequantisation) under `repeated(plan)`.

    Args:
        rys_gguf: the export.
        base: the base (built-in name or `.gguf` path).
        texts: prompts (default `CHECK_TEXTS`).
        expected_sha256: the digest recorded when the file was written (`GgufExport.sha256`), if any.

    Returns:
        `compare_gguf_tensors`' numbers, plus `kl_mean`, `kl_max` (nats, float64 KL of fp32 logits),
        `max_abs_logit_diff`, `top1`, `sha256_match` (when `expected_sha256` is given) and `passed` (1.0/0.0:
        no mismatch, base and file digests match, `kl_max <= STRUCTURE_KL_MAX`).
    """
    import torch

    from rys_forge.models import load_model
    from rys_forge.repeat import repeated

    rys_gguf = Path(rys_gguf)
    metrics = compare_gguf_tensors(rys_gguf, base_gguf_path(base))
    if expected_sha256 is not None:
        metrics["sha256_match"] = float(sha256_file(rys_gguf) == expected_sha256)
    plan = read_gguf_plan(rys_gguf)
    loaded = load_model(str(base))
    exported = load_gguf_dequantised(rys_gguf)
    stats: list[dict[str, float]] = []
    diffs = []
    with torch.no_grad():
        for text in texts or CHECK_TEXTS:
            ids = loaded.tokenizer(text, return_tensors="pt").input_ids
            with repeated(loaded.model, plan):
                ref = loaded.model(ids, use_cache=False).logits.float()[0]
            got = exported(ids, use_cache=False).logits.float()[0]
            stats.append(_kl_stats(ref, got))
            diffs.append((ref - got).abs().max().item())
    metrics.update(kl_mean=float(np.mean([s["kl_mean"] for s in stats])), kl_max=max(s["kl_max"] for s in stats),
                   max_abs_logit_diff=max(diffs), top1=float(np.mean([s["top1"] for s in stats])))
    ok = (metrics["tensor_mismatches"] == 0 and metrics["metadata_mismatches"] == 0
          and metrics["base_sha256_match"] == 1 and metrics.get("sha256_match", 1.0) == 1
          and metrics["kl_max"] <= STRUCTURE_KL_MAX)
    metrics["passed"] = float(ok)
    return metrics


def llamacpp_available() -> bool:
    """Whether llama-cpp-python (`import llama_cpp`) is installed."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _llama(path: Path, n_ctx: int = 256) -> Any:
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=max(1, min(4, os.cpu_count() or 1)),
                 verbose=False, seed=0)


def _llama_logits(llm: Any, ids: list[int]) -> Any:
    """llama.cpp's logits at every position of `ids`, `[T, V]` float32 (a fresh context each call)."""
    import torch

    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def _llama_greedy(llm: Any, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def _matching_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_gguf_llamacpp(rys_gguf: Path, base: Any, texts: list[str] | None = None,
                        greedy_tokens: int = 16, floor: bool = True) -> dict[str, float]:
    """llama.cpp (llama-cpp-python) on the export against the in-memory repeat of the dequantised base, beside
    llama.cpp on the base against the dequantised base (the quantisation floor: llama.cpp quantises activations
    in its dot products, so that KL is not 0). The export adds no error of its own when the two are alike.

    Returns:
        `kl_mean`/`kl_max`/`top1` (RYS GGUF in llama.cpp vs in-memory repeat), `floor_kl_mean`/`floor_kl_max`/
        `floor_top1` (base GGUF in llama.cpp vs dequantised base), `kl_ratio` (kl_mean / floor_kl_mean),
        `greedy_match` / `floor_greedy_match` (mean length of the matching prefix of `greedy_tokens` greedy
        tokens), `greedy_tokens`. Without `floor` (an export written from transformers weights: no base GGUF)
        the `floor_*` numbers and `kl_ratio` are left out.

    Raises:
        UsageError: llama-cpp-python is not installed.
    """
    if not llamacpp_available():
        raise UsageError("the llama.cpp check needs llama-cpp-python: pip install llama-cpp-python")
    import torch

    from rys_forge.models import LoadedModel, load_model
    from rys_forge.repeat import repeated

    plan = read_gguf_plan(rys_gguf)
    loaded = base if isinstance(base, LoadedModel) else load_model(str(base))
    model, tokenizer = loaded.model, loaded.tokenizer
    rows: dict[str, list[dict[str, float]]] = {"rys": [], "floor": []}
    greedy: dict[str, list[int]] = {"rys": [], "floor": []}
    runs = [("rys", Path(rys_gguf))] + ([("floor", base_gguf_path(loaded.source))] if floor else [])
    for key, path in runs:
        llm = _llama(path)
        for text in texts or CHECK_TEXTS:
            ids = tokenizer(text, return_tensors="pt").input_ids
            with torch.no_grad(), (repeated(model, plan) if key == "rys" else contextlib.nullcontext()):
                ref = model(ids, use_cache=False).logits.float()[0]
                want = model.generate(ids, max_new_tokens=greedy_tokens, do_sample=False, num_beams=1)[0, ids.shape[1]:]
            got = _llama_logits(llm, ids[0].tolist())
            vocab = min(ref.shape[-1], got.shape[-1])
            rows[key].append(_kl_stats(ref[:, :vocab], got[:, :vocab]))
            greedy[key].append(_matching_prefix(want.tolist(), _llama_greedy(llm, ids[0].tolist(), greedy_tokens)))
        llm.close()
    out: dict[str, float] = {}
    for key, prefix in (("rys", ""), ("floor", "floor_"))[: len(runs)]:
        out[f"{prefix}kl_mean"] = float(np.mean([r["kl_mean"] for r in rows[key]]))
        out[f"{prefix}kl_max"] = max(r["kl_max"] for r in rows[key])
        out[f"{prefix}top1"] = float(np.mean([r["top1"] for r in rows[key]]))
        out[f"{prefix}greedy_match"] = float(np.mean(greedy[key]))
    if floor:
        out["kl_ratio"] = out["kl_mean"] / out["floor_kl_mean"] if out["floor_kl_mean"] > 0 else float("inf")
    out["greedy_tokens"] = float(greedy_tokens)
    return out
