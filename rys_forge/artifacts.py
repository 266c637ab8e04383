"""The folders rys-forge writes and reads, and their file names: one owner per file format.

An export folder (`rys-forge build`)::

    config.json          the model's config with the `rys` block (`RysRecord`): format, plan, base, versions
    *.safetensors, tokenizer files, modeling_rys.py (layer list) or rys_recipe.yml (mergekit)
    (a GGUF export instead: one `*.gguf` file and `rys.json`, the record alone)
    verification.json    `verify`'s report, with a sha256 of every other file (`file_hashes`)
    eval.json            `evaluate`'s report          } written after verification,
    README.md            the model card (`publish`)   } left out of its hashes
    heal/                `heal`'s per-visit LoRA adapter (a PEFT folder) and heal.json

The rules that keep users' files and machines safe live here, once, for every command: an export holds regular
files only and no code but the `modeling_rys.py` rys-forge generates (`check_export`, before anything is loaded);
`publish` and `eval` take only exports whose passing report still matches every file (`check_verified`); `--force`
replaces only a folder rys-forge wrote, never the base or a folder holding foreign files (`check_replaceable`).

A run folder (`rank`, `sweep`): its file names live here; `rys_forge.runs.RunFolder` reads and writes it.
Everything that reads or writes these goes through the names and helpers here; this module imports no other
stage (a leaf: errors and files only).
"""

from __future__ import annotations

# Long because it is the one owner of the export folder: names, the record, hashes, what an export may hold, the
# verification report and the --force rules of every export format in one place (issue #14), not spread over stages.

import json
import os
import re
import struct
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from rys_forge.errors import UsageError, VerificationError
from rys_forge.files import irregular_entries, json_keys, relative_files, sha256_file, write_atomic

# --------------------------------------------------------------------------- file names

CONFIG_FILE = "config.json"
#: A GGUF export's record (the `rys` block a config.json carries in the other formats) and its one model file.
GGUF_RECORD_FILE = "rys.json"
GGUF_SUFFIX = ".gguf"
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
#: Tokenizer and generation files an export carries over from its base (the mergekit exporter copies these).
SIDECAR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                 "generation_config.json")
#: Every name rys-forge writes into an export (besides `*.safetensors`): what `--force` may replace (`check_replaceable`).
EXPORT_NAMES = frozenset((CONFIG_FILE, GGUF_RECORD_FILE, MODELING_FILE, RECIPE_FILE, "model.safetensors.index.json", "spiece.model",
                          "sentencepiece.bpe.model", "vocab.txt", *AFTER_VERIFICATION, *SIDECAR_FILES))
#: What `heal` writes into `DIR/heal` (peft's adapter files and heal.json).
HEAL_NAMES = frozenset((ADAPTER_CONFIG_FILE, *ADAPTER_WEIGHT_FILES, HEAL_FILE, CARD_FILE))
#: `heal`'s staging folder inside the export (`files.staging_dir`): the new adapter, and the previous one while the
#: new one is verified; not part of the export (left out of its hashes, removed afterwards).
HEAL_STAGING = f".{HEAL_DIR}.tmp-"

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
        format: `layerlist`, `mergekit` or `gguf`.
        plan: the plan as stored (`LayerPlan.to_dict()`; read it back with `LayerPlan.from_dict`).
        rys_forge_version: the version that built the export.
        base_model: the base as the user named it (built-in name, folder, .gguf or hub id).
        base_info: the base's provenance (`LoadedModel.info`: description, licence, hub id, GGUF file).
        created: when the export was built (`timestamp()`).
        adapter: a PEFT adapter merged into the base before the plan (`adapters.adapter_record`).
        base_fields: (layer list) the base values of the per-layer config fields, read by modeling_rys.py.
        recipe: (mergekit) the recipe's file name in the folder.
        residual_outputs: (layer list, damped plans only) the modules of a decoder layer whose outputs a visit's
            residual scale multiplies (`ArchSpec.branch_outputs`), read by modeling_rys.py.
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
    residual_outputs: list[str] | None = None
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
    """An export's config.json and its `rys` record; for a GGUF export (no config.json: the model's config is in
    its `.gguf` file), `{}` and the record in `rys.json`.

    Raises:
        VerificationError: no config.json (nor rys.json), not valid JSON, or no `rys` block (not a rys-forge export).
    """
    config_file = Path(folder) / CONFIG_FILE
    if not config_file.is_file() and (Path(folder) / GGUF_RECORD_FILE).is_file():
        return {}, _gguf_record(Path(folder) / GGUF_RECORD_FILE)
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


def _gguf_record(path: Path) -> RysRecord:
    try:
        block = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VerificationError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(block, dict) or block.get("format") != "gguf":
        raise VerificationError(f"{path} is not the record of a rys-forge GGUF export (no format 'gguf')")
    return RysRecord.from_dict(block)


def write_gguf_record(folder: str | Path, record: RysRecord) -> None:
    """Write a GGUF export's `rys.json` (the record; sorted keys, 2-space indent)."""
    (Path(folder) / GGUF_RECORD_FILE).write_text(json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n",
                                                 encoding="utf-8")


def gguf_model_file(folder: str | Path) -> Path:
    """The one `.gguf` file of a GGUF export.

    Raises:
        VerificationError: none, or more than one.
    """
    found = sorted(p for p in Path(folder).iterdir() if p.suffix == GGUF_SUFFIX and p.is_file())
    if len(found) != 1:
        raise VerificationError(f"{folder} holds {len(found)} {GGUF_SUFFIX} files; a GGUF export holds exactly one")
    return found[0]


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


def file_hashes(folder: str | Path, skip_weights: bool = False) -> dict[str, str]:
    """sha256 of every file of an export except those written after verification (`AFTER_VERIFICATION`) and heal's
    staging folder (`HEAL_STAGING`); `skip_weights`: weight files are listed with an empty digest instead (not read).

    Raises:
        VerificationError: the folder holds something that is not a regular file (`check_regular_files`).
    """
    check_regular_files(folder)
    hashes = {}
    for rel in relative_files(folder):
        if rel not in AFTER_VERIFICATION and "__pycache__" not in rel and not rel.startswith(HEAL_STAGING):
            skip = skip_weights and rel.endswith(WEIGHT_SUFFIXES)
            hashes[rel] = "" if skip else sha256_file(Path(folder) / rel)
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


# --------------------------------------------------------------------------- what an export may hold

#: The code rys-forge writes into a layer-list export: the template with two slots filled in at export time.
MODELING_TEMPLATE = Path(__file__).resolve().parent / MODELING_FILE
_SLOTS = {"_BASE_CLASS": ("LlamaForCausalLM", r"[A-Za-z_][A-Za-z0-9_]*"),
          "_LAYERS_PATH": ("model.layers", r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")}
#: The one `auto_map` of a layer-list export's config.json (mergekit exports have none).
LAYERLIST_AUTO_MAP = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.RysForCausalLM"}
#: The template's marked blocks run residual scales; a plain plan's export leaves them out (the file as before scales).
_SCALED_BLOCK = re.compile(r"^[ \t]*# >>> residual scales.*?^[ \t]*# <<< residual scales[^\n]*\n\n*", re.M | re.S)


def modeling_code(base_class: str, layers_path: str, scaled: bool = False) -> str:
    """The `modeling_rys.py` rys-forge writes for a base model class (`Gemma3ForCausalLM`) and the dotted path of
    its decoder layers (`model.layers`); `scaled`: for a plan with residual scales."""
    text = MODELING_TEMPLATE.read_text(encoding="utf-8")
    if not scaled:
        text = _SCALED_BLOCK.sub("", text)
    for (slot, (default, _pattern)), value in zip(_SLOTS.items(), (base_class, layers_path)):
        text = text.replace(f'{slot} = "{default}"', f'{slot} = "{value}"', 1)
    return text


def check_regular_files(folder: str | Path) -> None:
    """Exports hold regular files and folders only: a symbolic link (say to `~/.cache/huggingface/token`), FIFO,
    socket or device would be read, hashed or uploaded as if it were the export's own file.

    Raises:
        VerificationError: naming the first such entry.
    """
    bad = irregular_entries(folder)
    if bad:
        raise VerificationError(f"{folder} holds {bad[0]}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}, which"
                                " is not a regular file (a symbolic link or a special file); an export holds regular"
                                " files only: replace it by a copy or remove it")


def check_export_code(folder: str | Path, config: dict[str, Any], record: RysRecord) -> None:
    """No code runs from an export but the `modeling_rys.py` rys-forge generates, compared byte for byte with
    `modeling_code` before anything imports it. A layer-list export holds exactly that Python file and config.json's
    `auto_map` names it; a mergekit export holds no Python file and no `auto_map`; no other JSON file has one.

    Raises:
        VerificationError: naming the file that does not belong.
    """
    folder, layerlist = Path(folder), record.format == "layerlist"
    code = [rel for rel in relative_files(folder) if rel.endswith(".py") and "__pycache__" not in rel.split("/")]
    extra = [rel for rel in code if not (layerlist and rel == MODELING_FILE)]
    if extra:
        raise VerificationError(f"{folder} holds {extra[0]}: an export of rys-forge holds no Python code but the"
                                f" generated {MODELING_FILE} (layer-list format); refusing to run it")
    expected = LAYERLIST_AUTO_MAP if layerlist else None
    maps = [where for where in json_keys(folder, "auto_map") if where != f"{CONFIG_FILE}:auto_map"]
    if config.get("auto_map") != expected or maps:
        raise VerificationError(f"{folder}: {(maps or [f'{CONFIG_FILE}:auto_map'])[0]} points transformers at code"
                                f" rys-forge did not write (expected {expected}); refusing to load it")
    if not layerlist:
        return
    path = folder / MODELING_FILE
    data = path.read_bytes() if path.is_file() else b""
    text = data.decode("utf-8", errors="replace")
    values = [re.search(rf'^{slot} = "({pattern})"', text, re.M) for slot, (_, pattern) in _SLOTS.items()]
    scaled = isinstance(record.plan, dict) and "residual_scales" in record.plan  # only damped plans store scales
    if not (all(values) and modeling_code(*(m[1] for m in values), scaled=scaled).encode("utf-8") == data):
        raise VerificationError(f"{path} is missing or not the {MODELING_FILE} rys-forge generates (edited, or written"
                                " by another version); refusing to run it: rebuild the export with `rys-forge build`")


def check_export(folder: str | Path) -> tuple[dict[str, Any], RysRecord]:
    """What every reader of an export calls before loading anything from it: regular files only, a config.json
    with the `rys` record, no code but the generated one (`check_export_code`). Returns the config and record.

    Raises:
        VerificationError: the folder is missing, not an export, or holds something it should not.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VerificationError(f"export folder not found: {folder}")
    check_regular_files(folder)
    config, record = read_export_config(folder)
    check_export_code(folder, config, record)
    return config, record


# --------------------------------------------------------------------------- the verification report


def write_verification(folder: str | Path, report: dict[str, Any]) -> None:
    """Write `verification.json` (atomically: a half-written report never exists)."""
    write_atomic(Path(folder) / VERIFICATION_FILE, json.dumps(report, indent=2) + "\n")


def read_report(path: Path) -> dict[str, Any]:
    """A verification report (`verification.json`, or a failed build's `<out>.verification-failed.json`), checked
    for shape: `passed` a bool, `files` a dict of hashes, `failures` a list. It may have failed.

    Raises:
        VerificationError: missing, not valid JSON, or not shaped like `verify` writes it.
    """
    folder = path.parent
    if not path.is_file():
        raise VerificationError(f"{folder} has no {path.name}; run `rys-forge verify {folder}` first")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VerificationError(f"{path} is not a readable report ({type(exc).__name__}: {str(exc)[:80]});"
                                f" run `rys-forge verify {folder}` to write a new one") from None
    if not (isinstance(report, dict) and isinstance(report.get("passed"), bool)
            and isinstance(report.get("files"), dict) and isinstance(report.get("failures", []), list)):
        raise VerificationError(f"{path} is not a verification report of rys-forge (it needs 'passed': true/false,"
                                f" 'files' and 'failures'); run `rys-forge verify {folder}` to write a new one")
    return report


def read_verification(folder: str | Path) -> dict[str, Any]:
    """The folder's `verification.json` (`read_report`)."""
    return read_report(Path(folder) / VERIFICATION_FILE)


def check_verified(folder: str | Path) -> dict[str, Any]:
    """The folder's passing verification report, if the folder passes `check_export` and every file still
    matches the report: the gate of `publish` and `eval`.

    Raises:
        VerificationError: a folder `check_export` refuses; no report, an unreadable or failed one; or files
            added, missing or changed since.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VerificationError(f"export folder not found: {folder}")
    report = read_verification(folder)
    if report["passed"] is not True:
        failures = "; ".join(str(f) for f in report.get("failures") or []) or "no reason recorded"
        raise VerificationError(f"{folder} failed verification: {failures} (rebuild it, or run"
                                f" `rys-forge verify {folder}` again)")
    current, recorded = file_hashes(folder), report["files"]
    changed = sorted(k for k in set(current) | set(recorded) if current.get(k) != recorded.get(k))
    if changed:
        raise VerificationError(f"{folder} changed since verification ({', '.join(changed[:5])}); verify again")
    check_export(folder)  # a forged report may list edited code with its new hash
    return report


# --------------------------------------------------------------------------- replacing a folder (--force)


def _written_by_rys_forge(rel: str) -> bool:
    """Whether a file of an export folder is one rys-forge writes there (or its own interrupted leftover)."""
    top, *rest = rel.split("/")
    if "__pycache__" in rest or top.startswith(HEAL_STAGING):
        return True
    if top == HEAL_DIR:
        return len(rest) == 1 and rest[0] in HEAL_NAMES
    return not rest and (top in EXPORT_NAMES or top.endswith((".safetensors", ".tiktoken", GGUF_SUFFIX))
                         or top.startswith(".") and top.endswith(".tmp"))  # write_atomic's temporary file


def check_replaceable(out: Path, force: bool, protected: dict[str, Path]) -> None:
    """The `--out` rules of every command that writes an export folder, checked before any work: `out` neither is
    nor contains a protected folder (`{"the base model": path, ...}`); an existing `out` is a folder, replaced
    only with `force` and only when empty or a rys-forge export (config.json with a `rys` record) holding nothing
    but what rys-forge writes there.

    Raises:
        UsageError: naming the rule and what stands in the way.
    """
    for label, path in protected.items():
        if out == path or out in path.parents:
            raise UsageError(f"--out {out} {'is' if out == path else 'contains'} {label}; choose another --out")
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder; choose another --out")
    problem = None
    if any(out.iterdir()):
        try:
            read_export_config(out)
            # By name, not by the report's file list: `verify` hashes whatever the folder holds, a user's file too.
            foreign = irregular_entries(out) + [rel for rel in relative_files(out) if not _written_by_rys_forge(rel)]
            problem = f"also holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}" if foreign else None
        except VerificationError:
            problem = "is not a rys-forge export (no readable 'rys' record in config.json or rys.json)"
    if problem:
        raise UsageError(f"output folder {out} {problem}; --force replaces only a folder rys-forge wrote: choose"
                         " another --out, or move those files away yourself")
    if not force:
        raise UsageError(f"output folder {out} exists; pass --force to replace it")


def check_heal_replaceable(path: Path) -> None:
    """`heal` replaces `DIR/heal` (with `--force`) only if rys-forge wrote it: a folder holding heal.json and adapter
    files only, no link or special file.

    Raises:
        UsageError: anything else is there.
    """
    try:
        ours = isinstance(read_json(path / HEAL_FILE, "heal record").get("rys_forge_heal"), int)
    except (UsageError, AttributeError):
        ours = False
    others = [] if path.is_symlink() or not path.is_dir() else irregular_entries(path) + [
        rel for rel in relative_files(path) if rel not in HEAL_NAMES]
    if not ours or others or path.is_symlink():
        raise UsageError(f"{path} exists and is not a heal adapter rys-forge wrote{f' (it holds {others[0]})' if others else ''};"
                         " move it away yourself (heal --force replaces only its own adapter)")


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
