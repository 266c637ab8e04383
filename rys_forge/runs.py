"""Run folders of rank and sweep: the settings fingerprint (run.json), per-process logs, the lock, atomic
outputs and one-line errors. File names and version stamps come from `artifacts`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rys_forge.artifacts import AFTER_VERIFICATION, RUN_FILE, read_json, versions
from rys_forge.distributed import Shard
from rys_forge.errors import UsageError
from rys_forge.files import json_safe, write_atomic


class RunFolder:
    """A run's folder: settings fingerprint in run.json, append-only fsynced logs (one per process:
    ``<stem>.jsonl`` or ``<stem>.rank<r>.jsonl``), atomic final files. rank's records are merged per
    window (a later record, e.g. a Jacobian, updates the window's row).

    `session` is the way in and holds the rules of every run folder: the fingerprint always includes
    `model_identity` (a resume is refused when anything that changes the numbers differs); an advisory lock
    (`flock`) held for the run refuses a second process; a run that fails before anything is recorded
    leaves nothing behind (no run.json, so no `--resume` needed); a failed write is one line naming the
    file, what was recorded stays and `--resume` continues."""

    stem, key, merge = "windows", "window", True
    #: Digest of a model file: SAMPLES blocks of BLOCK bytes spread over it (weights are gigabytes).
    DIGEST_SAMPLES, DIGEST_BLOCK = 64, 1 << 16

    def __init__(self, path: Path, log_name: str | None = None):
        self.path = Path(path)
        self.log = self.path / (log_name or f"{self.stem}.jsonl")
        self._created: list[Path] = []  # what `claim` created, deepest first: run.json, new folders
        self._lock_fd: int | None = None
        self._log_checked = False

    @classmethod
    def session(cls, out_dir: str | Path | None, fingerprint: dict[str, Any], resume: bool, shard: Shard, *,
                model: Any, model_info: dict[str, Any] | None) -> Any:
        """``with RunFolder.session(...) as folder:`` this process's run folder (None without `out_dir`). Rank 0
        creates or checks it (`fingerprint` plus `model_identity`) and holds its lock; every process appends
        to its own log.

        Raises:
            UsageError: a parallel run without `out_dir`; a folder that exists without `resume`, is not a run
                folder, is in use, cannot be created or written, or holds another fingerprint.
        """
        from contextlib import nullcontext

        if out_dir is None:
            if shard.parallel:
                raise UsageError("a window-parallel run needs a run folder (--out) to merge the processes' results")
            return nullcontext()
        folder = cls(Path(out_dir), shard.log_name(cls.stem))
        full = {**fingerprint, "model_identity": cls.model_identity(model, model_info)}
        shard.on_rank0(lambda: folder.claim(json_safe(full), resume))
        return folder

    def claim(self, fingerprint: dict[str, Any], resume: bool) -> None:
        """Lock the folder, then create it with run.json, or check an existing one against `fingerprint`."""
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path} is a file, not a run folder; choose another --out")
        self._created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock()
            if not os.access(self.path, os.W_OK | os.X_OK):
                raise UsageError(f"run folder {self.path} is not writable; choose another --out")
            settings = self.path / RUN_FILE
            if not any(self.path.iterdir()):
                self.write(RUN_FILE, json.dumps(fingerprint, indent=2))
                self._created.insert(0, settings)
            elif not resume:
                raise UsageError(f"run folder {self.path} already exists; pass --resume to continue it or choose another --out")
            elif not settings.is_file():
                raise UsageError(f"{self.path} is not a run folder (no {RUN_FILE}); choose another --out")
            elif changed := self._differences(read_json(settings, "run settings"), fingerprint):
                raise UsageError(f"cannot resume {self.path}: settings differ from the original run ({'; '.join(changed[:6])})")
        except OSError as exc:
            from rys_forge.errors import OutputError, os_error_message

            self._close(failed=True)
            raise OutputError(f"cannot create the run folder: {os_error_message(exc)}") from None
        except BaseException:
            self._close(failed=True)
            raise

    @classmethod
    def _differences(cls, old: Any, new: Any, key: str = "") -> list[str]:
        """Dotted keys where two fingerprints differ (with both values when they are short)."""
        if isinstance(old, dict) and isinstance(new, dict):
            return [d for k in sorted(set(old) | set(new)) for d in cls._differences(old.get(k), new.get(k), f"{key}.{k}".lstrip("."))]
        text = f"{key}: {json.dumps(old)} -> {json.dumps(new)}"
        return [] if old == new else [text if len(text) < 100 else key or RUN_FILE]

    def _lock(self) -> None:
        """An exclusive advisory lock on the folder until `_close` (none without `flock`: Windows, some mounts)."""
        try:
            import fcntl
        except ImportError:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._lock_fd, fd = fd, -1
        except BlockingIOError:
            raise UsageError(f"run folder {self.path} is in use by another rys-forge process; wait for it or choose another --out") from None
        except OSError:
            pass
        finally:
            if fd >= 0:
                os.close(fd)

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, traceback: Any) -> None:
        self._close(failed=exc is not None)
        name = exc.filename if isinstance(exc, OSError) else None
        if name and Path(os.path.abspath(name)).is_relative_to(os.path.abspath(self.path)):
            raise self._write_error(Path(name), exc) from None  # type: ignore[arg-type]

    def _close(self, failed: bool) -> None:
        """Release the lock; after a failure with nothing recorded (only run.json), remove what `claim` created."""
        try:
            if failed and self.path.is_dir() and all(p.name == RUN_FILE for p in self.path.iterdir()):
                for path in self._created:  # run.json, then the new folders, deepest first
                    path.rmdir() if path.is_dir() else path.unlink()
        except OSError:
            pass  # best effort: a folder is no longer empty
        finally:
            self._created = []
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def _write_error(self, path: Path, exc: OSError) -> Exception:
        from rys_forge.errors import RysForgeError, os_error_message

        return RysForgeError(f"cannot write {os_error_message(exc, path)} (what was recorded is kept: continue with"
                             f" --resume --out {self.path})")

    def write(self, name: str, data: Any) -> Path:
        """Write the folder's file `name`: `data` (str or bytes, atomically: a temporary sibling renamed into
        place) or, if callable, `data(path)` (a figure); an OSError is one line naming the file."""
        path = self.path / name
        return self._guarded(path, lambda: data(path) if callable(data) else write_atomic(path, data))

    def _guarded(self, path: Path, action: Any) -> Path:
        """`action()`; an OSError becomes one line naming `path`, raised outside the handler so that it is not
        chained to the OSError (whose generic one-line form would hide the file and the `--resume` hint)."""
        try:
            action()
            return path
        except OSError as exc:
            error = self._write_error(path, exc)
        raise error

    @classmethod
    def model_identity(cls, model: Any, info: dict[str, Any] | None) -> dict[str, Any]:
        """What changes a run's numbers besides its settings: the model (`source`, `adapter`, and `[size,
        digest]` of each file of its folder `path`; None for a hub id), its parameters' dtypes and device types,
        the attention implementation, and the rys-forge, torch and transformers versions."""
        import hashlib

        info, files = info or {}, None
        folder = Path(str(info["path"])) if info.get("path") else None
        if folder is not None and folder.is_dir():
            files = {}
            for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name not in AFTER_VERIFICATION):
                size, digest = path.stat().st_size, hashlib.sha256()
                with path.open("rb") as handle:
                    for offset in range(0, size, max(cls.DIGEST_BLOCK, size // cls.DIGEST_SAMPLES)):
                        handle.seek(offset)
                        digest.update(handle.read(cls.DIGEST_BLOCK))
                files[path.name] = [size, digest.hexdigest()[:16]]
        params = list(model.parameters())
        return {
            "source": info.get("source"), "adapter": info.get("adapter"), "files": files,
            "dtype": sorted({str(p.dtype).removeprefix("torch.") for p in params}),
            "device_type": sorted({p.device.type for p in params}),
            "attention": getattr(getattr(model, "config", None), "_attn_implementation", None),
            "versions": versions("torch", "transformers"),
        }

    @classmethod
    def records(cls, path: str | Path) -> dict[str, dict[str, Any]]:
        """The records of every process's log, by key (merged or replaced; a torn or garbled line is ignored)."""
        rows: dict[str, dict[str, Any]] = {}
        for log in sorted(Path(path).glob(f"{cls.stem}*.jsonl")):
            for line in log.read_bytes().decode("utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(record, dict) or not isinstance(record.get(cls.key), str):
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
        """Append `record` to this process's log, fsynced (a torn last line, left by a crash, is ended first)."""
        line = json.dumps(json_safe(record)) + "\n"

        def write() -> None:
            with self.log.open("a+b") as handle:  # appends go to the end whatever the read position
                size = handle.seek(0, os.SEEK_END)
                if size and not self._log_checked:
                    handle.seek(size - 1)
                    if handle.read(1) != b"\n":
                        handle.write(b"\n")  # end a torn last line left by a crash
                self._log_checked = True
                handle.write(line.encode())
                handle.flush()
                os.fsync(handle.fileno())

        self._guarded(self.log, write)
