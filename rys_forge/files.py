"""Small file helpers shared by the pipeline stages: atomic writes and sha256 digests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


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
    try:
        tmp.write_bytes(text.encode() if isinstance(text, str) else text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
