"""A decode step's matrix products in Triton, with the small operators around them folded in.

A decoder layer at decode time multiplies 1-4 rows by four weights (QKV, output, gate-up, down). Compiled, each
product is one cuBLAS kernel, and around them run an RMSNorm kernel before QKV and before gate-up, a SwiGLU kernel
before down, and the residual adds (fused by inductor into the norms). Measured on an H100 (SmolLM2 shape, docs/
engine.md): cuBLAS's few-row kernels take ~4 µs each where the bytes take 0.2-1.2 µs, and the norm and SwiGLU
kernels ~1.2-1.5 µs each; the step is launch- and latency-bound, not bandwidth-bound.

Here one kernel does a product and its neighbours: optionally RMSNorm of the input rows first (each program
recomputes the rows' mean square: K values, cheap), and optionally a residual added to the output. The gate-up
product (`gate_up_swiglu`) applies SwiGLU in its epilogue, so the down product reads the activation; the QKV
product (`qkv_rope`) applies the rotary embedding to its query and key heads: each program computes column pairs
(o, o + D/2) of a head, so rotate_half needs nothing from another program. Per layer
that is 4 kernels where there were 7. The rotary embedding also leaves the pointwise kernels around the attention,
which recomputed it (inductor's code on 2026-11-27). Each program owns BLOCK_N output columns (or column
pairs) for all rows, so the weight is read once; the rows are padded to a power of two. On by default
(`KernelConfig.fused_linear`); with the attention that writes the cache (`triton_attention.cached_attention`) a layer
is 5 kernels, launched with programmatic dependent launch on Hopper (`KernelConfig.pdl`). Measured on an H100
(docs/engine.md, 2026-11-27): SmolLM2's compiled standard step 0.977 -> 0.533 ms.

Rounding follows the torch modules (`model.RMSNorm`, `MLP`, the residual add): normalised in float32 and cast to the
activations' dtype before the norm weight, silu and the product rounded to the dtype, the product's output rounded
before the residual is added; the rotation in float32, rounded once, as inductor computes `apply_rotary`.
Accumulation is float32.

Torch custom ops (opaque to torch.compile, captured in CUDA graphs as it is); on the CPU it runs only under
Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported), for the tests.
"""

from __future__ import annotations

import torch

from .common import INTERPRETED as _INTERPRETED
from .common import after_previous, pdl_launch, tl, triton
from .common import available as available

MAX_ROWS = 4  # the most rows (tokens x batch) the few-row kernels take: decode steps, recycle's pairs, short chains
# weight elements a program loads per step of its K loop: BLOCK_K = TILE // BLOCK_N. On an H100
# (scripts/linear_bench.py, one row, bf16): 4096 was the best of six settings without PDL on 2026-11-27;
# with PDL (the first step's block loads before the wait) 16384 was the best or within 1% for every product later
# that day (gate-up 5.33 -> 2.82 µs, down 2.78 -> 2.15 against 4096), and the compiled standard step went from
# 0.659 to 0.533 ms: the whole weight slab of most programs loads before the wait
TILE = 16384
MAX_BLOCK_N = 64
NUM_WARPS = 4
# warps for calls of 2 to MAX_ROWS rows (a recycle pair, a short chain), all rows in one program (the weight block
# read once). Each program holds an (R, BLOCK_N, BLOCK_K) float32 product, so its registers grow with the rows:
# compiled for sm_90a, at 4 warps the SmolLM2 gate-up kernel spills 72 bytes at one row, 172 at two, 416 at four;
# 8 warps spill none but measured slower on an H100 (gate-up at two rows 4.55 against 3.57 µs; the recycle step
# 0.649 -> 0.718 ms), as did a row block a program (5.28 µs; 0.673 -> 0.735 ms): docs/engine.md's decision table
MULTI_ROW_WARPS = 4
DEFAULT_SMS = 132  # an H100 SXM's SM count, for the interpreter (CUDA asks the device)


if triton is not None:
    # the RMSNorm in two parts, shared with triton_draft_head's kernel
    @triton.jit
    def inv_rms(X, rows, row_ok, K, eps, sxr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        # 1 / RMS of each row, over its K values (each program recomputes it: no grid-wide sync)
        ss = tl.zeros([BLOCK_R], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + rows[:, None] * sxr + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :],
                        other=0.0).to(tl.float32)
            ss += tl.sum(x * x, 1)
        return 1.0 / tl.sqrt(ss / K + eps)

    @triton.jit
    def rms_normed(x, NW, ks, k_ok, inv):
        # as model.RMSNorm: normalised in float32, cast to the activations' dtype, then scaled
        nw = tl.load(NW + ks, mask=k_ok, other=0.0)
        xn = (x.to(tl.float32) * inv[:, None]).to(x.dtype)
        return (xn.to(tl.float32) * nw.to(tl.float32)[None, :]).to(x.dtype)

    @triton.jit
    def x_block(X, NW, rows, row_ok, ks, k_ok, sxr, inv, NORM: tl.constexpr):
        # the rows' inputs at columns ks as the product takes them: RMS-normalised (NORM) or as they are
        x = tl.load(X + rows[:, None] * sxr + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            x = rms_normed(x, NW, ks, k_ok, inv)
        return x

    @triton.jit
    def silu_mul(gate, up):
        # silu(gate) * up as MLP rounds it: silu in float32 rounded to the dtype, then the product rounded
        g = gate.to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
        return (a.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)

    @triton.jit
    def product(acc, x, w):
        # acc (rows, columns) + x (rows, k) @ w (columns, k).T: a broadcast product reduced over k in float32
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], 2)
        return acc

    @triton.jit
    def _linear_kernel(X, NW, W, Res, Out, R, N, K, eps, sxr, swn, srr, sor,
                       NORM: tl.constexpr, RESIDUAL: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        # grid (column block, row block): BLOCK_R rows against BLOCK_N weight rows, over K in steps of BLOCK_K
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        # the first K step's weights: no kernel writes them, so they load before the wait
        ks = tl.arange(0, BLOCK_K)
        w_first = tl.load(W + cols[:, None] * swn + ks[None, :], mask=col_ok[:, None] & (ks < K)[None, :], other=0.0)
        after_previous(PDL)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # this program's row block
        row_ok = rows < R
        if NORM:
            inv = inv_rms(X, rows, row_ok, K, eps, sxr, BLOCK_R, BLOCK_K)
        else:
            inv = tl.zeros([BLOCK_R], tl.float32)  # unused
        acc = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            x = x_block(X, NW, rows, row_ok, ks, k_ok, sxr, inv, NORM)
            if k0 == 0:
                w = w_first
            else:
                w = tl.load(W + cols[:, None] * swn + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc = product(acc, x, w)
        y = acc.to(Out.dtype.element_ty)
        out_ok = row_ok[:, None] & col_ok[None, :]
        if RESIDUAL:
            res = tl.load(Res + rows[:, None] * srr + cols[None, :], mask=out_ok, other=0.0)
            y = (res.to(tl.float32) + y.to(tl.float32)).to(Out.dtype.element_ty)
        tl.store(Out + rows[:, None] * sor + cols[None, :], y, mask=out_ok)

    @triton.jit
    def paired_products(X, NW, W, lo_cols, hi_cols, u_ok, rows, row_ok, K, eps, sxr, swn,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        # RMSNorm(x) of the rows against two sets of weight rows, lo_cols and hi_cols (paired columns: a head's two
        # rotary halves, or gate and up), float32 accumulators (BLOCK_R, BLOCK_N) each. The first K step's weights
        # load before the PDL wait; K in steps as in _linear_kernel
        ks = tl.arange(0, BLOCK_K)
        w_ok = u_ok[:, None] & (ks < K)[None, :]
        lo_first = tl.load(W + lo_cols[:, None] * swn + ks[None, :], mask=w_ok, other=0.0)
        hi_first = tl.load(W + hi_cols[:, None] * swn + ks[None, :], mask=w_ok, other=0.0)
        after_previous(PDL)
        inv = inv_rms(X, rows, row_ok, K, eps, sxr, BLOCK_R, BLOCK_K)
        acc_lo = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
        acc_hi = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            x = x_block(X, NW, rows, row_ok, ks, k_ok, sxr, inv, True)
            if k0 == 0:
                w_lo, w_hi = lo_first, hi_first
            else:
                w_ok = u_ok[:, None] & k_ok[None, :]
                w_lo = tl.load(W + lo_cols[:, None] * swn + ks[None, :], mask=w_ok, other=0.0)
                w_hi = tl.load(W + hi_cols[:, None] * swn + ks[None, :], mask=w_ok, other=0.0)
            acc_lo = product(acc_lo, x, w_lo)
            acc_hi = product(acc_hi, x, w_hi)
        return acc_lo, acc_hi

    @triton.jit
    def _qkv_rope_kernel(X, NW, W, Cos, Sin, Out, R, T, N, K, eps, sxr, swn, sor, scb, sct, ROT_HEADS,
                         HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         PDL: tl.constexpr):
        # grid (block of half-columns, row block): half-column u is column o of head hd's first half, computed with
        # its partner o + HALF in the second half, so that the rotary embedding (rotate_half) is this program's own
        u = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        u_ok = u < N // 2
        hd, o = u // HALF, u % HALF
        lo_cols = hd * 2 * HALF + o
        hi_cols = lo_cols + HALF
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # this program's row block
        row_ok = rows < R
        acc_lo, acc_hi = paired_products(X, NW, W, lo_cols, hi_cols, u_ok, rows, row_ok, K, eps, sxr, swn,
                                         BLOCK_R, BLOCK_N, BLOCK_K, PDL)
        # the product rounded to the dtype, as F.linear's output; then x * cos + rotate_half(x) * sin in float32,
        # rounded once (as inductor computes apply_rotary), for query and key heads (hd < ROT_HEADS) only
        y_lo = acc_lo.to(Out.dtype.element_ty).to(tl.float32)
        y_hi = acc_hi.to(Out.dtype.element_ty).to(tl.float32)
        out_ok = row_ok[:, None] & u_ok[None, :]
        at = (rows // T)[:, None] * scb + (rows % T)[:, None] * sct + o[None, :]  # row r is token (r // T, r % T)
        c_lo = tl.load(Cos + at, mask=out_ok, other=0.0).to(tl.float32)
        c_hi = tl.load(Cos + at + HALF, mask=out_ok, other=0.0).to(tl.float32)
        s_lo = tl.load(Sin + at, mask=out_ok, other=0.0).to(tl.float32)
        s_hi = tl.load(Sin + at + HALF, mask=out_ok, other=0.0).to(tl.float32)
        rot = (hd < ROT_HEADS)[None, :]
        out_lo = tl.where(rot, y_lo * c_lo - y_hi * s_lo, y_lo)
        out_hi = tl.where(rot, y_hi * c_hi + y_lo * s_hi, y_hi)
        tl.store(Out + rows[:, None] * sor + lo_cols[None, :], out_lo.to(Out.dtype.element_ty), mask=out_ok)
        tl.store(Out + rows[:, None] * sor + hi_cols[None, :], out_hi.to(Out.dtype.element_ty), mask=out_ok)

    @triton.jit
    def _gate_up_swiglu_kernel(X, NW, W, Out, R, F, K, eps, sxr, swn, sor,
                               BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               PDL: tl.constexpr):
        # grid (block of columns of the F-wide activation, row block): column u of silu(gate) * up is gate column u
        # of the fused gate-up weight with its partner up column F + u, both this program's, so the down product
        # reads the activation (F wide) and computes no SwiGLU of its own
        u = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        u_ok = u < F
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # this program's row block
        row_ok = rows < R
        acc_gate, acc_up = paired_products(X, NW, W, u, u + F, u_ok, rows, row_ok, K, eps, sxr, swn,
                                           BLOCK_R, BLOCK_N, BLOCK_K, PDL)
        # each product rounded to the dtype, as F.linear's output, then SwiGLU as MLP rounds it
        y = silu_mul(acc_gate.to(Out.dtype.element_ty), acc_up.to(Out.dtype.element_ty))
        tl.store(Out + rows[:, None] * sor + u[None, :], y, mask=row_ok[:, None] & u_ok[None, :])



def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def blocks(N: int, K: int, sms: int) -> tuple[int, int]:
    """BLOCK_N, BLOCK_K for N output columns of width K: the widest power-of-two column block (4 to MAX_BLOCK_N)
    that still gives every SM a program, and a K step of TILE // BLOCK_N, no wider than the power of two K needs
    (16 at least)."""
    bn = 4
    while bn < MAX_BLOCK_N and -(-N // (2 * bn)) >= sms:
        bn *= 2
    return bn, max(16, min(TILE // bn, triton.next_power_of_2(K)))


def _row_block(R: int) -> tuple[int, int]:
    """BLOCK_R and the warps for R rows (at most MAX_ROWS, the product reduced on CUDA cores): every row in one
    program, NUM_WARPS for one row, MULTI_ROW_WARPS for more."""
    block_r = triton.next_power_of_2(R)
    return block_r, MULTI_ROW_WARPS if 1 < block_r else NUM_WARPS


def _fused_linear(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None,
                  residual: torch.Tensor | None, eps: float, pdl: bool) -> torch.Tensor:
    """The op's body: x (R, K); weight (N, K) -> (R, N) in x's dtype."""
    if not x.is_cuda and not _INTERPRETED:
        raise RuntimeError("the fused linear kernel runs on CUDA tensors, or on the CPU under Triton's interpreter")
    R = x.shape[0]
    N, K = weight.shape
    if (R > MAX_ROWS or x.shape[1] != K or weight.stride(1) != 1
            or (norm_weight is not None and norm_weight.shape != (K,))
            or (residual is not None and residual.shape != (R, N))):
        raise ValueError(f"fused linear: x {tuple(x.shape)} (at most {MAX_ROWS} rows), weight {tuple(weight.shape)} "
                         f"(last dim contiguous), norm weight "
                         f"{None if norm_weight is None else tuple(norm_weight.shape)}, residual "
                         f"{None if residual is None else tuple(residual.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    out = torch.empty((R, N), dtype=x.dtype, device=x.device)
    bn, bk = blocks(N, K, _sms(x.device))
    block_r, warps = _row_block(R)
    _linear_kernel[(triton.cdiv(N, bn), triton.cdiv(R, block_r))](
        x, x if norm_weight is None else norm_weight, weight, out if residual is None else residual, out,
        R, N, K, eps, x.stride(0), weight.stride(0), 0 if residual is None else residual.stride(0), out.stride(0),
        NORM=norm_weight is not None, RESIDUAL=residual is not None,
        BLOCK_R=block_r, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **pdl_launch(x.device, pdl))
    return out


def _fused_qkv_rope(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, eps: float, tokens: int, rot_heads: int, pdl: bool) -> torch.Tensor:
    """The op's body: RMSNorm(x) (R, K) @ weight (N, K).T with the first rot_heads heads of the output rotated by
    cos, sin (B or 1, tokens, D); row r of x is token r % tokens of batch row r // tokens."""
    if not x.is_cuda and not _INTERPRETED:
        raise RuntimeError("the fused QKV kernel runs on CUDA tensors, or on the CPU under Triton's interpreter")
    R, K = x.shape
    N = weight.shape[0]
    D = cos.shape[-1]
    half = D // 2
    if (R > MAX_ROWS or R % tokens or weight.shape[1] != K or weight.stride(1) != 1 or norm_weight.shape != (K,)
            or D % 2 or half & (half - 1) or N % D or not 0 <= rot_heads <= N // D or sin.shape != cos.shape
            or cos.shape[-2] != tokens or cos.shape[0] not in (1, R // tokens) or cos.stride(-1) != 1
            or cos.stride() != sin.stride()):
        raise ValueError(f"fused QKV: x {tuple(x.shape)} (at most {MAX_ROWS} rows, {tokens} tokens a batch row), "
                         f"weight {tuple(weight.shape)}, norm weight {tuple(norm_weight.shape)}, cos "
                         f"{tuple(cos.shape)}, {rot_heads} rotated heads; the head dimension twice a power of two")
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty((R, N), dtype=x.dtype, device=x.device)
    bn, bk = blocks(N // 2, K, _sms(x.device))
    block_r, warps = _row_block(R)
    _qkv_rope_kernel[(triton.cdiv(N // 2, bn), triton.cdiv(R, block_r))](
        x, norm_weight, weight, cos, sin, out, R, tokens, N, K, eps, x.stride(0),
        weight.stride(0), out.stride(0), cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(-2), rot_heads,
        HALF=half, BLOCK_R=block_r, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **pdl_launch(x.device, pdl))
    return out


def _fused_gate_up_swiglu(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor,
                          eps: float, pdl: bool) -> torch.Tensor:
    """The op's body: silu(g) * u of [g | u] = RMSNorm(x) (R, K) @ weight (2F, K).T -> (R, F) in x's dtype."""
    if not x.is_cuda and not _INTERPRETED:
        raise RuntimeError("the fused gate-up kernel runs on CUDA tensors, or on the CPU under Triton's interpreter")
    R, K = x.shape
    N = weight.shape[0]
    if (R > MAX_ROWS or N % 2 or weight.shape[1] != K or weight.stride(1) != 1 or norm_weight.shape != (K,)):
        raise ValueError(f"fused gate-up: x {tuple(x.shape)} (at most {MAX_ROWS} rows), weight {tuple(weight.shape)} "
                         f"(gate rows then up rows, last dim contiguous), norm weight {tuple(norm_weight.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    F = N // 2
    out = torch.empty((R, F), dtype=x.dtype, device=x.device)
    bn, bk = blocks(F, K, _sms(x.device))
    block_r, warps = _row_block(R)
    _gate_up_swiglu_kernel[(triton.cdiv(F, bn), triton.cdiv(R, block_r))](
        x, norm_weight, weight, out, R, F, K, eps, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_R=block_r, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **pdl_launch(x.device, pdl))
    return out


if triton is not None and hasattr(torch.library, "custom_op"):  # torch >= 2.4
    _qkv_op = torch.library.custom_op(
        "recyclegpt::fused_qkv_rope", mutates_args=(),
        schema="(Tensor x, Tensor weight, Tensor norm_weight, Tensor cos, Tensor sin, float eps, int tokens, "
               "int rot_heads, bool pdl) -> Tensor",
    )(_fused_qkv_rope)

    @_qkv_op.register_fake
    def _(x, weight, norm_weight, cos, sin, eps, tokens, rot_heads, pdl):
        return x.new_empty((x.shape[0], weight.shape[0]))

    _op = torch.library.custom_op(
        "recyclegpt::fused_linear", mutates_args=(),
        schema="(Tensor x, Tensor weight, Tensor? norm_weight, Tensor? residual, float eps, bool pdl) -> Tensor",
    )(_fused_linear)

    @_op.register_fake
    def _(x, weight, norm_weight, residual, eps, pdl):
        return x.new_empty((x.shape[0], weight.shape[0]))

    _gate_up_op = torch.library.custom_op(
        "recyclegpt::fused_gate_up_swiglu", mutates_args=(),
        schema="(Tensor x, Tensor weight, Tensor norm_weight, float eps, bool pdl) -> Tensor",
    )(_fused_gate_up_swiglu)

    @_gate_up_op.register_fake
    def _(x, weight, norm_weight, eps, pdl):
        return x.new_empty((x.shape[0], weight.shape[0] // 2))
else:
    _op, _qkv_op, _gate_up_op = _fused_linear, _fused_qkv_rope, _fused_gate_up_swiglu


def linear(x: torch.Tensor, weight: torch.Tensor, *, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
           residual: torch.Tensor | None = None, pdl: bool = True) -> torch.Tensor:
    """[residual +] f(x) @ weight.T, where f is RMSNorm with `norm_weight` and `eps` (norm_weight given), or nothing.
    x (..., K); weight (N, K); residual (..., N); at most MAX_ROWS rows in all. pdl: programmatic dependent launch,
    where the device has it (triton_attention.pdl_launch)."""
    lead = x.shape[:-1]
    res = None if residual is None else residual.reshape(-1, residual.shape[-1])
    out = _op(x.reshape(-1, x.shape[-1]), weight, norm_weight, res, float(eps), pdl)
    return out.reshape(*lead, weight.shape[0])


def gate_up_swiglu(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, eps: float, *,
                   pdl: bool = True) -> torch.Tensor:
    """silu(gate) * up, where [gate | up] = RMSNorm(x) @ weight.T with `norm_weight` and `eps`: the fused gate-up
    product (weight (2F, K): the gate's rows, then the up's) with SwiGLU in its epilogue, rounded as `model.MLP`
    rounds it. x (..., K); returns (..., F), which the down product (`linear`) reads as it is."""
    lead = x.shape[:-1]
    out = _gate_up_op(x.reshape(-1, x.shape[-1]), weight, norm_weight, float(eps), pdl)
    return out.reshape(*lead, weight.shape[0] // 2)


def qkv_rope(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, eps: float,
             rope: tuple[torch.Tensor, torch.Tensor], rot_heads: int, *, pdl: bool = True) -> torch.Tensor:
    """RMSNorm(x) @ weight.T, its first rot_heads heads (the query and key heads of a fused QKV weight) rotated by
    rope = (cos, sin), each (B or 1, 1, T, D) as `model.rotary` makes them. x (B, T, K); returns (B, T, N)."""
    B, T, K = x.shape
    cos, sin = (c.reshape(c.shape[0], T, c.shape[-1]) for c in rope)
    out = _qkv_op(x.reshape(B * T, K), weight, norm_weight, cos, sin, float(eps), T, rot_heads, pdl)
    return out.view(B, T, weight.shape[0])
