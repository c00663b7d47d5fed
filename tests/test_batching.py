"""Continuous batching (decoding/batching.py): requests that join a running batch and leave it at their own stop or
budget get exactly the tokens they get alone, for every strategy, under arrival patterns like a server's: mixed
prompt lengths (1 token to near the cache), long -> short -> long, rebases in both directions, stops early and
late, more requests than rows."""

from __future__ import annotations

import random

import pytest
import torch
from test_speculative import predictable

from recyclegpt.decoding import strategies
from recyclegpt.decoding.batching import ContinuousBatch, Request
from recyclegpt.decoding.engine import Decoder, Engine
from recyclegpt.decoding.loops import PromptBatch
from recyclegpt.decoding.sampling import SamplingParams
from recyclegpt.decoding.speculative import TreeShape

OPTS = {"speculative": {"draft_len": 3}, "tree": {"tree": TreeShape(4, 3, 10)}}
REF_OPTS = {"speculative": {"draft_len": 3}, "tree": {"tree_shape": TreeShape(4, 3, 10)}}


def traffic(model, strategy: str, seed: int, n: int, max_len: int) -> list[Request]:
    """n requests: prompt lengths from 1 to near max_len (the first three long, short, long), budgets 1..40, and
    on every other request a stop token that its own decoding meets early or late."""
    rng = random.Random(seed)
    lengths = [max_len - 60, 1, max_len // 2] + [rng.choice([1, 2, 5, 17, 40, 90, max_len - 50])
                                                   for _ in range(n - 3)]
    out = []
    for i, L in enumerate(lengths):
        req = Request([rng.randrange(model.base.cfg.vocab_size) for _ in range(L)], rng.choice([1, 2, 9, 33, 40]))
        free = alone(model, strategy, req)
        if i % 2 and len(free) > 3:
            req.stop_ids = frozenset({free[rng.choice([1, len(free) - 2])]})
        out.append(req)
    return out


def alone(model, strategy: str, req: Request) -> list[int]:
    return strategies.reference_decode(model, strategy, [list(req.prompt)], max_new_tokens=req.max_new_tokens,
                                       stop_ids=tuple(req.stop_ids), **REF_OPTS.get(strategy, {})).tokens[0]


@pytest.mark.parametrize("strategy", strategies.names())
@pytest.mark.parametrize("rows", [1, 3])
def test_continuous_batching_equals_each_request_alone(strategy, rows):
    model = predictable(0, 0.1)
    engine = Engine(model, bucket=16, prefill_bucket=8)
    reqs = traffic(model, strategy, rows, 9, 200)
    batch = ContinuousBatch(engine, strategy, rows, max_len=208, check_every=3, **OPTS.get(strategy, {}))
    batch.run(reqs)
    assert sum(batch.rebases) > 0  # the batch moved its rows at least once
    for i, req in enumerate(reqs):
        assert req.tokens == alone(model, strategy, req), (strategy, i, len(req.prompt))
        assert req.reason == ("length" if len(req.tokens) == req.max_new_tokens else "stop")
        assert req.stats.new_tokens == len(req.tokens) and req.stats.full_calls >= 1
    assert any(r.reason == "stop" for r in reqs) and any(r.reason == "length" for r in reqs)


@pytest.mark.parametrize("strategy", strategies.names())
def test_long_prompts_prefilled_in_chunks_get_their_tokens_alone(strategy):
    """Prompts longer than prefill_chunk that join while rows decode are prefilled a chunk with each check (the
    last chunk shorter than the others' padding: prompts left-padded to whole chunks) and then join: every request
    still gets exactly its tokens alone. Residual branches at full strength: a slot the chunks got wrong shows."""
    model = predictable(0, 1.0)
    engine = Engine(model, bucket=16, prefill_bucket=8)
    reqs = traffic(model, strategy, 7, 12, 200)
    batch = ContinuousBatch(engine, strategy, 3, max_len=208, check_every=3, prefill_chunk=24,
                            **OPTS.get(strategy, {}))
    batch.run(reqs)
    assert batch.chunked > 0 and not batch.pending
    for i, req in enumerate(reqs):
        assert req.tokens == alone(model, strategy, req), (strategy, i, len(req.prompt))
        assert req.stats.new_tokens == len(req.tokens)


@pytest.mark.parametrize("strategy", ["standard", "recycle", "recycle-verified"])
def test_a_prompt_prefilled_in_chunks_leaves_the_state_of_a_whole_prefill(strategy):
    """Decoder.prefill_chunks: both caches, the module's state, the tokens and counters as prefill (+
    prefill_module) leave them, up to float32 rounding (the chunks' shorter calls sum in another order)."""
    model = predictable(0, 1.0)
    prompt = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    module = strategy != "standard"
    with torch.inference_mode():
        whole, chunked = Decoder(model, 1, 208), Decoder(model, 1, 208)
        batch = PromptBatch.build([prompt], vocab_size=97, device=torch.device("cpu")).padded_to(48)
        state = whole.prefill(batch, SamplingParams(), None)
        if module:
            whole.prefill_module(strategy, batch, state, SamplingParams(), None)
        assert list(chunked.prefill_chunks(strategy, batch, 16, SamplingParams(), None)) == [False, False, True]
    for name in ("x_next", "x_rec", "n", "pos", "pad", "out", "seq"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name
    caches = [(whole.cache, chunked.cache)] + ([(whole.mcache, chunked.mcache)] if module else [])
    for a, b in caches:
        torch.testing.assert_close(a.k[..., :48, :], b.k[..., :48, :], rtol=0, atol=1e-5)
        torch.testing.assert_close(a.v[..., :48, :], b.v[..., :48, :], rtol=0, atol=1e-5)
    if strategy == "recycle-verified":
        torch.testing.assert_close(whole.g, chunked.g, rtol=0, atol=1e-4)
        torch.testing.assert_close(whole.d_logits, chunked.d_logits, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="chunks of 7"):
        next(chunked.prefill_chunks(strategy, batch, 7, SamplingParams(), None))


def test_joining_prompts_share_a_forward_only_when_short():
    """A prompt longer than PREFILL_JOINT is prefilled alone; the shorter ones together, by length, at most
    PREFILL_ROWS to a forward (each forward's rows are padded to its longest prompt)."""
    from recyclegpt.decoding.batching import PREFILL_JOINT, PREFILL_ROWS

    lengths = [PREFILL_JOINT + 1, 3, 200, 7, 1, PREFILL_JOINT, 9, 2, 4, 5, 6, 3000, 8]
    groups = ContinuousBatch._prefill_groups([Request([1] * n, 4) for n in lengths])
    sizes = [[len(r.prompt) for r in g] for g in groups]
    assert sizes[:2] == [[PREFILL_JOINT + 1], [3000]]
    short = sorted(n for n in lengths if n <= PREFILL_JOINT)
    assert sizes[2:] == [short[:PREFILL_ROWS], short[PREFILL_ROWS:]]


def test_a_prompt_prefilled_in_chunks_holds_its_row_and_waits_for_room():
    """While its chunks run the request holds a row (no other joins in its place) and the live row goes on
    decoding; once prefilled it joins when the live rows' budgets leave it room, here when the live row ends."""
    model = predictable(2, 0.1)
    engine = Engine(model, bucket=16, prefill_bucket=0)
    batch = ContinuousBatch(engine, "standard", 2, max_len=160, check_every=2, prefill_chunk=16)
    a = Request(list(range(1, 41)), 100)
    batch.add(a)
    c = Request(list(range(3, 35)), 119)  # two chunks; it fits beside a now, not once a has decoded a token
    assert batch.admits(c)
    batch.add(c)
    assert batch.pending == 1 and batch.live == 1 and c not in batch.rows
    assert not batch.admits(Request([1, 2], 4))  # the last row is c's
    before = len(a.tokens)
    batch.step()
    assert len(a.tokens) > before and batch.pending == 1  # chunks ran between a's steps; no room for c yet
    while a.reason is None:
        batch.step()
        assert c not in batch.rows or a.reason is not None
    while batch.live or batch.pending:
        batch.step()
    assert batch.chunked == 1
    for r in (a, c):
        assert r.tokens == alone(model, "standard", r)
    with pytest.raises(ValueError, match="prefill_chunk"):
        ContinuousBatch(engine, "standard", 2, prefill_chunk=0)


@pytest.mark.parametrize("strategy", ["recycle-verified", "speculative", "tree"])
def test_rounds_without_drafts_above_draft_rows_keep_the_tokens(strategy):
    """With draft_rows, a verified batch of more live rows verifies no drafts (the module kept in step) and drafts
    again when rows leave: every request still gets exactly its tokens alone."""
    model = predictable(0, 0.1)
    engine = Engine(model, bucket=16, prefill_bucket=8)
    reqs = traffic(model, strategy, 5, 9, 200)
    batch = ContinuousBatch(engine, strategy, 3, max_len=208, check_every=3, draft_rows=1, **OPTS.get(strategy, {}))
    batch.run(reqs)
    assert 0 < batch.undrafted_steps < batch.steps  # both kinds of round ran
    for i, req in enumerate(reqs):
        assert req.tokens == alone(model, strategy, req), (strategy, i, len(req.prompt))
    assert sum(sum(r.stats.accept_hist[1:]) for r in reqs) > 0  # drafts were accepted in the drafting rounds
    with pytest.raises(ValueError, match="draft_rows"):
        ContinuousBatch(engine, strategy, 2, draft_rows=-1)


def test_rows_join_while_others_decode_and_the_batch_rebases():
    model = predictable(1, 0.1)
    engine = Engine(model, bucket=16, prefill_bucket=0)
    batch = ContinuousBatch(engine, "recycle", 2, max_len=160, check_every=2)
    a = Request(list(range(1, 11)), 50)
    batch.add(a)
    assert batch.p == 10
    batch.step()
    b = Request([5, 6], 90)  # joins at the current slot
    p = batch.p
    batch.add(b)
    assert batch.p == p and batch.pads[1] == p - 2
    while a.reason is None:
        batch.step()
    c = Request(list(range(7, 87)), 10)  # 80 tokens, more than the slot p: the batch moves right
    p, pad_b = batch.p, batch.pads[1]
    assert p < 80 and batch.admits(c)
    batch.add(c)
    assert batch.p == 80 and batch.pads[0] == 0 and batch.pads[1] == pad_b + 80 - p
    while c.reason is None:
        batch.step()
    assert b.reason is None
    p, length_b = batch.p, batch.p - batch.pads[1]
    budget = batch.max_len - batch.plan.span - length_b  # fits only once the batch moves left
    assert budget >= b.remaining and p + budget + batch.plan.span > batch.max_len
    d = Request([1, 2, 3], budget)
    batch.add(d)
    assert batch.p == length_b < p and batch.pads[1] == 0
    while batch.live:
        batch.step()
    for r in (a, b, c, d):
        assert r.tokens == alone(model, "recycle", r)


def test_a_request_ends_when_its_callback_says_so_and_frees_its_row():
    model = predictable(2, 0.1)
    engine = Engine(model, bucket=16)
    seen: list[int] = []

    def cancel_after_five(tokens: list[int]) -> bool:
        seen.extend(tokens)
        return len(seen) < 5

    a, b = Request([1, 2, 3], 40, on_tokens=cancel_after_five), Request([4, 5], 12)
    ContinuousBatch(engine, "standard", 2, max_len=64, check_every=2).run([a, b, Request([9], 7)])
    assert a.reason == "cancelled" and 5 <= len(a.tokens) < 40 and seen == a.tokens
    assert b.reason == "length" and b.tokens == alone(model, "standard", b)


def test_requests_that_cannot_fit_are_refused_clearly():
    model = predictable(3, 0.1)
    engine = Engine(model, bucket=16)
    with pytest.raises(ValueError, match="does not fit"):
        ContinuousBatch(engine, "standard", 1, max_len=64).run([Request([1] * 60, 10)])
    batch = ContinuousBatch(engine, "standard", 1, max_len=64)
    batch.add(Request([1, 2], 30))
    assert not batch.admits(Request([3], 5))  # no free row
    with pytest.raises(ValueError, match="no room"):
        batch.add(Request([3], 5))
    with pytest.raises(ValueError, match="needs an engine built on a RecycleModel"):
        ContinuousBatch(Engine(model.base, bucket=16), "recycle", 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
@pytest.mark.parametrize("strategy", ["standard", "recycle", "recycle-verified", "speculative"])
@pytest.mark.parametrize("chunk", [None, 16])
def test_cuda_graphs_continuous_batching_equals_each_request_alone(strategy, chunk):
    """With chunk, the long prompts that join while rows decode replay a graph per prefill chunk."""
    model = predictable(0, 0.1).cuda()
    engine = Engine(model, bucket=16, prefill_bucket=8)
    reqs = traffic(model, strategy, 4, 12, 200)
    batch = ContinuousBatch(engine, strategy, 4, max_len=208, check_every=3, prefill_chunk=chunk,
                            **OPTS.get(strategy, {}))
    batch.run(reqs)
    assert batch.chunked > 0 if chunk else batch.chunked == 0
    for i, req in enumerate(reqs):
        assert req.tokens == alone(model, strategy, req), (strategy, i, len(req.prompt))


def test_the_batch_grows_for_new_requests_and_shrinks_when_few_are_left():
    model = predictable(4, 0.1)
    engine = Engine(model, bucket=16)
    batch = ContinuousBatch(engine, "speculative", 4, max_len=128, check_every=2, draft_len=3)
    reqs = [Request([i + 1] * (3 + 5 * i), budget) for i, budget in enumerate([60, 8, 6, 4])]
    sizes = []
    for req in reqs:
        batch.add(req)
        sizes.append(len(batch.rows))
    assert sizes == [1, 2, 4, 4]
    while reqs[1].reason is None or reqs[2].reason is None or reqs[3].reason is None:
        batch.step()
    batch.step()
    assert len(batch.rows) == 1 and batch.rows[0] is reqs[0]  # the one live request, moved to a one-row Decoder
    while batch.live:
        batch.step()
    for r in reqs:
        assert r.tokens == alone(model, "speculative", r)


def test_generate_with_max_batch_gives_each_prompts_tokens_alone():
    from recyclegpt import RecycleGPT

    model = predictable(5, 0.1)
    lm = RecycleGPT(model.base, None, module=model.module)
    prompts = [[1] * n for n in (40, 1, 7, 90, 3, 12)]
    steps = []
    out = lm.generate(prompts, strategy="recycle-verified", max_new_tokens=24, max_batch=3,
                      stream=lambda step: steps.append(step))
    for p, got in zip(prompts, out.token_ids):
        assert got == lm.generate([p], strategy="recycle-verified", max_new_tokens=24).token_ids[0]
    assert [sum(len(s[i]) for s in steps) for i in range(len(prompts))] == [len(t) for t in out.token_ids]
    assert out.stats.new_tokens == sum(len(t) for t in out.token_ids) and out.stats.tau >= 1
    with pytest.raises(ValueError, match="for all rows at once"):
        lm.generate(prompts, strategy="speculative", max_batch=2, temperature=0.7)
    with pytest.raises(ValueError, match="runs on an engine"):
        lm.generate(prompts, max_batch=2, engine="eager")
    with pytest.raises(ValueError, match="max_batch must be"):
        lm.generate(prompts, max_batch=0)


def test_a_burst_of_requests_grows_the_batch_once():
    """Requests waiting together make the batch grow once, to the rows that hold them (one Decoder, not one per
    doubling); max_rows caps it even when it is no power of two."""
    model = predictable(4, 0.1)
    engine = Engine(model, bucket=16)
    made = []
    decoder = engine.decoder
    engine.decoder = lambda rows, need, role="": made.append((rows, role)) or decoder(rows, need, role)
    reqs = [Request([i + 1] * (2 + i), 5) for i in range(11)]
    ContinuousBatch(engine, "standard", 12, max_len=64, check_every=2).run(reqs)
    batch_sizes = [rows for rows, role in made if role == "batch"]
    assert batch_sizes[:2] == [1, 12] and max(batch_sizes) == 12, batch_sizes
    for r in reqs:
        assert r.tokens == alone(model, "standard", r)


@pytest.mark.parametrize("strategy", ["standard", "recycle"])
def test_generate_with_max_batch_samples_each_prompt_with_its_own_seed(strategy):
    """generate(max_batch=, temperature=, seed=S) draws prompt i's tokens as generate(prompt i, seed=S + i)
    alone; the same call repeats exactly; a fixed max_len reuses the batch's Decoders across calls."""
    from recyclegpt import RecycleGPT
    from recyclegpt.decoding.batching import continuous_decode
    from recyclegpt.decoding.sampling import SamplingParams

    model = predictable(7, 0.3)
    lm = RecycleGPT(model.base, None, module=model.module)
    prompts = [[(3 * i + j) % 89 + 1 for j in range(1 + 11 * i)] for i in range(5)]
    kw = dict(strategy=strategy, max_new_tokens=18, temperature=1.0, top_k=30, engine="static")
    out = lm.generate(prompts, max_batch=2, seed=40, **kw)
    for i, p in enumerate(prompts):
        assert out.token_ids[i] == lm.generate([p], seed=40 + i, **kw).token_ids[0], i
    assert lm.generate(prompts, max_batch=2, seed=40, **kw).token_ids == out.token_ids
    assert len({tuple(t[:6]) for t in out.token_ids}) > 1
    engine = lm.engine("static")
    sampling = SamplingParams(temperature=1.0, top_k=30, seed=40)
    first = continuous_decode(engine, strategy, prompts, max_new_tokens=18, max_rows=2, sampling=sampling,
                              max_len=128)
    assert first.tokens == out.token_ids
    keys = set(engine._decoders)
    continuous_decode(engine, strategy, prompts[:2], max_new_tokens=18, max_rows=2, sampling=sampling, max_len=128)
    assert set(engine._decoders) == keys  # the same Decoders again, whatever the prompts
    with pytest.raises(ValueError, match="max_len 16 is below"):
        continuous_decode(engine, strategy, prompts, max_new_tokens=18, max_rows=2, max_len=16)


@pytest.mark.parametrize("strategy", ["standard", "recycle"])
def test_sampled_requests_share_a_batch_each_with_its_own_seed(strategy):
    """A sampled batch: every request with its own temperature, top-k/top-p and seed, joining while others decode,
    draws exactly the tokens it draws alone."""
    from recyclegpt.decoding.sampling import SamplingParams

    model = predictable(6, 0.3)
    engine = Engine(model, bucket=16, prefill_bucket=8)
    settings = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0.7, top_k=20, seed=2),
                SamplingParams(temperature=1.2, top_p=0.9, seed=3), SamplingParams(temperature=0.9, seed=4),
                SamplingParams(temperature=1.0, top_k=5, seed=5)]
    reqs = [Request([(7 * i + j) % 97 for j in range(1 + 13 * i)], 20 + 3 * i, sampling=s)
            for i, s in enumerate(settings)]
    ContinuousBatch(engine, strategy, 2, max_len=128, check_every=3, sampled=True).run(reqs)
    for r in reqs:
        want = strategies.reference_decode(model, strategy, [list(r.prompt)], max_new_tokens=r.max_new_tokens,
                                           sampling=r.sampling).tokens[0]
        assert r.tokens == want
    assert len({tuple(r.tokens[:5]) for r in reqs}) > 1
    with pytest.raises(ValueError, match="unseeded and with the same settings"):
        ContinuousBatch(engine, "speculative", 2, sampled=True)
    with pytest.raises(ValueError, match="greedy requests only"):
        ContinuousBatch(engine, strategy, 2).add(reqs[0])


@pytest.mark.parametrize("strategy", ["speculative", "recycle-verified"])
def test_unseeded_sampled_requests_of_a_verified_strategy_share_a_batch(strategy):
    """Sampled, unseeded requests of a verified strategy with the same settings decode together (`shared`): every
    row keeps the round's fewest accepted tokens, and each request's tokens are still distributed as the full
    model's (a chi-square test against the enumerated distribution, as tests/test_speculative.py does alone)."""
    from test_speculative import K_TOKENS, PROMPT, SAMPLES, chi_square_pvalue, exact_distribution

    from recyclegpt.decoding.sampling import SamplingParams

    model = predictable(0, 0.3, vocab=5, sharpness=5.0)
    engine = Engine(model, bucket=16, prefill_bucket=8)
    shared = SamplingParams(temperature=1.0)
    torch.manual_seed(0)
    batch = ContinuousBatch(engine, strategy, 16, max_len=32, check_every=2, shared=shared, draft_len=2,
                            draft_rows=None)  # 16 rows that draft
    reqs = batch.run([Request(PROMPT, K_TOKENS, sampling=shared) for _ in range(SAMPLES)])
    counts: dict = {}
    for r in reqs:
        assert len(r.tokens) == K_TOKENS and r.reason == "length"
        counts[tuple(r.tokens)] = counts.get(tuple(r.tokens), 0) + 1
    assert chi_square_pvalue(counts, exact_distribution(model), SAMPLES) > 1e-3
    assert sum(sum(r.stats.accept_hist[1:]) for r in reqs) > 0  # drafts were accepted in the shared rounds
    with pytest.raises(ValueError, match="unseeded requests sampled with"):
        batch.add(Request(PROMPT, 2, sampling=SamplingParams(temperature=0.5)))
    with pytest.raises(ValueError, match="samples unseeded"):
        ContinuousBatch(engine, strategy, 2, shared=SamplingParams(temperature=1.0, seed=3))


def test_continuous_decode_with_settings_per_row():
    """continuous_decode(row_sampling=): greedy and unseeded sampled prompts in one batch; the greedy ones get their
    tokens alone, the sampled ones draw together from torch's generator (the same seed gives the same tokens) and
    are distributed as the model's (chi-square against the enumerated distribution)."""
    from test_speculative import K_TOKENS, PROMPT, SAMPLES, chi_square_pvalue, exact_distribution

    from recyclegpt.decoding.batching import continuous_decode
    from recyclegpt.decoding.sampling import SamplingParams

    model = predictable(0, 0.3, vocab=5, sharpness=5.0)
    engine = Engine(model.base, bucket=16, prefill_bucket=8)
    hot, cold = SamplingParams(temperature=1.0), SamplingParams()
    greedy_alone = continuous_decode(engine, "standard", [PROMPT], max_new_tokens=K_TOKENS, max_rows=1,
                                     max_len=32).tokens[0]

    def run(n: int) -> list[list[int]]:
        rows = [cold if i % 4 == 0 else hot for i in range(n)]
        out = continuous_decode(engine, "standard", [PROMPT] * n, max_new_tokens=K_TOKENS, max_rows=16, max_len=32,
                                row_sampling=rows).tokens
        assert all(out[i] == greedy_alone for i in range(0, n, 4))
        return [t for i, t in enumerate(out) if i % 4]

    torch.manual_seed(5)
    first = run(8)
    torch.manual_seed(5)
    assert run(8) == first
    torch.manual_seed(0)
    counts: dict = {}
    drawn = run(SAMPLES * 4 // 3)
    for toks in drawn:
        counts[tuple(toks)] = counts.get(tuple(toks), 0) + 1
    assert chi_square_pvalue(counts, exact_distribution(model), len(drawn)) > 1e-3
    with pytest.raises(ValueError, match="row_sampling has 1 settings for 2 prompts"):
        continuous_decode(engine, "standard", [PROMPT] * 2, max_new_tokens=2, max_rows=2, row_sampling=[hot])
