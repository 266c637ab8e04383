"""PEFT adapters: merged into a base on the way in, and a heal adapter's LoRA on the in-memory visits.

`rys-forge info|rank|build|eval --adapter PATH` loads the base, applies the adapter with
`PeftModel.from_pretrained` and folds it into the weights with `merge_and_unload`, so probing, building
and evaluating see one plain transformers model (the merged base). What was merged is recorded wherever
the base is recorded: exports (`config.json: rys.adapter`), rank summaries, eval reports and model cards
carry the adapter's path, its `adapter_config.json` and a sha256 of each of its weight files, and
`verify` refuses an export whose recorded adapter changed on disk since.

Usage::

    loaded = load_model("smollm2-135m", adapter="runs/my-lora")   # merged in memory
    loaded.info["adapter"]  # {"path": ..., "config": {...}, "files": {...}, "peft_version": ...}

A healed layer-list export (`rys-forge heal`) keeps one LoRA per repeated visit in `DIR/heal`, with keys
naming the visit (`...layers.visits.<p>.<module>`); `attach_visit_adapters` injects the same LoRA into a
model running the plan in memory (`repeat.repeated`), which `verify` compares the healed export with.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rys_forge.architectures import arch_spec, get_path
from rys_forge.artifacts import ADAPTER_CONFIG_FILE as ADAPTER_CONFIG
from rys_forge.artifacts import ADAPTER_WEIGHT_FILES as ADAPTER_WEIGHTS
from rys_forge.errors import ModelLoadError, UsageError, VerificationError, first_line
from rys_forge.files import sha256_file
from rys_forge.repeat import visit_copy

#: A heal adapter's weight key: the visit position, the module (relative to the layer) and the LoRA matrix.
_VISIT_KEY = re.compile(r"^base_model\.model\.(?P<layers>.+)\.visits\.(?P<visit>\d+)\.(?P<module>.+)\.(?P<kind>lora_[AB])\.weight$")


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft calls a transformers attribute that is deprecated (a FutureWarning on every wrap); not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _peft_version() -> str:
    import peft

    return peft.__version__


def adapter_record(path: str | Path) -> dict[str, Any]:
    """What identifies an adapter: its path (a resolved local folder, or a hub id), its config and hashes.

    Returns:
        `{"path", "local", "config", "files", "peft_version"}`; `files` maps each weight and config file of a
        local adapter to its sha256 (empty for a hub id).

    Raises:
        ModelLoadError: the folder does not exist or has no `adapter_config.json`, or a hub id cannot be read.
    """
    text = str(path)
    folder = Path(text).expanduser()
    if folder.exists():
        if not (folder / ADAPTER_CONFIG).is_file():
            raise ModelLoadError(f"adapter folder {text} has no {ADAPTER_CONFIG}; pass a PEFT adapter folder")
        try:
            config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ModelLoadError(f"{folder / ADAPTER_CONFIG} is not valid JSON: {exc}") from None
        names = [ADAPTER_CONFIG, *(name for name in ADAPTER_WEIGHTS if (folder / name).is_file())]
        if len(names) == 1:
            raise ModelLoadError(f"adapter folder {text} has no weights ({' or '.join(ADAPTER_WEIGHTS)})")
        files = {name: sha256_file(folder / name) for name in names}
        return {"path": str(folder.resolve()), "local": True, "config": config, "files": files,
                "peft_version": _peft_version()}
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelLoadError(f"adapter not found: {text} (a folder with {ADAPTER_CONFIG}, or a hub id org/name)")
    try:
        from peft import PeftConfig

        config = PeftConfig.from_pretrained(text).to_dict()
    except Exception as exc:
        raise ModelLoadError(f"could not read the adapter config of '{text}': {first_line(exc)}") from None
    return {"path": text, "local": False, "config": _json_ready(config), "files": {}, "peft_version": _peft_version()}


def _json_ready(value: Any) -> Any:
    """PEFT configs hold sets and enums; make them JSON values."""
    return json.loads(json.dumps(value, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def apply_adapter(model: nn.Module, record: dict[str, Any]) -> Any:
    """`PeftModel.from_pretrained(model, record["path"])`, refusing an adapter that only partly fits.

    Raises:
        ModelLoadError: peft fails, or some of the adapter's weights match no module of the model (peft
            itself loads such an adapter without a word when its targets are only partly present).
    """
    from peft import PeftModel

    path = record["path"]
    try:
        with quiet_peft():
            wrapped = PeftModel.from_pretrained(model, path)
    except Exception as exc:  # missing target modules, shape mismatches: peft raises ValueError/RuntimeError
        raise ModelLoadError(f"adapter {path} does not load onto this model: {first_line(exc)}") from None
    unused = _unused_weights(wrapped, record)
    if unused:
        raise ModelLoadError(f"adapter {path} does not load onto this model: {len(unused)} of its weights match"
                             f" no module (e.g. {unused[0]})")
    return wrapped


def merge_adapter(model: nn.Module, path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Apply a PEFT adapter to `model` and merge it into the weights (`merge_and_unload`).

    Args:
        model: a loaded transformers causal LM (on its final device and dtype).
        path: adapter folder (with `adapter_config.json`) or hub id.

    Returns:
        The merged plain model (the same module tree as `model`, weights changed in place) and the
        adapter's record (see `adapter_record`).

    Raises:
        ModelLoadError: the adapter cannot be found or does not fit the model.
        UsageError: the adapter type cannot be merged into weights (prompt tuning and similar).
    """
    record = adapter_record(path)
    wrapped = apply_adapter(model, record)
    merge = getattr(wrapped, "merge_and_unload", None)
    if merge is None or not callable(merge):
        kind = record["config"].get("peft_type", "?")
        raise UsageError(f"adapter {path} ({kind}) cannot be merged into the weights; use a LoRA-type adapter")
    try:
        merged = merge()
    except AttributeError:
        kind = record["config"].get("peft_type", "?")
        raise UsageError(f"adapter {path} ({kind}) cannot be merged into the weights; use a LoRA-type adapter") from None
    merged.eval()
    return merged, record


def _unused_weights(wrapped: Any, record: dict[str, Any]) -> list[str]:
    """Weight names in a local adapter's file that did not land in the model."""
    from peft.utils import get_peft_model_state_dict

    if not record.get("local"):
        return []
    folder = Path(record["path"])
    if (folder / ADAPTER_WEIGHTS[0]).is_file():
        from safetensors import safe_open

        with safe_open(str(folder / ADAPTER_WEIGHTS[0]), framework="pt") as handle:
            names = set(handle.keys())
    else:
        names = set(torch.load(folder / ADAPTER_WEIGHTS[1], map_location="cpu", weights_only=True))
    return sorted(names - set(get_peft_model_state_dict(wrapped)))


def check_adapter(record: dict[str, Any]) -> None:
    """A local adapter recorded at build time must still have the same files.

    Raises:
        VerificationError: the folder is gone or a file changed since it was recorded.
    """
    if not record.get("local"):
        return
    folder = Path(record["path"])
    for name, digest in (record.get("files") or {}).items():
        path = folder / name
        if not path.is_file():
            raise VerificationError(f"the recorded adapter file {path} is missing")
        if sha256_file(path) != digest:
            raise VerificationError(f"the recorded adapter file {path} changed since the export was built")


def describe_adapter(record: dict[str, Any], with_path: bool = True) -> str:
    """One line: `LORA r=8 alpha=16 on q_proj, v_proj (path)` (the path left out with `with_path=False`)."""
    config = record.get("config") or {}
    kind = str(config.get("peft_type") or "adapter")
    parts = [kind]
    if config.get("r") is not None:
        parts.append(f"r={config['r']}")
    if config.get("lora_alpha") is not None:
        parts.append(f"alpha={config['lora_alpha']}")
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple)):
        parts.append("on " + ", ".join(str(t) for t in sorted(targets)))
    elif targets:
        parts.append(f"on /{targets}/")
    return f"{' '.join(parts)} ({record.get('path')})" if with_path else " ".join(parts)


def identity(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of a record that identifies the merged weights (for cache keys): path and file hashes."""
    if not record:
        return None
    return {"path": record.get("path"), "files": record.get("files") or {}}


# --------------------------------------------------------------------------- heal adapters on the in-memory visits


def read_visit_adapter(adapter_dir: str | Path) -> tuple[Any, dict[tuple[int, str], dict[str, torch.Tensor]]]:
    """A heal adapter's LoRA config and weights by (visit position, module name relative to the layer).

    Raises:
        VerificationError: the files are missing or hold keys that do not name a visit's LoRA matrix.
    """
    from peft import LoraConfig
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    weights_file = adapter_dir / ADAPTER_WEIGHTS[0]
    if not weights_file.is_file():
        raise VerificationError(f"{adapter_dir} has no {ADAPTER_WEIGHTS[0]}")
    config = LoraConfig.from_pretrained(str(adapter_dir))
    weights: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_file)).items():
        match = _VISIT_KEY.match(key)
        if match is None:
            raise VerificationError(f"{weights_file}: key {key!r} is not a per-visit LoRA weight")
        weights.setdefault((int(match["visit"]), match["module"]), {})[match["kind"]] = tensor
    return config, weights


def attach_visit_adapters(model: nn.Module, adapter_dir: str | Path) -> int:
    """Apply a heal adapter to a model running its plan in memory (`repeat.repeated`): the adapted visits
    are deep-copied (own module objects, shared base tensors) and peft injects the same LoRA into them.

    The model must be restored (`repeat.restore`) afterwards to drop the copies; the base layers themselves
    are not touched. Returns the number of adapted modules.
    """
    from dataclasses import replace

    from peft import inject_adapter_in_model

    config, weights = read_visit_adapter(adapter_dir)
    layers_path = arch_spec(model.config.model_type).layers_path
    layers = get_path(model, layers_path)
    for p in sorted({p for p, _ in weights}):
        if p >= len(layers):
            raise VerificationError(f"the heal adapter names visit {p}, but the plan has {len(layers)} visits")
        layers[p] = visit_copy(layers[p], p, deep=True)  # re-attaches accelerate hooks to the copies
    names = [f"{layers_path}.{p}.{module}" for p, module in weights]
    with quiet_peft():
        inject_adapter_in_model(replace(config, target_modules=names, inference_mode=True), model)
    for (p, module), pair in weights.items():
        lora = layers[p].get_submodule(module)
        for kind, tensor in pair.items():
            getattr(lora, kind)["default"].weight.data.copy_(tensor)
    return len(weights)
