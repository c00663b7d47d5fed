"""Would a confidence gate pay for the draft tree? (A plain step instead of a tree round where the module is unsure.)

Runs the reference tree loop (speculative.tree) and records, per round, the probability of the module's top root
draft and the accepted depth. Then, for thresholds t, predicts the speed-up over the ungated tree if rounds whose
root probability is below t were replaced by a plain step (one token), at the given per-call costs and a host sync
per round (a CUDA graph cannot branch on the device's value without one). τ does not depend on the device beyond
rounding, so the CPU's rounds stand in for the GPU's; the costs are the GPU's.

    python scripts/tree_gate_analysis.py --prompts DIR --per-file 3 --round-ms 1.563 --step-ms 0.977

DIR holds the category files (`alpaca_eval.jsonl`, ... with a "prompt" field), as bench's --prompts takes them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import recyclegpt.speculative as spec
from recyclegpt.api import RecycleGPT
from recyclegpt.speculative import TreeShape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True, help="a folder of category .jsonl files")
    ap.add_argument("--per-file", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--tree", default="5,4,24")
    ap.add_argument("--round-ms", type=float, default=1.563, help="a tree round (H100, compiled, ninth session)")
    ap.add_argument("--step-ms", type=float, default=0.977, help="a plain step (the same)")
    args = ap.parse_args()
    lm = RecycleGPT.from_pretrained("smollm2-135m-instruct")
    model = lm.model
    rows: list[tuple[float, int]] = []
    root: list[float] = []
    draft_top, verify_tree = model.draft_top, spec.verify_tree

    def top(out, k):  # the first call of a round is the root's, on (B, d)
        logp, ids = draft_top(out, k)
        if out.dim() == 2:
            root.append(logp[0, 0].exp().item())
        return logp, ids

    def verify(*a, **kw):
        res = verify_tree(*a, **kw)
        rows.append((root[-1], int(res[0][0])))
        return res

    model.draft_top, spec.verify_tree = top, verify
    for path in sorted(Path(args.prompts).glob("*.jsonl")):
        prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
        for p in prompts[:args.per_file]:
            spec.tree(model, [lm.encode(p, chat=True)], max_new_tokens=args.max_new_tokens,
                      shape=TreeShape(*map(int, args.tree.split(","))))
    tokens = sum(a + 1 for _, a in rows)
    print(f"{len(rows)} rounds, tau {tokens / len(rows):.3f}; accepted nothing in "
          f"{sum(a == 0 for _, a in rows) / len(rows):.1%}")
    base = tokens / (len(rows) * args.round_ms)
    for sync in (0.0, 0.03, 0.06):
        for t in (0.1, 0.2, 0.3, 0.4, 0.5):
            gated = [a for p, a in rows if p < t]
            kept = tokens - sum(gated)  # a gated round emits one token, its plain step's
            ms = (len(rows) - len(gated)) * args.round_ms + len(gated) * args.step_ms + len(rows) * sync
            print(f"sync {sync:.2f} ms, threshold {t:.1f}: {len(gated) / len(rows):5.1%} of rounds gated "
                  f"({sum(a == 0 for a in gated) / max(1, len(gated)):5.1%} of them had accepted nothing): "
                  f"{kept / ms / base:.3f}x the ungated tree")


if __name__ == "__main__":
    main()
