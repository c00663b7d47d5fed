"""One worker thread that runs queued requests, in arrival order: requests of one strategy by continuous batching
(greedy ones together; seeded sampled ones of `standard` and `recycle` together, each with its own generator;
unseeded sampled ones together when their settings agree, drawing from one generator), the seeded sampled requests
of verified strategies alone through `RecycleGPT.generate`.

A `Job` carries one request's prompt ids and decoding options and a thread-safe `emit` callback; the worker calls
it with ("delta", text) as text becomes final, then ("done", Outcome) or ("error", exception). Stop strings are
applied here, on the tokens as they come: a stop string that is one token stops on that token, any other on the
decoded text; either way the text is cut before the stop and the request ends at once. A cancelled job (its
client went away) is skipped if still queued and ends at the next check if running.

Batches (`decoding.batching.ContinuousBatch`): a job starts a batch of its strategy, greedy or sampled; the jobs
behind it of the same strategy and kind join it as they come, up to `max_batch` at once, each as soon as it fits,
and each leaves at its own end (its stop, its max_tokens, its client leaving), when its response is sent. A job of
another kind at the head of the queue stops the joining: the batch drains, then that job runs. A seeded sampled
request of `standard` or `recycle` draws from its own generator, so a seed gives the same text whatever else is
decoding; unseeded sampled requests share one generator (one draw for the batch a step) and join only a batch of
their settings. A greedy or seeded batched request gets the tokens it gets alone (up to 16-bit near-ties, where the
kernels sum a batch in another order); an unseeded one, a sample of the same distribution.
Batches run on an engine: "auto" takes the static engine on the CPU; with the eager loop named, every request runs
alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..api import RecycleGPT
from ..decoding import strategies
from ..decoding.batching import DRAFT_ROWS, PREFILL_CHUNK, ContinuousBatch, Request
from ..decoding.loops import DecodeStats
from ..decoding.sampling import SamplingParams

log = logging.getLogger("recyclegpt.serving")


class QueueFull(Exception):
    """The queue holds max_queue requests already."""


class _Halt(Exception):
    """Raised inside generate's stream callback to end decoding early (a stop string, or a cancelled job)."""


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    strategy: str
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: list[str]
    stop_token_ids: frozenset[int]
    emit: Callable[[tuple[str, Any]], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    logprobs: int | None = None  # return each token's log-probability and this many alternatives (None: no)
    ignore_eos: bool = False  # decode to max_tokens past end-of-sequence tokens (load benchmarks)


@dataclass
class Outcome:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    stats: DecodeStats | None  # None when decoding was ended early by a stop string
    token_ids: list[int] = field(default_factory=list)  # the completion's tokens (a stop token excluded)
    # with the job's logprobs: per token, its log-probability and the `logprobs` most likely (token, log-probability)
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


def score_tokens(lm: RecycleGPT, prompt: list[int], tokens: list[int], top: int) -> list[tuple[float, list]]:
    """Each completion token's log-probability under the base model given everything before it, and the `top` most
    likely tokens there: one forward over prompt + completion (the model's dtype, log-softmax in fp32)."""
    if not tokens:
        return []
    with torch.inference_mode():
        ids = torch.tensor([prompt + tokens], device=lm.device)
        logits = lm.base(ids, num_logits=len(tokens) + 1).logits[0, :-1].float()
        lp = torch.log_softmax(logits, dim=-1)
        chosen = lp.gather(1, torch.tensor(tokens, device=lm.device)[:, None])[:, 0].tolist()
        best = lp.topk(top, dim=-1) if top else None
    if best is None:
        return [(c, []) for c in chosen]
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, best.indices.tolist(), best.values.tolist())]


class TextTracker:
    """Follows one request's tokens: the text so far, stop strings, and the part of the text safe to send.

    The text grows incrementally: a step decodes only its new tokens, with the tokens of the step before as context,
    and appends the difference, so its cost does not grow with the completion (decoding the whole completion at
    every step is quadratic in its length). Tokens that end inside a UTF-8 sequence wait for the token that
    completes it."""

    def __init__(self, lm: RecycleGPT, job: Job) -> None:
        self.lm, self.job = lm, job
        self.ids: list[int] = []
        self.text = ""  # the text of ids[:_read]
        self._prefix = self._read = 0  # ids[_prefix:_read]: the context of the next decode
        self.sent = 0  # characters already emitted
        self.longest = max((len(s) for s in job.stop), default=1)
        self.hold = self.longest - 1  # a stop string may still be forming here
        self.stopped_text: str | None = None

    def _advance(self, end: int) -> None:
        """Extend the text to the first `end` tokens, unless they end inside a UTF-8 sequence."""
        if end <= self._read:
            return
        decode = self.lm.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read])
        now = decode(self.ids[self._prefix:end])
        if now.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for its next byte
            return
        self.text += now[len(before):]
        self._prefix, self._read = self._read, end

    def add(self, tokens: list[int]) -> None:
        """Take the new tokens of one step; emit what became final; raise _Halt at a stop (the earliest, and with
        the tokens counted up to it, however many tokens came in this step)."""
        start, stop_token = self._read, False  # the stop string may end in any token not yet in the text
        for t in tokens:
            self.ids.append(t)
            if t in self.job.stop_token_ids:
                stop_token = True
                break
        searched = max(0, len(self.text) - self.longest + 1)  # a stop string ending before this was found before
        end = len(self.ids) - stop_token
        self._advance(end)
        cut = self._stop_at(self.text, searched)
        if cut >= 0:  # the token that completed the stop string is the last one counted
            decode = self.lm.tokenizer.decode
            while start < end - 1 and self._stop_at(decode(self.ids[:start + 1])) < 0:
                start += 1
            del self.ids[start + 1:]
            self.stopped_text = self.text[:cut]
            raise _Halt("stop string")
        if stop_token:
            self.stopped_text = self.text if self._read == end else self.lm.tokenizer.decode(self.ids[:end])
            raise _Halt("stop token")
        safe = len(self.text) - self.hold
        if safe > self.sent:
            self.job.emit(("delta", self.text[self.sent:safe]))
            self.sent = safe

    def _stop_at(self, text: str, start: int = 0) -> int:
        """Where the first stop string begins in text (at or after `start`); -1 when none does."""
        return min((i for i in (text.find(s, start) for s in self.job.stop) if i >= 0), default=-1)

    def finish(self, text: str) -> None:
        """Emit the rest of the final text."""
        if len(text) > self.sent:
            self.job.emit(("delta", text[self.sent:]))
            self.sent = len(text)


def without_stop(ids: list[int], job: Job) -> list[int]:
    """A stopped completion's tokens: without its last one when that is a stop token."""
    return ids[:-1] if ids and ids[-1] in job.stop_token_ids else list(ids)


def run_job(lm: RecycleGPT, job: Job, engine: str) -> Outcome | None:
    """Decode one job, emitting its text as it comes; None when it was cancelled."""
    tracker = TextTracker(lm, job)

    def on_tokens(step: list[list[int]]) -> None:
        if job.cancelled.is_set():
            raise _Halt("cancelled")
        tracker.add(step[0])

    try:
        out = lm.generate(job.prompt_ids, strategy=job.strategy, max_new_tokens=job.max_tokens,
                          temperature=job.temperature, top_k=job.top_k, top_p=job.top_p, seed=job.seed,
                          stream=on_tokens, engine=engine, ignore_eos=job.ignore_eos)
    except _Halt:
        if tracker.stopped_text is None:  # cancelled
            return None
        tracker.finish(tracker.stopped_text)
        return Outcome(tracker.stopped_text, len(tracker.ids), "stop", None, without_stop(tracker.ids, job))
    text, ids = out.text[0], out.token_ids[0]
    tracker.finish(text)
    return Outcome(text, len(ids), "stop" if len(ids) < job.max_tokens else "length", out.stats, list(ids))


def own_generators(job: Job) -> bool:
    """Whether `job`'s batch draws from each row's own generator: sampled and seeded, with a strategy of fixed steps
    (`standard`, `recycle`), whose steps sample outside their graphs, so that the seed gives the same text whatever
    else is decoding."""
    return job.temperature > 0 and job.seed is not None and strategies.get(job.strategy).round in ("standard",
                                                                                                    "recycle")


def shared_sampling(job: Job) -> SamplingParams | None:
    """The settings a sampled, unseeded request shares with the batch it joins (every row drawing from torch's
    global generator, one draw for the batch a step: the verified rounds draw for all rows at once, and many rows
    sample faster so than one generator at a time); None for a greedy or seeded request."""
    if job.temperature == 0 or job.seed is not None:
        return None
    return SamplingParams(temperature=job.temperature, top_k=job.top_k, top_p=job.top_p)


def batchable(job: Job) -> bool:
    """Whether `job` may join a continuous batch: greedy, sampled with a strategy of fixed steps, or sampled and
    unseeded (a seeded request of a verified strategy runs alone, so that its seed gives the same text whatever
    else is decoding)."""
    return job.temperature == 0 or own_generators(job) or shared_sampling(job) is not None


def joins(job: Job, batch: ContinuousBatch) -> bool:
    """Whether `job` may join the running `batch`: its strategy, greedy or sampled as the batch is, and the
    batch's shared settings, if it has them."""
    return (batchable(job) and job.strategy == batch.strategy and (job.temperature > 0) == batch.sampled
            and shared_sampling(job) == batch.shared)


class BatchedJob:
    """A job's request in a continuous batch: its text tracker as the request's token callback."""

    def __init__(self, lm: RecycleGPT, job: Job) -> None:
        self.lm, self.job, self.tracker = lm, job, TextTracker(lm, job)
        stop = frozenset(lm.tokenizer.eos_ids) if lm.tokenizer is not None and not job.ignore_eos else frozenset()
        sampling = shared_sampling(job) or (
            SamplingParams(temperature=job.temperature, top_k=job.top_k, top_p=job.top_p, seed=job.seed)
            if job.temperature > 0 else SamplingParams())
        self.request = Request(job.prompt_ids, job.max_tokens, stop, self.on_tokens, sampling=sampling)

    def on_tokens(self, tokens: list[int]) -> bool:
        if self.job.cancelled.is_set():
            return False
        try:
            self.tracker.add(tokens)
        except _Halt:
            return False
        return True

    def outcome(self) -> Outcome | None:
        """The ended request's outcome; None when its client left."""
        req, tracker = self.request, self.tracker
        if req.reason == "cancelled":
            if tracker.stopped_text is None:
                return None
            tracker.finish(tracker.stopped_text)
            return Outcome(tracker.stopped_text, len(tracker.ids), "stop", req.stats,
                           without_stop(tracker.ids, self.job))
        text = self.lm.tokenizer.decode(req.tokens)
        tracker.finish(text)
        return Outcome(text, len(req.tokens), req.reason, req.stats, list(req.tokens))


class Worker:
    """The thread that runs jobs from a bounded queue; `stop` ends it (and cancels what is queued or running)."""

    def __init__(self, lm: RecycleGPT, *, engine: str = "auto", max_queue: int = 64, max_batch: int = 8,
                 max_len: int | None = None, draft_rows: int | None = DRAFT_ROWS,
                 prefill_chunk: int | None = PREFILL_CHUNK,
                 on_done: Callable[[Job, Outcome | None, BaseException | None], None] | None = None) -> None:
        """max_len: the cache slots of a batch (default: the model's context). draft_rows: the verified
        strategies' batches draft while at most this many requests decode together (`ContinuousBatch`).
        prefill_chunk: a longer prompt that joins a batch while it decodes is prefilled this many slots at a time,
        one chunk each check (`ContinuousBatch`; None: whole)."""
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.lm, self.engine, self.max_batch, self.max_len, self.draft_rows = lm, engine, max_batch, max_len, draft_rows
        self.prefill_chunk = prefill_chunk
        kind = lm.resolve_engine(engine)
        # the engine of continuous batches: the one named, "static" for "auto" on the CPU; none for "eager"
        self.batch_engine = kind if kind != "eager" else ("static" if engine == "auto" else None)
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._held: deque[Job] = deque()  # taken from the queue to look at, still waiting
        self.on_done = on_done
        self.running: list[Job] = []
        self.largest_batch = 0  # the most requests decoded together so far
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="recyclegpt-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def captures(self) -> bool:
        """Whether the batch engine captures CUDA graphs (which `warm_up` makes before the first request)."""
        return self.batch_engine is not None and self.lm.engine(self.batch_engine).graphs

    def warm_up(self, strategy: str, *, prompt_tokens: int = 8, new_tokens: int = 16) -> float:
        """Before serving: decode bursts of 1, 2, 4, ... `max_batch` short greedy requests of `strategy` by
        continuous batching, so that the batch Decoder of every row count the batch may take, the prefill Decoders
        and their graphs at the first cache bucket exist before a client waits for them (as a GPU server captures
        its graphs at start). Longer prompts and caches still capture theirs on first use. Returns the seconds."""
        start = time.perf_counter()
        if self.batch_engine is None:
            return 0.0
        engine, rows = self.lm.engine(self.batch_engine), 1
        while True:
            batch = ContinuousBatch(engine, strategy, self.max_batch, max_len=self.max_len,
                                    draft_rows=self.draft_rows, prefill_chunk=self.prefill_chunk)
            batch.run([Request([(7 * i + j) % 100 + 1 for j in range(prompt_tokens)], new_tokens)
                       for i in range(rows)])
            if rows >= self.max_batch:
                break
            rows = min(2 * rows, self.max_batch)
        return time.perf_counter() - start

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def depth(self) -> int:
        """Requests waiting (not counting the ones running)."""
        return self.queue.qsize() + len(self._held)

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            raise QueueFull("the server is shutting down")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the server's queue is full ({self.queue.maxsize} requests waiting); retry later") \
                from None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, cancel the queued ones and the running ones, and wait for the thread."""
        self._stopping.set()
        for job in list(self.running):
            job.cancelled.set()
        while True:
            try:
                job = self._held.popleft() if self._held else self.queue.get_nowait()
            except queue.Empty:
                break
            job.cancelled.set()
            job.emit(("error", RuntimeError("the server is shutting down")))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _head(self, timeout: float) -> Job | None:
        """The oldest waiting job that is not cancelled, left waiting (None: none came within `timeout`)."""
        while True:
            if not self._held:
                try:
                    self._held.append(self.queue.get(timeout=timeout) if timeout else self.queue.get_nowait())
                except queue.Empty:
                    return None
            if not self._held[0].cancelled.is_set():
                return self._held[0]
            self._held.popleft()

    def _done(self, job: Job, outcome: Outcome | None, error: BaseException | None) -> None:
        if outcome is not None and job.logprobs is not None and error is None:
            try:
                outcome.logprobs = score_tokens(self.lm, job.prompt_ids, outcome.token_ids, job.logprobs)
            except Exception as e:  # this request's failure alone
                log.exception("scoring the completion failed")
                outcome, error = None, e
        if self.on_done is not None:
            try:
                self.on_done(job, outcome, error)
            except Exception:
                log.exception("on_done failed")
        if error is not None:
            job.emit(("error", error))
        elif outcome is not None:
            job.emit(("done", outcome))

    def _join(self, batch: ContinuousBatch, group: list[BatchedJob], jobs: dict[int, BatchedJob]) -> None:
        """Put the jobs of `group` into the running batch together (one resize, one rebase, their prompts prefilled
        together); should that fail, each job that did not join is tried alone, so that a bad request fails alone."""
        try:
            batch.add_all([bj.request for bj in group])
        except Exception as e:
            if not isinstance(e, ValueError):
                log.exception("prefill of %d joining requests failed; trying them one by one", len(group))
        joined = {id(r) for r in batch.admitted}
        for bj in group:
            if id(bj.request) not in joined:
                try:
                    batch.add(bj.request)
                except Exception as e:  # this request's failure alone: the batch's rows are untouched
                    if not isinstance(e, ValueError):
                        log.exception("prefill failed")
                    self._done(bj.job, None, e)
                    continue
            if bj.request.reason is not None:  # ended on its first tokens
                self._done(bj.job, bj.outcome(), None)
                continue
            jobs[id(bj.request)] = bj
            self.running.append(bj.job)

    def _loop(self) -> None:
        batch: ContinuousBatch | None = None
        jobs: dict[int, BatchedJob] = {}  # by id of their request
        while not self._stopping.is_set():
            try:
                if batch is None:
                    job = self._head(0.1)
                    if job is None:
                        continue
                    if self.batch_engine is None or not batchable(job):
                        self._held.popleft()
                        self._alone(job)
                        continue
                    batch = ContinuousBatch(self.lm.engine(self.batch_engine), job.strategy, self.max_batch,
                                            max_len=self.max_len, sampled=own_generators(job),
                                            shared=shared_sampling(job), draft_rows=self.draft_rows,
                                            prefill_chunk=self.prefill_chunk)
                # join the waiting jobs in arrival order while the oldest can; another kind of job waits for the
                # batch to drain
                group: list[BatchedJob] = []
                while (job := self._head(0)) is not None and joins(job, batch):
                    bj = BatchedJob(self.lm, job)
                    if not batch.fits(bj.request):
                        if batch.live or group:
                            break
                        self._held.popleft()
                        self._alone(job)
                        continue
                    if not batch.admits_all([g.request for g in group] + [bj.request]):
                        break
                    self._held.popleft()
                    group.append(bj)
                if group:
                    self._join(batch, group, jobs)
                self.largest_batch = max(self.largest_batch, batch.live)
                for req in batch.step():
                    bj = jobs.pop(id(req))
                    self.running.remove(bj.job)
                    self._done(bj.job, bj.outcome(), None)
                if not batch.live and not batch.pending:
                    batch = None
            except Exception as e:  # reported to the requests of this batch only; the worker goes on
                if not isinstance(e, ValueError):
                    log.exception("generation failed")
                for bj in jobs.values():
                    self._done(bj.job, None, e)
                jobs.clear()
                self.running = []
                batch = None
        for bj in jobs.values():  # stopping: the batch's jobs were cancelled by `stop`
            self._done(bj.job, None, None)

    def _alone(self, job: Job) -> None:
        self.running = [job]
        self.largest_batch = max(self.largest_batch, 1)
        try:
            self._done(job, run_job(self.lm, job, self.engine), None)
        except Exception as e:  # reported to this request only
            if not isinstance(e, ValueError):
                log.exception("generation failed")
            self._done(job, None, e)
        finally:
            self.running = []
