"""SmolLM2-135M-Instruct, as we load it, against transformers' own load of the same GGUF: logits, greedy tokens,
tokenizer ids and the chat template. Also checks of our load alone, which need no transformers."""

from __future__ import annotations

import pytest
import torch

from recyclegpt.config import PRESETS
from recyclegpt.loading.weights import load_gguf

pytestmark = pytest.mark.real_model

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
TEXTS = ["Hello world", "12345 + 67.89 = 1e10, 2024-11-26", "  leading  spaces\n\n\ttabs\r\n",
         "héllo wörld — ünïcode ✓ 日本語 🤗", "a 1 b22 c333 x1y2",
         "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}],
]


def greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens by recomputing the whole sequence each step: slow, but it has no cache to get wrong."""
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            logits = model(x).logits[0, -1]
            x = torch.cat([x, logits.argmax().view(1, 1)], dim=1)
    return x[0, len(ids):].tolist()


# -- our load alone --------------------------------------------------------------------------------------------


def test_config_and_tokenizer_metadata(smollm2):
    model, tok = smollm2
    assert model.cfg == PRESETS["smollm2-135m"]
    assert model.lm_head.weight is model.tok_emb.weight
    assert tok.eos_ids == (2, 0) and tok.bos_id == 1 and not tok.add_bos  # <|im_end|>, then <|endoftext|>
    assert tok.special_tokens["eos_token"] == "<|im_end|>"


def test_cached_conversion_equals_a_fresh_one(smollm2_gguf, smollm2):
    model, tok = smollm2  # load_base goes through the converted copy in the cache
    cfg, sd, fresh_tok = load_gguf(smollm2_gguf)
    assert cfg == model.cfg
    for name, w in model.state_dict().items():
        assert torch.equal(w, sd[name]), name
    for text in TEXTS:
        assert tok.encode(text) == fresh_tok.encode(text)
    assert tok.chat_template == fresh_tok.chat_template


def test_greedy_completion_is_sensible(smollm2):
    model, tok = smollm2
    assert tok.decode(greedy(model, tok.encode(PROMPTS[0]), 2)).startswith(" Paris")


# -- against transformers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                              dtype=torch.float32)
    assert model.lm_head.weight.dtype == torch.float32  # dequantized, as ours
    return model.eval()


def test_logits_match_transformers(smollm2, hf_model, record_property):
    model, tok = smollm2
    worst = 0.0
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            ours, theirs = model(ids).logits, hf_model(ids).logits
        worst = max(worst, (ours - theirs).abs().max().item())
    record_property("max_abs_logit_diff", worst)
    print(f"SmolLM2 logits, max abs diff vs transformers: {worst:.3g}")
    assert worst < 1e-3


def test_greedy_tokens_match_transformers(smollm2, hf_model):
    model, tok = smollm2
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        with torch.no_grad():  # the reference decodes with its own KV cache; ours recomputes (the oracle)
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert greedy(model, ids, 20) == ref[0, len(ids):].tolist(), prompt


def test_tokenizer_matches_transformers(smollm2, hf_tokenizer):
    _, tok = smollm2
    for text in TEXTS:
        assert tok.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text)) == hf_tokenizer.decode(hf_tokenizer.encode(
            text, add_special_tokens=False), skip_special_tokens=True), text


def test_chat_template_matches_transformers(smollm2, hf_tokenizer):
    _, tok = smollm2
    for messages in CONVERSATIONS:
        for add in (True, False):
            ours = tok.apply_chat_template(messages, add_generation_prompt=add)
            assert ours == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert tok.encode(ours) == hf_tokenizer.encode(ours, add_special_tokens=False)
