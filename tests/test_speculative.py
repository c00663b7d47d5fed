"""Lossless strategies (recycle-verified, speculative, tree): exact greedy equality with standard decoding, the
sampling distribution against the full model's exact one, and the caches after rejections.

A random module drafts badly, so acceptances would be rare. `predictable` builds a base whose next token depends
mostly on the current one (attention and MLP outputs scaled by `noise`) and a module that reads the new token's
embedding: at noise 0 it drafts perfectly at every depth, and more noise gives more rejections.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from test_decoding import capture_caches

from recyclegpt.config import PRESETS, RecycleConfig
from recyclegpt.decoding import speculative as spec
from recyclegpt.decoding import verify
from recyclegpt.decoding.loops import standard
from recyclegpt.decoding.sampling import SamplingParams
from recyclegpt.decoding.speculative import (
    TreeShape,
    recycle_verified,
    speculative,
    tree,
)
from recyclegpt.models import RecycleModel

STRATEGIES = {
    "recycle-verified": (recycle_verified, {}),
    "speculative-1": (speculative, dict(draft_len=1)),
    "speculative-3": (speculative, dict(draft_len=3)),
    "speculative-5": (speculative, dict(draft_len=5)),
    "tree-4x3x10": (tree, dict(shape=TreeShape(depth=4, topk=3, nodes=10))),
    "tree-6x2x12": (tree, dict(shape=TreeShape(depth=6, topk=2, nodes=12))),
    "tree-4x3x10-lookup4": (tree, dict(shape=TreeShape(depth=4, topk=3, nodes=10, lookup=4))),
}


def predictable(seed: int, noise: float, *, vocab: int = 97, sharpness: float = 10.0, **shape) -> RecycleModel:
    """The tiny preset (or its `shape` fields replaced) with small residual branches, a module that passes the
    hidden state on and a sharp head: drafts are often right, greedy ties rare."""
    cfg = dataclasses.replace(PRESETS["tiny"], tie_embeddings=False, vocab_size=vocab, **shape)
    torch.manual_seed(seed)
    model = RecycleModel.build(cfg, RecycleConfig(n_layer=1)).eval()
    d = cfg.d_model
    with torch.no_grad():
        for block in list(model.base.layers) + list(model.module.layers):
            block.attn.wo.weight.mul_(noise)
            block.mlp.w2.weight.mul_(noise)
        model.module.fc.weight.copy_(torch.cat((torch.zeros(d, d), torch.eye(d)), 1) + noise * torch.randn(d, 2 * d))
        model.base.lm_head.weight.mul_(sharpness)
    return model


def prompts_for(seed: int, n: int, vocab: int = 97) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(L),), generator=g).tolist() for L in torch.randint(1, 16, (n,), generator=g)]


# -- greedy: token for token the same as standard decoding -------------------------------------------------------


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("noise", [0.0, 0.05, 0.15, 1.0])
def test_greedy_equals_standard(name, noise):
    fn, kw = STRATEGIES[name]
    hists = []
    for seed in range(3):
        model = predictable(seed, noise)
        prompts = prompts_for(seed, 3)
        ref = standard(model.base, prompts, max_new_tokens=24).tokens
        for prompt, want in zip(prompts, ref):
            res = fn(model, [prompt], max_new_tokens=24, **kw)
            assert res.tokens[0] == want, f"{name}, noise {noise}, seed {seed}, prompt {prompt}"
            hists.append(res.stats.accept_hist)
        assert fn(model, prompts, max_new_tokens=24, **kw).tokens == ref  # a left-padded batch
    accepted = sum(sum(h[1:]) for h in hists)
    rejected = sum(h[0] for h in hists)
    if noise == 0.0:  # a perfect drafter: every verification accepts something
        assert rejected == 0
    if noise == 0.05:  # both paths exercised
        assert accepted > 0 and rejected > 0


def test_accepted_prefix_ends_at_the_first_rejection():
    g = torch.Generator().manual_seed(0)
    ok = torch.rand(64, 6, generator=g) < 0.7
    got = verify.accepted_prefix(ok)
    want = [next((j for j, x in enumerate(row) if not x), len(row)) for row in ok.tolist()]
    assert got.tolist() == want and got.dtype == torch.long
    assert verify.accepted_prefix(torch.ones(2, 3, dtype=torch.bool)).tolist() == [3, 3]
    assert verify.accepted_prefix(torch.ones(2, 0, dtype=torch.bool)).tolist() == [0, 0]


def test_tau_and_histogram():
    model = predictable(0, 0.0)
    res = speculative(model, [[5, 6, 7]], max_new_tokens=25, draft_len=4)
    st = res.stats
    assert st.accept_hist == [0, 0, 0, 0, 5]  # 1 (prefill) + 5 rounds x 5 tokens; every draft accepted
    assert st.tau == 5.0 and st.full_calls == 6 and st.module_calls == 5 * 4
    d = st.to_dict()
    assert d["tau"] == 5.0 and d["accept_hist"] == [0, 0, 0, 0, 5]
    assert "tau" not in standard(model.base, [[5, 6, 7]], max_new_tokens=3).stats.to_dict()


def test_stop_tokens_and_budgets():
    model = predictable(1, 0.05)
    prompt = [3, 1, 4]
    free = standard(model.base, [prompt], max_new_tokens=20).tokens[0]
    stop = free[7]
    for name, (fn, kw) in STRATEGIES.items():
        res = fn(model, [prompt], max_new_tokens=20, stop_ids=[stop], **kw)
        assert res.tokens[0] == free[:free.index(stop)] and res.finished == [True], name
        for n in (1, 2, 5):
            assert fn(model, [prompt], max_new_tokens=n, **kw).tokens[0] == free[:n], name


def test_bad_options_are_clear_errors():
    model = predictable(0, 0.1)
    with pytest.raises(ValueError, match="draft_len"):
        speculative(model, [[1, 2]], max_new_tokens=4, draft_len=0)
    with pytest.raises(ValueError, match="at most"):
        tree(model, [[1, 2]], max_new_tokens=4, shape=TreeShape(depth=2, topk=2, nodes=9))
    with pytest.raises(ValueError, match="topk"):
        tree(model, [[1, 2]], max_new_tokens=4, shape=TreeShape(depth=2, topk=0, nodes=1))
    with pytest.raises(ValueError, match="context length"):
        speculative(model, [[1, 2]], max_new_tokens=250, draft_len=8)


@pytest.mark.real_model
def test_smollm2_greedy_equals_standard(smollm2_gguf):
    from recyclegpt.api import RecycleGPT

    lm = RecycleGPT.from_pretrained("smollm2-135m-instruct", device="cpu")  # the shipped module
    prompts = [lm.encode(p, chat=True) for p in ("Name three fruits.", "What is 12 times 7?")]
    ref = standard(lm.base, prompts, max_new_tokens=32).tokens
    for name in ("recycle-verified", "speculative-3", "tree-4x3x10"):
        fn, kw = STRATEGIES[name]
        res = fn(lm.model, prompts[:1], max_new_tokens=32, **kw)
        assert res.tokens[0] == ref[0], name
        assert sum(res.stats.accept_hist[1:]) > 0, name  # the trained module's drafts do get accepted
        assert fn(lm.model, prompts, max_new_tokens=32, **kw).tokens == ref, name


# -- caches after rejections -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, noise", [("recycle-verified", 0.05), ("speculative-3", 0.05), ("tree-4x3x10", 0.1),
                                         ("tree-4x3x10-lookup4", 0.1)])
def test_caches_after_rejections_equal_standard_over_the_accepted_tokens(name, noise):
    fn, kw = STRATEGIES[name]
    model = predictable(2, noise)
    caches = capture_caches(model)
    prompt = [7, 8, 9, 10]
    res = fn(model, [prompt], max_new_tokens=30, **kw)
    assert res.stats.accept_hist[0] > 0 and sum(res.stats.accept_hist[1:]) > 0  # rejections and acceptances
    seq = torch.tensor([prompt + res.tokens[0]])
    used = seq.shape[1] - 1  # the last token is pending: sampled, never fed to the full model
    ref = model.base.new_cache(1, caches["base"].max_len)
    mref = model.module.new_cache(1, caches["module"].max_len)
    with torch.no_grad():
        full = model.base(seq[:, :used], input_pos=torch.arange(used), cache=ref, kv_end=used)
        model.recycle(full.hidden, seq[:, 1:used + 1], input_pos=torch.arange(used), cache=mref, kv_end=used)
    got, want = caches["base"], ref
    torch.testing.assert_close(got.k[..., :used, :], want.k[..., :used, :], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.v[..., :used, :], want.v[..., :used, :], rtol=1e-5, atol=1e-5)
    # the module's slots are caught up to the start of the last round (its last commit, at most 5 tokens here,
    # is not yet fed back)
    caught = used - 5
    torch.testing.assert_close(caches["module"].k[..., :caught, :], mref.k[..., :caught, :], rtol=1e-5, atol=1e-5)


def test_tree_commit_moves_the_accepted_path():
    from recyclegpt.models import KVCache

    cache = KVCache(2, 2, 1, 8, 3)
    cache.k.copy_(torch.arange(cache.k.numel(), dtype=torch.float32).view_as(cache.k))
    before = cache.k.clone()
    cache.move(torch.tensor([[5, 7], [3, 4]]), torch.tensor([3, 4]))
    assert torch.equal(cache.k[:, 0, :, 3], before[:, 0, :, 5]) and torch.equal(cache.k[:, 0, :, 4], before[:, 0, :, 7])
    assert torch.equal(cache.k[:, 1], before[:, 1])  # row 1's path was already in place
    assert torch.equal(cache.k[:, :, :, :3], before[:, :, :, :3])


# -- sampling: the output distribution is the full model's --------------------------------------------------------

V, K_TOKENS, SAMPLES = 5, 3, 1500
PROMPT = [1, 2, 3]


def exact_distribution(model: RecycleModel) -> dict[tuple, float]:
    """P(x1, x2, x3 | PROMPT) under the full model at temperature 1, by enumeration."""
    seqs = [list(s) for s in itertools.product(range(V), repeat=K_TOKENS)]
    with torch.no_grad():
        logp = torch.log_softmax(model.base(torch.tensor([PROMPT + s for s in seqs])).logits.float(), -1)
    L = len(PROMPT)
    return {tuple(s): float(sum(lp[L - 1 + i, t] for i, t in enumerate(s)).exp()) for s, lp in zip(seqs, logp)}


def chi_square_pvalue(counts: dict, probs: dict, n: int) -> float:
    """Pearson's test of counts against probs, with cells merged (rarest first) until each expects >= 5."""
    obs, exp, o, e = [], [], 0, 0.0
    for cell in sorted(probs, key=probs.get):
        o, e = o + counts.get(cell, 0), e + probs[cell] * n
        if e >= 5:
            obs.append(o), exp.append(e)
            o, e = 0, 0.0
    obs[-1], exp[-1] = obs[-1] + o, exp[-1] + e
    stat = sum((a - b) ** 2 / b for a, b in zip(obs, exp))
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2), torch.tensor(stat / 2)))


def sample_counts(fn, kw, model, batch: int = 1, hist: list | None = None) -> tuple[dict, int]:
    counts: dict = {}
    for seed in range(SAMPLES // batch):
        res = fn(model, [PROMPT] * batch, max_new_tokens=K_TOKENS, sampling=SamplingParams(temperature=1.0, seed=seed),
                 **kw)
        for row in res.tokens:
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
        if hist is not None:
            hist.append(res.stats.accept_hist)
    return counts, SAMPLES // batch * batch


@pytest.fixture(scope="module")
def sampler_model():
    # the module drafts from a distribution close to, but not the same as, the full model's: q != p
    return predictable(0, 0.3, vocab=V, sharpness=5.0)


@pytest.mark.parametrize("name, batch", [("speculative-2", 1), ("recycle-verified", 1), ("tree", 1),
                                         ("tree-lookup", 1), ("speculative-2", 4)])
def test_sampling_matches_the_full_models_distribution(sampler_model, name, batch):
    fn, kw = {"speculative-2": (speculative, dict(draft_len=2)), "recycle-verified": (recycle_verified, {}),
              "tree": (tree, dict(shape=TreeShape(depth=3, topk=2, nodes=5))),
              "tree-lookup": (tree, dict(shape=TreeShape(depth=3, topk=2, nodes=5, lookup=3)))}[name]
    hists: list = []
    counts, n = sample_counts(fn, kw, sampler_model, batch, hists)
    assert chi_square_pvalue(counts, exact_distribution(sampler_model), n) > 1e-3
    # not vacuous: drafts were accepted (a rule that always rejects would be trivially exact)
    rounds, accepted = sum(sum(h) for h in hists), sum(sum(h[1:]) for h in hists)
    assert accepted > (0.05 if batch > 1 else 0.3) * rounds


def _accept_everything(draft, draft_probs, logits, params, generator=None):
    _, tokens = verify.verify_chain(draft, draft_probs, logits, params, generator)
    K = draft.shape[1]
    return torch.full_like(draft[:, 0], K), torch.cat((draft, tokens[:, K:]), 1)


def _correct_from_p(draft, draft_probs, logits, params, generator=None):
    """Right acceptance test, wrong correction: draws from p instead of norm(max(p - q, 0))."""
    from recyclegpt.decoding.sampling import draw, logits_to_probs

    a, tokens = verify.verify_chain(draft, draft_probs, logits, params, generator)
    fixed = draw(logits_to_probs(logits, params), generator)
    keep = torch.arange(draft.shape[1] + 1)[None] < a[:, None]
    return a, torch.where(keep, tokens, fixed)


@pytest.mark.parametrize("broken", [_accept_everything, _correct_from_p])
def test_the_distribution_test_catches_a_broken_rule(sampler_model, monkeypatch, broken):
    monkeypatch.setattr(spec, "verify_chain", broken)
    counts, n = sample_counts(speculative, dict(draft_len=2), sampler_model)
    assert chi_square_pvalue(counts, exact_distribution(sampler_model), n) < 1e-6


def test_sampled_runs_are_reproducible_with_a_seed():
    model = predictable(3, 0.1)
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=11)
    for name, (fn, kw) in STRATEGIES.items():
        a = fn(model, [[4, 5, 6]], max_new_tokens=16, sampling=params, **kw).tokens
        assert a == fn(model, [[4, 5, 6]], max_new_tokens=16, sampling=params, **kw).tokens, name


# -- a draft vocabulary: the module drafts over a subset of the tokens, the output stays exact ----------------------


def with_draft_vocab(model: RecycleModel, ids) -> RecycleModel:
    from recyclegpt.training.train import add_draft_vocab

    return RecycleModel(model.base, add_draft_vocab(model.module, ids)).eval()


@pytest.mark.parametrize("name", STRATEGIES)
def test_a_draft_vocabulary_keeps_greedy_output_exact(name, monkeypatch):
    fn, kw = STRATEGIES[name]
    drafted = []
    original = spec.verify_chain, spec.verify_tree
    monkeypatch.setattr(spec, "verify_chain", lambda draft, *a, **k: drafted.append(draft) or original[0](draft, *a, **k))
    monkeypatch.setattr(spec, "verify_tree", lambda tokens, *a, **k: drafted.append(tokens) or original[1](tokens, *a, **k))
    allowed = list(range(0, 97, 2))  # the even tokens: every odd token the full model picks is a forced rejection
    accepted = 0
    for seed in range(3):
        model = with_draft_vocab(predictable(seed, 0.05), allowed)
        prompts = prompts_for(seed, 3)
        res = fn(model, prompts, max_new_tokens=24, **kw)
        assert res.tokens == standard(model.base, prompts, max_new_tokens=24).tokens
        accepted += sum(res.stats.accept_hist[1:])
    assert accepted > 0
    lookup = kw["shape"].lookup if "shape" in kw else 0  # the lookup branch drafts text's tokens, not the module's
    drafted = [d[:, :d.shape[1] - lookup] for d in drafted]
    assert drafted and all(bool((d % 2 == 0).all()) for d in drafted)  # only draft-vocabulary tokens were drafted


def test_a_draft_vocabulary_keeps_sampling_exact():
    model = with_draft_vocab(predictable(0, 0.3, vocab=V, sharpness=5.0), list(range(V - 1)))  # the last never drafted
    hists: list = []
    counts, n = sample_counts(speculative, dict(draft_len=2), model, 1, hists)
    assert chi_square_pvalue(counts, exact_distribution(model), n) > 1e-3
    assert sum(sum(h[1:]) for h in hists) > 0.2 * sum(sum(h) for h in hists)


def test_a_draft_vocabulary_leaves_recycle_alone_and_is_saved(tmp_path):
    from recyclegpt.decoding.loops import recycle
    from recyclegpt.loading.checkpoint import load_module, save_checkpoint

    plain = predictable(1, 0.1)
    model = with_draft_vocab(plain, [5, 1, 3])
    prompts = prompts_for(2, 2)
    assert recycle(model, prompts, max_new_tokens=10).tokens == recycle(plain, prompts, max_new_tokens=10).tokens
    with pytest.raises(ValueError, match="distinct token ids"):
        with_draft_vocab(plain, [1, 1])
    save_checkpoint(tmp_path / "m", model, base_ref="tiny")
    loaded = load_module(tmp_path / "m", model.base)
    assert loaded.cfg.draft_vocab == 3 and loaded.draft_ids.tolist() == [1, 3, 5]


@pytest.mark.parametrize("threshold", [0.3, 0.9, 0.999])
def test_adaptive_draft_length_stays_exact(threshold):
    rounds_with = {}
    for seed in range(3):
        model = predictable(seed, 0.1)
        prompts = prompts_for(seed, 3)
        res = speculative(model, prompts, max_new_tokens=24, draft_len=4, min_draft_prob=threshold)
        assert res.tokens == standard(model.base, prompts, max_new_tokens=24).tokens
        fixed = speculative(model, prompts, max_new_tokens=24, draft_len=4)
        rounds_with[seed] = (res.stats.full_calls, fixed.stats.module_calls, res.stats.module_calls)
    # a high threshold drafts less: fewer module calls than fixed-length drafting
    assert sum(r[2] for r in rounds_with.values()) < sum(r[1] for r in rounds_with.values())
    sampled = SamplingParams(temperature=0.9, seed=4)
    a = speculative(predictable(1, 0.1), [[4, 5]], max_new_tokens=12, min_draft_prob=threshold, sampling=sampled)
    assert len(a.tokens[0]) == 12


def test_adaptive_draft_length_keeps_sampling_exact(sampler_model):
    hists: list = []
    counts, n = sample_counts(speculative, dict(draft_len=2, min_draft_prob=0.4), sampler_model, 1, hists)
    assert chi_square_pvalue(counts, exact_distribution(sampler_model), n) > 1e-3
    # not vacuous: drafts were accepted, and most rounds were cut short (a fixed length of 2 accepts both drafts
    # in more than half the rounds here; at this threshold most rounds draft nothing)
    rounds = sum(sum(h) for h in hists)
    assert sum(sum(h[1:]) for h in hists) > 0.05 * rounds and sum(h[2] for h in hists) < 0.1 * rounds
    with pytest.raises(ValueError, match="min_draft_prob"):
        speculative(sampler_model, [PROMPT], max_new_tokens=2, min_draft_prob=1.0)


# -- the tree's prompt-lookup branch -------------------------------------------------------------------------------


def test_prompt_lookup_finds_the_latest_longest_match():
    seq = torch.tensor([[5, 6, 7, 8, 9, 6, 7, 3, 5, 6, 7, 0, 0],  # suffix 5 6 7 (end 11): after slot 0..2 comes 8
                        [1, 1, 4, 7, 2, 9, 4, 7, 3, 8, 4, 7, 0],  # suffix 3 8 4 and 8 4 nowhere; 4 latest at 6
                        [7, 7, 2, 3, 9, 9, 9, 9, 9, 1, 2, 0, 0]])  # 1 2 nowhere in 2..10; 2 (slot 10) at 2: 3 9
    pad = torch.tensor([0, 0, 2])
    got = spec.prompt_lookup(seq, pad, torch.tensor([11]), 3)
    assert got[0].tolist() == [8, 9, 6]  # the 3-token match wins over the later 2-token one (6 7 at 5..6)
    assert got[1].tolist() == [7, 3, 8]  # slot 11 (a stale 7) is past the end: never matched
    assert got[2].tolist() == [3, 9, 9]  # row 2's real tokens start at slot 2: the 7s before it are padding
    assert spec.prompt_lookup(seq, None, 11, 2)[2].tolist() == [3, 9]  # an int end, no padding


def _bad_drafter(seed: int) -> RecycleModel:
    """A predictable base (its greedy text falls into cycles) with a module that drafts badly."""
    model = predictable(seed, 0.05)
    with torch.no_grad():
        model.module.fc.weight.normal_(generator=torch.Generator().manual_seed(seed))
    return model


def test_the_lookup_branch_is_exact_and_accepts_repeats():
    with_lookup, without = [], []
    for seed in range(3):
        model = _bad_drafter(seed)
        prompts = prompts_for(seed, 2)
        want = standard(model.base, prompts, max_new_tokens=60).tokens
        a = tree(model, prompts, max_new_tokens=60, shape=TreeShape(4, 2, 6, 4))
        b = tree(model, prompts, max_new_tokens=60, shape=TreeShape(4, 2, 6))
        assert a.tokens == b.tokens == want
        with_lookup.append(a.stats.tau)
        without.append(b.stats.tau)
    assert sum(with_lookup) > sum(without) + 0.5, (with_lookup, without)


def test_the_lookup_branch_is_grafted_where_the_tree_already_spells_it():
    # a drafted tree over [root, 1..4]: 1 (token 7) and 2 (token 8) under the root, 3 (token 9) under 1, 4 (token 5)
    # under 3; row 0's chain 7 9 6 shares "7 9" with it, row 1's chain 4 4 4 shares nothing
    tokens = torch.tensor([[7, 8, 9, 5]] * 2)
    parent = torch.tensor([[0, 0, 1, 3]] * 2)
    depth = torch.tensor([[1, 1, 2, 3]] * 2)
    sees = torch.zeros(2, 5, 5, dtype=torch.bool)
    for node, anc in {0: [0], 1: [0, 1], 2: [0, 2], 3: [0, 1, 3], 4: [0, 1, 3, 4]}.items():
        sees[:, node, anc] = True
    positions = torch.tensor([[10, 11, 11, 12, 13]] * 2)
    t = spec.add_lookup_branch(spec.TreeDraft(tokens, parent, depth, sees, positions),
                               torch.tensor([[7, 9, 6], [4, 4, 4]]))
    # row 0: chain nodes 5, 6 (7, 9) are off (their own parents); node 7 (6) hangs under drafted node 3
    assert t.parent[0, 4:].tolist() == [5, 6, 3] and t.parent[1, 4:].tolist() == [0, 5, 6]
    assert t.depth[0, 4:].tolist() == [1, 2, 3] and t.positions[0, 5:].tolist() == [11, 12, 13]
    assert t.sees[0, 7].nonzero().flatten().tolist() == [0, 1, 3, 7]  # its drafted ancestors and itself
    assert t.sees[1, 7].nonzero().flatten().tolist() == [0, 5, 6, 7]
    # verification: a node that is its own parent is never accepted, whatever its token
    logits = torch.full((2, 8, 10), -9.0)
    for node, nxt in {0: 7, 1: 9, 3: 6}.items():  # the full model would say 7, then 9, then 6
        logits[0, node, nxt] = 9.0
    logits[1, 0, 4] = logits[1, 5, 4] = logits[1, 6, 4] = logits[1, 7, 1] = 9.0
    a, emitted, path = verify.verify_tree(t.tokens, t.parent, t.depth, 3, logits, SamplingParams())
    assert a.tolist() == [3, 3] and path[0].tolist() == [1, 3, 7] and path[1].tolist() == [5, 6, 7]
    assert emitted[0].tolist() == [7, 9, 6, 0] and emitted[1].tolist() == [4, 4, 4, 1]


def test_bad_lookup_lengths_are_clear_errors():
    with pytest.raises(ValueError, match="lookup .5. may not exceed the tree depth .4."):
        TreeShape(4, 2, 6, 5).check()
    with pytest.raises(ValueError, match="lookup must be an integer >= 0"):
        TreeShape(4, 2, 6, -1).check()
