"""The head-argmax kernel (norm, LM head and argmax in one Triton kernel) against torch: on the CPU under Triton's
interpreter, and on CUDA in bf16, in a CUDA graph, under torch.compile and in the engine. Skipped without triton.

The interpreter must be chosen before triton is imported, so the CPU cases run in a subprocess: this file run as a
script with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from interpreted import needs_interpreter_3_7, run_interpreted  # noqa: E402
from recyclegpt import triton_head  # noqa: E402
from recyclegpt.triton_head import head_argmax  # noqa: E402

# (rows, V, K): one row; the most rows; ragged vocabulary and K blocks; more blocks than one program's width
CASES = [(1, 384, 64), (4, 1000, 96), (3, 129, 40), (2, 5000, 64)]


def normed(x, norm_weight, eps):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * norm_weight


def reference(x, norm_weight, eps, weight, ids=None):
    """The operators' token: argmax over the rounded logits, the first among equals."""
    logits = (normed(x, norm_weight, eps).float() @ weight.float().T).to(x.dtype)
    best = logits.argmax(-1)
    return best if ids is None else ids[best]


def make_inputs(R, V, K, *, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, K + 5, generator=g)[:, :K]  # a strided view, as the module's output slices are
    norm_weight = 1 + 0.1 * torch.randn(K, generator=g)
    weight = torch.randn(V, K, generator=g) / K ** 0.5 * 4
    return tuple(t.to(device=device, dtype=dtype) for t in (x, norm_weight, weight))


def check_interpreted_cases() -> None:
    """Run under TRITON_INTERPRET=1: every case in fp32, in both block orders and two block shapes, over the full
    head, a copied sub-vocabulary and a gathered one; the ticket back at 0 after each call; equal maxima in several
    blocks and twice in one give the lowest index; leading dims; the op under dynamo."""
    assert triton_head._INTERPRETED, "TRITON_INTERPRET=1 must be set before triton is imported"
    default = triton_head.BLOCK_V, triton_head.BLOCK_K, triton_head.REVERSE
    tickets = torch.zeros(1, dtype=torch.int32)
    for block_v, block_k in ((default[0], default[1]), (32, 32)):
        for reverse in (True, False):
            triton_head.BLOCK_V, triton_head.BLOCK_K, triton_head.REVERSE = block_v, block_k, reverse
            for R, V, K in CASES:
                x, nw, w = make_inputs(R, V, K)
                got = head_argmax(x, nw, 1e-5, w, tickets)
                assert got.dtype == torch.int64 and torch.equal(got, reference(x, nw, 1e-5, w)), (block_v, R, V)
                assert tickets.item() == 0
                ids = torch.arange(1, V, 3)  # a sorted sub-vocabulary
                want = reference(x, nw, 1e-5, w[ids], ids)
                assert torch.equal(head_argmax(x, nw, 1e-5, w[ids].contiguous(), tickets, ids=ids), want)
                assert torch.equal(head_argmax(x, nw, 1e-5, w, tickets, ids=ids, gather=True), want)
                assert tickets.item() == 0
            # equal best logits in three blocks and twice in one: the lowest index
            x, nw, w = make_inputs(2, 300, 64)
            w[[10, 140, 141, 299]] = 0.2 * x[0] / x[0].norm() * 64 ** 0.5 * 4
            assert head_argmax(x, nw, 1e-5, w, tickets)[0].item() == 10
            print(f"BLOCK_V={block_v} BLOCK_K={block_k} REVERSE={reverse}: ok")
    triton_head.BLOCK_V, triton_head.BLOCK_K, triton_head.REVERSE = default
    x, nw, w = make_inputs(4, 500, 64)
    got = head_argmax(x.view(2, 2, 64), nw, 1e-5, w, tickets)  # leading dims kept
    assert got.shape == (2, 2) and torch.equal(got.view(4), reference(x, nw, 1e-5, w))

    def token(x, nw, w, t):
        return head_argmax(x * 1.0, nw, 1e-5, w, t)

    got = torch.compile(token, fullgraph=True, backend="aot_eager")(x, nw, w, tickets)
    assert torch.equal(got, token(x, nw, w, tickets)) and tickets.item() == 0


def check_model_integration() -> None:
    """Run under TRITON_INTERPRET=1: with the kernel allowed on the CPU (HEAD_ARGMAX_KERNEL "always"), recycle's
    greedy tokens from the engine equal the reference loop's and the operators' path's, over the full head and over
    the draft vocabulary (a copy and gathered rows)."""
    sys.path.insert(0, os.path.dirname(__file__))
    import recyclegpt.model as model_mod
    from recyclegpt.decoding import recycle
    from recyclegpt.engine import Engine
    from test_engine import build, random_prompts
    from test_speculative import with_draft_vocab

    calls = []
    real = triton_head.head_argmax
    triton_head.head_argmax = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        for vocab in ("full", "draft", "gathered"):
            model = build(3, n_layer=2)
            if vocab != "full":
                model = with_draft_vocab(model, list(range(0, 97, 2)))
                model.recycle_vocab = "draft"
            model_mod.DRAFT_ROWS_GATHERED = vocab == "gathered"
            prompts = random_prompts(3, 3, model.base.cfg.vocab_size)
            model_mod.HEAD_ARGMAX_KERNEL = False
            ops = recycle(model, prompts, max_new_tokens=21).tokens
            model_mod.HEAD_ARGMAX_KERNEL = "always"
            n = len(calls)
            want = recycle(model, prompts, max_new_tokens=21).tokens
            got = Engine(model, bucket=8).decode("recycle", prompts, max_new_tokens=21, check_every=3).tokens
            assert len(calls) > n, vocab  # the kernel ran
            assert got == want == ops, vocab
    finally:
        triton_head.head_argmax = real
        model_mod.HEAD_ARGMAX_KERNEL, model_mod.DRAFT_ROWS_GATHERED = False, False


@needs_interpreter_3_7(triton)
def test_interpreted_matches_torch():
    run_interpreted(__file__)


@pytest.mark.skipif(triton_head._INTERPRETED, reason="TRITON_INTERPRET is set in this process")
def test_cpu_tensors_need_the_interpreter_and_bad_requests_are_clear():
    x, nw, w = make_inputs(1, 384, 64)
    tickets = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="interpreter"):
        head_argmax(x, nw, 1e-5, w, tickets)
    if torch.cuda.is_available():
        x, nw, w, tickets = x.cuda(), nw.cuda(), w.cuda(), tickets.cuda()
        with pytest.raises(ValueError, match="1 to 4 rows"):
            head_argmax(torch.cat([x] * 5), nw, 1e-5, w, tickets)
        with pytest.raises(ValueError, match="needed to gather"):
            head_argmax(x, nw, 1e-5, w, tickets, gather=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_graph_and_compile():
    tickets = torch.zeros(1, dtype=torch.int32, device="cuda")

    def check(got, x, nw, w, ids=None):
        # bf16 sums in another order may swap near-ties: the picked logit is the best to a bf16 step
        logits = normed(x, nw, 1e-5).float() @ w.float().T
        at = got if ids is None else torch.searchsorted(ids, got)
        picked = logits.gather(-1, at.view(-1, 1)).squeeze(-1)
        assert ((logits.amax(-1) - picked) <= 2e-2 * logits.amax(-1).abs() + 1e-2).all()
        assert tickets.item() == 0

    for reverse in (True, False):
        triton_head.REVERSE = reverse
        try:
            for R, V, K in CASES + [(1, 49152, 576), (2, 49152, 576), (4, 16384, 576)]:
                x, nw, w = make_inputs(R, V, K, dtype=torch.bfloat16, device="cuda")
                check(head_argmax(x, nw, 1e-5, w, tickets), x, nw, w)
                ids = torch.arange(0, V, 3, device="cuda")
                check(head_argmax(x, nw, 1e-5, w, tickets, ids=ids, gather=True), x, nw, w[ids], ids)
            x, nw, w = make_inputs(2, 16384, 576, dtype=torch.bfloat16, device="cuda")
            w[[10, 140, 141, 9000]] = 0.2 * x[0] / x[0].float().norm().to(x.dtype) * 576 ** 0.5 * 4
            assert head_argmax(x, nw, 1e-5, w, tickets)[0].item() == 10  # the lowest of equal maxima
        finally:
            triton_head.REVERSE = True

    x, nw, w = inputs = make_inputs(2, 49152, 576, dtype=torch.bfloat16, device="cuda")
    head_argmax(x, nw, 1e-5, w, tickets)  # compiles the kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = head_argmax(x, nw, 1e-5, w, tickets)
    for a, b in zip(inputs, make_inputs(2, 49152, 576, dtype=torch.bfloat16, device="cuda", seed=1)):
        a.copy_(b)
    for _ in range(3):  # the ticket comes back to 0 on every replay
        graph.replay()
        check(out, *inputs)

    @torch.compile(fullgraph=True)
    def token(x, nw, w, t):
        return head_argmax(x * 1.0, nw, 1e-5, w, t)

    check(token(*inputs, tickets), *inputs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("vocab", ["full", "draft", "gathered"])
def test_cuda_recycle_with_the_kernel_equals_the_reference_loop(monkeypatch, vocab):
    """The engine's greedy recycle, graphs and compiled whole, with the kernel taking the module's tokens: the
    reference loop's tokens (fp32, and bf16 against the eager engine)."""
    import recyclegpt.model as model_mod
    from recyclegpt.decoding import recycle
    from recyclegpt.engine import Engine
    from test_engine import build, random_prompts
    from test_speculative import with_draft_vocab

    monkeypatch.setattr(model_mod, "HEAD_ARGMAX_KERNEL", True)
    monkeypatch.setattr(model_mod, "DRAFT_ROWS_GATHERED", vocab == "gathered")
    model = build(3, n_layer=2)
    if vocab != "full":
        model = with_draft_vocab(model, list(range(0, 97, 2)))
        model.recycle_vocab = "draft"
    model = model.cuda()
    prompts = random_prompts(3, 3, model.base.cfg.vocab_size)
    want = recycle(model, prompts, max_new_tokens=40).tokens
    for engine in (Engine(model, graphs=True, bucket=16),
                   Engine(model, graphs=True, bucket=128, compile=True, compile_steps=True)):
        for _ in range(2):  # capture, then replay
            assert engine.decode("recycle", prompts, max_new_tokens=40).tokens == want
    model.to(torch.bfloat16)
    bf = Engine(model, graphs=True, bucket=16).decode("recycle", prompts, max_new_tokens=40).tokens
    static = Engine(model, graphs=False, bucket=16, fuse=True, prefill_bucket=64)  # the same padded prompts
    assert bf == static.decode("recycle", prompts, max_new_tokens=40).tokens


if __name__ == "__main__":
    check_interpreted_cases()
    check_model_integration()
