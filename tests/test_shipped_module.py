"""The module shipped for SmolLM2-135M-Instruct: its files, its card, and its agreement α with the full model.

α on four fixed prompts (the demo's first four, 64 greedy tokens, CPU fp32) was measured at 0.617 for the first
shipped module, 0.648 for the second and 0.633 for the third (2026-11-26) (an untrained module gives ~0.0, the first small-data module ~0.48 on held-out prompts); the
floor of 0.5 fails if the file is swapped for a weaker or broken module or if loading mangles it (dtype, layout).
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch

from recyclegpt.api import RecycleGPT
from recyclegpt.bench import BUILTIN_PROMPTS
from recyclegpt.config import RecycleConfig
from recyclegpt.evaluation import evaluate_agreement
from recyclegpt.registry import DEFAULT_MODEL, shipped_module

ALPHA_FLOOR = 0.5


def test_the_default_model_has_a_shipped_module_within_the_size_budget():
    path = shipped_module(DEFAULT_MODEL)
    assert path is not None, "no module shipped for the default model"
    assert (path / "module.safetensors").stat().st_size <= 30e6
    meta = json.loads((path / "recycle.json").read_text())
    assert meta["base"]["ref"] == DEFAULT_MODEL
    RecycleConfig.from_dict(meta["recycle"])  # a valid module config
    card = (path / "MODEL_CARD.md").read_text()
    for must in ("sha256", "make_smollm2_module.sh", "α"):
        assert must in card
    tensors = safetensors.torch.load_file(str(path / "module.safetensors"))
    assert {str(t.dtype) for k, t in tensors.items() if k != "draft_ids"} == {"torch.bfloat16"}
    cfg = RecycleConfig.from_dict(meta["recycle"])
    if cfg.draft_vocab:  # token ids, kept exact (an int tensor, increasing, inside the vocabulary)
        ids = tensors["draft_ids"]
        assert ids.dtype.is_floating_point is False and ids.numel() == cfg.draft_vocab
        assert bool((ids[1:] > ids[:-1]).all()) and int(ids[-1]) < meta["base"]["config"]["vocab_size"]


@pytest.mark.real_model
def test_shipped_module_agrees_with_the_full_model(smollm2_gguf):
    lm = RecycleGPT.from_pretrained(DEFAULT_MODEL, device="cpu")  # recycle="default": the shipped module
    assert lm.model is not None and lm.module_source == str(shipped_module(DEFAULT_MODEL))
    assert sum(p.numel() for p in lm.model.module.parameters()) < 0.1 * sum(p.numel() for p in lm.base.parameters())
    prompts = [lm.encode(p, chat=True) for p in BUILTIN_PROMPTS[:4]]
    res = evaluate_agreement(lm, prompts, max_new_tokens=64, scoring="recycle")
    assert res["n"] >= 100
    assert res["alpha"] >= ALPHA_FLOOR, f"shipped module's alpha {res['alpha']:.3f} is below {ALPHA_FLOOR}"
