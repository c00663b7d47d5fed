"""Chat prompts built from Gutenberg passages, for self-distillation data (`recyclegpt distill --prompts`).

The module must learn the base model's *chat* register (plain book text transfers poorly: dev/LOG.md), yet the
permissively licensed prompt sets hold only ~9.5k prompts, most of them GSM8K. Public-domain passages wrapped in a
handful of everyday instructions (continue, summarise, explain, rewrite, ask) give tens of thousands of varied chat
prompts whose answers the base model writes itself. Deterministic for a given --seed.

    python scripts/book_prompts.py ../shared/data/corpora/gutenberg --n 20000 --out prompts/books.jsonl
    python scripts/book_prompts.py ../shared/data/corpora/gutenberg --n 40000 --seed 1 --exclude prompts/books.jsonl \
        --out prompts/books2.jsonl      # a later round: passages no earlier prompt file used
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

TEMPLATES = (
    "Continue this passage in the same style:\n\n{p}",
    "Summarize the following passage in a few sentences:\n\n{p}",
    "What happens in this passage? Explain it simply.\n\n{p}",
    "Rewrite this passage in plain modern English:\n\n{p}",
    "{p}\n\nWhat could happen next? Write the next part of the story.",
    "Read this excerpt and describe the main character's feelings:\n\n{p}",
    "Write three questions a teacher could ask about this text, with answers:\n\n{p}",
    "Explain the meaning of this paragraph to a student:\n\n{p}",
)


def passages(text: str, *, min_chars: int, max_chars: int) -> list[str]:
    """Runs of whole paragraphs between min_chars and max_chars long (whitespace inside a paragraph squeezed)."""
    paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    paras = [p for p in paras if len(p) > 40]
    out, cur = [], ""
    for p in paras:
        cur = f"{cur}\n\n{p}" if cur else p
        if len(cur) >= min_chars:
            if len(cur) <= max_chars:
                out.append(cur)
            cur = ""
    return out


def _unused(pool: list[str], used: set[str]) -> list[str]:
    """The passages of pool that no prompt in `used` contains; each prompt is one template around one passage."""
    inner = set()
    for prompt in used:
        for t in TEMPLATES:
            head, tail = t.split("{p}")
            if prompt.startswith(head) and prompt.endswith(tail):
                inner.add(prompt[len(head): len(prompt) - len(tail)])
    return [p for p in pool if p not in inner]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gutenberg", type=Path, help="the folder holding manifest.json and books/")
    ap.add_argument("--n", type=int, default=20000, help="number of prompts")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-chars", type=int, default=400)
    ap.add_argument("--max-chars", type=int, default=1500)
    ap.add_argument("--exclude", type=Path, nargs="*", default=[],
                    help="prompt JSONL files (earlier rounds) whose passages are not to be used again")
    args = ap.parse_args()

    manifest = json.loads((args.gutenberg / "manifest.json").read_text(encoding="utf-8"))
    pool = []
    for book in sorted(manifest, key=lambda b: b["pg_id"]):
        text = (args.gutenberg / book["file"]).read_text(encoding="utf-8")
        pool += passages(text, min_chars=args.min_chars, max_chars=args.max_chars)
    used = set()
    for path in args.exclude:
        with path.open(encoding="utf-8") as f:
            used.update(json.loads(line)["prompt"] for line in f if line.strip())
    if used:
        pool = _unused(pool, used)
    rng = random.Random(args.seed)
    picks = rng.sample(pool, min(args.n, len(pool)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for p in picks:
            f.write(json.dumps({"prompt": rng.choice(TEMPLATES).format(p=p)}, ensure_ascii=False) + "\n")
    print(f"{len(picks)} prompts from {len(pool)} passages of {len(manifest)} books -> {args.out}")


if __name__ == "__main__":
    main()
