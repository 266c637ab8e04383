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
