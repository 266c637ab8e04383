"""The folders rys-forge writes and reads: run folders (rank, sweep) and, later, export folders."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rys_forge.distributed import Shard
from rys_forge.errors import UsageError
from rys_forge.files import json_safe, write_atomic


class RunFolder:
    """A run's folder: settings fingerprint in run.json, append-only fsynced logs (one per process:
    ``<stem>.jsonl`` or ``<stem>.rank<r>.jsonl``), atomic final files. rank's records are merged per
    window (a later record, e.g. a Jacobian, updates the window's row)."""

    stem, key, merge = "windows", "window", True

    def __init__(self, path: Path, fingerprint: dict[str, Any], resume: bool, log_name: str | None = None):
        self.path = Path(path)
        self.log = self.path / (log_name or f"{self.stem}.jsonl")
        settings_file = self.path / "run.json"
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
