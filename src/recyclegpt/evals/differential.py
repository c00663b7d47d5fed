"""Differential testing: the engines against the eager reference loops, on sequences of requests like real traffic.

A server, a chat session or an evaluation run sends one process prompts of every length, one after another, in
batches whose size and lengths change from call to call, with stops hit early and late. Engines keep state across
calls (captured graphs, static caches, compiled functions, Decoders of several cache lengths on one model), so a
bug can hide from every test that decodes one batch in a fresh process and show only after a long prompt. This
module drives each engine and the reference with the same randomised sequence of requests, interleaved in one
process (request by request, engine by engine, strategy by strategy), and compares tokens.

Two ways to compare (`Check`):
- exact (fp32): every engine's tokens equal the reference's for every request: greedy `standard` and the lossless
  strategies equal the reference's `standard`, `recycle` the reference's `recycle`; sampled requests equal the same
  strategy's reference loop under the same seed (the engine draws from the same generator in the same order).
- near-ties (bf16, where fused kernels sum in another order than the eager operators): greedy lossless strategies
  equal the same engine's `standard`; a difference is reported with its position, how far the engine's token falls
  below the base model's top logit there and its rank, so that a near-tie (the engine's token among the reference's
  NEAR_TIE_RANK most likely, `choice_margin`) can be told from a wrong token. Greedy `standard` equals the
  reference on its first `prefix` tokens; a sampled request repeated on one engine gives the same tokens.

`tests/test_differential.py` runs a short sequence on the CPU (and a CUDA variant); `scripts/differential.py` runs
the long version on a GPU.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..decoding.batching import DRAFT_ROWS, PREFILL_CHUNK, ContinuousBatch
from ..decoding.batching import Request as BatchRequest
from ..decoding.engine import KV_BUCKET, PREFILL_BUCKET, Engine, Plan
from ..decoding.loops import DecodeResult
from ..decoding.sampling import SamplingParams
from ..decoding.speculative import DEFAULT_DRAFT_LEN, TreeShape
from ..decoding.strategies import get as get_strategy
from ..decoding.strategies import names as strategy_names
from ..decoding.strategies import reference_decode
from ..models import RecycleModel, Transformer

ENGINE_KINDS = ("static", "graphs", "compiled")


@dataclass(frozen=True)
class Request:
    """One call: a batch of prompts (token ids), a budget, how to sample, and where a stop token falls ("" none,
    "early" or "late": a token the reference emits near the start or the end of row 0's output becomes a stop)."""

    prompts: tuple[tuple[int, ...], ...]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: str = ""

    def describe(self) -> str:
        lengths = ",".join(str(len(p)) for p in self.prompts)
        how = "greedy" if self.sampling.greedy else f"T={self.sampling.temperature} seed={self.sampling.seed}"
        return f"prompts [{lengths}] new {self.max_new_tokens} {how}" + (f" stop {self.stop}" if self.stop else "")


def boundary_lengths(limit: int, buckets: Sequence[int]) -> list[int]:
    """Prompt or budget lengths at and beside every multiple of each bucket, from 1 to `limit`."""
    out = {1, 2, 3, limit}
    for b in buckets:
        if b <= 0:
            continue
        for k in range(b, limit + 2, b):
            out.update((k - 1, k, k + 1))
    return sorted(n for n in out if 1 <= n <= limit)


def make_requests(seed: int, n: int, *, vocab_size: int, context_length: int, max_new_tokens: int,
                  span: int, max_batch: int = 4, buckets: Sequence[int] = (PREFILL_BUCKET, KV_BUCKET),
                  sampled: float = 0.25, stops: float = 0.3, corpus: Sequence[int] | None = None,
                  max_prompt: int | None = None) -> list[Request]:
    """A random sequence of n requests: prompt lengths from 1 token to near the context (`max_prompt`, default the
    context less the budget and the widest strategy's `span`), at and beside every bucket boundary and at random, in
    random order but starting long -> short -> long, the rest half boundaries, half log-uniform (mostly short, as
    traffic is, with a tail to the context); budgets from 1 to `max_new_tokens`, crossing the buckets too;
    batches of 1 to `max_batch` prompts of mixed lengths; a share `sampled` of seeded sampling and `stops` of stop
    tokens. Prompts are random token ids, or slices of `corpus` (a token stream) when given."""
    rng = random.Random(seed)
    top = context_length - max_new_tokens - span if max_prompt is None else min(max_prompt, context_length - span - 1)
    if top < 1:
        raise ValueError(f"context {context_length} leaves no room for a prompt beside {max_new_tokens} new tokens")
    lengths = boundary_lengths(top, buckets)
    budgets = boundary_lengths(max_new_tokens, buckets)

    def log_uniform(limit: int) -> int:  # traffic is mostly short prompts, with a long tail up to the context
        return max(1, min(limit, round(math.exp(rng.uniform(0.0, math.log(limit))))))

    def prompt(length: int) -> tuple[int, ...]:
        if corpus is not None and len(corpus) > length:
            start = rng.randrange(len(corpus) - length)
            return tuple(corpus[start:start + length])
        return tuple(rng.randrange(vocab_size) for _ in range(length))

    requests = []
    for i in range(n):
        if i < 3:  # long -> short -> long first: the sequence that broke captured graphs shared across Decoders
            first = (top, rng.randint(1, 16), top - rng.randint(0, max(1, top // 8)))[i]
        else:
            first = rng.choice(lengths) if rng.random() < 0.5 else log_uniform(top)
        first = max(1, min(first, top))
        size = 1 if i < 3 else rng.randint(1, max_batch)
        rows = [first] + [log_uniform(top) if rng.random() < 0.5 else rng.randint(1, max(1, first))
                          for _ in range(size - 1)]
        rng.shuffle(rows)
        new = rng.choice(budgets) if rng.random() < 0.5 else rng.randint(1, max_new_tokens)
        new = min(new, context_length - span - max(rows))
        sampling = (SamplingParams(temperature=rng.choice((0.7, 1.0)), top_k=rng.choice((None, 20)),
                                   seed=rng.randrange(1 << 16)) if rng.random() < sampled else SamplingParams())
        stop = rng.choice(("early", "late")) if rng.random() < stops and new >= 4 else ""
        requests.append(Request(tuple(prompt(L) for L in rows), new, sampling, stop))
    return requests


@dataclass
class Options:
    """The strategies' shapes: the chain's draft length and the tree, as every engine and reference runs them."""

    draft_len: int = DEFAULT_DRAFT_LEN
    tree: TreeShape = TreeShape()

    def span(self, strategies: Sequence[str]) -> int:
        return max(Plan.make(s, self.draft_len, self.tree).span for s in strategies)


def reference(model: RecycleModel, strategy: str, req: Request, opts: Options, stop_ids=()) -> DecodeResult:
    """The eager reference loop of `strategy` (strategies.reference_decode) on one request."""
    with torch.inference_mode():
        return reference_decode(model, strategy, [list(p) for p in req.prompts], max_new_tokens=req.max_new_tokens,
                                draft_len=opts.draft_len, tree_shape=opts.tree, sampling=req.sampling,
                                stop_ids=stop_ids)


def truncate(tokens: list[list[int]], max_new_tokens: int, stop_ids: set[int]) -> tuple[list[list[int]], list[bool]]:
    """What a run with `stop_ids` emits, given the run without them: each row up to its first stop token (not
    included, as `decoding.Collector` emits), and whether the row stopped. Stops end a row's output and change no
    token before them, so this is exact."""
    out, finished = [], []
    for row in tokens:
        cut = next((i for i, t in enumerate(row[:max_new_tokens]) if t in stop_ids), None)
        out.append(row[:max_new_tokens] if cut is None else row[:cut])
        finished.append(cut is not None)
    return out, finished


def stop_token(tokens: list[list[int]], where: str) -> int | None:
    """A token of row 0's output near its start ("early") or its end ("late")."""
    row = tokens[0]
    if not row:
        return None
    return row[min(len(row) - 1, max(0, len(row) // 6))] if where == "early" else row[max(0, len(row) - 2)]


def first_difference(a: list[int], b: list[int]) -> int | None:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if n is None and len(a) != len(b):
        return min(len(a), len(b))
    return n


# a 16-bit run's token that differs from the reference's greedy one is a near-tie when it is among the reference's
# NEAR_TIE_RANK most likely there: vLLM's tests compare 16-bit engines by the same rule (each greedy token within the
# other's top-5 log-probabilities). Kernels that sum in another order move 16-bit logits by several ulps after thirty
# layers (margins up to 0.375 measured on SmolLM2 in bf16), so no fixed margin separates the two cases; a wrong
# engine's tokens fall far outside the top 5 (the garbage after a long prompt ranked in the thousands)
NEAR_TIE_RANK = 5


def choice_margin(base: Transformer, ids: list[int], token: int) -> tuple[float, int]:
    """How much the base model's top logit after `ids` exceeds `token`'s (no cache, the model's dtype), and `token`'s
    rank there (0: the top; tokens of equal logit share the rank of the first)."""
    with torch.inference_mode():
        x = torch.tensor([ids], device=base.tok_emb.weight.device)
        logits = base(x, num_logits=1).logits[0, -1].float()
    chosen = logits[token]
    return float(logits.max() - chosen), int((logits > chosen).sum())


@dataclass
class Mismatch:
    request: int
    row: int
    index: int  # first differing output token
    margin: float | None  # how far the engine's token there is below the base's top logit (greedy), or None
    description: str
    rank: int | None = None  # the engine's token's rank in the base's logits there (0: the top), or None
    near_tie: bool = False  # rank < NEAR_TIE_RANK


@dataclass
class Tally:
    """One (engine, strategy) pair's outcome over a sequence."""

    requests: int = 0
    identical: int = 0
    tokens: int = 0
    seconds: float = 0.0  # the engine's decode calls (graph captures and compiles included), not the checks
    mismatches: list[Mismatch] = field(default_factory=list)
    chunked: int = 0  # under arrivals: requests whose prompts were prefilled in chunks while rows decoded

    def __add__(self, other: "Tally") -> "Tally":
        """Two runs' outcomes together (the shards of a run on several devices)."""
        return Tally(self.requests + other.requests, self.identical + other.identical, self.tokens + other.tokens,
                     self.seconds + other.seconds, self.mismatches + other.mismatches, self.chunked + other.chunked)

    def to_dict(self) -> dict:
        return {"requests": self.requests, "identical": self.identical, "tokens": self.tokens, "chunked": self.chunked,
                "seconds": round(self.seconds, 2), "mismatches": [vars(m) for m in self.mismatches[:20]]}


@dataclass
class Check:
    """How tokens are compared: "exact" (fp32: every request equals the reference) or "near-ties" (bf16: see the
    module's docstring; `prefix` tokens of `standard` against the reference)."""

    mode: str = "exact"
    prefix: int = 16

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "near-ties"):
            raise ValueError(f"check mode must be 'exact' or 'near-ties', got {self.mode!r}")


def make_engine(model: RecycleModel, kind: str, *, kv_bucket: int = KV_BUCKET,
                prefill_bucket: int | None = None) -> Engine:
    """An engine as `RecycleGPT.engine` builds it: "static" (eager steps), "graphs", or "compiled"."""
    if kind not in ENGINE_KINDS:
        raise ValueError(f"unknown engine {kind!r}; choose one of {', '.join(ENGINE_KINDS)}")
    return Engine(model, graphs=kind != "static", compile=kind == "compiled", bucket=kv_bucket,
                  prefill_bucket=prefill_bucket)


def run_sequence(model: RecycleModel, engines: dict[str, Engine], requests: Sequence[Request], *,
                 strategies: Sequence[str] | None = None, opts: Options = Options(), check: Check = Check(),
                 progress: Callable | None = None, deadline: float | None = None) -> dict[tuple[str, str], Tally]:
    """Run every request through the reference and through each engine with each strategy (default: every
    registered one), in one process and in order, and compare (`Check`). Returns a Tally per (engine, strategy).
    deadline: a time.monotonic() after which no further request starts (the tallies then cover the requests
    run)."""
    strategies = strategy_names() if strategies is None else strategies
    tallies = {(e, s): Tally() for e in engines for s in strategies}
    seq = enumerate(requests) if progress is None else progress(list(enumerate(requests)))
    for i, req in seq:
        if deadline is not None and time.monotonic() > deadline:
            break
        refs: dict[str, DecodeResult] = {}

        def ref(strategy: str) -> DecodeResult:
            if strategy not in refs:
                refs[strategy] = reference(model, strategy, req, opts)
            return refs[strategy]

        # the stop token comes from the reference's own output, so that it is hit (early or late)
        stop = stop_token(ref("standard").tokens, req.stop) if req.stop else None
        stop_ids = {stop} if stop is not None else set()
        for kind, engine in engines.items():
            own: dict[str, list[list[int]]] = {}
            for strategy in strategies:
                start = time.perf_counter()
                res = engine.decode(strategy, [list(p) for p in req.prompts], max_new_tokens=req.max_new_tokens,
                                    sampling=req.sampling, stop_ids=tuple(stop_ids), draft_len=opts.draft_len,
                                    tree=opts.tree)
                own[strategy] = res.tokens
                t = tallies[(kind, strategy)]
                t.seconds += time.perf_counter() - start
                t.requests += 1
                t.tokens += sum(len(r) for r in res.tokens)
                want, finished, prefix = _expected(model, engine, strategy, req, opts, check, ref, own, stop_ids)
                bad = _compare(model, req, i, res, want, finished, prefix, strategy)
                if bad:
                    t.mismatches.extend(bad)
                else:
                    t.identical += 1
    return tallies


def run_arrivals(model: RecycleModel, engines: dict[str, Engine], requests: Sequence[Request], *, rows: int,
                 strategies: Sequence[str] | None = None, opts: Options = Options(), check: Check = Check(),
                 seed: int = 0, deadline: float | None = None,
                 draft_rows: int | None = DRAFT_ROWS,
                 prefill_chunk: int | None = PREFILL_CHUNK) -> dict[tuple[str, str], Tally]:
    """Continuous batching under concurrent arrivals (draft_rows: `ContinuousBatch`'s, the verified strategies'
    rounds without drafts above that many live rows; prefill_chunk: its, the longer prompts that join while rows
    decode prefilled in chunks, one a check): every greedy prompt of `requests` (each row one arrival, with
    its request's budget and stop) joins one `ContinuousBatch` of at most `rows` rows per engine and strategy, in
    order, each arriving 0 to 3 checks after the one before (when it fits), and must give its reference tokens
    alone: all of them under "exact", the first `check.prefix` under "near-ties" (differences reported with their
    rank). Tallies are keyed (engine + "/continuous", strategy); a request there is one arrival."""
    strategies = strategy_names() if strategies is None else strategies
    rng = random.Random(seed)
    arrivals = [(p, req) for req in requests if req.sampling.greedy for p in req.prompts]
    gaps = [rng.randint(0, 3) for _ in arrivals]
    tallies = {(f"{kind}/continuous", s): Tally() for kind in engines for s in strategies}
    refs: dict[tuple[int, str], list[int]] = {}  # the reference's tokens alone, without stops (`truncate` applies them)

    def ref(i: int, target: str) -> list[int]:
        if (i, target) not in refs:
            p, req = arrivals[i]
            refs[(i, target)] = reference(model, target, Request((p,), req.max_new_tokens), opts).tokens[0]
        return refs[(i, target)]

    stops: list[set[int]] = []  # a token the arrival's own standard output meets early or late
    for i, (_, req) in enumerate(arrivals):
        if deadline is not None and time.monotonic() > deadline:
            return tallies
        stop = stop_token([ref(i, "standard")], req.stop) if req.stop else None
        stops.append({stop} if stop is not None else set())
    need = max((len(p) + req.max_new_tokens for p, req in arrivals), default=1) + opts.span(strategies) + 2
    for strategy in strategies:
        target = "standard" if get_strategy(strategy).lossless else strategy
        for i in range(len(arrivals)):
            if deadline is not None and time.monotonic() > deadline:
                return tallies
            ref(i, target)
        for kind, engine in engines.items():
            if deadline is not None and time.monotonic() > deadline:
                return tallies
            t = tallies[(f"{kind}/continuous", strategy)]
            batch = ContinuousBatch(engine, strategy, rows, max_len=need, check_every=4, draft_len=opts.draft_len,
                                    tree=opts.tree, draft_rows=draft_rows, prefill_chunk=prefill_chunk)
            reqs = [BatchRequest(list(p), req.max_new_tokens, frozenset(stops[i])) for i, (p, req) in
                    enumerate(arrivals)]
            start, waiting, since = time.perf_counter(), list(range(len(reqs))), 0
            while waiting or batch.live or batch.pending:
                if waiting and since >= gaps[waiting[0]] and batch.admits(reqs[waiting[0]]):
                    batch.add(reqs[waiting.pop(0)])
                    since = 0
                    continue
                batch.step()
                since += 1
            t.seconds += time.perf_counter() - start
            t.chunked += batch.chunked
            for i, (r, (p, req)) in enumerate(zip(reqs, arrivals)):
                (want,), (finished,) = truncate([ref(i, target)], req.max_new_tokens, stops[i])
                prefix = check.mode == "near-ties"
                one = Request((tuple(p),), req.max_new_tokens, req.sampling, req.stop)
                res = DecodeResult([r.tokens], None, [r.reason == "stop"])
                bad = _compare(model, one, i, res, [want[:check.prefix] if prefix else want],
                               None if prefix else [finished], prefix, strategy)
                t.requests += 1
                t.tokens += len(r.tokens)
                if bad:
                    t.mismatches.extend(bad)
                else:
                    t.identical += 1
    return tallies


def _expected(model, engine, strategy, req, opts, check, ref, own, stop_ids):
    """The tokens a request must give, whether each row stopped (None: not compared), and whether the tokens are
    the first ones only (the engine's output is then compared on as many)."""
    lossless = get_strategy(strategy).lossless
    target = "standard" if req.sampling.greedy and lossless else strategy  # lossless: standard decoding's tokens
    if check.mode == "exact":
        want = ref(target).tokens
    elif req.sampling.greedy and (strategy == "standard" or not lossless or "standard" not in own):
        want = [r[:check.prefix] for r in ref(target).tokens]  # the first tokens, against the reference
    elif req.sampling.greedy:
        want = own["standard"]  # the same engine's standard: the kernels sum alike
    else:  # sampled, bf16: the same engine, the same seed, again
        again = engine.decode(strategy, [list(p) for p in req.prompts], max_new_tokens=req.max_new_tokens,
                              sampling=req.sampling, stop_ids=tuple(stop_ids), draft_len=opts.draft_len,
                              tree=opts.tree)
        return again.tokens, None, False
    if check.mode == "near-ties" and want is not own.get("standard"):  # a prefix of the reference's tokens
        if stop_ids:
            want, _ = truncate(want, req.max_new_tokens, stop_ids)
        return want, None, True
    if want is own.get("standard") and strategy != "standard":
        return want, None, False  # the same engine's own run already stopped where it stops
    return (*truncate(want, req.max_new_tokens, stop_ids), False)


def _compare(model, req, i, res, want, finished, prefix, strategy) -> list[Mismatch]:
    bad = []
    for row, (got, exp) in enumerate(zip(res.tokens, want)):
        got_cmp = got[:len(exp)] if prefix else got
        n = first_difference(got_cmp, exp)
        if n is None and finished is not None and res.finished[row] != finished[row]:
            n = len(got)
        if n is None:
            continue
        margin = rank = None
        if req.sampling.greedy and get_strategy(strategy).lossless and n < min(len(exp), len(got)):
            margin, rank = choice_margin(model.base, list(req.prompts[row]) + exp[:n], got[n])
        bad.append(Mismatch(i, row, n, margin, req.describe(), rank, rank is not None and rank < NEAR_TIE_RANK))
    return bad


def summary_rows(tallies: dict[tuple[str, str], Tally]) -> list[dict]:
    rows = []
    for (kind, strategy), t in tallies.items():
        margins = [m.margin for m in t.mismatches if m.margin is not None]
        rows.append({"engine": kind, "strategy": strategy, "requests": t.requests, "identical": t.identical,
                     "tokens": t.tokens, "seconds": round(t.seconds, 1), "mismatched_rows": len(t.mismatches),
                     "chunked": t.chunked,
                     "near_ties": sum(m.near_tie for m in t.mismatches),
                     "first_difference": min((m.index for m in t.mismatches), default=None),
                     "largest_margin": max(margins, default=None),
                     "largest_rank": max((m.rank for m in t.mismatches if m.rank is not None), default=None)})
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'engine':<17} {'strategy':<17} {'requests':>8} {'identical':>9} {'tokens':>8} {'diff rows':>9} " \
           f"{'near-ties':>9} {'first diff':>10} {'max margin':>10} {'max rank':>8} {'engine s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        first = "-" if r["first_difference"] is None else str(r["first_difference"])
        margin = "-" if r["largest_margin"] is None else f"{r['largest_margin']:.4f}"
        rank = "-" if r.get("largest_rank") is None else str(r["largest_rank"])
        lines.append(f"{r['engine']:<17} {r['strategy']:<17} {r['requests']:>8} {r['identical']:>9} "
                     f"{r['tokens']:>8} {r['mismatched_rows']:>9} {r['near_ties']:>9} {first:>10} {margin:>10} "
                     f"{rank:>8} {r['seconds']:>8.1f}")
    return "\n".join(lines)
