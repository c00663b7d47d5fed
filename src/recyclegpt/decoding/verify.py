"""Verification rules: which drafted tokens the full model accepts, and the token it emits after them.

Pure tensor functions, batched over rows, with no host synchronisation. Each returns, per row, the number of
accepted draft tokens `a` and a token table whose first a + 1 entries are what that row emits: the accepted
drafts, then the full model's own token at the first mismatch (or a bonus token after a fully accepted draft).
Any shorter prefix of that table is also a valid output, which is how a batch commits the same number of tokens
on every row (`decoding`-style strategies take the minimum of a over the rows).

Both rules are lossless: the emitted tokens are distributed exactly as the full model's own decoding
(greedy: identical; sampling: the same distribution).

- `verify_chain`: K tokens drafted one after another. Greedy: accept while the draft equals the full model's
  argmax. Sampling: the speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023): accept draft d with
  probability min(1, p(d) / q(d)); at the first rejection draw from norm(max(p - q, 0)); after K acceptances draw
  a bonus token from p.
- `verify_tree`: a tree of candidate tokens (several children per node, each with distinct tokens). At every node
  the full model's token y is drawn from its own distribution p (argmax when greedy); the walk moves to the child
  whose token is y and stops where no child matches. Every emitted token is a draw from p given exactly the
  emitted prefix, so the rule is lossless for any deterministic choice of candidates (here: the drafter's top-k).
"""

from __future__ import annotations

import torch

from . import topk
from .sampling import SamplingParams, draw, logits_to_probs


def accepted_prefix(ok: torch.Tensor) -> torch.Tensor:
    """(B, K) per-draft acceptance -> (B,) length of the accepted prefix (the first rejection ends it): the index
    of the first rejection, K where there is none. A min reduction, which inductor fuses on every backend (a
    cumprod falls back to aten on the CPU)."""
    B, K = ok.shape
    if K == 0:
        return torch.zeros(B, dtype=torch.long, device=ok.device)
    return torch.where(ok, K, torch.arange(K, device=ok.device)).amin(dim=1)


def verify_chain(draft: torch.Tensor, draft_probs: torch.Tensor | None, logits: torch.Tensor,
                 params: SamplingParams, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify K chained drafts.

    draft (B, K): the drafted tokens; draft_probs (B, K, V): the distributions they were drawn from, after the same
    temperature/top-k/top-p transform (unused when greedy); logits (B, K+1, V): the full model's logits at the
    pending token and at each draft, i.e. its distributions for the draft positions and the one after.
    Returns (a (B,), tokens (B, K+1)).
    """
    K = draft.shape[1]
    if params.greedy:
        target = topk.argmax(logits)  # (B, K+1); where the draft is accepted it equals the target
        return accepted_prefix(draft == target[:, :K]), target
    if draft_probs is None and K:
        raise ValueError("sampling verification needs the draft distributions (draft_probs)")
    p = logits_to_probs(logits, params)  # (B, K+1, V), float32
    if draft_probs is None:  # nothing drafted: the round samples the full model's next token
        draft_probs = p[:, :0]
    p_d = p[:, :K].gather(-1, draft[..., None])[..., 0]
    q_d = draft_probs.gather(-1, draft[..., None])[..., 0]
    u = torch.rand(draft.shape, device=draft.device, generator=generator)
    a = accepted_prefix(u * q_d <= p_d)  # accept with probability min(1, p(d) / q(d)); q(d) > 0 as d ~ q
    residual = (p[:, :K] - draft_probs).clamp(min=0)
    mass = residual.sum(-1, keepdim=True)
    # a zero residual means p <= q everywhere, i.e. p == q: rejection then has probability 0; keep p to stay finite
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p[:, :K])
    fixed = draw(torch.cat((residual, p[:, K:]), dim=1), generator)  # (B, K+1): the token at a rejection / bonus
    keep = torch.arange(K + 1, device=draft.device)[None] < a[:, None]
    return a, torch.where(keep, torch.cat((draft, fixed[:, K:]), dim=1), fixed)


def verify_tree(tokens: torch.Tensor, parent: torch.Tensor, depth: torch.Tensor, levels: int,
                logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Verify a draft tree of N nodes below a root (the pending token).

    tokens (B, N): node tokens; parent (B, N): each node's parent as an index into [root, node 0, ..., node N-1]
    (0 is the root); depth (B, N): 1 for the root's children; levels: the tree's depth D (>= every depth; given,
    not read from `depth`, so that nothing syncs); logits (B, N+1, V): the full model's logits at
    [root, nodes]. Siblings must carry distinct tokens (with sampling, two equal siblings would be two independent
    draws for one position). A node that is its own parent is never accepted (how `add_lookup_branch` switches off
    chain nodes the drafted tree already holds).
    Returns (a (B,), tokens (B, D+1), path (B, D)): the accepted depth, the emitted-token table (the full model's
    token at the root and at each accepted node), and the accepted nodes' indices into [root, nodes] by depth
    (entries past a are 0).
    """
    B, N = tokens.shape
    D = levels
    y = topk.argmax(logits) if params.greedy else draw(logits_to_probs(logits, params), generator)  # (B, N+1)
    ok = torch.ones(B, N + 1, dtype=torch.bool, device=tokens.device)  # ok[:, 0]: the root
    ok[:, 1:] = False
    for _ in range(D):  # a fixed point after D rounds: one tree level settles per round
        ok[:, 1:] = (tokens == y.gather(1, parent)) & ok.gather(1, parent)
    levels = torch.arange(1, D + 1, device=tokens.device)
    on_path = ok[:, None, 1:] & (depth[:, None, :] == levels[None, :, None])  # (B, D, N)
    a = on_path.any(-1).long().sum(-1)  # siblings differ, so at most one accepted node per level
    path = torch.where(on_path.any(-1), on_path.long().argmax(-1) + 1, torch.zeros_like(levels)[None])
    return a, y.gather(1, torch.cat((torch.zeros_like(path[:, :1]), path), dim=1)), path
