"""The engine (decoding/engine.py): its fixed-shape steps give exactly the reference decoding's tokens, batched equals
per-prompt, a reused Decoder forgets the previous call, and CUDA graphs (GPU only) replay the same steps."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from recyclegpt.config import PRESETS, KernelConfig, ModelConfig, RecycleConfig
from recyclegpt.decoding import topk
from recyclegpt.decoding.engine import Decoder, Engine
from recyclegpt.decoding.loops import recycle, standard
from recyclegpt.decoding.sampling import SamplingParams
from recyclegpt.models import RecycleModel

REFERENCE = {"standard": standard, "recycle": recycle}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def build(seed: int, n_layer: int = 1, cfg: ModelConfig = PRESETS["tiny"]) -> RecycleModel:
    torch.manual_seed(seed)
    return RecycleModel.build(cfg, RecycleConfig(n_layer=n_layer)).eval()


def reference(model: RecycleModel, strategy: str, prompts, **kw):
    return REFERENCE[strategy](model.base if strategy == "standard" else model, prompts, **kw)


def random_prompts(seed: int, n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 20, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (L,), generator=g).tolist() for L in lengths]


@pytest.mark.parametrize("strategy", ["standard", "recycle"])
@pytest.mark.parametrize("seed", range(6))
def test_engine_equals_reference_greedy_across_seeds_lengths_and_buckets(strategy, seed):
    model = build(seed, n_layer=1 + seed % 2)
    prompts = random_prompts(seed, 1 + seed % 4, model.base.cfg.vocab_size)
    want = reference(model, strategy, prompts, max_new_tokens=37)
    # bucket 8: the steps cross several bucket boundaries (a new kv_end each time)
    got = Engine(model, bucket=8).decode(strategy, prompts, max_new_tokens=37, check_every=1 + seed)
    assert got.tokens == want.tokens


@pytest.mark.parametrize("strategy", ["standard", "recycle"])
def test_engine_equals_reference_with_sampling_and_stop_tokens(strategy):
    model = build(1)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
    sampling = SamplingParams(temperature=1.0, top_k=20, seed=3)
    want = reference(model, strategy, prompts, max_new_tokens=40, sampling=sampling, stop_ids=(5, 11))
    got = Engine(model, bucket=16).decode(strategy, prompts, max_new_tokens=40, sampling=sampling,
                                          stop_ids=(5, 11), check_every=3)
    assert got.tokens == want.tokens and got.finished == want.finished
    assert any(got.finished) and not all(len(t) == 40 for t in got.tokens)  # the stops did happen


@pytest.mark.parametrize("strategy", ["standard", "recycle"])
def test_batched_equals_per_prompt(strategy):
    model = build(2)
    prompts = random_prompts(7, 5, model.base.cfg.vocab_size)
    engine = Engine(model, bucket=16)
    batched = engine.decode(strategy, prompts, max_new_tokens=25).tokens
    single = [engine.decode(strategy, [p], max_new_tokens=25).tokens[0] for p in prompts]
    assert batched == single


@pytest.mark.parametrize("strategy", ["standard", "recycle", "speculative", "tree"])
def test_prompts_padded_to_a_bucket_give_the_same_tokens(strategy):
    """With graphs, prompts are left-padded to a multiple of prefill_bucket (one captured prefill per length);
    here the same padding runs without graphs and must change nothing, greedy and sampled, batched or not."""
    from test_speculative import predictable

    model = predictable(0, 0.05) if strategy in VERIFIED else build(8, n_layer=2)
    opts = VERIFIED[strategy][1] if strategy in VERIFIED else {}
    prompts = random_prompts(11, 3, model.base.cfg.vocab_size)
    padded = Engine(model, bucket=16, prefill_bucket=8)
    plain = Engine(model, bucket=16, prefill_bucket=0)
    for batch in ([prompts[0]], prompts):
        assert padded.decode(strategy, batch, max_new_tokens=30, **opts).tokens == \
            plain.decode(strategy, batch, max_new_tokens=30, **opts).tokens
        sampling = SamplingParams(temperature=0.9, seed=4)
        assert padded.decode(strategy, batch, max_new_tokens=20, sampling=sampling, **opts).tokens == \
            plain.decode(strategy, batch, max_new_tokens=20, sampling=sampling, **opts).tokens
    dec = padded.decoder(1, 64)
    dec.decode(strategy, [list(range(1, 12))], max_new_tokens=5, **opts)
    assert dec.pad.tolist() == [5]  # the 11-token prompt ran left-padded to 16


def test_a_reused_decoder_forgets_the_previous_call():
    model = build(3)
    dec = Decoder(model, 1, 96, bucket=16)
    long_prompt, short_prompt = list(range(1, 40)), [5, 6]
    dec.decode("recycle", [long_prompt], max_new_tokens=30)  # fills slots the next call must not see
    again = dec.decode("recycle", [short_prompt], max_new_tokens=30).tokens
    fresh = Decoder(model, 1, 96, bucket=16).decode("recycle", [short_prompt], max_new_tokens=30).tokens
    assert again == fresh == reference(model, "recycle", [short_prompt], max_new_tokens=30).tokens


def test_stats_count_calls_and_time_steps():
    model = build(4)
    res = Engine(model).decode("recycle", [[1, 2, 3]], max_new_tokens=20)
    st = res.stats
    assert st.new_tokens == 20 and st.full_calls == 10 and st.module_calls == 10  # prefill + 9 pair steps
    assert 0 < st.prefill_seconds <= st.seconds and st.step_ms > 0


def test_decoder_errors_are_clear():
    model = build(0)
    dec = Decoder(model.base, 2, 32, bucket=16)
    with pytest.raises(ValueError, match="needs a Decoder built on a RecycleModel"):
        dec.decode("recycle", [[1], [2]], max_new_tokens=4)
    with pytest.raises(ValueError, match="batches of 2"):
        dec.decode("standard", [[1]], max_new_tokens=4)
    with pytest.raises(ValueError, match="cache slots"):
        dec.decode("standard", [[1] * 20, [2]], max_new_tokens=20)
    with pytest.raises(ValueError, match="prefill_bucket must be an integer >= 0"):
        Decoder(model, 1, 32, prefill_bucket=-8)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
            Decoder(model, 1, 32, graphs=True)


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("strategy", ["standard", "recycle"])
def test_cuda_graphs_replay_the_same_steps(strategy):
    model = build(5, n_layer=2).cuda()
    prompts = random_prompts(3, 4, model.base.cfg.vocab_size)
    want = reference(model, strategy, prompts, max_new_tokens=50).tokens
    static = Engine(model, graphs=False, bucket=16).decode(strategy, prompts, max_new_tokens=50).tokens
    graphs = Engine(model, graphs=True, bucket=16)
    first = graphs.decode(strategy, prompts, max_new_tokens=50).tokens
    second = graphs.decode(strategy, prompts, max_new_tokens=50).tokens  # replays the captured graphs
    assert first == second == static == want
    sampling = SamplingParams(temperature=0.8, seed=1)
    assert (graphs.decode(strategy, prompts, max_new_tokens=30, sampling=sampling).tokens ==
            reference(model, strategy, prompts, max_new_tokens=30, sampling=sampling).tokens)
    model.to(torch.bfloat16)
    bf = Engine(model, graphs=True, bucket=16).decode(strategy, prompts, max_new_tokens=50).tokens
    static = Engine(model, graphs=False, bucket=16, fuse=True, prefill_bucket=64)  # the same padded prompts
    assert bf == static.decode(strategy, prompts, max_new_tokens=50).tokens


# -- the verified rounds (decoding/speculative.py's strategies) -------------------------------------------------------------

from test_speculative import predictable, prompts_for  # noqa: E402

from recyclegpt.decoding.speculative import (  # noqa: E402
    TreeShape,
    recycle_verified,
    speculative,
    tree,
)

VERIFIED = {
    "recycle-verified": (lambda m, p, **kw: recycle_verified(m, p, **kw), {}),
    "speculative": (lambda m, p, **kw: speculative(m, p, draft_len=3, **kw), {"draft_len": 3}),
    "tree": (lambda m, p, **kw: tree(m, p, shape=TreeShape(4, 3, 10), **kw), {"tree": TreeShape(4, 3, 10)}),
}


@pytest.mark.parametrize("strategy", VERIFIED)
@pytest.mark.parametrize("noise", [0.0, 0.05, 0.15])
def test_verified_rounds_equal_the_reference_loops(strategy, noise):
    ref, opts = VERIFIED[strategy]
    for seed in range(2):
        model = predictable(seed, noise)
        prompts = prompts_for(seed, 3)
        engine = Engine(model, bucket=16)  # small buckets: rounds cross bucket boundaries
        for batch in [prompts[:1], prompts[1:2], prompts]:
            want = ref(model, batch, max_new_tokens=33)
            got = engine.decode(strategy, batch, max_new_tokens=33, check_every=1 + seed * 4, **opts)
            assert got.tokens == want.tokens, (strategy, noise, seed)
            assert got.tokens == standard(model.base, batch, max_new_tokens=33).tokens
            assert got.stats.tau is not None and sum(got.stats.accept_hist) >= sum(want.stats.accept_hist)
        sampling = SamplingParams(temperature=0.9, top_p=0.95, seed=seed)
        want = ref(model, prompts, max_new_tokens=20, sampling=sampling, stop_ids=(3,))
        got = engine.decode(strategy, prompts, max_new_tokens=20, sampling=sampling, stop_ids=(3,), **opts)
        assert got.tokens == want.tokens and got.finished == want.finished


def test_tree_rounds_with_the_lookup_branch_equal_the_reference_loop():
    """The engine's tree with a prompt-lookup branch (its token-by-slot buffer, written each round) gives the
    reference loop's tokens and acceptance, greedy and sampled, and standard's tokens when greedy."""
    from test_speculative import _bad_drafter

    shape = TreeShape(4, 2, 6, 4)
    for seed in range(2):
        model = _bad_drafter(seed)
        prompts = prompts_for(seed, 3)
        engine = Engine(model, bucket=16)
        for batch in [prompts[:1], prompts]:
            want = tree(model, batch, max_new_tokens=50, shape=shape)
            got = engine.decode("tree", batch, max_new_tokens=50, tree=shape, check_every=1 + seed * 4)
            assert got.tokens == want.tokens == standard(model.base, batch, max_new_tokens=50).tokens
            assert got.stats.tau > 1.5 and sum(got.stats.accept_hist) >= sum(want.stats.accept_hist)
        sampling = SamplingParams(temperature=0.9, seed=seed)
        want = tree(model, prompts, max_new_tokens=20, shape=shape, sampling=sampling)
        assert engine.decode("tree", prompts, max_new_tokens=20, tree=shape, sampling=sampling).tokens == want.tokens


def test_verified_rounds_near_the_end_of_the_cache():
    """Rounds past the budget (launched before a check) must not run off the cache."""
    model = predictable(0, 0.0)
    dec = Decoder(model, 1, 48, bucket=16)
    for strategy, (ref, opts) in VERIFIED.items():
        n = 48 - 5 - 11  # leaves exactly the span the largest round needs
        got = dec.decode(strategy, [[1, 2, 3, 4, 5]], max_new_tokens=n, check_every=64, **opts)
        assert got.tokens == ref(model, [[1, 2, 3, 4, 5]], max_new_tokens=n).tokens, strategy


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("strategy", VERIFIED)
def test_cuda_graphs_replay_the_verified_rounds(strategy):
    ref, opts = VERIFIED[strategy]
    model = predictable(1, 0.05).cuda()
    prompts = prompts_for(3, 3)
    want = standard(model.base, prompts, max_new_tokens=40).tokens
    graphs = Engine(model, graphs=True, bucket=16)
    first = graphs.decode(strategy, prompts, max_new_tokens=40, **opts)
    second = graphs.decode(strategy, prompts, max_new_tokens=40, **opts)  # replays the captured graphs
    assert first.tokens == second.tokens == want == ref(model, prompts, max_new_tokens=40).tokens
    assert sum(first.stats.accept_hist[1:]) > 0
    sampling = SamplingParams(temperature=0.8, seed=1)
    assert (graphs.decode(strategy, prompts, max_new_tokens=30, sampling=sampling, **opts).tokens ==
            ref(model, prompts, max_new_tokens=30, sampling=sampling).tokens)
    # compiled: one bucket (every bucket is a compile of its own; the graphs above crossed bucket boundaries)
    compiled = Engine(model, graphs=True, bucket=128, compile=True)
    assert compiled.decode(strategy, prompts, max_new_tokens=40, **opts).tokens == want
    whole = Engine(model, graphs=True, bucket=128, compile=True, compile_steps=True)
    assert whole.decode(strategy, prompts, max_new_tokens=40, **opts).tokens == want


@CUDA
@pytest.mark.cuda
def test_cuda_graphs_replay_tree_rounds_with_the_lookup_branch():
    from test_speculative import _bad_drafter

    model = _bad_drafter(1).cuda()
    prompts = prompts_for(3, 3)
    want = standard(model.base, prompts, max_new_tokens=48).tokens
    shape = TreeShape(4, 2, 6, 4)
    for engine in (Engine(model, graphs=True, bucket=16),
                   Engine(model, graphs=True, bucket=128, compile=True, compile_steps=True)):
        got = engine.decode("tree", prompts, max_new_tokens=48, tree=shape)
        assert got.tokens == want and got.stats.tau > 1.5


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_a_tree_round_compiled_whole_gives_the_reference_tokens():
    """compile_steps: the greedy round traces as one graph (draft, verification, commit, the cache move) and
    inductor's code for it gives standard's tokens (on the CPU here; the CUDA-marked test above does it in graphs);
    so does the chain's round, and the compiled standard and recycle steps give the reference's tokens.
    The model takes the CUDA paths on the CPU (KernelConfig.cuda_paths_on_cpu): the drafts' top-k is the sort-free
    one, and the compiled greedy argmaxes split a 2,048-token vocabulary in two chunks (topk.split_argmax)."""
    from torch._inductor.utils import run_and_get_code

    model = predictable(0, 0.05, vocab=2048)
    model.kernels = KernelConfig(cuda_paths_on_cpu=True)
    assert model.base.cfg.vocab_size > topk.ARGMAX_CHUNK
    prompts = prompts_for(0, 2, vocab=2048)
    engine = Engine(model, bucket=64, compile=True, compile_steps=True)
    got, code = run_and_get_code(engine.decode, "tree", prompts, max_new_tokens=12, tree=TreeShape(2, 2, 4, 2))
    want = standard(model.base, prompts, max_new_tokens=12).tokens
    assert got.tokens == want
    assert sum(got.stats.accept_hist[1:]) > 0 and set(engine.decoder(2, 64)._whole) >= {"_tree_round"}
    chain, more = run_and_get_code(engine.decode, "speculative", prompts, max_new_tokens=12, draft_len=2)
    assert chain.tokens == want and sum(chain.stats.accept_hist[1:]) > 0
    code += more
    # inductor ran everything itself but the attention: an aten fallback (topk, sort, the int64 index_put_ that an
    # int64 histogram's index_add_ becomes) is several extra kernels a round on CUDA
    fallbacks = set(re.findall(r"\baten\.(\w+)(?:\.\w+)?\(", "\n".join(code)))
    assert code and not {f for f in fallbacks if not f.startswith("_scaled_dot_product")}, fallbacks
    for strategy in ("standard", "recycle"):
        got = engine.decode(strategy, prompts, max_new_tokens=12)
        assert got.tokens == reference(model, strategy, prompts, max_new_tokens=12).tokens, strategy
    with pytest.raises(ValueError, match="compile_steps needs compile"):
        Decoder(model, 1, 32, compile_steps=True)


def test_fused_projections_give_the_same_logits_and_tokens():
    from recyclegpt.models import fuse_projections

    model = build(6, n_layer=2)
    prompts = random_prompts(5, 3, model.base.cfg.vocab_size)
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        before = model.base(ids).logits
    want = reference(model, "recycle", prompts, max_new_tokens=30).tokens
    fuse_projections(model)
    block = model.base.layers[0]
    assert block.attn.wq.weight.data_ptr() == block.attn.wqkv.data_ptr()  # a view: no extra memory
    with torch.no_grad():
        torch.testing.assert_close(model.base(ids).logits, before, rtol=1e-5, atol=1e-5)
    got = Engine(model, bucket=16, fuse=True).decode("recycle", prompts, max_new_tokens=30).tokens
    assert got == want
    with torch.enable_grad():  # training never takes the fused path: gradients reach the separate weights
        model.base(ids).logits.sum().backward()
    assert block.attn.wk.weight.grad is not None and block.mlp.w3.weight.grad is not None


def test_the_fused_path_keeps_to_the_shapes_it_was_measured_faster_on():
    """SmolLM2's width (576) takes the fused kernels; the paper's 1.3B (2048) and 7B (4096) widths, where they were
    measured slower on an H100 (docs/engine.md, 2026-11-27), keep cuBLAS; and so do wide calls."""
    from recyclegpt import models as model_mod
    from recyclegpt.evals.speed import SHAPES
    from recyclegpt.kernels import linear as triton_linear

    smol = PRESETS["smollm2-135m"]
    head_dim = lambda c: c.d_model // c.n_head  # noqa: E731
    assert model_mod.fused_linear_fits(smol.d_model, 1, head_dim(smol))
    assert model_mod.fused_linear_fits(smol.d_model, triton_linear.MAX_ROWS, head_dim(smol))
    for name in ("1.3b", "7b"):
        cfg = SHAPES[name]
        assert not model_mod.fused_linear_fits(cfg.d_model, 1, head_dim(cfg)), name
    assert not model_mod.fused_linear_fits(smol.d_model, triton_linear.MAX_ROWS + 1, head_dim(smol))
    assert not model_mod.fused_linear_fits(smol.d_model, 1, 48)  # half a head (24) is not a power of two


@pytest.mark.parametrize("strategy", VERIFIED)
def test_verified_rounds_with_a_draft_vocabulary(strategy):
    from test_speculative import with_draft_vocab

    ref, opts = VERIFIED[strategy]
    model = with_draft_vocab(predictable(1, 0.05), list(range(0, 97, 2)))
    prompts = prompts_for(4, 3)
    got = Engine(model, bucket=16).decode(strategy, prompts, max_new_tokens=30, check_every=3, **opts)
    assert got.tokens == ref(model, prompts, max_new_tokens=30).tokens
    assert got.tokens == standard(model.base, prompts, max_new_tokens=30).tokens
    assert sum(got.stats.accept_hist[1:]) > 0


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("strategy", VERIFIED)
def test_cuda_graphs_with_a_draft_vocabulary(strategy):
    from test_speculative import with_draft_vocab

    ref, opts = VERIFIED[strategy]
    model = with_draft_vocab(predictable(1, 0.05), list(range(0, 97, 2))).cuda()
    prompts = prompts_for(3, 3)
    want = standard(model.base, prompts, max_new_tokens=40).tokens
    graphs = Engine(model, graphs=True, bucket=16)
    for _ in range(2):  # capture, then replay
        assert graphs.decode(strategy, prompts, max_new_tokens=40, **opts).tokens == want
    assert ref(model, prompts, max_new_tokens=40).tokens == want


# -- recycle over the module's draft vocabulary (RecycleModel.recycle_vocab "draft") ------------------------------


def module_tokens(tokens: list[list[int]]) -> list[int]:
    """The tokens `recycle` took from the module: offsets 1, 3, 5, ... of each output."""
    return [t for row in tokens for t in row[1::2]]


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=1.0, top_k=30, seed=5)])
def test_recycle_over_the_draft_vocabulary_equals_the_reference_loop(sampling):
    from test_speculative import with_draft_vocab

    allowed = list(range(0, 97, 2))
    model = with_draft_vocab(build(3, n_layer=2), allowed)
    prompts = random_prompts(3, 3, model.base.cfg.vocab_size)
    full = reference(model, "recycle", prompts, max_new_tokens=41, sampling=sampling).tokens
    model.recycle_vocab = "draft"
    want = reference(model, "recycle", prompts, max_new_tokens=41, sampling=sampling).tokens
    got = Engine(model, bucket=8).decode("recycle", prompts, max_new_tokens=41, sampling=sampling, check_every=3)
    assert got.tokens == want
    assert set(module_tokens(want)) <= set(allowed)
    assert not set(module_tokens(full)) <= set(allowed)  # the option changed what the module may yield
    model.recycle_vocab = "full"  # a reused engine follows the model's setting again
    again = Engine(model, bucket=8)
    assert again.decode("recycle", prompts, max_new_tokens=41, sampling=sampling).tokens == full


def test_recycle_vocab_errors_are_clear():
    model = build(0)
    with pytest.raises(ValueError, match="needs a module with a draft vocabulary"):
        model.recycle_vocab = "draft"
    with pytest.raises(ValueError, match="must be one of full, draft"):
        model.recycle_vocab = "tiny"
    assert model.recycle_vocab == "full"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_prompt_forwards_serve_every_length():
    """compile_prefill (on by default): the prompt's forwards, compiled with dynamic shapes, give the reference
    loops' tokens for prompts of several lengths; off, they stay the model's own."""
    model = build(5, n_layer=2)
    engine = Engine(model, compile=True, bucket=64)
    assert engine.compile_prefill
    for length in (7, 13, 30):
        prompts = [[(3 * length + i) % 90 + 1 for i in range(length)]]
        for strategy in ("standard", "recycle"):
            got = engine.decode(strategy, prompts, max_new_tokens=12).tokens
            assert got == reference(model, strategy, prompts, max_new_tokens=12).tokens, (length, strategy)
    dec = next(iter(engine._decoders.values()))
    assert dec._prompt_base != dec.base.forward and dec._prompt_module != model.recycle  # the compiled ones ran
    eager = Engine(model, compile=True, bucket=64, compile_prefill=False).decoder(1, 64)
    assert eager._prompt_base == eager.base.forward and eager._prompt_module == model.recycle


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_recycle_over_the_draft_vocabulary_compiled_whole():
    """The greedy step compiled whole (as the GPU bench runs it) takes the draft head's argmax (draft_argmax) and
    gives the reference loop's tokens."""
    from test_speculative import with_draft_vocab

    model = with_draft_vocab(build(4, n_layer=1), list(range(1, 97, 3)))
    model.recycle_vocab = "draft"
    prompts = random_prompts(4, 2, model.base.cfg.vocab_size)
    got = Engine(model, bucket=64, compile=True, compile_steps=True).decode("recycle", prompts, max_new_tokens=20)
    assert got.tokens == reference(model, "recycle", prompts, max_new_tokens=20).tokens


@CUDA
@pytest.mark.cuda
def test_cuda_graphs_replay_recycle_over_the_draft_vocabulary():
    from test_speculative import with_draft_vocab

    model = with_draft_vocab(build(3, n_layer=2), list(range(0, 97, 2))).cuda()
    model.recycle_vocab = "draft"
    prompts = random_prompts(3, 3, model.base.cfg.vocab_size)
    want = reference(model, "recycle", prompts, max_new_tokens=40).tokens
    graphs = Engine(model, graphs=True, bucket=16)
    for _ in range(2):  # capture, then replay
        assert graphs.decode("recycle", prompts, max_new_tokens=40).tokens == want


def test_module_outputs_at_the_last_position_only():
    """recycle(outputs=1): the module's last layer runs its products on the last position alone, yet caches every
    position's keys and values; its output there and both caches are those of the call on every position."""
    model = build(5, n_layer=2)
    cfg = model.base.cfg
    g = torch.Generator().manual_seed(5)
    state = torch.randn(2, 3, cfg.d_model, generator=g)
    tokens = torch.randint(0, cfg.vocab_size, (2, 3), generator=g)
    outs, caches = [], []
    for outputs in (None, 1, 2):
        cache = model.module.new_cache(2, 8)
        with torch.no_grad():
            out = model.recycle(state, tokens, input_pos=torch.arange(3), cache=cache, num_logits=1, outputs=outputs)
        assert out.hidden.shape == (2, 3 if outputs is None else outputs, cfg.d_model)
        outs.append(out)
        caches.append(cache)
    for out, cache in zip(outs[1:], caches[1:]):
        torch.testing.assert_close(out.hidden[:, -1], outs[0].hidden[:, -1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.logits, outs[0].logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(cache.k, caches[0].k) and torch.equal(cache.v, caches[0].v)
    with pytest.raises(ValueError, match="num_logits=2 needs at least as many outputs"):
        model.recycle(state, tokens, input_pos=torch.arange(3), cache=model.module.new_cache(2, 8), num_logits=2,
                      outputs=1)
    with pytest.raises(ValueError, match="keep=4"):
        model.recycle(state, tokens, input_pos=torch.arange(3), cache=model.module.new_cache(2, 8), outputs=4)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["standard", "recycle"])
def test_step_tables_and_last_output_keep_the_reference_tokens(strategy):
    """The greedy steps' tables made apart (Decoder._tables) and recycle's module call on its last output only
    (outputs=1) change what the steps compute, not their tokens: the reference loop's, eager and compiled whole."""
    model = build(6, n_layer=2)
    prompts = random_prompts(6, 3, model.base.cfg.vocab_size)
    want = reference(model, strategy, prompts, max_new_tokens=23).tokens
    assert Engine(model, bucket=8).decode(strategy, prompts, max_new_tokens=23).tokens == want
    if shutil.which("c++") or shutil.which("g++"):
        got = Engine(model, bucket=16, compile=True, compile_steps=True).decode(strategy, prompts, max_new_tokens=23)
        assert got.tokens == want


def test_call_tables_are_the_calls_own():
    """Tables made apart (model.call_tables, as the engine's steps make them) give a cached call the outputs and
    cache of the call that makes its own; a mismatched set is refused."""
    from recyclegpt.models import call_tables

    model = build(7, n_layer=2)
    base, cfg = model.base, model.base.cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 2), generator=torch.Generator().manual_seed(7))
    pad, pos = torch.tensor([0, 1]), torch.tensor([3, 4])
    runs = []
    for made_apart in (False, True):
        cache = base.new_cache(2, 16)
        with torch.no_grad():
            base(torch.randint(0, cfg.vocab_size, (2, 3), generator=torch.Generator().manual_seed(8)),
                 input_pos=torch.arange(3), cache=cache, pad=pad, kv_end=8)
            tables = call_tables(cfg, pos, pad, 8, torch.float32) if made_apart else None
            out = base(ids, input_pos=None if made_apart else pos, cache=cache, pad=pad, kv_end=8, tables=tables)
        runs.append((out.logits, cache.k.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    with pytest.raises(ValueError, match="tables for \\(1,\\) slots given to a call on 2 tokens"):
        base(ids, cache=base.new_cache(2, 16), tables=call_tables(cfg, torch.tensor([3]), pad, 8, torch.float32))


def test_the_engine_keeps_at_most_max_decoders_dropping_the_least_recently_used():
    """Traffic of several batch sizes keeps at most max_decoders Decoders (their caches and graphs); the least
    recently used goes, and a shape that comes back decodes again to the reference's tokens."""
    model = build(3)
    vocab = model.base.cfg.vocab_size
    shapes = {b: random_prompts(10 + b, b, vocab) for b in (1, 2, 3)}
    engine = Engine(model, bucket=8, max_decoders=2)
    want = {b: reference(model, "standard", p, max_new_tokens=9).tokens for b, p in shapes.items()}
    for b in (1, 2, 1, 3, 2, 1):  # 3 drops 2 (1 was used since); then 2 comes back and drops 1, then 1 drops 3
        assert engine.decode("standard", shapes[b], max_new_tokens=9).tokens == want[b], b
        assert len(engine._decoders) <= 2
    assert [k[0] for k in engine._decoders] == [2, 1]  # least recently used first
    with pytest.raises(ValueError, match="max_decoders"):
        Engine(model, max_decoders=0)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_the_compiled_engine_runs_on_the_cpu_with_the_eager_tokens():
    """engine="compiled" on the CPU: the static steps compiled by inductor (no CUDA graphs), the eager loop's
    tokens for standard and recycle; "graphs" alone still needs CUDA."""
    from recyclegpt import RecycleGPT

    model = build(11, n_layer=2)
    lm = RecycleGPT(model.base, None, module=model.module)
    prompts = random_prompts(11, 2, model.base.cfg.vocab_size)
    for strategy in ("standard", "recycle"):
        want = lm.generate(prompts, strategy=strategy, max_new_tokens=12, engine="eager").token_ids
        assert lm.generate(prompts, strategy=strategy, max_new_tokens=12, engine="compiled").token_ids == want
    assert not lm.engine("compiled").graphs
    with pytest.raises(ValueError, match="'graphs' captures CUDA graphs"):
        lm.generate(prompts, engine="graphs")
