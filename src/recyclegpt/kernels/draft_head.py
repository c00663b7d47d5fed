"""The module's draft head and its top-k in one Triton kernel, for the draft tree's levels on CUDA.

Each drafting call of the tree ends in the shared final norm, the LM head over the draft vocabulary (16,384 rows for
the shipped module) and a top-k with log-probabilities (`RecycleModel.draft_top`). Compiled, that is a norm kernel,
cuBLAS's product and four or five reductions of the sort-free top-k, in every one of a round's five module calls.
Here one kernel does the norm, the product and a first selection: program j normalises the rows (RMSNorm in the
order `model.RMSNorm` uses), multiplies them by vocabulary rows [j*BLOCK_V, (j+1)*BLOCK_V), and keeps per row its
block's KTOP best logits with their ids, and the block's max and sum of exp(logit - max). A second small kernel,
one program a row, then merges the blocks: the log-sum-exp of the blocks for the log-probabilities, and the k best
of the n_blocks*KTOP candidates. The k best of a row are among the candidates because each block contributes its
KTOP >= k best.

Both kernels are torch custom ops (opaque to torch.compile, captured in CUDA graphs as they are); on the CPU they
run only under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported), for the tests.
"""

from __future__ import annotations

import torch

from .common import INTERPRETED as _INTERPRETED
from .common import available as available
from .common import tl, triton

BLOCK_V = 128  # vocabulary rows a program: 128 programs for 16,384 rows, ~1 per SM of an H100
BLOCK_K = 64  # the model dimension is read in steps of this many
BLOCK_R = 16  # rows (tokens) a program, padded: tl.dot needs 16
KTOP = 4  # candidates a block keeps per row; k may not exceed it
# launch settings: a 2026-11-27 sweep (`scripts/draft_head_bench.py`, H100) found these within 2% of the
# best of 36 (11.27 against 11.09 us for one row), so they stay
NUM_WARPS = 4


if triton is not None:
    from .linear import inv_rms, rms_normed

    @triton.jit
    def _head_top_kernel(X, NW, W, Val, Idx, Mx, Se, R, V, K, n_blocks, eps, sxr, swv,
                         KTOP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                         PRECISION: tl.constexpr):
        # grid (vocabulary block, row block)
        vb, rb = tl.program_id(0), tl.program_id(1)
        rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        inv = inv_rms(X, rows, row_ok, K, eps, sxr, BLOCK_R, BLOCK_K)
        acc = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            x = tl.load(X + rows[:, None] * sxr + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            xn = rms_normed(x, NW, ks, k_ok, inv).to(W.dtype.element_ty)
            w = tl.load(W + cols[:, None] * swv + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(xn, tl.trans(w), input_precision=PRECISION)
        acc = tl.where(col_ok[None, :], acc, float("-inf"))
        part = rows * n_blocks + vb
        m = tl.max(acc, 1)  # finite: every block has a valid column
        tl.store(Mx + part, m, mask=row_ok)
        tl.store(Se + part, tl.sum(tl.exp(acc - m[:, None]), 1), mask=row_ok)
        offs = tl.arange(0, BLOCK_V)
        for j in tl.static_range(KTOP):
            # the best left; ties to the lower column. A block with fewer than KTOP valid columns repeats a -inf
            # candidate, which the merge never picks while the row has k finite logits
            best = tl.argmax(acc, 1)
            tl.store(Val + part * KTOP + j, tl.max(acc, 1), mask=row_ok)
            tl.store(Idx + part * KTOP + j, vb * BLOCK_V + best, mask=row_ok)
            acc = tl.where(offs[None, :] == best[:, None], float("-inf"), acc)

    @triton.jit
    def _merge_kernel(Val, Idx, Mx, Se, LogP, Ids, NC, NB, KOUT: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_B: tl.constexpr):
        # one program a row: the log-sum-exp of its blocks, then its KOUT best of the NC = n_blocks*KTOP candidates
        r = tl.program_id(0)
        b = tl.arange(0, BLOCK_B)
        mx = tl.load(Mx + r * NB + b, mask=b < NB, other=float("-inf"))
        se = tl.load(Se + r * NB + b, mask=b < NB, other=0.0)
        m = tl.max(mx, 0)
        lse = m + tl.log(tl.sum(se * tl.exp(mx - m), 0))
        c = tl.arange(0, BLOCK_C)
        val = tl.load(Val + r * NC + c, mask=c < NC, other=float("-inf"))
        for j in tl.static_range(KOUT):
            # candidates run in vocabulary order among equals (blocks in order, ties to the lower column within
            # one), so the first maximum is the lowest id, as a stable top-k of the logits gives it
            best = tl.argmax(val, 0)
            tl.store(LogP + r * KOUT + j, tl.max(val, 0) - lse)
            tl.store(Ids + r * KOUT + j, tl.load(Idx + r * NC + best))
            val = tl.where(c == best, float("-inf"), val)



def _head_top_blocks(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, eps: float, block_v: int,
                     block_k: int, num_warps: int, num_stages: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's body: x (R, K), weight (V, K) -> per row and vocabulary block the KTOP best logits (R, nb, KTOP)
    float32, their ids (R, nb, KTOP) int64, the block's max (R, nb) and sum of exp(logit - max) (R, nb)."""
    if not x.is_cuda and not _INTERPRETED:
        raise RuntimeError("the draft-head kernel runs on CUDA tensors, or on the CPU under Triton's interpreter")
    R, K = x.shape
    V = weight.shape[0]
    if weight.shape[1] != K or norm_weight.shape != (K,) or weight.stride(1) != 1:
        raise ValueError(f"draft head kernel: x {tuple(x.shape)}, weight {tuple(weight.shape)} (last dim contiguous), "
                         f"norm weight {tuple(norm_weight.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    nb = triton.cdiv(V, block_v)
    val = torch.empty((R, nb, KTOP), dtype=torch.float32, device=x.device)
    idx = torch.empty((R, nb, KTOP), dtype=torch.int64, device=x.device)
    mx = torch.empty((R, nb), dtype=torch.float32, device=x.device)  # separate buffers: outputs may not alias
    se = torch.empty((R, nb), dtype=torch.float32, device=x.device)
    _head_top_kernel[(nb, triton.cdiv(R, BLOCK_R))](
        x, norm_weight, weight, val, idx, mx, se, R, V, K, nb, eps, x.stride(0), weight.stride(0),
        KTOP=KTOP, BLOCK_R=BLOCK_R, BLOCK_V=block_v, BLOCK_K=block_k,
        PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",  # fp32 stays fp32
        num_warps=num_warps, **({"num_stages": num_stages} if num_stages else {}))
    return val, idx, mx, se


def _merge_blocks(val: torch.Tensor, idx: torch.Tensor, mx: torch.Tensor, se: torch.Tensor, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge op's body: the blocks of `_head_top_blocks` -> (log-probabilities (R, k) float32, ids (R, k))."""
    if not val.is_cuda and not _INTERPRETED:
        raise RuntimeError("the draft-head merge kernel runs on CUDA tensors, or on the CPU under Triton's interpreter")
    R, nb, ktop = val.shape
    logp = torch.empty((R, k), dtype=torch.float32, device=val.device)
    ids = torch.empty((R, k), dtype=torch.int64, device=val.device)
    _merge_kernel[(R,)](val, idx, mx, se, logp, ids, nb * ktop, nb, KOUT=k,
                        BLOCK_C=triton.next_power_of_2(nb * ktop), BLOCK_B=triton.next_power_of_2(nb), num_warps=4)
    return logp, ids


if triton is not None and hasattr(torch.library, "custom_op"):  # torch >= 2.4
    _op = torch.library.custom_op(
        "recyclegpt::draft_head_top", mutates_args=(),
        schema="(Tensor x, Tensor norm_weight, Tensor weight, float eps, int block_v, int block_k, int num_warps, "
               "int num_stages) -> (Tensor, Tensor, Tensor, Tensor)",
    )(_head_top_blocks)

    @_op.register_fake
    def _(x, norm_weight, weight, eps, block_v, block_k, num_warps, num_stages):
        R, nb = x.shape[0], -(-weight.shape[0] // block_v)
        return (x.new_empty((R, nb, KTOP), dtype=torch.float32), x.new_empty((R, nb, KTOP), dtype=torch.int64),
                x.new_empty((R, nb), dtype=torch.float32), x.new_empty((R, nb), dtype=torch.float32))

    _merge_op = torch.library.custom_op(
        "recyclegpt::draft_head_merge", mutates_args=(),
        schema="(Tensor val, Tensor idx, Tensor mx, Tensor se, int k) -> (Tensor, Tensor)",
    )(_merge_blocks)

    @_merge_op.register_fake
    def _(val, idx, mx, se, k):
        R = val.shape[0]
        return val.new_empty((R, k), dtype=torch.float32), val.new_empty((R, k), dtype=torch.int64)
else:
    _op, _merge_op = _head_top_blocks, _merge_blocks


def head_top_k(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, k: int, *,
               block_v: int = BLOCK_V, block_k: int = BLOCK_K, num_warps: int = NUM_WARPS, num_stages: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best rows of `weight` for RMSNorm(x): (log-probabilities (..., k) float32, row ids (..., k) int64), best
    first, the log-softmax taken over all V rows. x (..., K); weight (V, K); k <= KTOP. block_v, block_k,
    num_warps, num_stages (0: Triton's default): the launch, for scripts/draft_head_bench.py's sweep."""
    if k > KTOP:
        raise ValueError(f"the draft-head kernel keeps {KTOP} candidates a block; top-{k} asked")
    lead = x.shape[:-1]
    val, idx, mx, se = _op(x.reshape(-1, x.shape[-1]), norm_weight, weight, float(eps), block_v, block_k, num_warps,
                           num_stages)
    logp, ids = _merge_op(val, idx, mx, se, k)
    return logp.reshape(*lead, k), ids.reshape(*lead, k)
