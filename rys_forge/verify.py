"""Verification: an exported checkpoint must compute exactly what the in-memory repeat of its base does.

On a prompt set, with the same device and dtype: KL(in-memory repeat || reloaded export) per token
(mean, max), max abs logit difference, top-1 agreement; the export's incremental decoding with the KV
cache against its full forward; greedy generation with the cache equal to generation without it and to
the in-memory repeat's; and the stored weight bytes against the base's. The report, with a sha256 of
every file of the export, goes to `verification.json` (`artifacts.write_verification`); `publish` and `eval`
refuse folders whose files no longer match it (`artifacts.check_verified`).

Nothing of the folder runs before `artifacts.check_export` passed (regular files only, no code but the
`modeling_rys.py` rys-forge generates, byte for byte), and the files are hashed before the export is loaded, so
a report never vouches for edited code. Every threshold is compared through `within` / `at_least`, where NaN
and inf fail: a base with NaN weights does not pass.

GGUF exports (`build --format gguf`: one `.gguf` file and `rys.json`) are verified in float32 with the same
metrics, the file loaded by transformers' dequantising GGUF loader (`gguf_file.load_gguf_dequantised`), plus two
checks of their own: every tensor and metadata value against the base GGUF (`compare_gguf_tensors`: the blocks
byte for byte in plan order, the recorded base sha256), and, where llama-cpp-python is installed, llama.cpp itself
on the file (`check_gguf_llamacpp`): its mean KL to the in-memory repeat within `LLAMACPP_KL_FACTOR` times
llama.cpp's own quantisation floor on the base.

Adapters: an export built with `--adapter` records it (`rys.adapter`); the base is loaded with the same adapter
merged in, and a recorded local adapter whose files changed since is refused. A healed layer-list export
(`DIR/heal`, see `rys_forge.heal`) is checked with its per-visit LoRA adapters on both sides: the export
through plain `PeftModel.from_pretrained`, the in-memory repeat with the same LoRA injected per visit
(`adapters.attach_visit_adapters`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rys_forge.adapters import adapter_record, apply_adapter, attach_visit_adapters, check_adapter
from rys_forge.architectures import arch_spec, layer_config
from rys_forge.artifacts import (
    RysRecord,
    check_export,
    decoder_config,
    file_hashes,
    gguf_model_file,
    heal_adapter_dir,
    read_export_config,
    weight_bytes,
    write_verification,
)
from rys_forge.divergence import kl_from_logits
from rys_forge.errors import RysForgeError, UsageError, VerificationError
from rys_forge.gguf_file import (LLAMACPP_KL_FACTOR, LLAMACPP_KL_MAX_FLOAT, LLAMACPP_KL_SLACK, check_gguf_llamacpp,
                                 compare_gguf_tensors, gguf_base_or_none, llamacpp_available, load_gguf_dequantised,
                                 read_gguf_plan)
from rys_forge.models import LoadedModel, load_model, offloaded, parse_device, parse_dtype
from rys_forge.plan import LayerPlan
from rys_forge.repeat import remap_layer_fields, repeated
# Per dtype: the in-memory repeat and a correct export share every weight, so fp32 differences are
# float round-off only (different kernels or memory layouts after reloading).
THRESHOLDS: dict[str, dict[str, float]] = {
    "float32": {"kl_mean": 1e-6, "kl_max": 1e-4, "max_abs_rel": 1e-4, "top1": 0.999, "cache_rel": 1e-4},
    "bfloat16": {"kl_mean": 2e-3, "kl_max": 0.1, "max_abs_rel": 0.05, "top1": 0.97, "cache_rel": 0.05},
    "float16": {"kl_mean": 2e-4, "kl_max": 0.02, "max_abs_rel": 0.01, "top1": 0.99, "cache_rel": 0.01},
}
DEFAULT_TEXTS = [
    "The capital of France is",
    "Question: If a train travels 60 miles in 1.5 hours, what is its average speed? Answer:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Les trois plus grandes villes d'Allemagne sont",
    "A syllogism: all men are mortal; Socrates is a man; therefore",
    "Photosynthesis converts light energy into chemical energy. In plants, it takes place in",
]
LONG_TEXT = (
    "In the residual stream of a transformer, every layer adds its update to the running state, and the "
    "final layers read out a distribution over the next token from it. "
)


@dataclass
class VerificationReport:
    """Numbers and verdict of one verification."""

    passed: bool
    format: str
    plan: dict[str, Any]
    metrics: dict[str, float]
    thresholds: dict[str, float]
    failures: list[str]
    files: dict[str, str]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "format": self.format,
            "plan": self.plan,
            "metrics": self.metrics,
            "thresholds": self.thresholds,
            "failures": self.failures,
            "files": self.files,
            "settings": self.settings,
        }


def _batch(tokenizer: Any, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def _logits(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float32 logits on the inputs' device (a device-mapped model leaves them where its head is)."""
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().to(ids.device)


def _incremental_gap(model: Any, ids: torch.Tensor, steps: int = 8) -> tuple[float, float]:
    """Max abs difference between cached incremental decoding and the full forward; and the logit scale."""
    full = model(ids, use_cache=False).logits.float()
    prefix = ids.shape[1] - steps
    out = model(ids[:, :prefix], use_cache=True)
    pieces, cache = [out.logits.float()], out.past_key_values
    for t in range(prefix, ids.shape[1]):
        out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        pieces.append(out.logits.float())
    return (torch.cat([p.to(full.device) for p in pieces], 1) - full).abs().max().item(), full.abs().max().item()


#: Why a layer-list export cannot be checked on a placement that offloads weights.
OFFLOAD_LAYERLIST = (
    "this --device-map offloads weights to CPU or disk, which a layer-list export does not support (its visits share "
    "the base tensors, saved once); give the GPUs enough --max-memory, or build with --format mergekit"
)


def read_export(folder: str | Path) -> tuple[dict[str, Any], RysRecord, LayerPlan]:
    """An export's config.json, its `rys` record and its stored plan.

    Raises:
        VerificationError: not a rys-forge export (`artifacts.read_export_config`), or an invalid plan.
    """
    folder = Path(folder)
    config, record = read_export_config(folder)
    try:
        if record.plan is None:
            raise KeyError("plan")
        plan = LayerPlan.from_dict(record.plan)
    except (RysForgeError, KeyError, TypeError) as exc:
        raise VerificationError(f"the plan stored in {folder}/config.json is invalid: {exc}") from None
    return config, record, plan


def _check_visit_counts(text_cfg: dict[str, Any], plan: LayerPlan) -> None:
    if text_cfg.get("num_hidden_layers") != len(plan.order):
        raise VerificationError(
            f"config.num_hidden_layers={text_cfg.get('num_hidden_layers')} but the stored plan has {len(plan.order)} visits"
        )
    for name, values in text_cfg.items():
        if name == "layer_types" and isinstance(values, list) and len(values) != len(plan.order):
            raise VerificationError(f"config.layer_types has {len(values)} entries for {len(plan.order)} visits")


def _load_export(folder: Path, fmt: str, torch_dtype: torch.dtype, device: torch.device, placement: dict[str, Any],
                 heal_dir: Path | None) -> Any:
    """The export reloaded from disk like a user would (with its heal adapter through plain peft; a GGUF export
    through transformers' GGUF loader)."""
    if fmt == "gguf":
        return load_gguf_dequantised(gguf_model_file(folder)).to(device)
    try:
        from transformers import AutoModelForCausalLM

        export = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch_dtype, trust_remote_code=(fmt == "layerlist"), attn_implementation="eager", **placement
        )
        export = (export if placement else export.to(device)).eval()
    except Exception as exc:  # a truncated or edited file surfaces here in many forms
        first = (str(exc).strip().splitlines() or [""])[0]
        raise VerificationError(f"export {folder} does not load: {type(exc).__name__}: {first}") from None
    if heal_dir is not None:
        try:
            export = apply_adapter(export, adapter_record(heal_dir)).eval()
        except RysForgeError as exc:
            raise VerificationError(f"heal {exc}") from None
    return export


def _compare(base: LoadedModel, export: Any, plan: LayerPlan, heal_dir: Path | None, texts: list[str],
             max_new_tokens: int, device: torch.device) -> dict[str, Any]:
    """The metrics of the report (all but the byte counts): the in-memory repeat of `base` against `export`."""
    tokenizer, model = base.tokenizer, base.model
    window = int(getattr(model.config.get_text_config(decoder=True), "sliding_window", None) or 0)
    long_ids = tokenizer(LONG_TEXT * (2 + (window + 32) // 20), return_tensors="pt").input_ids[:, : max(64, window + 32)]
    long_ids = long_ids.to(device)
    ids, mask = _batch(tokenizer, texts, device)

    with repeated(model, plan):
        if heal_dir is not None:
            attach_visit_adapters(model, heal_dir)
        ref = _logits(model, ids, mask)
        ref_long = model(long_ids, use_cache=False).logits.float().to(device)
        # One prompt at a time: no padding, so generation is exact for every architecture.
        short = [tokenizer(t, return_tensors="pt").input_ids.to(device) for t in texts[:3]]
        gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        ref_gen = [model.generate(input_ids=s, **gen_kwargs) for s in short]
    got = _logits(export, ids, mask)
    got_long = export(long_ids, use_cache=False).logits.float().to(device)
    valid = mask.bool()
    ref_tokens = torch.cat([ref[valid], ref_long[0]])
    got_tokens = torch.cat([got[valid], got_long[0]])
    kl = kl_from_logits(ref_tokens, got_tokens).clamp_min(0.0)  # round-off can dip a hair below 0
    cache_gap, cache_scale = _incremental_gap(export, long_ids)
    gen_cache = [export.generate(input_ids=s, use_cache=True, **gen_kwargs) for s in short]
    gen_nocache = [export.generate(input_ids=s, use_cache=False, **gen_kwargs) for s in short]
    return {
        "tokens": int(kl.numel()),
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
        "max_abs_diff": (ref_tokens - got_tokens).abs().max().item(),
        "logit_scale": ref_tokens.abs().max().item(),
        "top1_agreement": (ref_tokens.argmax(-1) == got_tokens.argmax(-1)).float().mean().item(),
        "cache_max_abs_diff": cache_gap,
        "cache_logit_scale": cache_scale,  # popped before the report: only the threshold uses it
        "generate_cache_equals_no_cache": all(torch.equal(a, b) for a, b in zip(gen_cache, gen_nocache)),
        "generate_equals_in_memory": all(torch.equal(a, b) for a, b in zip(gen_cache, ref_gen)),
        "long_prompt_tokens": int(long_ids.shape[1]),
    }


def within(value: Any, limit: float) -> bool:
    """`value <= limit` for a finite value, written so that NaN (also as the limit) and inf fail: every threshold of
    a report goes through here or `at_least`, so a model computing NaN or inf never passes."""
    return math.isfinite(value) and bool(value <= limit)


def at_least(value: Any, floor: float) -> bool:
    """`value >= floor` for a finite value (NaN and inf fail, see `within`)."""
    return math.isfinite(value) and bool(value >= floor)


def threshold_failures(metrics: dict[str, Any], limits: dict[str, float], fmt: str, dtype_name: str,
                       cache_scale: float) -> list[str]:
    """One line per threshold the metrics miss (NaN or inf in a metric or a logit scale misses it)."""
    scale = metrics["logit_scale"]
    failures = []
    if not within(metrics["kl_mean"], limits["kl_mean"]):
        failures.append(f"mean KL {metrics['kl_mean']:.3g} > {limits['kl_mean']:g}")
    if not within(metrics["kl_max"], limits["kl_max"]):
        failures.append(f"max KL {metrics['kl_max']:.3g} > {limits['kl_max']:g}")
    if not (within(scale, math.inf) and within(metrics["max_abs_diff"], limits["max_abs_rel"] * max(scale, 1.0))):
        failures.append(f"max abs logit diff {metrics['max_abs_diff']:.3g} > {limits['max_abs_rel']:g} x logit scale {scale:.3g}")
    if not at_least(metrics["top1_agreement"], limits["top1"]):
        failures.append(f"top-1 agreement {metrics['top1_agreement']:.4f} < {limits['top1']}")
    if not (within(cache_scale, math.inf)
            and within(metrics["cache_max_abs_diff"], limits["cache_rel"] * max(cache_scale, 1.0))):
        failures.append(f"KV-cache decoding differs from the full forward by {metrics['cache_max_abs_diff']:.3g}")
    if not metrics["generate_cache_equals_no_cache"]:
        failures.append("greedy generation with the KV cache differs from generation without it")
    if not metrics["generate_equals_in_memory"] and dtype_name == "float32":
        failures.append("greedy generation differs from the in-memory repeat's")
    if fmt == "layerlist" and metrics["base_weight_bytes"] and not within(metrics["bytes_ratio"], 1.01):
        failures.append(f"layer-list export stores {metrics['bytes_ratio']:.3f}x the base's weight bytes (expected ~1)")
    return failures


def _base_model(base: str, loaded: LoadedModel | None, adapter: dict[str, Any] | None, torch_dtype: torch.dtype,
                device: torch.device, placement: dict[str, Any]) -> tuple[LoadedModel, torch.device]:
    """The base (loaded here unless given, with the recorded adapter merged in) and where inputs go."""
    base_loaded = loaded or load_model(
        base, dtype=torch_dtype, device=device, adapter=adapter["path"] if adapter else None, **placement
    )
    if placement or loaded:  # inputs (and the export) go where the base's embeddings are
        device = next(base_loaded.model.parameters()).device
    return base_loaded, device


@torch.no_grad()
def verify(
    path: str | Path,
    base: str | LoadedModel | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    texts: list[str] | None = None,
    max_new_tokens: int = 16,
    write_report: bool = True,
    placement: dict[str, Any] | None = None,
) -> VerificationReport:
    """Compare a reloaded export with the in-memory repeat of its base; write `verification.json`.

    Args:
        path: export folder (layerlist or mergekit format).
        base: base model (default: the one recorded at build time in `config.rys.base_model`), or that
            base already loaded (as `build` holds it, with any recorded adapter merged in): not loaded twice.
        dtype: dtype of both models; thresholds follow it.
        device: where both run.
        texts: prompts (default: a small mixed set plus one prompt longer than the sliding window).
        max_new_tokens: greedy generation length for the cache checks.
        write_report: write `verification.json` into the folder.
        placement: `load_model` big-model keywords (`device_map`, `max_memory`, `offload_folder`) for
            both the base and the export; replaces `device`.

    Raises:
        VerificationError: the folder is not a valid export, does not load, or fails a threshold
            (the report is written first).
    """
    started = time.perf_counter()
    folder = Path(path)
    check_export(folder)  # regular files, no code but the generated one: before anything of the folder runs
    config, record, plan = read_export(folder)
    fmt = record.format or "unknown"
    text_cfg = decoder_config(config)
    _check_gguf_options(record, dtype, placement) if fmt == "gguf" else _check_visit_counts(text_cfg, plan)
    loaded_base = base if isinstance(base, LoadedModel) else None
    base = loaded_base.source if loaded_base else (base or record.base_model)
    if not base:
        raise VerificationError("the export does not record its base model; pass --model BASE")
    adapter = record.adapter
    if adapter:
        check_adapter(adapter)
    heal_dir = heal_adapter_dir(folder)
    if heal_dir is not None and fmt != "layerlist":
        raise VerificationError(f"{heal_dir} is a per-visit heal adapter, but {folder} is a {fmt} export")
    torch_dtype = parse_dtype(dtype)
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[torch_dtype]
    placement = placement or {}
    base_loaded, torch_device = _base_model(base, loaded_base, adapter, torch_dtype, parse_device(device), placement)
    if fmt == "layerlist" and offloaded(base_loaded.model):
        raise UsageError(OFFLOAD_LAYERLIST)
    base_layers = base_loaded.model.config.get_text_config(decoder=True).num_hidden_layers
    if base_layers != plan.num_layers:
        raise VerificationError(f"base {base} has {base_layers} layers but the plan was made for {plan.num_layers}")
    _check_layer_fields(text_cfg, base_loaded.model, plan)
    files = file_hashes(folder)  # before loading: the report vouches for what was loaded
    export = _load_export(folder, fmt, torch_dtype, torch_device, placement, heal_dir)
    texts = texts or DEFAULT_TEXTS
    metrics = _compare(base_loaded, export, plan, heal_dir, texts, max_new_tokens, torch_device)
    cache_scale = metrics.pop("cache_logit_scale")
    gguf_failures = _gguf_checks(folder, base, base_loaded, plan, metrics) if fmt == "gguf" else []
    export_bytes, base_bytes = _stored_bytes(folder, fmt, base, base_loaded)
    metrics.update(export_weight_bytes=export_bytes, base_weight_bytes=base_bytes,
                   bytes_ratio=export_bytes / base_bytes if base_bytes else float("nan"), seconds=0.0)
    limits = {**THRESHOLDS[dtype_name], **({"llamacpp_kl_factor": LLAMACPP_KL_FACTOR} if fmt == "gguf" else {})}
    failures = threshold_failures(metrics, limits, fmt, dtype_name, cache_scale) + gguf_failures
    metrics["seconds"] = time.perf_counter() - started
    settings = {"base": base_loaded.source, "dtype": dtype_name, "device": str(torch_device), "device_map": placement.get("device_map"),
                "prompts": len(texts), "base_adapter": adapter["path"] if adapter else None,
                "heal_adapter": heal_dir.relative_to(folder).as_posix() if heal_dir is not None else None}
    _check_unchanged(folder, files)
    report = VerificationReport(passed=not failures, format=fmt, plan=plan.to_dict(), metrics=metrics, thresholds=limits,
                                failures=failures, files=files, settings=settings)
    if write_report:
        write_verification(folder, report.to_dict())
    if failures:
        raise VerificationError(f"verification of {folder} failed: {'; '.join(failures)}")
    return report


def _stored_bytes(folder: Path, fmt: str, base: str, base_loaded: LoadedModel) -> tuple[int, int]:
    """Bytes of the export's weights and of its base's: weight files, or the `.gguf` files of a GGUF export (a
    transformers base of one: its weight files)."""
    if fmt != "gguf":
        return weight_bytes(folder), weight_bytes(base_loaded.path)
    base_file = gguf_base_or_none(base)
    base_bytes = base_file.stat().st_size if base_file is not None else weight_bytes(base_loaded.path)
    return gguf_model_file(folder).stat().st_size, base_bytes


def _check_gguf_options(record: RysRecord, dtype: str, placement: dict[str, Any] | None) -> None:
    """A GGUF export is verified in float32 on one device, against a base without adapter.

    Raises:
        UsageError: another dtype, a device map, or an adapter recorded with an export of a GGUF base.
    """
    if parse_dtype(dtype) != torch.float32:
        raise UsageError(f"a GGUF export is verified in float32 (transformers dequantises the file to it), not {dtype}")
    if placement:
        raise UsageError("a GGUF export is verified on one device; --device-map does not apply")
    if record.adapter and record.extra.get("gguf_source") != "transformers":
        raise UsageError("this GGUF export of a GGUF base records an adapter, which its byte-copied blocks cannot hold")


def _gguf_checks(folder: Path, base: str, base_loaded: LoadedModel, plan: LayerPlan, metrics: dict[str, Any]) -> list[str]:
    """A GGUF export's own checks into `metrics` (prefixed `gguf_`, `llamacpp_`): tensors and metadata against the
    base GGUF, then llama.cpp where installed. Returns the failures."""
    model_file, base_file = gguf_model_file(folder), gguf_base_or_none(base)
    failures = [] if read_gguf_plan(model_file) == plan else [f"the plan in {model_file.name} is not the one in rys.json"]
    if base_file is not None:  # blocks copied from a base GGUF: every byte and key against it
        structure = compare_gguf_tensors(model_file, base_file)
        metrics.update({f"gguf_{k}": v for k, v in structure.items()})
        if structure["tensor_mismatches"] or structure["metadata_mismatches"]:
            failures.append(f"{int(structure['tensor_mismatches'])} tensors and {int(structure['metadata_mismatches'])}"
                            f" metadata values differ from the base GGUF's, remapped through the plan")
        if structure["base_sha256_match"] != 1:
            failures.append(f"the GGUF's rys.base_sha256 is not that of {base_file.name}")
    if not llamacpp_available():
        metrics["llamacpp"] = "not run: llama-cpp-python is not installed (pip install 'rys-forge[llamacpp]')"
        return failures
    runtime = check_gguf_llamacpp(model_file, base_loaded, floor=base_file is not None)
    metrics.update({f"llamacpp_{k}": v for k, v in runtime.items()})
    if base_file is None and not within(runtime["kl_max"], LLAMACPP_KL_MAX_FLOAT):
        failures.append(f"llama.cpp's max KL to the in-memory repeat {runtime['kl_max']:.3g} > {LLAMACPP_KL_MAX_FLOAT:g}")
    elif base_file is not None and not within(runtime["kl_mean"], LLAMACPP_KL_FACTOR * runtime["floor_kl_mean"] + LLAMACPP_KL_SLACK):
        failures.append(f"llama.cpp's mean KL to the in-memory repeat {runtime['kl_mean']:.3g} > {LLAMACPP_KL_FACTOR:g}"
                        f" x its quantisation floor on the base {runtime['floor_kl_mean']:.3g} (+{LLAMACPP_KL_SLACK:g})")
    return failures


def _check_unchanged(folder: Path, files: dict[str, str]) -> None:
    """The folder still holds what was hashed before the export was loaded (weights by name: reading them again
    would double the cost), so a report never vouches for a folder changed while it was verified."""
    check_export(folder)
    now = file_hashes(folder, skip_weights=True)
    changed = sorted(k for k in set(now) | set(files) if k not in now or k not in files or now[k] not in ("", files[k]))
    if changed:
        raise VerificationError(f"{folder} changed while it was verified ({', '.join(changed[:5])}); verify again")


def _check_layer_fields(export_cfg: dict[str, Any], base_model: Any, plan: LayerPlan) -> None:
    """The export's per-layer config fields must be the base's, remapped through its stored plan."""
    spec = arch_spec(base_model.config.model_type)
    expected = remap_layer_fields(layer_config(base_model.config, spec), spec, plan.order)
    for name, value in expected.items():
        if name in export_cfg and export_cfg[name] != value:
            raise VerificationError(
                f"config.{name} does not follow the stored plan (expected {value!r}, found {export_cfg[name]!r})"
            )
