"""The engines against the eager reference on sequences of requests like real traffic (evals/differential.py): mixed
prompt lengths from 1 token to near the context, long -> short -> long, bucket boundaries crossed, batches of mixed
lengths, stops early and late, every strategy, greedy and seeded sampling, in one process. And the regression that
such a sequence found: a second Decoder on a model replaced the fused weights the first one's CUDA graphs read."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_speculative import predictable

from recyclegpt.config import RecycleConfig
from recyclegpt.decoding.engine import Decoder, Engine
from recyclegpt.decoding.sampling import SamplingParams
from recyclegpt.decoding.speculative import TreeShape
from recyclegpt.decoding.strategies import names as strategy_names
from recyclegpt.evals import differential as dt
from recyclegpt.models import RecycleModel, fuse_projections

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
OPTS = dt.Options(draft_len=3, tree=TreeShape(4, 3, 10))


def fused_weights(model: RecycleModel) -> list[tuple[int, int]]:
    return [(id(m.wqkv), m.wqkv.data_ptr()) if hasattr(m, "wqkv") else (id(m.w13), m.w13.data_ptr())
            for m in model.modules() if getattr(m, "wqkv", None) is not None or getattr(m, "w13", None) is not None]


def test_a_second_decoder_keeps_the_fused_weights_the_first_reads():
    """A Decoder fuses the model's projections; captured graphs read the fused matrices at their addresses. A second
    Decoder (another cache length, another engine) must leave them in place: replacing them freed the memory the
    first Decoder's graphs read, and every later call of it decoded garbage."""
    model = predictable(0, 0.05)
    Decoder(model, 1, 64, fuse=True)
    before = fused_weights(model)
    assert before
    Decoder(model, 1, 256, fuse=True)
    Engine(model, fuse=True).decode("standard", [[1, 2, 3]], max_new_tokens=2)
    assert fused_weights(model) == before
    attn = model.base.layers[0].attn
    assert attn.wq.weight.data_ptr() == attn.wqkv.data_ptr()  # still views into the one matrix


def test_fusing_again_after_a_dtype_change_makes_new_matrices():
    model = fuse_projections(predictable(0, 0.05))
    old = model.base.layers[0].attn.wqkv
    model.to(torch.float64)  # the views and the fused copy part: fusing again must rebuild
    fuse_projections(model)
    attn = model.base.layers[0].attn
    assert attn.wqkv.dtype == torch.float64 and attn.wqkv.data_ptr() != old.data_ptr()
    assert attn.wk.weight.data_ptr() == attn.wqkv.data_ptr() + attn.wq.weight.numel() * 8


def test_request_sequences_cover_what_traffic_does():
    reqs = dt.make_requests(0, 40, vocab_size=97, context_length=256, max_new_tokens=40, span=11, max_batch=4,
                            buckets=(8, 16))
    firsts = [len(r.prompts[0]) for r in reqs[:3]]
    assert firsts[0] > 150 and firsts[1] <= 16 and firsts[2] > 100  # long -> short -> long
    lengths = {len(p) for r in reqs for p in r.prompts}
    assert min(lengths) <= 3 and max(lengths) == 256 - 40 - 11
    assert all(len(p) + r.max_new_tokens + 11 <= 256 for r in reqs for p in r.prompts)
    assert {len(r.prompts) for r in reqs} >= {1, 2, 3, 4}
    assert any(len(set(map(len, r.prompts))) > 1 for r in reqs)  # mixed lengths in one batch
    assert {r.stop for r in reqs} == {"", "early", "late"}
    assert any(not r.sampling.greedy for r in reqs) and any(r.sampling.greedy for r in reqs)
    assert any(r.max_new_tokens == 1 for r in reqs) or any(r.max_new_tokens <= 3 for r in reqs)


def test_truncate_is_what_stops_emit():
    assert dt.truncate([[5, 6, 7, 6], [1, 2]], 3, {6}) == ([[5], [1, 2]], [True, False])
    assert dt.truncate([[5, 7, 8, 6]], 3, {6}) == ([[5, 7, 8]], [False])  # the stop lies past the budget


def with_draft_vocab(model: RecycleModel) -> RecycleModel:
    """The same model with a draft vocabulary of its first 64 tokens (the module's state dict is kept)."""
    cfg = dataclasses.replace(model.module.cfg, draft_vocab=64)
    out = RecycleModel.build(model.base.cfg, cfg).eval()
    out.base.load_state_dict(model.base.state_dict())
    out.module.load_state_dict(model.module.state_dict(), strict=False)
    return out


def sequence(model: RecycleModel, n: int, seed: int, context: int = 256) -> list[dt.Request]:
    return dt.make_requests(seed, n, vocab_size=model.base.cfg.vocab_size, context_length=context,
                            max_new_tokens=40, span=OPTS.span(strategy_names()), max_batch=4, buckets=(8, 16))


def assert_all_identical(tallies):
    rows = dt.summary_rows(tallies)
    bad = [r for r in rows if r["identical"] != r["requests"]]
    assert not bad, dt.format_table(rows) + "\n" + "\n".join(
        f"{k}: {t.mismatches[:3]}" for k, t in tallies.items() if t.mismatches)


@pytest.mark.parametrize("vocab", ["full", "draft"])
def test_the_static_engine_equals_the_reference_on_a_request_sequence(vocab):
    """Every strategy, greedy and sampled, stops, batches of mixed lengths, prompt lengths from 1 to near the
    context, buckets crossed (prefill bucket 8, KV bucket 16); one Engine serves the whole sequence."""
    model = predictable(3, 0.05)
    if vocab == "draft":
        model = with_draft_vocab(model)
        model.recycle_vocab = "draft"
    reqs = sequence(model, 14, seed=1 if vocab == "full" else 2)
    engines = {"static": Engine(model, graphs=False, bucket=16, prefill_bucket=8)}
    tallies = dt.run_sequence(model, engines, reqs, opts=OPTS)
    assert_all_identical(tallies)
    tau = [t for t in tallies.values() if t.tokens]
    assert sum(t.tokens for t in tau) > 1000


@pytest.mark.parametrize("chunk", [None, 32])
def test_continuous_batching_under_concurrent_arrivals_equals_each_request_alone(chunk):
    """The greedy prompts of a request sequence (1 token to near the context, stops early and late) arrive 0-3
    checks apart into a continuous batch of 3 rows, per strategy: each gets its reference tokens alone, also with
    the longer prompts that arrive while rows decode prefilled in chunks."""
    model = predictable(4, 0.05)
    reqs = sequence(model, 10, seed=3)
    engines = {"static": Engine(model, graphs=False, bucket=16, prefill_bucket=8)}
    tallies = dt.run_arrivals(model, engines, reqs, rows=3, opts=OPTS, seed=1, prefill_chunk=chunk)
    assert_all_identical(tallies)
    assert all(t.chunked > 0 if chunk else t.chunked == 0 for t in tallies.values())
    assert all(t.requests >= 12 for t in tallies.values())
    assert any(r.stop for r in reqs if r.sampling.greedy)


def test_a_wrong_token_is_reported_with_where_and_how_near_a_tie():
    """The harness catches an engine that goes wrong: an engine that decodes with the wrong head gives mismatches,
    each with its first differing position and how far its token falls below the reference's top logit there."""
    model = predictable(4, 0.05)
    reqs = [dt.Request(((1, 2, 3, 4),), 12)]

    class Drifting(Engine):
        def decode(self, strategy, prompts, **kw):
            w = self.model.base.lm_head.weight
            kept = w.detach().clone()
            with torch.no_grad():
                w.copy_(10 * torch.randn_like(w))  # wrong weights for this call only
            try:
                return super().decode(strategy, prompts, **kw)
            finally:
                with torch.no_grad():
                    w.copy_(kept)

    tallies = dt.run_sequence(model, {"static": Drifting(model, graphs=False, bucket=16)}, reqs,
                              strategies=("standard",), opts=OPTS)
    t = tallies[("static", "standard")]
    assert t.identical == 0 and t.mismatches
    m = t.mismatches[0]
    assert 0 <= m.index < 12 and m.margin is not None and m.margin > 0 and not m.near_tie


def test_near_tie_mode_compares_lossless_strategies_with_the_engines_own_standard():
    model = predictable(5, 0.05)
    reqs = sequence(model, 6, seed=3)
    engines = {"static": Engine(model, graphs=False, bucket=16, prefill_bucket=8)}
    tallies = dt.run_sequence(model, engines, reqs, opts=OPTS, check=dt.Check("near-ties", prefix=8))
    assert_all_identical(tallies)
    with pytest.raises(ValueError, match="check mode"):
        dt.Check("close")


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("kinds", [("static", "graphs"), ("compiled",)])
def test_cuda_engines_equal_the_reference_on_a_request_sequence(kinds):
    """The regression in its own shape: on CUDA, graphs captured by one Decoder stay right after a long prompt
    makes the engine build another (fp32, every strategy, the engines interleaved in one process)."""
    model = predictable(6, 0.05).cuda()
    compiled = "compiled" in kinds  # a compile per step kind and bucket: fewer of both
    reqs = sequence(model, 6 if compiled else 10, seed=4)
    engines = {k: dt.make_engine(model, k, kv_bucket=128 if compiled else 16, prefill_bucket=8) for k in kinds}
    strategies = ("standard", "recycle", "speculative") if compiled else strategy_names()
    assert_all_identical(dt.run_sequence(model, engines, reqs, strategies=strategies, opts=OPTS))


@CUDA
@pytest.mark.cuda
def test_cuda_graphs_of_a_first_decoder_read_the_live_weights_after_a_second_one():
    """The failure as users met it, made deterministic: short prompt (a Decoder captures its graphs), long prompt
    (the engine builds a longer Decoder), then the model's fused matrices are changed in place. The short prompt
    again must give the changed model's reference tokens: graphs that still read matrices a second Decoder replaced
    (freed memory, garbage once reused) give the old model's tokens or garbage instead."""
    model = predictable(7, 0.05).cuda()
    engine = Engine(model, graphs=True, bucket=16, prefill_bucket=8)
    short, long = [[3, 1, 4, 1, 5]], [list(range(1, 97)) * 2]
    before = engine.decode("standard", short, max_new_tokens=20).tokens
    engine.decode("recycle", long, max_new_tokens=20)
    assert len(engine._decoders) == 2
    fused = [m.wqkv if getattr(m, "wqkv", None) is not None else m.w13 for m in model.modules()
             if getattr(m, "wqkv", None) is not None or getattr(m, "w13", None) is not None]
    assert fused
    with torch.no_grad():
        for w in fused:
            w.mul_(20.0)  # the per-projection weights are views into these: the eager reference sees the change too

    def want(strategy: str) -> list[list[int]]:
        target = strategy if strategy == "recycle" else "standard"  # lossless: standard's tokens
        return dt.reference(model, target, dt.Request((tuple(short[0]),), 20), OPTS).tokens

    assert want("standard") != before  # the change shows in the tokens, so stale weights would be caught
    for strategy in ("standard", "recycle", "speculative"):
        assert engine.decode(strategy, short, max_new_tokens=20).tokens == want(strategy), strategy


def test_real_model_static_engine_equals_the_reference_long_short_long(smollm2):
    """SmolLM2 (fp32, CPU) with a random module: the static engine against the reference on long -> short -> long
    prompts, a batch of mixed lengths and a late stop, standard and recycle-verified (a few seconds a request)."""
    base, tok = smollm2
    torch.manual_seed(0)
    model = RecycleModel(base, RecycleModel.build(base.cfg, RecycleConfig(n_layer=1)).module).eval()
    text = tok.encode("The quick brown fox jumps over the lazy dog. " * 80)
    reqs = [dt.Request((tuple(text[:700]),), 6), dt.Request((tuple(text[:5]),), 8, stop="late"),
            dt.Request((tuple(text[3:650]), tuple(text[:40])), 5),
            dt.Request((tuple(text[:9]),), 6, SamplingParams(temperature=1.0, seed=7))]
    engines = {"static": Engine(model, graphs=False, prefill_bucket=64)}
    tallies = dt.run_sequence(model, engines, reqs, strategies=("standard", "recycle-verified"), opts=OPTS)
    assert_all_identical(tallies)


def test_near_tie_mode_without_standard_compares_with_the_reference():
    model = predictable(8, 0.05)
    reqs = sequence(model, 4, seed=5)
    engines = {"static": Engine(model, graphs=False, bucket=16, prefill_bucket=8)}
    tallies = dt.run_sequence(model, engines, reqs, strategies=("speculative", "tree"), opts=OPTS,
                              check=dt.Check("near-ties", prefix=8))
    assert_all_identical(tallies)


@pytest.mark.slow
def test_the_harness_script_runs_one_sequence_per_process_under_torchrun(tmp_path):
    """scripts/differential.py under torchrun (two CPU processes, gloo): each runs its own sequence (seeds 0 and 1)
    and the first reports both together, every request identical to the reference."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from recyclegpt.loading.checkpoint import save_checkpoint
    from recyclegpt.training.data import train_bpe

    (tmp_path / "t.txt").write_text("the cat sat on the mat. " * 50)
    save_checkpoint(tmp_path / "ck", predictable(5, 0.05, vocab=280), tokenizer=train_bpe([tmp_path / "t.txt"], 280))
    script = Path(__file__).resolve().parents[1] / "scripts" / "differential.py"
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           "--model", str(tmp_path / "ck"), "--device", "cpu", "--engines", "static", "--requests", "3",
           "--max-new-tokens", "6", "--max-prompt", "40", "--strategies", "standard,recycle,speculative",
           "--json-out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["processes"] == 2 and report["seeds"] == [0, 1] and report["requests"] == 6
    assert len(report["prompt_lengths"]) >= 6  # every prompt of both sequences (a request may batch several)
    for row in report["rows"]:
        assert row["requests"] == row["identical"] == 6, row
