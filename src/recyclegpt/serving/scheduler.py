"""One worker thread that runs queued requests through `RecycleGPT.generate`, one at a time, in arrival order.

A `Job` carries one request's prompt ids and decoding options and a thread-safe `emit` callback; the worker calls
it with ("delta", text) as text becomes final, then ("done", Outcome) or ("error", exception). Stop strings are
applied here, in generate's `stream` callback: a stop string that is one token stops on that token, any other on
the decoded text; either way the text is cut before the stop and decoding ends at once (the callback raises,
which ends generate's loop). A cancelled job (its client went away) is skipped if still queued and ends at the
next step generate reports if running.
"""

from __future__ import annotations

import logging
import queue
import threading
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


class Worker:
    """The thread that runs jobs from a bounded queue; `stop` ends it (and cancels what is queued or running)."""

    def __init__(self, lm: RecycleGPT, *, engine: str = "auto", max_queue: int = 64,
                 on_done: Callable[[Job, Outcome | None, BaseException | None], None] | None = None) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.lm, self.engine = lm, engine
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.on_done = on_done
        self.running: Job | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="recyclegpt-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def depth(self) -> int:
        """Requests waiting (not counting the one running)."""
        return self.queue.qsize()

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
        if self.running is not None:
            self.running.cancelled.set()
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            job.cancelled.set()
            job.emit(("error", RuntimeError("the server is shutting down")))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if job.cancelled.is_set():
                continue
            self.running = job
            outcome, error = None, None
            try:
                outcome = run_job(self.lm, job, self.engine)
            except Exception as e:  # reported to this request only; the worker goes on
                error = e
                if not isinstance(e, ValueError):
                    log.exception("generation failed")
            finally:
                self.running = None
            if self.on_done is not None:
                try:
                    self.on_done(job, outcome, error)
                except Exception:
                    log.exception("on_done failed")
            if error is not None:
                job.emit(("error", error))
            elif outcome is not None:
                job.emit(("done", outcome))
