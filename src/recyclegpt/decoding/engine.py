"""The decoding engine: static-shape decode steps, captured as CUDA graphs, with no host sync inside the loop.

`decoding/loops.py` holds the reference strategies: one eager forward per step, a host sync per step (the stop check).
Here the same strategies run as fixed-shape *steps* over preallocated caches:

- `standard` step: the full model on 1 token per row, then the next token.
- `recycle` step: the full model on the pair [x_p, x̂_{p+1}], its token x_{p+2}, the module on the same two slots,
  its token x̂_{p+3} (the paper's schedule, two tokens per full call; decoding.recycle documents the slots).
- verified rounds (`recycle-verified`, `speculative`, `tree`, `lookup`; decoding/speculative.py documents them and holds
  their reference loops): the module (or prompt lookup) drafts, the full model verifies, the accepted tokens plus
  one are written to the output, and the module catches up on the committed slots, all on the device. A round
  emits a variable number of tokens, so the slot p, the output length n and the acceptance histogram are device
  tensors; the host keeps an upper bound of p (for the attention bucket) and learns the truth at each check.

Every step reads and writes only device tensors that live as long as the `Decoder` (token and position buffers,
the caches, an output buffer), so a step can be captured once as a CUDA graph and replayed: one launch instead of
~1,300 kernel launches from Python (docs/engine.md counts them). Attention reads the cache up to a *bucket*
boundary (a multiple of `bucket` slots) through the position mask, so one graph serves every position inside its
bucket; graphs are captured lazily, per step kind and bucket. The prompt's forward (base and module) is a graph
too: prompts are left-padded to a multiple of `prefill_bucket` tokens (the same positions and outputs; padding
slots are masked), one graph per padded length. Greedy steps select the token inside the graph; sampling selects
it eagerly from the graph's logits (a few kernels), with the same `sampling.sample`.

The host learns the tokens every `check_every` steps (one sync), when it also checks stop tokens and budgets;
the steps already launched past a stop are wasted work, never wrong output. On the CPU the same steps run eagerly
(graphs=False): the test oracle of the captured path, and of batched against per-prompt decoding.

Which round runs a strategy is its registry entry's (`strategies.Strategy.round`).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import OrderedDict
from typing import Callable, Iterator, NamedTuple, Sequence

import torch

from ..models import (
    KVCache,
    RecycleModel,
    Tables,
    Transformer,
    call_tables,
    fuse_projections,
    prefill_attention,
    round_up,
    transposed_faster,
)
from ..models.quantize import quantized
from . import strategies, topk
from .loops import (
    Collector,
    DecodeResult,
    DecodeStats,
    PromptBatch,
    StreamFn,
    _sync,
    check_budget,
)
from .sampling import RowSampling, SamplingParams, draw, logits_to_probs, sample
from .speculative import (
    DEFAULT_DRAFT_LEN,
    TreeShape,
    add_lookup_branch,
    check_draft_len,
    draft_tree,
    point_mass,
    prompt_lookup,
    tree_attention,
)
from .verify import verify_chain, verify_tree

MAX_ROUND_TOKENS = 64  # a verified round keeps at most this many tokens (draft length or tree depth + 1)
KV_BUCKET = 256  # attention reads the cache up to a multiple of this many slots: one graph (and compile) per bucket
PREFILL_BUCKET = 64  # with graphs, prompts are left-padded to a multiple of this many tokens: one graph per length


class Decoder:
    """Static buffers and (optionally) captured steps for one model, batch size and cache length.

    Reuse one Decoder across calls with the same batch size (the graphs stay captured); a call whose prompt plus
    budget does not fit `max_len` needs a larger Decoder (`Engine` keeps one per shape).
    """

    def __init__(self, model: Transformer | RecycleModel, batch_size: int, max_len: int, *, graphs: bool = False,
                 bucket: int = KV_BUCKET, compile: bool | str = False, fuse: bool | None = None,
                 prefill_bucket: int | None = None, compile_steps: bool = False,
                 compile_prefill: bool = True) -> None:
        """prefill_bucket: left-pad prompts to a multiple of this many tokens, so that their forward is captured
        too (default PREFILL_BUCKET with graphs, 0 = no padding without); a prompt whose padding would not fit the
        cache runs unpadded and eagerly. compile: torch.compile the model's forwards inside the graphs; a string is
        inductor's mode (e.g. "max-autotune-no-cudagraphs", which times candidate matmul kernels per shape).
        compile_steps: with compile, also compile each greedy step and round whole, so that inductor fuses its glue
        (token selection, output writes, a tree's bookkeeping) with the forwards (each traces as one graph).
        compile_prefill: with compile, also compile the prompt's forwards (the base's and the module's), with dynamic
        shapes: one compile serves every padded prompt length, each still replayed as a CUDA graph of its length;
        without it the prompt's graph holds the eager operators (~1,700 kernels for SmolLM2). It halves the time to
        the first token and costs compile time once per process (docs/engine.md has the measurements).
        fuse: fused QKV and gate-up matmuls (model.fuse_projections; default: with graphs, where launches
        dominate). The values are the same up to the matmul's rounding, so tokens can differ in the last bit of a
        near-tie from an unfused run."""
        if graphs if fuse is None else fuse:
            fuse_projections(model)
        self.rmodel = model if isinstance(model, RecycleModel) else None
        self.base: Transformer = model.base if self.rmodel is not None else model
        self.taps = self.rmodel.taps if self.rmodel is not None else ()  # base layers the module reads
        self.cuda_path = self.base.kernels.cuda_paths_on_cpu  # the CUDA paths' selections on the CPU too (tests)
        p = self.base.tok_emb.weight
        self.device, self.B = p.device, batch_size
        if graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; use graphs=False on the CPU")
        self.graphs_enabled, self.bucket = graphs, bucket
        self.prefill_bucket = (PREFILL_BUCKET if graphs else 0) if prefill_bucket is None else prefill_bucket
        if not isinstance(self.prefill_bucket, int) or self.prefill_bucket < 0:
            raise ValueError(f"prefill_bucket must be an integer >= 0 (0: no padding), got {prefill_bucket!r}")
        self.max_len = round_up(max_len, bucket)
        cfg = self.base.cfg
        if self.max_len > cfg.context_length:
            self.max_len = cfg.context_length
        self.cache: KVCache = self.base.new_cache(batch_size, self.max_len)
        self.mcache: KVCache | None = (self.rmodel.module.new_cache(batch_size, self.max_len)
                                       if self.rmodel is not None else None)
        dev, long = self.device, torch.long
        self.pos = torch.zeros(1, dtype=long, device=dev)  # slot of the step's first input token
        self.n = torch.zeros(1, dtype=long, device=dev)  # tokens written to `out` per row
        self.pad = torch.zeros(batch_size, dtype=long, device=dev)
        self.x_next = torch.zeros(batch_size, 1, dtype=long, device=dev)  # the full model's latest token
        self.x_rec = torch.zeros(batch_size, 1, dtype=long, device=dev)  # the module's latest token (recycle)
        self.x_new = torch.zeros(batch_size, dtype=long, device=dev)  # a sampled x_{p+2}, staged for the module
        # a verified round writes its whole token table at n, past the tokens it keeps: room for two cache lengths
        self.out = torch.zeros(batch_size, 2 * self.max_len + 2, dtype=long, device=dev)
        self.logits = torch.zeros(batch_size, cfg.vocab_size, dtype=p.dtype, device=dev)
        self.hidden2 = torch.zeros(batch_size, 2, cfg.d_model, dtype=p.dtype, device=dev)
        self.offsets = torch.arange(2, dtype=long, device=dev)
        # verified rounds: the module's output at slot p-1 (its state and its logits for x_{p+1}), the histogram
        # of accepted draft lengths
        self.g = torch.zeros(batch_size, 1, cfg.d_model, dtype=p.dtype, device=dev)
        self.d_logits = torch.zeros(batch_size, cfg.vocab_size, dtype=p.dtype, device=dev)
        # int32: inductor lowers an int32 index_add_ to one atomic add; an int64 one falls back to aten's index_put_
        # (seen in the CPU's compiled code; on CUDA most likely the few small aten kernels in every profiled round)
        self.hist = torch.zeros(MAX_ROUND_TOKENS, dtype=torch.int32, device=dev)
        # rows that hold a request: a verified round keeps the same number of tokens on every row, the fewest any
        # live row accepted (a continuous batch's idle rows do not hold the others back)
        self.live = torch.ones(batch_size, dtype=torch.bool, device=dev)
        # the tree's lookup branch: tokens by cache slot (a round writes its table past p, hence the margin)
        self.seq = torch.zeros(batch_size, self.max_len + MAX_ROUND_TOKENS + 1, dtype=long, device=dev)
        self._ar = torch.arange(self.max_len, dtype=long, device=dev)
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._prompt: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # by length: ids, module state
        self._chunk_next: dict[int, torch.Tensor] = {}  # by chunk length: the tokens after a chunk's slots
        self._pool = torch.cuda.graph_pool_handle() if graphs else None
        self.rec_draft = False  # recycle takes the module's tokens over its draft vocabulary (set by decode)
        self._base_fwd, self._recycle_fwd = self.base.forward, (self.rmodel.recycle if self.rmodel else None)
        self._prompt_base, self._prompt_module = self._base_fwd, self._recycle_fwd  # the prompt's forwards
        # the greedy fixed steps make their slots, rotary tables and mask in a function of their own (compiled apart)
        # and hand them to their forwards: one set for a recycle step's full and module calls, and no copies of them
        # by inductor for the custom ops that read them (docs/engine.md: step tables)
        self._tables_fn = self._tables
        if compile:  # inductor fuses the element-wise chains; the graphs then hold far fewer kernels
            # every step kind and bucket is a shape of its own (a tree round calls the module with three): allow
            # more than dynamo's default of 8 specialisations per function before it falls back to eager
            cfg_ = torch._dynamo.config
            name = "recompile_limit" if hasattr(cfg_, "recompile_limit") else "cache_size_limit"
            setattr(cfg_, name, max(getattr(cfg_, name), 64))
            mode = compile if isinstance(compile, str) and compile != "default" else None
            self._base_fwd = torch.compile(self._base_fwd, dynamic=False, mode=mode)
            self._tables_fn = torch.compile(self._tables, dynamic=False, mode=mode)
            if self.rmodel is not None:
                self._recycle_fwd = torch.compile(self._recycle_fwd, dynamic=False, mode=mode)
            if compile_prefill:  # one dynamic-shape compile for every prompt length
                self._prompt_base = torch.compile(self.base.forward, dynamic=True, mode=mode)
                if self.rmodel is not None:
                    self._prompt_module = torch.compile(self.rmodel.recycle, dynamic=True, mode=mode)
        self._whole: dict[str, Callable] = {}  # greedy steps compiled whole (compile_steps)
        if compile_steps:
            if not compile:
                raise ValueError("compile_steps needs compile")
            for name in ("_standard_greedy", "_recycle_greedy", "_chain_round", "_tree_round", "_lookup_round"):
                self._whole[name] = torch.compile(getattr(self, name), dynamic=False, mode=mode)

    # -- the steps: device tensors in, device tensors out ----------------------------------------------------------

    def _emit(self, tokens: torch.Tensor) -> None:
        """Append tokens (B, k) to `out` at column n, and advance n."""
        k = tokens.shape[1]
        self.out.index_copy_(1, self.n + self.offsets[:k], tokens)
        self.n.add_(k)

    def _tables(self, T: int, kv_end: int) -> Tables:
        """The slots p..p+T-1 of a fixed step, with their rotary tables and mask (`model.call_tables`)."""
        input_pos = self.pos if T == 1 else self.pos + self.offsets[:T]
        return call_tables(self.base.cfg, input_pos, self.pad, kv_end, self.logits.dtype)

    def _standard_forward(self, kv_end: int, tables: Tables | None = None) -> None:
        out = self._base_fwd(self.x_next, input_pos=self.pos, cache=self.cache, pad=self.pad, kv_end=kv_end,
                             num_logits=1, tables=tables)
        self.logits.copy_(out.logits[:, -1])

    def _standard_select(self, token: torch.Tensor) -> None:
        self.x_next.copy_(token[:, None])
        self._emit(self.x_next)
        self.pos.add_(1)

    def _standard_greedy(self, kv_end: int, tables: Tables | None = None) -> None:
        self._standard_forward(kv_end, tables)
        self._standard_select(topk.argmax(self.logits, cuda_path=self.cuda_path))

    def _full_pair(self, kv_end: int, tables: Tables | None = None) -> None:
        """The full model on [x_p, x̂_{p+1}]: logits at slot p+1 (for x_{p+2}) and both hidden states."""
        pair = torch.cat((self.x_next, self.x_rec), dim=1)
        out = self._base_fwd(pair, input_pos=None if tables else self.pos + self.offsets, cache=self.cache,
                             pad=self.pad, kv_end=kv_end, num_logits=1, taps=self.taps, tables=tables)
        self.logits.copy_(out.logits[:, -1])
        self.hidden2.copy_(self.rmodel.state(out))

    def _module_pair(self, kv_end: int, x_new: torch.Tensor, head: bool = True,
                     tables: Tables | None = None) -> torch.Tensor:
        """Given x_{p+2} (B,): the module on slots p, p+1; its logits (for x̂_{p+3}) into `logits` (over the draft
        vocabulary with `rec_draft`). head=False leaves the head to the caller: returns the output at p+1 (B, d).
        The module's last layer computes its products for p+1 alone (`outputs=1`; its attention still caches both
        slots): a row's bits do not depend on the rows beside it in the fused products, so the tokens are those of
        the call on both."""
        rec = self._recycle_fwd(self.hidden2, torch.cat((self.x_rec, x_new[:, None]), dim=1),
                                input_pos=None if tables else self.pos + self.offsets, cache=self.mcache,
                                pad=self.pad, kv_end=kv_end, num_logits=1 if head else 0, draft=self.rec_draft,
                                outputs=1, tables=tables)
        self.x_next.copy_(x_new[:, None])
        self._emit(self.x_next)
        if head:
            self.logits.copy_(rec.logits[:, -1])
        return rec.hidden[:, -1]

    def _module_select(self, token: torch.Tensor) -> None:
        self.x_rec.copy_(token[:, None])
        self._emit(self.x_rec)
        self.pos.add_(2)

    def _recycle_greedy(self, kv_end: int, tables: Tables | None = None) -> None:
        self._full_pair(kv_end, tables)
        # the module's token as every greedy recycle path takes it (RecycleModel.module_argmax: over the draft
        # vocabulary without V-wide logits where it recycles over it)
        out = self._module_pair(kv_end, topk.argmax(self.logits, cuda_path=self.cuda_path), head=False, tables=tables)
        self._module_select(self.rmodel.module_argmax(out))

    def _chain_round(self, K: int, kv_end: int, sampling: SamplingParams, gen) -> None:
        """Draft K tokens from (g, d_logits), verify them in one full call, commit (speculative.speculative). K = 0:
        the full model's next token alone, the module kept in step (`Plan.undrafted`)."""
        if K == 0:
            self._verify_chain(self.x_next[:, :0], None, kv_end, sampling, gen)
            return
        logits, g = self.d_logits, self.g
        drafts, probs = [], []
        for j in range(K):
            q = None if sampling.greedy else logits_to_probs(logits, sampling)
            drafts.append(topk.argmax(logits, cuda_path=self.cuda_path) if q is None else draw(q, gen))
            probs.append(q)
            if j < K - 1:  # the module rolls on at slot p + j, fed its own output state
                rec = self._recycle_fwd(g, drafts[-1][:, None], input_pos=self.pos + j, cache=self.mcache,
                                        pad=self.pad, kv_end=kv_end, num_logits=1, draft=True)
                logits, g = rec.logits[:, -1], rec.hidden
        self._verify_chain(torch.stack(drafts, dim=1), None if probs[0] is None else torch.stack(probs, dim=1),
                           kv_end, sampling, gen)

    def _lookup_round(self, K: int, kv_end: int, sampling: SamplingParams, gen) -> None:
        """Draft K tokens by prompt lookup over the tokens by slot, verify them, commit (speculative.lookup)."""
        draft = prompt_lookup(self.seq, self.pad, self.pos + 1, K)
        self._verify_chain(draft, point_mass(draft, self.logits.shape[-1], sampling), kv_end, sampling, gen,
                           module=False)

    def _verify_chain(self, draft: torch.Tensor, probs: torch.Tensor | None, kv_end: int, sampling: SamplingParams,
                      gen, module: bool = True) -> None:
        """The chain's verifier, whatever drafted (speculative.chain): the full model on [x_p, drafts] in one call,
        `verify_chain`, the commit. module=False (prompt lookup): no module to catch up; the round's tokens are
        written by slot instead, for the next lookup."""
        K = draft.shape[1]
        full = self._base_fwd(torch.cat((self.x_next, draft), dim=1), input_pos=self.pos + self._ar[:K + 1],
                              cache=self.cache, pad=self.pad, kv_end=kv_end, taps=self.taps if module else ())
        a, tokens = verify_chain(draft, probs, full.logits, sampling, gen)
        if not module:  # those past the commit are rewritten by later rounds
            self.seq.index_copy_(1, self.pos + 1 + self._ar[:K + 1], tokens)
        self._commit(a, tokens, self.rmodel.state(full) if module else None, kv_end)

    def _tree_round(self, shape: TreeShape, kv_end: int, sampling: SamplingParams, gen) -> None:
        """Draft a tree from g, verify it in one full call, commit its path (speculative.tree)."""
        D, N = shape.depth, shape.verified
        t = draft_tree(self._recycle_fwd, self.rmodel.draft_top, self.mcache, self.pad, self.pos, kv_end, self.g,
                       shape, self.cuda_path)
        if shape.lookup:
            t = add_lookup_branch(t, prompt_lookup(self.seq, self.pad, self.pos + 1, shape.lookup))
        full = self._base_fwd(torch.cat((self.x_next, t.tokens), dim=1), input_pos=self.pos + self._ar[:N + 1],
                              cache=self.cache, kv_end=kv_end,
                              tree=tree_attention(self.pad, self.pos, t.positions, t.sees, kv_end), taps=self.taps)
        a, tokens, path = verify_tree(t.tokens, t.parent, t.depth, D, full.logits, sampling, gen)
        # every row's path moves to slots p+1..p+D; past the committed minimum it lands on rejected slots
        self.cache.move(self.pos + path, self.pos + 1 + self._ar[:D])
        if shape.lookup:  # the round's tokens by slot, for the next lookup (those past the commit are rewritten)
            self.seq.index_copy_(1, self.pos + 1 + self._ar[:D + 1], tokens)
        on_path = torch.cat((torch.zeros_like(path[:, :1]), path), dim=1)
        state = self.rmodel.state(full)
        self._commit(a, tokens, state.gather(1, on_path[..., None].expand(-1, -1, state.shape[-1])), kv_end,
                     draft_logits=False)

    def _commit(self, a: torch.Tensor, tokens: torch.Tensor, state: torch.Tensor | None, kv_end: int, *,
                draft_logits: bool = True) -> None:
        """Keep m = min(a) + 1 tokens of the table (B, T) on every row, then catch the module up on slots p..p+T-1
        (state: what the module reads there, from the full model; None: no module) and take its output at p+m, the
        new p-1. draft_logits: also its draft logits there (d_logits; the tree drafts from g alone)."""
        T = tokens.shape[1]
        m = torch.where(self.live, a, T - 1).min().view(1)
        self.out.index_copy_(1, self.n + self._ar[:T], tokens)  # the tokens past m are overwritten later
        self.n.add_(m + 1)
        self.hist.index_add_(0, m, torch.ones_like(m, dtype=torch.int32))
        if state is not None:
            rec = self._recycle_fwd(state, tokens, input_pos=self.pos + self._ar[:T], cache=self.mcache,
                                    pad=self.pad, kv_end=kv_end, num_logits=0)
            self.g.copy_(rec.hidden.gather(1, m.view(1, 1, 1).expand(self.B, 1, rec.hidden.shape[-1])))
            if draft_logits:
                self.d_logits.copy_(self.rmodel.draft_logits(self.g)[:, 0])
        self.x_next.copy_(tokens.gather(1, m.view(1, 1).expand(self.B, 1)))
        self.pos.add_(m + 1)

    # -- continuous batching: rows that join and leave (decoding/batching.py drives them) ------------------------

    def adopt(self, row: int, src: Decoder, src_row: int, length: int, end: int, p: int) -> None:
        """Take the request in `src`'s row `src_row` (a one-row Decoder that has just prefilled it, or the smaller
        or larger Decoder of a batch that changes size), its last `length` slots ending before `end`, into `row`
        at slots p-length..p-1 (pad p-length): both caches, the next tokens, the module's state and the tokens by
        slot. Positions are slot - pad, so the row goes on at position `length` exactly as it would alone."""
        a, lo = end - length, p - length
        for mine, theirs in ((self.cache, src.cache), (self.mcache, src.mcache)):
            if mine is not None:
                mine.k[:, row, :, lo:p] = theirs.k[:, src_row, :, a:end]
                mine.v[:, row, :, lo:p] = theirs.v[:, src_row, :, a:end]
        for name in ("x_next", "x_rec", "g", "d_logits"):
            getattr(self, name)[row] = getattr(src, name)[src_row]
        self.seq[row, lo:p + 1] = src.seq[src_row, a:end + 1]
        self.pad[row] = lo
        self.live[row] = True

    def rebase(self, p: int, to: int, lo: int) -> None:
        """Move the live rows' slots lo..p-1 (lo: their smallest padding) by to - p, with their padding, so that the
        next slot is `to`; the rows that hold no request are left to see their own slot only."""
        d = to - p
        if d and p > lo:
            for cache in (self.cache, self.mcache):
                for buf in (cache.k, cache.v) if cache is not None else ():
                    for layer in buf:  # a layer at a time: the temporary stays small
                        layer[:, :, lo + d:p + d] = layer[:, :, lo:p].clone()
            self.seq[:, lo + d:p + d + 1] = self.seq[:, lo:p + 1].clone()
        self.pad.add_(d).masked_fill_(~self.live, to)
        self.pos.fill_(to)

    # -- graph capture ---------------------------------------------------------------------------------------------

    def _run(self, key: tuple, fn: Callable[[], None]) -> None:
        """Run fn once: eagerly, or by replaying its CUDA graph (captured on first use)."""
        if not self.graphs_enabled:
            fn()
            return
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(fn)
            self._graphs[key] = graph
        graph.replay()

    def _capture(self, fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        # warm up on a side stream (kernels pick their algorithms, allocator pools settle), then undo the warm-up's
        # effect on the small state; its cache and `out` writes are rewritten identically by the real step
        small = (self.pos, self.n, self.x_next, self.x_rec, self.logits, self.hidden2)
        state = [t.clone() for t in small]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for t, s in zip(small, state):
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            fn()
        return graph

    def prepare(self) -> None:
        """Before a call's first step: the draft head's rows (`refresh_draft_head`) and whether `recycle` takes the
        module's tokens over them."""
        if self.rmodel is None:
            return
        self.rmodel.refresh_draft_head()  # before any graph reads it
        self.rec_draft = self.rmodel.recycles_over_draft

    def _kv_end(self, pos_after: int) -> int:
        return min(self.max_len, round_up(pos_after, self.bucket))

    # -- one call --------------------------------------------------------------------------------------------------

    def _captures_prompt(self, L: int) -> bool:
        return self.graphs_enabled and self.prefill_bucket > 0 and L % self.prefill_bucket == 0

    def prefill(self, batch: PromptBatch, sampling: SamplingParams | RowSampling, gen) -> torch.Tensor | None:
        """Run the prompt through the base; `out` gets x_L. Returns the module's input states over the prompt
        (None without a module). With graphs, a prompt of a multiple of `prefill_bucket` tokens replays a graph
        of its length."""
        L = batch.length
        self.pad.copy_(batch.pad if batch.pad is not None else torch.zeros_like(self.pad))
        if self._captures_prompt(L):
            ids, state = self._prompt_buffers(L)
            ids.copy_(batch.ids)
            self._run(("prefill", L), lambda: self._prefill_forward(ids, state))
        else:
            state = self._prefill_forward(batch.ids, None)
        self._first_token(batch, sampling, gen)
        return state

    def _first_token(self, batch: PromptBatch, sampling: SamplingParams | RowSampling, gen) -> None:
        """After the base's forward over the whole prompt: x_L from `logits` into x_next and `out`, p = L."""
        L = batch.length
        self.x_next.copy_(self._pick(sampling, gen)[:, None])
        self.n.zero_()
        self._emit(self.x_next)
        self.pos.fill_(L)
        self.hist.zero_()
        self.seq[:, :L].copy_(batch.ids)  # tokens by slot, for the tree's lookup branch
        self.seq[:, L:L + 1].copy_(self.x_next)

    def _prompt_buffers(self, L: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Persistent tensors for captured prompts of length L (a graph reads and writes fixed addresses): the
        token ids and the module's input states."""
        if L not in self._prompt:
            d, dtype = self.base.cfg.d_model, self.logits.dtype
            state = torch.zeros(self.B, L, d, dtype=dtype, device=self.device) if self.rmodel is not None else None
            self._prompt[L] = (torch.zeros(self.B, L, dtype=torch.long, device=self.device), state)
        return self._prompt[L]

    def _prefill_forward(self, ids: torch.Tensor, state: torch.Tensor | None, start: int = 0) -> torch.Tensor | None:
        """The base over the prompt's tokens `ids` at slots start.. (attending to every slot before them): its last
        logits into `logits`; the module's input states into `state` (or returned, when state is None)."""
        L = ids.shape[1]
        with prefill_attention():
            full = self._prompt_base(ids, input_pos=self._ar[start:start + L], cache=self.cache, pad=self.pad,
                                     kv_end=start + L, num_logits=1, taps=self.taps)
        self.logits.copy_(full.logits[:, -1])
        if self.rmodel is None:
            return None
        if state is None:
            return self.rmodel.state(full)
        state.copy_(self.rmodel.state(full))
        return state

    def prefill_module(self, strategy: str, batch: PromptBatch, state: torch.Tensor,
                       sampling: SamplingParams | RowSampling, gen) -> None:
        """The module over the prompt's slots (state: what `prefill` returned). recycle: `out` gets x̂_{L+1}; the
        verified rounds keep its output at slot L-1 (g, d_logits), which the first round drafts from."""
        L = batch.length
        verified = strategies.get(strategy).round != "recycle"
        if self._captures_prompt(L):
            ids, _ = self._prompt_buffers(L)
            self._run(("prefill_module", L, verified, self.rec_draft),
                      lambda: self._module_prefill(ids, state, verified))
        else:
            self._module_prefill(batch.ids, state, verified)
        if not verified:
            self._recycled_token(sampling, gen)

    def _recycled_token(self, sampling: SamplingParams | RowSampling, gen) -> None:
        """After the module's forward over the whole prompt (recycle): x̂_{L+1} from `logits` into x_rec and `out`."""
        self.x_rec.copy_(self._pick(sampling, gen)[:, None])
        self._emit(self.x_rec)

    def prefill_chunks(self, strategy: str, batch: PromptBatch, chunk: int, sampling: SamplingParams | RowSampling,
                       gen) -> Iterator[bool]:
        """`prefill`, then `prefill_module` where `strategy` runs the module, over `batch` `chunk` slots at a time:
        each `next()` runs the base and the module over the next chunk, whose tokens attend to the slots of the
        chunks before them, and yields whether that was the last. Then the Decoder holds what the whole prompt's
        prefill leaves (up to the summation order of the shorter calls), so that a long prompt's prefill can be
        spread over the checks of a running batch. The prompt's length must be a multiple of `chunk`
        (left-pad it); with graphs and `chunk` a multiple of prefill_bucket, each chunk replays a graph of its
        slots."""
        L = batch.length
        if chunk < 1 or L % chunk:
            raise ValueError(f"a prompt of {L} tokens does not split into chunks of {chunk} tokens")
        rnd = strategies.get(strategy).round
        module, verified = strategies.ROUNDS[rnd], rnd != "recycle"
        if module and self.rmodel is None:
            raise ValueError(f"strategy {strategy!r} needs a Decoder built on a RecycleModel")
        self.pad.copy_(batch.pad if batch.pad is not None else torch.zeros_like(self.pad))
        captured = self._captures_prompt(chunk)
        if captured:  # persistent inputs: the chunk's tokens, its module states, the tokens that follow them
            ids, state = self._prompt_buffers(chunk)
            follow = self._chunk_next.setdefault(chunk, torch.zeros_like(ids))
        for start in range(0, L, chunk):
            end = start + chunk
            last, part = end == L, batch.ids[:, start:end]
            if captured:
                ids.copy_(part)
                self._run(("prefill_chunk", start, chunk), lambda: self._prefill_forward(ids, state, start))
            else:
                ids, state = part, self._prefill_forward(part, None, start)
            if last:
                self._first_token(batch, sampling, gen)
            if module:
                nxt = None if last else batch.ids[:, start + 1:end + 1]
                if captured:
                    nxt = None if last else follow.copy_(nxt)
                    self._run(("prefill_chunk_module", start, chunk, verified, last, self.rec_draft),
                              lambda: self._module_prefill(ids, state, verified, start, nxt))
                else:
                    self._module_prefill(ids, state, verified, start, nxt)
                if last and not verified:
                    self._recycled_token(sampling, gen)
            yield last

    def _module_prefill(self, ids: torch.Tensor, state: torch.Tensor, verified: bool, start: int = 0,
                        next_tokens: torch.Tensor | None = None) -> None:
        """The module over the slots of `ids` (from `start`), given the base's states there and the tokens that
        follow each (default: ids shifted, then x_next: the prompt's last part)."""
        L = ids.shape[1]
        if next_tokens is None:
            next_tokens = torch.cat((ids[:, 1:], self.x_next), dim=1)
        with prefill_attention():
            rec = self._prompt_module(state, next_tokens, input_pos=self._ar[start:start + L], cache=self.mcache,
                                      pad=self.pad, kv_end=start + L, num_logits=1, draft=verified or self.rec_draft,
                                      outputs=None if verified else 1)
        if verified:
            self.g.copy_(rec.hidden[:, -1:])
            self.d_logits.copy_(rec.logits[:, -1])
        else:
            self.logits.copy_(rec.logits[:, -1])

    def step_fn(self, name: str, greedy: bool = True) -> Callable:
        """The step or round method `name` as it runs: compiled whole (compile_steps) when greedy, else as it is
        (a sampled round draws from a host-side generator, eagerly)."""
        plain = getattr(self, name)
        return self._whole.get(name, plain) if greedy else plain

    def step(self, plan: "Plan", pos: int, sampling: SamplingParams, gen) -> None:
        """One decode step (or verified round) with the device slot p at most `pos` (the host's bound)."""
        kv_end = self._kv_end(pos + plan.span)
        if not plan.fixed:  # a verified round: chain, tree or lookup
            rnd, shape = self.step_fn(f"_{plan.round}_round", sampling.greedy), plan.tree or plan.draft_len
            key, fn = (plan.round, shape, kv_end), lambda: rnd(shape, kv_end, sampling, gen)
            if sampling.greedy:
                self._run(key, fn)
            else:  # sampling draws from a host-side generator: run the round's kernels eagerly
                fn()
        elif plan.round == "standard":
            if sampling.greedy:
                self._run(("standard", kv_end),
                          lambda: self.step_fn("_standard_greedy")(kv_end, self._tables_fn(1, kv_end)))
            else:
                self._run(("standard_fwd", kv_end), lambda: self._standard_forward(kv_end))
                self._standard_select(self._pick(sampling, gen))
        elif sampling.greedy:
            self._run(("recycle", kv_end, self.rec_draft),
                      lambda: self.step_fn("_recycle_greedy")(kv_end, self._tables_fn(2, kv_end)))
        else:
            self._run(("full_pair", kv_end), lambda: self._full_pair(kv_end))
            # a graph reads its inputs from fixed addresses: stage the eagerly sampled token in a persistent buffer
            self.x_new.copy_(self._pick(sampling, gen))
            self._run(("module_pair", kv_end, self.rec_draft), lambda: self._module_pair(kv_end, self.x_new))
            self._module_select(self._pick(sampling, gen))

    def _pick(self, sampling: SamplingParams | RowSampling, gen) -> torch.Tensor:
        """A sampled step's tokens from `logits`: one SamplingParams for the batch, or each row's (RowSampling)."""
        return sampling(self.logits) if isinstance(sampling, RowSampling) else sample(self.logits, sampling, gen)

    def decode(self, strategy: str, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] = (),
               stream: StreamFn | None = None, check_every: int = 8, draft_len: int = DEFAULT_DRAFT_LEN,
               tree: TreeShape | None = None) -> DecodeResult:
        """Decode like the reference loops (decoding/loops.py, decoding/speculative.py) do. draft_len: the chain
        length of `speculative`; tree: the shape for `tree` (TreeShape() when None)."""
        plan = Plan.make(strategy, draft_len, tree)
        if plan.module and self.rmodel is None:
            raise ValueError(f"strategy {strategy!r} needs a Decoder built on a RecycleModel")
        if len(prompts) != self.B:
            raise ValueError(f"this Decoder decodes batches of {self.B} prompts, got {len(prompts)}")
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be an integer >= 1, got {check_every!r}")
        batch = PromptBatch.build(prompts, vocab_size=self.base.cfg.vocab_size, device=self.device)
        need = check_budget(self.base, batch, max_new_tokens, extra_slots=plan.span)
        if self.prefill_bucket:  # left-pad to the bucket where the padding fits (a graph per padded length)
            padded = batch.padded_to(round_up(batch.length, self.prefill_bucket))
            if padded.length + max_new_tokens + plan.span <= self.max_len:
                batch, need = padded, need + padded.length - batch.length
        if need > self.max_len:
            raise ValueError(f"prompt ({batch.length} tokens) + max_new_tokens ({max_new_tokens}) needs {need} cache "
                             f"slots; this Decoder has {self.max_len}")
        gen = sampling.generator(self.device)
        stats = DecodeStats(strategy)
        out = Collector(self.B, max_new_tokens, stop_ids, stream)
        step_seconds: list[float] = []  # per decode step: CUDA events on the GPU (no sync), host clock on CPU
        cuda = self.device.type == "cuda"
        with torch.inference_mode():
            self.prepare()
            _sync(self.device)
            t0 = time.perf_counter()
            state = self.prefill(batch, sampling, gen)
            stats.full_calls = 1
            done = out.emit(self.out[:, :1])  # the first token, before the module runs: a true TTFT
            stats.prefill_seconds = time.perf_counter() - t0
            read = 1
            if plan.module and not done:
                self.prefill_module(strategy, batch, state, sampling, gen)
                stats.module_calls = 1
                if plan.round == "recycle":
                    done = out.emit(self.out[:, 1:2])
                    read = 2
            del state
            pos = batch.length  # the device's slot p, known exactly after each check
            events = []  # on the GPU, one event after each step: timings without a sync per step
            if cuda:
                events.append(torch.cuda.Event(enable_timing=True))
                events[-1].record()
            last = time.perf_counter()
            per_step = float(plan.min_tokens)  # tokens a step keeps: exact for fixed steps, observed for rounds

            def run(steps: int, bound: int) -> None:  # launch `steps` steps, the cache's slot p at most `bound`
                nonlocal last
                for _ in range(steps):
                    self.step(plan, bound, sampling, gen)
                    bound += plan.max_tokens
                    stats.full_calls += 1
                    stats.module_calls += plan.module_calls
                    if cuda:
                        events.append(torch.cuda.Event(enable_timing=True))
                        events[-1].record()
                    else:
                        now = time.perf_counter()
                        step_seconds.append(now - last)
                        last = now

            while not done:
                # enough steps for the row furthest from its budget (at the rate seen so far), at most check_every
                # before looking again, and no more than the cache holds if every round keeps its most tokens
                wanted = math.ceil(out.remaining() / per_step)
                room = (self.max_len - plan.span - pos) // plan.max_tokens + 1
                steps = max(1, min(check_every, wanted, room))
                run(steps, pos)
                upper = read + steps * plan.max_tokens
                if plan.fixed:
                    new, written = self.out[:, read:upper].cpu(), upper  # the one sync per check
                else:  # the one sync per check: the output length with the tokens, in one copy
                    packed = torch.cat((self.n.expand(self.B)[:, None], self.out[:, read:upper]), dim=1).cpu()
                    written = int(packed[0, 0])
                    new = packed[:, 1:1 + written - read]
                pos += written - read
                if not plan.fixed:
                    rounds = stats.full_calls - 1
                    per_step = max(1.0, (written - 1) / rounds)
                read = written
                done = out.emit(new)
            _sync(self.device)
            stats.seconds = time.perf_counter() - t0
        if cuda:
            step_seconds.extend(a.elapsed_time(b) / 1000 for a, b in zip(events, events[1:]))
        stats.new_tokens = sum(len(t) for t in out.tokens)
        if step_seconds:
            stats.step_ms = 1000 * statistics.median(step_seconds)
        if not plan.fixed:
            stats.accept_hist = self.hist[:plan.max_tokens].tolist()
        return DecodeResult(out.tokens, stats, out.finished)


class Plan(NamedTuple):
    """How a strategy's steps advance: its round (`strategies.ROUNDS`), tokens kept per step (fixed, or at least
    min and at most max), the cache slots a step may touch past p (span), and module calls per step."""

    strategy: str
    round: str
    fixed: bool
    min_tokens: int
    max_tokens: int
    span: int
    module_calls: int
    draft_len: int = 0
    tree: TreeShape | None = None

    @classmethod
    def make(cls, strategy: str, draft_len: int = DEFAULT_DRAFT_LEN, tree: TreeShape | None = None) -> "Plan":
        s = strategies.get(strategy)
        if s.round is None:
            raise ValueError(f"strategy {strategy!r} has no engine round: it runs on the eager loop only")
        if s.round in ("standard", "recycle"):  # fixed steps of one and two tokens
            n = 1 if s.round == "standard" else 2
            return cls(strategy, s.round, True, n, n, n, n - 1)
        if s.round == "tree":
            t = (tree or TreeShape()).check()
            if t.depth + 1 > MAX_ROUND_TOKENS:
                raise ValueError(f"tree depth must be below {MAX_ROUND_TOKENS}, got {t.depth}")
            return cls(strategy, "tree", False, 1, t.depth + 1, max(t.verified + 1, t.module_slots), t.depth, tree=t)
        K = s.draft_len or check_draft_len(draft_len)  # a chain, drafted by the module or by prompt lookup
        if K + 1 > MAX_ROUND_TOKENS:
            raise ValueError(f"draft_len must be below {MAX_ROUND_TOKENS - 1}, got {K}")
        return cls(strategy, s.round, False, 1, K + 1, K + 1, K if s.round == "chain" else 0, draft_len=K)

    @property
    def module(self) -> bool:
        """Whether the round runs the module (the Decoder then needs a RecycleModel and prefills the module)."""
        return strategies.ROUNDS[self.round]

    def undrafted(self) -> "Plan":
        """This module round verifying no drafts: a chain round of K = 0 (the full model's next token; the module
        catches up on it, so the round after may draft again). The same state as the chain and tree rounds, so a
        batch may take it for some of its steps (`ContinuousBatch(draft_rows=)`)."""
        if self.fixed or not self.module:
            raise ValueError(f"only the module's verified rounds have an undrafted form, not {self.round!r}")
        return self._replace(round="chain", min_tokens=1, max_tokens=1, span=1, module_calls=0, draft_len=0,
                             tree=None)


class Engine:
    """Decoders by batch size and cache length for one model, so that captured graphs are reused across calls; at
    most `max_decoders` of them, the least recently used one dropped (with its cache and graphs) to make room, so
    that traffic of every batch size and length keeps memory bounded."""

    def __init__(self, model: Transformer | RecycleModel, *, graphs: bool | None = None, bucket: int = KV_BUCKET,
                 compile: bool | str = False, fuse: bool | None = None, prefill_bucket: int | None = None,
                 compile_steps: bool = False, compile_prefill: bool = True, max_decoders: int = 12) -> None:
        """The other arguments are `Decoder`'s, for every Decoder this engine builds."""
        if max_decoders < 1:
            raise ValueError(f"max_decoders must be at least 1, got {max_decoders}")
        base = model.base if isinstance(model, RecycleModel) else model
        if compile and quantized(model):
            # inductor's norm, rotary tables and attention part from the eager kernels in the last bit, which the
            # int8 model's bfloat16 roundings turn into other tokens; kept exact, compiling gained 3% (dev/LOG.md)
            raise ValueError("the compiled engine does not run int8 weights: use the eager loop (--engine auto) or "
                             "the static engine with --quantize int8")
        self.model = model
        self.graphs = base.tok_emb.weight.device.type == "cuda" if graphs is None else graphs
        self.bucket, self.compile, self.fuse, self.compile_steps = bucket, compile, fuse, compile_steps
        self.compile_prefill = compile_prefill
        self.prefill_bucket = (PREFILL_BUCKET if self.graphs else 0) if prefill_bucket is None else prefill_bucket
        self.max_decoders = max_decoders
        if base.tok_emb.weight.device.type == "cpu" and base.kernels.cpu_products == "auto":
            transposed_faster()  # measured eagerly, before any step is compiled or traced
        self._decoders: OrderedDict[tuple[int, int, str], Decoder] = OrderedDict()  # least recently used first

    def decoder(self, batch_size: int, need: int, role: str = "") -> Decoder:
        """A Decoder for `batch_size` rows with at least `need` cache slots (the smallest cached one that fits).
        role: Decoders of different roles are never shared (a continuous batch's, "batch", keeps its rows' state
        between calls while one-row Decoders prefill the requests that join it)."""
        fits = [k for k in self._decoders if k[0] == batch_size and k[1] >= need and k[2] == role]
        if fits:
            key = min(fits, key=lambda k: k[1])
            self._decoders.move_to_end(key)
            return self._decoders[key]
        while len(self._decoders) >= self.max_decoders:
            self._decoders.popitem(last=False)
        dec = Decoder(self.model, batch_size, need, graphs=self.graphs, bucket=self.bucket, compile=self.compile,
                      fuse=self.fuse, prefill_bucket=self.prefill_bucket, compile_steps=self.compile_steps,
                      compile_prefill=self.compile_prefill)
        self._decoders[(batch_size, dec.max_len, role)] = dec
        return dec

    def decode(self, strategy: str, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, **kw) -> DecodeResult:
        longest = max((len(p) for p in prompts), default=0)
        span = Plan.make(strategy, kw.get("draft_len", DEFAULT_DRAFT_LEN), kw.get("tree")).span
        # leave headroom so that the next, slightly longer prompt reuses this Decoder and its graphs
        room = max(self.prefill_bucket - 1, 0)  # for the prompt's padding to its bucket
        need = round_up(longest + room + max_new_tokens + max(span, 2), self.bucket)
        base = self.model.base if isinstance(self.model, RecycleModel) else self.model
        need = min(need, base.cfg.context_length)
        return self.decoder(len(prompts), need).decode(strategy, prompts, max_new_tokens=max_new_tokens, **kw)
