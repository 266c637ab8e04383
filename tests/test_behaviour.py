"""bench/compare_behaviour.py: its comparison ignores only noise, and (opt-in) today's CLI matches a baseline.

The end-to-end check runs only when RYS_BEHAVIOUR_BASELINE names a folder written by
``python bench/compare_behaviour.py run`` from the reference commit (a few minutes on CPU)::

    RYS_BEHAVIOUR_BASELINE=/work/behaviour_baseline pytest tests/test_behaviour.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "compare_behaviour.py"


def _script():
    spec = importlib.util.spec_from_file_location("compare_behaviour", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_run(root: Path, *, seconds: float, weights: bytes, stray: bool = False, score: float = 0.5) -> Path:
    """A run folder as `run` writes it, small enough to write by hand."""
    (root / "llama" / "export").mkdir(parents=True)
    (root / "llama" / "logs").mkdir()
    (root / "manifest.json").write_text(json.dumps({
        "package_dir": str(root / "pkg" / "rys_forge"), "models_dir": str(root / "models"),
        "inputs": {"llama": {"model.safetensors": "abc"}},
        "runs": [{"model": "llama", "step": "build", "args": [], "returncode": 0, "seconds": seconds}],
    }))
    (root / "llama" / "export" / "model.safetensors").write_bytes(weights)
    (root / "llama" / "export" / "eval.json").write_text(json.dumps({
        "settings": {"base": str(root / "models" / "llama"), "versions": {"torch": f"2.{int(seconds)}"}},
        "timings": {"total": seconds}, "created": f"2026-01-0{int(seconds) % 9 + 1}T00:00:00+00:00",
        "rows": [{"metric": "acc", "score": score, "probe_s": seconds}],
        "files": {"config.json": f"hash-{seconds}", "model.safetensors": "same"},
    }))
    (root / "llama" / "export" / "windows.csv").write_text(f"window,score,probe_s\n2:4,{score},{seconds}\n")
    (root / "llama" / "export" / "README.md").write_text(
        f"Built by rys-forge 0.1.{int(seconds)} on 2026-01-02T03:04:05+00:00 from {root}/models/llama\n")
    (root / "llama" / "logs" / "build.stdout").write_text(f"timings: load_s {seconds}s\nexport: {root}/llama/export\n")
    (root / "llama" / "logs" / "build.stderr").write_text(f"{root}/pkg/rys_forge/x.py:{int(seconds)}: FutureWarning\n")
    if stray:
        (root / "llama" / "cwd" / "build" / "recipes").mkdir(parents=True)
        (root / "llama" / "cwd" / "build" / "recipes" / "r.yml").write_text("x: 1\n")
    return root


def test_compare_ignores_timings_versions_dates_and_paths(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", seconds=1.0, weights=b"\x00\x01")
    b = _fake_run(tmp_path / "b", seconds=7.0, weights=b"\x00\x01")
    assert _script().compare(a, b) == 0, capsys.readouterr().out


@pytest.mark.parametrize("change", ["weights", "score", "stray"])
def test_compare_catches_a_change(tmp_path, capsys, change):
    a = _fake_run(tmp_path / "a", seconds=1.0, weights=b"\x00\x01")
    b = _fake_run(tmp_path / "b", seconds=1.0, weights=b"\x00\x02" if change == "weights" else b"\x00\x01",
                  score=0.25 if change == "score" else 0.5, stray=change == "stray")
    assert _script().compare(a, b) == 1
    out = capsys.readouterr().out
    expected = {"weights": "model.safetensors  DIFF", "score": "eval.json", "stray": "ONLY IN B"}[change]
    assert expected in out


def test_compare_tolerance_is_opt_in(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", seconds=1.0, weights=b"\x00", score=0.5)
    b = _fake_run(tmp_path / "b", seconds=1.0, weights=b"\x00", score=0.50000001)
    script = _script()
    assert script.compare(a, b) == 1
    assert script.compare(a, b, script.Tolerance(rtol=1e-6)) == 0
    assert "close" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RYS_BEHAVIOUR_BASELINE"), reason="set RYS_BEHAVIOUR_BASELINE to a baseline run")
def test_cli_behaviour_matches_baseline(tmp_path):
    baseline = Path(os.environ["RYS_BEHAVIOUR_BASELINE"])
    manifest = json.loads((baseline / "manifest.json").read_text())
    archs = sorted({run["model"] for run in manifest["runs"]})
    now = tmp_path / "now"
    subprocess.run([sys.executable, str(SCRIPT), "run", str(now), "--archs", ",".join(archs),
                    "--models", manifest["models_dir"]], check=True, cwd=tmp_path)
    proc = subprocess.run([sys.executable, str(SCRIPT), "compare", str(baseline), str(now)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
