"""Load benchmark of `recyclegpt serve` through HTTP: requests arrive as a Poisson process at several rates, each a
streamed greedy completion of a prompt from a mixed-length set, one strategy at a time; reports per strategy and
rate the throughput, time to first token and time per output token (percentiles), checks that every answer equals
the same request's answer at the lowest rate, prints a table and a final JSON line, and optionally draws latency
against load.

    python scripts/bench_serve.py --url http://127.0.0.1:8000 [--rates 1,2,4] [--requests 32]
        [--strategies standard,recycle-verified] [--max-tokens 64] [--prompts FILE.jsonl] [--chart OUT.png]

Start the server first (`recyclegpt serve ...`); --api-key if it has one. Prompts: a JSONL file with a "prompt"
field per line (as `bench` reads), else the bench's built-in chat prompts with longer passages mixed in.
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
    """One request: when it was sent, when its first text and its last chunk came, its tokens and its text."""

    sent: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    text: list[str] = field(default_factory=list)
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
                    res.first = res.first or now
                    res.last = now
                    res.text.append(chunk["choices"][0]["text"])
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_rate(url: str, headers: dict, model: str, prompts: list[str], strategy: str, rate: float, n: int,
                   max_tokens: int, seed: int) -> tuple[list[Result], float, list[str]]:
    """n requests of `strategy` at Poisson arrival times of `rate` per second: (results, wall seconds, prompts),
    results in the order of their prompts."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        arrivals.append(t)
    order = [prompts[i % len(prompts)] for i in range(n)]
    rng.shuffle(order)
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, f"{url}/v1/completions", headers, {
            "model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "recyclegpt": {"strategy": strategy}}, at, start)
            for p, at in zip(order, arrivals)))
        wall = time.perf_counter() - start
    return list(results), wall, order


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
    ap.add_argument("--rates", default="1,2,4", help="requests per second, comma-separated")
    ap.add_argument("--requests", type=int, default=32, help="requests per strategy and rate")
    ap.add_argument("--strategies", default="standard,recycle-verified")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", default=None, help="JSONL with a 'prompt' field per line")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chart", default=None, help="PNG of time per output token and to first token against load")
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",") if r]
    if not rates or min(rates) <= 0 or args.requests < 1 or args.max_tokens < 1:
        raise SystemExit("bench_serve: --rates must be positive, --requests and --max-tokens at least 1")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    prompts = read_prompts(args.prompts) if args.prompts else default_prompts()
    try:
        model = httpx.get(f"{args.url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, ValueError) as e:
        raise SystemExit(f"bench_serve: no server answering at {args.url}/v1/models ({e})") from None
    rows, answers = [], {}
    print(f"{'strategy':<17} {'rate/s':>6} {'done':>5} {'tok/s':>8} {'ttft p50':>9} {'ttft p90':>9} "
          f"{'tpot p50':>9} {'tpot p90':>9} {'same':>5}  (ms)")
    for strategy in [s for s in args.strategies.split(",") if s]:
        for rate in sorted(rates):
            results, wall, order = asyncio.run(run_rate(args.url, headers, model, prompts, strategy, rate,
                                                        args.requests, args.max_tokens, args.seed))
            ok = [r for r in results if r.error is None]
            # request i has the same prompt at every rate (the arrival draws do not depend on the rate's value)
            texts = {i: "".join(r.text) for i, r in enumerate(results) if r.error is None}
            base = answers.setdefault(strategy, texts)  # the lowest rate's answers: the reference
            same = sum(texts[i] == base.get(i, texts[i]) for i in texts)
            ttft = [r.first - r.sent for r in ok if r.first is not None]
            tpot = [x for x in (r.per_token() for r in ok) if x is not None]
            row = {"strategy": strategy, "rate": rate, "requests": len(results), "completed": len(ok),
                   "errors": sorted({r.error for r in results if r.error})[:3], "wall_s": round(wall, 3),
                   "tokens_per_s": round(sum(r.tokens for r in ok) / wall, 1),
                   "ttft_p50": pct(ttft, 0.5), "ttft_p90": pct(ttft, 0.9), "ttft_p99": pct(ttft, 0.99),
                   "tpot_p50": pct(tpot, 0.5), "tpot_p90": pct(tpot, 0.9), "tpot_p99": pct(tpot, 0.99),
                   "tpot_mean": statistics.fmean(tpot) if tpot else None, "same_as_lowest_rate": same}
            rows.append(row)
            print(f"{strategy:<17} {rate:>6g} {len(ok):>5} {row['tokens_per_s']:>8.1f} {ms(row['ttft_p50']):>9} "
                  f"{ms(row['ttft_p90']):>9} {ms(row['tpot_p50']):>9} {ms(row['tpot_p90']):>9} "
                  f"{same:>2}/{len(texts):<2}", flush=True)
    report = {"url": args.url, "model": model, "max_tokens": args.max_tokens, "requests": args.requests,
              "prompts": len(prompts), "rows": rows}
    if args.chart:
        chart(rows, args.chart)
    print(json.dumps(report))
    if any(r["completed"] < r["requests"] or r["same_as_lowest_rate"] < r["completed"] for r in rows):
        print("bench_serve: some requests failed or answered differently than at the lowest rate", file=sys.stderr)
    return report


def chart(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        rs = [r for r in rows if r["strategy"] == strategy]
        a.plot([r["rate"] for r in rs], [1000 * (r["tpot_p50"] or 0) for r in rs], marker="o", label=strategy)
        b.plot([r["rate"] for r in rs], [1000 * (r["ttft_p50"] or 0) for r in rs], marker="o", label=strategy)
    a.set(xlabel="requests per second", ylabel="median ms per output token", title="time per output token")
    b.set(xlabel="requests per second", ylabel="median ms to first token", title="time to first token")
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
