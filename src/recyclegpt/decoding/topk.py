"""Top-k selection without sort kernels, for the draft tree's inner loop on CUDA.

`torch.topk` over a 49,152-token vocabulary runs a multi-pass radix select: several kernels per call, which
torch.compile cannot fuse (it calls aten's). A draft-tree round makes five topk calls and two sorts; on the H100
the round's kernels of kind "other" (neither matmul, attention, inductor's nor copies: where aten's topk and sort
fall) took 0.23 ms of its 1.95 ms (a 2026-11-26 profile). Here the same selection is written as comparisons and
reductions, which inductor fuses into a few kernels:

- `stable_rank`: each element's place in a stable descending sort (an all-pairs count, n^2 per row: for small n).
- `top_k_small`: the k best of a short row, from their ranks.
- `top_k_chunked`: for a long row, the k best chunk maxima first, then the k best of those k chunks. The k largest
  values all lie in the k chunks with the largest maxima (ties included), so the values are exactly torch.topk's.
- `best_in_order`: the k best of a short row in index order (the tree keeps its best N candidates that way).

Rows are the last dimension. Ties are broken towards the lower index in `stable_rank` and `top_k_small`; within
`top_k_chunked` towards the better-ranked chunk. Indices are always distinct, so a node's drafted children carry
distinct tokens (no verification slot is spent twice). `top_k` and `best_in_order` take the sort-free path on CUDA
tensors (or where `cuda_path` asks for it) and torch's sort and topk elsewhere, where those are single fast calls;
rows too long to rank whole whose length is not a multiple of `CHUNK` also use `torch.topk`.
"""

from __future__ import annotations

import torch

SMALL = 1024  # rows up to this long are ranked whole (n^2 comparisons); longer ones are chunked
CHUNK = 128
# greedy selection's argmax over a vocabulary in two reductions (`argmax`), in compiled code on CUDA. Compiled, a
# step's argmax over SmolLM2's 49,152 logits is one inductor reduction that a single
# program loops through: 9.2 us of a 0.471 ms standard step on an H100 (a 2026-11-27 profile), two of them in
# a recycle step. Chunk maxima first spread the reading over many programs. Measured on an H100 (2026-11-27,
# an A/B of step profiles): standard 0.489 -> 0.482 ms, recycle 0.654 -> 0.642. Eager CUDA
# code (the `graphs` engine, the reference loops) keeps torch.argmax, whose one kernel already spreads over the GPU
ARGMAX_CHUNK = 1024


def stable_rank(x: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (..., n) int64: each element's position in a stable descending sort of its row."""
    n = x.shape[-1]
    idx = torch.arange(n, device=x.device)
    xi, xj = x[..., :, None], x[..., None, :]
    ahead = (xj > xi) | ((xj == xi) & (idx[None, :] < idx[:, None]))  # j sorts before i
    return ahead.sum(-1)


def _pick(rank: torch.Tensor, k: int) -> torch.Tensor:
    """The indices (..., k) of the elements ranked 0..k-1, by rank. Each of those ranks must occur once in a row
    (then each sum has one non-zero term)."""
    n = rank.shape[-1]
    idx = torch.arange(n, device=rank.device)
    q = torch.arange(k, device=rank.device)
    return ((rank[..., None, :] == q[:, None]) * idx).sum(-1)


def top_k_small(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row (values, indices), largest first, ties to the lower index."""
    ind = _pick(stable_rank(x), k)
    return x.gather(-1, ind), ind


def top_k_chunked(x: torch.Tensor, k: int, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each long row (values, indices), largest first. The row length must be a multiple of
    `chunk`, with at least k chunks."""
    n = x.shape[-1]
    if n % chunk or n < k * chunk:
        raise ValueError(f"rows of {n} are not at least {k} whole chunks of {chunk}")
    c = x.unflatten(-1, (-1, chunk))  # (..., n_chunks, chunk)
    _, best = top_k_small(c.amax(-1), k)  # (..., k) chunk ids
    cand = c.gather(-2, best[..., None].expand(*best.shape, chunk)).flatten(-2)  # (..., k * chunk)
    values, j = top_k_small(cand, k)
    return values, best.gather(-1, j // chunk) * chunk + j % chunk


def top_k(x: torch.Tensor, k: int, *, cuda_path: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest along the last dimension, largest first, indices distinct. Sort-free on
    CUDA tensors, or on any where cuda_path (KernelConfig.cuda_paths_on_cpu)."""
    if k > x.shape[-1]:
        raise ValueError(f"top-k of {k} from rows of {x.shape[-1]}")
    n = x.shape[-1]
    sort_free = x.is_cuda or cuda_path
    if sort_free and n <= SMALL:
        return top_k_small(x, k)
    if sort_free and n % CHUNK == 0 and n >= k * CHUNK:
        return top_k_chunked(x, k)
    top = x.topk(k, dim=-1)
    return top.values, top.indices


def best_in_order(score: torch.Tensor, k: int, *, cuda_path: bool = False) -> torch.Tensor:
    """The indices (..., k) of each row's k largest scores, in ascending index order; ties to the lower index.
    Sort-free on CUDA tensors, or on any where cuda_path."""
    if not (score.is_cuda or cuda_path) or score.shape[-1] > SMALL:
        return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :k].sort(dim=-1).values
    kept = stable_rank(score) < k
    n = score.shape[-1]
    idx = torch.arange(n, device=score.device)
    # a kept element's place among the kept, in index order: the kept before it (a sum, not cumsum: inductor falls
    # back to aten for cumsum on the CPU, and a reduction fuses)
    place = (kept[..., None, :] & (idx[None, :] < idx[:, None])).sum(-1)
    return _pick(torch.where(kept, place, k), k)


def argmax(x: torch.Tensor, *, cuda_path: bool = False) -> torch.Tensor:
    """torch.argmax(x, -1), the first index among equal maxima; under torch.compile on CUDA (or on any device where
    cuda_path) in two reductions (`split_argmax`), which give the same indices."""
    if (x.is_cuda or cuda_path) and torch.compiler.is_compiling():
        return split_argmax(x)
    return x.argmax(-1)


def split_argmax(x: torch.Tensor, chunk: int = ARGMAX_CHUNK) -> torch.Tensor:
    """torch.argmax(x, -1) of a floating-point x as each chunk's maximum and its first index, then the first chunk
    holding the overall maximum: its first maximum is the row's first. A last partial chunk is padded with -inf,
    which never comes before a real value (an all -inf row gives 0, as torch.argmax does)."""
    n = x.shape[-1]
    if n <= chunk:
        return x.argmax(-1)
    if n % chunk:
        x = torch.nn.functional.pad(x, (0, chunk - n % chunk), value=float("-inf"))
    best, at = x.unflatten(-1, (-1, chunk)).max(-1)  # (..., n_chunks): first index of each chunk's max
    j = best.argmax(-1, keepdim=True)
    return (j * chunk + at.gather(-1, j)).squeeze(-1)
