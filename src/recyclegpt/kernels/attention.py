"""Decode attention in Triton: a few query rows against a static KV cache, for cached decode calls on CUDA.

A cached decode call attends R query rows (1 for a standard step, a few for a verification or a draft tree, times
the grouped-query factor) to L cached slots. That is pure bandwidth: each layer reads its K and V once. SDPA's
kernels are tuned for long queries and, measured on an H100, cost ~10 µs a layer where the bytes take <1 µs, and
change kernel (plus a Memset) from 1 to 2 rows. Here one program per (batch row, KV head, KV range) loads its query
rows once, streams its slots in blocks with an online softmax, and either writes the output (one range) or fp32
partials that a second small kernel merges (flash-decoding: few KV heads still fill the GPU). Block sizes and the
number of ranges depend on shapes only, so a call can be captured in a CUDA graph; it is a torch custom op, opaque
to torch.compile.

On the CPU it runs only under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported): the tests.
"""

from __future__ import annotations

import math

import torch

from .common import INTERPRETED as _INTERPRETED
from .common import after_previous, pdl_launch, tl, triton
from .common import available as available

MAX_BLOCK_R = 64  # query rows per program; more rows are split across programs (each re-reads the KV range)
TARGET_PROGRAMS = 256  # ~2 per SM of an H100: enough loads in flight to approach its bandwidth
BLOCK_N = 64  # KV slots per step of a program's loop
MIN_SLOTS = 64  # the fewest KV slots worth a program of their own (below it the merge costs more than it saves)
# the ticket merge (cached_attention) loads every range's partials at once, for the call's own rows only, when they
# hold at most MERGE_TILE_MAX values (the merge unrolled over the ranges), and sums them range by range in a fixed
# order; larger merges (more ranges or rows: SmolLM2's one-token step past 1,024 cached slots, a 5-token call from
# 320) load and merge them range by range in a loop, one L2 round trip each. Either form gives a row the same bits
# whatever the call's row count, as long as the KV ranges are the same (`plan`: up to MAX_BLOCK_R rows a KV head)
MERGE_TILE_MAX = 4096
# warps of a cached_attention program (up to 64 x 128 query values; larger tiles take 8). Compiled for sm_90a (ptxas,
# on the CPU; 2026-11-27), SmolLM2's kernel (16 x 64, a cache write, its first KV block loaded before the PDL wait)
# uses 255 registers at 4 warps and spills 480 bytes; at 8 warps it uses 254 and spills none. Measured on an H100
# (2026-11-27, an A/B of step profiles): standard 0.489 -> 0.485 ms, recycle 0.654 -> 0.657; the spills cost
# nothing that shows, so 4
CACHED_WARPS = 4


if triton is not None:
    LOG2E = tl.constexpr(1.4426950408889634)  # the kernels use exp2: exp(x) = exp2(x * log2(e))

    @triton.jit
    def merge_range(m_all, l_all, acc, Mx, Sm, Acc, at, ok, dims, D: tl.constexpr):
        # one KV range's partials for the rows at `at` folded into the running (max, sum, weighted values): the
        # rescaling of online softmax, in log2 units
        m_s = tl.load(Mx + at, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l_s = tl.load(Sm + at, mask=ok, other=0.0, cache_modifier=".cg")
        a_s = tl.load(Acc + at[:, None] * D + dims[None, :], mask=ok[:, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_all, m_s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: 0 rather than NaN
        w_all, w_s = tl.exp2(m_all - m_ref), tl.exp2(m_s - m_ref)
        return m_new, l_all * w_all + l_s * w_s, acc * w_all[:, None] + a_s * w_s[:, None]

    @triton.jit
    def _attn_kernel(Q, K, V, Mask, O, Acc, Mx, Sm, Kn, Vn, Pos, Tickets,
                     sqb, sqh, sqg, sqt, skb, skh, skn, svb, svh, svn, smb, smr, sob, soh, sog, sot, snb, snt, snh,
                     Hkv, R, T, L, per_split, n_rb, n_split, scale,
                     D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                     PRECISION: tl.constexpr, NEW: tl.constexpr, TP: tl.constexpr, TICKET: tl.constexpr,
                     MERGE_TILE: tl.constexpr, MR: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
        # grid ((b*Hkv + h)*n_rb + row block, KV range): BLOCK_R query rows against the range's slots [start, end).
        # Row g*T + t of KV head h is query head h*groups + g of token t (strides sqg, sqt).
        # NEW: the T new tokens' keys and values are read from Kn, Vn (b, t, h at strides snb, snt, snh) for their
        # slots Pos[t], and stored into the cache there by the range that holds the slot (row block 0 only). The
        # range's first block of cached keys and values loads before the wait, so that the longest load overlaps
        # the QKV product before it. Under PDL every kernel two or more launches back has finished by then (the one
        # before lets this one launch only after its own wait), and the cache's slots were written by earlier
        # steps' kernels or a commit's, with at least a QKV kernel in between; the new tokens' slots, which this
        # kernel writes, take Kn, Vn instead.
        # TICKET: the last range of a (b, h, row block) to finish merges the partials (no second kernel).
        pid, split = tl.program_id(0), tl.program_id(1)
        bh, rb = pid // n_rb, pid % n_rb
        b, h = bh // Hkv, bh % Hkv
        dims = tl.arange(0, D)
        k_base, v_base = K + b * skb + h * skh, V + b * svb + h * svh
        start = split * per_split
        end = tl.minimum(start + per_split, L)
        if NEW:
            first = start + tl.arange(0, BLOCK_N)
            first_ok = (first < end)[:, None]
            k_first = tl.load(k_base + first[:, None] * skn + dims[None, :], mask=first_ok, other=0.0)
            v_first = tl.load(v_base + first[:, None] * svn + dims[None, :], mask=first_ok, other=0.0)
        after_previous(PDL)  # (PDL: every other input may be the previous kernel's output)
        rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        q = tl.load(Q + b * sqb + h * sqh + (rows // T)[:, None] * sqg + (rows % T)[:, None] * sqt + dims[None, :],
                    mask=row_ok[:, None], other=0.0)
        m_base = Mask + b * smb + rows[:, None] * smr
        if NEW:
            toks = tl.arange(0, TP)
            pos = tl.load(Pos + toks, mask=toks < T, other=-1)  # the new tokens' slots; -1 matches no slot
            writer = (tl.zeros([BLOCK_N], tl.int32) + rb) == 0  # row block 0 stores (a vector: the interpreter
            # cannot combine a scalar bool with a vector mask)

        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)  # running max of the scores (log2 units)
        l_i = tl.zeros([BLOCK_R], tl.float32)  # running sum of exp2(score - m_i)
        acc = tl.zeros([BLOCK_R, D], tl.float32)  # running sum of exp2(score - m_i) * v
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < end
            if NEW:
                hit = cols[:, None] == pos[None, :]  # (N, TP): slot n holds new token t
                fresh = (tl.max(hit.to(tl.int32), 1) > 0) & col_ok
                t_of = tl.sum(tl.where(hit, toks[None, :], 0), 1)
                new_at = b * snb + t_of[:, None] * snt + h * snh + dims[None, :]
                kn = tl.load(Kn + new_at, mask=fresh[:, None], other=0.0)
                vn = tl.load(Vn + new_at, mask=fresh[:, None], other=0.0)
                if n0 == start:
                    k = tl.where(fresh[:, None], kn, k_first)
                    v = tl.where(fresh[:, None], vn, v_first)
                else:
                    old = col_ok & ~fresh
                    k = tl.load(k_base + cols[:, None] * skn + dims[None, :], mask=old[:, None], other=0.0) + kn
                    v = tl.load(v_base + cols[:, None] * svn + dims[None, :], mask=old[:, None], other=0.0) + vn
                write = (fresh & writer)[:, None] & (dims[None, :] < D)  # (N, D)
                tl.store(k_base + cols[:, None] * skn + dims[None, :], kn.to(K.dtype.element_ty), mask=write)
                tl.store(v_base + cols[:, None] * svn + dims[None, :], vn.to(V.dtype.element_ty), mask=write)
            else:
                k = tl.load(k_base + cols[:, None] * skn + dims[None, :], mask=col_ok[:, None], other=0.0)  # (N, D)
                v = tl.load(v_base + cols[:, None] * svn + dims[None, :], mask=col_ok[:, None], other=0.0)
            # padding rows and slots read -inf, so they add nothing
            bias = tl.load(m_base + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=float("-inf"))
            s = (tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale + bias.to(tl.float32)) * LOG2E  # (R, N)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row with no visible slot yet has m_new = -inf: subtract 0 instead, so exp2 gives 0 rather than NaN
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_ref)  # rescales what was summed under the old max
            p = tl.exp2(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        if SPLIT:  # fp32 partials (bh, split, row, ...) for _merge_kernel; a range with no visible slot has l = 0
            part = (bh * n_split + split) * R + rows
            tl.store(Acc + part[:, None] * D + dims[None, :], acc, mask=row_ok[:, None])
            tl.store(Mx + part, m_i, mask=row_ok)
            tl.store(Sm + part, l_i, mask=row_ok)
            if TICKET:
                # every thread's stores are issued before the ticket is taken (release); the last range's program
                # sees them all (acquire) and merges, reading around L1, then puts the ticket back to 0 for the
                # next call (a CUDA graph replays the same counter)
                tl.debug_barrier()
                ticket = tl.atomic_add(Tickets + pid, 1, sem="acq_rel")
                if ticket == n_split - 1:
                    # the ranges' partials folded in range order, by the same arithmetic in either form, so that a
                    # row gets the same bits whatever the call's row count (and so form). A tl.sum over a (ranges,
                    # rows, D) tile summed in an order set by the tile's layout, which changes with the row count:
                    # bf16 chains drifted from `standard` (2026-11-27: 8 of 20 prompts equal, 20 of 20
                    # without it)
                    if MERGE_TILE:  # at most MERGE_TILE_MAX values
                        # unrolled over BLOCK_S ranges (those past n_split masked: they multiply by 1 and add 0),
                        # for the MR rows the call has (not BLOCK_R, which tl.dot pads to 16 or more): the loads do
                        # not depend on the running sums, so they are in flight together
                        mrows = rb * BLOCK_R + tl.arange(0, MR)
                        mrow_ok = mrows < R
                        m_all = tl.full([MR], float("-inf"), tl.float32)
                        l_all = tl.zeros([MR], tl.float32)
                        vals = tl.zeros([MR, D], tl.float32)
                        for j in tl.static_range(BLOCK_S):
                            ok = mrow_ok & (tl.full([MR], j, tl.int32) < n_split)  # (a vector: see `writer`)
                            m_all, l_all, vals = merge_range(m_all, l_all, vals, Mx, Sm, Acc,
                                                            (bh * n_split + j) * R + mrows, ok, dims, D)
                    else:
                        # more: range by range in a loop, one L2 round trip each. Loading every range's partials at
                        # once for all BLOCK_R rows (a (ranges, 16, D) tile for 3 rows) was slower on an H100
                        # (2026-11-27: the standard step ~1,525 against ~1,635 tok/s)
                        mrows, mrow_ok = rows, row_ok
                        m_all = tl.full([BLOCK_R], float("-inf"), tl.float32)
                        l_all = tl.zeros([BLOCK_R], tl.float32)
                        vals = tl.zeros([BLOCK_R, D], tl.float32)
                        for s in range(0, n_split):
                            m_all, l_all, vals = merge_range(m_all, l_all, vals, Mx, Sm, Acc,
                                                            (bh * n_split + s) * R + rows, row_ok, dims, D)
                    tl.store(Tickets + pid, 0)
                    out = vals / tl.where(mrow_ok, l_all, 1.0)[:, None]
                    o = O + b * sob + h * soh + (mrows // T) * sog + (mrows % T) * sot
                    tl.store(o[:, None] + dims[None, :], out.to(O.dtype.element_ty), mask=mrow_ok[:, None])
        else:  # every row has a visible slot, so l_i > 0 (padding rows have 0: divide them by 1, they are not stored)
            out = acc / tl.where(row_ok, l_i, 1.0)[:, None]
            # row g*T + t of KV head h: query head h*groups + g of token t, at the output's strides (`_out_layout`)
            o = O + b * sob + h * soh + (rows // T) * sog + (rows % T) * sot
            tl.store(o[:, None] + dims[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _merge_kernel(Acc, Mx, Sm, O, sob, soh, sog, sot, Hkv, R, T, n_split, D: tl.constexpr,
                      BLOCK_S: tl.constexpr):
        # program bh*R + row: weigh each range's partials by exp2(its max - the overall max), sum, normalise
        pid = tl.program_id(0)
        bh, row = pid // R, pid % R
        b, h = bh // Hkv, bh % Hkv
        splits = tl.arange(0, BLOCK_S)
        ok = splits < n_split
        part = (bh * n_split + splits) * R + row
        m = tl.load(Mx + part, mask=ok, other=float("-inf"))
        w = tl.exp2(m - tl.max(m, 0))  # the overall max is finite: some range of the row has a visible slot
        total = tl.sum(tl.load(Sm + part, mask=ok, other=0.0) * w, 0)
        acc = tl.load(Acc + part[:, None] * D + tl.arange(0, D)[None, :], mask=ok[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / total
        o = O + b * sob + h * soh + (row // T) * sog + (row % T) * sot
        tl.store(o + tl.arange(0, D), out.to(O.dtype.element_ty))



def plan(B: int, Hkv: int, R: int, L: int, n_split: int = 0) -> tuple[int, int, int]:
    """(query rows a program, KV ranges, slots a range) for a call's shapes; n_split > 0 asks for that many ranges.

    By default enough ranges for ~TARGET_PROGRAMS programs, none shorter than MIN_SLOTS; each range is a whole
    number of BLOCK_N blocks, and none is empty.
    """
    block_r = min(MAX_BLOCK_R, max(16, triton.next_power_of_2(R)))  # tl.dot needs >= 16 rows
    if n_split <= 0:
        programs = B * Hkv * triton.cdiv(R, block_r)
        n_split = max(1, min(triton.cdiv(TARGET_PROGRAMS, programs), L // MIN_SLOTS))
    per_split = triton.cdiv(triton.cdiv(L, n_split), BLOCK_N) * BLOCK_N
    return block_r, triton.cdiv(L, per_split), per_split


def _out_shape(q: torch.Tensor, tokens: int) -> tuple[int, ...]:
    """(B, Hkv, R, D), or with tokens > 0 (B, tokens, Hkv * R // tokens, D): see `decode_attention`."""
    B, Hkv, R, D = q.shape
    return (B, Hkv, R, D) if tokens <= 0 else (B, tokens, Hkv * (R // tokens), D)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                      n_split: int, tokens: int) -> torch.Tensor:
    """The op's body: `decode_attention` with the scale given, n_split 0 for the heuristic's and tokens 0 for the
    (B, Hkv, R, D) output."""
    if not q.is_cuda and not _INTERPRETED:
        raise RuntimeError("decode_attention runs on CUDA tensors, or on the CPU under Triton's interpreter "
                           "(TRITON_INTERPRET=1 set before triton is imported)")
    B, Hkv, R, D = q.shape
    L = k.shape[2]
    if k.shape != (B, Hkv, L, D) or v.shape != k.shape or D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                         "k and v must be (B, Hkv, L, D) with D a power of two in 16..256")
    # the kernels index every dim but the last by stride: views of the cache and of a fused projection are read
    # in place; these copies happen only for a layout no caller has
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    mask = mask.expand(B, 1, R, L)  # broadcast dims get stride 0
    if mask.stride(-1) != 1:
        mask = mask.contiguous()

    if tokens > 0 and R % tokens:
        raise ValueError(f"decode_attention: {R} query rows are not a whole number of groups of {tokens} tokens")
    T = tokens if tokens > 0 else R
    out = torch.empty(_out_shape(q, tokens), dtype=q.dtype, device=q.device)
    # strides of (batch row, KV head, head within its group, token): row g*T + t of KV head h lands there
    so = (out.stride(0), out.stride(1), 0, out.stride(2)) if tokens <= 0 else \
        (out.stride(0), (R // T) * D, D, out.stride(1))
    sq = (q.stride(0), q.stride(1), T * q.stride(2), q.stride(2))  # row g*T + t read at g*T*stride + t*stride
    _launch(q, sq, k, v, mask, out, so, R, T, scale, n_split)
    return out


def _launch(q, sq, k, v, mask, out, so, R, T, scale, n_split, new=None, tickets=None, pdl=False) -> None:
    """Run the kernels for R query rows a KV head (at strides sq: batch row, KV head, head in group, token) into
    out (strides so); `new` = (kn, vn, pos, strides) for calls that also write the cache; `tickets` merges in the
    attention kernel instead of a second one; pdl: programmatic dependent launch for that one-kernel form."""
    B, Hkv, L, D = k.shape
    block_r, n_split, per_split = plan(B, Hkv, R, L, n_split)
    n_rb = triton.cdiv(R, block_r)
    if n_split > 1:
        acc = torch.empty((B * Hkv, n_split, R, D), dtype=torch.float32, device=q.device)
        mx, sm = torch.empty((2, B * Hkv, n_split, R), dtype=torch.float32, device=q.device)
    else:
        acc = mx = sm = out  # unused
    kn, vn, pos, sn = new if new is not None else (out, out, out, (0, 0, 0))  # unused without NEW
    ticket = tickets is not None and n_split > 1
    # the ticket merge's form (MERGE_TILE): every range's partials loaded at once when they are few enough
    mr, block_s = max(2, min(block_r, triton.next_power_of_2(R))), max(2, triton.next_power_of_2(n_split))
    merge_tile = ticket and block_s * mr * D <= MERGE_TILE_MAX
    # 8 warps for the largest tiles, whose fp32 acc would spill at 4; cached_attention's small ones CACHED_WARPS
    warps = 8 if block_r * D > 64 * 128 else CACHED_WARPS if new is not None else 4
    if ticket and tickets.numel() < B * Hkv * n_rb:
        raise ValueError(f"decode_attention: {tickets.numel()} tickets for {B * Hkv * n_rb} (row, head, row block)s")
    _attn_kernel[(B * Hkv * n_rb, n_split)](
        q, k, v, mask, out, acc, mx, sm, kn, vn, pos, tickets if ticket else out,
        *sq, k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), mask.stride(0), mask.stride(2), *so, *sn,
        Hkv, R, T, L, per_split, n_rb, n_split, scale,
        D=D, BLOCK_R=block_r, BLOCK_N=BLOCK_N, SPLIT=n_split > 1,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32; half types ignore it
        NEW=new is not None, TP=max(2, triton.next_power_of_2(T)) if new is not None else 2, TICKET=ticket,
        MERGE_TILE=merge_tile, MR=mr if merge_tile else 2, BLOCK_S=block_s if merge_tile else 2,
        num_warps=warps,
        **pdl_launch(q.device, new is not None and ticket and pdl))  # the one-kernel form (no merge kernel after)
    if n_split > 1 and not ticket:
        _merge_kernel[(B * Hkv * R,)](acc, mx, sm, out, *so, Hkv, R, T, n_split, D=D,
                                      BLOCK_S=max(2, triton.next_power_of_2(n_split)), num_warps=4)


def _cached_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tickets: torch.Tensor,
                      input_pos: torch.Tensor, mask: torch.Tensor, layer: int, n_head: int, scale: float,
                      n_split: int, pdl: bool) -> torch.Tensor:
    """The op's body: `cached_attention` with the scale given and n_split 0 for the heuristic's."""
    if not qkv.is_cuda and not _INTERPRETED:
        raise RuntimeError("cached_attention runs on CUDA tensors, or on the CPU under Triton's interpreter "
                           "(TRITON_INTERPRET=1 set before triton is imported)")
    B, T, W = qkv.shape
    n_layer, Bc, Hkv, S, D = k_cache.shape
    H, L = n_head, mask.shape[-1]
    R = (H // Hkv) * T
    if (W != (H + 2 * Hkv) * D or Bc != B or v_cache.shape != k_cache.shape or H % Hkv or not 0 <= layer < n_layer
            or L > S or D < 16 or D > 256 or D & (D - 1) or qkv.stride(-1) != 1 or input_pos.shape != (T,)
            or mask.dim() != 4 or mask.shape[1:3] != (1, R) or mask.shape[0] not in (1, B)):
        raise ValueError(f"cached_attention: qkv {tuple(qkv.shape)}, cache {tuple(k_cache.shape)}, input_pos "
                         f"{tuple(input_pos.shape)}, mask {tuple(mask.shape)}, layer {layer}, {n_head} query heads: "
                         "qkv must be (B, T, (H + 2 Hkv) D) with unit last stride, the cache (n_layer, B, Hkv, S, D) "
                         "with D a power of two in 16..256, input_pos (T,), the mask (B or 1, 1, H/Hkv*T, L <= S)")
    x = qkv.view(B, T, H + 2 * Hkv, D)
    mask = mask.expand(B, 1, R, L)
    if mask.stride(-1) != 1:
        mask = mask.contiguous()
    out = torch.empty((B, T, H * D), dtype=qkv.dtype, device=qkv.device)
    groups = H // Hkv
    sq = (x.stride(0), groups * x.stride(2), x.stride(2), x.stride(1))  # query head h*groups + g of token t
    so = (out.stride(0), groups * D, D, out.stride(1))
    new = (x[:, :, H:], x[:, :, H + Hkv:], input_pos, (x.stride(0), x.stride(1), x.stride(2)))
    _launch(x, sq, k_cache[layer, :, :, :L], v_cache[layer, :, :, :L], mask, out, so, R, T, scale, n_split, new,
            tickets, pdl)
    return out


if triton is not None and hasattr(torch.library, "custom_op"):  # torch >= 2.4
    # an opaque op for torch.compile: dynamo and inductor see its fake (shape and dtype) and call it as it is
    _op = torch.library.custom_op(
        "recyclegpt::decode_attention", mutates_args=(),
        schema="(Tensor q, Tensor k, Tensor v, Tensor mask, float scale, int n_split, int tokens) -> Tensor",
    )(_decode_attention)

    @_op.register_fake
    def _(q, k, v, mask, scale, n_split, tokens):
        return q.new_empty(_out_shape(q, tokens))
    _cached_op = torch.library.custom_op(
        "recyclegpt::cached_attention", mutates_args=("k_cache", "v_cache", "tickets"),
        schema="(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) tickets, Tensor input_pos, "
               "Tensor mask, int layer, int n_head, float scale, int n_split, bool pdl) -> Tensor",
    )(_cached_attention)

    @_cached_op.register_fake
    def _(qkv, k_cache, v_cache, tickets, input_pos, mask, layer, n_head, scale, n_split, pdl):
        return qkv.new_empty((qkv.shape[0], qkv.shape[1], n_head * k_cache.shape[-1]))
else:
    _op, _cached_op = _decode_attention, _cached_attention


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float | None = None, *, n_split: int | None = None,
                     tokens: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for a few query rows, accumulated in fp32; returns (B, Hkv, R, D) (or see
    `tokens`) in q's dtype.

    q: (B, Hkv, R, D), query rows per KV head (grouped-query heads folded into rows); last dim contiguous.
    k, v: (B, Hkv, L, D), typically views cache[layer, :, :, :L] of the static cache, read in place.
    mask: additive, (B or 1, 1, R, L): 0 visible, -inf masked; every row must see at least one slot.
    scale: default 1/sqrt(D). n_split: KV ranges per (batch row, KV head); default from the shapes (`plan`).
    tokens: T, when the rows are T tokens per query head (row g*T + t: token t of the group's g-th head); the output
    is then (B, T, Hkv * R // T, D), the layout the output projection reads, so that the usual transpose from
    (B, H, T, D) is written by the kernel instead of copied after it (a kernel a layer for T > 1).
    """
    if triton is None:
        raise RuntimeError("decode_attention needs triton (see available())")
    # the op for torch.compile; eagerly (and so in CUDA graphs of eager calls) the body, without the dispatcher's
    # per-call overhead
    fn = _op if torch.compiler.is_compiling() else _decode_attention
    return fn(q, k, v, mask, 1 / math.sqrt(q.shape[-1]) if scale is None else float(scale), n_split or 0,
              tokens or 0)


def cached_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tickets: torch.Tensor,
                     input_pos: torch.Tensor, mask: torch.Tensor, layer: int, n_head: int,
                     scale: float | None = None, *, n_split: int | None = None, pdl: bool = True) -> torch.Tensor:
    """A cached decode call's attention and cache write in one kernel: (B, T, H D), the output projection's input.

    qkv: (B, T, (H + 2 Hkv) D), the fused QKV product of T new tokens with the query and key heads rotated
    (`triton_linear.qkv_rope`). k_cache, v_cache: the whole (n_layer, B, Hkv, S, D) buffers; the new keys and values
    are stored at slots input_pos (T,) of `layer`, and every query row attends to slots [0, L) of that layer, L the
    mask's last dim (the new tokens' slots must lie below it). mask: additive, (B or 1, 1, H/Hkv * T, L), rows
    folded as in `decode_attention`. tickets: int32 zeros, one per (batch row, KV head, query-row block)
    (`KVCache.tickets` has room for 4 row blocks): the ranges of each count in on theirs and the last one merges, so
    the call is one kernel; they are zero again after. pdl: programmatic dependent launch (`pdl_launch`).

    The cache is mutated only through this op, so torch.compile keeps the buffers in place (a write into the cache
    followed by a separate read of it made inductor copy the whole cache, docs/engine.md).
    """
    if triton is None:
        raise RuntimeError("cached_attention needs triton (see available())")
    fn = _cached_op if torch.compiler.is_compiling() else _cached_attention
    return fn(qkv, k_cache, v_cache, tickets, input_pos, mask, layer, n_head,
              1 / math.sqrt(k_cache.shape[-1]) if scale is None else float(scale), n_split or 0, pdl)
