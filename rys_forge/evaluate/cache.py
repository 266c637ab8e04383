"""The base-results cache: one base model's lm-eval run, reused by every variant evaluated against it.

Entries live under ``cache_dir()/eval/<sha256>.json`` (``{"key", "run", "created"}``), keyed by the base
model's identity (a local folder: its path and the size and mtime of its files; a built-in or hub name: the
name), the tasks (with a fingerprint of their configs and local data files), limit, few-shot count, dtype,
device type, batch size, lm-eval version, seed, bootstrap iterations, attention backend and a merged adapter.
A cache that cannot be read or written only costs a re-run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rys_forge.errors import RysForgeError
from rys_forge.evaluate.local_tasks import task_data_files
from rys_forge.evaluate.report import EVAL_FILE, write_texts_atomically
from rys_forge.evaluate.runner import lm_eval_version
from rys_forge.files import json_safe
from rys_forge.models import BUILTIN_MODELS, cache_dir

__all__ = ["CACHE_FORMAT", "base_cache_key", "base_identity", "cache_path", "key_digest", "read_cache", "write_cache"]

#: Version of the base-cache entry layout (part of the cache key).
CACHE_FORMAT = 1
#: Top-level files of a model folder that identify its weights (for the base-cache key).
_IDENTITY_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt", ".py", ".tiktoken")
_IDENTITY_SKIP = frozenset({EVAL_FILE})
_LOG = logging.getLogger("rys_forge.evaluate")


def base_identity(source: str) -> dict[str, Any]:
    """What identifies a base model's results: a local folder or file by its path and the name, size and
    mtime of its weight/config/tokenizer files; a built-in short name or hub id by the name."""
    if source in BUILTIN_MODELS:
        return {"builtin": source}
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file():
            files = [path]
        else:
            files = sorted(
                p
                for p in path.iterdir()
                if p.is_file() and p.suffix in _IDENTITY_SUFFIXES and p.name not in _IDENTITY_SKIP
            )
        return {
            "path": str(path.resolve()),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        }
    return {"name": source}


def key_digest(data: Any) -> str:
    """Hex sha256 of ``data`` as sorted-key JSON (the cache file's name for a key)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _task_members(entry: Any, cfg: dict[str, Any]) -> list[str]:
    """Direct members of a task-index entry: a tag's tasks, a group's tasks and subgroups."""
    kind = getattr(entry.kind, "name", "")
    if kind == "TAG":
        return sorted(entry.tags)
    members: list[str] = []
    if kind == "GROUP":
        listed = cfg.get("task")
        for member in listed if isinstance(listed, list) else [listed]:
            if isinstance(member, str):
                members.append(member)
            elif isinstance(member, dict) and isinstance(member.get("group") or member.get("task"), str):
                members.append(member.get("group") or member.get("task"))
    return members


def _task_fingerprint(names: Sequence[str], manager: Any) -> dict[str, Any]:
    """Hash of every named task's config (group members included) and its local data files' size/mtime."""
    configs: dict[str, str] = {}
    index = getattr(manager, "task_index", {}) or {}

    def walk(name: str) -> None:
        if name in configs:
            return
        entry = index.get(name)
        if entry is None:  # a YAML file path or an unindexed name: hash the file when there is one
            path = Path(name).expanduser()
            configs[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "?"
            return
        cfg = entry.cfg if isinstance(entry.cfg, dict) else {}
        configs[name] = key_digest(cfg)
        for member in _task_members(entry, cfg):
            walk(member)

    data: dict[str, Any] = {}
    for name in names:
        walk(name)
        files = []
        for path in task_data_files(name, manager):
            try:
                stat = path.stat()
                files.append([str(path), stat.st_size, stat.st_mtime_ns])
            except OSError:
                files.append([str(path), None, None])
        data[name] = files
    return {"configs": configs, "data_files": data}


def base_cache_key(
    base: str,
    tasks: Sequence[str],
    *,
    manager: Any = None,
    limit: int | None,
    num_fewshot: int | None,
    dtype: str,
    device_type: str,
    batch_size: int | str,
    seed: int,
    bootstrap_iters: int,
    attn_implementation: str | None,
    adapter: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The settings that determine a base model's lm-eval results (hashed into the cache file name).

    ``adapter`` is the identity of a PEFT adapter merged into the base (``adapters.identity``); keys without
    an adapter are unchanged, so earlier cache entries stay valid.
    """
    key = {
        "cache_format": CACHE_FORMAT,
        "base": base_identity(base),
        "tasks": list(tasks),
        "task_fingerprint": _task_fingerprint(tasks, manager) if manager is not None else None,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "dtype": dtype,
        "device_type": device_type,
        "batch_size": str(batch_size),
        "lm_eval": lm_eval_version(),
        "seed": seed,
        "bootstrap_iters": bootstrap_iters,
        "attn_implementation": attn_implementation,
    }
    if adapter is not None:
        key["adapter"] = adapter
    return key


def cache_path(key: dict[str, Any]) -> Path:
    """The cache file of a key: ``cache_dir()/eval/<sha256 of the key>.json``."""
    return cache_dir() / "eval" / f"{key_digest(key)}.json"


def read_cache(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached base run at ``path`` if it exists and was stored under ``key``, else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != json_safe(key) or not isinstance(data.get("run"), dict):
        return None
    return data["run"]


def write_cache(path: Path, key: dict[str, Any], run: dict[str, Any]) -> bool:
    """Store a base run; a cache that cannot be written only costs a re-run later (returns False)."""
    try:
        write_texts_atomically(
            {path: json.dumps(json_safe({"key": key, "run": run, "created": time.time()}), allow_nan=False)}
        )
    except RysForgeError as exc:
        _LOG.warning("could not write the base-results cache %s: %s", path, exc)
        return False
    return True
