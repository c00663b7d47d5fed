"""The Hugging Face baselines: our Transformer copied into transformers' LlamaForCausalLM gives the same logits,
and greedy `generate` in each HFBaseline mode gives the same tokens as our `standard` decoding."""

from __future__ import annotations

import dataclasses
import statistics
import time

import pytest
import torch

pytest.importorskip("transformers")

from recyclegpt.config import PRESETS  # noqa: E402
from recyclegpt.decoding.loops import standard  # noqa: E402
from recyclegpt.evals.hf_baselines import HFBaseline, HFRun, to_hf_llama  # noqa: E402
from recyclegpt.models import Transformer  # noqa: E402

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 5, 6, 7], [42] * 12, [96, 0, 13, 13, 50]]
N = 20


def make(seed: int = 0, *, sharp: bool = False, **changes) -> Transformer:
    """The tiny preset (GQA 4/2) with changes. sharp: scale the Q and K projections up, so that attention is
    far from uniform and the logits depend on the rotary positions (at init they barely do)."""
    torch.manual_seed(seed)
    model = Transformer(dataclasses.replace(PRESETS["tiny"], **changes)).eval()
    if sharp:
        with torch.no_grad():
            for blk in model.layers:
                blk.attn.wq.weight.mul_(8.0)
                blk.attn.wk.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def tiny() -> Transformer:
    return make()


@pytest.mark.parametrize("changes", [
    {},  # GQA: 4 query heads over 2 kv heads, tied embeddings
    {"rope_theta": 500.0, "norm_eps": 1e-6},
    {"n_kv_head": 4, "tie_embeddings": False, "rope_theta": 1e6},
])
def test_logits_match_ours(changes):
    model = make(1, sharp=True, **changes)
    hf = to_hf_llama(model)
    assert hf.config.num_key_value_heads == model.cfg.n_kv_head
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == model.cfg.tie_embeddings
    x = torch.randint(0, model.cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model(x).logits, hf(x).logits
    assert ours.abs().max() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_rope_theta_is_taken_and_matters():
    """HF's rotary table equals ours for a non-default base, and the base changes the logits, so the parity above
    would catch a rope_theta that transformers ignored."""
    from recyclegpt.models import rotary

    hf = to_hf_llama(make(1, sharp=True, rope_theta=500.0))
    pos = torch.arange(37)[None]
    cos, sin = hf.model.rotary_emb(torch.zeros(1, 37, 32), pos)
    our_cos, our_sin = rotary(pos, 8, 500.0, torch.float32)
    torch.testing.assert_close(cos, our_cos[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, our_sin[:, 0], atol=1e-6, rtol=0)
    x = torch.randint(0, 97, (1, 37), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf(x).logits - make(1, sharp=True)(x).logits).abs().max() > 1e-2


def test_weights_are_copied_not_shared(tiny):
    hf = to_hf_llama(tiny)
    assert hf.model.layers[0].self_attn.q_proj.weight.data_ptr() != tiny.layers[0].attn.wq.weight.data_ptr()
    assert not any(p.requires_grad for p in hf.parameters()) and not hf.training


@pytest.mark.parametrize("mode", ["eager", "prompt_lookup"])
def test_greedy_tokens_match_standard(tiny, mode):
    baseline = HFBaseline(tiny, mode)
    for ids in PROMPTS:
        run = baseline.generate(ids, N)
        assert isinstance(run, HFRun)
        assert run.tokens == standard(tiny, [ids], max_new_tokens=N).tokens[0], ids
        assert len(run.tokens) == N and run.seconds > 0 and 0 < run.ttft_s <= run.seconds
        assert sum(run.step_tokens) == N and all(n >= 1 for n in run.step_tokens)
        assert len(run.step_s) == len(run.step_tokens) - 1 and all(s >= 0 for s in run.step_s)
        assert run.peak_mem_mb is None  # CPU
        if mode == "eager":
            assert len(run.step_s) == N - 1
    if mode == "prompt_lookup":  # the repetitive prompt lets lookup accept drafts: fewer steps than tokens
        assert len(baseline.generate([7, 8, 9] * 6, N).step_s) < N - 1


def test_timings_cover_the_forward_calls(tiny):
    """With every forward slowed by 50 ms: the first token waits for the prefill, each step for one forward."""
    baseline = HFBaseline(tiny, "eager")
    forward = baseline.model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.05)
        return forward(*args, **kwargs)

    baseline.model.forward = slow_forward
    run = baseline.generate(PROMPTS[0], 5)
    assert 0.05 <= run.ttft_s < 0.1  # one forward, not two
    assert len(run.step_s) == 4 and min(run.step_s) >= 0.05 and statistics.median(run.step_s) < 0.1
    assert run.ttft_s + sum(run.step_s) <= run.seconds < 0.05 * 5 + 0.3


def test_compiled_mode_runs_and_labels_itself(tiny):
    """The static-cache + compile path of generate, with the cheap "eager" dynamo backend (inductor on a CPU takes
    tens of seconds to compile; its run is measured by hand, see the HF baselines notes)."""
    baseline = HFBaseline(tiny, "compiled", compile_backend="eager", max_cache_len=40)
    assert baseline.config_note.startswith("static cache + torch.compile(backend=eager)"), baseline.config_note
    assert baseline.compile_seconds is not None
    for ids in PROMPTS[:2]:
        run = baseline.generate(ids, N)
        assert run.tokens == standard(tiny, [ids], max_new_tokens=N).tokens[0]
        assert len(run.step_s) == N - 1


def test_compiled_mode_falls_back_when_compile_fails(tiny):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    baseline = HFBaseline(tiny, "compiled", compile_backend=broken_backend, max_cache_len=40)
    assert baseline.config_note.startswith("static cache, compile failed:"), baseline.config_note
    assert "no compiler here" in baseline.config_note
    ids = PROMPTS[1]
    assert baseline.generate(ids, N).tokens == standard(tiny, [ids], max_new_tokens=N).tokens[0]


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="unknown HF baseline mode"):
        HFBaseline(tiny, "beam")
    with pytest.raises(ValueError, match="max_cache_len"):
        HFBaseline(tiny, "compiled", max_cache_len=10_000)
    with pytest.raises(ValueError, match="empty prompt"):
        HFBaseline(tiny, "eager").generate([], 4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inductor_compiled_matches_standard(tiny):
    model = make().cuda()
    baseline = HFBaseline(model, "compiled", max_cache_len=64)
    assert baseline.config_note.startswith("static cache + torch.compile(mode=reduce-overhead)"), \
        baseline.config_note
    for ids in PROMPTS:
        run = baseline.generate(ids, N)
        assert run.tokens == standard(model, [ids], max_new_tokens=N).tokens[0]
        assert run.peak_mem_mb is not None and run.peak_mem_mb > 0
