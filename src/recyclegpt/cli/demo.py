"""`recyclegpt demo`: evals/demo.py's side-by-side run on the built-in chat prompts, as a subcommand."""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from ..api import RANDOM_MODULE_NOTE
from ..decoding.strategies import names as strategy_names
from ..evals.demo import (
    DEFAULT_PROMPTS,
    STRATEGIES,
    check_module_given,
    format_demo,
    run_demo,
)
from ..evals.speed import BUILTIN_PROMPTS
from .options import add_model_args, load_model


def cmd_demo(args: argparse.Namespace) -> None:
    """Answer a few built-in chat prompts with standard, recycle and speculative: texts, tokens/s, speed-ups, τ, α.

    Loads --model (default: the built-in SmolLM2, fetched on first use) with the module shipped for it, or the one
    --recycle names; runs greedily on the best available device. --json ends with one JSON line holding every
    number and the whole texts.
    """
    if args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    check_module_given(args.model, args.recycle)
    if args.recycle == "random":
        print(f"note: {RANDOM_MODULE_NOTE}", file=sys.stderr)
    strategies = tuple(x for x in args.strategies.split(",") if x)
    lm = load_model(args)
    # one step per warm-up strategy, per prompt and for α: a bar with elapsed and remaining time on a terminal,
    # one line per step elsewhere (logs, pipes)
    bar = tqdm(total=len(strategies) + args.limit + 1, desc="demo", unit="step", file=sys.stderr,
               disable=not sys.stderr.isatty(), dynamic_ncols=True)

    started = []

    def log(line: str) -> None:  # a step starts: the one before it has ended
        if bar.disable:
            print(f"demo: {line}", file=sys.stderr, flush=True)
            return
        if started:
            bar.update(1)
        started.append(line)
        bar.set_postfix_str(line)

    try:
        record = run_demo(lm, BUILTIN_PROMPTS[:args.limit], max_new_tokens=args.max_new_tokens,
                          strategies=strategies, log=log)
        bar.update(bar.total - bar.n)
    finally:
        bar.close()
    print(format_demo(record))
    if args.json:
        print(json.dumps(record, ensure_ascii=False))


def add_demo_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128, help="greedy tokens per answer, at most (default 128)")
    p.add_argument("--limit", type=int, default=DEFAULT_PROMPTS,
                   help=f"how many of the {len(BUILTIN_PROMPTS)} built-in prompts (default {DEFAULT_PROMPTS})")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"comma-separated, standard first, from {', '.join(strategy_names())} "
                        f"(default {','.join(STRATEGIES)})")
    p.add_argument("--json", action="store_true", help="end with one JSON line holding every number and text")
