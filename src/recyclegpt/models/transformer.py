"""The LLaMA-family decoder (`Transformer`) in plain PyTorch, and the pieces the recyclable module shares with it
(`Block`, `KVCache`, `run_blocks`, the fused-kernel dispatch).

One forward serves training and cached decoding. Without a cache, attention is causal SDPA over the input. With a
static `KVCache`, the new keys and values are written at the explicit slots `input_pos` and attention reads the
slots below `kv_end` through a mask built from `input_pos` (and, for left-padded batches, `pad`). Nothing here
does I/O, sampling or device placement.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import KernelConfig, ModelConfig
from ..kernels import attention as triton_attention
from ..kernels import draft_head as triton_draft_head
from ..kernels import linear as triton_linear

if TYPE_CHECKING:
    from .quantize import Int8Weight


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (B, T', V): T' = T, or the last `num_logits` positions
    hidden: torch.Tensor  # (B, T, d): the last layer's output, before the final norm
    taps: torch.Tensor | None = None  # (B, T, k*d): the outputs of the layers asked for with `taps`, side by side


class KVCache:
    """Static key/value buffers for a stack of layers, allocated once: k, v are (n_layer, B, n_kv_head, S, D).

    Slots are written at explicit positions; nothing tracks a cursor. A rejected or stale slot costs nothing: it
    is overwritten when its position is next written, and masked out until then.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # index tensors that address (layer, row, head) in the whole buffer, for `write`
        self._layer = torch.arange(n_layer, device=device).view(n_layer, 1, 1, 1)
        self._row = torch.arange(batch, device=device).view(batch, 1, 1)
        self._head = torch.arange(n_kv_head, device=device).view(1, n_kv_head, 1)
        # counters of triton_attention.cached_attention (the attention that also writes the cache): zero between
        # calls; room for 4 query-row blocks per (row, head)
        self.tickets = torch.zeros(batch * n_kv_head * 4, device=device, dtype=torch.int32)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              kv_end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) at slots `input_pos` (T,); return the keys and values of slots [0, kv_end).

        Under torch.compile the write indexes the whole buffer: a write through the view `k[layer]` was rebuilt
        as a copy of the layer's buffer plus a copy of the whole cache back into place, on every call (two thirds
        of a compiled 1.3B-shape step's element-wise time on an H100: docs/engine.md), where this form is
        updated in place. Eagerly (and in CUDA graphs of eager kernels) `index_copy_` on the layer's view is one
        kernel where `index_put_` takes several.
        """
        if torch.compiler.is_compiling():
            idx = (self._layer[layer], self._row, self._head, input_pos.view(1, 1, -1))
            self.k.index_put_(idx, k)
            self.v.index_put_(idx, v)
        else:
            self.k[layer].index_copy_(2, input_pos, k)
            self.v[layer].index_copy_(2, input_pos, v)
        return self.k[layer, :, :, :kv_end], self.v[layer, :, :, :kv_end]

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy, in every layer, row b's slot src[b, j] to slot dst[j]: src (B, n) per row, dst (n,) shared.

        How a verified draft tree commits its accepted path: the path's nodes sit in scattered slots and move to
        the contiguous slots that follow the committed prefix. The sources are read before any slot is written.
        """
        rows = torch.arange(self.batch, device=src.device)[:, None]
        dst = dst[None].expand_as(src)
        self.k[:, rows, :, dst] = self.k[:, rows, :, src]
        self.v[:, rows, :, dst] = self.v[:, rows, :, src]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised in float32, cast back, then scaled (the LLaMA / Hugging Face order, so bf16 results match)."""
        if not torch.compiler.is_compiling():
            # one operator where the spelled-out form is five (one kernel on CUDA since torch 2.8): CUDA graphs of
            # eager kernels launch ~4 fewer a norm. Under torch.compile the spelled-out form stays, which inductor
            # fuses with the residual add around it (measured that way, docs/engine.md)
            xf = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        else:
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotary(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B or 1, 1, T, head_dim) for integer positions (B or 1, T), in the rotate-half layout.

    Computed in float32 on every call (a few tiny kernels) so that a bf16 model keeps exact frequencies.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


FEW_ROWS = 32  # products with at most this many rows may take `linear`'s transposed CPU form
# an int8 model's cached calls attend over their slots rounded up to a multiple of this many (`RowPlan`)
ROW_BUCKET = 64


def round_up(n: int, m: int) -> int:
    """n rounded up to a multiple of m."""
    return -(-n // m) * m


def linear(x: torch.Tensor, weight: torch.Tensor, kernels: KernelConfig = KernelConfig(),
           int8: Int8Weight | None = None) -> torch.Tensor:
    """x @ weight.T, as F.linear; on the CPU, for decoding's few-row products, possibly as (weight @ x.T).T.

    Without autograd, in float32 on the CPU, for at most FEW_ROWS rows (a decode step, a verification, a draft
    tree) and a row-major weight, `kernels.cpu_products` picks the form (see KernelConfig): the transposed "tall"
    product (many weight rows, a few columns; a single row doubled, since BLAS's one-column path is slower than its
    two-column one) or F.linear's. Which is faster depends on the CPU's BLAS paths (docs/cpu.md).
    int8: the weight's int8 form (`quantize.quantize_int8_`); where given, the product is its weight-only int8
    product for every row count, and `weight` is not read.
    """
    if int8 is not None:
        return int8(x)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (x.device.type != "cpu" or x.dtype != torch.float32 or not 0 < rows <= FEW_ROWS
            or torch.is_grad_enabled() or not weight.is_contiguous() or not _transposed(kernels.cpu_products)):
        return F.linear(x, weight)
    return _transposed_product(x.reshape(rows, x.shape[-1]), weight).reshape(*x.shape[:-1], weight.shape[0])


def _transposed_product(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    rows = x2.shape[0]
    x2 = torch.cat((x2, x2)) if rows == 1 else x2.contiguous()
    return (weight @ x2.t()).t()[:rows]


def _transposed(choice: str) -> bool:
    return choice == "transposed" or (choice == "auto" and transposed_faster())


_MEASURED: dict[str, bool] = {}  # transposed_faster's one measurement per process


def transposed_faster() -> bool:
    """Whether this CPU runs few-row float32 products faster as (W @ x.T).T than as F.linear, measured once per
    process at the current thread count: 1 and 4 rows against a 2048 x 576 weight, the best of 5 rounds of 10 calls
    each form. The transposed form is taken only when it is at least 1.5x faster, so that a near tie does not flip
    between processes (the two forms round differently). The answer is kept in a plain dict, which torch.compile
    reads as a constant once it is there (it traces through functools' caches); engines on the CPU measure before
    they compile anything."""
    if "cpu" not in _MEASURED:
        _MEASURED["cpu"] = _measure_transposed()
    return _MEASURED["cpu"]


def _measure_transposed() -> bool:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2048, 576, generator=gen)
    xs = [torch.randn(r, 576, generator=gen) for r in (1, 4)]

    def best(fn) -> float:
        times = []
        for _ in range(6):  # the first round warms up
            t = time.perf_counter()
            for _ in range(10):
                for x in xs:
                    fn(x)
            times.append(time.perf_counter() - t)
        return min(times[1:])

    with torch.no_grad():
        return best(lambda x: _transposed_product(x, w)) * 1.5 <= best(lambda x: F.linear(x, w))


class Linear(nn.Linear):
    """A bias-free nn.Linear whose forward is `linear` (its CPU few-row forms); same parameters and state dict.
    `int8`: the weight's int8 form once `quantize.quantize_int8_` has run (its products then take it), else None."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        if bias:
            raise ValueError("the model's Linear layers have no bias")
        super().__init__(in_features, out_features, bias=False)
        self.register_module("int8", None)

    def forward(self, x: torch.Tensor, kernels: KernelConfig = KernelConfig()) -> torch.Tensor:
        return linear(x, self.weight, kernels, self.int8)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.register_buffer("wqkv", None, persistent=False)  # set by fuse_projections (inference)
        self.register_module("wqkv_int8", None)  # its int8 form: quantize_int8_

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: KVCache | None, layer: int, input_pos: torch.Tensor | None, kv_end: int,
                kernels: KernelConfig) -> torch.Tensor:
        if self.wqkv is not None and not torch.is_grad_enabled():  # one matmul instead of three
            y = self.attend(linear(x, self.wqkv, kernels, self.wqkv_int8), rope, mask, cache, layer, input_pos,
                            kv_end, kernels)
            return self.wo(y, kernels)
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.wq(x, kernels).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x, kernels).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x, kernels).view(B, T, Hkv, D).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return self.wo(self._attend(q, k, v, mask, cache, layer, input_pos, kv_end, kernels), kernels)

    def attend(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
               cache: KVCache | None, layer: int, input_pos: torch.Tensor | None, kv_end: int,
               kernels: KernelConfig, rotated: bool = False) -> torch.Tensor:
        """The attention of the fused QKV product's output qkv (B, T, (H + 2 Hkv) D): (B, T, H D), before wo.
        rotated: the query and key heads of qkv are rotated already (triton_linear.qkv_rope)."""
        B, T, _ = qkv.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        if rotated and cache is not None and use_cached_attention(qkv, mask, T, H // Hkv, D, kernels):
            # the cache write and the attention as one kernel (triton_attention.cached_attention)
            return triton_attention.cached_attention(qkv, cache.k, cache.v, cache.tickets, input_pos, mask, layer, H,
                                                     pdl=kernels.pdl)
        qkv = qkv.view(B, T, H + 2 * Hkv, D).transpose(1, 2)  # (B, H + 2 Hkv, T, D)
        qk = qkv[:, :H + Hkv] if rotated else apply_rotary(qkv[:, :H + Hkv], *rope)  # one pass over both
        q, k = qk.split((H, Hkv), dim=1)
        return self._attend(q, k, qkv[:, H + Hkv:], mask, cache, layer, input_pos, kv_end, kernels)

    def _attend(self, q, k, v, mask, cache, layer, input_pos, kv_end, kernels: KernelConfig) -> torch.Tensor:
        B, H, T, D = q.shape
        Hkv = self.n_kv_head
        if cache is not None:
            k, v = cache.write(layer, input_pos, k, v, kv_end)  # (B, Hkv, kv_end, D)
        groups = H // Hkv  # grouped-query attention: each kv head serves `groups` query heads
        if isinstance(mask, RowPlan):  # an int8 model's cached call on few tokens: rows in a step's form
            q = q.reshape(B, Hkv, groups * T, D) if groups > 1 else q
            return mask.attend(q, k, v).reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)
        folded = mask is not None and mask.shape[-2] == groups * T
        if groups > 1 and folded:
            # the query heads of a group become more rows of one query, against the group's keys and values as
            # stored (no copy of them); `attention_mask` repeated the mask's rows to match
            q = q.reshape(B, Hkv, groups * T, D)
        elif groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if folded and use_decode_kernel(q, mask, T, kernels):  # written as (B, T, H, D): no transpose to copy
            return triton_attention.decode_attention(q, k, v, mask, tokens=T).view(B, T, H * D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return y.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)

    @property
    def by_row(self) -> bool:
        """Whether cached calls on few tokens attend each query row in the form of a decode step at its slot
        (`RowPlan`): in int8 models (`quantize.quantize_int8_`), whose bfloat16 roundings would turn the last-bit
        differences between a batched attention and a step's into different tokens."""
        return self.wqkv_int8 is not None or self.wq.int8 is not None


class RowPlan:
    """How an int8 model's cached call attends where its mask has the query heads folded (T <= FOLD_MAX_TOKENS
    tokens; any T without grouped queries): made once per call by `_stack`, read by every layer in place of the
    mask. Each query row attends in the form a one-token call at its slot takes: over the slots below its slot + 1
    rounded up to ROW_BUCKET (`run_blocks` rounds kv_end to match), those past its own masked. SDPA's sums over the
    slots change with the length of a masked tail but not with the row count (measured), so a chain's rows (a step,
    a prompt, a verified chain or recycle pair: each row's mask is a step's at its slot) attend in one SDPA call per
    bucket they fall in, usually one. A draft tree's row, whose ancestors lie among its siblings, reads a copy of
    the slots below the call's first and of the call's slots it sees, in order: the cache a step on its branch
    reads. A verification so gives the bits of the decode steps that would emit its tokens, whatever its row count
    or kv_end, and the lossless strategies stay exact (docs/cpu.md).

    mask: the call's additive mask with the query heads folded (B or 1, 1, g*T, S), row i*T + t; slots: the T
    slots (host ints)."""

    def __init__(self, mask: torch.Tensor, slots: list[int], groups: int) -> None:
        T, S, first = len(slots), mask.shape[-1], slots[0]
        self.T, self.groups = T, groups
        ms = mask.view(*mask.shape[:2], groups, T, S)
        chain = T == 1 or first == 0 or (slots == list(range(first, first + T)) and torch.equal(
            (ms[:, 0, 0, :, first:first + T] == 0).tril(), torch.ones(T, T, dtype=torch.bool).tril().expand(
                ms.shape[0], T, T)))
        self.buckets: list[tuple[int, int, int, torch.Tensor]] = []  # chain: (first row, end row, slots read, mask)
        self.rows: list[list[tuple[slice, torch.Tensor, torch.Tensor]]] = []  # tree: per row (batch rows, idx, mask)
        if chain:
            ends = [min(round_up(slot + 1, ROW_BUCKET), S) for slot in slots]
            t = 0
            while t < T:
                u = t + ends[t:].count(ends[t])
                self.buckets.append((t, u, ends[t], ms[:, :, :, t:u, :ends[t]].reshape(*ms.shape[:2], -1, ends[t])))
                t = u
            return
        seen = ms[:, 0, 0, :, first:] == 0  # (1 or B, T, S - first): the call's own slots each row sees
        for t in range(T):
            own = [torch.nonzero(row[t]).flatten().add_(first) for row in seen]
            same = all(torch.equal(o, own[0]) for o in own[1:])  # every batch row sees the same slots: one call
            parts = []
            for b, o in ([(slice(None), own[0])] if same else [(slice(b, b + 1), o) for b, o in enumerate(own)]):
                n = first + len(o)
                end = min(round_up(n, ROW_BUCKET), S)
                idx = torch.cat((torch.arange(first, device=o.device), o, o.new_zeros(end - n)))
                mm = ms[b][:, :, :, t].index_select(-1, idx)
                mm[..., n:] = float("-inf")  # the step's masked tail (the slots read there are any, finite)
                parts.append((b, idx, mm))
            self.rows.append(parts)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Hq, g*T, D) folded, k, v (B, Hq, S, D) -> (B, Hq, g*T, D)."""
        B, Hq, _, D = q.shape
        if self.buckets:
            qs, ys = q.view(B, Hq, self.groups, self.T, D), []
            for t, u, end, mask in self.buckets:
                y = F.scaled_dot_product_attention(qs[:, :, :, t:u].reshape(B, Hq, -1, D), k[:, :, :end],
                                                   v[:, :, :end], attn_mask=mask)
                ys.append(y.view(B, Hq, self.groups, u - t, D))
            return (torch.cat(ys, dim=3) if len(ys) > 1 else ys[0]).view(B, Hq, -1, D)
        qs, ys = q.view(B, Hq, self.groups, self.T, D), []
        for t, parts in enumerate(self.rows):
            out = [F.scaled_dot_product_attention(qs[b, :, :, t].contiguous(), k[b].index_select(2, idx),
                                                  v[b].index_select(2, idx), attn_mask=mm) for b, idx, mm in parts]
            ys.append(torch.cat(out) if len(out) > 1 else out[0])
        return torch.stack(ys, dim=3).view(B, Hq, -1, D)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = Linear(cfg.d_model, cfg.d_ff, bias=False)  # gate
        self.w3 = Linear(cfg.d_model, cfg.d_ff, bias=False)  # up
        self.w2 = Linear(cfg.d_ff, cfg.d_model, bias=False)  # down
        self.register_buffer("w13", None, persistent=False)  # set by fuse_projections (inference)
        self.register_module("w13_int8", None)  # its int8 form: quantize_int8_

    def forward(self, x: torch.Tensor, kernels: KernelConfig = KernelConfig()) -> torch.Tensor:
        if self.w13 is not None and not torch.is_grad_enabled():  # one matmul instead of two
            gate, up = linear(x, self.w13, kernels, self.w13_int8).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up, kernels)
        return self.w2(F.silu(self.w1(x, kernels)) * self.w3(x, kernels), kernels)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, cache, layer, input_pos, kv_end, keep=None, kernels=KernelConfig()):
        """keep: the output of the last `keep` positions only (the attention still writes every position's keys and
        values to the cache); None: all. kernels: which fused kernels apply (`KernelConfig`)."""
        if use_fused_linear(x, self, kernels):
            # four Triton kernels with the norms, the rotary embedding, SwiGLU and residual adds folded in
            # (triton_linear); SwiGLU in gate-up's epilogue, so down reads the activation
            pdl = kernels.pdl
            qkv = triton_linear.qkv_rope(x, self.attn.wqkv, self.attn_norm.weight, self.attn_norm.eps, rope,
                                         self.attn.n_head + self.attn.n_kv_head, pdl=pdl)
            y = self.attn.attend(qkv, rope, mask, cache, layer, input_pos, kv_end, kernels, rotated=True)
            if keep is not None:
                x, y = x[:, x.shape[1] - keep:], y[:, y.shape[1] - keep:]
            x = triton_linear.linear(y, self.attn.wo.weight, residual=x, pdl=pdl)
            act = triton_linear.gate_up_swiglu(x, self.mlp.w13, self.mlp_norm.weight, self.mlp_norm.eps, pdl=pdl)
            return triton_linear.linear(act, self.mlp.w2.weight, residual=x, pdl=pdl)
        a = self.attn(self.attn_norm(x), rope, mask, cache, layer, input_pos, kv_end, kernels)
        if keep is not None:
            x, a = x[:, x.shape[1] - keep:], a[:, a.shape[1] - keep:]
        x = x + a
        return x + self.mlp(self.mlp_norm(x), kernels)


class Tree(NamedTuple):
    """Attention for a draft tree in cached decoding, overriding the slot-causal default of `run_blocks`.

    positions: (B, T) rotary position of each new token (its depth in the tree after the committed prefix);
    mask: (B, 1, T, kv_end) bool, the cache slots each new token sees (the committed prefix, its ancestors, itself).
    """

    positions: torch.Tensor
    mask: torch.Tensor


class Tables(NamedTuple):
    """What every layer of a cached call reads besides its input, made once for the call (`call_tables`): the new
    tokens' cache slots (T,), the rotary tables (cos, sin) and the attention mask as `attention_mask` makes it."""

    input_pos: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor


def call_tables(cfg: ModelConfig, input_pos: torch.Tensor, pad: torch.Tensor | None, kv_end: int,
                dtype: torch.dtype) -> Tables:
    """The tables of a cached call on the tokens at slots `input_pos` (T,), attending over slots 0..kv_end-1: slot s
    is visible to the query at slot t when s <= t and s >= pad[b] (row b's left padding). A padding query also sees
    itself, so that no row of the mask is empty (an empty row gives NaN, and a NaN in a cached value would leak
    through the zero attention weight of every later query). Calls on the same slots share them: the engine makes one
    set for a recycle step's full call and module call."""
    slots = torch.arange(kv_end, device=input_pos.device)
    mask = slots[None, :] <= input_pos[:, None]  # (T, S)
    if pad is None:
        positions = input_pos[None]
        mask = mask[None, None]
    else:
        positions = (input_pos[None] - pad[:, None]).clamp(min=0)  # (B, T)
        visible = (slots[None, None, :] >= pad[:, None, None]) | (slots[None, None, :] == input_pos[None, :, None])
        mask = (mask[None] & visible)[:, None]  # (B, 1, T, S)
    rope = rotary(positions, cfg.head_dim, cfg.rope_theta, dtype)
    return Tables(input_pos, rope, attention_mask(mask, dtype, cfg))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, cfg: ModelConfig, *, input_pos: torch.Tensor | None,
               cache: KVCache | None, pad: torch.Tensor | None, kv_end: int | None,
               tree: Tree | None = None, taps: tuple[int, ...] = (), keep: int | None = None,
               tables: Tables | None = None, kernels: KernelConfig = KernelConfig()
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a stack of decoder blocks over x (B, T, d) at cache slots `input_pos` (T,). Returns the last block's
    output and, when `taps` names blocks, their outputs concatenated on the feature axis (B, T, k*d); else None.
    keep: the last block's output for the last `keep` positions only (B, keep, d); its attention still writes the
    keys and values of all T.

    Without a cache: plain causal attention over x at positions 0..T-1 (training; the fast SDPA kernels).
    With a cache: the slots, rotary positions and mask of `call_tables`, or `tables` made by it for this call (its
    input_pos replaces the argument's; kv_end is its mask's width).
    With a `tree`, its positions and mask replace those (the slots still come from input_pos).
    kernels: which fused kernels the blocks take where they apply (`KernelConfig`).
    """
    B, T, _ = x.shape
    if cache is None:
        if pad is not None:
            raise ValueError("left padding (pad) needs a KV cache; train on unpadded sequences")
        positions = torch.arange(T, device=x.device)[None]
        rope = rotary(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        return _stack(blocks, x, rope, None, None, None, 0, taps, kernels, keep)
    if tables is not None:
        if tree is not None or tables.input_pos.shape != (T,):
            raise ValueError(f"tables for {tuple(tables.input_pos.shape)} slots given to a call on {T} tokens"
                             + (" with a tree" if tree is not None else ""))
        return _stack(blocks, x, tables.rope, tables.mask, cache, tables.input_pos, tables.mask.shape[-1], taps,
                      kernels, keep, share=False)  # made outside this call: nothing for inductor to recompute per layer
    if input_pos is None:
        raise ValueError("cached decoding needs input_pos, the cache slots of the T new tokens")
    kv_end = cache.max_len if kv_end is None else kv_end
    if blocks and blocks[0].attn.by_row:  # whole buckets of slots (RowPlan)
        kv_end = min(round_up(kv_end, ROW_BUCKET), cache.max_len)
    if tree is not None:
        rope = rotary(tree.positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        seen = tree.mask
        if seen.shape[-1] < kv_end:  # a rounded kv_end: the slots added are seen by no one
            seen = F.pad(seen, (0, kv_end - seen.shape[-1]))
        return _stack(blocks, x, rope, attention_mask(seen, x.dtype, cfg), cache, input_pos, kv_end, taps, kernels,
                      keep)
    t = call_tables(cfg, input_pos, pad, kv_end, x.dtype)
    return _stack(blocks, x, t.rope, t.mask, cache, input_pos, kv_end, taps, kernels, keep)


# calls on more new tokens than this (long prompts) repeat K/V instead of folding a group's query heads into rows:
# a folded mask grows with groups*T*S
FOLD_MAX_TOKENS = 64


def attention_mask(mask: torch.Tensor, dtype: torch.dtype, cfg: ModelConfig) -> torch.Tensor:
    """The mask every layer's attention reads, made once per call from the bool mask (B or 1, 1, T, S).

    Additive (0 where visible, -inf elsewhere) in the activations' dtype: SDPA converts a bool mask in every layer
    (one or two kernels a layer). With grouped-query attention its rows are repeated for each query head of a group,
    which `Attention` folds into the query axis: row g*T + t is query t of the group's g-th head. Only for calls on
    up to FOLD_MAX_TOKENS new tokens (decode steps, verifications, trees), where the repeat's copy of every cached
    slot is most of the attention's cost; a long prompt's folded mask would be `groups` times a large mask.
    """
    groups = cfg.n_head // cfg.n_kv_head
    if groups > 1 and mask.shape[-2] <= FOLD_MAX_TOKENS:
        B, _, T, S = mask.shape
        mask = mask[:, :, None].expand(B, 1, groups, T, S).reshape(B, 1, groups * T, S)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _kernel_device(t: torch.Tensor, kernels: KernelConfig, interpreted: bool) -> bool:
    """Whether t's device runs the Triton kernels: CUDA, or the CPU under Triton's interpreter where `kernels`
    asks for the CUDA paths there."""
    return t.is_cuda or (kernels.cuda_paths_on_cpu and interpreted)


def use_decode_kernel(q: torch.Tensor, mask: torch.Tensor, T: int, kernels: KernelConfig) -> bool:
    """Whether a cached call on T new tokens attends with `triton_attention.decode_attention` rather than SDPA.

    On CUDA with triton, an additive mask and at most FOLD_MAX_TOKENS new tokens (decode steps, verifications,
    draft trees): there SDPA's kernels cost ~10 µs a layer for what is <1 µs of memory traffic, and switch kernel
    (plus a Memset) from one query to two. Measured per call on an H100 (bf16, `scripts/attention_bench.py`): the
    1.3B shape over 256 slots, 1 / 2 queries, 7.5 / 10.6 µs with SDPA, 4.6 / 4.9 µs with the kernel.
    """
    D = q.shape[-1]
    return (kernels.decode_attention and triton_attention.available()
            and _kernel_device(q, kernels, triton_attention._INTERPRETED) and T <= FOLD_MAX_TOKENS
            and mask.is_floating_point() and 16 <= D <= 256 and D & (D - 1) == 0)


def use_draft_head_kernel(out: torch.Tensor, k: int, kernels: KernelConfig) -> bool:
    """Whether `RecycleModel.draft_top` runs `triton_draft_head.head_top_k` (CUDA, triton, k <= its KTOP) rather
    than the norm, the head's matmul and `topk.top_k` as separate operators: the draft tree's norm, head and top-k
    as one kernel (the compiled (5, 4, 24, 5) round 1.633 -> 1.583 ms on an H100)."""
    return (kernels.draft_head and triton_draft_head.available() and k <= triton_draft_head.KTOP
            and _kernel_device(out, kernels, triton_draft_head._INTERPRETED))


# the fused products (KernelConfig.fused_linear) apply to models no wider than this. Measured on an H100
# (`recyclegpt bench --shape 1.3b`): the fused path made the 1.3B shape's (d 2048) compiled standard step slower,
# 1.67 -> 2.73 ms, where SmolLM2's (d 576) went 0.977 -> 0.533 ms. Widths between are not measured; 1024 keeps the
# measured gain and the measured loss on their sides
FUSED_MAX_WIDTH = 1024


def fused_linear_fits(width: int, rows: int, head_dim: int) -> bool:
    """The shape part of `use_fused_linear`: model width d <= FUSED_MAX_WIDTH, at most triton_linear.MAX_ROWS rows
    (a decode step, a recycle pair, a short chain), and a head dimension twice a power of two (the rotary
    embedding's column pairs)."""
    half = head_dim // 2
    return (width <= FUSED_MAX_WIDTH and rows <= triton_linear.MAX_ROWS and half > 0 and half & (half - 1) == 0)


def use_fused_linear(x: torch.Tensor, block: "Block", kernels: KernelConfig) -> bool:
    """Whether `block` runs its products through `triton_linear` for x (B, T, d): CUDA, triton, inference with the
    fused QKV and gate-up weights (`fuse_projections`), and a shape `fused_linear_fits`; other calls keep cuBLAS."""
    return (kernels.fused_linear and triton_linear.available()
            and _kernel_device(x, kernels, triton_linear._INTERPRETED)
            and block.attn.wqkv is not None and block.mlp.w13 is not None and not torch.is_grad_enabled()
            and fused_linear_fits(x.shape[-1], x.numel() // x.shape[-1], block.attn.head_dim))


def use_cached_attention(qkv: torch.Tensor, mask: torch.Tensor | None, T: int, groups: int, head_dim: int,
                         kernels: KernelConfig) -> bool:
    """Whether `Attention.attend` writes the cache and attends with `triton_attention.cached_attention` (two
    kernels a layer fewer): a call of the fused path (rotated qkv) whose mask has its query heads folded, where
    `use_decode_kernel` holds."""
    return (kernels.cached_attention and mask is not None and mask.shape[-2] == groups * T
            and use_decode_kernel(qkv.view(*qkv.shape[:2], -1, head_dim), mask, T, kernels))


# under torch.compile, the rotary tables, the mask and the cache slots of a cached call are handed to the layers as
# one opaque copy (`_shared_op`), made once for every layer. Inductor recomputes a cheap pointwise result for each
# custom op that reads it, so the fused path's 30 `qkv_rope` and `cached_attention` calls each got their own copy
# of cos, sin and the mask (two wide kernels a step, 9.3 and 7.6 µs on an H100) and of the slots where the caller
# computed them (a verified round's `pos + arange`). SmolLM2's compiled standard step 0.532 -> 0.508 ms, the chain
# round 0.911 -> 0.893 ms (docs/engine.md's decision table)


def _shared(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


if hasattr(torch.library, "custom_op"):  # torch >= 2.4
    _shared_op = torch.library.custom_op("recyclegpt::shared", mutates_args=(),
                                         schema="(Tensor[] tensors) -> Tensor[]")(_shared)

    @_shared_op.register_fake
    def _(tensors):
        return [torch.empty_like(t) for t in tensors]
else:
    _shared_op = _shared


def _stack(blocks, x, rope, mask, cache, input_pos, kv_end, taps, kernels, keep=None, share=True):
    if (share and cache is not None and blocks and torch.compiler.is_compiling()
            and use_fused_linear(x, blocks[0], kernels)):
        slots = [input_pos] if input_pos is not None else []
        cos, sin, *rest = _shared_op([*rope, *([] if mask is None else [mask]), *slots])
        rope, mask = (cos, sin), (rest[0] if mask is not None else None)
        if slots:
            input_pos = rest[-1]
    if (cache is not None and mask is not None and blocks and blocks[0].attn.by_row
            and not torch.compiler.is_compiling()):
        groups = blocks[0].attn.n_head // blocks[0].attn.n_kv_head
        if mask.shape[-2] == groups * x.shape[1]:  # a folded mask: a call on few tokens
            mask = RowPlan(mask, input_pos.tolist(), groups)
    tapped = []
    if keep is not None and (taps or not 0 < keep <= x.shape[1]):
        raise ValueError(f"keep={keep}: the last block's output for 1 to {x.shape[1]} positions, without taps")
    for i, block in enumerate(blocks):
        x = block(x, rope, mask, cache, i, input_pos, kv_end, keep if i == len(blocks) - 1 else None, kernels)
        if i in taps:
            tapped.append(x)
    return x, (torch.cat(tapped, dim=-1) if tapped else None)


def prefill_attention() -> contextlib.AbstractContextManager:
    """SDPA without the cuDNN backend, for prompts (whose lengths vary call to call).

    cuDNN attention builds an execution plan for every new shape: measured on an H100 (torch 2.11), the first
    prefill of a new prompt length took 65-78 ms against 19-22 ms when repeated; without cuDNN, 22-32 ms and 19 ms.
    Fixed-shape decode steps keep every backend (their plans are built once).
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: nothing to exclude
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def init_weights(module: nn.Module, n_layer: int) -> None:
    """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layer)."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue
        std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("wo.weight", "w2.weight")) else 0.02
        nn.init.normal_(p, mean=0.0, std=std)


def fuse_projections(module: nn.Module) -> nn.Module:
    """Give every attention one QKV matrix and every MLP one gate-up matrix: 3 + 2 matmuls per layer become 1 + 1,
    which matters where decoding is launch-bound (the engine's graphs: docs/engine.md).

    The separate weights become views into the fused matrices, so no memory is added and in-place weight updates
    (load_state_dict, copy_) stay visible to both. The fused path runs only without autograd (inference); after
    `.to()` or `.half()` the views and the fused copies part, so call this again. Idempotent: where the weights are
    still views into their fused matrix, that matrix stays as it is. Captured CUDA graphs read it at its address, so
    a second engine on the same model must not replace it (the first engine's graphs would read freed memory).
    Returns the module.
    """
    def fuse(linears: list[nn.Linear], fused: torch.Tensor | None) -> torch.Tensor:
        if fused is not None and _views_into(fused, [m.weight for m in linears]):
            return fused
        fused = torch.cat([m.weight.detach() for m in linears])
        start = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight.data = fused[start:start + n]
            start += n
        return fused

    for m in module.modules():
        if isinstance(m, Attention):
            m.wqkv = fuse([m.wq, m.wk, m.wv], m.wqkv)
        elif isinstance(m, MLP):
            m.w13 = fuse([m.w1, m.w3], m.w13)
    return module


def _views_into(fused: torch.Tensor, weights: list[torch.Tensor]) -> bool:
    """Whether `weights` are, in order, the consecutive row blocks of `fused` (as `fuse_projections` made them)."""
    if fused.dim() != 2 or not fused.is_contiguous():
        return False
    row, start = fused.stride(0) * fused.element_size(), 0
    for w in weights:
        if (w.device != fused.device or w.dtype != fused.dtype or w.dim() != 2 or w.shape[1] != fused.shape[1]
                or w.stride() != fused.stride()
                or w.untyped_storage().data_ptr() != fused.untyped_storage().data_ptr()
                or w.data_ptr() != fused.data_ptr() + start * row):
            return False
        start += w.shape[0]
    return start == fused.shape[0]


class Transformer(nn.Module):
    """The base LM. forward(idx) -> ModelOutput(logits, hidden)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.n_layer)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.kernels = KernelConfig()  # which fused kernels inference takes (set it before decoding)

    def new_cache(self, batch: int, max_len: int, *, device=None, dtype=None) -> KVCache:
        if max_len > self.cfg.context_length:
            raise ValueError(f"cache length {max_len} exceeds the model's context length {self.cfg.context_length}")
        if self.layers and self.layers[0].attn.by_row:  # every call's rounded kv_end fits (run_blocks)
            max_len = min(round_up(max_len, ROW_BUCKET), self.cfg.context_length)
        p = self.tok_emb.weight
        return KVCache(self.cfg.n_layer, batch, self.cfg.n_kv_head, max_len, self.cfg.head_dim,
                       device=device or p.device, dtype=dtype or p.dtype)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: (B, T, d) pre-norm hidden -> (B, T, V) logits. Shared with the module."""
        return self.lm_head(self.norm(hidden), self.kernels)

    def forward(self, idx: torch.Tensor, *, input_pos: torch.Tensor | None = None, cache: KVCache | None = None,
                pad: torch.Tensor | None = None, kv_end: int | None = None, num_logits: int | None = None,
                tree: Tree | None = None, taps: tuple[int, ...] = (), tables: Tables | None = None) -> ModelOutput:
        """idx (B, T) token ids. num_logits: compute the LM head for the last n positions only (decoding; 0: none).
        tree: draft-tree attention (see `Tree`), for verifying a tree of candidate tokens in one call.
        taps: layers whose outputs to return as well (ModelOutput.taps), for a module that reads them.
        tables: this cached call's slots, rotary tables and mask, made by `call_tables` (else made here)."""
        hidden, tapped = run_blocks(self.layers, self.tok_emb(idx), self.cfg, input_pos=input_pos, cache=cache,
                                    pad=pad, kv_end=kv_end, tree=tree, taps=taps, tables=tables,
                                    kernels=self.kernels)
        logits = self.head(hidden if num_logits is None else hidden[:, hidden.shape[1] - num_logits:])
        return ModelOutput(logits, hidden, tapped)
