"""`recyclegpt eval`: the quality evaluations of evals/quality.py as subcommands (mc, lastword, ppl, agreement)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..api import RecycleGPT
from ..evals import quality
from ..evals.quality import (
    MC_FORMATS,
    SCORINGS,
    _check_file,
    evaluate_agreement,
    evaluate_lastword,
    evaluate_mc,
    evaluate_ppl,
    load_lastword,
    load_mc,
)
from .options import add_command, add_model_args, load_model


def _report(args, lm: RecycleGPT, task: str, result: dict, t0: float, summary: str) -> None:
    """Print the human summary, then (with --json) one JSON line with everything."""
    record = {"task": task, "scoring": args.scoring, "model": lm.name, "module": lm.module_source, **result,
              "seconds": round(time.perf_counter() - t0, 3)}
    print(f"eval {task} [{args.scoring} scoring] {summary}  ({record['seconds']:.1f}s)")
    if lm.module_source == "random" and args.scoring != "standard":
        print("note: --recycle random is an untrained module: its scores are a smoke test only", file=sys.stderr)
    if args.json:
        print(json.dumps(record))


def cmd_eval_mc(args) -> None:
    """Zero-shot multiple choice by log-likelihood (PIQA, ARC, OpenBookQA, BoolQ, SciQ or generic JSONL)."""
    items = load_mc(args.data, args.format, limit=args.limit)
    lm = load_model(args)
    t0 = time.perf_counter()
    res = evaluate_mc(lm, items, scoring=args.scoring, batch_size=args.batch_size)
    _report(args, lm, "mc", {"format": args.format, "data": str(args.data), **res}, t0,
            f"{args.format}: accuracy {res['accuracy']:.4f}, accuracy_norm {res['accuracy_norm']:.4f}, n {res['n']}")


def cmd_eval_lastword(args) -> None:
    """Last-word prediction (LAMBADA style, JSONL {"text"}): accuracy and perplexity of the last word."""
    pairs = load_lastword(args.data, limit=args.limit)
    lm = load_model(args)
    t0 = time.perf_counter()
    res = evaluate_lastword(lm, pairs, scoring=args.scoring, batch_size=args.batch_size)
    _report(args, lm, "lastword", {"data": str(args.data), **res}, t0,
            f"accuracy {res['accuracy']:.4f}, perplexity {res['perplexity']:.3f}, n {res['n']}")


def cmd_eval_ppl(args) -> None:
    """Token-level perplexity of a text file, with strided windows."""
    path = _check_file(args.data, "text")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (a stray byte at offset {e.start}); save the file as UTF-8") from None
    if args.limit is not None:  # the first N characters: a quick look at a big file
        text = text[:args.limit]
    lm = load_model(args)
    t0 = time.perf_counter()
    res = evaluate_ppl(lm, text, scoring=args.scoring, max_length=args.max_length, stride=args.stride,
                       batch_size=args.batch_size)
    _report(args, lm, "ppl", {"data": str(args.data), **res}, t0,
            f"perplexity {res['perplexity']:.3f} over {res['n_tokens']} tokens")


def cmd_eval_agreement(args) -> None:
    """α: how often the module's greedy token equals the full model's, where alternating decoding uses the module."""
    from ..training.data import read_prompts

    texts = read_prompts(args.prompts, limit=args.limit)
    lm = load_model(args)
    chat = lm.tokenizer.chat_template is not None
    prompts = [lm.encode(p, chat=chat) for p in texts]
    t0 = time.perf_counter()
    res = evaluate_agreement(lm, prompts, max_new_tokens=args.max_new_tokens, scoring=args.scoring,
                             batch_size=args.batch_size)
    by = ", ".join(f"{k} {v['alpha']:.3f}" for k, v in res["alpha_by_offset"].items())
    _report(args, lm, "agreement", {"prompts_file": str(args.prompts), "chat": chat, **res}, t0,
            f"alpha {res['alpha']:.4f} over {res['n']} positions of {res['prompts']} prompts (by offset: {by})")


def _add_common(p: argparse.ArgumentParser, *, scoring: str, batch_size: int, limit_help: str) -> None:
    add_model_args(p)
    p.add_argument("--scoring", choices=SCORINGS, default=scoring,
                   help=f"who scores each continuation token (docs/evaluation.md; default {scoring})")
    p.add_argument("--limit", type=int, default=None, help=limit_help)
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"sequences per forward (default {batch_size})")
    p.add_argument("--json", action="store_true", help="end with one JSON line holding every number")


def add_eval_parser(sub) -> argparse.ArgumentParser:
    """Add `eval` and its subcommands (mc, lastword, ppl, agreement) to argparse subparsers `sub`."""
    ev = sub.add_parser("eval", help="quality evaluation: multiple choice, last word, perplexity, module agreement",
                        description=quality.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = ev.add_subparsers(dest="eval_command", required=True)

    def add(name, fn):
        return add_command(tasks, name, fn)

    mc = add("mc", cmd_eval_mc)
    mc.add_argument("--data", required=True, help="the dataset file (JSONL)")
    mc.add_argument("--format", required=True, choices=MC_FORMATS, help="the file's schema (docs/evaluation.md)")
    _add_common(mc, scoring="standard", batch_size=16, limit_help="the first N items")

    lw = add("lastword", cmd_eval_lastword)
    lw.add_argument("--data", required=True, help='JSONL, one {"text": ...} per line')
    _add_common(lw, scoring="standard", batch_size=16, limit_help="the first N texts")

    pp = add("ppl", cmd_eval_ppl)
    pp.add_argument("--data", required=True, help="a UTF-8 text file")
    pp.add_argument("--max-length", type=int, default=None,
                    help="window length in tokens (default: the model's context)")
    pp.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: max-length / 2)")
    _add_common(pp, scoring="standard", batch_size=1, limit_help="the first N characters of the file")

    ag = add("agreement", cmd_eval_agreement)
    ag.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field per line (as `bench` reads)")
    ag.add_argument("--max-new-tokens", type=int, default=128, help="greedy tokens per prompt (default 128)")
    _add_common(ag, scoring="recycle", batch_size=8, limit_help="the first N prompts")
    return ev
