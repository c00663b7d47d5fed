"""Load benchmark of `recyclegpt serve` through HTTP, one strategy at a time, each request a streamed greedy
completion of a prompt from a mixed-length set: open-loop, requests arriving as a Poisson process at several rates
(`--rates`), or closed-loop, N clients each sending its next request when its last one ends (`--concurrency`: the
server's throughput at N streams). Reports per strategy and load the throughput, time to first token, time per
output token and the gaps between a stream's chunks (inter-chunk latency: a stream's stalls, as where a joining
prompt's prefill holds the batch; percentiles and the longest), counts the answers equal to the same request's at
the lowest load (in 16-bit dtypes a batched request may take the other side of a near-tie and go on differently),
prints a table and a final JSON line, and optionally draws latency against load.

    python scripts/bench_serve.py --url http://127.0.0.1:8000 [--rates 1,2,4 | --concurrency 1,8,32]
        [--requests 32] [--strategies standard,recycle-verified] [--max-tokens 64] [--ignore-eos]
        [--prompts FILE.jsonl] [--chart OUT.png]

Start the server first (`recyclegpt serve ...`); --api-key if it has one. Prompts: a JSONL file with a "prompt"
field per line (as `bench` reads), else the bench's built-in chat prompts with longer passages mixed in.
--ignore-eos asks the server to decode every request to --max-tokens (its `ignore_eos` extension).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx

from recyclegpt.evals.speed import BUILTIN_PROMPTS
from recyclegpt.training.data import read_prompts


@dataclass
class Result:
    """One request: when it was sent, when its first text and its last chunk came, the gaps between its chunks of
    text, its tokens and its text."""

    sent: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    text: list[str] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    error: str | None = None

    def per_token(self) -> float | None:
        """Seconds per output token after the first (the inter-token latency a reader sees on average)."""
        if self.first is None or self.last is None or self.tokens < 2:
            return None
        return (self.last - self.first) / (self.tokens - 1)


def default_prompts() -> list[str]:
    """The bench's built-in chat prompts, and the same with a long passage before them (mixed lengths)."""
    passage = " ".join(BUILTIN_PROMPTS) * 6
    return list(BUILTIN_PROMPTS) + [f"{passage}\n\nIn two sentences: {p}" for p in BUILTIN_PROMPTS[:4]]


async def one(client: httpx.AsyncClient, url: str, headers: dict, body: dict, at: float, start: float) -> Result:
    await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
    res = Result(sent=time.perf_counter())
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                now = time.perf_counter()
                if chunk.get("usage"):
                    res.tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if res.last is not None:
                        res.gaps.append(now - res.last)
                    res.first = res.first or now
                    res.last = now
                    res.text.append(chunk["choices"][0]["text"])
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_load(url: str, headers: dict, model: str, prompts: list[str], strategy: str, load: float, n: int,
                   max_tokens: int, seed: int, closed: bool, ignore_eos: bool) -> tuple[list[Result], float]:
    """n requests of `strategy`: at Poisson arrival times of `load` per second, or (closed) from `load` clients
    that each send the next request when their last ends. Returns (results in the order of their prompts, wall
    seconds); request i has the same prompt at every load (the draws do not depend on the load's value)."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(1.0)
        arrivals.append(t / load)
    order = [prompts[i % len(prompts)] for i in range(n)]
    rng.shuffle(order)
    ext = {"strategy": strategy, **({"ignore_eos": True} if ignore_eos else {})}

    def body(p: str) -> dict:
        return {"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "recyclegpt": ext}

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None)) as client:
        start = time.perf_counter()
        if closed:
            results: list[Result | None] = [None] * n
            queue = iter(range(n))

            async def worker() -> None:
                for i in queue:
                    results[i] = await one(client, f"{url}/v1/completions", headers, body(order[i]), 0.0, start)

            await asyncio.gather(*(worker() for _ in range(int(load))))
        else:
            results = await asyncio.gather(*(one(client, f"{url}/v1/completions", headers, body(p), at, start)
                                             for p, at in zip(order, arrivals)))
        wall = time.perf_counter() - start
    return list(results), wall


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--rates", default=None, help="requests per second, comma-separated (default 1,2,4)")
    ap.add_argument("--concurrency", default=None, help="closed loop instead: clients, comma-separated")
    ap.add_argument("--ignore-eos", action="store_true", help="every request decodes to --max-tokens")
    ap.add_argument("--requests", type=int, default=32, help="requests per strategy and rate")
    ap.add_argument("--strategies", default="standard,recycle-verified")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", default=None, help="JSONL with a 'prompt' field per line")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chart", default=None, help="PNG of time per output token and to first token against load")
    args = ap.parse_args(argv)
    if args.rates and args.concurrency:
        raise SystemExit("bench_serve: give --rates or --concurrency, not both")
    closed = args.concurrency is not None
    loads = [float(r) for r in (args.concurrency if closed else args.rates or "1,2,4").split(",") if r]
    if not loads or min(loads) <= 0 or (closed and any(x != int(x) for x in loads)) or args.requests < 1 \
            or args.max_tokens < 1:
        raise SystemExit("bench_serve: --rates must be positive, --concurrency whole numbers, --requests and "
                         "--max-tokens at least 1")
    unit = "clients" if closed else "rate/s"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    prompts = read_prompts(args.prompts) if args.prompts else default_prompts()
    try:
        model = httpx.get(f"{args.url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, ValueError) as e:
        raise SystemExit(f"bench_serve: no server answering at {args.url}/v1/models ({e})") from None
    rows, answers = [], {}
    print(f"{'strategy':<17} {unit:>7} {'done':>5} {'tok/s':>8} {'ttft p50':>9} {'ttft p90':>9} "
          f"{'tpot p50':>9} {'tpot p90':>9} {'itl p99':>9} {'itl max':>9} {'same':>5}  (ms)")
    for strategy in [s for s in args.strategies.split(",") if s]:
        for rate in sorted(loads):
            results, wall = asyncio.run(run_load(args.url, headers, model, prompts, strategy, rate, args.requests,
                                                 args.max_tokens, args.seed, closed, args.ignore_eos))
            ok = [r for r in results if r.error is None]
            # request i has the same prompt at every rate (the arrival draws do not depend on the rate's value)
            texts = {i: "".join(r.text) for i, r in enumerate(results) if r.error is None}
            base = answers.setdefault(strategy, texts)  # the lowest load's answers: the reference
            same = sum(texts[i] == base.get(i, texts[i]) for i in texts)
            ttft = [r.first - r.sent for r in ok if r.first is not None]
            tpot = [x for x in (r.per_token() for r in ok) if x is not None]
            gaps = [g for r in ok for g in r.gaps]
            row = {"strategy": strategy, ("concurrency" if closed else "rate"): rate, "requests": len(results),
                   "completed": len(ok),
                   "errors": sorted({r.error for r in results if r.error})[:3], "wall_s": round(wall, 3),
                   "tokens_per_s": round(sum(r.tokens for r in ok) / wall, 1),
                   "ttft_p50": pct(ttft, 0.5), "ttft_p90": pct(ttft, 0.9), "ttft_p99": pct(ttft, 0.99),
                   "tpot_p50": pct(tpot, 0.5), "tpot_p90": pct(tpot, 0.9), "tpot_p99": pct(tpot, 0.99),
                   "tpot_mean": statistics.fmean(tpot) if tpot else None,
                   "itl_p50": pct(gaps, 0.5), "itl_p99": pct(gaps, 0.99), "itl_max": max(gaps, default=None),
                   "same_as_lowest_rate": same}
            rows.append(row)
            print(f"{strategy:<17} {rate:>7g} {len(ok):>5} {row['tokens_per_s']:>8.1f} {ms(row['ttft_p50']):>9} "
                  f"{ms(row['ttft_p90']):>9} {ms(row['tpot_p50']):>9} {ms(row['tpot_p90']):>9} "
                  f"{ms(row['itl_p99']):>9} {ms(row['itl_max']):>9} {same:>2}/{len(texts):<2}", flush=True)
    report = {"url": args.url, "model": model, "max_tokens": args.max_tokens, "requests": args.requests,
              "prompts": len(prompts), "load": "closed" if closed else "poisson", "ignore_eos": args.ignore_eos,
              "rows": rows}
    if args.chart:
        chart(rows, args.chart)
    print(json.dumps(report))
    if any(r["completed"] < r["requests"] for r in rows):
        print("bench_serve: some requests failed (their errors are in the report)", file=sys.stderr)
    if any(r["same_as_lowest_rate"] < r["completed"] for r in rows):
        print("bench_serve: some answers differ from the lowest load's (batched rows sum in another order; in 16-bit "
              "dtypes a near-tie can go the other way)", file=sys.stderr)
    return report


def chart(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "rate" if "rate" in rows[0] else "concurrency"
    unit = "requests per second" if key == "rate" else "concurrent clients"
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        rs = [r for r in rows if r["strategy"] == strategy]
        a.plot([r[key] for r in rs], [1000 * (r["tpot_p50"] or 0) for r in rs], marker="o", label=strategy)
        b.plot([r[key] for r in rs], [1000 * (r["ttft_p50"] or 0) for r in rs], marker="o", label=strategy)
    a.set(xlabel=unit, ylabel="median ms per output token", title="time per output token")
    b.set(xlabel=unit, ylabel="median ms to first token", title="time to first token")
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
