"""A module that reads several base layers (RecycleConfig.taps, EAGLE-3's fused features): the config, the fusion,
growing a trained module, and every decoding path, cached and uncached, reading the same state."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_speculative import predictable, prompts_for
from test_train import (
    base_and_first_module,
    first_and_last_val,
    small_cfg,
    write_corpus,
)

from recyclegpt.cli.main import main
from recyclegpt.config import PRESETS, ConfigError, RecycleConfig
from recyclegpt.decoding.engine import Engine
from recyclegpt.decoding.loops import recycle, standard
from recyclegpt.decoding.speculative import (
    TreeShape,
    recycle_verified,
    speculative,
    tree,
)
from recyclegpt.evals.quality import token_logprobs
from recyclegpt.loading.checkpoint import load_module
from recyclegpt.models import RecyclableModule, RecycleModel
from recyclegpt.training.data import train_bpe
from recyclegpt.training.train import add_taps, retrofit

CFG = dataclasses.replace(PRESETS["tiny"], n_layer=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = write_corpus(tmp_path_factory.mktemp("corpus"))
    return path, train_bpe([path], 300)


def tapped(seed: int, taps=(0, 2), scale: float = 0.5) -> RecycleModel:
    torch.manual_seed(seed)
    model = RecycleModel.build(CFG, RecycleConfig(n_layer=1, taps=taps)).eval()
    with torch.no_grad():
        model.module.tap_fc.weight.normal_(0.0, scale)  # the taps count (they start at zero)
    return model


def test_config_checks_and_round_trip():
    assert RecycleConfig(taps=[2, 5]).taps == (2, 5)  # JSON gives lists
    for bad in [(-1,), (3, 1), (2, 2), (1.5,), (True,)]:
        with pytest.raises(ConfigError, match="taps"):
            RecycleConfig(taps=bad)
    cfg = RecycleConfig(n_layer=2, taps=(0, 3))
    assert RecycleConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert RecycleConfig.from_dict({"n_layer": 2}).taps == ()  # checkpoints written before taps existed
    with pytest.raises(ValueError, match="past the base's 4"):
        RecyclableModule(CFG, RecycleConfig(taps=(4,)))


def test_a_module_with_taps_starts_as_the_one_without():
    torch.manual_seed(0)
    plain = RecycleModel.build(CFG, RecycleConfig(n_layer=2)).eval()
    grown = RecycleModel(plain.base, add_taps(plain.module, (0, 1))).eval()
    assert grown.taps == (0, 1) and not grown.module.tap_fc.weight.any()
    prompts = prompts_for(1, 3)
    for fn in (recycle, recycle_verified):
        assert fn(grown, prompts, max_new_tokens=12).tokens == fn(plain, prompts, max_new_tokens=12).tokens
    ids = torch.randint(0, CFG.vocab_size, (2, 9))
    full = plain.base(ids, taps=(0, 1))
    torch.testing.assert_close(grown.state(full), full.hidden)
    with pytest.raises(ValueError, match="taps=model.taps"):
        grown.state(plain.base(ids))  # the base was not asked for the taps


def test_cached_steps_read_the_same_state_as_a_whole_sequence():
    """The base with a cache, token by token, gives the same taps (so the same module input) as one causal pass."""
    model = tapped(2)
    ids = torch.randint(0, CFG.vocab_size, (1, 11))
    whole = model.state(model.base(ids, taps=model.taps))
    cache = model.base.new_cache(1, 16)
    steps = [model.state(model.base(ids[:, t:t + 1], input_pos=torch.tensor([t]), cache=cache, kv_end=t + 1,
                                    taps=model.taps)) for t in range(11)]
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-5, atol=1e-5)
    tapless = RecycleModel(model.base, RecyclableModule(CFG, RecycleConfig(n_layer=1)))
    assert not torch.allclose(whole, tapless.state(model.base(ids)))  # the taps do change the state


def test_teacher_forced_module_scores_equal_the_module_in_decoding():
    """Scoring 'module' (uncached, evals/quality.py) predicts from the same taps as cached decoding: the token recycle
    decoding drafts after the prompt is the teacher-forced module's greedy choice there, and only it."""
    model = tapped(3)
    for prompt in prompts_for(4, 4):
        x_L, x_rec = recycle(model, [prompt], max_new_tokens=2).tokens[0]
        other = (x_rec + 1) % CFG.vocab_size
        right, wrong = token_logprobs(model, [prompt + [x_L, x_rec], prompt + [x_L, other]],
                                      [len(prompt)] * 2, scoring="module")
        assert bool(right.greedy[1]) and not bool(wrong.greedy[1])


STRATEGIES = {
    "recycle-verified": (recycle_verified, {}),
    "speculative": (speculative, dict(draft_len=3)),
    "tree": (tree, dict(shape=TreeShape(4, 3, 10))),
}


def predictable_tapped(seed: int, noise: float) -> RecycleModel:
    base = predictable(seed, noise)
    model = RecycleModel(base.base, add_taps(base.module, (0,))).eval()
    with torch.no_grad():
        model.module.tap_fc.weight.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("name", STRATEGIES)
def test_lossless_strategies_with_taps_equal_standard(name):
    fn, kw = STRATEGIES[name]
    accepted = 0
    for seed in range(3):
        model = predictable_tapped(seed, 0.05)
        prompts = prompts_for(seed, 3)
        ref = standard(model.base, prompts, max_new_tokens=24).tokens
        res = fn(model, prompts, max_new_tokens=24, **kw)
        assert res.tokens == ref
        accepted += sum(res.stats.accept_hist[1:])
    assert accepted > 0


@pytest.mark.parametrize("strategy,opts", [("recycle", {}), ("recycle-verified", {}),
                                           ("speculative", {"draft_len": 3}), ("tree", {"tree": TreeShape(4, 3, 10)})])
def test_the_engine_with_taps_equals_the_reference_loops(strategy, opts):
    model = predictable_tapped(1, 0.05) if strategy != "recycle" else tapped(1)
    prompts = prompts_for(2, 3)
    ref = {"recycle": recycle, "recycle-verified": recycle_verified,
           "speculative": lambda m, p, **kw: speculative(m, p, draft_len=3, **kw),
           "tree": lambda m, p, **kw: tree(m, p, shape=TreeShape(4, 3, 10), **kw)}[strategy]
    got = Engine(model, bucket=16).decode(strategy, prompts, max_new_tokens=30, check_every=3, **opts)
    assert got.tokens == ref(model, prompts, max_new_tokens=30).tokens


def test_retrofit_grows_taps_on_an_initial_module(corpus, tmp_path):
    path, tok, base, before = base_and_first_module(corpus, tmp_path)
    model, metrics = retrofit(cfg=small_cfg(steps=20, lr=1e-2, init_module=str(tmp_path / "m1")), base=base,
                              tokenizer=tok, rcfg=RecycleConfig(taps=(0,)), files=[path], out_dir=tmp_path / "m2",
                              base_ref="tiny-base")
    first, last = first_and_last_val(metrics)
    # it starts exactly where the first run ended, and the taps' weights leave zero
    assert first["val_rec"] == pytest.approx(first_and_last_val(before)[1]["val_rec"], rel=1e-5)
    assert model.module.tap_fc.weight.abs().sum() > 0
    saved = load_module(tmp_path / "m2", base)
    assert saved.cfg.taps == (0,)
    torch.testing.assert_close(saved.tap_fc.weight, model.module.tap_fc.weight)


def test_cli_rejects_bad_taps(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["retrofit", "data.jsonl", "--out", str(tmp_path / "o"), "--taps", "2,a"])
    assert "layer indices" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_cuda_graphs_with_taps_equal_standard():
    model = predictable_tapped(1, 0.05).cuda()
    prompts = prompts_for(3, 3)
    want = standard(model.base, prompts, max_new_tokens=40).tokens
    graphs = Engine(model, graphs=True, bucket=16)
    for strategy, opts in [("recycle-verified", {}), ("speculative", {"draft_len": 3}),
                           ("tree", {"tree": TreeShape(4, 3, 10)})]:
        assert graphs.decode(strategy, prompts, max_new_tokens=40, **opts).tokens == want, strategy
    assert graphs.decode("recycle", prompts, max_new_tokens=40).tokens == recycle(model, prompts,
                                                                                  max_new_tokens=40).tokens
