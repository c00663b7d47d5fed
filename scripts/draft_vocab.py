"""Give a module checkpoint a draft vocabulary: the N token ids most frequent in the responses it was trained on.

The module then drafts over those ids only (RecycleConfig.draft_vocab) when it drafts for the lossless strategies,
which makes its LM head N/V as costly; verification keeps the output exact. Its weights are unchanged; lossy
`recycle`, scoring and training still use the whole vocabulary. The generation stop tokens are always included.
Prints the share of the data's tokens the vocabulary covers, and of each --heldout file's.

    python scripts/draft_vocab.py MODULE_DIR OUT_DIR --size 8192 --data 'distill/train/*.jsonl' \
        --heldout distill/heldout/WizardLM_testset.jsonl [--model smollm2-135m-instruct]

--data / --heldout: JSONL files whose "response" fields are counted (the module's training targets).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import shutil
from pathlib import Path

import safetensors.torch
import torch

from recyclegpt.loading import load_base


def responses(pattern: str):
    files = sorted(glob.glob(pattern)) or [pattern]
    for f in files:
        with open(f) as fh:
            for line in fh:
                if line.strip():
                    rec = json.loads(line)
                    if isinstance(rec.get("response"), str):
                        yield rec["response"]


def count(tokenizer, patterns: list[str]) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for pattern in patterns:
        for text in responses(pattern):
            counts.update(tokenizer.encode(text, add_bos=False))
    return counts


def coverage(counts: collections.Counter, ids: set[int]) -> float:
    total = sum(counts.values())
    return sum(c for t, c in counts.items() if t in ids) / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("module", help="module checkpoint directory (recycle.json + module.safetensors)")
    ap.add_argument("out", help="where to write the module with its draft vocabulary")
    ap.add_argument("--size", type=int, required=True, help="draft vocabulary size N")
    ap.add_argument("--data", action="append", required=True, help="JSONL file or glob of training responses")
    ap.add_argument("--heldout", action="append", default=[], help="JSONL file(s) to report coverage on")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the base whose tokenizer to use")
    args = ap.parse_args()
    src, dst = Path(args.module), Path(args.out)
    meta = json.loads((src / "recycle.json").read_text())
    vocab = meta["base"]["config"]["vocab_size"]
    if not 0 < args.size <= vocab:
        raise SystemExit(f"--size must be in 1..{vocab}, got {args.size}")
    _, tokenizer = load_base(args.model, device="meta")
    counts = count(tokenizer, args.data)
    chosen = {t for t in tokenizer.eos_ids}
    for t, _ in counts.most_common():
        if len(chosen) >= args.size:
            break
        chosen.add(t)
    ids = torch.tensor(sorted(chosen), dtype=torch.long)
    print(f"{len(ids)} ids; {sum(counts.values()):,} training tokens, {len(counts):,} distinct; "
          f"coverage {coverage(counts, chosen):.4f}")
    for f in args.heldout:
        print(f"  held out {Path(f).name}: coverage {coverage(count(tokenizer, [f]), chosen):.4f}")
    tensors = safetensors.torch.load_file(str(src / "module.safetensors"))
    tensors["draft_ids"] = ids
    meta["recycle"]["draft_vocab"] = len(ids)
    dst.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(dst / "module.safetensors"))
    (dst / "recycle.json").write_text(json.dumps(meta, indent=2) + "\n")
    for extra in ("MODEL_CARD.md",):
        if (src / extra).exists() and src != dst:
            shutil.copy(src / extra, dst / extra)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
