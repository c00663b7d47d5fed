"""Where the lossless strategies first part from `standard`, and how close the full model's top logits were there.

    python scripts/bf16_divergence.py [--dtype bfloat16] [--max-new-tokens 96] [--strategies speculative,tree]

For each built-in prompt: greedy `standard`, then each lossless strategy (eager loop, --device), the first position
where their tokens differ, and at that position the full model's logits recomputed by one uncached forward over
the prompt and standard's tokens so far: how far below the top logit standard's token and the strategy's token
are, the strategy token's rank and the top logit's size (bf16 spaces values in [16, 32) 0.125 apart). In exact
arithmetic the strategies give standard's tokens; a difference within a few of those spacings is rounding (a
verification call on several tokens runs other kernels than a 1-token call), not a wrong rule. One JSON line per
prompt, then a summary line.
"""

from __future__ import annotations

import argparse
import json

import torch

from recyclegpt import RecycleGPT
from recyclegpt.bench import BUILTIN_PROMPTS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--strategies", default="speculative,tree")
    args = p.parse_args()
    lm = RecycleGPT.from_pretrained(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    strategies = [s for s in args.strategies.split(",") if s]
    same = {s: 0 for s in strategies}
    for prompt in BUILTIN_PROMPTS:
        ids = lm.encode(prompt, chat=True)
        run = dict(max_new_tokens=args.max_new_tokens, ignore_eos=True, engine="eager")
        std = lm.generate([ids], strategy="standard", **run).token_ids[0]
        row: dict = {"prompt": prompt[:40]}
        for s in strategies:
            got = lm.generate([ids], strategy=s, **run).token_ids[0]
            k = next((i for i, (a, b) in enumerate(zip(std, got)) if a != b), None)
            if k is None:
                row[s] = "same"
                same[s] += 1
                continue
            with torch.no_grad():
                logits = lm.base(torch.tensor([ids + std[:k]], device=lm.device)).logits[0, -1].float()
            top = logits.max()
            row[s] = {"first_diff": k, "top_minus_standard": round((top - logits[std[k]]).item(), 4),
                      "top_minus_strategy": round((top - logits[got[k]]).item(), 4),
                      "strategy_rank": int((logits > logits[got[k]]).sum()), "top_logit": round(top.item(), 2)}
        print(json.dumps(row), flush=True)
    print(json.dumps({"dtype": args.dtype, "device": args.device, "prompts": len(BUILTIN_PROMPTS),
                      "max_new_tokens": args.max_new_tokens, "same_as_standard": same}))


if __name__ == "__main__":
    main()
