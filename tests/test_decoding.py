"""Decoding on tiny random models: cached == recomputed, batched == per prompt, the recycle schedule's calls."""

from __future__ import annotations

import pytest
import torch

from recyclegpt.config import PRESETS, KernelConfig, RecycleConfig
from recyclegpt.decoding.loops import recycle, standard
from recyclegpt.decoding.sampling import SamplingParams
from recyclegpt.models import ModelOutput, RecycleModel

CFG = PRESETS["tiny"]


def make_model(seed: int = 0, n_layer: int = 1) -> RecycleModel:
    torch.manual_seed(seed)
    return RecycleModel.build(CFG, RecycleConfig(n_layer=n_layer)).eval()


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The oracle: recompute the whole sequence without a cache for every token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def random_prompts(seed: int, n: int, lo: int = 1, hi: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, CFG.vocab_size, (L,), generator=g).tolist() for L in lengths]


@pytest.mark.parametrize("seed", range(4))
def test_standard_greedy_equals_uncached_recompute(seed):
    model = make_model(seed)
    for prompt in random_prompts(seed, 3):
        got = standard(model.base, [prompt], max_new_tokens=12).tokens[0]
        assert got == naive_greedy(model.base, prompt, 12)


def test_cached_logits_close_to_uncached():
    model = make_model(1)
    ids = torch.randint(0, CFG.vocab_size, (2, 16))
    with torch.no_grad():
        full = model.base(ids)
        cache = model.base.new_cache(2, 32)
        parts = [model.base(ids[:, :7], input_pos=torch.arange(7), cache=cache, kv_end=7)]
        for t in range(7, 16):
            parts.append(model.base(ids[:, t:t + 1], input_pos=torch.tensor([t]), cache=cache, kv_end=t + 1))
        logits = torch.cat([p.logits for p in parts], dim=1)
        hidden = torch.cat([p.hidden for p in parts], dim=1)
        torch.testing.assert_close(logits, full.logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(logits.argmax(-1), full.logits.argmax(-1))
        # the module, cached vs uncached, over the same recycled inputs
        nxt = torch.randint(0, CFG.vocab_size, (2, 16))
        ref = model.recycle(full.hidden, nxt).logits
        mcache = model.module.new_cache(2, 32)
        got = [model.recycle(hidden[:, :5], nxt[:, :5], input_pos=torch.arange(5), cache=mcache, kv_end=5).logits]
        for t in range(5, 16, 2):
            n = min(2, 16 - t)
            got.append(model.recycle(hidden[:, t:t + n], nxt[:, t:t + n], input_pos=torch.arange(t, t + n),
                                     cache=mcache, kv_end=t + n).logits)
        torch.testing.assert_close(torch.cat(got, dim=1), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_forms_agree(dtype):
    """F.rms_norm on the float32 copy (eager) against the spelled-out form that runs under torch.compile: the same
    values, in the same order of rounding (normalise in float32, cast, then scale)."""
    import recyclegpt.models as model_lib

    norm = model_lib.RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=torch.Generator().manual_seed(1)))
    norm = norm.to(dtype)
    x = (torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2)) * 4).to(dtype)
    with torch.no_grad():
        fused = norm(x)
        spelled = torch.compile(norm, backend="aot_eager", fullgraph=True)(x)
    assert fused.dtype == spelled.dtype == dtype
    torch.testing.assert_close(fused, spelled, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)


@pytest.mark.parametrize("prompt_len", [7, 70])  # 70: past FOLD_MAX_TOKENS, the prompt's call repeats K/V
def test_cached_left_padded_calls_equal_each_row_alone(prompt_len):
    """The additive mask made once per call, with the grouped query heads folded into the query axis for calls on
    few tokens (`attention_mask`), gives each row of a left-padded batch what causal attention over that row alone
    gives without a cache."""
    from recyclegpt.models import FOLD_MAX_TOKENS

    model = make_model(5)
    assert CFG.n_head // CFG.n_kv_head == 2  # the tiny preset has grouped-query attention
    assert (prompt_len > FOLD_MAX_TOKENS) == (prompt_len == 70)
    n = prompt_len + 2
    ids = torch.randint(0, CFG.vocab_size, (2, n), generator=torch.Generator().manual_seed(5))
    pad = torch.tensor([0, 4])
    cache = model.base.new_cache(2, n + 8)
    with torch.no_grad():
        first = model.base(ids[:, :prompt_len], input_pos=torch.arange(prompt_len), cache=cache, pad=pad,
                           kv_end=prompt_len + 1)
        step = model.base(ids[:, prompt_len:], input_pos=torch.arange(prompt_len, n), cache=cache, pad=pad,
                          kv_end=n + 3)
        got = torch.cat((first.logits, step.logits), dim=1)
        for row, p in enumerate(pad.tolist()):
            alone = model.base(ids[row:row + 1, p:]).logits[0]
            torch.testing.assert_close(got[row, p:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", [standard, recycle])
def test_batched_equals_per_prompt(strategy):
    model = make_model(2)
    target = model.base if strategy is standard else model
    prompts = random_prompts(7, 5, lo=1, hi=15)
    batched = strategy(target, prompts, max_new_tokens=10).tokens
    for prompt, got in zip(prompts, batched):
        assert got == strategy(target, [prompt], max_new_tokens=10).tokens[0]


class ForcedModule(RecycleModel):
    """A recycle model whose module predicts a token chosen by the test (still running the real module)."""

    def __init__(self, model: RecycleModel, choose):
        super().__init__(model.base, model.module)
        self.choose = choose  # (slot of the predicted token) -> token id

    def recycle(self, hidden, next_tokens, *, input_pos=None, num_logits=None, **kw):
        out = super().recycle(hidden, next_tokens, input_pos=input_pos, num_logits=num_logits, **kw)
        logits = torch.full_like(out.logits, -1e9)
        slots = input_pos[-logits.shape[1]:] + 2  # the module at slot t predicts the token in slot t + 2
        for j, s in enumerate(slots.tolist()):
            logits[:, j, self.choose(s)] = 0.0
        return ModelOutput(logits, out.hidden)


def record_calls(model: RecycleModel):
    calls = []
    for name, part in (("full", model.base), ("module", model.module)):
        def hook(m, args, kw, _name=name):
            if kw.get("cache") is not None:  # decoding calls only, not the test's own reference passes
                calls.append((_name, kw["input_pos"].tolist()))
        part.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def capture_caches(model: RecycleModel):
    caches = {}
    for name, part in (("base", model.base), ("module", model.module)):
        make = part.new_cache

        def new_cache(*a, _make=make, _name=name, **kw):
            caches[_name] = _make(*a, **kw)
            return caches[_name]

        part.new_cache = new_cache
    return caches


def test_recycle_schedule_and_caches():
    model = ForcedModule(make_model(3), choose=lambda slot: (5 * slot + 1) % CFG.vocab_size)
    calls, caches = record_calls(model), capture_caches(model)
    prompt = [3, 14, 15, 92, 65]
    L, n = len(prompt), 9
    res = recycle(model, [prompt], max_new_tokens=n)
    toks = res.tokens[0]
    assert len(toks) == n
    # the schedule: prefill, module prefill, then (full on 2 slots, module on the same 2 slots) per 2 tokens
    expected = [("full", list(range(L))), ("module", list(range(L)))]
    for p in range(L, L + n - 3, 2):
        expected += [("full", [p, p + 1]), ("module", [p, p + 1])]
    assert calls[:len(expected)] == expected
    assert calls[len(expected):] == [("full", [L + n - 3, L + n - 2])]  # the 9th token needs no module call
    assert res.stats.full_calls == 1 + (n - 1) // 2 and res.stats.module_calls == 1 + (n - 3) // 2
    # tokens at odd offsets come from the module, exactly as forced
    for i in range(1, n, 2):
        assert toks[i] == (5 * (L + i) + 1) % CFG.vocab_size
    # tokens at even offsets are the full model's greedy choice given everything before
    with torch.no_grad():
        seq = torch.tensor([prompt + toks])
        ref = model.base(seq)
        for i in range(0, n, 2):
            assert toks[i] == int(ref.logits[0, L + i - 1].argmax())
    # the base cache ends identical to a standard pass over the same tokens (all slots written so far)
    cache = model.base.new_cache(1, caches["base"].max_len)
    with torch.no_grad():
        model.base(seq[:, :-1], input_pos=torch.arange(L + n - 1), cache=cache, kv_end=L + n - 1)
    used = L + n - 1  # the last token was sampled but never fed back
    torch.testing.assert_close(caches["base"].k[..., :used, :], cache.k[..., :used, :], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches["base"].v[..., :used, :], cache.v[..., :used, :], rtol=1e-5, atol=1e-5)


class Oracle(RecycleModel):
    """A module stub that predicts exactly what the full model would, so recycle must equal standard decoding."""

    def recycle(self, hidden, next_tokens, *, input_pos=None, num_logits=None, **kw):
        out = super().recycle(hidden, next_tokens, input_pos=input_pos, num_logits=num_logits, **kw)
        self.seen[:, input_pos + 1] = next_tokens  # x_{t+1} sits in slot t + 1
        logits = self.base(self.seen[:, :int(input_pos[-1]) + 2]).logits[:, -1:]
        return ModelOutput(logits, out.hidden)


def test_recycle_with_a_perfect_module_equals_standard():
    trained = make_model(4)
    model = Oracle(trained.base, trained.module)
    for prompt in random_prompts(11, 4, lo=2, hi=12):
        model.seen = torch.zeros(1, 64, dtype=torch.long)
        model.seen[0, 0] = prompt[0]
        got = recycle(model, [prompt], max_new_tokens=11).tokens[0]
        assert got == standard(model.base, [prompt], max_new_tokens=11).tokens[0]


def test_stop_tokens_and_budget():
    model = make_model(5)
    prompt = [1, 2, 3]
    free = standard(model.base, [prompt], max_new_tokens=8).tokens[0]
    stop = free[3]
    first = free.index(stop)
    res = standard(model.base, [prompt], max_new_tokens=8, stop_ids=[stop])
    assert res.tokens[0] == free[:first] and res.finished == [True]
    rec = recycle(model, [prompt], max_new_tokens=1)
    assert len(rec.tokens[0]) == 1 and rec.stats.full_calls == 1 and rec.stats.module_calls == 0


def test_sampling_is_reproducible_with_a_seed():
    model = make_model(6)
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=123)
    for strategy, target in ((standard, model.base), (recycle, model)):
        a = strategy(target, [[4, 5, 6]], max_new_tokens=10, sampling=params).tokens
        b = strategy(target, [[4, 5, 6]], max_new_tokens=10, sampling=params).tokens
        assert a == b


@pytest.mark.parametrize("bad, match", [
    (dict(prompts=[[]]), "empty"),
    (dict(prompts=[]), "no prompts"),
    (dict(prompts=[[1] * 300]), "context"),
    (dict(prompts=[[1, 2]], max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[[1, 2]], max_new_tokens=1000), "context length"),
    (dict(prompts=[[1, 10_000]]), "outside the vocabulary"),
])
def test_bad_input_is_a_clear_error(bad, match):
    model = make_model(0)
    kw = dict(max_new_tokens=4) | bad
    with pytest.raises(ValueError, match=match):
        standard(model.base, **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_values(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


@pytest.mark.parametrize("form", ["auto", "linear", "transposed"])
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 16, 17, 32, 33])
def test_few_row_products_equal_f_linear(rows, form):
    from recyclegpt import models as m

    kernels = KernelConfig(cpu_products=form)
    torch.manual_seed(rows)
    w = torch.randn(300, 48)
    x = torch.randn(rows, 2, 48)[:, 1]  # not contiguous
    with torch.no_grad():
        got = m.linear(x, w, kernels)
    assert got.shape == (rows, 300)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    if form == "linear" or rows > m.FEW_ROWS:
        assert torch.equal(got, torch.nn.functional.linear(x, w))
    x3 = torch.randn(1, rows, 48)
    with torch.no_grad():
        torch.testing.assert_close(m.linear(x3, w, kernels), x3 @ w.t(), rtol=1e-5, atol=1e-5)
    x = x.clone().requires_grad_(True)  # with autograd: F.linear's own backward
    m.linear(x, w, kernels).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(rows, -1), rtol=1e-5, atol=1e-4)


def test_cpu_products_choice_is_checked_and_measured_once():
    from recyclegpt.models import transformer

    with pytest.raises(ValueError, match="cpu_products must be one of auto, linear, transposed, got 'tall'"):
        KernelConfig(cpu_products="tall")
    first = transformer.transposed_faster()
    assert isinstance(first, bool) and transformer._MEASURED == {"cpu": first}  # measured once per process


@pytest.mark.parametrize("form", ["linear", "transposed"])
def test_a_model_call_with_and_without_the_few_row_path_agrees(form):
    """Without autograd a few-row call takes the KernelConfig's CPU form; with it, F.linear: the same logits."""
    model = make_model(8)
    model.kernels = KernelConfig(cpu_products=form)
    ids = torch.randint(0, CFG.vocab_size, (2, 1))
    with torch.no_grad():
        few_rows = model.base(ids, num_logits=1).logits
        state = model.state(model.base(ids))
        drafted = model.recycle(state, ids).logits
    with torch.enable_grad():
        plain = model.base(ids, num_logits=1).logits.detach()
        plain_drafted = model.recycle(state, ids).logits.detach()
    torch.testing.assert_close(few_rows, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(drafted, plain_drafted, rtol=1e-5, atol=1e-5)
    if form == "linear":
        assert torch.equal(few_rows, plain) and torch.equal(drafted, plain_drafted)
