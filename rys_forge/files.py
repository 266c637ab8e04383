"""Small file helpers shared by the pipeline stages: atomic writes, sha256 digests, JSON-safe values, and
folders built in a hidden staging sibling and swapped into place (cleaned up on errors, Ctrl-C and SIGTERM)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (weight files are large)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write a file via a temporary sibling and `os.replace` (the sibling never survives a failed write)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with terminate_as_interrupt():
        try:
            tmp.write_bytes(text.encode() if isinstance(text, str) else text)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

def json_safe(value: Any) -> Any:
    """Convert to plain JSON types: non-finite floats -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


# --------------------------------------------------------------------------- folders: staging, swapping, walking


#: The signals that end a process politely; rys-forge turns them into exceptions so `finally` blocks clean up.
TERMINATING_SIGNALS = ("SIGTERM", "SIGHUP")


@contextmanager
def signals_raise(make: Callable[[int], BaseException], *, only_default: bool) -> Iterator[None]:
    """While active, SIGTERM and SIGHUP raise `make(signum)`, so `finally` blocks clean up as on Ctrl-C (a
    signal left at its default ends the process without running them). `only_default`: replace only default
    handlers (one the program installed stays); otherwise any handler but an ignored signal (nohup stays nohup).
    The previous handlers come back afterwards. Outside the main thread (where Python cannot install
    handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise make(signum)

    previous = {}
    for name in TERMINATING_SIGNALS:
        number = getattr(signal, name, None)
        current = signal.getsignal(number) if number is not None else None
        if number is not None and (current is signal.SIG_DFL if only_default else current is not signal.SIG_IGN):
            previous[number] = signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def terminate_as_interrupt() -> contextlib.AbstractContextManager[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt while active, where their handlers are still the default
    (the CLI's own handler, raising `errors.Terminated`, stays)."""
    return signals_raise(lambda signum: KeyboardInterrupt(f"signal {signum}"), only_default=True)


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; the ones created, outermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


@contextmanager
def staging_dir(parent: Path, name: str) -> Iterator[Path]:
    """A new hidden folder `parent/.<name>.tmp-XXXX` (mode 0755) to build something in, removed on leaving
    whatever happens, including SIGTERM (`terminate_as_interrupt`); `parent` is created if missing and, after a
    failure, removed again if this made it and it is empty."""
    with terminate_as_interrupt():
        made = _make_parents(parent)
        ok = False
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
            try:
                os.chmod(staging, 0o755)  # mkdtemp makes it 0700; what is renamed out of it reads like any folder
                yield staging
                ok = True
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            for folder in reversed(made if not ok else []):
                with contextlib.suppress(OSError):
                    folder.rmdir()


@contextmanager
def swapped_in(new: Path, target: Path, aside: Path) -> Iterator[None]:
    """Rename `new` to `target`, moving a previous `target` to `aside` first (`aside`: a free path on the same
    file system, e.g. inside a `staging_dir`, which then removes it). If the body raises (or is interrupted),
    the swap is undone: the new one is removed and the previous one put back."""
    had = os.path.lexists(target)
    if had:
        os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        if had:
            os.replace(aside, target)
        raise
    try:
        yield
    except BaseException:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
        if had:
            os.replace(aside, target)
        raise


def irregular_entries(folder: str | Path) -> list[str]:
    """Entries below `folder` (relative POSIX paths) that are neither regular files nor folders: symbolic links
    (to files or folders, never followed), FIFOs, sockets, devices. Nothing is opened."""
    root = Path(folder)
    found = []
    for current, dirs, names in os.walk(root, followlinks=False):
        for name in sorted(dirs + names):
            path = Path(current) / name
            mode = path.lstat().st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def relative_files(folder: str | Path) -> list[str]:
    """Relative POSIX paths of the regular files below `folder` (links are not followed), sorted."""
    root = Path(folder)
    return sorted((Path(current) / name).relative_to(root).as_posix()
                  for current, _dirs, names in os.walk(root) for name in names
                  if stat.S_ISREG((Path(current) / name).lstat().st_mode))


def json_marker(path: str | Path, key: str) -> Any:
    """The value of `key` at the top level of the JSON object in `path` (a format marker such as
    `rys_forge_eval`); None when the file cannot be read, is not JSON, is not an object or has no such key."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def json_keys(folder: str | Path, key: str) -> list[str]:
    """Where the top-level `*.json` files of `folder` hold `key`, at their top level or one level down, as
    `file.json:key` / `file.json:section.key` (files that are not JSON objects are skipped)."""
    found = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            found += [f"{path.name}:{key}"] if key in data else []
            found += [f"{path.name}:{name}.{key}" for name, value in data.items() if isinstance(value, dict) and key in value]
    return found
