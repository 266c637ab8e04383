"""Shared fixtures: tiny random models of every supported architecture, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import MODEL_TYPES, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """model_type -> folder of a saved tiny random model with tokenizer."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {mt: make_tiny_model(mt, root / mt) for mt in MODEL_TYPES}


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep tests from writing to the user's cache, except the real-model GGUF conversions (slow)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    yield


@pytest.fixture(autouse=True)
def _matmul_precision_restored():
    """`rank --matmul bf16` switches a process-wide torch flag; no test may leave it switched (every later
    float32 product would round its inputs to bfloat16)."""
    import torch

    before = torch.backends.mkldnn.matmul.fp32_precision
    yield
    assert torch.backends.mkldnn.matmul.fp32_precision == before, "a test left CPU matmuls in bf16 math mode"


@pytest.fixture(scope="module")
def single_thread_loader(tmp_path_factory):
    """``load(model_dir)``: a loaded model (RysForge cache in a temporary folder, torch on one thread) for
    the module's tests; thread count and environment are restored afterwards."""
    import torch

    from rys_forge.models import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RYS_FORGE_CACHE", str(tmp_path_factory.mktemp("rys-cache")))
        yield lambda model_dir: load_model(str(model_dir))
    torch.set_num_threads(threads)


@pytest.fixture
def interrupt_scoring(monkeypatch):
    """``disarm = interrupt_scoring(n)``: the cached engine's scorer raises KeyboardInterrupt on its n-th window (a
    Ctrl-C in the middle of a sweep; the windows before it are scored as usual) until ``disarm()``."""
    from rys_forge.research import sweep_engine

    def arm(n: int):
        calls = []
        original = sweep_engine.WindowScorer.__call__

        def interrupting(self, run):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return original(self, run)

        monkeypatch.setattr(sweep_engine.WindowScorer, "__call__", interrupting)
        return lambda: monkeypatch.setattr(sweep_engine.WindowScorer, "__call__", original)

    return arm
