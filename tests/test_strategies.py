"""The strategy registry (decoding/strategies.py): its API, a strategy registered from outside the package running on the
eager reference and on every engine, prompt-lookup decoding (`lookup`) lossless everywhere, and the `Drafter`
protocol with a drafter of the test's own."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_speculative import _bad_drafter, predictable, prompts_for

from recyclegpt.api import RecycleGPT
from recyclegpt.decoding import strategies
from recyclegpt.decoding.engine import Engine
from recyclegpt.decoding.loops import standard
from recyclegpt.decoding.sampling import SamplingParams
from recyclegpt.decoding.speculative import (
    LookupDrafter,
    ModuleDrafter,
    chain,
    point_mass,
)
from recyclegpt.decoding.strategies import Strategy, common, reference_decode
from recyclegpt.evals import differential as dt

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
COMPILER = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                              reason="torch.compile on the CPU needs a C++ compiler")

# two strategies as a user would register them: standard decoding under a new name, and a lossless variant of
# prompt lookup with a fixed draft length
TOYS = (
    Strategy("plain", lossless=True, needs_module=False, round="standard",
             reference=lambda model, prompts, **kw: standard(model, prompts, **common(kw))),
    Strategy("lookup-2", lossless=True, needs_module=False, round="lookup", draft_len=2,
             reference=strategies.get("lookup").reference),
)


@pytest.fixture
def toys():
    for s in TOYS:
        strategies.register(s)
    yield [s.name for s in TOYS]
    for s in TOYS:
        strategies.unregister(s.name)


def test_the_registry_holds_the_built_in_strategies():
    assert strategies.names()[:6] == ("standard", "recycle", "recycle-verified", "speculative", "tree", "lookup")
    assert set(strategies.lossless_names()) >= {"recycle-verified", "speculative", "tree", "lookup"}
    assert "standard" not in strategies.lossless_names() and "recycle" not in strategies.lossless_names()
    assert [n for n in strategies.names() if not strategies.get(n).needs_module] == ["standard", "lookup"]
    with pytest.raises(ValueError, match=r"^unknown strategy 'nope'; choose one of standard, recycle, .*lookup$"):
        strategies.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        strategies.register(strategies.get("standard"))
    with pytest.raises(ValueError, match="unknown round"):
        Strategy("x", lossless=True, needs_module=False, reference=standard, round="spiral")
    with pytest.raises(ValueError, match="runs the module"):
        Strategy("x", lossless=True, needs_module=False, reference=standard, round="chain")


def cpu_engines(model) -> dict[str, Engine]:
    """Every engine kind the CPU runs: static steps, and the same steps compiled (without graphs)."""
    engines = {"static": Engine(model, graphs=False, bucket=16, prefill_bucket=8)}
    if shutil.which("c++") or shutil.which("g++"):
        engines["compiled"] = Engine(model, graphs=False, compile=True, bucket=64)
    return engines


@pytest.mark.slow
def test_a_strategy_registered_from_outside_runs_on_the_reference_and_every_engine(toys):
    model = _bad_drafter(0)
    prompts = prompts_for(0, 3)
    want = standard(model.base, prompts, max_new_tokens=30).tokens
    for name in toys:
        assert name in strategies.names()
        ref = reference_decode(model, name, prompts, max_new_tokens=30)
        assert ref.tokens == want and ref.stats.strategy == name, name
        for kind, engine in cpu_engines(model).items():
            got = engine.decode(name, prompts, max_new_tokens=30)
            assert got.tokens == want, (name, kind)
    lookup2 = Engine(model, bucket=16).decode("lookup-2", prompts, max_new_tokens=30)
    assert len(lookup2.stats.accept_hist) == 3 and sum(lookup2.stats.accept_hist[1:]) > 0  # its own draft length


def test_the_api_and_the_harness_read_the_registry(toys):
    model = predictable(1, 0.05)
    lm = RecycleGPT(model.base, None)  # no module: neither toy needs one
    prompts = prompts_for(1, 2)
    want = standard(model.base, prompts, max_new_tokens=20).tokens
    for name in toys:
        for engine in ("eager", "static"):
            out = lm.generate(prompts, strategy=name, max_new_tokens=20, engine=engine)
            assert out.token_ids == want and out.strategy == name and out.module is None, (name, engine)
    with pytest.raises(ValueError, match="needs a recyclable module"):
        lm.generate(prompts, strategy="speculative", max_new_tokens=4)
    # the differential harness: the toys held to standard's tokens (lossless), greedy and sampled, with stops
    reqs = dt.make_requests(0, 6, vocab_size=97, context_length=256, max_new_tokens=30, span=4, buckets=(8, 16))
    engines = {"static": Engine(model, graphs=False, bucket=16, prefill_bucket=8)}
    tallies = dt.run_sequence(model, engines, reqs, strategies=toys)
    assert all(t.identical == t.requests == len(reqs) for t in tallies.values()), dt.summary_rows(tallies)


@pytest.mark.parametrize("seed", range(2))
def test_lookup_is_lossless_on_the_reference_and_every_engine(seed):
    """Prompt lookup needs no module: on a RecycleModel or a bare base, eager or on the engines, greedy fp32 gives
    standard's tokens, and its drafts are accepted (the base's greedy text falls into cycles)."""
    model = _bad_drafter(seed)
    prompts = prompts_for(seed, 3)
    want = standard(model.base, prompts, max_new_tokens=40).tokens
    for m in (model, model.base):
        ref = reference_decode(m, "lookup", prompts, max_new_tokens=40)
        assert ref.tokens == want and ref.stats.module_calls == 0 and ref.stats.tau > 1.5
        for kind, engine in cpu_engines(m).items():
            got = engine.decode("lookup", prompts, max_new_tokens=40, check_every=1 + seed * 4)
            assert got.tokens == want and got.stats.module_calls == 0 and got.stats.tau > 1.5, kind
    # sampled: the engine draws like the reference loop (the same drafts, point masses, the same generator)
    for prompt in prompts:
        sampling = SamplingParams(temperature=0.1, seed=seed)
        ref = reference_decode(model.base, "lookup", [prompt], max_new_tokens=30, sampling=sampling, stop_ids=(3,))
        got = Engine(model.base, bucket=16, prefill_bucket=8).decode("lookup", [prompt], max_new_tokens=30,
                                                                     sampling=sampling, stop_ids=(3,))
        assert got.tokens == ref.tokens and got.finished == ref.finished


def test_the_verifier_takes_any_drafter():
    """A drafter of the test's own (the answer itself, then garbage) through `chain`: the tokens are standard's
    either way; the right answer is accepted whole, the garbage never."""
    model = predictable(2, 0.05)
    prompt = prompts_for(2, 1)
    want = standard(model.base, prompt, max_new_tokens=24).tokens

    class Oracle:
        def __init__(self, r, wrong: bool = False):
            self.r, self.wrong = r, wrong

        def draft(self, k: int):
            done = len(self.r.out.tokens[0])  # emitted so far, the pending token included
            ahead = (want[0] + [0] * k)[done:done + k]
            tokens = torch.tensor([[(t + 1) % 97 if self.wrong else t for t in ahead]])
            return tokens, point_mass(tokens, 97, self.r.sampling)

    for wrong in (False, True):
        res = chain(model.base, prompt, lambda r, wrong=wrong: Oracle(r, wrong), max_new_tokens=24, draft_len=3)
        assert res.tokens == want
        hist = res.stats.accept_hist
        assert sum(hist[1:]) == 0 if wrong else hist[3] >= sum(hist) - 1, hist  # the last may run past the answer
    assert chain(model, prompt, ModuleDrafter, max_new_tokens=24).tokens == want
    assert chain(model.base, prompt, LookupDrafter, max_new_tokens=24).tokens == want


@CUDA
@pytest.mark.cuda
def test_cuda_engines_run_lookup_and_a_registered_strategy(toys):
    model = _bad_drafter(1).cuda()
    prompts = prompts_for(3, 3)
    want = standard(model.base, prompts, max_new_tokens=40).tokens
    for kind in ("graphs", "compiled"):
        engine = dt.make_engine(model, kind, kv_bucket=128)
        for name in ("lookup", *toys):
            first = engine.decode(name, prompts, max_new_tokens=40)
            second = engine.decode(name, prompts, max_new_tokens=40)  # replays the captured graphs
            assert first.tokens == second.tokens == want, (kind, name)
    whole = Engine(model, graphs=True, bucket=128, compile=True, compile_steps=True)
    assert whole.decode("lookup", prompts, max_new_tokens=40).tokens == want
    sampling = SamplingParams(temperature=0.1, seed=1)
    assert (Engine(model, graphs=True, bucket=16).decode("lookup", prompts[:1], max_new_tokens=30,
                                                         sampling=sampling).tokens ==
            reference_decode(model, "lookup", prompts[:1], max_new_tokens=30, sampling=sampling).tokens)
