"""Triton decode attention against the fp32 softmax reference: on the CPU under Triton's interpreter, and on CUDA in
bf16, in a CUDA graph and under torch.compile. Skipped without triton.

The interpreter must be chosen before triton is imported, so the CPU cases run in a subprocess: this file run as a
script with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from interpreted import OpLog, needs_interpreter_3_7, run_interpreted  # noqa: E402

from recyclegpt.kernels import attention as triton_attention  # noqa: E402
from recyclegpt.kernels.attention import decode_attention  # noqa: E402

# (B, Hkv, R, D, L, mask batch, n_split): None lets the heuristic choose. R covers single steps, 2-slot calls,
# GQA-folded rows (3 heads a group) and R > 64 (row blocks); L = 1, a short tail, whole and ragged blocks
CASES = [
    (1, 1, 1, 64, 1, 1, None),
    (1, 3, 6, 64, 37, 1, None),
    (2, 3, 51, 64, 300, 2, None),  # 6 programs: the heuristic splits the slots in 3 ranges
    (2, 16, 2, 128, 256, 1, None),  # a (1, 1, R, L) mask broadcast over 2 batch rows
    (1, 16, 17, 128, 256, 1, 1),  # one range: the output is written directly
    (1, 1, 3, 128, 256, 1, 4),  # row 0 sees nothing in ranges 0 and 2: partials with l = 0 in the merge
    (1, 1, 192, 64, 37, 1, None),  # three row blocks of 64
]


def reference(q, k, v, mask, scale):
    return torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale + mask.float(), -1) @ v.float()


def make_inputs(B, Hkv, R, D, L, mask_batch, *, dtype=torch.float32, device="cpu", seed=0):
    """q a strided view of a fused projection, k and v views of a 5-D cache, an additive mask with -inf patterns."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, R, Hkv + 2, D, generator=g).transpose(1, 2)[:, :Hkv]  # (B, Hkv, R, D), strides arbitrary
    cache = torch.randn(2, 3, B, Hkv, L + 13, D, generator=g)  # (k|v, n_layer, B, Hkv, S_max, D)
    k, v = cache[0, 1, :, :, :L], cache[1, 1, :, :, :L]
    # causal over the last R slots, a third of the slots dropped at random, row 0 of batch 0 blind to the KV blocks
    # [0, 64) and [128, 192) (its first and a later block wholly -inf), and every row sees its own slot
    last = (torch.arange(R) + L - R).clamp(min=0)
    visible = (torch.arange(L) <= last[:, None]) & (torch.rand(mask_batch, 1, R, L, generator=g) > 0.3)
    visible[0, 0, 0, :64] = visible[0, 0, 0, 128:192] = False
    visible[:, :, torch.arange(R), last] = True
    mask = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v, mask))


def check_interpreted_cases() -> None:
    """Run under TRITON_INTERPRET=1: every case in fp32 on the CPU, to 1e-4 of the reference."""
    assert triton_attention._INTERPRETED, "TRITON_INTERPRET=1 must be set before triton is imported"
    for B, Hkv, R, D, L, mask_batch, n_split in CASES:
        q, k, v, mask = make_inputs(B, Hkv, R, D, L, mask_batch)
        out = decode_attention(q, k, v, mask, n_split=n_split)
        err = (out - reference(q, k, v, mask, D ** -0.5)).abs().max().item()
        print(f"B={B} Hkv={Hkv} R={R} D={D} L={L} n_split={n_split}: max abs err {err:.2e}")
        assert out.shape == (B, Hkv, R, D) and out.dtype == q.dtype and err < 1e-4, err
    q, k, v, mask = make_inputs(1, 2, 4, 32, 40, 1)
    err = (decode_attention(q, k, v, mask, 0.3) - reference(q, k, v, mask, 0.3)).abs().max().item()
    assert err < 1e-4, err  # an explicit scale
    # tokens: the output in the (B, T, H, D) layout, row g*T + t of KV head h at [t, h*groups + g]; merged or not
    for B, Hkv, R, T, n_split in ((2, 3, 6, 2, None), (1, 2, 9, 3, 1), (1, 16, 2, 2, 4)):
        inputs = make_inputs(B, Hkv, R, 64, 200, 1)
        want = reference(*inputs, 0.125).view(B, Hkv, R // T, T, 64).permute(0, 3, 1, 2, 4)
        out = decode_attention(*inputs, tokens=T, n_split=n_split)
        assert out.shape == (B, T, Hkv * R // T, 64) and out.is_contiguous()
        assert (out - want.reshape(out.shape)).abs().max().item() < 1e-4

    # the custom op under dynamo and AOT autograd (its fake gives the shape), on views of a mutated cache
    def attend(q, cache, pos, new, mask):
        cache[:, 1].index_copy_(3, pos, new)
        return decode_attention(q, cache[0, 1], cache[1, 1], mask) + 0.0

    cache = torch.stack([k, v])[:, None].repeat(1, 2, 1, 1, 1, 1)  # (k|v, n_layer, B, Hkv, L, D)
    pos, new = torch.tensor([39]), torch.randn(2, 1, 2, 1, 32)
    out = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, cache.clone(), pos, new, mask)
    assert (out - attend(q, cache, pos, new, mask)).abs().max().item() < 1e-6


# cached_attention: (B, H, Hkv, T, D, S, L, first new slot, n_split). A SmolLM2 step and recycle pair over a 512-slot
# bucket (8 ranges merged by ticket, unrolled), a 5-token call there (15 rows: past MERGE_TILE_MAX, the merge loops),
# batch 2, no GQA, one range (no merge), MHA with 128 rows (two row blocks, only the first writes), and new slots that
# are not the last ones (a draft's slots ahead of stale ones)
CACHED_CASES = [
    (1, 9, 3, 1, 64, 600, 512, 37, None),
    (1, 9, 3, 2, 64, 600, 512, 480, None),
    (1, 9, 3, 5, 64, 600, 512, 300, None),
    (2, 9, 3, 2, 64, 300, 256, 230, None),
    (1, 4, 4, 3, 32, 100, 70, 66, None),
    (1, 9, 3, 2, 64, 300, 256, 0, 1),
    (1, 128, 1, 1, 16, 200, 200, 150, 3),
    (2, 2, 1, 4, 16, 200, 192, 20, None),
]


def cached_inputs(B, H, Hkv, T, D, S, L, p0, *, dtype=torch.float32, device="cpu", seed=0):
    """qkv of T new tokens, a 3-layer cache of noise, their slots p0.., a causal folded mask with holes."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g)
    k_cache, v_cache = torch.randn(2, 3, B, Hkv, S, D, generator=g)
    pos = torch.arange(p0, p0 + T)
    visible = (torch.arange(L)[None, :] <= pos[:, None]) & (torch.rand(B, 1, 1, T, L, generator=g) > 0.2)
    visible[..., torch.arange(T), pos] = True  # every token sees its own slot
    visible = visible.expand(B, 1, H // Hkv, T, L).reshape(B, 1, H // Hkv * T, L)
    mask = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    return tuple(x.to(device=device, dtype=dtype) for x in (qkv, k_cache, v_cache)) + (pos.to(device),
                                                                                      mask.to(device, dtype))


def cached_reference(qkv, k_cache, v_cache, pos, mask, layer, H):
    """index_copy_ into copies of the cache, then the softmax reference: (out (B, T, H D), k_cache, v_cache)."""
    B, T, _ = qkv.shape
    _, _, Hkv, S, D = k_cache.shape
    groups, L = H // Hkv, mask.shape[-1]
    x = qkv.view(B, T, H + 2 * Hkv, D)
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    k_cache[layer].index_copy_(2, pos, x[:, :, H:H + Hkv].transpose(1, 2))
    v_cache[layer].index_copy_(2, pos, x[:, :, H + Hkv:].transpose(1, 2))
    q = x[:, :, :H].transpose(1, 2).reshape(B, Hkv, groups * T, D)  # row g*T + t: head h*groups + g, token t
    out = reference(q, k_cache[layer, :, :, :L], v_cache[layer, :, :, :L], mask, D ** -0.5)
    return out.view(B, Hkv, groups, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D), k_cache, v_cache


def check_cached_cases() -> None:
    """Run under TRITON_INTERPRET=1: cached_attention's output to 1e-4 of the reference, its cache writes exact and
    nothing else in the cache touched, the tickets back at zero; bad shapes are named."""
    for B, H, Hkv, T, D, S, L, p0, n_split in CACHED_CASES:
        qkv, k_cache, v_cache, pos, mask = cached_inputs(B, H, Hkv, T, D, S, L, p0)
        want, want_k, want_v = cached_reference(qkv, k_cache, v_cache, pos, mask, 1, H)
        tickets = torch.zeros(B * Hkv * 4, dtype=torch.int32)
        out = triton_attention.cached_attention(qkv, k_cache, v_cache, tickets, pos, mask, 1, H, n_split=n_split)
        err = (out - want).abs().max().item()
        print(f"cached B={B} H={H} Hkv={Hkv} T={T} D={D} L={L} n_split={n_split}: max abs err {err:.2e}")
        assert out.shape == (B, T, H * D) and err < 1e-4, err
        assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v) and not tickets.any()
    for bad, name in (({"layer": 3}, "layer 3"), ({"H": 8}, "8 query heads"), ({"pos": torch.arange(3)}, "input_pos")):
        qkv, k_cache, v_cache, pos, mask = cached_inputs(1, 9, 3, 2, 64, 100, 64, 10)
        args = {"layer": 1, "H": 9, "pos": pos, **bad}
        with pytest.raises(ValueError, match=name):
            triton_attention.cached_attention(qkv, k_cache, v_cache, torch.zeros(12, dtype=torch.int32),
                                              args["pos"], mask, args["layer"], args["H"])


def check_row_invariance(device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """A token's cached_attention output has the same bits alone (a standard step: 3 query rows a KV head) and as
    the first token of a verifying call (6 or 15 rows; the merge unrolled at 3 and 6, a loop at 15: past
    MERGE_TILE_MAX): the engine's bf16 chains equal `standard` only if this holds. Its later tokens' new keys sit in
    slots the first token cannot see."""
    B, H, Hkv, D, S, L, p0 = 1, 9, 3, 64, 600, 512, 300
    firsts = []
    for T in (1, 2, 5):
        qkv, k_cache, v_cache, pos, mask = cached_inputs(B, H, Hkv, 5, D, S, L, p0, dtype=dtype, device=device)
        mask = mask.view(B, 1, H // Hkv, 5, L)[:, :, :, :T].reshape(B, 1, H // Hkv * T, L)
        tickets = torch.zeros(B * Hkv * 4, dtype=torch.int32, device=device)
        out = triton_attention.cached_attention(qkv[:, :T].contiguous(), k_cache, v_cache, tickets, pos[:T], mask,
                                                1, H)
        firsts.append(out[:, 0])
    assert all(torch.equal(firsts[0], f) for f in firsts[1:]), (
        f"the first token's output differs between calls of 1, 2 and 5 tokens, by up to "
        f"{max((f.float() - firsts[0].float()).abs().max().item() for f in firsts)}")


@needs_interpreter_3_7(triton)
def test_interpreted_matches_reference():
    run_interpreted(__file__)


@pytest.mark.skipif(triton_attention._INTERPRETED, reason="TRITON_INTERPRET is set in this process")
def test_cpu_tensors_need_the_interpreter():
    q, k, v, mask = make_inputs(1, 1, 1, 64, 8, 1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        decode_attention(q, k, v, mask)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_graph_and_compile():
    def check(out, q, k, v, mask):
        ref = reference(q, k, v, mask, q.shape[-1] ** -0.5)
        assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max().item() < 2e-2

    for B, Hkv, R, D, L, mask_batch, n_split in CASES + [(1, 16, 1, 128, 1024, 1, None), (1, 3, 51, 64, 2048, 1, None)]:
        inputs = make_inputs(B, Hkv, R, D, L, mask_batch, dtype=torch.bfloat16, device="cuda")
        check(decode_attention(*inputs, n_split=n_split), *inputs)

    # a CUDA graph replays on new contents of the same buffers
    q, k, v, mask = inputs = make_inputs(1, 3, 6, 64, 512, 1, dtype=torch.bfloat16, device="cuda")
    decode_attention(*inputs)  # compiles the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(*inputs)
    for x, y in zip(inputs, make_inputs(1, 3, 6, 64, 512, 1, dtype=torch.bfloat16, device="cuda", seed=1)):
        x.copy_(y)
    graph.replay()
    check(out, *inputs)

    # an opaque op in a compiled graph: no break, same numbers
    @torch.compile(fullgraph=True)
    def attend(q, k, v, mask):
        return decode_attention(q * 1.0, k, v, mask) + 0.0

    check(attend(*inputs), *inputs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cached_attention_bf16_graph_and_compile():
    """cached_attention on CUDA in bf16: the reference's output, exact cache writes and zeroed tickets, case by case
    and over 200 replays of a CUDA graph (the ticket merge is where a race between a (row, head)'s ranges would
    show); under torch.compile the cache stays the buffer that was passed (updated in place, not copied)."""
    def check(out, want):
        assert out.dtype == torch.bfloat16 and (out.float() - want).abs().max().item() < 2e-2

    cases = CACHED_CASES + [(8, 9, 3, 2, 64, 2048, 2048, 1500, None), (32, 9, 3, 1, 64, 600, 512, 400, None)]
    for B, H, Hkv, T, D, S, L, p0, n_split in cases:
        qkv, k_cache, v_cache, pos, mask = cached_inputs(B, H, Hkv, T, D, S, L, p0, dtype=torch.bfloat16,
                                                         device="cuda")
        want, want_k, want_v = cached_reference(qkv, k_cache, v_cache, pos, mask, 1, H)
        tickets = torch.zeros(B * Hkv * 4, dtype=torch.int32, device="cuda")
        check(triton_attention.cached_attention(qkv, k_cache, v_cache, tickets, pos, mask, 1, H, n_split=n_split),
              want)
        assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v) and not tickets.any()

    # 200 replays, each on new inputs
    qkv, k_cache, v_cache, pos, mask = inputs = cached_inputs(1, 9, 3, 2, 64, 600, 512, 300, dtype=torch.bfloat16,
                                                              device="cuda")
    tickets = torch.zeros(12, dtype=torch.int32, device="cuda")
    triton_attention.cached_attention(qkv, k_cache, v_cache, tickets, pos, mask, 1, 9)  # compiled before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_attention.cached_attention(qkv, k_cache, v_cache, tickets, pos, mask, 1, 9)
    for seed in range(200):
        for x, y in zip(inputs, cached_inputs(1, 9, 3, 2, 64, 600, 512, 300 - seed, dtype=torch.bfloat16,
                                              device="cuda", seed=seed)):
            x.copy_(y)
        want, want_k, want_v = cached_reference(*inputs, 1, 9)
        graph.replay()
        check(out, want)
        assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v) and not tickets.any()

    @torch.compile(fullgraph=True)
    def two_layers(qkv, k_cache, v_cache, tickets, pos, mask):
        y = triton_attention.cached_attention(qkv * 1.0, k_cache, v_cache, tickets, pos, mask, 0, 9)
        return triton_attention.cached_attention(qkv + y.sum(), k_cache, v_cache, tickets, pos, mask, 1, 9)

    k_before = k_cache.clone()
    got = two_layers(qkv, k_cache, v_cache, tickets, pos, mask)
    c0, _, _ = cached_reference(qkv, k_before, v_cache, pos, mask, 0, 9)
    want, _, _ = cached_reference(qkv + c0.to(torch.bfloat16).sum(), k_before, v_cache, pos, mask, 1, 9)
    assert (got.float() - want).abs().max().item() < 5e-2 * max(1.0, want.abs().max().item())
    assert not torch.equal(k_cache, k_before)  # written through the buffer passed in


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rows_get_the_same_bits_in_any_call():
    check_row_invariance("cuda", torch.bfloat16)


def check_model_integration() -> None:
    """Run under TRITON_INTERPRET=1: a model's cached calls through the kernel (KernelConfig.cuda_paths_on_cpu lets
    the CPU take it here) give SDPA's logits (KernelConfig.torch_only) and the same decoded tokens, with and without
    grouped-query heads; every attention of the kernel's runs is the kernel's (no SDPA operator), and the torch
    path's runs SDPA."""
    import dataclasses

    from recyclegpt.config import PRESETS, KernelConfig, RecycleConfig
    from recyclegpt.decoding.loops import recycle, standard
    from recyclegpt.models import RecycleModel

    kernel_only = dataclasses.replace(KernelConfig.torch_only(), decode_attention=True, cuda_paths_on_cpu=True)
    sdpa = {}  # per (kv heads, variant): how many SDPA operators ran
    for kv_heads in (4, 2):
        torch.manual_seed(0)
        cfg = dataclasses.replace(PRESETS["tiny"], d_model=64, n_head=4, n_kv_head=kv_heads)  # head_dim 16
        model = RecycleModel.build(cfg, RecycleConfig(n_layer=1)).eval()
        x = torch.randint(0, cfg.vocab_size, (2, 14))
        pad = torch.tensor([0, 4])
        got = {}
        for kernel, kernels in ((True, kernel_only), (False, KernelConfig.torch_only())):
            model.kernels = kernels
            with OpLog() as log:
                cache = model.base.new_cache(2, 32)
                with torch.no_grad():
                    model.base(x[:, :9], input_pos=torch.arange(9), cache=cache, pad=pad, kv_end=32)
                    logits = model.base(x[:, 9:], input_pos=torch.arange(9, 14), cache=cache, pad=pad,
                                        kv_end=32).logits
                prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8]]
                got[kernel] = (logits, standard(model.base, prompts, max_new_tokens=6).tokens,
                               recycle(model, prompts, max_new_tokens=6).tokens)
            sdpa[kv_heads, kernel] = sum("scaled_dot_product" in name for name in log.names())
        assert (got[True][0] - got[False][0]).abs().max().item() < 1e-4
        assert got[True][1:] == got[False][1:]
    assert all(n == 0 if kernel else n > 0 for (_, kernel), n in sdpa.items()), sdpa


if __name__ == "__main__":
    check_interpreted_cases()
    check_cached_cases()
    check_row_invariance()
    check_model_integration()
