"""The folders rys-forge writes and reads, and their file names: one owner per file format.

An export folder (`rys-forge build`)::

    config.json          the model's config with the `rys` block (`RysRecord`): format, plan, base, versions
    *.safetensors, tokenizer files, modeling_rys.py (layer list) or rys_recipe.yml (mergekit)
    verification.json    `verify`'s report, with a sha256 of every other file (`file_hashes`)
    eval.json            `evaluate`'s report          } written after verification,
    README.md            the model card (`publish`)   } left out of its hashes
    heal/                `heal`'s per-visit LoRA adapter (a PEFT folder) and heal.json

A run folder (`rank`, `sweep`): `run.json` (the settings fingerprint), append-only logs, final files
(`RunFolder`). Everything that reads or writes these goes through the names and helpers here; this module
imports no other stage (a leaf: errors, files and distributed only).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from rys_forge.distributed import Shard
from rys_forge.errors import UsageError, VerificationError
from rys_forge.files import json_safe, sha256_file, write_atomic

# --------------------------------------------------------------------------- file names

CONFIG_FILE = "config.json"
VERIFICATION_FILE = "verification.json"
EVAL_FILE = "eval.json"
CARD_FILE = "README.md"
RECIPE_FILE = "rys_recipe.yml"
MODELING_FILE = "modeling_rys.py"
HEAL_DIR = "heal"
HEAL_FILE = "heal.json"
#: A PEFT adapter folder's config and weight files (an `--adapter`, or an export's `heal/`).
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
#: Files written into an export after its verification, so not covered by its hashes.
AFTER_VERIFICATION = (VERIFICATION_FILE, CARD_FILE, EVAL_FILE)

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
WINDOWS_FILE = "windows.json"
SCORE_HEATMAP_FILE = "heatmap_score.png"


# --------------------------------------------------------------------------- provenance


def _installed_version() -> str:
    try:
        return version("rys-forge")
    except PackageNotFoundError:  # running from a source tree without installation
        return "0.0.0+unknown"


#: The installed rys-forge version, stamped into configs, recipes, cards and reports.
VERSION = _installed_version()


def rys_forge_version() -> str:
    """The rys-forge version stamped into what it writes (`VERSION`, looked up at call time)."""
    return VERSION


def versions(*packages: str) -> dict[str, str | None]:
    """`{"rys_forge": <version>, <package>: <installed version, None if missing>, ...}` for a record."""
    found: dict[str, str | None] = {"rys_forge": rys_forge_version()}
    for name in packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def timestamp() -> str:
    """Now, UTC, to the second (`2026-01-02T03:04:05+00:00`): the `created` of exports and records."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the rys block


@dataclass
class RysRecord:
    """The `rys` block of an export's config.json, as stored (see `rys_block` for where it is read from).

    Attributes:
        format: `layerlist` or `mergekit`.
        plan: the plan as stored (`LayerPlan.to_dict()`; read it back with `LayerPlan.from_dict`).
        rys_forge_version: the version that built the export.
        base_model: the base as the user named it (built-in name, folder, .gguf or hub id).
        base_info: the base's provenance (`LoadedModel.info`: description, licence, hub id, GGUF file).
        created: when the export was built (`timestamp()`).
        adapter: a PEFT adapter merged into the base before the plan (`adapters.adapter_record`).
        base_fields: (layer list) the base values of the per-layer config fields, read by modeling_rys.py.
        recipe: (mergekit) the recipe's file name in the folder.
        extra: keys this version does not know, kept as they are.
    """

    format: str | None = None
    plan: dict[str, Any] | None = None
    rys_forge_version: str | None = None
    base_model: str | None = None
    base_info: dict[str, Any] | None = None
    created: str | None = None
    adapter: dict[str, Any] | None = None
    base_fields: dict[str, Any] | None = None
    recipe: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, block: dict[str, Any]) -> "RysRecord":
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in block.items() if k in known}
        if not isinstance(values.get("adapter"), dict):  # readers treat anything else as no adapter
            values.pop("adapter", None)
        return cls(**values, extra={k: v for k, v in block.items() if k not in known})

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "RysRecord | None":
        """The record of a config dict (`rys`, or `text_config.rys`), or None for a config without one."""
        block = rys_block(config)
        return None if block is None else cls.from_dict(block)

    def to_dict(self) -> dict[str, Any]:
        """The block as written into config.json (fields left at None are left out)."""
        block = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in block.items() if v is not None}, **self.extra}


def rys_block(config: dict[str, Any]) -> dict[str, Any] | None:
    """The raw `rys` block of a config dict: top-level, else under `text_config` (a composite config as
    transformers writes it); None if neither holds a dict."""
    if isinstance(config.get("rys"), dict):
        return config["rys"]
    text = config.get("text_config")
    return text["rys"] if isinstance(text, dict) and isinstance(text.get("rys"), dict) else None


def decoder_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a config dict holding the decoder's fields (`num_hidden_layers`, `layer_types`, ...)."""
    return config if "num_hidden_layers" in config else config.get("text_config") or config


def read_export_config(folder: str | Path) -> tuple[dict[str, Any], RysRecord]:
    """An export's config.json and its `rys` record.

    Raises:
        VerificationError: no config.json, not valid JSON, or no `rys` block (not a rys-forge export).
    """
    config_file = Path(folder) / CONFIG_FILE
    if not config_file.is_file():
        raise VerificationError(f"{folder} has no {CONFIG_FILE}; is it a rys-forge export?")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise VerificationError(f"{config_file} is not valid JSON: {exc.msg}") from None
    record = RysRecord.from_config(config)
    if record is None:
        raise VerificationError(f"{config_file} has no 'rys' block; not a rys-forge export")
    return config, record


def write_config(folder: str | Path, config: dict[str, Any]) -> None:
    """Write an export's config.json (sorted keys, 2-space indent, trailing newline)."""
    (Path(folder) / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def update_rys(folder: str | Path, **values: Any) -> None:
    """Set fields of the `rys` block in an export's config.json (the rest of the file is kept)."""
    config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    record = RysRecord.from_dict(config.get("rys") or {})
    for name, value in values.items():
        setattr(record, name, value)
    config["rys"] = record.to_dict()
    write_config(folder, config)


# --------------------------------------------------------------------------- files, hashes, weights


def read_json(path: Path, what: str) -> Any:
    """A JSON file written by rys-forge (UsageError naming `what` if it cannot be read)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {what} {path}: {exc}") from None


def file_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every file of an export except those written after verification (`AFTER_VERIFICATION`)."""
    hashes = {}
    for path in sorted(Path(folder).rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in AFTER_VERIFICATION and "__pycache__" not in rel:
            hashes[rel] = sha256_file(path)
    return hashes


def weight_bytes(folder: str | Path) -> int:
    """Bytes of the weight files of a model folder (0 for a hub id)."""
    path = Path(folder)
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)


def safetensors_header(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> `{"dtype", "shape", "data_offsets"}` over a folder's `*.safetensors` files, read from
    their headers only (no tensor data)."""
    entries: dict[str, dict[str, Any]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        entries.update({name: meta for name, meta in header.items() if name != "__metadata__"})
    return entries


# --------------------------------------------------------------------------- the verification report


def write_verification(folder: str | Path, report: dict[str, Any]) -> None:
    """Write `verification.json` (atomically: a half-written report never exists)."""
    write_atomic(Path(folder) / VERIFICATION_FILE, json.dumps(report, indent=2) + "\n")


def check_verified(folder: str | Path) -> dict[str, Any]:
    """The folder's passing verification report, if every file still matches it.

    Raises:
        VerificationError: no report, a failed report, or files added, missing or changed since.
    """
    folder = Path(folder)
    report_file = folder / VERIFICATION_FILE
    if not report_file.is_file():
        raise VerificationError(f"{folder} has no {VERIFICATION_FILE}; run `rys-forge verify {folder}` first")
    report = json.loads(report_file.read_text())
    if not report.get("passed"):
        raise VerificationError(f"{folder} failed verification: {'; '.join(report.get('failures', []))}")
    current = file_hashes(folder)
    recorded = report.get("files", {})
    changed = sorted(k for k in set(current) | set(recorded) if current.get(k) != recorded.get(k))
    if changed:
        raise VerificationError(f"{folder} changed since verification ({', '.join(changed[:5])}); verify again")
    return report


# --------------------------------------------------------------------------- the heal folder


def heal_adapter_dir(folder: str | Path) -> Path | None:
    """The export's heal adapter (`DIR/heal` with an adapter_config.json), or None: whether it is healed."""
    path = Path(folder) / HEAL_DIR
    return path if (path / ADAPTER_CONFIG_FILE).is_file() else None


def read_heal_record(folder: str | Path) -> dict[str, Any] | None:
    """`heal/heal.json` of a healed export (`{}` if the adapter has none), or None for an unhealed one.

    Raises:
        UsageError: heal.json exists but cannot be read.
    """
    if heal_adapter_dir(folder) is None:
        return None
    path = Path(folder) / HEAL_DIR / HEAL_FILE
    return read_json(path, "heal record") if path.is_file() else {}


def heal_summary(heal_dir: Path) -> dict[str, Any]:
    """What heal.json says about an adapter (settings, data, visits, loss before/after) without the loss
    curve, for reports; just the adapter's folder name if heal.json is missing or unreadable."""
    try:
        record = json.loads((heal_dir / HEAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"adapter": heal_dir.name}
    loss = {k: v for k, v in (record.get("loss") or {}).items() if k != "curve"}
    return {"adapter": heal_dir.name, "settings": record.get("settings"), "data": record.get("data"),
            "visits": (record.get("adapter") or {}).get("visits"), "loss": loss}


# --------------------------------------------------------------------------- run folders


class RunFolder:
    """A run's folder: settings fingerprint in run.json, append-only fsynced logs (one per process:
    ``<stem>.jsonl`` or ``<stem>.rank<r>.jsonl``), atomic final files. rank's records are merged per
    window (a later record, e.g. a Jacobian, updates the window's row)."""

    stem, key, merge = "windows", "window", True

    def __init__(self, path: Path, fingerprint: dict[str, Any], resume: bool, log_name: str | None = None):
        self.path = Path(path)
        self.log = self.path / (log_name or f"{self.stem}.jsonl")
        settings_file = self.path / RUN_FILE
        if self.path.exists() and any(self.path.iterdir()):
            if not resume:
                raise UsageError(f"run folder {self.path} already exists; pass --resume to continue it or choose another --out")
            if not settings_file.exists():
                raise UsageError(f"{self.path} is not a rank run folder (no run.json); choose another --out")
            stored = json.loads(settings_file.read_text())
            current = json.loads(json.dumps(fingerprint))  # tuples -> lists, as stored
            if stored != current:
                changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
                raise UsageError(f"cannot resume {self.path}: settings differ from the original run ({', '.join(changed)})")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomic(settings_file, json.dumps(fingerprint, indent=2))

    @classmethod
    def open(cls, out_dir: str | Path | None, fingerprint: dict[str, Any], resume: bool, shard: Shard) -> "RunFolder | None":
        """This process's view of the run folder (None without `out_dir`): rank 0 creates or checks it,
        then every process appends to its own log."""
        if out_dir is None:
            if shard.parallel:
                raise UsageError("a window-parallel run needs a run folder (--out) to merge the processes' results")
            return None
        shard.on_rank0(lambda: cls(Path(out_dir), fingerprint, resume))
        return cls(Path(out_dir), fingerprint, True, shard.log_name(cls.stem))

    @classmethod
    def records(cls, path: str | Path) -> dict[str, dict[str, Any]]:
        """The records of every process's log, by key (merged or replaced; a torn last line is ignored)."""
        rows: dict[str, dict[str, Any]] = {}
        for log in sorted(Path(path).glob(f"{cls.stem}*.jsonl")):
            for line in log.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(record, dict) or cls.key not in record:
                    continue
                if cls.merge:
                    rows.setdefault(record[cls.key], {}).update(record)
                else:
                    rows[record[cls.key]] = record
        return rows

    def finished(self) -> dict[str, dict[str, Any]]:
        """Records already logged by any process, by key."""
        return self.records(self.path)

    def append(self, record: dict[str, Any]) -> None:
        with self.log.open("a") as handle:
            handle.write(json.dumps(json_safe(record)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
