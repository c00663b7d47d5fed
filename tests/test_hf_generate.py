"""`recyclegpt.hf.generate` as transformers' `custom_generate`: the lossless strategies give exactly transformers'
own greedy tokens (a tiny random LLaMA, and SmolLM2-135M-Instruct with its shipped module on 20 prompts), sampling
is reproducible and distributed as the model's own, and the lossy schedule gives the project's `recycle` tokens.

A random module drafts badly, so acceptances would be rare on the tiny model. `mirror` builds a module that runs
the base's own layers on the new token's embedding alone (h_t ignored): it drafts what the base would predict
without the first token of the context, so drafts are often, not always, accepted.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from recyclegpt import hf
from recyclegpt.api import RecycleGPT
from recyclegpt.config import PRESETS, RecycleConfig
from recyclegpt.decoding.loops import DecodeStats
from recyclegpt.evals.hf_baselines import to_hf_llama
from recyclegpt.models import RecyclableModule, Transformer

pytest.importorskip("transformers")  # recyclegpt imports it inside the functions that use it

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 5, 6, 7], [42] * 12, [96, 0, 13, 13, 50], [17], [60, 61, 2, 9, 33, 70]]
N = 24


def tiny_base(seed: int = 0) -> Transformer:
    """The tiny preset, untied (tied, a random model repeats its last token) with sharpened attention."""
    torch.manual_seed(seed)
    base = Transformer(dataclasses.replace(PRESETS["tiny"], tie_embeddings=False)).eval()
    with torch.no_grad():
        for blk in base.layers:
            blk.attn.wq.weight.mul_(2.0)
            blk.attn.wk.weight.mul_(2.0)
    return base


def mirror(base: Transformer, draft_vocab: int = 0) -> RecyclableModule:
    """A module whose layers are the base's and whose input map passes the token embedding through (fc = [0 | I],
    no input norms)."""
    d = base.cfg.d_model
    module = RecyclableModule(base.cfg, RecycleConfig(n_layer=base.cfg.n_layer, input_norm=False,
                                                      draft_vocab=draft_vocab)).eval()
    with torch.no_grad():
        module.layers.load_state_dict(base.layers.state_dict())
        module.fc.weight.copy_(torch.cat((torch.zeros(d, d), torch.eye(d)), dim=1))
    return module


@pytest.fixture(scope="module")
def tiny():
    base = tiny_base()
    return base, to_hf_llama(base), mirror(base)


def padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input ids and attention mask."""
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    return ids, (torch.arange(L)[None] >= torch.tensor([L - len(p) for p in prompts])[:, None]).long()


def recycle_generate(model, ids, **kw):
    return model.generate(ids, custom_generate=hf.generate, **kw)


# -- the tiny model: always runs -------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy, draft_len, draft_vocab", [
    ("speculative", 1, 0), ("speculative", 3, 0), ("speculative", 5, 0), ("speculative", 3, 48),
    ("recycle-verified", 3, 0),
])
def test_greedy_equals_transformers_greedy(tiny, strategy, draft_len, draft_vocab):
    base, model, module = tiny
    if draft_vocab:  # drafts over the first 48 token ids only: the rest are never drafted, the output is the same
        module = mirror(base, draft_vocab)
    hist = [0] * (draft_len + 1)
    for ids in PROMPTS:
        x = torch.tensor([ids])
        stats = DecodeStats(strategy)
        out = recycle_generate(model, x, max_new_tokens=N, do_sample=False, module=module, strategy=strategy,
                               draft_len=draft_len, stats=stats)
        assert torch.equal(out, model.generate(x, max_new_tokens=N, do_sample=False)), ids
        assert stats.new_tokens == N and stats.module_calls > 0
        hist = [a + b for a, b in zip(hist, stats.accept_hist)]
    # both paths ran: rounds that rejected the first draft and rounds that accepted every draft
    assert hist[0] > 0 and hist[-1] > 0, hist


def test_a_random_module_is_still_exact(tiny):
    base, model, _ = tiny
    torch.manual_seed(1)
    module = RecyclableModule(base.cfg, RecycleConfig(n_layer=1)).eval()
    for ids in PROMPTS[:3]:
        x = torch.tensor([ids])
        out = recycle_generate(model, x, max_new_tokens=N, do_sample=False, module=module, min_draft_prob=0.05)
        assert torch.equal(out, model.generate(x, max_new_tokens=N, do_sample=False))


def test_batch_with_left_padding_eos_and_processors(tiny):
    """A left-padded batch whose rows stop on eos at different steps (then padded with pad_token_id), under a
    repetition penalty, which the verification applies at each drafted position with that position's prefix."""
    _, model, module = tiny
    x, mask = padded(PROMPTS)
    free = model.generate(x, attention_mask=mask, max_new_tokens=N, do_sample=False)
    eos = int(free[1, x.shape[1] + 6])  # a token that row 1 emits mid-way
    kw = {"attention_mask": mask, "max_new_tokens": N, "do_sample": False, "eos_token_id": eos, "pad_token_id": 0,
          "repetition_penalty": 1.3}
    ref = model.generate(x, **kw)
    assert (ref[:, x.shape[1]:] == eos).any()
    for strategy in ("speculative", "recycle-verified"):
        assert torch.equal(recycle_generate(model, x, module=module, strategy=strategy, **kw), ref), strategy


def test_static_cache(tiny):
    """Under cache_implementation="static" the rejected drafts are cropped from transformers' StaticCache."""
    _, model, module = tiny
    x, mask = padded(PROMPTS)
    for kw in ({}, {"attention_mask": mask}):
        ids = x if kw else x[:1, -len(PROMPTS[0]):]
        ref = model.generate(ids, max_new_tokens=N, do_sample=False, **kw)
        out = recycle_generate(model, ids, max_new_tokens=N, do_sample=False, cache_implementation="static",
                               module=module, draft_len=4, **kw)
        assert torch.equal(out, ref)


def test_return_dict_scores_and_logits(tiny):
    _, model, module = tiny
    x = torch.tensor([PROMPTS[1]])
    kw = {"max_new_tokens": 8, "do_sample": False, "return_dict_in_generate": True, "output_scores": True,
          "output_logits": True}
    ref, out = model.generate(x, **kw), recycle_generate(model, x, module=module, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(out.logits) == 8
    for mine, theirs in zip(out.scores + out.logits, ref.scores + ref.logits):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)


def test_sampling_is_reproducible(tiny):
    _, model, module = tiny
    x, mask = padded(PROMPTS)
    kw = {"attention_mask": mask, "max_new_tokens": N, "do_sample": True, "top_k": 20, "module": module}

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)  # the global generator, as for transformers' own sampling
        return recycle_generate(model, x, **kw)

    first = run(7)
    assert torch.equal(first, run(7)) and not torch.equal(first, run(8))
    own = [recycle_generate(model, x, generator=torch.Generator().manual_seed(3), **kw) for _ in range(2)]
    assert torch.equal(own[0], own[1])


def test_sampling_distribution_is_the_models(tiny):
    """The second new token is drafted by a noisy module (about half its drafts accepted) and verified: accepted,
    or drawn from the residual. Over 4,000 rows its frequencies match the model's exact marginal (top-k 5 and
    temperature 0.8 applied at both tokens); the module's own unverified tokens ("recycle") do not."""
    base, model, _ = tiny
    module = mirror(base)
    torch.manual_seed(11)
    with torch.no_grad():
        module.fc.weight.add_(0.3 / base.cfg.d_model ** 0.5 * torch.randn_like(module.fc.weight))
    prompt, rows = PROMPTS[1], 4000

    def second(strategy: str) -> torch.Tensor:
        """The frequencies of the second new token; the budget of 3 leaves the first round one draft."""
        torch.manual_seed(0)
        out = recycle_generate(model, torch.tensor([prompt] * rows), max_new_tokens=3, module=module,
                               strategy=strategy, do_sample=True, top_k=5, temperature=0.8)
        return torch.bincount(out[:, len(prompt) + 1], minlength=model.config.vocab_size).float() / rows

    def probs(logits: torch.Tensor) -> torch.Tensor:  # the processors' top-k 5, then temperature 0.8
        top = logits.topk(5, dim=-1)
        return torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values / 0.8).softmax(-1)

    with torch.no_grad():  # the exact marginal: the sum over x1 of p(x1) p(x2 | x1)
        p1 = probs(model(torch.tensor([prompt])).logits[0, -1])
        firsts = p1.nonzero()[:, 0]
        after = model(torch.cat((torch.tensor([prompt] * len(firsts)), firsts[:, None]), dim=1)).logits[:, -1]
        exact = (p1[firsts, None] * probs(after)).sum(0)
    tv = 0.5 * (second("speculative") - exact).abs().sum()
    assert tv < 0.06, tv  # measured 0.026
    assert 0.5 * (second("recycle") - exact).abs().sum() > 0.3  # measured 0.46: the test tells them apart


def test_lossy_recycle_equals_the_projects(tiny):
    base, model, module = tiny
    lm = RecycleGPT(base, None, module=module)
    for ids in PROMPTS:
        for n in (1, 2, N - 1):
            out = recycle_generate(model, torch.tensor([ids]), max_new_tokens=n, do_sample=False, module=module,
                                   strategy="recycle")
            assert out[0, len(ids):].tolist() == lm.generate(ids, strategy="recycle", max_new_tokens=n).token_ids[0]


def test_bad_calls(tiny):
    base, model, module = tiny
    x = torch.tensor([PROMPTS[0]])
    with pytest.raises(ValueError, match="needs the recyclable module"):
        recycle_generate(model, x, max_new_tokens=4)
    with pytest.raises(ValueError, match="unknown strategy"):
        recycle_generate(model, x, max_new_tokens=4, module=module, strategy="tree")
    with pytest.raises(ValueError, match="draft_len"):
        recycle_generate(model, x, max_new_tokens=4, module=module, draft_len=0)
    with pytest.raises(ValueError, match="beam search"):
        recycle_generate(model, x, max_new_tokens=4, module=module, num_beams=2)
    with pytest.raises(ValueError, match="left padding"):
        recycle_generate(model, torch.tensor([[1, 2, 3]] * 2), attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]),
                         max_new_tokens=4, module=module)
    wide = RecyclableModule(dataclasses.replace(base.cfg, d_model=64, d_ff=128), RecycleConfig())
    with pytest.raises(ValueError, match="wide"):
        recycle_generate(model, x, max_new_tokens=4, module=wide)
    # the hooks are removed after each call, failed ones included
    assert not model.model.norm._forward_hooks


# -- SmolLM2-135M-Instruct with its shipped module ------------------------------------------------------------

INSTRUCTIONS = [
    "Explain why the sky is blue in a few sentences.",
    "Write a short poem about a lighthouse keeper.",
    "What are three tips for staying focused while studying?",
    "Describe how a bicycle works to a ten-year-old.",
    "Give me a simple recipe for tomato soup.",
    "What is the difference between weather and climate?",
    "List some good habits for writing clean Python code.",
    "What is the capital of France?",
    "Translate 'good morning' into Spanish.",
    "How many legs does a spider have?",
    "Name three primary colours.",
    "Write a haiku about autumn leaves.",
    "Why do cats purr?",
    "Give one tip for saving money.",
    "What does a compiler do?",
    "Summarise the story of Cinderella in two sentences.",
    "What is 12 times 7?",
    "Suggest a name for a pet goldfish.",
    "How do plants make food?",
    "Write a Python function that returns the square of a number.",
]
REAL_N = 16


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf):
    """(RecycleGPT with the shipped module, its HF LlamaForCausalLM copy, chat-templated prompt ids), fp32, CPU."""
    lm = RecycleGPT.from_pretrained("smollm2-135m-instruct", device="cpu", dtype=torch.float32)
    prompts = [lm.encode(text, chat=True) for text in INSTRUCTIONS]
    return lm, to_hf_llama(lm.base), prompts


@pytest.mark.real_model
def test_real_model_greedy_equals_transformers_greedy(smollm2_hf):
    lm, model, prompts = smollm2_hf
    hist = [0] * 4
    for ids in prompts:
        x = torch.tensor([ids])
        stats = DecodeStats("speculative")
        out = recycle_generate(model, x, max_new_tokens=REAL_N, do_sample=False, module=lm.model.module, draft_len=3,
                               stats=stats)
        assert torch.equal(out, model.generate(x, max_new_tokens=REAL_N, do_sample=False)), ids
        hist = [a + b for a, b in zip(hist, stats.accept_hist)]
    tau = sum((k + 1) * c for k, c in enumerate(hist)) / sum(hist)
    assert tau > 1.5, hist  # the shipped module drafts for real (about 2 tokens per verification)


@pytest.mark.real_model
def test_real_model_lossy_recycle_equals_the_projects(smollm2_hf):
    lm, model, prompts = smollm2_hf
    for ids in prompts[:4]:
        out = recycle_generate(model, torch.tensor([ids]), max_new_tokens=REAL_N, do_sample=False,
                               module=lm.model.module, strategy="recycle")
        ours = lm.generate(ids, strategy="recycle", max_new_tokens=REAL_N, ignore_eos=True).token_ids[0]
        assert out[0, len(ids):].tolist() == ours
