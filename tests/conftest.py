"""Shared fixtures: a tiny random Llama for fast tests, an isolated cache directory."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the seeded tiny Llama; do not mutate it in tests."""
    from edgefuse.models import tiny_model

    return tiny_model()


@pytest.fixture(scope="session")
def mmlu():
    from edgefuse.data.mmlu import load_mmlu

    return load_mmlu()


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFUSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
