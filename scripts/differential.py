"""The differential harness's long run (recyclegpt.evals.differential): every engine against the eager reference on a
randomised sequence of requests in one process, on a real model. Prints a table and a final JSON line.

    python scripts/differential.py --device cuda --dtype float32 --engines graphs,compiled --requests 70 --seed 1
    python scripts/differential.py --device cuda --dtype bfloat16 --engines graphs --check near-ties \
        --recycle smollm2-135m-instruct-l1 --recycle-vocab draft

Prompts are slices of a token stream: `--corpus FILE` (plain text, tokenized with the model's tokenizer), else
random token ids. Lengths run from 1 token to near the context (`--max-prompt`), with every prefill and KV bucket
boundary among them; see differential.make_requests for the rest.

On several GPUs, torchrun runs one sequence per GPU (process r: seed `--seed` + r, `--requests` requests) and the
first process reports them together:

    torchrun --nproc-per-node 8 scripts/differential.py --dtype float32 --engines static --requests 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
from tqdm import tqdm

from recyclegpt.api import RecycleGPT
from recyclegpt.decoding.batching import DRAFT_ROWS, PREFILL_CHUNK
from recyclegpt.decoding.engine import KV_BUCKET, PREFILL_BUCKET
from recyclegpt.decoding.strategies import names as strategy_names
from recyclegpt.evals import differential as dt
from recyclegpt.loading.registry import DEFAULT_MODEL

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--recycle", default="default", help="the module (default, a shipped name, or a path)")
    ap.add_argument("--recycle-vocab", choices=("full", "draft"), default="full")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    ap.add_argument("--engines", default=None,
                    help=f"comma-separated: {', '.join(dt.ENGINE_KINDS)} (default: graphs on CUDA, static on the CPU; "
                         f"static's eager steps make a GPU run about three times slower)")
    ap.add_argument("--strategies", default=",".join(strategy_names()))
    ap.add_argument("--check", choices=("exact", "near-ties"), default=None,
                    help="exact (default for float32) or near-ties (default for bfloat16)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--max-prompt", type=int, default=None, help="longest prompt (default: near the context)")
    ap.add_argument("--kv-bucket", type=int, default=KV_BUCKET)
    ap.add_argument("--corpus", default=None, help="a text file whose tokens the prompts are cut from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=None,
                    help="start no request after this many seconds (the report covers the requests run)")
    ap.add_argument("--json-out", default=None, help="also write the report here")
    ap.add_argument("--continuous", type=int, default=0, metavar="ROWS",
                    help="instead, send the sequence's greedy prompts into a continuous batch of at most ROWS rows, "
                         "arriving 0-3 checks apart, each compared with its reference alone")
    ap.add_argument("--draft-rows", type=int, default=DRAFT_ROWS, metavar="N",
                    help=f"with --continuous: the verified strategies draft while at most N rows are live "
                         f"(default {DRAFT_ROWS}, as the server)")
    ap.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, metavar="N",
                    help=f"with --continuous: prompts longer than N tokens that join while rows decode are prefilled "
                         f"N at a time, one chunk a check (default {PREFILL_CHUNK}, as the server; 0: whole)")
    args = ap.parse_args(argv)

    strategies = [s for s in args.strategies.split(",") if s]
    engines = args.engines or ("graphs" if args.device.startswith("cuda") else "static")
    kinds = [k for k in engines.split(",") if k]
    for k in kinds:
        if k not in dt.ENGINE_KINDS:
            ap.error(f"unknown engine {k!r}; choose from {', '.join(dt.ENGINE_KINDS)}")
    for s in strategies:
        if s not in strategy_names():
            ap.error(f"unknown strategy {s!r}; choose from {', '.join(strategy_names())}")
    if args.requests < 1 or args.max_new_tokens < 1:
        ap.error("--requests and --max-new-tokens must be at least 1")
    check = dt.Check(args.check or ("exact" if args.dtype == "float32" else "near-ties"))

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's
    device, seed = args.device, args.seed + rank
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")  # only the tallies travel between the processes, once, on the host
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
    lm = RecycleGPT.from_pretrained(args.model, recycle=args.recycle, device=device, dtype=DTYPES[args.dtype])
    if lm.model is None:
        ap.error("the harness needs a recyclable module (--recycle)")
    model = lm.model
    model.recycle_vocab = args.recycle_vocab
    corpus = None
    if args.corpus:
        with open(args.corpus, encoding="utf-8") as f:
            corpus = lm.tokenizer.encode(f.read())
    opts = dt.Options()
    reqs = dt.make_requests(seed, args.requests, vocab_size=model.base.cfg.vocab_size,
                            context_length=model.base.cfg.context_length, max_new_tokens=args.max_new_tokens,
                            span=opts.span(strategies), max_batch=args.max_batch,
                            buckets=(PREFILL_BUCKET, args.kv_bucket), corpus=corpus, max_prompt=args.max_prompt)
    engines = {k: dt.make_engine(model, k, kv_bucket=args.kv_bucket) for k in kinds}
    t0 = time.perf_counter()
    deadline = None if args.deadline is None else time.monotonic() + args.deadline
    if args.continuous > 0:
        tallies = dt.run_arrivals(model, engines, reqs, rows=args.continuous, strategies=strategies, opts=opts,
                                  check=check, seed=seed, deadline=deadline,
                                  draft_rows=args.draft_rows, prefill_chunk=args.prefill_chunk or None)
    else:
        tallies = dt.run_sequence(model, engines, reqs, strategies=strategies, opts=opts, check=check,
                                  progress=lambda items: tqdm(items, desc="requests", file=sys.stderr,
                                                              mininterval=10),
                                  deadline=deadline)
    seconds = time.perf_counter() - t0
    run = min(len(reqs), max(t.requests for t in tallies.values())) if not args.continuous else len(reqs)
    lengths = sorted(len(p) for r in reqs[:run] for p in r.prompts)
    seeds = [seed]
    if world > 1:  # the first process reports every process's sequence
        shards = [None] * world if rank == 0 else None
        dist.gather_object((tallies, lengths, seconds, seed), shards, dst=0)
        dist.destroy_process_group()
        if rank:
            return 0
        tallies, lengths, seeds = {}, [], []
        for r, (part, part_lengths, part_seconds, part_seed) in enumerate(shards):
            for key, t in part.items():
                for m in t.mismatches:
                    m.description = f"process {r} (seed {part_seed}): {m.description}"
                tallies[key] = tallies.get(key, dt.Tally()) + t
            lengths += part_lengths
            seeds.append(part_seed)
            seconds = max(seconds, part_seconds)
        lengths.sort()
    rows = dt.summary_rows(tallies)
    print(f"{args.model} + {lm.module_source} ({args.recycle_vocab} vocabulary), {args.dtype} on "
          f"{torch.cuda.get_device_name() if device.startswith('cuda') else platform.processor() or 'CPU'}"
          f"{f' x {world} processes' if world > 1 else ''}, "
          f"{max(r['requests'] for r in rows)} of {len(reqs) * world} requests run, check {check.mode}, "
          f"{seconds:.0f} s "
          f"({sum(r['seconds'] for r in rows):.0f} s in the engines{' of all processes' if world > 1 else ''}, the "
          f"rest in the reference loops and checks)")
    print(dt.format_table(rows))
    report = {"model": args.model, "module": lm.module_source, "recycle_vocab": args.recycle_vocab,
              "continuous_rows": args.continuous or None, "draft_rows": args.draft_rows,
              "prefill_chunk": (args.prefill_chunk or None) if args.continuous else None,
              "dtype": args.dtype, "device": args.device, "torch": torch.__version__, "check": check.mode,
              "requests": len(reqs) * world, "requests_run": max(r["requests"] for r in rows),
              "max_new_tokens": args.max_new_tokens, "seed": args.seed, "processes": world, "seeds": seeds,
              "prompt_lengths": lengths,
              "seconds": round(seconds, 1), "rows": rows,
              "mismatches": {f"{k[0]}/{k[1]}": t.to_dict()["mismatches"] for k, t in tallies.items() if t.mismatches}}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "prompt_lengths"}))
    exact = check.mode == "exact"
    return 1 if exact and any(r["identical"] != r["requests"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
