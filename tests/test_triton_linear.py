"""The fused decode-step products (triton_linear: RMSNorm, SwiGLU and residual folded into a few-row product) against
torch: on the CPU under Triton's interpreter, and on CUDA in bf16, in a CUDA graph, under torch.compile and in the
engine. Skipped without triton.

The interpreter must be chosen before triton is imported, so the CPU cases run in a subprocess: this file run as a
script with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from interpreted import OpLog, needs_interpreter_3_7, run_interpreted  # noqa: E402

from recyclegpt.kernels import attention as triton_attention  # noqa: E402
from recyclegpt.kernels import linear as triton_linear  # noqa: E402

# (rows, N, K): ragged column and K blocks, a square layer, SmolLM2's QKV / gate-up / down shapes
CASES = [(1, 50, 72), (3, 96, 64), (4, 576, 576), (1, 960, 576), (2, 3072, 576), (1, 576, 1536)]
MODES = {"plain": {}, "norm": {"norm": True}, "residual": {"residual": True},
         "norm+residual": {"norm": True, "residual": True}}


def make_inputs(R, N, K, *, norm=False, residual=False, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, K + 3, generator=g)[:, :-3]  # a strided view, as model slices are
    w = torch.randn(N, K, generator=g) / K ** 0.5
    nw = 1 + 0.1 * torch.randn(K, generator=g) if norm else None
    res = torch.randn(R, N, generator=g) if residual else None
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return to(x), to(w), to(nw), to(res)


def reference(x, w, nw, res, *, eps=1e-5):
    """The torch modules' order: model.RMSNorm, F.linear, then the residual add."""
    if nw is not None:
        xf = x.float()
        x = nw * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = F.linear(x, w)
    return y if res is None else res + y


def mlp_reference(x, w13, nw, w2, res, *, eps=1e-5):
    """The layer's MLP half as the torch modules compute it: res + MLP(RMSNorm(x)), the gate and up rows of w13 in
    one product (fuse_projections' weight)."""
    gate, up = reference(x, w13, nw, None, eps=eps).chunk(2, dim=-1)
    return reference(F.silu(gate) * up, w2, None, res)


# (B, T, q + k heads rotated, v heads, D): a decode step, a recycle pair, a batch of two with their own positions,
# SmolLM2's 9 + 3 + 3 heads of 64
QKV_CASES = [(1, 1, 6, 2, 8), (1, 2, 6, 2, 16), (2, 2, 3, 1, 8), (1, 1, 12, 3, 64)]


def qkv_inputs(B, T, rot, plain, D, K=40, *, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, K, generator=g)
    w = torch.randn((rot + plain) * D, K, generator=g) / K ** 0.5
    nw = 1 + 0.1 * torch.randn(K, generator=g)
    positions = torch.randint(0, 100, (B, T), generator=g) if B > 1 else torch.arange(T)[None] + 17
    from recyclegpt.models import rotary
    rope = rotary(positions, D, 10000.0, dtype)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, w, nw)) + (tuple(r.to(device) for r in rope),)


def qkv_reference(x, w, nw, rope, rot, eps=1e-5):
    """Attention.attend's torch path after the norm: the product, then one rotary pass over the first rot heads."""
    from recyclegpt.models import apply_rotary
    B, T, _ = x.shape
    D = rope[0].shape[-1]
    y = reference(x, w, nw, None).view(B, T, -1, D).transpose(1, 2)
    y = torch.cat((apply_rotary(y[:, :rot], *rope), y[:, rot:]), dim=1)
    return y.transpose(1, 2).reshape(B, T, -1)


def check_all_modes(cases, what: str = "") -> None:
    """Every mode of each (rows, N, K) case in fp32 against torch to 1e-5 (under the interpreter)."""
    for R, N, K in cases:
        for name, mode in MODES.items():
            x, w, nw, res = make_inputs(R, N, K, **mode)
            got = triton_linear.linear(x, w, norm_weight=nw, eps=1e-5, residual=res)
            err = (got - reference(x, w, nw, res)).abs().max().item()
            print(f"R={R} N={N} K={K} {name}{what}: max |d| {err:.2e}")
            assert got.shape == (R, N) and err < 1e-5, (R, N, K, name, what, err)


def check_interpreted_cases() -> None:
    """Run under TRITON_INTERPRET=1: every case and mode in fp32 on the CPU to 1e-5 of torch, leading dims kept, the
    pdl keyword through each op, and the custom ops under dynamo."""
    assert triton_linear._INTERPRETED, "TRITON_INTERPRET=1 must be set before triton is imported"
    check_all_modes(CASES)
    x, w, nw, res = make_inputs(4, 50, 72, norm=True, residual=True)
    got = triton_linear.linear(x.reshape(2, 2, 72), w, norm_weight=nw, eps=1e-5, residual=res.reshape(2, 2, 50))
    assert got.shape == (2, 2, 50) and torch.allclose(got.reshape(4, 50), reference(x, w, nw, res), atol=1e-5)
    # bf16 rounding in the torch modules' order: within a few bf16 ulps of torch (not equal: the sums' order differs)
    for name, mode in MODES.items():
        x, w, nw, res = make_inputs(2, 96, 64, dtype=torch.bfloat16, **mode)
        got = triton_linear.linear(x, w, norm_weight=nw, eps=1e-5, residual=res)
        want = reference(x, w, nw, res)
        assert got.dtype == torch.bfloat16 and (got.float() - want.float()).abs().max().item() < 5e-2, name

    for B, T, rot, plain, D in QKV_CASES:  # the QKV product with its norm and rotary embedding
        x, w, nw, rope = qkv_inputs(B, T, rot, plain, D)
        got = triton_linear.qkv_rope(x, w, nw, 1e-5, rope, rot)
        err = (got - qkv_reference(x, w, nw, rope, rot)).abs().max().item()
        print(f"qkv_rope B={B} T={T} heads {rot}+{plain} D={D}: max |d| {err:.2e}")
        assert got.shape == (B, T, (rot + plain) * D) and err < 1e-5, (B, T, rot, plain, D, err)
    x, w, nw, rope = qkv_inputs(1, 2, 6, 2, 16, dtype=torch.bfloat16)
    want = qkv_reference(x, w, nw, rope, 6)
    assert (triton_linear.qkv_rope(x, w, nw, 1e-5, rope, 6).float() - want.float()).abs().max().item() < 5e-2
    # pdl=False: the plain launch, which the interpreter (and a GPU before Hopper) takes either way
    x, w, nw, res = make_inputs(2, 96, 64, norm=True, residual=True)
    assert torch.equal(triton_linear.linear(x, w, norm_weight=nw, eps=1e-5, residual=res, pdl=False),
                       triton_linear.linear(x, w, norm_weight=nw, eps=1e-5, residual=res))
    assert torch.equal(triton_linear.gate_up_swiglu(x, w, nw, 1e-5, pdl=False),
                       triton_linear.gate_up_swiglu(x, w, nw, 1e-5))
    x, w, nw, rope = qkv_inputs(1, 2, 6, 2, 16)
    assert torch.equal(triton_linear.qkv_rope(x, w, nw, 1e-5, rope, 6, pdl=False),
                       triton_linear.qkv_rope(x, w, nw, 1e-5, rope, 6))
    rows = triton_linear.MAX_ROWS + 1  # more rows than the kernels take: each op refuses them
    x, w, nw, _ = make_inputs(rows, 50, 72, norm=True)
    xq, wq, nwq, rope = qkv_inputs(1, rows, 6, 2, 8)
    for op, call in (("fused linear", lambda: triton_linear.linear(x, w)),
                     ("fused gate-up", lambda: triton_linear.gate_up_swiglu(x, w, nw, 1e-5)),
                     ("fused QKV", lambda: triton_linear.qkv_rope(xq, wq, nwq, 1e-5, rope, 6))):
        try:
            call()
            raise AssertionError(f"{op}: {rows} rows accepted")
        except ValueError as e:
            assert str(e).startswith(op) and f"at most {triton_linear.MAX_ROWS} rows" in str(e), e

    def layer_tail(x, w, nw, res):
        return triton_linear.linear(x * 1.0, w, norm_weight=nw, eps=1e-5, residual=res)

    x, w, nw, res = make_inputs(1, 96, 64, norm=True, residual=True)
    got = torch.compile(layer_tail, fullgraph=True, backend="aot_eager")(x, w, nw, res)
    assert torch.equal(got, layer_tail(x, w, nw, res))

    def layer_head(x, w, nw, cos, sin):
        return triton_linear.qkv_rope(x * 1.0, w, nw, 1e-5, (cos, sin), 6)

    x, w, nw, rope = qkv_inputs(1, 2, 6, 2, 16)
    got = torch.compile(layer_head, fullgraph=True, backend="aot_eager")(x, w, nw, *rope)
    assert torch.equal(got, layer_head(x, w, nw, *rope))


def check_rows_get_the_same_bits(device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """A row's product has the same bits alone (a standard step) and as the first row of 2- and 4-row calls (a recycle
    pair, a chain's verification), for every product at SmolLM2's shapes: `linear` with the norm or the residual,
    gate_up_swiglu, the down product of its activation, and qkv_rope. The engine's bf16 chains equal `standard` only
    if this holds."""
    for name, mode, N, K in (("qkv", {"norm": True}, 960, 576), ("out", {"residual": True}, 576, 576),
                             ("gate-up", {"norm": True}, 3072, 576), ("down", {"residual": True}, 576, 1536)):
        x, w, nw, res = make_inputs(4, N, K, dtype=dtype, device=device, **mode)
        firsts = [triton_linear.linear(x[:R], w, norm_weight=nw, eps=1e-5,
                                       residual=None if res is None else res[:R])[0] for R in (1, 2, 4)]
        assert all(torch.equal(firsts[0], f) for f in firsts[1:]), name
    x, w, nw, _ = make_inputs(4, 3072, 576, norm=True, dtype=dtype, device=device)
    acts = [triton_linear.gate_up_swiglu(x[:R], w, nw, 1e-5) for R in (1, 2, 4)]
    assert all(torch.equal(acts[0][0], a[0]) for a in acts[1:]), "gate-up swiglu"
    x, w, nw, rope = qkv_inputs(1, 4, 12, 3, 64, 576, dtype=dtype, device=device)  # positions 17..20
    firsts = [triton_linear.qkv_rope(x[:, :T], w, nw, 1e-5, tuple(r[:, :, :T] for r in rope), 12)[0, 0]
              for T in (1, 2, 4)]
    assert all(torch.equal(firsts[0], f) for f in firsts[1:]), "qkv_rope"


def check_mlp(device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """The MLP half of a fused layer: gate_up_swiglu gives silu(gate) * up of the plain gate-up product (`linear`
    with the norm), rounded as MLP rounds it, and the down product of that activation with the residual is torch's
    of the same activation; in fp32 the two kernels are the torch modules' MLP (`mlp_reference`) to 1e-5. At 1 to
    4 rows (SmolLM2's shape at 2), with a ragged column block. In bf16 the kernels are checked one at a time: a bf16
    step apart in the activation moves the down product by more than its own rounding."""
    shapes = ((1, 50, 72), (3, 50, 72), (4, 40, 100))  # the interpreter is slow:
    if dtype == torch.float32 or device != "cpu":  # SmolLM2's shape once there
        shapes = ((2, 1536, 576),) + shapes
    for R, width, K in shapes:
        x, w, nw, _ = make_inputs(R, 2 * width, K, norm=True, dtype=dtype, device=device, seed=R)
        _, w2, _, res = make_inputs(R, K, width, residual=True, dtype=dtype, device=device, seed=R + 1)
        act = triton_linear.gate_up_swiglu(x, w, nw, 1e-5)
        gate, up = triton_linear.linear(x, w, norm_weight=nw, eps=1e-5).float().chunk(2, dim=-1)
        want_act = (F.silu(gate).to(dtype).float() * up).to(dtype)
        assert act.shape == (R, width) and act.dtype == dtype
        # a bf16 step apart at most: torch's silu and exp are not the kernel's to the last bit, and round twice
        rtol, atol = (1e-6, 1e-6) if dtype == torch.float32 else (2 ** -6, 1e-2)
        torch.testing.assert_close(act.float(), want_act.float(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{(R, width, K)}: {m}")
        out = triton_linear.linear(act, w2, residual=res)
        want = reference(act, w2, None, res)
        err = (out.float() - want.float()).abs().max().item()
        tol = 1e-5 if dtype == torch.float32 else 6e-2 * max(1.0, want.float().abs().max().item() / 8)
        print(f"mlp R={R} F={width} K={K} {dtype}: down product max |d| {err:.2e}")
        assert out.shape == (R, K) and err < tol, (R, width, K, err)
        if dtype == torch.float32:
            err = (out - mlp_reference(x, w, nw, w2, res)).abs().max().item()
            print(f"mlp R={R} F={width} K={K}: against the torch MLP max |d| {err:.2e}")
            assert err < 1e-5, (R, width, K, err)
    x, w, nw, _ = make_inputs(2, 7, 16, norm=True, dtype=dtype, device=device)
    try:
        triton_linear.gate_up_swiglu(x, w, nw, 1e-5)
        raise AssertionError("an odd gate-up width accepted")
    except ValueError as e:
        assert "gate rows then up rows" in str(e)


def block_calls(model, log: OpLog) -> list[tuple[int, bool, bool]]:
    """Forward hooks on every block of `model` (base and module) that record, per call, (rows, fused, cached) from the
    operators `log` saw during it: fused, its products ran as triton_linear's ops; cached, fused with no
    `index_copy_` (KVCache.write) in the call, so that cached_attention wrote the cache. The list grows as the
    model runs."""
    calls, starts = [], []

    def before(block, args):
        starts.append(len(log.ops))

    def after(block, args, out):
        names = log.names(starts.pop())
        fused = "recyclegpt::fused_qkv_rope" in names
        calls.append((args[0].numel() // args[0].shape[-1], fused, fused and "aten::index_copy_" not in names))

    for block in list(model.base.layers) + list(model.module.layers):
        block.register_forward_pre_hook(before)
        block.register_forward_hook(after)
    return calls


def check_model_integration() -> None:
    """Run under TRITON_INTERPRET=1: with the fused products (KernelConfig.cuda_paths_on_cpu lets the CPU take them
    here), and with them and the attention that writes the cache (triton_attention.cached_attention), a decode
    step's logits are the torch path's (KernelConfig.torch_only) to 1e-4, and standard, recycle, speculative and
    tree decoding give the same tokens; every call of at most MAX_ROWS rows is fused and wider calls (prompts, the
    tree's verification) keep the torch path."""
    sys.path.insert(0, os.path.dirname(__file__))
    import dataclasses

    from test_speculative import predictable, prompts_for

    from recyclegpt.config import KernelConfig
    from recyclegpt.decoding.loops import recycle, standard
    from recyclegpt.decoding.speculative import TreeShape, speculative, tree
    from recyclegpt.models import fuse_projections

    model = fuse_projections(predictable(1, 0.1, d_model=64))  # head_dim 16: the attention kernels' least
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # norm weights other than ones, so that a norm with the wrong weight shows
        for block in list(model.base.layers) + list(model.module.layers):
            for norm in (block.attn_norm, block.mlp_norm):
                norm.weight.add_(0.2 * torch.randn(norm.weight.shape, generator=g))
    prompts = prompts_for(1, 2)
    log = OpLog()
    calls = block_calls(model, log)
    fused = KernelConfig(draft_head=False, cuda_paths_on_cpu=True)  # the products and attention CUDA takes
    variants = {"fused, cached": fused, "fused": dataclasses.replace(fused, cached_attention=False),
                "torch": KernelConfig.torch_only()}
    got, seen = {}, {}  # per variant: the outputs, and (rows, fused, cached) of every block call
    for name, kernels in variants.items():
        model.kernels = kernels
        del calls[:], log.ops[:]
        with log:
            with torch.no_grad():
                cache = model.base.new_cache(1, 32)
                out = model.base(torch.tensor([[5, 7, 11]]), input_pos=torch.arange(3), cache=cache)
                step = model.base(torch.tensor([[13]]), input_pos=torch.tensor([3]), cache=cache)
            got[name] = (out.logits, step.logits,
                         standard(model.base, prompts, max_new_tokens=10).tokens,
                         recycle(model, prompts, max_new_tokens=10).tokens,
                         speculative(model, prompts, max_new_tokens=10, draft_len=3).tokens,
                         tree(model, prompts, max_new_tokens=10, shape=TreeShape(3, 2, 5)).tokens)
        seen[name] = list(calls)
    off = got["torch"]
    for name in ("fused, cached", "fused"):
        on = got[name]
        assert (on[0] - off[0]).abs().max().item() < 1e-4 and (on[1] - off[1]).abs().max().item() < 1e-4, name
        assert on[2:] == off[2:] and on[4] == on[2] and on[5] == on[2], name
        # every call of at most MAX_ROWS rows fused, wider ones kept on torch, and both kinds among them
        assert all(f == (n <= triton_linear.MAX_ROWS) for n, f, _ in seen[name]), (name, seen[name])
        assert any(f for _, f, _ in seen[name]) and any(not f for _, f, _ in seen[name]), (name, seen[name])
    # every fused call took the one-kernel attention where it was on (decode steps and recycle pairs among them), and
    # none where it was off
    cached = seen["fused, cached"]
    assert all(c == f for _, f, c in cached) and {1, 2} <= {n for n, _, c in cached if c}, cached
    assert not any(c for _, _, c in seen["fused"]) and not any(f for _, f, _ in seen["torch"])


def check_compiled_steps_keep_the_cache_in_place() -> None:
    """Run under TRITON_INTERPRET=1: the compiled engine's standard and recycle steps with the fused products and
    the attention that writes the cache give standard's tokens, and inductor hands the op the cache buffers
    themselves (graph inputs): no copy of the cache around it, which a separate write and read of the cache got."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        print("skipped: torch.compile on the CPU needs a C++ compiler")
        return
    sys.path.insert(0, os.path.dirname(__file__))
    from test_speculative import predictable, prompts_for
    from torch._inductor.utils import run_and_get_code

    from recyclegpt.config import KernelConfig
    from recyclegpt.decoding.engine import Engine
    from recyclegpt.decoding.loops import standard

    model = predictable(1, 0.05, d_model=64)
    prompts = prompts_for(0, 2)
    want = standard(model.base, prompts, max_new_tokens=8).tokens
    model.kernels = KernelConfig(cuda_paths_on_cpu=True)  # the fused products and cached_attention on the CPU
    engine = Engine(model, bucket=64, compile=True, compile_steps=True, fuse=True)
    got, code = run_and_get_code(engine.decode, "standard", prompts, max_new_tokens=8)
    assert got.tokens == want
    code += run_and_get_code(engine.decode, "recycle", prompts, max_new_tokens=8)[1]
    calls = [line for c in code for line in c.splitlines() if "cached_attention.default(" in line]
    assert len(calls) >= 2, "the op did not run in the compiled steps"
    for line in calls:  # (qkv, k_cache, v_cache, tickets, ...): the last three are the graph's inputs, argN_1
        assert re.search(r", arg\d+_1, arg\d+_1, arg\d+_1, \w+, \w+, \d+, \d+, ", line), line


def check_shared_tables() -> None:
    """Run under TRITON_INTERPRET=1: a compiled call that makes its own tables (the sampled standard step's forward)
    makes the mask once for its three fused layers' attention (one (1, 1, 3, 256) buffer, not three) and hands it to
    them through one `recyclegpt::shared` call; the greedy step, whose tables come made (Decoder._tables, compiled
    apart), has one mask and no copy. Both give standard's tokens."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        print("skipped: torch.compile on the CPU needs a C++ compiler")
        return
    import dataclasses

    from torch._inductor.utils import run_and_get_code

    from recyclegpt.config import PRESETS, KernelConfig, RecycleConfig
    from recyclegpt.decoding.engine import Engine
    from recyclegpt.decoding.loops import standard
    from recyclegpt.decoding.sampling import SamplingParams
    from recyclegpt.models import RecycleModel

    cfg = dataclasses.replace(PRESETS["smollm2-135m"], n_layer=3, vocab_size=512)  # 9 / 3 heads of 64
    torch.manual_seed(0)
    model = RecycleModel.build(cfg, RecycleConfig(n_layer=1)).eval()
    masks = {}
    for sampling in (SamplingParams(), SamplingParams(temperature=1.0, top_k=20, seed=3)):
        model.kernels = KernelConfig()
        want = standard(model.base, [[1, 2, 3, 4, 5]], max_new_tokens=4, sampling=sampling).tokens
        model.kernels = KernelConfig(cuda_paths_on_cpu=True)
        torch._dynamo.reset()  # every run compiles afresh, so that its code is all there to read
        engine = Engine(model, bucket=256, compile=True, compile_steps=True, fuse=True)
        got, code = run_and_get_code(engine.decode, "standard", [[1, 2, 3, 4, 5]], max_new_tokens=4,
                                     sampling=sampling)
        assert got.tokens == want
        code = "\n".join(code)
        masks[sampling.greedy] = (len(re.findall(r"empty_strided_cpu\(\(1, 1, 3, 256\)", code)),
                                  code.count("recyclegpt.shared.default("))
    assert masks == {False: (1, 1), True: (1, 0)}, masks


def check_shared_slots() -> None:
    """Run under TRITON_INTERPRET=1: a compiled chain round hands its computed slots to the fused layers in the
    tables' one `recyclegpt::shared` copy (four tensors: cos, sin, the mask and the slots) and keeps the reference
    loop's tokens."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        print("skipped: torch.compile on the CPU needs a C++ compiler")
        return
    import dataclasses

    from torch._inductor.utils import run_and_get_code

    from recyclegpt.config import PRESETS, KernelConfig, RecycleConfig
    from recyclegpt.decoding.engine import Engine
    from recyclegpt.decoding.speculative import speculative
    from recyclegpt.models import RecycleModel

    cfg = dataclasses.replace(PRESETS["smollm2-135m"], n_layer=2, vocab_size=512)
    torch.manual_seed(0)
    model = RecycleModel.build(cfg, RecycleConfig(n_layer=1)).eval()
    want = speculative(model, [[1, 2, 3, 4, 5]], max_new_tokens=6, draft_len=2).tokens
    model.kernels = KernelConfig(cuda_paths_on_cpu=True)
    engine = Engine(model, bucket=256, compile=True, compile_steps=True, fuse=True)
    got, code = run_and_get_code(engine.decode, "speculative", [[1, 2, 3, 4, 5]], max_new_tokens=6, draft_len=2)
    assert got.tokens == want
    lists = sorted({len(m.split(",")) for m in re.findall(r"recyclegpt\.shared\.default\(\[([^\]]*)\]",
                                                          "\n".join(code))})
    assert 4 in lists, lists


@needs_interpreter_3_7(triton)
def test_interpreted_matches_torch():
    run_interpreted(__file__)


@pytest.mark.skipif(triton_linear._INTERPRETED, reason="TRITON_INTERPRET is set in this process")
def test_cpu_tensors_need_the_interpreter():
    x, w, _, _ = make_inputs(1, 50, 72)
    with pytest.raises(RuntimeError, match="interpreter"):
        triton_linear.linear(x, w)


def test_block_sizes_give_every_sm_a_program():
    for N, K in ((576, 576), (960, 576), (3072, 576), (576, 1536), (6144, 2048), (50, 72), (20, 10)):
        bn, bk = triton_linear.blocks(N, K, 132)
        assert 4 <= bn <= triton_linear.MAX_BLOCK_N and bn & (bn - 1) == 0 and bk & (bk - 1) == 0
        assert -(-N // bn) >= 132 or bn == 4
        assert bk <= max(16, triton.next_power_of_2(K))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_graph_and_compile():
    def check(got, x, w, nw, res):
        want = reference(x, w, nw, res)
        assert (got.float() - want.float()).abs().max().item() < 6e-2 * max(1.0, want.float().abs().max().item() / 8)

    for R, N, K in CASES:
        for name, mode in MODES.items():
            x, w, nw, res = make_inputs(R, N, K, dtype=torch.bfloat16, device="cuda", **mode)
            check(triton_linear.linear(x, w, norm_weight=nw, eps=1e-5, residual=res), x, w, nw, res)
    for B, T, rot, plain, D in QKV_CASES:
        x, w, nw, rope = qkv_inputs(B, T, rot, plain, D, K=576, dtype=torch.bfloat16, device="cuda")
        want = qkv_reference(x, w, nw, rope, rot)
        got = triton_linear.qkv_rope(x, w, nw, 1e-5, rope, rot)
        assert (got.float() - want.float()).abs().max().item() < 6e-2 * max(1.0, want.float().abs().max().item() / 8)
    inputs = make_inputs(1, 3072, 576, norm=True, residual=True, dtype=torch.bfloat16, device="cuda")
    x, w, nw, res = inputs
    triton_linear.linear(x, w, norm_weight=nw, eps=1e-5, residual=res)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_linear.linear(x, w, norm_weight=nw, eps=1e-5, residual=res)
    for a, b in zip(inputs, make_inputs(1, 3072, 576, norm=True, residual=True, dtype=torch.bfloat16,
                                        device="cuda", seed=1)):
        a.copy_(b)
    graph.replay()
    check(out, *inputs)

    @torch.compile(fullgraph=True)
    def tail(x, w, nw, res):
        return triton_linear.linear(x * 1.0, w, norm_weight=nw, eps=1e-5, residual=res)

    check(tail(*inputs), *inputs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rows_get_the_same_bits_in_any_call():
    check_rows_get_the_same_bits("cuda", torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mlp():
    check_mlp("cuda", torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a CUDA device with programmatic dependent launch (Hopper or later)")
def test_cuda_pdl_changes_no_bit():
    """30 fused layers at SmolLM2's shapes (the QKV-rotary product, the attention that writes the cache, the three
    other products) in one CUDA graph, launched with programmatic dependent launch and without: the same output and
    the same cache, bit for bit, over 50 replays on new inputs. A kernel that read its input before the previous
    kernel had written it would differ."""
    from recyclegpt.models import rotary

    g = torch.Generator().manual_seed(0)
    dev, dt, layers, S = "cuda", torch.bfloat16, 30, 512
    rnd = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=g)).to(dev, dt)  # noqa: E731
    weights = [(rnd(960, 576, scale=576 ** -0.5), rnd(576, 576, scale=576 ** -0.5), rnd(3072, 576, scale=576 ** -0.5),
                rnd(576, 1536, scale=1536 ** -0.5), 1 + rnd(576, scale=0.1), 1 + rnd(576, scale=0.1))
               for _ in range(layers)]
    x = rnd(1, 1, 576)
    pos = torch.tensor([300], device=dev)
    mask = torch.zeros(1, 1, 3, S, device=dev, dtype=dt).masked_fill(torch.arange(S, device=dev) > 300, float("-inf"))
    rope = rotary(pos[None], 64, 10000.0, dt)

    def step(k_cache, v_cache, tickets, pdl):
        h = x
        for i, (wqkv, wo, w13, w2, n1, n2) in enumerate(weights):
            qkv = triton_linear.qkv_rope(h, wqkv, n1, 1e-5, rope, 12, pdl=pdl)
            y = triton_attention.cached_attention(qkv, k_cache, v_cache, tickets, pos, mask, i, 9, pdl=pdl)
            h = triton_linear.linear(y, wo, residual=h, pdl=pdl)
            h = triton_linear.linear(triton_linear.gate_up_swiglu(h, w13, n2, 1e-5, pdl=pdl), w2, residual=h, pdl=pdl)
        return h

    caches, graphs, outs = [], [], []
    for pdl in (False, True):
        kv = (torch.zeros(layers, 1, 3, S, 64, device=dev, dtype=dt), torch.zeros(layers, 1, 3, S, 64, device=dev,
                                                                                  dtype=dt),
              torch.zeros(12, device=dev, dtype=torch.int32))
        step(*kv, pdl)  # compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs.append(step(*kv, pdl))
        caches.append(kv)
        graphs.append(graph)
    for _ in range(50):
        x.copy_(rnd(1, 1, 576))
        k_old, v_old = rnd(layers, 1, 3, S, 64), rnd(layers, 1, 3, S, 64)
        for k_cache, v_cache, _ in caches:
            k_cache.copy_(k_old)
            v_cache.copy_(v_old)
        for graph in graphs:
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(outs[0], outs[1]) and outs[0].abs().sum() > 0
        assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
        assert not caches[1][2].any()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compiled,cached,pdl", [
    (False, False, False), (True, False, False), (False, True, False), (True, True, False), (False, True, True),
    (True, True, True)])
def test_cuda_engine_with_fused_products(compiled, cached, pdl):
    """The engine's standard, recycle, speculative and tree decoding, graphs and compiled whole, with the fused
    products (and the attention that writes the cache; programmatic dependent launch; compiled, the rotary tables
    and mask shared by the layers): standard's tokens of the torch path (fp32)."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_speculative import predictable, prompts_for

    from recyclegpt.config import KernelConfig
    from recyclegpt.decoding.engine import Engine
    from recyclegpt.decoding.loops import standard
    from recyclegpt.decoding.speculative import TreeShape

    model = predictable(1, 0.05, d_model=64).cuda()  # head_dim 16: the attention kernels take the decode calls
    prompts = prompts_for(3, 3)
    model.kernels = KernelConfig.torch_only()
    want = standard(model.base, prompts, max_new_tokens=40).tokens
    model.kernels = KernelConfig(cached_attention=cached, pdl=pdl)
    engine = (Engine(model, graphs=True, bucket=128, compile=True, compile_steps=True) if compiled
              else Engine(model, graphs=True, bucket=16))
    for strategy, kw in (("standard", {}), ("speculative", {"draft_len": 3}), ("tree", {"tree": TreeShape(4, 3, 10)})):
        got = engine.decode(strategy, prompts, max_new_tokens=40, **kw)
        assert got.tokens == want, strategy
    engine.decode("recycle", prompts, max_new_tokens=40)


if __name__ == "__main__":
    check_interpreted_cases()
    check_rows_get_the_same_bits()
    check_mlp()
    check_mlp(dtype=torch.bfloat16)
    check_model_integration()
    check_compiled_steps_keep_the_cache_in_place()
    check_shared_tables()
    check_shared_slots()
