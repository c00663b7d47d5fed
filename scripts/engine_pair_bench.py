"""Two decode engines (and llama.cpp) on the same prompts in one process, interleaved prompt by prompt, so that a
CPU whose speed drifts times them alike: tok/s, step ms, and whether each row's tokens equal the first engine's
and eager `standard`'s. Prints a table.

    python scripts/engine_pair_bench.py [--quantize int8] [--engines eager,compiled] [--compile-steps]
                                        [--strategies standard,recycle,speculative] [--llama-cpp]
                                        [--limit 8] [--max-new-tokens 64] [--threads 2]

The prompts are the bench's built-in ones (chat template), greedy, run to --max-new-tokens. Warm-up: every prompt
on the engines that compile or capture, the first prompt on the others. The eager loop's `speculative` keeps its
adaptive draft length (the CPU default of --min-draft-prob), which the engines do not have. With --quantize int8
the engines are eager and static (the compiled engine refuses int8 weights).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from recyclegpt.api import EngineOptions, RecycleGPT
from recyclegpt.evals.speed import BUILTIN_PROMPTS, StrategyRun


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--quantize", default=None, choices=["int8"])
    ap.add_argument("--engines", default="eager,compiled")
    ap.add_argument("--compile-steps", action="store_true")
    ap.add_argument("--strategies", default="standard,recycle,speculative")
    ap.add_argument("--llama-cpp", action="store_true", help="a llama.cpp row on the model's GGUF file")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.max_new_tokens
    lm = RecycleGPT.from_pretrained(args.model, device="cpu", quantize=args.quantize,
                                    engine_options=EngineOptions(compile_steps=args.compile_steps))
    ids = [lm.encode(p, chat=True) for p in BUILTIN_PROMPTS[:args.limit]]
    engines, names = args.engines.split(","), args.strategies.split(",")
    rows = [(s, e) for s in names for e in engines]
    llama = None
    if args.llama_cpp:
        from recyclegpt.evals.llama_cpp_baseline import LlamaCppBaseline, gguf_of

        llama = LlamaCppBaseline(gguf_of(lm.name), n_threads=args.threads, n_ctx=max(map(len, ids)) + n)

    def run(strategy: str, engine: str, prompt: list[int]):
        return lm.generate([prompt], strategy=strategy, max_new_tokens=n, ignore_eos=True, engine=engine)

    for s, e in rows:
        for p in ids if e in ("static", "graphs", "compiled") else ids[:1]:
            run(s, e, p)
    if llama is not None:
        llama.generate(ids[0], n)
    runs = {r: StrategyRun(f"{r[0]}/{r[1]}") for r in rows}
    ll = StrategyRun("llama_cpp")
    for p in ids:
        for r in rows:
            runs[r].add(run(*r, p))
        if llama is not None:
            g = llama.generate(p, n)
            ll.record(len(g.tokens), g.seconds, g.ttft_s, 1000 * statistics.median(g.step_s), None)
    if llama is not None:
        llama.close()
    std = runs[("standard", engines[0])].outputs if "standard" in names else None
    ref = ll.summary()["tokens_per_s"] if llama is not None else None
    print(f"{'row':<26}{'tok/s':>7}{'median':>8}{'step ms':>9}{'vs llama':>9}  tokens")
    for r in rows:
        m, out = runs[r].summary(), runs[r].outputs
        same = sum(a == b for a, b in zip(out, runs[(r[0], engines[0])].outputs))
        note = f"= {engines[0]} {r[0]}: {same}/{len(ids)}"
        if std is not None:
            note += f", = {engines[0]} standard: {sum(a == b for a, b in zip(out, std))}/{len(ids)}"
        vs = f"{m['tokens_per_s'] / ref:8.2f}x" if ref else f"{'-':>9}"
        print(f"{r[0] + '/' + r[1]:<26}{m['tokens_per_s']:7.1f}{m['median_tokens_per_s']:8.1f}{m['step_ms']:9.2f}"
              f"{vs}  {note}")
    if llama is not None:
        m = ll.summary()
        print(f"{'llama_cpp':<26}{m['tokens_per_s']:7.1f}{m['median_tokens_per_s']:8.1f}{m['step_ms']:9.2f}"
              f"{1:8.2f}x")


if __name__ == "__main__":
    main()
