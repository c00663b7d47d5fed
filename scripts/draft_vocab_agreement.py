"""α over the draft vocabulary: would recycle's own token cost less quality if the module picked it from its draft
vocabulary (a head a third as wide) rather than from the whole vocabulary?

The full model decodes each prompt greedily (chat template, to EOS or --max-new-tokens). One teacher-forced pass
over prompt + continuation then gives the module's prediction at recycle's module offsets (1, 3, 5, ...), as
`recyclegpt eval agreement` does; at each, the module's best token over the whole vocabulary and over its draft
vocabulary are both compared with the full model's. Prints one JSON line: α both ways, and how often the module's
best token lies outside the draft vocabulary (and is right there).

    python scripts/draft_vocab_agreement.py --prompts alpaca_eval.jsonl --prompts WizardLM_testset.jsonl \
        --limit 25 --max-new-tokens 128 [--model smollm2-135m-instruct] [--recycle default]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from recyclegpt import RecycleGPT
from recyclegpt.data import read_prompts
from recyclegpt.decoding import standard
from recyclegpt.evaluation import module_offsets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", action="append", required=True, help="a prompt JSONL file (repeatable)")
    ap.add_argument("--limit", type=int, default=25, help="prompts taken from each file")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--recycle", default="default", help="the module: default (the shipped one) or a path")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    lm = RecycleGPT.from_pretrained(args.model, recycle=args.recycle, device="cpu", dtype=torch.float32)
    model = lm.model
    ids = getattr(model.module, "draft_ids", None)
    if ids is None:
        raise SystemExit("this module has no draft vocabulary (scripts/draft_vocab.py gives it one)")
    in_draft = torch.zeros(model.base.cfg.vocab_size, dtype=torch.bool)
    in_draft[ids] = True
    prompts = [lm.encode(t, chat=True) for f in args.prompts for t in read_prompts(f, limit=args.limit)]
    t0 = time.perf_counter()
    eos = set(lm.tokenizer.eos_ids)
    counts = {"positions": 0, "full": 0, "draft": 0, "outside": 0, "outside_right": 0}
    with torch.no_grad():
        for s in range(0, len(prompts), args.batch_size):
            batch = prompts[s:s + args.batch_size]
            for p, c in zip(batch, standard(model.base, batch, max_new_tokens=args.max_new_tokens,
                                            stop_ids=lm.tokenizer.eos_ids).tokens):
                c = c[:next((i for i, t in enumerate(c) if t in eos), len(c))]
                if len(c) < 2:
                    continue
                seq = torch.tensor([p + c])
                full = model.base(seq, num_logits=1, taps=model.taps)
                nxt = torch.cat((seq[:, 1:], torch.zeros_like(seq[:, :1])), 1)
                rec = model.recycle(model.state(full), nxt, num_logits=1).hidden[0]  # at t: predicts s_{t+2}
                pos = torch.arange(len(p), len(p) + len(c))[module_offsets("recycle", len(c))]
                logits = model.base.head(rec[pos - 2]).float()
                target = seq[0, pos]
                best = logits.argmax(-1)
                best_draft = logits.masked_fill(~in_draft, float("-inf")).argmax(-1)
                counts["positions"] += len(pos)
                counts["full"] += (best == target).sum().item()
                counts["draft"] += (best_draft == target).sum().item()
                counts["outside"] += (~in_draft[best]).sum().item()
                counts["outside_right"] += ((~in_draft[best]) & (best == target)).sum().item()
    n = max(counts["positions"], 1)
    print(json.dumps({"prompts": len(prompts), "positions": counts["positions"], "draft_vocab": int(ids.numel()),
                      "alpha_full_vocab": counts["full"] / n, "alpha_draft_vocab": counts["draft"] / n,
                      "best_outside_draft_vocab": counts["outside"] / n,
                      "best_outside_and_right": counts["outside_right"] / n,
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
