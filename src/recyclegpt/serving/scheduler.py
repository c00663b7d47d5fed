"""One worker thread that runs queued requests through `RecycleGPT.generate`, in arrival order, greedy requests of
one strategy that are waiting together as one batch (up to `max_batch`).

A `Job` carries one request's prompt ids and decoding options and a thread-safe `emit` callback; the worker calls
it with ("delta", text) as text becomes final, then ("done", Outcome) or ("error", exception). Stop strings are
applied here, in generate's `stream` callback: a stop string that is one token stops on that token, any other on
the decoded text; either way the text is cut before the stop and decoding ends at once (the callback raises,
which ends generate's loop). A cancelled job (its client went away) is skipped if still queued and ends at the
next step generate reports if running.

Batches: the worker takes the oldest waiting job and, when it is greedy, every other waiting greedy job of the same
strategy (up to `max_batch`), and decodes their prompts as one left-padded batch (`run_batch`): the tokens a
row gets are those it gets alone (greedy decoding of a batch is row by row the same, up to 16-bit near-ties where
the kernels sum a batch in another order). A row ends on its own (its stop, its max_tokens, its client leaving),
its response is sent then, and the batch decodes on until every row has ended. Sampled requests run alone, so
that a seed gives the same text whatever else is waiting.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..api import RecycleGPT
from ..decoding.loops import DecodeStats

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


@dataclass
class Outcome:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    stats: DecodeStats | None  # None when decoding was ended early by a stop string


class TextTracker:
    """Follows one request's tokens: the text so far, stop strings, and the part of the text safe to send."""

    def __init__(self, lm: RecycleGPT, job: Job) -> None:
        self.lm, self.job = lm, job
        self.ids: list[int] = []
        self.sent = 0  # characters already emitted
        self.hold = max((len(s) for s in job.stop), default=1) - 1  # a stop string may still be forming here
        self.stopped_text: str | None = None

    def add(self, tokens: list[int]) -> None:
        """Take the new tokens of one step; emit what became final; raise _Halt at a stop."""
        decode = self.lm.tokenizer.decode
        for t in tokens:
            if t in self.job.stop_token_ids:
                self.ids.append(t)
                self.stopped_text = decode(self.ids[:-1])
                raise _Halt("stop token")
            self.ids.append(t)
        text = decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.job.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped_text = text[:cut]
            raise _Halt("stop string")
        if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for its next byte
            return
        safe = len(text) - self.hold
        if safe > self.sent:
            self.job.emit(("delta", text[self.sent:safe]))
            self.sent = safe

    def finish(self, text: str) -> None:
        """Emit the rest of the final text."""
        if len(text) > self.sent:
            self.job.emit(("delta", text[self.sent:]))
            self.sent = len(text)


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
                          stream=on_tokens, engine=engine)
    except _Halt:
        if tracker.stopped_text is None:  # cancelled
            return None
        tracker.finish(tracker.stopped_text)
        return Outcome(tracker.stopped_text, len(tracker.ids), "stop", None)
    text, ids = out.text[0], out.token_ids[0]
    tracker.finish(text)
    return Outcome(text, len(ids), "stop" if len(ids) < job.max_tokens else "length", out.stats)


def batchable(job: Job) -> bool:
    """Whether `job` may share a batch: greedy (sampling draws for the whole batch from one generator)."""
    return job.temperature == 0


def run_batch(lm: RecycleGPT, jobs: list[Job], engine: str,
              done: Callable[[Job, Outcome | None, BaseException | None], None]) -> None:
    """Decode greedy jobs of one strategy as one batch; `done(job, outcome, error)` as each row ends (outcome None:
    cancelled)."""
    trackers = [TextTracker(lm, job) for job in jobs]
    ended = [False] * len(jobs)

    def end(i: int, outcome: Outcome | None) -> None:
        ended[i] = True
        done(jobs[i], outcome, None)

    def on_tokens(step: list[list[int]]) -> None:
        for i, (job, tracker) in enumerate(zip(jobs, trackers)):
            if ended[i]:
                continue
            if job.cancelled.is_set():
                end(i, None)
                continue
            room = job.max_tokens - len(tracker.ids)
            try:
                tracker.add(step[i][:room])
            except _Halt:
                tracker.finish(tracker.stopped_text)
                end(i, Outcome(tracker.stopped_text, len(tracker.ids), "stop", None))
                continue
            if len(tracker.ids) >= job.max_tokens:
                text = lm.tokenizer.decode(tracker.ids)
                tracker.finish(text)
                end(i, Outcome(text, len(tracker.ids), "length", None))
        if all(ended):
            raise _Halt("every row ended")

    try:
        out = lm.generate([job.prompt_ids for job in jobs], strategy=jobs[0].strategy,
                          max_new_tokens=max(job.max_tokens for job in jobs), temperature=0.0, stream=on_tokens,
                          engine=engine)
    except _Halt:
        return
    except Exception as e:  # reported to the rows still decoding; the others have their answers
        for i, job in enumerate(jobs):
            if not ended[i]:
                ended[i] = True
                done(job, None, e)
        if not isinstance(e, ValueError):
            log.exception("generation failed")
        return
    for i, job in enumerate(jobs):  # rows that ended with the batch: at EOS, or at the longest max_tokens
        if not ended[i]:
            ids = out.token_ids[i][:job.max_tokens]
            text = out.text[i] if len(ids) == len(out.token_ids[i]) else lm.tokenizer.decode(ids)
            trackers[i].finish(text)
            end(i, Outcome(text, len(ids), "stop" if len(ids) < job.max_tokens else "length", out.stats))


class Worker:
    """The thread that runs jobs from a bounded queue; `stop` ends it (and cancels what is queued or running)."""

    def __init__(self, lm: RecycleGPT, *, engine: str = "auto", max_queue: int = 64, max_batch: int = 8,
                 on_done: Callable[[Job, Outcome | None, BaseException | None], None] | None = None) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.lm, self.engine, self.max_batch = lm, engine, max_batch
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._held: deque[Job] = deque()  # taken from the queue to look at, not batched with the job before them
        self.on_done = on_done
        self.running: list[Job] = []
        self.largest_batch = 0  # the most requests decoded together so far
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="recyclegpt-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

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
        """Stop taking jobs, cancel the queued ones and the running one, and wait for the thread."""
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

    def _next(self, timeout: float) -> Job | None:
        if self._held:
            return self._held.popleft()
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _batch(self, first: Job) -> list[Job]:
        """`first` and the waiting jobs that may decode with it, in arrival order; the others stay waiting, first in
        line."""
        if not batchable(first) or self.max_batch == 1:
            return [first]
        batch, passed = [first], []
        while len(batch) < self.max_batch:
            job = self._next(0) if self._held or not self.queue.empty() else None
            if job is None:
                break
            if job.cancelled.is_set():
                continue
            (batch if batchable(job) and job.strategy == first.strategy else passed).append(job)
        self._held.extendleft(reversed(passed))
        return batch

    def _done(self, job: Job, outcome: Outcome | None, error: BaseException | None) -> None:
        if self.on_done is not None:
            try:
                self.on_done(job, outcome, error)
            except Exception:
                log.exception("on_done failed")
        if error is not None:
            job.emit(("error", error))
        elif outcome is not None:
            job.emit(("done", outcome))

    def _loop(self) -> None:
        while not self._stopping.is_set():
            job = self._next(0.1)
            if job is None or job.cancelled.is_set():
                continue
            batch = self._batch(job)
            self.running = batch
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                if len(batch) > 1:
                    run_batch(self.lm, batch, self.engine, self._done)
                else:
                    self._done(job, run_job(self.lm, job, self.engine), None)
            except Exception as e:  # reported to these requests only; the worker goes on
                if not isinstance(e, ValueError):
                    log.exception("generation failed")
                for j in batch:
                    self._done(j, None, e)
            finally:
                self.running = []
