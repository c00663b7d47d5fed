"""The draft-head kernel (norm, head and top-k in one Triton kernel) against torch: on the CPU under Triton's
interpreter, and on CUDA in bf16, in a CUDA graph and under torch.compile. Skipped without triton.

The interpreter must be chosen before triton is imported, so the CPU cases run in a subprocess: this file run as a
script with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from interpreted import OpLog, needs_interpreter_3_7, run_interpreted  # noqa: E402

from recyclegpt.kernels import draft_head as triton_draft_head  # noqa: E402
from recyclegpt.kernels.draft_head import head_top_k  # noqa: E402

# (rows, V, K, k): one row, a level of 4 tokens, more rows than a program holds; whole and ragged vocabulary and
# model-dimension blocks; k from 1 to KTOP
CASES = [(1, 384, 64, 4), (4, 1000, 96, 4), (20, 300, 64, 3), (3, 129, 40, 1)]


def reference(x, norm_weight, eps, weight, k):
    xn = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * norm_weight
    top = torch.log_softmax((xn.float() @ weight.float().T), -1).topk(k, dim=-1)
    return top.values, top.indices


def make_inputs(R, V, K, *, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, K + 5, generator=g)[:, :K]  # a strided view, as the module's output slices are
    norm_weight = 1 + 0.1 * torch.randn(K, generator=g)
    weight = torch.randn(V, K, generator=g) / K ** 0.5 * 4  # peaked logits
    return tuple(t.to(device=device, dtype=dtype) for t in (x, norm_weight, weight))


def check_interpreted_cases() -> None:
    """Run under TRITON_INTERPRET=1: every case in fp32 on the CPU, the same ids and log-probabilities to 1e-4, with
    the default launch settings and with the other block sizes that scripts/draft_head_bench.py sweeps."""
    assert triton_draft_head._INTERPRETED, "TRITON_INTERPRET=1 must be set before triton is imported"
    # equal best logits in three blocks and twice in one: the lowest ids first, as a stable top-k gives them
    x_tie, nw_tie, w_tie = make_inputs(2, 300, 64)
    w_tie[[10, 140, 141, 299]] = 0.2 * x_tie[0] / x_tie[0].norm() * 64 ** 0.5 * 4
    for block_v, block_k in ((triton_draft_head.BLOCK_V, triton_draft_head.BLOCK_K), (32, 128), (64, 64)):
        blocks = {"block_v": block_v, "block_k": block_k}
        for R, V, K, k in CASES:
            x, nw, w = make_inputs(R, V, K)
            logp, ids = head_top_k(x, nw, 1e-5, w, k, **blocks)
            want_logp, want_ids = reference(x, nw, 1e-5, w, k)
            print(f"BLOCK_V={block_v} BLOCK_K={block_k} R={R} V={V} K={K} k={k}: "
                  f"max |dlogp| {(logp - want_logp).abs().max().item():.2e}")
            assert ids.dtype == torch.int64 and torch.equal(ids, want_ids), (block_v, block_k, R, V, K, k)
            assert (logp - want_logp).abs().max().item() < 1e-4
        logp, ids = head_top_k(x_tie, nw_tie, 1e-5, w_tie, 4, **blocks)
        assert ids[0].tolist() == [10, 140, 141, 299] and torch.equal(logp[0], logp[0, :1].expand(4)), ids
    x, nw, w = make_inputs(6, 500, 64)
    logp, ids = head_top_k(x.view(2, 3, 64), nw, 1e-5, w, 2)  # leading dims kept
    assert logp.shape == ids.shape == (2, 3, 2) and torch.equal(ids.view(6, 2), reference(x, nw, 1e-5, w, 2)[1])

    # the custom op under dynamo and AOT autograd: its fake gives the shapes
    def draft(x, nw, w):
        return head_top_k(x * 1.0, nw, 1e-5, w, 4)

    got = torch.compile(draft, fullgraph=True, backend="aot_eager")(x, nw, w)
    assert all(torch.equal(a, b) for a, b in zip(got, draft(x, nw, w)))


def check_model_integration() -> None:
    """Run under TRITON_INTERPRET=1: RecycleModel.draft_top through the kernel (KernelConfig.cuda_paths_on_cpu lets
    the CPU take it here) gives the torch path's tokens and log-probabilities, with and without a draft vocabulary,
    and the tree the same output; the kernel's op runs with `KernelConfig.draft_head` only."""
    sys.path.insert(0, os.path.dirname(__file__))
    import dataclasses

    from test_speculative import predictable, prompts_for

    from recyclegpt.config import KernelConfig
    from recyclegpt.decoding.loops import standard
    from recyclegpt.decoding.speculative import TreeShape, tree
    from recyclegpt.training.train import add_draft_vocab

    # the other kernels off, and the torch path's top-k the sort-free one that CUDA runs (torch.topk on the CPU does
    # not order ties)
    torch_path = dataclasses.replace(KernelConfig.torch_only(), cuda_paths_on_cpu=True)
    calls = {}  # per (draft vocabulary?, kernel?): how many times the kernel's op ran
    for draft_vocab in (False, True):
        model = predictable(1, 0.1, vocab=512)
        if draft_vocab:
            model.module = add_draft_vocab(model.module, torch.arange(0, 512, 3))
        model.refresh_draft_head()
        out = torch.randn(2, 4, model.base.cfg.d_model, generator=torch.Generator().manual_seed(2))
        prompts = prompts_for(1, 2, 512)
        got = {}
        for kernel in (True, False):
            model.kernels = dataclasses.replace(torch_path, draft_head=kernel)
            with OpLog() as log:
                got[kernel] = (model.draft_top(out, 4),
                               tree(model, prompts, max_new_tokens=12, shape=TreeShape(3, 3, 6)))
            calls[draft_vocab, kernel] = log.names().count("recyclegpt::draft_head_top")
        (lp1, id1), t1 = got[True]
        (lp0, id0), t0 = got[False]
        assert torch.equal(id1, id0) and (lp1 - lp0).abs().max().item() < 1e-4
        assert t1.tokens == t0.tokens == standard(model.base, prompts, max_new_tokens=12).tokens
        assert t1.stats.accept_hist == t0.stats.accept_hist
    assert all(n > 0 if kernel else n == 0 for (_, kernel), n in calls.items()), calls


@needs_interpreter_3_7(triton)
def test_interpreted_matches_torch():
    run_interpreted(__file__)


@pytest.mark.skipif(triton_draft_head._INTERPRETED, reason="TRITON_INTERPRET is set in this process")
def test_cpu_tensors_need_the_interpreter_and_bad_requests_are_clear():
    x, nw, w = make_inputs(1, 384, 64)
    with pytest.raises(RuntimeError, match="interpreter"):
        head_top_k(x, nw, 1e-5, w, 4)
    with pytest.raises(ValueError, match="top-5"):
        head_top_k(x, nw, 1e-5, w, 5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_graph_and_compile():
    def check(got, x, nw, w, k):
        logp, ids = got
        want_logp, _ = reference(x, nw, 1e-5, w, k)
        # bf16 products may swap near-ties: compare the log-probabilities of what was picked, and the ranking
        picked = torch.log_softmax(((x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5))
                                    .to(x.dtype) * nw).float() @ w.float().T, -1).gather(-1, ids)
        assert (picked - want_logp).abs().max().item() < 5e-2 and (logp - picked).abs().max().item() < 5e-2
        assert all(len(set(r.tolist())) == k for r in ids.view(-1, k))

    for R, V, K, k in CASES + [(4, 16384, 576, 4), (32, 49152, 576, 4)]:
        inputs = make_inputs(R, V, K, dtype=torch.bfloat16, device="cuda")
        check(head_top_k(inputs[0], inputs[1], 1e-5, inputs[2], k), *inputs, k)
    x, nw, w = make_inputs(2, 16384, 576, dtype=torch.bfloat16, device="cuda")
    w[[10, 140, 141, 9000]] = 0.2 * x[0] / x[0].float().norm().to(x.dtype) * 576 ** 0.5 * 4  # equal best logits
    assert head_top_k(x, nw, 1e-5, w, 4)[1][0].tolist() == [10, 140, 141, 9000]  # lowest ids first

    x, nw, w = inputs = make_inputs(4, 16384, 576, dtype=torch.bfloat16, device="cuda")
    head_top_k(x, nw, 1e-5, w, 4)  # compiles the kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = head_top_k(x, nw, 1e-5, w, 4)
    for a, b in zip(inputs, make_inputs(4, 16384, 576, dtype=torch.bfloat16, device="cuda", seed=1)):
        a.copy_(b)
    graph.replay()
    check(out, *inputs, 4)

    @torch.compile(fullgraph=True)
    def draft(x, nw, w):
        return head_top_k(x * 1.0, nw, 1e-5, w, 4)

    check(draft(*inputs), *inputs, 4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tree_rounds_with_the_kernel():
    """The engine's tree rounds, graphs and compiled whole, with the kernel drafting: standard's tokens (fp32)."""
    from test_speculative import predictable, prompts_for

    from recyclegpt.decoding.engine import Engine
    from recyclegpt.decoding.loops import standard
    from recyclegpt.decoding.speculative import TreeShape

    model = predictable(1, 0.05).cuda()
    assert model.kernels.draft_head  # on by default
    prompts = prompts_for(3, 3)
    want = standard(model.base, prompts, max_new_tokens=40).tokens
    for engine in (Engine(model, graphs=True, bucket=16),
                   Engine(model, graphs=True, bucket=128, compile=True, compile_steps=True)):
        got = engine.decode("tree", prompts, max_new_tokens=40, tree=TreeShape(4, 3, 10))
        assert got.tokens == want and sum(got.stats.accept_hist[1:]) > 0


if __name__ == "__main__":
    check_interpreted_cases()
    check_model_integration()
