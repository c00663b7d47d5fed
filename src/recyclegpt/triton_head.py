"""The module's greedy token in one Triton kernel: the shared final norm, the LM head's product and the argmax.

In `recycle`'s greedy step the module's token is argmax(lm_head(norm(out))) over the module's output `out`. Compiled,
that is a norm kernel, cuBLAS's product over the whole head (49,152 x 576 for SmolLM2: 56.6 MB, 22.6 µs of a 0.59 ms
step on an H100) and two reductions for the argmax (`topk.split_argmax`). Here one kernel does all of it. Program j
takes vocabulary rows [b*BLOCK_V, (b+1)*BLOCK_V) for its block b, RMS-normalises the rows of `out` (as
`model.RMSNorm` does, in `triton_linear`'s helpers), multiplies, rounds each logit to the activations' dtype (as
the product's output is rounded) and keeps per row its block's best logit and the first row holding it. Then it
takes a ticket; the last program of the launch reads every block's best and writes the token: the first block
holding the overall maximum gives the first index among equal maxima, as `torch.argmax` does. It puts the ticket
back to 0 for the next call (a CUDA graph replays the same counter), as `triton_attention`'s merge does.

Two choices for the head's bytes, both switches of this module:
- `REVERSE`: the blocks run from the vocabulary's end to its start. In a recycle step the base's head reads the same
  weight (tied) a few kernels earlier, front to back; read back to front, the module's head starts on the rows the
  base read last, which may still be in the card's 50 MB L2.
- `ids` with `gather=True`: the head is a subset of the weight's rows, named by sorted ids (the module's draft
  vocabulary), read in place from the tied weight instead of from a copy of those rows, so that the L2 reuse above
  applies to it too. The token is the id, not the subset's index.

Measured on an H100 (eighteenth session; docs/engine.md): slower than what it replaces, so `model.HEAD_ARGMAX_KERNEL`
is off. Over the full head at one row it took 36.7 µs at its best shape (32 x 256, 4 warps) where the operators took
28.7 (`scripts/head_bench.py`), and 44.9 µs in the profiled recycle step against cuBLAS's 22.5 for the product
alone: its CUDA-core products reach ~1.5 TB/s where cuBLAS's tensor-core GEMV (384 x 8 tiles) reaches ~2.5. The
block order made no difference (36.7 / 37.2 µs; recycle step 0.607 / 0.605 ms).

A torch custom op (opaque to torch.compile, captured in CUDA graphs as it is); on the CPU it runs only under
Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported), for the tests. Its logits are summed in
another order than cuBLAS's, so a near-tie may go the other way than in `lm_head(norm(out)).argmax(-1)`: every
greedy `recycle` path (the engine's and the reference loop, `RecycleModel.module_argmax`) takes the same route.
"""

from __future__ import annotations

import torch

from .triton_attention import after_previous, pdl_launch, triton, tl

MAX_ROWS = 4  # rows (batch rows of a decode step) a call may have: one program holds them all
# vocabulary rows a program and the K step. BLOCK_V * BLOCK_K = 16,384 weight elements a step, as triton_linear's
# TILE; the first step's weights load before the PDL wait
BLOCK_V = 64
BLOCK_K = 256
NUM_WARPS = 4
REVERSE = True
MAX_BLOCKS = 4096  # the last program reads every block's best at once


def available() -> bool:
    return triton is not None


if triton is not None:
    from .triton_linear import inv_rms, product, x_block

    @triton.jit
    def _head_argmax_kernel(X, NW, W, Ids, Best, At, Tickets, Out, R, V, K, n_blocks, eps, sxr, swv,
                            GATHER: tl.constexpr, MAP_IDS: tl.constexpr, REVERSE: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_B: tl.constexpr, PDL: tl.constexpr):
        pid = tl.program_id(0)
        vb = n_blocks - 1 - pid if REVERSE else pid  # this program's vocabulary block
        v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        v_ok = v < V
        if GATHER:  # vocabulary entry v is weight row Ids[v]
            wrow = tl.load(Ids + v, mask=v_ok, other=0)
        else:
            wrow = v
        # the first K step's weights: no kernel writes them, so they load before the wait
        ks = tl.arange(0, BLOCK_K)
        w_first = tl.load(W + wrow[:, None] * swv + ks[None, :], mask=v_ok[:, None] & (ks < K)[None, :], other=0.0)
        after_previous(PDL)
        rows = tl.arange(0, BLOCK_R)
        row_ok = rows < R
        inv = inv_rms(X, rows, row_ok, K, eps, sxr, BLOCK_R, BLOCK_K)
        acc = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            xn = x_block(X, NW, rows, row_ok, ks, k_ok, K, sxr, inv, True, False)  # RMS-normalised
            if k0 == 0:
                w = w_first
            else:
                w = tl.load(W + wrow[:, None] * swv + ks[None, :], mask=v_ok[:, None] & k_ok[None, :], other=0.0)
            acc = product(acc, xn, w, False, "ieee")
        # each logit rounded to the activations' dtype, as the product's output is, before the comparison
        logit = acc.to(X.dtype.element_ty).to(tl.float32)
        logit = tl.where(v_ok[None, :], logit, float("-inf"))
        part = rows * n_blocks + vb
        tl.store(Best + part, tl.max(logit, 1), mask=row_ok)
        tl.store(At + part, vb * BLOCK_V + tl.argmax(logit, 1, tie_break_left=True), mask=row_ok)
        # every thread's stores are issued before the ticket is taken (release); the last program sees them all
        # (acquire) and reads them around L1
        tl.debug_barrier()
        ticket = tl.atomic_add(Tickets, 1, sem="acq_rel")
        if ticket == n_blocks - 1:
            b = tl.arange(0, BLOCK_B)
            ok = row_ok[:, None] & (b < n_blocks)[None, :]
            best = tl.load(Best + rows[:, None] * n_blocks + b[None, :], mask=ok, other=float("-inf"),
                           cache_modifier=".cg")
            jb = tl.argmax(best, 1, tie_break_left=True)  # the first block holding the maximum
            idx = tl.load(At + rows * n_blocks + jb, mask=row_ok, other=0, cache_modifier=".cg")
            if MAP_IDS:
                idx = tl.load(Ids + idx, mask=row_ok, other=0)
            tl.store(Out + rows, idx.to(tl.int64), mask=row_ok)
            tl.atomic_xchg(Tickets, 0)

    _INTERPRETED = not isinstance(_head_argmax_kernel, triton.runtime.jit.JITFunction)
else:
    _INTERPRETED = False


def _head_argmax(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor | None,
                 tickets: torch.Tensor, eps: float, gather: bool) -> torch.Tensor:
    """The op's body: x (R, K) -> (R,) int64, see `head_argmax`."""
    if not x.is_cuda and not _INTERPRETED:
        raise RuntimeError("the head-argmax kernel runs on CUDA tensors, or on the CPU under Triton's interpreter")
    R, K = x.shape
    V = ids.shape[0] if ids is not None else weight.shape[0]
    n_blocks = triton.cdiv(V, BLOCK_V)
    if (not 0 < R <= MAX_ROWS or weight.shape[1] != K or weight.stride(1) != 1 or norm_weight.shape != (K,)
            or (gather and ids is None) or n_blocks > MAX_BLOCKS or tickets.dtype != torch.int32
            or tickets.numel() < 1):
        raise ValueError(f"head argmax: x {tuple(x.shape)} (1 to {MAX_ROWS} rows), weight {tuple(weight.shape)} "
                         f"(last dim contiguous), norm weight {tuple(norm_weight.shape)}, ids "
                         f"{None if ids is None else tuple(ids.shape)} (needed to gather), at most "
                         f"{MAX_BLOCKS * BLOCK_V} vocabulary entries, an int32 ticket")
    x = x if x.stride(1) == 1 else x.contiguous()
    best = torch.empty((R, n_blocks), dtype=torch.float32, device=x.device)
    at = torch.empty((R, n_blocks), dtype=torch.int32, device=x.device)
    out = torch.empty((R,), dtype=torch.int64, device=x.device)
    _head_argmax_kernel[(n_blocks,)](
        x, norm_weight, weight, x if ids is None else ids, best, at, tickets, out, R, V, K, n_blocks, eps,
        x.stride(0), weight.stride(0), GATHER=gather, MAP_IDS=ids is not None, REVERSE=REVERSE,
        BLOCK_R=triton.next_power_of_2(R), BLOCK_V=BLOCK_V, BLOCK_K=BLOCK_K,
        BLOCK_B=triton.next_power_of_2(n_blocks), num_warps=NUM_WARPS, **pdl_launch(x.device))
    return out


if triton is not None and hasattr(torch.library, "custom_op"):  # torch >= 2.4
    _op = torch.library.custom_op(
        "recyclegpt::head_argmax", mutates_args=("tickets",),
        schema="(Tensor x, Tensor norm_weight, Tensor weight, Tensor? ids, Tensor(a!) tickets, float eps, "
               "bool gather) -> Tensor",
    )(_head_argmax)

    @_op.register_fake
    def _(x, norm_weight, weight, ids, tickets, eps, gather):
        return x.new_empty((x.shape[0],), dtype=torch.int64)
else:
    _op = _head_argmax


def head_argmax(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, tickets: torch.Tensor,
                ids: torch.Tensor | None = None, gather: bool = False) -> torch.Tensor:
    """argmax over the head's rows of RMSNorm(x) @ weight.T, the first index among equal maxima: token ids (...,)
    int64. x (..., K), at most MAX_ROWS rows in all; weight (V, K). ids: sorted token ids of a sub-vocabulary; the
    result is ids[argmax], where the head is `weight` itself (a copy of those rows) or, with gather, weight[ids].
    tickets: an int32 counter at 0, owned by the caller (`KVCache.head_tickets`), back at 0 after the call."""
    lead = x.shape[:-1]
    return _op(x.reshape(-1, x.shape[-1]), norm_weight, weight, ids, tickets, float(eps), gather).reshape(lead)
