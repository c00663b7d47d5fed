"""Lossless decoding with the recyclable module as the drafter: reference loops, one host sync per full call.

- `speculative` (`--draft-len K`): the module drafts K tokens, rolling forward on its own output state (its
  output hidden stands in for the next h, as in EAGLE); the full model verifies all K in one call; the accepted
  prefix plus one token of the full model's own is emitted.
- `recycle_verified`: the paper's alternating schedule with the recycled token checked. It is `speculative`
  with K = 1: the full call that processes [x_{t+1}, x̂_{t+2}] also yields the full model's own distribution at
  x̂_{t+2}'s position, so the check costs nothing.
- `tree` (`--tree`): the module expands a draft tree (top-k children per node, the k best nodes by cumulative
  draft probability expanded at each depth, the best `tree_nodes` kept: EAGLE-2's dynamic tree); the full model
  verifies the whole tree in one call under a tree attention mask; the longest verified path is emitted.
- `lookup`: prompt-lookup (n-gram) decoding, no module: the chain's drafts are the tokens that followed the latest
  earlier occurrence of the sequence's last few tokens (`prompt_lookup`), verified like `speculative`'s.

A chain takes its drafts from a `Drafter` (`ModuleDrafter`, `LookupDrafter`); the verifier and the commit are
the same for every drafter (`chain`).

The rules that make each lossless live in `decoding/verify.py`.

Slots. The full model's cache holds the committed tokens; x_p, the latest emitted token, is *pending* (not yet
fed to the full model) at slot p. The module's input at slot t is (h_t, x_{t+1}) and it predicts x_{t+2}.
One round:
  1. catch-up: the module runs on the slots whose full-model states are new since the last round (the prompt
     after the prefill; then the slots the last verification committed), with those true h_t. Its output at
     slot p-1 is the draft distribution for x_{p+1}.
  2. draft: chain: K-1 more module steps at slots p, p+1, ..., each fed the previous step's output hidden and
     drafted token; tree: depth-1 more expansions, each over the k frontier nodes at once.
  3. verify: the full model on [x_p, drafts] (a tree under its mask), which writes their keys and values.
  4. commit: a tokens accepted, then the full model's own token: x_{p+1..p+a+1} are emitted and slots p..p+a
     are committed (a tree's accepted path is first moved into those slots). Later slots hold rejected drafts;
     they are masked out until overwritten, so both caches "roll back" by position alone.
Batches commit the same number of tokens on every row: the minimum accepted over the rows (each row's emitted
tokens are a prefix of what its own verification allows, so the output is still exactly the full model's).
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Protocol, Sequence

import torch

from ..models import KVCache, RecycleModel, Transformer, Tree, prefill_attention
from .loops import (
    Collector,
    DecodeResult,
    DecodeStats,
    PromptBatch,
    StreamFn,
    _slots,
    _sync,
    check_budget,
)
from .sampling import SamplingParams, draw, logits_to_probs, sample
from .topk import best_in_order, top_k
from .verify import verify_chain, verify_tree

# H100 sweep with the v2 module (docs/speculative.md): K = 2 gave 1.63x, 3 1.57x, 4 1.46x, 8 1.20x; 3 is the default
# because the rollout-trained v3 module accepts deeper drafts (not re-swept with v3)
DEFAULT_DRAFT_LEN = 3


class TreeShape(NamedTuple):
    """A draft tree: `depth` levels below the pending token, `topk` children per expanded node and `topk` nodes
    expanded per level, and the best `nodes` (by cumulative draft log-probability) sent to the full model; plus,
    when `lookup` > 0, a chain of that many tokens found by prompt lookup (`prompt_lookup`) as one more branch."""

    # defaults: best of eight shapes in a 2026-11-27 H100 sweep (v3 module, compiled whole rounds, sort-free
    # top-k, 20 prompts of four sets): (5, 4, 24) 1.93x, (5, 4, 20) 1.92x, (5, 4, 32) 1.91x, (5, 6, 32) 1.89x,
    # (5, 8, 40) 1.87x, (6, 4, 32) 1.84x, (6, 5, 32) 1.83x, (4, 4, 16) 1.82x; re-checked the same day
    # with the draft-head kernel: (5, 4, 24) 1.98x, (5, 4, 20) 1.97x, (5, 4, 28) 1.91x, (5, 5, 24) 1.91x,
    # (6, 4, 24) 1.86x; and again with the merge kernel: (5, 4, 24) 2.04x / 2.04x / 2.05x, (5, 4, 20) 2.03x,
    # (5, 4, 28) 2.02x, (6, 4, 28) 1.92x
    depth: int = 5
    topk: int = 4
    nodes: int = 24
    # off: on the H100 the 5-token branch gave τ +0.13 but made the verification dearer, 1.93x -> 1.90x
    # (2026-11-27); in place of five drafted nodes, (5, 4, 19, 5), the round still cost 0.073 ms more than (5, 4, 24):
    # inductor splits the verification's per-layer rotary and mask work into three kernels when the tree carries
    # the branch (2026-11-27, docs/speculative.md)
    lookup: int = 0

    def check(self) -> "TreeShape":
        for name, v in self._asdict().items():
            if not isinstance(v, int) or v < (0 if name == "lookup" else 1):
                raise ValueError(f"tree {name} must be an integer >= {0 if name == 'lookup' else 1}, got {v!r}")
        if self.lookup > self.depth:
            raise ValueError(f"tree lookup ({self.lookup}) may not exceed the tree depth ({self.depth})")
        most = self.topk + (self.depth - 1) * self.topk ** 2
        if self.nodes > most:
            raise ValueError(f"a tree of depth {self.depth} and top-k {self.topk} has at most {most} nodes; "
                             f"got tree nodes {self.nodes}")
        return self

    @property
    def verified(self) -> int:
        """Draft tokens the full model verifies per round: the drafted nodes and the lookup branch."""
        return self.nodes + self.lookup

    @property
    def module_slots(self) -> int:
        """Module cache slots the expansions use after the committed prefix."""
        return (self.depth - 1) * self.topk


def check_draft_len(draft_len: int) -> int:
    if not isinstance(draft_len, int) or isinstance(draft_len, bool) or draft_len < 1:
        raise ValueError(f"draft_len must be an integer >= 1, got {draft_len!r}")
    return draft_len


class Round:
    """State shared by the strategies, which drafters read: the batch, the caches, the pending token (`pending`,
    at slot `p`), the tokens by slot (`seq`, through p), the sampling parameters and generator, and the module's
    catch-up inputs. model: a RecycleModel, or a bare Transformer for a drafter without the module."""

    def __init__(self, model: RecycleModel | Transformer, prompts, max_new_tokens: int, extra_slots: int, name: str,
                 sampling: SamplingParams, stop_ids, stream) -> None:
        self.model = model if isinstance(model, RecycleModel) else None
        self.base = model.base if self.model is not None else model
        self.taps = self.model.taps if self.model is not None else ()  # base layers the module reads
        self.device = self.base.tok_emb.weight.device
        self.batch = PromptBatch.build(prompts, vocab_size=self.base.cfg.vocab_size, device=self.device)
        max_len = check_budget(self.base, self.batch, max_new_tokens, extra_slots=extra_slots)
        B = len(prompts)
        self.cache: KVCache = self.base.new_cache(B, max_len)
        self.mcache: KVCache | None = model.module.new_cache(B, max_len) if self.model is not None else None
        self.sampling, self.gen = sampling, sampling.generator(self.device)
        self.stats = DecodeStats(name)
        self.out = Collector(B, max_new_tokens, stop_ids, stream)
        self.pad = self.batch.pad
        if self.model is not None:
            model.refresh_draft_head()

    def prefill(self) -> bool:
        """The full model on the prompt; x_L is emitted and pending. Returns True when already done."""
        _sync(self.device)
        self.t0 = time.perf_counter()
        L = self.batch.length
        with prefill_attention():
            full = self.base(self.batch.ids, input_pos=_slots(0, L, self.device), cache=self.cache, pad=self.pad,
                             kv_end=L, num_logits=1, taps=self.taps)
        self.pending = sample(full.logits[:, -1], self.sampling, self.gen)  # x_L, (B,)
        self.stats.full_calls += 1
        done = self.out.emit(self.pending[:, None])
        self.stats.prefill_seconds = time.perf_counter() - self.t0
        self.p, self.start = L, 0
        self.state = self.state_of(full)
        self.next_tokens = torch.cat((self.batch.ids[:, 1:], self.pending[:, None]), 1)
        self.seq = torch.cat((self.batch.ids, self.pending[:, None]), 1)  # tokens by slot, through p
        return done

    def state_of(self, full) -> torch.Tensor | None:
        """The module's inputs from a full call's output (RecycleModel.state); None without the module."""
        return self.model.state(full) if self.model is not None else None

    def catch_up(self, logits: bool = True):
        """Step 1: the module over slots start..p-1 with the full model's states. Returns its output at p-1: draft
        logits (B, V) (None when logits is False) and hidden (B, 1, d)."""
        out = self.model.recycle(self.state, self.next_tokens, input_pos=_slots(self.start, self.p - self.start,
                                                                                 self.device),
                                 cache=self.mcache, pad=self.pad, kv_end=self.p, num_logits=int(logits), draft=True)
        self.stats.module_calls += 1
        return (out.logits[:, -1] if logits else None), out.hidden[:, -1:]

    def commit(self, m: int, tokens: torch.Tensor, state: torch.Tensor | None) -> bool:
        """Step 4, for m accepted tokens (on every row) and the token table (B, >= m+1); state (B, >= m+1, d)
        holds the module's inputs (RecycleModel.state) at slots p, ..., p+m of the committed tokens (None without
        the module). Returns True when done."""
        self.stats.accept_hist[m] += 1
        self.stats.full_calls += 1
        emitted = tokens[:, :m + 1]
        done = self.out.emit(emitted)
        self.start, self.p = self.p, self.p + m + 1
        self.state, self.next_tokens = (state[:, :m + 1] if state is not None else None), emitted
        self.pending = emitted[:, -1]
        self.seq = torch.cat((self.seq, emitted), 1)
        return done

    def finish(self) -> DecodeResult:
        _sync(self.device)
        st = self.stats
        st.seconds = time.perf_counter() - self.t0
        st.new_tokens = sum(len(t) for t in self.out.tokens)
        st.step_ms = self.out.step_ms(first=1)  # one emit per round after the prefill's
        return DecodeResult(self.out.tokens, st, self.out.finished)

    def probs(self, logits: torch.Tensor) -> torch.Tensor | None:
        return None if self.sampling.greedy else logits_to_probs(logits, self.sampling)


class Drafter(Protocol):
    """Where a verified chain's drafts come from (`chain`). Each round the drafter proposes up to k tokens to
    follow the pending token, reading what the round has committed (its `Round`: the tokens by slot, and the full
    model's states for the module's catch-up); the full model verifies them in one call (`verify.verify_chain`)
    and the round commits the accepted prefix plus one token of the full model's own. When sampling, the drafter
    also gives the distributions q its tokens were drawn from: the verifier accepts draft d with probability
    min(1, p(d) / q(d)), which keeps the output exactly the full model's (a deterministic drafter gives point
    masses, `point_mass`)."""

    def draft(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, j) draft tokens, j <= k, and their distributions (B, j, V) in float32 (None when greedy)."""
        ...


class ModuleDrafter:
    """The recyclable module as drafter: it catches up on the slots the last round committed, then drafts k
    tokens, rolling forward on its own output state. min_draft_prob: `speculative`'s adaptive draft length."""

    def __init__(self, r: Round, min_draft_prob: float = 0.0) -> None:
        self.r, self.min_draft_prob = r, min_draft_prob

    def draft(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        r, model = self.r, self.r.model
        logits, state = r.catch_up()
        drafts, probs = [], []
        for j in range(k):  # step 2: draft x̂_{p+1+j}, then (but for the last) roll the module on at slot p + j
            q = r.probs(logits)
            # the stop rule reads the draft distribution only, not the token drawn from it: a kept draft is then
            # distributed exactly as q, which verification assumes (a rule on q(token) would skew it)
            if self.min_draft_prob > 0.0 and float((q if q is not None else torch.softmax(logits.float(), -1))
                                                   .amax(-1).max()) < self.min_draft_prob:
                break
            token = logits.argmax(-1) if q is None else draw(q, r.gen)
            drafts.append(token)
            probs.append(q)
            if j == k - 1:
                break
            out = model.recycle(state, drafts[-1][:, None], input_pos=_slots(r.p + j, 1, r.device),
                                cache=r.mcache, pad=r.pad, kv_end=r.p + j + 1, num_logits=1, draft=True)
            r.stats.module_calls += 1
            logits, state = out.logits[:, -1], out.hidden
        if not drafts:
            return r.pending[:, None][:, :0], None
        return torch.stack(drafts, dim=1), (torch.stack(probs, dim=1) if probs[0] is not None else None)


class LookupDrafter:
    """Prompt lookup (n-gram) as drafter: the k tokens that followed the latest earlier occurrence of the longest
    suffix (up to LOOKUP_NGRAM tokens) of the row's tokens, prompt and output alike (`prompt_lookup`). It runs no
    model, so its drafts cost nothing; they pay off where the output repeats its context (quotes, code edits,
    extraction)."""

    def __init__(self, r: Round) -> None:
        self.r = r

    def draft(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = prompt_lookup(self.r.seq, self.r.pad, self.r.p + 1, k)
        return tokens, point_mass(tokens, self.r.base.cfg.vocab_size, self.r.sampling)


def point_mass(tokens: torch.Tensor, vocab_size: int, sampling: SamplingParams) -> torch.Tensor | None:
    """The distributions of deterministic drafts (B, k) for the verifier: all the mass on each token (None when
    greedy). Draft d is then accepted with probability p(d), and a rejection draws from p without d, renormalised:
    the full model's distribution either way."""
    return None if sampling.greedy else torch.nn.functional.one_hot(tokens, vocab_size).float()


@torch.inference_mode()
def chain(model: RecycleModel | Transformer, prompts: Sequence[Sequence[int]], drafter: Callable[[Round], Drafter], *,
          max_new_tokens: int, draft_len: int = DEFAULT_DRAFT_LEN, sampling: SamplingParams = SamplingParams(),
          stop_ids: Sequence[int] = (), stream: StreamFn | None = None, name: str = "chain") -> DecodeResult:
    """Verified chains, whatever drafts them: each round the drafter that `drafter(round)` made proposes up to
    `draft_len` tokens, the full model verifies [x_p, drafts] in one call (step 3) and the round commits (step 4).
    model: a RecycleModel, or a bare Transformer for a drafter without the module."""
    K = check_draft_len(draft_len)
    r = Round(model, prompts, max_new_tokens, K + 1, name, sampling, stop_ids, stream)
    drafts = drafter(r)
    r.stats.accept_hist = [0] * (K + 1)
    done = r.prefill()
    while not done:
        draft, probs = drafts.draft(K)
        k = draft.shape[1]
        full = r.base(torch.cat((r.pending[:, None], draft), dim=1), input_pos=_slots(r.p, k + 1, r.device),
                      cache=r.cache, pad=r.pad, kv_end=r.p + k + 1, taps=r.taps)
        a, tokens = verify_chain(draft, probs, full.logits, r.sampling, r.gen)
        done = r.commit(int(a.min()), tokens, r.state_of(full))  # the round's host sync
    return r.finish()


def speculative(model: RecycleModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                draft_len: int = DEFAULT_DRAFT_LEN, sampling: SamplingParams = SamplingParams(),
                stop_ids: Sequence[int] = (), stream: StreamFn | None = None, min_draft_prob: float = 0.0,
                name: str = "speculative") -> DecodeResult:
    """Chain drafts of up to `draft_len` tokens by the module (`ModuleDrafter`), verified by the full model in one
    call each (lossless).

    min_draft_prob: adaptive draft length. A round stops drafting where the module's most likely next token has a
    draft probability below this on every row; with no draft at all the round is a plain decode step. The rule
    reads the draft distribution alone, never the full model nor the drawn token, so the output stays exact. It
    costs a host sync per draft, which the eager loop pays anyway; where a full call on several tokens costs more
    than on one (the CPU: docs/speculative.md), it saves the calls and the verification width that low-confidence
    drafts waste.
    """
    if not 0.0 <= min_draft_prob < 1.0:
        raise ValueError(f"min_draft_prob must be in [0, 1), got {min_draft_prob!r}")
    return chain(model, prompts, lambda r: ModuleDrafter(r, min_draft_prob), max_new_tokens=max_new_tokens,
                 draft_len=draft_len, sampling=sampling, stop_ids=stop_ids, stream=stream, name=name)


def lookup(model: Transformer | RecycleModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
           draft_len: int = DEFAULT_DRAFT_LEN, sampling: SamplingParams = SamplingParams(),
           stop_ids: Sequence[int] = (), stream: StreamFn | None = None, name: str = "lookup") -> DecodeResult:
    """Prompt-lookup decoding (lossless, no module): chains of `draft_len` tokens drafted by `LookupDrafter`,
    verified by the full model in one call each. A RecycleModel's module is not used."""
    return chain(model.base if isinstance(model, RecycleModel) else model, prompts, LookupDrafter,
                 max_new_tokens=max_new_tokens, draft_len=draft_len, sampling=sampling, stop_ids=stop_ids,
                 stream=stream, name=name)


def recycle_verified(model: RecycleModel, prompts: Sequence[Sequence[int]], **kw) -> DecodeResult:
    """The paper's alternating schedule, with each recycled token verified by the next full call (lossless)."""
    return speculative(model, prompts, draft_len=1, name="recycle-verified", **kw)


# -- the draft tree ----------------------------------------------------------------------------------------------


class TreeDraft(NamedTuple):
    """A drafted tree, ready for verification: N kept nodes below the root (the pending token, at slot p)."""

    tokens: torch.Tensor  # (B, N)
    parent: torch.Tensor  # (B, N), into [root, nodes]
    depth: torch.Tensor  # (B, N), 1 for the root's children
    sees: torch.Tensor  # (B, N+1, N+1): ancestor-or-self flags over [root, nodes]
    positions: torch.Tensor  # (B, N+1): p + depth, the root at p


def tree_attention(pad: torch.Tensor | None, p, positions: torch.Tensor, sees: torch.Tensor, kv_end: int) -> Tree:
    """The `Tree` for T new tokens in the n slots from p: each sees the committed slots [pad_b, p) and, among the
    tree's slots p..p+n-1, those flagged in sees (B, T, n). positions (B, T) count the padding (it is removed here).
    p may be an int or a (1,) device tensor (the engine's), so the mask needs no host value of p."""
    B, T, n = sees.shape
    slots = torch.arange(kv_end, device=sees.device)
    lo = pad[:, None] if pad is not None else torch.zeros(B, 1, dtype=torch.long, device=sees.device)
    committed = (slots[None] < p) & (slots[None] >= lo)  # (B, kv_end)
    rel = slots - p  # a tree slot's index, for slots p..p+n-1
    in_tree = (rel >= 0) & (rel < n)
    tree_part = sees.gather(2, rel.clamp(0, n - 1)[None, None].expand(B, T, kv_end)) & in_tree
    mask = committed[:, None, :] | tree_part
    return Tree(positions - (pad[:, None] if pad is not None else 0), mask[:, None])


def draft_tree(recycle_fn, top_fn, mcache: KVCache, pad: torch.Tensor | None, p, kv_end: int, state: torch.Tensor,
               shape: TreeShape, cuda_path: bool = False) -> TreeDraft:
    """Expand a draft tree with the module (EAGLE-2's dynamic tree).

    state (B, 1, d): the module's output at slot p-1 (its catch-up), which predicts x_{p+1}. The root's top-k
    become depth-1 candidates; at each further level the k best frontier nodes (by cumulative draft
    log-probability) are expanded in one module call over k tokens, each at module slot p + (level-1)*k + j and
    seeing its ancestors' expansion slots, and their top-k children become candidates. The best N candidates are
    kept. recycle_fn is `RecycleModel.recycle` (or a compiled copy), top_fn `RecycleModel.draft_top`; p an int or a
    (1,) device tensor; kv_end an upper bound for the module slots (>= p + (depth-1)*k). Shapes depend only on
    `shape`: graph-capturable. cuda_path: the CUDA path's sort-free selections on any device
    (KernelConfig.cuda_paths_on_cpu).
    """
    D, k, N = shape.depth, shape.topk, shape.nodes
    B, dev = state.shape[0], state.device
    ar = torch.arange(k, device=dev)
    top_logp, top_ids = top_fn(state[:, 0], k)  # (B, k)
    # candidates in creation order (parents before children): token, score, parent (-1: root), depth, and the
    # ancestor-or-self flags over all candidates; the frontier is the k candidates expanded next
    tok, score = [top_ids], [top_logp]
    parent = [torch.full((B, k), -1, dtype=torch.long, device=dev)]
    depth = [torch.ones(k, dtype=torch.long, device=dev)]
    M_max = k + (D - 1) * k * k
    anc = torch.zeros(B, M_max, M_max, dtype=torch.bool, device=dev)
    true = torch.ones((), dtype=torch.bool, device=dev)  # a device value: no host copy inside a CUDA graph
    anc[:, ar, ar] = true
    own = torch.eye(k, dtype=torch.bool, device=dev).expand(B, k, k)
    front = ar.expand(B, k)  # candidate ids of the frontier
    front_state = state.expand(B, k, state.shape[-1])
    front_sees = own  # over the expansion slots used so far
    M = k
    for level in range(1, D):
        front_tok = torch.cat(tok, 1).gather(1, front)
        positions = (p + level - 1) + torch.zeros(B, k, dtype=torch.long, device=dev)
        out = recycle_fn(front_state, front_tok, input_pos=p + (level - 1) * k + ar, cache=mcache, kv_end=kv_end,
                         tree=tree_attention(pad, p, positions, front_sees, kv_end), num_logits=0)
        child_logp, child_ids = top_fn(out.hidden, k)  # (B, k, k)
        cand_score = (torch.cat(score, 1).gather(1, front)[..., None] + child_logp).reshape(B, k * k)
        cand_parent = front[..., None].expand(B, k, k).reshape(B, k * k)
        ids = torch.arange(M, M + k * k, device=dev)
        anc[:, ids] = anc.gather(1, cand_parent[..., None].expand(B, k * k, M_max))
        anc[:, ids, ids] = true
        tok.append(child_ids.reshape(B, k * k))
        score.append(cand_score)
        parent.append(cand_parent)
        depth.append(torch.full((k * k,), level + 1, dtype=torch.long, device=dev))
        # the next frontier: the k best new candidates, each seeing its parent's expansion slots and its own
        best = top_k(cand_score, k, cuda_path=cuda_path)[1]  # (B, k), into the k*k new candidates
        from_slot = best // k  # the parent's place in this level's frontier (= its expansion slot)
        front_sees = torch.cat((front_sees.gather(1, from_slot[..., None].expand(B, k, front_sees.shape[-1])), own),
                               dim=-1)
        front_state = out.hidden.gather(1, from_slot[..., None].expand(B, k, out.hidden.shape[-1]))
        front = M + best
        M += k * k
    tok, score, parent, depth = torch.cat(tok, 1), torch.cat(score, 1), torch.cat(parent, 1), torch.cat(depth)
    # keep the best N; scores never rise along a path and ties go to the lower index (a parent before an
    # equal-scored child), so the kept set is closed under ancestors
    keep = best_in_order(score, N, cuda_path=cuda_path)  # (B, N)
    where = torch.full((B, M), -1, dtype=torch.long, device=dev)  # candidate -> its index among the kept
    where.scatter_(1, keep, torch.arange(N, device=dev).expand(B, N))
    k_parent = parent.gather(1, keep)
    k_parent = torch.where(k_parent < 0, 0, where.gather(1, k_parent.clamp(min=0)) + 1)  # into [root, kept]
    k_depth = depth[keep]
    sees = torch.zeros(B, N + 1, N + 1, dtype=torch.bool, device=dev)
    sees[:, :, 0] = True  # the root (the pending token)
    sees[:, 1:, 1:] = anc[:, :M, :M].gather(1, keep[..., None].expand(B, N, M)).gather(2, keep[:, None].expand(B, N, N))
    positions = p + torch.cat((torch.zeros(B, 1, dtype=torch.long, device=dev), k_depth), 1)
    return TreeDraft(tok.gather(1, keep), k_parent, k_depth, sees, positions)


LOOKUP_NGRAM = 3  # the longest suffix prompt_lookup matches


def prompt_lookup(seq: torch.Tensor, lo: torch.Tensor | None, end, length: int,
                  ngram: int = LOOKUP_NGRAM) -> torch.Tensor:
    """Prompt-lookup drafts on the device: per row, the `length` tokens that followed the latest earlier occurrence
    of the longest suffix (up to `ngram` tokens) of the row's sequence seq[b, lo_b:end].

    seq (B, S): tokens by cache slot (the prompt, left-padded, then every emitted token; slots past end are stale);
    lo (B,): each row's first real slot (None: 0); end: an int or a (1,) device tensor, one past the last token.
    Returns (B, length) token ids. Where nothing matches, the continuation is the last token's (the last token
    repeated), and a continuation that runs into the last token repeats it: proposals only, which verification
    accepts or not, and read from the slots before end alone, so that a left-padded, longer or stale buffer (the
    engine's) proposes the same tokens as the exact one of the reference loop. Shapes are fixed and no value goes
    to the host, so a CUDA graph can hold it.
    """
    B, S = seq.shape
    dev = seq.device
    e = torch.arange(S, device=dev)  # the last slot of a candidate occurrence
    last = torch.as_tensor(end, device=dev).view(1, 1) - 1
    lo = lo.view(B, 1) if lo is not None else torch.zeros(B, 1, dtype=torch.long, device=dev)
    run = (e < last) & (e >= lo)  # an earlier occurrence, inside the row's real tokens
    score = torch.zeros(B, S, dtype=torch.long, device=dev)
    for j in range(ngram):  # the occurrence's j-th token from its end against the sequence's
        key = seq.gather(1, (last - j).clamp(min=0).expand(B, 1))
        run = run & (e - j >= lo) & (last - j >= lo) & (seq.gather(1, (e - j).clamp(min=0).expand(B, S)) == key)
        score = score + run.long()
    best = torch.where(e <= last, score * S + e, -1).argmax(-1)  # the longest match, the latest among equals
    return seq.gather(1, torch.minimum(best[:, None] + 1 + torch.arange(length, device=dev), last))


def add_lookup_branch(t: TreeDraft, chain: torch.Tensor) -> TreeDraft:
    """t with the chain (B, L) added as one more branch, grafted where the drafted tree already spells it.

    Chain node j (index N+1+j in [root, nodes]) stands at depth j+1. The longest prefix chain[:q] that is a path of
    drafted nodes from the root is already in the tree: those q chain nodes are switched off (each its own parent,
    so `verify_tree` never accepts them), node q hangs under the drafted node that ends that path, and the rest
    follow each other. Siblings thus keep distinct tokens, which sampling needs: two equal siblings would be two
    independent draws of the same position. Shapes stay fixed (N + L nodes).
    """
    B, N = t.tokens.shape
    L = chain.shape[1]
    dev = chain.device
    cur = torch.zeros(B, dtype=torch.long, device=dev)  # the drafted path's end, into [root, nodes]
    q = torch.zeros(B, dtype=torch.long, device=dev)
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    for d in range(L):  # a drafted child of cur whose token is chain[d] extends the shared path
        hit = (t.parent == cur[:, None]) & (t.tokens == chain[:, d:d + 1]) & alive[:, None]
        found = hit.any(-1)
        cur = torch.where(found, hit.long().argmax(-1) + 1, cur)
        q, alive = q + found.long(), alive & found
    j = torch.arange(L, device=dev)
    live = j[None] >= q[:, None]  # (B, L): chain nodes that are not already drafted
    parent = torch.where(~live, N + 1 + j[None], torch.where(j[None] == q[:, None], cur[:, None], N + j[None]))
    depth = (j + 1).expand(B, L)
    # what a live chain node sees: the drafted path to cur (its ancestors-or-self row), then chain nodes q..itself;
    # a switched-off one: the root and the chain up to itself (it is never accepted; its keys are never kept)
    root_only = torch.arange(N + 1, device=dev) == 0
    path_rows = t.sees.gather(1, cur[:, None, None].expand(B, 1, N + 1))  # (B, 1, N+1)
    tree_part = torch.where(live[..., None], path_rows, root_only)  # (B, L, N+1)
    tri = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
    chain_part = tri & (~live[..., None] | (j[None, None, :] >= q[:, None, None]))  # (B, L, L)
    sees = torch.cat((torch.cat((t.sees, torch.zeros(B, N + 1, L, dtype=torch.bool, device=dev)), 2),
                      torch.cat((tree_part, chain_part), 2)), 1)
    positions = torch.cat((t.positions, t.positions[:, :1] + depth), 1)
    return TreeDraft(torch.cat((t.tokens, chain), 1), torch.cat((t.parent, parent), 1),
                     torch.cat((t.depth, depth), 1), sees, positions)


@torch.inference_mode()
def tree(model: RecycleModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
         shape: TreeShape = TreeShape(), sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] = (),
         stream: StreamFn | None = None, name: str = "tree") -> DecodeResult:
    """A draft tree per round, verified in one full call under a tree mask (lossless, greedy and sampling)."""
    D, N = shape.check().depth, shape.verified
    r = Round(model, prompts, max_new_tokens, max(N, shape.module_slots) + 1, name, sampling, stop_ids, stream)
    r.stats.accept_hist = [0] * (D + 1)
    done = r.prefill()
    while not done:
        p, B, dev = r.p, len(r.out.tokens), r.device
        _, state = r.catch_up(logits=False)
        t = draft_tree(model.recycle, model.draft_top, r.mcache, r.pad, p, p + shape.module_slots, state, shape,
                       model.kernels.cuda_paths_on_cpu)
        if shape.lookup:
            t = add_lookup_branch(t, prompt_lookup(r.seq, r.pad, p + 1, shape.lookup))
        r.stats.module_calls += D - 1
        full = r.base(torch.cat((r.pending[:, None], t.tokens), 1), input_pos=_slots(p, N + 1, dev), cache=r.cache,
                      kv_end=p + N + 1, tree=tree_attention(r.pad, p, t.positions, t.sees, p + N + 1),
                      taps=model.taps)
        a, tokens, path = verify_tree(t.tokens, t.parent, t.depth, D, full.logits, sampling, r.gen)
        m = int(a.min())  # the round's host sync
        if m:  # move the accepted path's keys and values into slots p+1..p+m
            r.cache.move(p + path[:, :m], _slots(p + 1, m, dev))
        on_path = torch.cat((torch.zeros(B, 1, dtype=torch.long, device=dev), path[:, :m]), 1)
        state = model.state(full)
        done = r.commit(m, tokens, state.gather(1, on_path[..., None].expand(B, m + 1, state.shape[-1])))
    return r.finish()
