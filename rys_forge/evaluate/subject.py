"""What ``eval`` compares: an export folder against its base, or a model against its in-memory repeat.

An export is read through its ``config.json``'s ``rys`` record (``config.rys``, else
``config.text_config.rys``; a GGUF export's ``rys.json``): plan, recorded base model, base adapter; a healed export also has its heal
folder (:func:`rys_forge.artifacts.heal_adapter_dir`). ``eval`` runs only a local export that passes
:func:`rys_forge.artifacts.check_verified` (its code is the generated one, its report passed and still matches
every file): an unverified, failed or changed export is refused before anything of it is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rys_forge.artifacts import check_verified, heal_adapter_dir, read_export_config, rys_block
from rys_forge.errors import ModelLoadError, UsageError, VerificationError
from rys_forge.plan import LayerPlan

__all__ = ["Subject", "export_subject", "in_memory_subject", "load_export"]


@dataclass
class Subject:
    """What is compared.

    Attributes:
        base_source: the base model (name, folder or hub id).
        rys_label: how the RYS model is named in the report.
        plan: the export's plan (in memory: set once the model's depth is known).
        export_info: the export's ``rys`` record without the plan (empty in memory).
        target_folder: the export's resolved folder (None in memory).
        adapter: the record of a PEFT adapter merged into the base (``adapters.adapter_record``), or None.
        heal_dir: a healed export's adapter folder, or None.
    """

    base_source: str
    rys_label: str
    plan: LayerPlan | None = None
    export_info: dict[str, Any] = field(default_factory=dict)
    target_folder: str | None = None
    adapter: dict[str, Any] | None = None
    heal_dir: Path | None = None


def _verified_export(target: str) -> tuple[str, dict[str, Any]]:
    """The folder and config of an export ``eval`` may run: a local folder that passes
    :func:`rys_forge.artifacts.check_verified` (regular files only, no code but the generated ``modeling_rys.py``,
    a passing report that every file still matches). Nothing of the folder is loaded before that.

    Raises:
        ModelLoadError: the target does not exist.
        UsageError: the target is not a local folder (a hub id or a built-in model name).
        VerificationError: the folder is not verified, failed verification or changed since.
    """
    path = Path(target).expanduser()
    if not path.is_dir():
        hub_like = target.count("/") == 1 and not target.startswith((".", "/", "~")) and not path.exists()
        if not hub_like:
            raise ModelLoadError(f"export folder not found: {target} (eval TARGET is a local export folder; for a"
                                 " model's in-memory repeat use --model M --window i:j)")
        raise UsageError(f"eval TARGET must be a local export folder, not the Hub id '{target}': download it first"
                         " (`hf download REPO --local-dir DIR`), check it with `rys-forge verify DIR`, then evaluate DIR")
    try:
        check_verified(path)
    except VerificationError as exc:
        raise VerificationError(f"not evaluating {target}: {exc}") from None
    config, record = read_export_config(path)
    return str(path), config if rys_block(config) is not None else {"rys": record.to_dict()}  # GGUF: rys.json


def _export_base(target: str, folder: str, block: dict[str, Any] | None, base: str | None) -> str:
    """The base of an export: ``base``, else its recorded ``rys.base_model`` (a relative path recorded
    relative to the export is found beside it)."""
    base_source = base or (block or {}).get("base_model")
    if not base_source:
        raise UsageError(f"no base model for {target}: its config records none (rys.base_model); pass --base M")
    base_source = str(base_source)
    if base is None and not Path(base_source).expanduser().exists():
        beside = Path(folder) / base_source
        if not Path(base_source).is_absolute() and (beside / "config.json").is_file():
            base_source = str(beside)
    return base_source


def export_subject(target: str, base: str | None, heal: bool) -> Subject:
    """An export against its base (``base``, else the recorded one); ``heal``: look for its heal folder.

    Raises:
        ModelLoadError: the export folder does not exist.
        UsageError: not a local folder, or no base is given or recorded.
        VerificationError: the export is not verified, failed verification or changed since (`check_verified`).
    """
    folder, config = _verified_export(target)
    block = rys_block(config)
    subject = Subject(base_source=_export_base(target, folder, block, base), rys_label=target, target_folder=folder)
    if block is not None:
        subject.export_info = {k: v for k, v in block.items() if k != "plan"}
        if isinstance(block.get("plan"), dict):
            subject.plan = LayerPlan.from_dict(block["plan"])
    if block is not None and isinstance(block.get("adapter"), dict):
        from rys_forge.adapters import check_adapter

        subject.adapter = block["adapter"]
        check_adapter(subject.adapter)
    if heal and Path(folder).is_dir():
        subject.heal_dir = heal_adapter_dir(folder)
    return subject


def in_memory_subject(model: str, windows: Sequence[str], repeats: int, adapter: str | None,
                      alpha: float = 1.0) -> Subject:
    """A model against its own repeat over ``windows``, the repeated visits at residual scale ``alpha``
    (``adapter``: merged into the model first)."""
    damped = f" at alpha {alpha:g}" if alpha != 1 else ""
    label = f"{model} with {', '.join(str(w) for w in windows)} x{repeats}{damped} (in memory)"
    subject = Subject(base_source=str(model), rys_label=label)
    if adapter is not None:
        from rys_forge.adapters import adapter_record

        subject.adapter = adapter_record(adapter)
    return subject


def load_export(folder: str, fmt: str | None, dtype: Any, device: Any, attn_implementation: str | None) -> Any:
    """A checked export folder, loaded for evaluation (`.model`, `.tokenizer`): remote code only for a layer-list
    export (whose modeling_rys.py `check_verified` compared with the generated one); a GGUF export through
    transformers' GGUF loader with its per-layer pattern (`gguf_file.load_gguf_dequantised`)."""
    if fmt != "gguf":
        from rys_forge.models import load_model

        return load_model(folder, dtype=dtype, device=device, trust_remote_code=fmt == "layerlist",
                          attn_implementation=attn_implementation)
    from rys_forge.artifacts import gguf_model_file
    from rys_forge.gguf_file import gguf_tokenizer, load_gguf_dequantised

    file = gguf_model_file(folder)
    model = load_gguf_dequantised(file, dtype, attn_implementation or "eager")
    return SimpleNamespace(model=model.to(device), tokenizer=gguf_tokenizer(file))
