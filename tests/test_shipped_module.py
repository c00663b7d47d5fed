"""The modules shipped for SmolLM2-135M-Instruct (the default and each named variant): their files, their cards, and
their agreement α with the full model.

α on four fixed prompts (the demo's first four, 64 greedy tokens, CPU fp32) was measured at 0.617 for the first
shipped module, 0.648 for the second and 0.633 for the third (2026-11-26), and at 0.586 for the one-layer variant
(2026-11-27) (an untrained module gives ~0.0, the first small-data module ~0.48 on held-out prompts); the floor of
0.5 fails if a file is swapped for a weaker or broken module or if loading mangles it (dtype, layout).
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch

from recyclegpt.api import RecycleGPT
from recyclegpt.config import RecycleConfig
from recyclegpt.evals.quality import evaluate_agreement
from recyclegpt.evals.speed import BUILTIN_PROMPTS
from recyclegpt.loading.registry import DEFAULT_MODEL, shipped_module, shipped_modules

ALPHA_FLOOR = 0.5
SHIPPED = sorted(shipped_modules(DEFAULT_MODEL))
# depth of each shipped module, so that a file swapped for another depth fails
LAYERS = {DEFAULT_MODEL: 2, f"{DEFAULT_MODEL}-l1": 1}


def test_the_default_model_has_a_shipped_module_and_the_one_layer_variant():
    assert shipped_module(DEFAULT_MODEL) is not None, "no module shipped for the default model"
    assert SHIPPED == sorted(LAYERS), f"shipped modules {SHIPPED}, expected {sorted(LAYERS)}"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_module_files_within_the_size_budget(name):
    path = shipped_modules(DEFAULT_MODEL)[name]
    assert (path / "module.safetensors").stat().st_size <= 30e6
    meta = json.loads((path / "recycle.json").read_text())
    assert meta["base"]["ref"] == DEFAULT_MODEL
    cfg = RecycleConfig.from_dict(meta["recycle"])  # a valid module config, of the expected depth
    assert cfg.n_layer == LAYERS[name]
    card = (path / "MODEL_CARD.md").read_text()
    for must in ("sha256", "Re-create it", "α", "module.safetensors"):
        assert must in card, f"{name}'s card lacks {must!r}"
    if name == DEFAULT_MODEL:
        assert "make_smollm2_module.sh" in card
    tensors = safetensors.torch.load_file(str(path / "module.safetensors"))
    assert {str(t.dtype) for k, t in tensors.items() if k != "draft_ids"} == {"torch.bfloat16"}
    if cfg.draft_vocab:  # token ids, kept exact (an int tensor, increasing, inside the vocabulary)
        ids = tensors["draft_ids"]
        assert ids.dtype.is_floating_point is False and ids.numel() == cfg.draft_vocab
        assert bool((ids[1:] > ids[:-1]).all()) and int(ids[-1]) < meta["base"]["config"]["vocab_size"]


@pytest.mark.real_model
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_module_agrees_with_the_full_model(smollm2_gguf, name):
    # the default through recycle="default", a variant through its name (`--recycle NAME`)
    lm = RecycleGPT.from_pretrained(DEFAULT_MODEL, device="cpu", recycle="default" if name == DEFAULT_MODEL else name)
    assert lm.model is not None and lm.module_source == str(shipped_modules(DEFAULT_MODEL)[name])
    assert len(lm.model.module.layers) == LAYERS[name]
    assert sum(p.numel() for p in lm.model.module.parameters()) < 0.1 * sum(p.numel() for p in lm.base.parameters())
    prompts = [lm.encode(p, chat=True) for p in BUILTIN_PROMPTS[:4]]
    res = evaluate_agreement(lm, prompts, max_new_tokens=64, scoring="recycle")
    assert res["n"] >= 100
    assert res["alpha"] >= ALPHA_FLOOR, f"{name}'s alpha {res['alpha']:.3f} is below {ALPHA_FLOOR}"
