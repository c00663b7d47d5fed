"""Each decode engine on the same prompts: its first-call cost (graph capture, compile), its steady speed, and
whether its greedy tokens equal the eager reference loop's. Prints a table and a final JSON line.

    python scripts/engine_probe.py [--model NAME] [--prompts N] [--max-new-tokens N] [--engines eager,static,graphs,compiled]

On a GPU the engines run bf16: "static" runs the same fixed-shape steps as "graphs" without capture, so graphs ==
static is exact; eager vs static may differ where bf16 rounding of attention over a longer (masked) cache flips
a near-tie. `--choose FILE` writes the fastest engine that ran into FILE (for scripts).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from recyclegpt.api import RecycleGPT
from recyclegpt.evals.speed import BUILTIN_PROMPTS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--engines", default="eager,static,graphs,compiled")
    ap.add_argument("--choose", default=None)
    args = ap.parse_args()
    lm = RecycleGPT.from_pretrained(args.model)
    ids = [lm.encode(p, chat=True) for p in BUILTIN_PROMPTS[: args.prompts]]
    rows, ref = [], {}
    for engine in args.engines.split(","):
        for strategy in ("standard", "recycle"):
            t0 = time.perf_counter()
            try:
                lm.generate(ids[0], strategy=strategy, max_new_tokens=args.max_new_tokens, ignore_eos=True,
                            engine=engine)
            except Exception as e:  # noqa: BLE001 - a probe reports what failed and goes on
                rows.append({"engine": engine, "strategy": strategy, "error": f"{type(e).__name__}: {e}"[:300]})
                print(rows[-1], flush=True)
                continue
            first = time.perf_counter() - t0
            toks, secs, steps = [], 0.0, []
            for p in ids:
                g = lm.generate(p, strategy=strategy, max_new_tokens=args.max_new_tokens, ignore_eos=True,
                                engine=engine)
                toks.append(g.token_ids[0])
                secs += g.stats.seconds
                steps.append(g.stats.step_ms)
            ref.setdefault((strategy, "eager" if "eager" in args.engines else engine), toks)
            base = ref.get((strategy, "eager")) or ref.get((strategy, engine))
            same = sum(a == b for a, b in zip(toks, base))
            rows.append({"engine": engine, "strategy": strategy, "first_call_s": first,
                         "tokens_per_s": sum(map(len, toks)) / secs, "step_ms": sorted(steps)[len(steps) // 2],
                         "prompts_equal_to_eager": f"{same}/{len(ids)}"})
            print(json.dumps(rows[-1]), flush=True)
    ok = [r for r in rows if "error" not in r and r["strategy"] == "standard" and r["engine"] in ("graphs", "compiled")]
    if args.choose and ok:
        with open(args.choose, "w") as f:
            f.write(max(ok, key=lambda r: r["tokens_per_s"])["engine"])
    print(json.dumps({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                      "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
