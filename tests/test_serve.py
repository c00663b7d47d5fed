"""`recyclegpt serve`: the OpenAI-compatible server over a tiny random model (CPU, no download)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import socket
import sys
import threading
import time

import pytest
import torch

fastapi = pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from recyclegpt.api import RecycleGPT  # noqa: E402
from recyclegpt.cli.main import build_parser  # noqa: E402
from recyclegpt.config import PRESETS, RecycleConfig  # noqa: E402
from recyclegpt.models import RecyclableModule, Transformer  # noqa: E402
from recyclegpt.serving import create_app  # noqa: E402
from recyclegpt.serving.scheduler import Job  # noqa: E402
from recyclegpt.training.data import train_bpe  # noqa: E402

TEXT = "explain why the sky is blue. write a short poem about a lighthouse. what are three tips for studying? " * 30
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
NAME = "tiny"
PROMPT = "explain why the sky"


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> RecycleGPT:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT)
    tok = dataclasses.replace(train_bpe([path], 300), eos_ids=(), chat_template=TEMPLATE)
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size)
    base, module = Transformer(cfg).eval(), RecyclableModule(cfg, RecycleConfig()).eval()
    return RecycleGPT(base, tok, module=module, name=NAME)


@pytest.fixture(scope="module")
def client(lm):
    with TestClient(create_app(lm)) as c:
        yield c


def complete(client, **body):
    return client.post("/v1/completions", json={"model": NAME, "prompt": PROMPT, "temperature": 0, **body})


def sse(response) -> list:
    """The data payloads of an SSE body, JSON-decoded, with the final [DONE] checked and dropped."""
    events = [line[len("data: "):] for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in response.text.split("\n\n") if line)
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def error_of(r, status: int, param: str | None = "<any>") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in err["message"]
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if param != "<any>":
        assert err["param"] == param, err
    return err


# -- what works --------------------------------------------------------------------------------------------------


def test_models_health_and_default_strategy(client):
    assert client.get("/health").json() == {"status": "ok"}
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == [NAME]
    assert client.app.state.server.strategy == "recycle-verified"  # lossless by default with a module


@pytest.mark.parametrize("strategy", ["standard", "recycle-verified", "recycle"])
def test_completion_equals_generate(client, lm, strategy):
    r = complete(client, max_tokens=12, recyclegpt={"strategy": strategy})
    assert r.status_code == 200, r.text
    body = r.json()
    want = lm.generate(PROMPT, strategy=strategy, max_new_tokens=12)
    assert body["object"] == "text_completion" and body["model"] == NAME
    assert body["choices"][0]["text"] == want.text[0]
    assert body["choices"][0]["finish_reason"] == "length"
    n_prompt = len(lm.encode(PROMPT))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 12, "total_tokens": n_prompt + 12}
    ext = body["recyclegpt"]
    assert ext["strategy"] == strategy and ext["tokens_per_full_call"] > 0
    assert (ext["tau"] is not None) == (strategy == "recycle-verified")


def test_logprobs_are_the_base_models_own(client, lm):
    """Completions' logprobs (the OpenAI legacy lists) and chat's (`content` entries): each token's log-probability
    under the base model given everything before it, the alternatives sorted, greedy tokens the most likely."""
    body = complete(client, max_tokens=10, temperature=0, logprobs=3).json()
    choice, ids = body["choices"][0], lm.encode(PROMPT)
    lp = choice["logprobs"]
    tokens = lm.generate(PROMPT, max_new_tokens=10).token_ids[0]
    with torch.inference_mode():
        ref = torch.log_softmax(lm.base(torch.tensor([ids + tokens])).logits[0].float(), -1)
    want = [ref[len(ids) - 1 + j, t].item() for j, t in enumerate(tokens)]
    assert lp["tokens"] == [lm.tokenizer.decode([t]) for t in tokens]
    assert lp["token_logprobs"] == pytest.approx(want, abs=1e-4)
    assert "".join(lp["tokens"]) == choice["text"] and lp["text_offset"][0] == 0
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(chosen, abs=1e-4)  # greedy: the top token
    messages = [{"role": "user", "content": "why is the sky blue?"}]
    body = client.post("/v1/chat/completions", json={"model": NAME, "messages": messages, "max_tokens": 6,
                                                     "temperature": 0.9, "seed": 3, "logprobs": True,
                                                     "top_logprobs": 2}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    assert "".join(c["token"] for c in content) == body["choices"][0]["message"]["content"]
    for c in content:
        assert c["logprob"] <= 0 and bytes(c["bytes"]).decode() == c["token"] and len(c["top_logprobs"]) == 2
        assert c["top_logprobs"][0]["logprob"] >= c["top_logprobs"][1]["logprob"]
        assert c["logprob"] <= c["top_logprobs"][0]["logprob"] + 1e-6  # sampled: the chosen token, maybe not the top
    assert complete(client, max_tokens=4).json()["choices"][0]["logprobs"] is None


def test_token_id_prompt_and_single_item_list(client, lm):
    ids = lm.encode(PROMPT)
    by_text = complete(client, max_tokens=8).json()["choices"][0]["text"]
    assert complete(client, prompt=ids, max_tokens=8).json()["choices"][0]["text"] == by_text
    assert complete(client, prompt=[PROMPT], max_tokens=8).json()["choices"][0]["text"] == by_text


def test_streaming_completion_concatenates_to_the_text(client):
    full = complete(client, max_tokens=20).json()["choices"][0]["text"]
    r = complete(client, max_tokens=20, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == full
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and "recyclegpt" in chunks[-2]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20


def test_chat_and_chat_stream(client, lm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why is the sky blue?"}]
    ids = lm.tokenizer.encode(lm.tokenizer.apply_chat_template(messages))
    want = lm.generate(ids, strategy="recycle-verified", max_new_tokens=10).text[0]
    r = client.post("/v1/chat/completions", json={"model": NAME, "messages": messages, "temperature": 0,
                                                   "max_completion_tokens": 10})
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want}
    assert body["usage"]["prompt_tokens"] == len(ids)
    r = client.post("/v1/chat/completions", json={"model": NAME, "messages": messages, "temperature": 0,
                                                   "max_tokens": 10, "stream": True})
    chunks = sse(r)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_strings(client, lm):
    want = lm.generate(PROMPT, max_new_tokens=30).text[0]
    ids = lm.generate(PROMPT, max_new_tokens=30).token_ids[0]
    one_token = lm.tokenizer.decode(ids[5:6])
    several = want[len(lm.tokenizer.decode(ids[:8])):][:4]
    assert len(lm.tokenizer.encode(one_token)) == 1 and len(lm.tokenizer.encode(several)) > 1
    for stop in (one_token, several, [several, "zzzzqq"]):
        first = stop if isinstance(stop, str) else stop[0]
        cut = want[:want.find(first)]
        body = complete(client, max_tokens=30, stop=stop, recyclegpt={"strategy": "standard"}).json()
        assert body["choices"][0]["text"] == cut and body["choices"][0]["finish_reason"] == "stop"
        chunks = sse(complete(client, max_tokens=30, stop=stop, stream=True))
        assert "".join(c["choices"][0]["text"] for c in chunks) == cut
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_seed_makes_sampling_repeatable(client):
    a, b = (complete(client, max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7).json() for _ in range(2))
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_metrics(client):
    complete(client, max_tokens=4)
    text = client.get("/metrics").text
    assert '# TYPE recyclegpt_requests_total counter' in text
    assert 'recyclegpt_requests_total{endpoint="/v1/completions",status="200"}' in text
    tokens = next(line for line in text.splitlines() if line.startswith("recyclegpt_generated_tokens_total "))
    assert int(tokens.split()[1]) >= 4
    assert "recyclegpt_queue_depth 0" in text and "recyclegpt_tau_count" in text


# -- errors ------------------------------------------------------------------------------------------------------


def test_validation_errors(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    error_of(r, 400)
    error_of(client.post("/v1/completions", json={"model": NAME}), 400, "prompt")
    error_of(client.post("/v1/completions", json=[1, 2]), 400)
    error_of(complete(client, max_tokens="many"), 400, "max_tokens")
    error_of(client.post("/v1/chat/completions", json={"model": NAME, "messages": []}), 400, "messages")
    err = error_of(complete(client, temperature=-1), 400, "temperature")
    assert "temperature must be a finite number >= 0" in err["message"]
    error_of(complete(client, top_p=2), 400, "top_p")
    error_of(complete(client, top_k=0), 400, "top_k")
    error_of(complete(client, max_tokens=0), 400, "max_tokens")
    error_of(client.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "x"}],
                                                        "max_completion_tokens": -3}), 400, "max_completion_tokens")
    assert error_of(complete(client, prompt="sky " * 400), 400, "prompt")["code"] == "context_length_exceeded"
    assert error_of(complete(client, max_tokens=250), 400, "max_tokens")["code"] == "context_length_exceeded"
    assert "unknown strategy" in error_of(complete(client, recyclegpt={"strategy": "fast"}), 400)["message"]
    error_of(complete(client, prompt=""), 400, "prompt")
    error_of(complete(client, prompt=[10**6]), 400, "prompt")
    error_of(complete(client, stop=[""]), 400, "stop")
    error_of(complete(client, logprobs=6), 400, "logprobs")
    error_of(complete(client, logprobs=2, stream=True), 400, "logprobs")
    error_of(complete(client, top_logprobs=2), 400, "top_logprobs")
    chat = {"model": NAME, "messages": [{"role": "user", "content": "x"}]}
    error_of(client.post("/v1/chat/completions", json={**chat, "top_logprobs": 3}), 400, "top_logprobs")
    error_of(client.post("/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 21}), 400,
             "top_logprobs")
    for field, value in (("n", 2), ("best_of", 3), ("echo", True), ("presence_penalty", 0.5)):
        assert error_of(complete(client, **{field: value}), 400, field)["code"] == "unsupported"
    assert error_of(complete(client, prompt=["a", "b"]), 400, "prompt")["code"] == "unsupported"
    assert error_of(complete(client, model="gpt-4"), 404, "model")["code"] == "model_not_found"
    error_of(client.get("/v1/nothing"), 404)
    error_of(client.post("/v1/completions", content=b"x" * (1 << 20 + 1),
                         headers={"content-type": "application/json"}), 413)
    # a bad request disturbs nobody: the next one is served
    assert complete(client, max_tokens=3).status_code == 200


def test_max_model_len_and_no_module(lm):
    no_module = RecycleGPT(lm.base, lm.tokenizer, name=NAME)
    with TestClient(create_app(no_module, max_model_len=32)) as c:
        assert c.app.state.server.strategy == "standard"
        assert c.get("/v1/models").json()["data"][0]["max_model_len"] == 32
        error_of(complete(c, max_tokens=30), 400, "max_tokens")
        err = error_of(complete(c, recyclegpt={"strategy": "speculative"}), 400, "recyclegpt.strategy")
        assert "needs a recyclable module" in err["message"]
        assert complete(c, max_tokens=4).status_code == 200


def test_api_key(lm):
    with TestClient(create_app(lm, api_key="sekret")) as c:
        error_of(complete(c), 401)
        error_of(complete(c, max_tokens=2), 401)
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                   headers={"Authorization": "Bearer wrong"})
        assert error_of(r, 401)["code"] == "invalid_api_key"
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                   headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 200
        assert c.get("/health").status_code == 200  # health and metrics stay open


def test_queue_full_is_503(lm):
    app = create_app(lm, max_queue=1)
    c = TestClient(app)  # no lifespan: the worker is not started, so the queue does not drain
    app.state.server.worker.submit(Job([1], 1, "standard", 0.0, None, None, None, [], frozenset(), emit=print))
    err = error_of(complete(c, max_tokens=2), 503)
    assert err["code"] == "server_overloaded"


def test_serve_parser():
    args = build_parser().parse_args(["serve", "--port", "0", "--api-key", "k", "--max-queue", "3"])
    assert args.strategy is None and args.host == "127.0.0.1" and args.max_queue == 3 and args.api_key == "k"


# -- the official client against a live server ---------------------------------------------------------------------


@contextlib.contextmanager
def live_server(lm, **config):
    """A uvicorn server for `lm` on a free port of 127.0.0.1, in a thread; yields (port, app), stops it after."""
    uvicorn = pytest.importorskip("uvicorn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(lm, **config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not server.started:
            assert time.time() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        yield port, app
    finally:
        server.should_exit = True
        thread.join(20)
    assert not thread.is_alive()


def test_openai_client_against_live_server(lm):
    openai = pytest.importorskip("openai")
    with live_server(lm, api_key="k") as (port, _):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list()] == [NAME]
        want = lm.generate(PROMPT, strategy="recycle-verified", max_new_tokens=12).text[0]
        out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0)
        assert out.choices[0].text == want and out.usage.completion_tokens == 12
        results = {}

        def ask(i):  # concurrent requests queue up and each gets its own answer
            results[i] = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        [t.start() for t in threads]
        [t.join(30) for t in threads]
        assert [results[i].choices[0].text for i in range(3)] == [want] * 3
        msgs = [{"role": "user", "content": "why is the sky blue?"}]
        chat = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0)
        stream = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == 8
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="other", prompt=PROMPT, max_tokens=2)
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=NAME, prompt=PROMPT, max_tokens=2, temperature=-1)
        assert e.value.body["type"] == "invalid_request_error"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bad", max_retries=0).models.list()


def test_cancelled_job_ends_at_the_next_step(lm):
    from recyclegpt.serving.scheduler import run_job

    deltas = []

    def emit(ev):  # the client goes away after the first piece of text
        deltas.append(ev)
        job.cancelled.set()

    job = Job(lm.encode(PROMPT), 200, "standard", 0.0, None, None, None, [], frozenset(), emit=emit)
    assert run_job(lm, job, "auto") is None
    assert len(deltas) == 1


@pytest.mark.parametrize("seed", range(4))
def test_text_tracker_is_the_whole_decode(lm, seed):
    """Incremental text: the deltas concatenate to decoding all tokens at once, whatever the steps' sizes and however
    the tokens split UTF-8 sequences; a stop string ends the text before its first occurrence, keeping the tokens up
    to the one that completed it (both against decoding every prefix whole)."""
    from recyclegpt.serving.scheduler import TextTracker, _Halt

    tok, rng = lm.tokenizer, random.Random(seed)
    ids = tok.encode("héllo wörld ☃ — naïve 日本語 text, the sky is blue! " * 3)
    ids = [rng.choice(ids) if rng.random() < 0.3 else t for t in ids]  # broken UTF-8 sequences too
    full = tok.decode(ids)
    stops = [[], [full[len(full) // 2:len(full) // 2 + 3]], ["blue", "zzz"]][seed % 3]
    deltas = []
    job = Job([1], len(ids), "standard", 0.0, None, None, None, stops, frozenset(), emit=deltas.append)
    tracker, i, halted = TextTracker(lm, job), 0, False
    while i < len(ids) and not halted:
        n = rng.randint(1, 5)
        try:
            tracker.add(ids[i:i + n])
        except _Halt:
            halted = True
        i += n
        assert full.startswith("".join(d for _, d in deltas))
    cuts = [full.find(s) for s in stops if s in full]
    if not cuts:
        assert not halted
        tracker.finish(full)
        assert "".join(d for _, d in deltas) == full
        return
    cut = min(cuts)
    kept = next(k for k in range(1, len(ids) + 1) if any(s in tok.decode(ids[:k]) for s in stops))
    assert halted and tracker.stopped_text == full[:cut] and tracker.ids == ids[:kept]
    tracker.finish(tracker.stopped_text)
    assert "".join(d for _, d in deltas) == full[:cut]


def resident_mb() -> float:
    """This process's resident memory (Linux /proc), after a garbage collection."""
    import gc

    gc.collect()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_load_of_concurrent_streams_with_disconnects(lm):
    """64 streaming clients at once, prompts of mixed lengths, every strategy, a few leaving after their first
    chunk: each completed stream is exactly the request run alone (no chunk lost or repeated; greedy requests of a
    strategy waiting together decode as one batch), the abandoned ones free the worker, and the server answers
    afterwards with nothing left queued or running. A second round of the same load leaves the process's memory
    where the first left it (the engine keeps a bounded set of Decoders; nothing grows per request)."""
    httpx = pytest.importorskip("httpx")
    strategies = ("standard", "recycle-verified", "speculative", "lookup", "recycle")
    words = TEXT.split()
    requests = [(" ".join(words[:1 + (7 * i) % 60]), strategies[i % len(strategies)], 4 + i % 13) for i in range(64)]
    leaving = {5, 17, 29, 41, 53, 63}
    results: dict[int, str] = {}
    with live_server(lm, max_queue=64) as (port, app):
        url = f"http://127.0.0.1:{port}/v1/completions"

        def client(i):
            prompt, strategy, n = requests[i]
            body = {"model": NAME, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
                    "recyclegpt": {"strategy": strategy}}
            with httpx.stream("POST", url, json=body, timeout=120) as r:
                assert r.status_code == 200, r.read()
                text = []
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        results[i] = "".join(text)
                        return
                    text.append(json.loads(line[len("data: "):])["choices"][0]["text"])
                    if i in leaving:
                        return  # the client goes away mid-stream

        def load() -> None:
            results.clear()
            threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
            [t.start() for t in threads]
            [t.join(180) for t in threads]
            assert not any(t.is_alive() for t in threads)
            assert set(results) == set(range(len(requests))) - leaving

        load()
        rss = resident_mb()
        load()
        assert resident_mb() - rss < 32, (rss, resident_mb())  # flat: a second round adds nothing that stays
        for i, got in results.items():
            prompt, strategy, n = requests[i]
            assert got == lm.generate(prompt, strategy=strategy, max_new_tokens=n).text[0], requests[i]
        deadline = time.time() + 30
        while True:  # the abandoned requests end at their next step; then nothing is queued or running
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            idle = "recyclegpt_queue_depth 0" in metrics and "recyclegpt_requests_running 0" in metrics
            if idle or time.time() > deadline:
                break
            time.sleep(0.1)
        assert idle, metrics
        assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok"}
        assert app.state.server.worker.largest_batch > 1  # requests did share batches


def run_on_worker(lm, jobs, max_batch: int = 4, draft_rows: int | None = None, **kw):
    """Submit `jobs` to a Worker before it starts, wait until every one has ended, stop it; (the worker, {id of a
    job: (outcome, error)})."""
    import threading

    from recyclegpt.serving.scheduler import Worker

    ended, twice, done = {}, [], threading.Event()

    def on_done(j, outcome, error):
        if id(j) in ended:
            twice.append(j)
        ended[id(j)] = (outcome, error)
        if len(ended) == len(jobs):
            done.set()

    worker = Worker(lm, max_batch=max_batch, draft_rows=draft_rows, on_done=on_done, **kw)
    for j in jobs:
        worker.submit(j)
    worker.start()
    assert done.wait(120)
    worker.stop()
    assert not twice, "a job ended twice"
    return worker, ended


def test_a_long_prompt_joining_a_running_batch_is_prefilled_in_chunks_once(lm):
    """Two rows: a long-budget job and a short one start together; when the short one ends, a long prompt joins
    while the other decodes, prefilled in chunks (prefill_chunk 16): every job ends once, with its text alone."""
    from recyclegpt.serving.scheduler import run_job

    def job(prompt, n):
        return Job(lm.encode(prompt), n, "standard", 0.0, None, None, None, [], frozenset(), emit=lambda ev: None)

    specs = [(PROMPT, 40), ("the", 2), (" ".join(TEXT.split()[:40]), 6)]
    assert len(lm.encode(specs[2][0])) > 16
    jobs = [job(*s) for s in specs]
    _, ended = run_on_worker(lm, jobs, max_batch=2, prefill_chunk=16)
    for spec, j in zip(specs, jobs):
        outcome, error = ended[id(j)]
        assert error is None and outcome.text == run_job(lm, job(*spec), "auto").text, spec


@pytest.mark.parametrize(("group_fails", "draft_rows"), [(False, None), (True, None), (False, 2)])
def test_a_batch_gives_each_row_what_it_gets_alone(lm, monkeypatch, group_fails, draft_rows):
    """The worker's continuous batch: greedy requests of mixed prompt lengths, budgets and stops (a stop string, a
    stop token, none), one client leaving, queued together: each one's streamed text and outcome are those of the
    request run alone (run_job). group_fails: the joint prefill of the waiting requests fails, and the worker joins
    them one at a time instead. draft_rows: the batch verifies no drafts while more than 2 rows are live."""

    from recyclegpt.decoding.batching import ContinuousBatch
    from recyclegpt.serving.scheduler import run_job

    groups = []
    if group_fails:
        def add_all(self, reqs):
            groups.append(len(reqs))
            raise RuntimeError("the joint prefill failed")
        monkeypatch.setattr(ContinuousBatch, "add_all", add_all)

    def job(prompt, n, stop=(), stop_ids=frozenset(), leave=False):
        events = []

        def emit(ev):
            events.append(ev)
            if leave:
                j.cancelled.set()
        j = Job(lm.encode(prompt), n, "recycle-verified", 0.0, None, None, None, list(stop), stop_ids, emit=emit)
        j.events = events
        return j

    alone_text = lm.generate(PROMPT, strategy="recycle-verified", max_new_tokens=20).text[0]
    specs = [(PROMPT, 20, (), frozenset(), False), ("the", 7, (), frozenset(), False),
             (PROMPT, 20, (alone_text[5:8],), frozenset(), False),
             (TEXT[:200], 12, (), frozenset({lm.encode(alone_text)[3]}), False), ("why", 30, (), frozenset(), True)]
    jobs = [job(*s) for s in specs]
    # all waiting before the worker starts: they share its batch, the fifth joining as a row frees
    worker, ended = run_on_worker(lm, jobs, draft_rows=draft_rows)
    assert worker.largest_batch == 4
    assert set(ended) == {id(j) for j in jobs}
    assert not group_fails or max(groups) == 4  # four waiting requests tried together, then one at a time
    for spec, j in zip(specs, jobs):
        outcome, error = ended[id(j)]
        assert error is None
        if spec[-1]:  # the client left: no outcome
            assert outcome is None
            continue
        ref = job(*spec)
        want = run_job(lm, ref, "auto")
        assert (outcome.text, outcome.completion_tokens, outcome.finish_reason) == \
            (want.text, want.completion_tokens, want.finish_reason), spec
        assert "".join(e[1] for e in j.events if e[0] == "delta") == outcome.text


def test_bench_serve_script_against_a_live_server(lm, tmp_path, capsys):
    """scripts/bench_serve.py: Poisson arrivals at two rates, two strategies; every request completes, answers equal
    those at the lowest rate, and the report ends with one JSON line."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    bench_serve = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = bench_serve  # its dataclasses resolve their annotations there
    spec.loader.exec_module(bench_serve)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(TEXT.split()[:n])}) + "\n" for n in (2, 9, 40)))
    with live_server(lm) as (port, _):
        report = bench_serve.main(["--url", f"http://127.0.0.1:{port}", "--rates", "20,80", "--requests", "6",
                                   "--strategies", "standard,recycle-verified", "--max-tokens", "6",
                                   "--prompts", str(prompts)])
        closed = bench_serve.main(["--url", f"http://127.0.0.1:{port}", "--concurrency", "1,3", "--requests", "6",
                                   "--strategies", "standard", "--max-tokens", "5", "--ignore-eos",
                                   "--prompts", str(prompts)])
    assert len(report["rows"]) == 4
    for row in report["rows"]:
        assert row["completed"] == row["requests"] == 6 and row["same_as_lowest_rate"] == 6, row
        assert row["tokens_per_s"] > 0 and row["ttft_p50"] is not None
        assert row["itl_max"] is None or row["itl_max"] >= row["itl_p99"] >= row["itl_p50"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == closed
    assert closed["load"] == "closed" and [r["concurrency"] for r in closed["rows"]] == [1, 3]
    for row in closed["rows"]:  # ignore_eos: every request decodes its five tokens
        assert row["completed"] == 6
        tps, wall = row["tokens_per_s"], row["wall_s"]  # rounded to 0.1 and to 0.001
        assert (tps - 0.05) * (wall - 0.0005) <= 6 * 5 <= (tps + 0.05) * (wall + 0.0005), row


def test_ignore_eos_decodes_past_end_of_sequence(lm):
    """The `ignore_eos` extension: the request keeps decoding to max_tokens where it would stop at an EOS."""
    from recyclegpt.serving.scheduler import BatchedJob, run_job

    ids = lm.encode(PROMPT)
    free = lm.generate([ids], max_new_tokens=12).token_ids[0]
    eos_lm = RecycleGPT(lm.base, dataclasses.replace(lm.tokenizer, eos_ids=(free[3],)), name=NAME)
    job = Job(ids, 12, "standard", 0.0, None, None, None, [], frozenset(), emit=lambda ev: None)
    assert run_job(eos_lm, job, "auto").completion_tokens == free.index(free[3])  # stops at the EOS
    job = Job(ids, 12, "standard", 0.0, None, None, None, [], frozenset(), emit=lambda ev: None, ignore_eos=True)
    assert run_job(eos_lm, job, "auto").completion_tokens == 12
    assert BatchedJob(eos_lm, job).request.stop_ids == frozenset()


def test_sampled_requests_share_a_batch_and_keep_their_seeds(lm):
    """Sampled requests of `standard` and `recycle` decode in one continuous batch, each drawing what it draws alone
    with its seed (run_job); a sampled verified strategy runs alone."""

    from recyclegpt.serving.scheduler import BatchedJob, batchable, run_job

    specs = [(PROMPT, 14, 0.8, 20, 1), ("the", 9, 1.1, None, 2), (TEXT[:120], 12, 0.6, 5, 3), ("why", 10, 1.0, None, 4)]

    def job(prompt, n, t, k, seed, strategy="recycle"):
        return Job(lm.encode(prompt), n, strategy, t, None, k, seed, [], frozenset(), emit=lambda ev: None)

    jobs = [job(*s) for s in specs]
    worker, ended = run_on_worker(lm, jobs)
    assert worker.largest_batch == 4
    for spec, j in zip(specs, jobs):
        outcome, error = ended[id(j)]
        assert error is None and outcome.text == run_job(lm, job(*spec), "auto").text, spec
    assert not batchable(job(*specs[0], strategy="speculative")) and batchable(job(*specs[0], strategy="standard"))
    assert BatchedJob(lm, jobs[0]).request.sampling.seed == 1


@pytest.mark.parametrize("strategy", ["recycle-verified", "standard", "recycle"])
def test_unseeded_sampled_requests_share_a_batch(lm, strategy):
    """Sampled requests without a seed and with the same settings decode together from one generator, each to its
    budget; a seeded one, or one of other settings, does not join them (it waits, then runs: alone for a verified
    strategy, in a batch of its own generators for standard and recycle)."""
    from recyclegpt.serving.scheduler import batchable, own_generators, shared_sampling

    def job(n, t=0.9, seed=None, k=None):
        return Job(lm.encode(PROMPT), n, strategy, t, None, k, seed, [], frozenset(), emit=lambda ev: None,
                   ignore_eos=True)

    jobs = [job(8 + i) for i in range(4)] + [job(6, seed=5), job(7, k=3)]
    worker, ended = run_on_worker(lm, jobs)
    assert worker.largest_batch == 4
    for j in jobs:
        outcome, error = ended[id(j)]
        assert error is None and outcome.completion_tokens == j.max_tokens
    fixed = strategy != "recycle-verified"
    assert batchable(jobs[4]) == fixed == own_generators(jobs[4]) and not own_generators(jobs[0])
    assert batchable(jobs[5]) and shared_sampling(jobs[5]).top_k == 3 and shared_sampling(jobs[4]) is None
    assert shared_sampling(jobs[0]) != shared_sampling(jobs[5]) and shared_sampling(job(3, t=0)) is None


def test_warm_up_makes_every_batch_size_before_the_first_request(lm):
    """`warmup=True` decodes bursts of 1, 2, 4 requests before the port opens: the batch engine then holds the
    Decoders of every row count up to max_batch and the prefill Decoders of as many rows, and requests still get
    their own tokens.
    (Off by default on the CPU, where nothing is captured.)"""
    from recyclegpt.serving.scheduler import Worker

    assert not Worker(lm).captures
    engine = lm.engine("static")
    engine._decoders.clear()
    with TestClient(create_app(lm, max_batch=4, warmup=True)) as c:
        assert sorted(k[0] for k in engine._decoders if k[2] == "batch") == [1, 2, 4]
        assert sorted(k[0] for k in engine._decoders if k[2] == "prefill") == [1, 2, 4]
        r = complete(c, max_tokens=6, recyclegpt={"strategy": "recycle-verified"})
    expected = lm.generate([lm.encode(PROMPT)], strategy="recycle-verified", max_new_tokens=6).text[0]
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
    args = build_parser().parse_args(["serve", "--no-warmup"])
    assert args.no_warmup
