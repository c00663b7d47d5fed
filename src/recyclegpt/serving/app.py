"""The FastAPI app of `recyclegpt serve`: OpenAI-compatible completions and chat completions over one RecycleGPT.

`create_app(lm, ServerConfig(...))` builds it; the CLI runs it with uvicorn. Requests are validated on the event
loop, then queued for the single worker thread (scheduler.py), which runs them in arrival order through
`RecycleGPT.generate`, greedy requests of one strategy that wait together as one batch. Errors are answered in
OpenAI's shape, {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import RecycleGPT
from ..decoding import strategies
from ..decoding.batching import DRAFT_ROWS, PREFILL_CHUNK
from ..decoding.sampling import SamplingParams
from .scheduler import Job, Outcome, QueueFull, Worker
from .schemas import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("recyclegpt.serving")

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_BODY_BYTES = 1 << 20
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


def default_strategy(lm: RecycleGPT) -> str:
    """A lossless strategy: recycle-verified with a module loaded, else standard."""
    return "recycle-verified" if lm.model is not None else "standard"


@dataclass
class ServerConfig:
    model_name: str | None = None  # the name clients pass as "model" (default: lm.name, else "recyclegpt")
    strategy: str | None = None  # the default strategy (default: `default_strategy`)
    engine: str = "auto"
    max_model_len: int | None = None  # prompt + completion limit (default and upper bound: the model's context)
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <api_key>"
    max_queue: int = 64  # requests waiting beyond the ones running; more are refused with 503
    max_batch: int = 8  # greedy requests of one strategy decode together by continuous batching, up to this many
    # the verified strategies' batches draft while at most this many requests decode together; with more, their
    # rounds verify the full model's next token alone (ContinuousBatch's draft_rows). None: they always draft
    draft_rows: int | None = DRAFT_ROWS
    # a longer prompt that joins while requests decode is prefilled this many tokens at a time, one chunk each time
    # they get their tokens (ContinuousBatch's prefill_chunk), so that they keep streaming. None: prompts whole
    prefill_chunk: int | None = PREFILL_CHUNK
    max_body_bytes: int = MAX_BODY_BYTES
    warmup: bool | None = None  # decode short batches at start (Worker.warm_up); None: when the engine captures graphs


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, type=self.type, param=self.param, code=self.code)


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class Metrics:
    """Counters for /metrics, in Prometheus' text format."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.errors: dict[str, int] = {}
        self.tokens = 0
        self.prompt_tokens = 0
        self.tau_sum, self.tau_count = 0.0, 0

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1
            if status >= 400:
                kind = "server_error" if status >= 500 else "client_error"
                self.errors[kind] = self.errors.get(kind, 0) + 1

    def generation(self, job: Job, outcome: Outcome | None, error: BaseException | None) -> None:
        with self.lock:
            self.prompt_tokens += len(job.prompt_ids)
            if error is not None:
                self.errors["generation"] = self.errors.get("generation", 0) + 1
            if outcome is not None:
                self.tokens += outcome.completion_tokens
                if outcome.stats is not None and outcome.stats.tau is not None:
                    self.tau_sum += outcome.stats.tau
                    self.tau_count += 1

    def render(self, queue_depth: int, running: int) -> str:
        lines = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value}" for labels, value in samples)

        with self.lock:
            metric("recyclegpt_requests_total", "counter", "HTTP requests by endpoint and status.",
                   [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())])
            metric("recyclegpt_errors_total", "counter",
                   "Errors: client_error (4xx), server_error (5xx), generation (a request failed while decoding).",
                   [(f'{{kind="{k}"}}', n) for k, n in sorted(self.errors.items())])
            metric("recyclegpt_prompt_tokens_total", "counter", "Prompt tokens of the requests decoded.",
                   [("", self.prompt_tokens)])
            metric("recyclegpt_generated_tokens_total", "counter", "Tokens generated.", [("", self.tokens)])
            metric("recyclegpt_queue_depth", "gauge", "Requests waiting for the worker.", [("", queue_depth)])
            metric("recyclegpt_requests_running", "gauge", "Requests being decoded (one batch).", [("", running)])
            metric("recyclegpt_tau_sum", "counter", "Sum of tau (tokens per verifying full call) over requests.",
                   [("", self.tau_sum)])
            metric("recyclegpt_tau_count", "counter", "Requests that reported tau.", [("", self.tau_count)])
        return "\n".join(lines) + "\n"


class Gate:
    """ASGI middleware: the body-size limit, the API key, and request counts by endpoint and status."""

    def __init__(self, app, server: "Server") -> None:
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status = [500]

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        cfg = self.server.config
        try:
            refusal = None
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
                refusal = error_response(413, f"the request body is over the limit of {cfg.max_body_bytes} bytes",
                                         code="request_too_large")
            elif cfg.api_key is not None and path.startswith("/v1/"):
                given = headers.get("authorization", "")
                if not secrets.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
                    refusal = error_response(401, "missing or incorrect API key: send 'Authorization: Bearer KEY'",
                                             code="invalid_api_key")
            if refusal is not None:
                await refusal(scope, receive, counted_send)
            else:
                await self.app(scope, receive, counted_send)
        finally:
            self.server.metrics.request(endpoint, status[0])


class Outbox:
    """Hands the worker thread's events to the event loop's request queues: one wake-up of the loop for each burst
    of events (the worker emits for every running request after each check of a batch), not one per event."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, Any]] = []
        self._lock = threading.Lock()

    def put(self, events: asyncio.Queue, ev: Any) -> None:
        with self._lock:
            self._items.append((events, ev))
            if len(self._items) > 1:  # a flush is scheduled already
                return
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop is closed (shutdown): nobody is listening
            pass

    def _flush(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for events, ev in items:
            events.put_nowait(ev)


class Server:
    """The state behind the app: the model, its worker, the metrics."""

    def __init__(self, lm: RecycleGPT, config: ServerConfig) -> None:
        if lm.tokenizer is None:
            raise ValueError("the server needs a model with a tokenizer")
        self.lm, self.config = lm, config
        self.model_name = config.model_name or lm.name or "recyclegpt"
        self.strategy = config.strategy or default_strategy(lm)
        self.check_strategy(self.strategy, param=None)
        ctx = lm.base.cfg.context_length
        if config.max_model_len is not None and config.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {config.max_model_len}")
        self.context = min(ctx, config.max_model_len) if config.max_model_len else ctx
        lm.resolve_engine(config.engine)  # a clear error now for a bad engine
        self.metrics = Metrics()
        self.worker = Worker(lm, engine=config.engine, max_queue=config.max_queue, max_batch=config.max_batch,
                             max_len=self.context, draft_rows=config.draft_rows,
                             prefill_chunk=config.prefill_chunk, on_done=self.metrics.generation)
        self.created = int(time.time())
        self._outbox: Outbox | None = None

    def check_strategy(self, name: str, *, param: str | None = "recyclegpt.strategy") -> None:
        try:
            s = strategies.get(name)
        except ValueError as e:
            raise APIError(400, str(e), param=param) from None
        if s.needs_module and self.lm.model is None:
            raise APIError(400, f"strategy {name!r} needs a recyclable module and this server loads none; use "
                                f"'standard' or 'lookup'", param=param)

    # -- request → job -----------------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
            if len(prompt) > 1:
                raise APIError(400, "several prompts in one request are not supported; send one request per prompt",
                               param="prompt", code="unsupported")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.lm.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.lm.base.cfg.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        return ids

    def chat_ids(self, req: ChatCompletionRequest) -> list[int]:
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        try:
            text = self.lm.tokenizer.apply_chat_template(messages)
        except ValueError as e:
            raise APIError(400, f"{e}; use /v1/completions", param="messages") from None
        except Exception as e:  # the template itself refused the conversation (jinja2 raise_exception)
            raise APIError(400, f"the chat template refused the messages: {e}", param="messages") from None
        ids = self.lm.tokenizer.encode(text)
        if not ids:
            raise APIError(400, "the conversation is empty", param="messages")
        return ids

    def make_job(self, req, ids: list[int], max_tokens: int | None, *, default_max: int | None,
                 max_param: str = "max_tokens") -> Job:
        bad = req.unsupported()
        if bad:
            raise APIError(400, f"unsupported field(s): {', '.join(bad)} (n must be 1; penalties and the like are "
                                "not implemented)", param=bad[0], code="unsupported")
        logprobs = self.logprobs_wanted(req)
        if len(ids) >= self.context:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server's context is {self.context} tokens",
                           param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        room = self.context - len(ids)
        if max_tokens is None:
            max_tokens = room if default_max is None else min(default_max, room)
        elif max_tokens <= 0:
            raise APIError(400, f"{max_param} must be at least 1, got {max_tokens}", param=max_param)
        elif max_tokens > room:
            raise APIError(400, f"prompt ({len(ids)} tokens) + {max_param} ({max_tokens}) exceeds this server's "
                                f"context of {self.context} tokens; lower {max_param} to at most {room}",
                           param=max_param, code="context_length_exceeded")
        temperature = 1.0 if req.temperature is None else req.temperature
        try:
            SamplingParams(temperature=temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed)
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split()[0]) from None
        strategy = self.strategy
        if req.recyclegpt is not None and req.recyclegpt.strategy is not None:
            strategy = req.recyclegpt.strategy
            self.check_strategy(strategy)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if any(s == "" for s in stop):
            raise APIError(400, "stop strings must not be empty", param="stop")
        tok = self.lm.tokenizer
        single = frozenset(t[0] for s in stop if len(t := tok.encode(s, add_bos=False)) == 1 and tok.decode(t) == s)
        return Job(ids, max_tokens, strategy, float(temperature), req.top_p, req.top_k, req.seed, stop, single,
                   emit=lambda ev: None, logprobs=logprobs,
                   ignore_eos=req.recyclegpt is not None and req.recyclegpt.ignore_eos)

    @staticmethod
    def logprobs_wanted(req) -> int | None:
        """How many alternatives per token the request's logprobs ask for (0: the chosen token's only), or None."""
        chat = isinstance(req, ChatCompletionRequest)
        lp, top = req.logprobs, req.top_logprobs
        if chat:
            if lp not in (None, True, False):
                raise APIError(400, f"logprobs must be true or false, got {lp!r}", param="logprobs")
            if top is not None and (not isinstance(top, int) or not 0 <= top <= 20):
                raise APIError(400, f"top_logprobs must be an integer from 0 to 20, got {top!r}", param="top_logprobs")
            if top and not lp:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            want = (top or 0) if lp else None
        else:
            if top not in (None, 0):
                raise APIError(400, "top_logprobs is a chat field; completions take logprobs: N", param="top_logprobs")
            if lp is None or lp is False:
                want = None
            elif isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= 5:
                raise APIError(400, f"logprobs must be an integer from 0 to 5, got {lp!r}", param="logprobs")
            else:
                want = lp
        if want is not None and req.stream:
            raise APIError(400, "logprobs are returned with whole responses only; send the request without stream",
                           param="logprobs", code="unsupported")
        return want

    def logprobs_body(self, outcome: Outcome, chat: bool) -> dict | None:
        """The response's logprobs object in OpenAI's shape (chat's `content` list, or completions' parallel lists)."""
        if outcome.logprobs is None:
            return None
        tok = self.lm.tokenizer
        pieces = [tok.decode([t]) for t in outcome.token_ids]
        if chat:
            def entry(token: int, lp: float) -> dict:
                piece = tok.decode([token])
                return {"token": piece, "logprob": lp, "bytes": list(piece.encode())}

            return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                                for t, (lp, top) in zip(outcome.token_ids, outcome.logprobs)], "refusal": None}
        offsets, at = [], 0
        for p in pieces:
            offsets.append(at)
            at += len(p)
        return {"tokens": pieces, "token_logprobs": [lp for lp, _ in outcome.logprobs],
                "top_logprobs": [{tok.decode([i]): v for i, v in top} for _, top in outcome.logprobs]
                if any(top for _, top in outcome.logprobs) else None, "text_offset": offsets}

    async def submit(self, job: Job) -> asyncio.Queue:
        """Queue the job; its events arrive on the returned asyncio queue."""
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        if self._outbox is None or self._outbox.loop is not loop:
            self._outbox = Outbox(loop)
        outbox = self._outbox
        job.emit = lambda ev: outbox.put(events, ev)
        try:
            self.worker.submit(job)
        except QueueFull as e:
            raise APIError(503, str(e), type="server_error", code="server_overloaded") from None
        return events

    # -- responses ---------------------------------------------------------------------------------------------

    def extension(self, job: Job, outcome: Outcome) -> dict:
        ext: dict[str, Any] = {"strategy": job.strategy}
        st = outcome.stats
        if st is not None:
            ext["tau"] = st.tau
            ext["tokens_per_full_call"] = st.new_tokens / st.full_calls if st.full_calls else None
            alpha = getattr(st, "alpha", None)
            if alpha is not None:
                ext["alpha"] = alpha
        return ext

    @staticmethod
    def usage(job: Job, outcome: Outcome) -> dict:
        return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": outcome.completion_tokens,
                "total_tokens": len(job.prompt_ids) + outcome.completion_tokens}

    @staticmethod
    def failure(error: BaseException) -> APIError:
        if isinstance(error, ValueError):
            return APIError(400, str(error))
        if isinstance(error, RuntimeError) and "shutting down" in str(error):
            return APIError(503, str(error), type="server_error", code="server_shutting_down")
        return APIError(500, "the server failed to generate a response", type="server_error")

    async def respond(self, request: Request, job: Job, *, chat: bool, stream: bool, include_usage: bool):
        events = await self.submit(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if not stream:
            text_parts = []
            try:
                while True:
                    kind, value = await events.get()
                    if kind == "delta":
                        text_parts.append(value)
                    elif kind == "error":
                        raise self.failure(value)
                    else:
                        break
            finally:
                job.cancelled.set()  # a no-op once done; ends the job if this handler was cancelled
            outcome: Outcome = value
            logprobs = self.logprobs_body(outcome, chat)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": outcome.text},
                          "logprobs": logprobs, "finish_reason": outcome.finish_reason}
            else:
                choice = {"index": 0, "text": outcome.text, "logprobs": logprobs,
                          "finish_reason": outcome.finish_reason}
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": self.model_name,
                                 "choices": [choice], "usage": self.usage(job, outcome),
                                 "recyclegpt": self.extension(job, outcome)})

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None = None, **extra) -> str:
            if chat:
                d = {} if delta is None else {"content": delta}
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            body = {"id": rid, "object": chunk_obj, "created": created, "model": self.model_name,
                    "choices": [choice], **extra}
            if include_usage and "usage" not in body:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def sse():
            pending: deque = deque()  # events that came while the last chunk was sent
            try:
                if chat:
                    first = json.loads(chunk("")[6:])
                    first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                    yield f"data: {json.dumps(first)}\n\n"
                while True:
                    if not pending:
                        pending.append(await events.get())
                        while not events.empty():
                            pending.append(events.get_nowait())
                    kind, value = pending.popleft()
                    if kind == "delta":  # the text that waits goes out as one chunk
                        while pending and pending[0][0] == "delta":
                            value += pending.popleft()[1]
                        if value:
                            yield chunk(value)
                    elif kind == "error":
                        err = self.failure(value)
                        body = {"error": {"message": err.message, "type": err.type, "param": err.param,
                                          "code": err.code}}
                        yield f"data: {json.dumps(body)}\n\n"
                        break
                    else:
                        outcome: Outcome = value
                        yield chunk(None, outcome.finish_reason, recyclegpt=self.extension(job, outcome))
                        if include_usage:
                            body = {"id": rid, "object": chunk_obj, "created": created, "model": self.model_name,
                                    "choices": [], "usage": self.usage(job, outcome)}
                            yield f"data: {json.dumps(body)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()  # the client went away (or all is sent): the worker stops at its next step

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    e = errors[0]
    loc = [x for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON: {detail}".rstrip(": "), None
    if not loc:
        if e.get("type") == "missing":
            return "a JSON object body is required", None
        return "the request body must be a JSON object", None
    field = str(loc[0])
    same = [x for x in errors if [y for y in x.get("loc", ()) if y != "body"][:1] == [loc[0]]]
    if len(same) > 1 and e.get("type") != "missing":  # a union: one error per alternative
        return f"invalid value for '{field}': it has none of the accepted types", field
    path = ".".join(str(x) for x in loc)
    if e.get("type") == "missing":
        return f"'{path}' is required", field
    return f"invalid value for '{path}': {e.get('msg', 'invalid')}", field


def create_app(lm: RecycleGPT, config: ServerConfig | None = None, **kw) -> FastAPI:
    """The app serving `lm`; config (or its fields as keywords) as `ServerConfig`."""
    config = config if config is not None else ServerConfig(**kw)
    server = Server(lm, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = server.worker
        if config.warmup or (config.warmup is None and worker.captures):
            seconds = worker.warm_up(server.strategy)  # before the port opens: no client waits behind it
            log.info("warmed up %s batches of 1 to %d rows in %.1f s", server.strategy, worker.max_batch, seconds)
        worker.start()
        try:
            yield
        finally:
            server.worker.stop()

    app = FastAPI(title="RecycleGPT", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(Gate, server=server)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                            str(exc.detail))
        return error_response(exc.status_code, message, type=kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal server error", type="server_error")

    @app.get("/health")
    async def health():
        ok = server.worker.alive
        return JSONResponse({"status": "ok" if ok else "worker stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        text = server.metrics.render(server.worker.depth(), len(server.worker.running))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "recyclegpt", "max_model_len": server.context}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        server.check_model(req.model)
        ids = server.prompt_ids(req.prompt)
        job = server.make_job(req, ids, req.max_tokens, default_max=DEFAULT_COMPLETION_TOKENS)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await server.respond(request, job, chat=False, stream=req.stream, include_usage=include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        server.check_model(req.model)
        max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        ids = server.chat_ids(req)
        job = server.make_job(req, ids, max_tokens, default_max=None, max_param=max_param)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await server.respond(request, job, chat=True, stream=req.stream, include_usage=include_usage)

    return app
