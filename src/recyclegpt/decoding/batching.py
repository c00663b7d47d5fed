"""Continuous batching: requests join a running batch when a row frees and leave at their stop or budget, each
decoded as it would be alone.

The engine's steps share one cache slot p across the rows of a batch (decoding/engine.py); each row is left-padded,
its positions are slot - pad. So a request joins at the batch's current slot p: its prompt is prefilled alone, by
a one-row Decoder of the same engine (its captured prompt graphs), and its L cache slots are copied into a free
row's slots p-L..p-1 with pad p-L; the row then goes on at position L, exactly as alone. When p < L, or the cache
cannot hold the new request's budget past p, the batch is first *rebased*: every live row's slots move by the same
offset (one copy of the live window), which keeps their positions and tokens. The batch also rebases to the left
when its live rows leave two KV buckets of padding unused, so that attention stops reading them.

A verified round keeps the same number of tokens on every row (the fewest any live row accepted; idle rows do not
count), so the lossless strategies stay exact in a batch, with a τ of the batch's slowest row (and, sampled, keep
their output distribution: any prefix of a row's verified tokens is a valid output). Above `draft_rows` live rows
its rounds verify no drafts (`Plan.undrafted`), which keeps the tokens and costs less. A batch is greedy, or
sampled: with `standard` and `recycle`, whose steps sample outside their graphs, each request draws from its own
generator in the order it does alone; the verified rounds draw for all rows at once, so their sampled requests
share a batch only when unseeded and of the same settings (`shared`), drawing from torch's global generator, and
a seeded one runs alone (`Engine.decode`).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch

from ..models import RecycleModel
from .engine import Decoder, Engine, Plan, round_up
from .loops import DecodeResult, DecodeStats, PromptBatch, _sync
from .sampling import RowSampling, SamplingParams
from .speculative import DEFAULT_DRAFT_LEN, TreeShape

PREFILL_ROWS = 8  # at most this many joining prompts are prefilled together (one forward, left-padded to the longest)
# a joining prompt longer than this is prefilled alone: together, every row of the forward pays for its length
PREFILL_JOINT = 256
# a prompt longer than this that joins while rows decode is prefilled this many slots at a time, one chunk with each
# check's steps (`ContinuousBatch`'s prefill_chunk), so that the rows decoding wait a chunk's forward between two
# checks rather than the whole prompt's once
PREFILL_CHUNK = 512
# the verified strategies draft while at most this many rows are live (`ContinuousBatch`'s draft_rows). H100, bf16,
# SmolLM2-135M: at 8, 16 and 32 rows drafting lost to rounds without drafts (dev/LOG.md, 2026-12-08); alone it wins
DRAFT_ROWS = 4
TokensFn = Callable[[list[int]], bool | None]  # a request's new tokens; returning False ends the request


@dataclass(eq=False)
class Request:
    """One greedy request of a continuous batch and, as it runs, its result."""

    prompt: Sequence[int]
    max_new_tokens: int
    stop_ids: frozenset[int] = frozenset()
    on_tokens: TokensFn | None = None  # called after each check with the tokens that came (maybe none)
    sampling: SamplingParams = SamplingParams()  # greedy, or this request's own sampling and seed
    tokens: list[int] = field(default_factory=list)  # up to and excluding a stop token
    reason: str | None = None  # once ended: "stop" (a stop token), "length" (the budget) or "cancelled"
    stats: DecodeStats | None = None
    _hist: list[int] | None = None
    _start: float = 0.0
    _gen: torch.Generator | None = None

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.tokens)

    def take(self, new: Iterable[int]) -> bool:
        """Keep the tokens up to a stop token or the budget and pass them on; True when the request has ended."""
        kept = []
        for t in new:
            if len(self.tokens) + len(kept) >= self.max_new_tokens:
                break
            if t in self.stop_ids:
                self.reason = "stop"
                break
            kept.append(t)
        self.tokens.extend(kept)
        if self.reason is None and len(self.tokens) >= self.max_new_tokens:
            self.reason = "length"
        if self.on_tokens is not None and self.on_tokens(kept) is False and self.reason is None:
            self.reason = "cancelled"
        return self.reason is not None


@dataclass(eq=False)
class _Fill:
    """A request whose prompt is prefilled in chunks before it joins: on its own one-row Decoder, `chunks` the
    prefill's steps (`Decoder.prefill_chunks`), `length` the prompt padded to whole chunks."""

    req: Request
    dec: Decoder | None = None
    chunks: Iterator[bool] | None = None
    length: int = 0
    done: bool = False


class ContinuousBatch:
    """Greedy requests of one strategy decoding together on `engine`, up to `max_rows` at once, with `max_len`
    cache slots (default: the model's context), each joining when it fits (`add`) and leaving at its end (`step`
    returns those that ended). The batch runs on the engine's Decoder of a power-of-two number of rows: it grows
    (doubling) when a request comes and no row is free, and shrinks when a quarter or fewer of its rows are live,
    moving the live rows' state over, so that a lone request decodes at batch 1."""

    def __init__(self, engine: Engine, strategy: str, max_rows: int, *, max_len: int | None = None,
                 check_every: int = 8, draft_len: int = DEFAULT_DRAFT_LEN, tree: TreeShape | None = None,
                 sampled: bool = False, shared: SamplingParams | None = None,
                 draft_rows: int | None = DRAFT_ROWS, prefill_chunk: int | None = PREFILL_CHUNK) -> None:
        """sampled: the batch's requests sample, each with its own settings and seed (`standard` and `recycle`,
        whose steps sample outside their graphs); else they are greedy. shared: instead, every request samples
        with these settings, unseeded, from torch's global generator (any strategy; how sampled requests of the
        verified strategies, whose rounds draw for all rows at once, decode together). draft_rows: the module's
        verified rounds draft while at most this many rows are live; with more, they verify no drafts
        (`Plan.undrafted`: one token a row, the module kept in step), since every row keeps the tokens of the
        row that accepted fewest, and that is almost always none of the drafts when many rows decode together.
        None: they always draft. prefill_chunk: a request whose prompt is longer than this many tokens, joining
        while rows decode, has its prompt prefilled in chunks of this many slots, one with each check's steps
        (so the others' tokens come a chunk's forward later, not the whole prompt's), and joins when the last is
        done (its row held meanwhile); a multiple of the engine's prefill bucket, whose chunks replay graphs.
        None: every prompt is prefilled whole as it joins."""
        if shared is not None and (shared.greedy or shared.seed is not None):
            raise ValueError(f"a shared batch samples unseeded: got {shared}")
        self.engine, self.strategy, self.sampled, self.shared = engine, strategy, sampled or shared is not None, shared
        self.plan = Plan.make(strategy, draft_len, tree)
        if draft_rows is not None and (not isinstance(draft_rows, int) or draft_rows < 0):
            raise ValueError(f"draft_rows must be an integer >= 0 or None, got {draft_rows!r}")
        self.undrafted = (self.plan.undrafted() if draft_rows is not None and self.plan.module and not self.plan.fixed
                          else None)
        self.draft_rows = draft_rows
        if sampled and shared is None and not self.plan.fixed:
            raise ValueError(f"sampled requests of {strategy!r} draw inside its verified rounds for all rows at "
                             f"once: they share a batch only unseeded and with the same settings (shared=)")
        rmodel = engine.model if isinstance(engine.model, RecycleModel) else None
        base = rmodel.base if rmodel is not None else engine.model
        if self.plan.module and rmodel is None:
            raise ValueError(f"strategy {strategy!r} needs an engine built on a RecycleModel")
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an integer >= 1, got {max_rows!r}")
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be an integer >= 1, got {check_every!r}")
        self.max_rows, self.check_every = max_rows, check_every
        if prefill_chunk is not None:
            if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
                raise ValueError(f"prefill_chunk must be an integer >= 1 or None, got {prefill_chunk!r}")
            if engine.graphs and engine.prefill_bucket and prefill_chunk % engine.prefill_bucket:
                raise ValueError(f"prefill_chunk must be a multiple of the engine's prefill bucket "
                                 f"({engine.prefill_bucket}), got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self._fills: deque[_Fill] = deque()  # prompts prefilled in chunks, oldest first: only the first runs
        self.max_len = engine.decoder(1, max_len or base.cfg.context_length, role="prefill").max_len
        self.vocab_size = base.cfg.vocab_size
        self.rows: list[Request | None] = []
        self.pads: list[int] = []  # each live row's padding, as the device has it
        self.p = 0  # the batch's next slot, exact after every check
        self.per_step = float(self.plan.min_tokens)  # tokens a step keeps, as seen so far
        self.steps = 0
        self.undrafted_steps = 0  # of `steps`, those that verified no drafts (draft_rows)
        self.rebases = [0, 0]  # to the left (padding given back), to the right (room for a longer prompt)
        self.chunked = 0  # requests whose prompts were prefilled in chunks
        self._first: dict[int, torch.Tensor] = {}  # by id of a request that joined: its first tokens, on the device
        self.dec = self._resize(1)

    # -- joining -----------------------------------------------------------------------------------------------

    @property
    def live(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def pending(self) -> int:
        """Requests admitted whose prompts are prefilled in chunks: each holds a row it takes when done."""
        return len(self._fills)

    @property
    def admitted(self) -> list[Request]:
        """The requests the batch holds: in its rows, and those whose prompts are prefilled in chunks."""
        return [r for r in self.rows if r is not None] + [f.req for f in self._fills]

    def fits(self, req: Request) -> bool:
        """Whether `req` fits this batch's cache at all (alone)."""
        return len(req.prompt) + req.max_new_tokens + self.plan.span <= self.max_len

    def admits(self, req: Request) -> bool:
        """Whether `req` can join now: a free row (or room to grow) and room in the cache beside the live rows."""
        return self.admits_all([req])

    def reserve(self, rows: int) -> None:
        """Grow now to the power-of-two row count that holds `rows` requests (at most max_rows): a burst of joiners
        then takes one resize (one Decoder, one set of graphs) instead of one per doubling."""
        want = min(self.max_rows, 1 << max(rows - 1, 0).bit_length())
        if want > len(self.rows):
            with torch.inference_mode():
                self.dec = self._resize(want)

    def admits_all(self, reqs: Sequence[Request]) -> bool:
        """Whether all of `reqs` can join now together: rows for them (free, or by growing) and cache room beside
        the live rows."""
        free = self.rows.count(None) + self.max_rows - len(self.rows) - self.pending
        # the requests prefilled in chunks must still fit when they join
        return bool(reqs) and len(reqs) <= free and self._group_target(
            [f.req for f in self._fills] + list(reqs)) is not None

    def add_all(self, reqs: Sequence[Request]) -> None:
        """Put `reqs` (`admits_all`) into free rows together: the batch grows and rebases once for them and prefills
        them together where they are short (`_prefill_groups`); their first tokens reach them with the next
        check's."""
        for req in reqs:
            self._check(req)
        if not self.admits_all(reqs):
            raise ValueError("the batch has no room for these requests now (check admits_all first)")
        self._join(list(reqs))

    def add(self, req: Request) -> None:
        """Prefill `req` and put it in a free row (growing or rebasing first if it must); its first tokens reach it
        with the next check's (a request that ends on them leaves its row then)."""
        self._check(req)
        if not self.admits(req):
            raise ValueError("the batch has no room for this request now (check admits first)")
        self._join([req])

    def _check(self, req: Request) -> None:
        if not req.prompt:
            raise ValueError("a request needs a prompt of at least one token")
        if req.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
        if not self.sampled and not req.sampling.greedy:  # a sampled batch takes greedy rows too (their argmax)
            raise ValueError("this batch decodes greedy requests only")
        if self.shared is not None and req.sampling != self.shared:
            raise ValueError(f"this batch decodes unseeded requests sampled with {self.shared} only")

    def _group_target(self, group: list[Request]) -> int | None:
        """The slot at which the requests of `group` join together: p when their prompts and every live row's
        budget fit there, else the smallest slot after a rebase; None when they do not fit together."""
        live = [(self.p - self.pads[i], r.remaining) for i, r in enumerate(self.rows) if r is not None]
        L = max(len(r.prompt) for r in group)
        need = max([r.max_new_tokens for r in group] + [rem for _, rem in live]) + self.plan.span
        if L <= self.p and self.p + need <= self.max_len:
            return self.p
        to = max([L] + [length for length, _ in live])
        return to if to + need <= self.max_len else None

    def _join(self, group: list[Request]) -> None:
        """Put `group` (admitted together: rows and cache room for all) into free rows: one rebase at most, then
        their prompts prefilled (`_prefill_groups`), or queued to be prefilled in chunks (`_chunked`)."""
        start = time.perf_counter()
        free = self.rows.count(None) + self.max_rows - len(self.rows) - self.pending
        if len(group) > free:
            raise ValueError("the batch has no rows for these requests now")
        for req in [r for r in group if self._chunked(r)]:
            req._start = start
            self._fills.append(_Fill(req))
            group.remove(req)
        if not group:
            return
        with torch.inference_mode():
            if self.rows.count(None) < len(group):
                rows = self.live + self.pending + len(group)
                self.dec = self._resize(min(self.max_rows, 1 << (rows - 1).bit_length()))
            to = self._group_target(group)
            if to is None:
                raise ValueError("the batch has no room for these requests now")
            if to != self.p:
                self._rebase(to)
            for chunk in self._prefill_groups(group):
                rows = [i for i, r in enumerate(self.rows) if r is None][:len(chunk)]
                firsts = self._prefill(chunk, rows)
                for req, row, first in zip(chunk, rows, firsts):
                    req._start = start
                    self._seat(req, row, first)

    def _seat(self, req: Request, row: int, first: torch.Tensor) -> None:
        """`req`, prefilled and adopted into `row`, becomes that row's request; `first`: its first tokens on the
        device, read with the next check's tokens (a join adds no host sync)."""
        req._hist = [0] * self.plan.max_tokens if not self.plan.fixed else None
        req.stats = DecodeStats(self.strategy, full_calls=1, module_calls=int(self.plan.module),
                                prefill_seconds=time.perf_counter() - req._start)
        self.rows[row], self.pads[row] = req, self.p - len(req.prompt)
        self._first[id(req)] = first

    @staticmethod
    def _prefill_groups(group: list[Request]) -> list[list[Request]]:
        """The joint prefills of `group`: each prompt longer than PREFILL_JOINT tokens alone, the shorter ones by
        length, PREFILL_ROWS at a time (a forward of B rows left-pads every row to its longest prompt)."""
        short = sorted((r for r in group if len(r.prompt) <= PREFILL_JOINT), key=lambda r: len(r.prompt))
        return ([[r] for r in group if len(r.prompt) > PREFILL_JOINT]
                + [short[s:s + PREFILL_ROWS] for s in range(0, len(short), PREFILL_ROWS)])

    def _chunked(self, req: Request) -> bool:
        """Whether `req`, joining now, is prefilled in chunks: a prompt longer than a chunk while rows decode."""
        C = self.prefill_chunk
        return bool(C and self.live and len(req.prompt) > C and round_up(len(req.prompt), C) <= self.max_len)

    def _fill_chunk(self) -> None:
        """Run the next chunk of the oldest prompt prefilled in chunks (starting it on the engine's one-row
        Decoder for chunks if it is new)."""
        if not self._fills or self._fills[0].done:
            return
        f = self._fills[0]
        if f.chunks is None:
            req, C = f.req, self.prefill_chunk
            f.dec = self.engine.decoder(1, self.max_len, role="chunk")
            f.length = round_up(len(req.prompt), C)
            batch = PromptBatch.build([list(req.prompt)], vocab_size=self.vocab_size,
                                      device=f.dec.device).padded_to(f.length)
            f.dec.prepare()
            req._gen = req.sampling.generator(f.dec.device)
            sampling = self.shared or (RowSampling([(req.sampling, req._gen)]) if self.sampled else SamplingParams())
            f.chunks = f.dec.prefill_chunks(self.strategy, batch, C, sampling, None)
        f.done = next(f.chunks)

    def _join_filled(self) -> None:
        """Put the oldest request prefilled in chunks, when done and when it fits beside the live rows, into a free
        row (growing or rebasing first if it must); its first tokens reach it with the next check's."""
        if not self._fills or not self._fills[0].done:
            return
        f = self._fills[0]
        req = f.req
        to = self._group_target([req])
        if to is None:  # the live rows' budgets leave no room for it yet: it waits for some to end
            return
        self._fills.popleft()
        if None not in self.rows:
            self.dec = self._resize(min(self.max_rows, 2 * len(self.rows)))
        if to != self.p:
            self._rebase(to)
        row = self.rows.index(None)
        self.dec.adopt(row, f.dec, 0, len(req.prompt), f.length, self.p)
        self._seat(req, row, f.dec.out[0, :2 if self.plan.round == "recycle" else 1].clone())
        self.chunked += 1

    def _prefill(self, reqs: list[Request], rows: list[int]) -> list[torch.Tensor]:
        """The prompts through the engine's prefill Decoder of the power-of-two rows that hold them (the prompts
        left-padded to a common bucketed length), then adopted into `rows`; the tokens each gave (1, or 2 for
        recycle), on the device."""
        B = 1 << (len(reqs) - 1).bit_length()
        src = self.engine.decoder(B, self.max_len, role="prefill")
        prompts = [list(r.prompt) for r in reqs] + [[0]] * (B - len(reqs))  # idle rows: one token, not read
        batch = PromptBatch.build(prompts, vocab_size=self.vocab_size, device=src.device)
        L, bucket = batch.length, self.engine.prefill_bucket
        Lp = round_up(L, bucket) if bucket and round_up(L, bucket) < src.max_len else L
        if Lp != L:
            batch = batch.padded_to(Lp)
        src.prepare()
        for r in reqs:
            r._gen = r.sampling.generator(src.device)  # the request's own draws, in the order they come alone
        sampling = self.shared or (RowSampling([(r.sampling, r._gen) for r in reqs] + [None] * (B - len(reqs)))
                                   if self.sampled else SamplingParams())
        state = src.prefill(batch, sampling, None)
        read = 1
        if self.plan.module:
            src.prefill_module(self.strategy, batch, state, sampling, None)
            read = 2 if self.plan.round == "recycle" else 1
        for j, (r, row) in enumerate(zip(reqs, rows)):
            self.dec.adopt(row, src, j, len(r.prompt), Lp, self.p)
        out = src.out[:len(reqs), :read].clone()  # the next join's prefill writes src.out again
        return list(out)

    def _resize(self, rows: int):
        """The engine's Decoder of `rows` rows for this batch, the live requests moved onto its first rows."""
        old = getattr(self, "dec", None)
        keep = [(i, r) for i, r in enumerate(self.rows) if r is not None]
        dec = self.engine.decoder(rows, self.max_len, role="batch")
        with torch.inference_mode():
            dec.prepare()
            dec.live.zero_()
            for j, (i, _) in enumerate(keep):
                dec.adopt(j, old, i, self.p - self.pads[i], self.p, self.p)
            dec.pad.masked_fill_(~dec.live, self.p)
            dec.pos.fill_(self.p)
            dec.n.zero_()
            dec.hist.zero_()
        self.rows = [r for _, r in keep] + [None] * (rows - len(keep))
        self.pads = [self.pads[i] for i, _ in keep] + [self.p] * (rows - len(keep))
        return dec

    def _rebase(self, to: int) -> None:
        live = [i for i, r in enumerate(self.rows) if r is not None]
        lo = min((self.pads[i] for i in live), default=self.p)
        self.dec.rebase(self.p, to, lo)
        self.rebases[to > self.p] += 1
        for i in live:
            self.pads[i] += to - self.p
        self.p = to

    def _end(self, row: int) -> Request:
        req = self.rows[row]
        self.rows[row] = None
        self._first.pop(id(req), None)
        with torch.inference_mode():
            self.dec.live[row] = False
        st = req.stats
        st.new_tokens, st.seconds = len(req.tokens), time.perf_counter() - req._start
        st.accept_hist = req._hist
        return req

    def run(self, requests: Sequence[Request]) -> list[Request]:
        """Decode `requests` in arrival order, each joining as soon as a row is free and it fits; returns them,
        each with its tokens, reason and stats."""
        for req in requests:
            if not self.fits(req):
                raise ValueError(f"a request of {len(req.prompt)} prompt tokens and max_new_tokens "
                                 f"{req.max_new_tokens} does not fit the batch's {self.max_len} cache slots")
        waiting = deque(requests)
        while waiting or self.live or self.pending:
            self._admit(waiting)
            self.step()
        _sync(self.dec.device)
        return list(requests)

    def _admit(self, waiting: deque[Request]) -> None:
        """Add the waiting requests that fit now, in order: the batch grows once for all of them, rebases once,
        and prefills them together."""
        if not waiting or not self.admits(waiting[0]):
            return
        self.reserve(self.live + len(waiting))
        group: list[Request] = []
        while waiting and self.admits_all(group + [waiting[0]]):
            self._check(waiting[0])
            group.append(waiting.popleft())
        self._join(group)

    # -- decoding ----------------------------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Run up to `check_every` steps, hand each live request its new tokens, and return those that ended."""
        ended = [self._end(i) for i, r in enumerate(self.rows) if r is not None and r.reason is not None]
        with torch.inference_mode():
            if self._fills and not self.live:  # no step to spread the chunks between: the rest of them now
                while not self._fills[0].done:
                    self._fill_chunk()
            self._join_filled()
        n = self.live + self.pending
        if n and n <= len(self.rows) // 4:  # a quarter or fewer of the rows live: move to a smaller Decoder
            self.dec = self._resize(1 << (n - 1).bit_length())
        live = [i for i, r in enumerate(self.rows) if r is not None]
        if not live:
            return ended
        plan, dec = self.plan, self.dec
        if self.undrafted is not None and len(live) > self.draft_rows:
            plan = self.undrafted
        lo = min(self.pads[i] for i in live)
        if lo >= 2 * self.engine.bucket:  # two buckets of padding under every live row: stop reading them
            with torch.inference_mode():
                self._rebase(self.p - lo)
        wanted = -(-max(self.rows[i].remaining for i in live) // max(1, int(self.per_step)))
        room = (self.max_len - plan.span - self.p) // plan.max_tokens + 1
        steps = max(1, min(self.check_every, wanted, room))
        sampling = self.shared or (RowSampling([(r.sampling, r._gen) if r is not None else None for r in self.rows])
                                   if self.sampled else SamplingParams())
        with torch.inference_mode():
            bound = self.p
            for _ in range(steps):
                dec.step(plan, bound, sampling, None)
                bound += plan.max_tokens
            self._fill_chunk()  # queued behind the steps: on a GPU it runs while the host waits for their tokens
            upper = steps * plan.max_tokens
            if plan.fixed:
                new, written = dec.out[:, :upper].cpu(), upper  # the one sync of a check
            else:
                packed = torch.cat((dec.n.expand(dec.B)[:, None], dec.out[:, :upper]), dim=1).cpu()
                written = int(packed[0, 0])
                new = packed[:, 1:1 + written]
                hist = dec.hist[:self.plan.max_tokens].tolist()
                dec.hist.zero_()
                self.per_step = max(1.0, written / steps)
            dec.n.zero_()
            joined = {k: self._first.pop(k) for k in list(self._first)}
            first = dict(zip(joined, torch.cat(list(joined.values())).cpu().split(
                [len(t) for t in joined.values()]))) if joined else {}
        self.steps += steps
        self.undrafted_steps += steps if plan is self.undrafted else 0
        self.p += written
        for i in live:
            req = self.rows[i]
            req.stats.full_calls += steps
            req.stats.module_calls += steps * plan.module_calls
            if req._hist is not None:
                req._hist = [a + b for a, b in zip(req._hist, hist)]
            head = first[id(req)].tolist() if id(req) in first else []
            if req.take(head + new[i].tolist()):
                ended.append(self._end(i))
        return ended


def continuous_decode(engine: Engine, strategy: str, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                      max_rows: int, stop_ids: Sequence[int] = (),
                      stream: Callable[[list[list[int]]], None] | None = None, check_every: int = 8,
                      draft_len: int = DEFAULT_DRAFT_LEN, tree: TreeShape | None = None,
                      sampling: SamplingParams = SamplingParams(), max_len: int | None = None,
                      row_sampling: Sequence[SamplingParams] | None = None,
                      draft_rows: int | None = DRAFT_ROWS, prefill_chunk: int | None = PREFILL_CHUNK) -> DecodeResult:
    """Decoding of many prompts through one continuous batch of at most `max_rows` rows, in prompt order, each prompt
    joining as a row frees: the tokens are each prompt's alone. sampling: greedy, or sampled (`standard`, `recycle`)
    with prompt i drawing from its own generator seeded `sampling.seed + i` (unseeded without a seed), as
    `generate(prompts[i], seed=sampling.seed + i)` would. row_sampling: instead, each prompt's own settings (greedy
    and sampled prompts in one batch, of `standard` or `recycle`); a sampled prompt with a seed draws from its own
    generator, those without one from torch's global generator, those of equal settings in one draw a step (seed
    torch for repeatable draws). draft_rows, prefill_chunk: `ContinuousBatch`'s. max_len: the batch's cache slots
    per row (default: the longest prompt's need); calls that pass the same value reuse the engine's Decoders and
    graphs whatever their prompts. stream: after each check, the new tokens of every prompt (empty lists for those
    not running). The stats are the whole run's: full calls are the batch's steps plus one prefill per prompt;
    accept_hist sums the requests'."""
    longest = max((len(p) for p in prompts), default=0)
    need = longest + max_new_tokens + Plan.make(strategy, draft_len, tree).span + 2
    if max_len is not None and max_len < need:
        raise ValueError(f"max_len {max_len} is below the {need} cache slots the longest prompt ({longest} tokens) "
                         f"and max_new_tokens {max_new_tokens} need")
    need = max_len if max_len is not None else round_up(need, engine.bucket)
    if row_sampling is not None and len(row_sampling) != len(prompts):
        raise ValueError(f"row_sampling has {len(row_sampling)} settings for {len(prompts)} prompts")

    def own(i: int) -> SamplingParams:
        if row_sampling is not None:
            return row_sampling[i]
        return sampling if sampling.greedy or sampling.seed is None else dataclasses.replace(sampling,
                                                                                             seed=sampling.seed + i)

    sampled = any(not own(i).greedy for i in range(len(prompts)))
    batch = ContinuousBatch(engine, strategy, max_rows, max_len=need, check_every=check_every,
                            draft_len=draft_len, tree=tree, sampled=sampled, draft_rows=draft_rows,
                            prefill_chunk=prefill_chunk)
    new: dict[int, list[int]] = {}

    def collect(i: int) -> TokensFn:
        return lambda tokens: new.setdefault(i, []).extend(tokens)

    reqs = [Request(list(p), max_new_tokens, frozenset(stop_ids), collect(i), own(i)) for i, p in enumerate(prompts)]
    stats = DecodeStats(strategy)
    _sync(batch.dec.device)
    t0 = time.perf_counter()
    check_ms = []
    waiting = deque(reqs)
    while waiting or batch.live or batch.pending:
        if waiting and not batch.live and not batch.pending and not batch.admits(waiting[0]):
            raise ValueError(f"a prompt of {len(waiting[0].prompt)} tokens with max_new_tokens {max_new_tokens} "
                             f"does not fit the batch's {batch.max_len} cache slots")
        batch._admit(waiting)
        before, t = batch.steps, time.perf_counter()
        batch.step()
        if batch.steps > before:
            check_ms.append(1000 * (time.perf_counter() - t) / (batch.steps - before))
        if stream is not None and new:
            stream([new.get(i, []) for i in range(len(reqs))])
        new.clear()
    _sync(batch.dec.device)
    stats.seconds = time.perf_counter() - t0
    stats.prefill_seconds = reqs[0].stats.prefill_seconds if reqs else 0.0
    stats.new_tokens = sum(len(r.tokens) for r in reqs)
    stats.full_calls = batch.steps + len(reqs)
    stats.module_calls = batch.steps * batch.plan.module_calls + len(reqs) * int(batch.plan.module)
    stats.step_ms = statistics.median(check_ms) if check_ms else 0.0
    if not batch.plan.fixed:
        stats.accept_hist = [sum(h) for h in zip(*(r.stats.accept_hist for r in reqs))]
    return DecodeResult([r.tokens for r in reqs], stats, [r.reason == "stop" for r in reqs])
