"""New chat instructions written by the base model itself, Self-Instruct style, for more varied distillation data.

The permissively licensed prompt sets hold only ~2k distinct general chat prompts (the rest is GSM8K), which limits
how well the module learns the model's answers to the open-ended prompts users send. SmolLM2-135M-Instruct, shown
a numbered list of six self-instruct seed tasks (Apache-2.0) as plain text, continues it with a new task; many such
continuations, sampled, give as many new instructions as one wants. Two steps around `recyclegpt distill`:

    python scripts/self_instruct_prompts.py meta ../shared/data/prompts/self_instruct/seed_tasks.jsonl \
        --n 20000 --out meta.jsonl
    recyclegpt distill --prompts meta.jsonl --out made.jsonl --no-chat --temperature 0.9 --top-p 0.95 \
        --max-new-tokens 48 --batch-size 256
    python scripts/self_instruct_prompts.py extract made.jsonl --seeds ../shared/data/prompts/self_instruct/seed_tasks.jsonl \
        --out new_instructions.jsonl      # then `recyclegpt distill --prompts new_instructions.jsonl ...` as usual

`extract` keeps the first line of each continuation, stripped, 15-300 characters, not a seed task, each once.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HEADER = "A list of diverse tasks for an AI assistant:\n"
SHOTS = 6


def seed_instructions(path: Path) -> list[str]:
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(" ".join(json.loads(line)["instruction"].split()))
    return out


def meta_prompts(seeds: list[str], n: int, seed: int) -> list[str]:
    """n plain-text prompts: the header, SHOTS numbered seed tasks, and the next number for the model to fill."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        shots = rng.sample(seeds, SHOTS)
        prompts.append(HEADER + "\n".join(f"{k + 1}. {s}" for k, s in enumerate(shots)) + f"\n{SHOTS + 1}.")
    return prompts


def extract(responses: list[str], seeds: list[str]) -> list[str]:
    """The usable new instructions among the continuations, in order, each once."""
    known = {s.lower() for s in seeds}
    out, seen = [], set()
    for text in responses:
        first = " ".join(text.strip().split("\n")[0].split())
        first = re.sub(r"^\d+\.\s*", "", first)  # a continuation that restarts the numbering
        key = first.lower()
        if 15 <= len(first) <= 300 and key not in known and key not in seen:
            seen.add(key)
            out.append(first)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("meta", help="write the few-shot prompts for `recyclegpt distill --no-chat`")
    m.add_argument("seeds", type=Path, help="self_instruct/seed_tasks.jsonl")
    m.add_argument("--n", type=int, default=20000)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", type=Path, required=True)
    e = sub.add_parser("extract", help="turn the distill output into a prompt file of new instructions")
    e.add_argument("made", type=Path, help="the JSONL `recyclegpt distill --no-chat` wrote")
    e.add_argument("--seeds", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    seeds = seed_instructions(args.seeds)
    if args.cmd == "meta":
        prompts = meta_prompts(seeds, args.n, args.seed)
    else:
        with args.made.open(encoding="utf-8") as f:
            made = [json.loads(line)["response"] for line in f if line.strip()]
        prompts = extract(made, seeds)
    with args.out.open("w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}, ensure_ascii=False) + "\n")
    print(f"{len(prompts)} prompts -> {args.out}")


if __name__ == "__main__":
    main()
