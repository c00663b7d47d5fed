"""Where a GPU decode step's time goes: each part of a step, replayed as a CUDA graph and timed, then its kernels
counted and their GPU time summed by kind with torch.profiler.

    python scripts/gpu_step_profile.py --shape 1.3b --recycle-layers 6 [--compile [MODE]] [--reps 200]
    python scripts/gpu_step_profile.py --model smollm2-135m-instruct --compile

Parts: the full model on 1 token (standard's step) and on 2 (recycle's full call), the module on 2 slots (recycle's
module call), whole steps (standard, recycle) and verified rounds (chain, tree; each followed by two tiny copies
that put the slot counters back, so that it can repeat), and a draft-vocabulary head where the module has one. Per
part: the graph's replay time, its kernels, their summed GPU time (the rest of a replay is launch gaps and tails),
and that time by kind (matmul, attention, fused element-wise, copies and indexing, other). The memory floor is the
part's weight bytes over `--bandwidth`. On the CPU (a check of this script, no graphs) the kernel column counts
top-level aten operators instead, each of which is a kernel launch on a GPU without compile. A table, then one JSON
line. --compile takes an inductor mode ("default", "max-autotune-no-cudagraphs"); the compiled functions run inside
the same graphs as the engine's (engine.Decoder). It profiles the paths the engine runs by default; the prompt's
forwards stay eager (they are not among the parts).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from recyclegpt.api import RecycleGPT
from recyclegpt.config import PRESETS, RecycleConfig
from recyclegpt.decoding.engine import Decoder
from recyclegpt.decoding.loops import PromptBatch
from recyclegpt.decoding.sampling import SamplingParams
from recyclegpt.decoding.speculative import TreeShape
from recyclegpt.evals.speed import random_model
from recyclegpt.kernels import attention as triton_attention
from recyclegpt.models import RecycleModel

# (an inductor kernel whose name mentions the attention op it feeds counts as attention too, as in earlier runs)
KINDS = (("attention", ("fmha", "flash", "attention", "cudnn", "sdpa", "_attn_kernel", "_merge_kernel")),
         ("matmul", ("gemm", "gemv", "cutlass", "nvjet", "sm90_", "cublas", "splitk", "mm_", "_head_top_kernel")),
         ("fused", ("triton",)),
         ("copy/index", ("copy", "index", "scatter", "gather", "cat", "fill")))


VIEWS = {"view", "reshape", "t", "transpose", "slice", "select", "expand", "expand_as", "unsqueeze", "squeeze",
         "split", "split_with_sizes", "chunk", "permute", "as_strided", "narrow", "_unsafe_view", "detach", "alias",
         "unbind", "view_as", "lift_fresh", "contiguous"}  # no kernel of their own (contiguous: only when a copy)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def kernels(fn, reps: int, n_top: int = 8) -> tuple[int, float, dict[str, float], list[tuple[str, float]], dict[str, float]]:
    """Run fn `reps` times eagerly under the profiler: kernels per call, their GPU ms per call, ms by kind, top names
    and the count per call of each name."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():  # the CPU: count top-level aten operators (each a launch on a GPU)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(reps):
                fn()
        ops: dict[str, int] = defaultdict(int)
        for e in prof.events():
            if e.cpu_parent is None and e.name.startswith("aten::") and e.name[6:] not in VIEWS:
                ops[e.name] += 1
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:n_top]
        return (sum(ops.values()) // reps, 0.0, {}, [(n, c / reps) for n, c in top],
                {n: c / reps for n, c in ops.items()})
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    count, total = 0, 0.0
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    count_of: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.time_range.elapsed_us()
        count += 1
        total += us
        by_kind[kind_of(e.name)] += us
        by_name[e.name[:90]] += us
        count_of[e.name[:90]] += 1
    per = 1000.0 * reps
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:n_top]
    return (count // reps, total / per, {k: v / per for k, v in sorted(by_kind.items())},
            [(n, v / per) for n, v in top], {n: c / reps for n, c in count_of.items()})


def replay_ms(graph, reps: int, reset) -> float:
    """ms per call of graph.replay (CUDA events), or of a plain function on the CPU (a smoke test of this script)."""
    if not isinstance(graph, torch.cuda.CUDAGraph):
        import time
        graph()
        t = time.perf_counter()
        for _ in range(reps):
            graph()
        reset()
        return 1000 * (time.perf_counter() - t) / reps
    for _ in range(10):
        graph.replay()
    reset()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    reset()
    return start.elapsed_time(end) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--shape", default=None, help="1.3b or 7b: random weights of that shape instead of --model")
    ap.add_argument("--preset", default=None, help="random weights of a recyclegpt.config preset (a quick check)")
    ap.add_argument("--recycle-layers", type=int, default=6, help="module layers with --shape or --preset")
    ap.add_argument("--draft-vocab", type=int, default=0,
                    help="with --preset: the module's draft vocabulary (the shipped SmolLM2 module: 2 layers, 16384)")
    ap.add_argument("--compile", nargs="?", const="default", default=None, help="torch.compile, with this mode")
    ap.add_argument("--compile-steps", action="store_true", help="with --compile: steps and rounds compiled whole")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--kv-bucket", type=int, default=None,
                    help="attention buckets of this many slots (the engine's default unless given; the "
                         "benchmarks' rows use 512: the steps then attend over 512 slots, as there)")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--parts", default="all",
                    help="comma-separated: full1, full2, module, standard, recycle, chain, tree, draft_head (default all)")
    ap.add_argument("--draft-len", type=int, default=3)
    ap.add_argument("--tree", default="5,4,24", help="depth,topk,nodes[,lookup] of the profiled tree round")
    ap.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes/s for the memory floor (H100 SXM)")
    ap.add_argument("--recycle-vocab", default="full", choices=("full", "draft"),
                    help="the recycle step's module token over the full head or the draft vocabulary (an A/B check)")
    ap.add_argument("--top", type=int, default=8, help="kernel names listed per part, by GPU time")
    ap.add_argument("--sdpa", default=None,
                    help="attention backends allowed, comma-separated from cudnn, flash, efficient, math "
                         "(default: all, PyTorch's choice)")
    args = ap.parse_args()
    if args.sdpa:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        names = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
        with sdpa_kernel([names[n] for n in args.sdpa.split(",")]):  # also while inductor traces
            return run_profile(args)
    return run_profile(args)


def run_profile(args) -> None:
    cuda = torch.cuda.is_available()
    dev, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    if args.preset:
        torch.manual_seed(0)
        rcfg = RecycleConfig(n_layer=args.recycle_layers, draft_vocab=args.draft_vocab)
        model = RecycleModel.build(PRESETS[args.preset], rcfg)
        model = model.to(device=dev, dtype=dtype).eval()
    elif args.shape:
        model = random_model(args.shape, module_layers=args.recycle_layers, device=dev, dtype=dtype).model
    else:
        model = RecycleGPT.from_pretrained(args.model, device=dev, dtype=dtype).model
    model.recycle_vocab = args.recycle_vocab
    mode = None if args.compile in (None, "default") else args.compile
    compile_arg: bool | str = False if args.compile is None else (mode or True)
    L = args.prompt_len
    bucket = {} if args.kv_bucket is None else {"bucket": args.kv_bucket}
    # the prompt's forwards stay eager: the parts profiled are steps, and the prompt's dynamic-shape compile takes
    # minutes on a cold inductor cache
    dec = Decoder(model, 1, L + 512, graphs=cuda, compile=compile_arg, compile_steps=args.compile_steps,
                  compile_prefill=False, **bucket)
    gen = None
    sampling = SamplingParams()
    ids = torch.randint(0, model.base.cfg.vocab_size, (L,), generator=torch.Generator().manual_seed(0)).tolist()
    batch = PromptBatch.build([ids], vocab_size=model.base.cfg.vocab_size, device=dev)
    kv_end = dec._kv_end(L + 2)

    def reset() -> None:  # the parts write tokens at n: keep it in range
        dec.n.zero_()

    with torch.inference_mode():
        dec.prepare()  # as Decoder.decode does: the draft head's rows, recycle's vocabulary
        hidden = dec.prefill(batch, sampling, gen)
        dec.prefill_module("recycle", batch, hidden, sampling, gen)
        dec.x_new.copy_(dec.x_next[:, 0])
        pos0, n0 = dec.pos.clone(), dec.n.clone()

        def again(f):  # a whole step or round, then p and n put back (two tiny copies), so that it can repeat
            return lambda: (f(), dec.pos.copy_(pos0), dec.n.copy_(n0))

        shape = TreeShape(*map(int, args.tree.split(",")))
        kv_round = dec._kv_end(L + max(shape.verified + 1, shape.module_slots, args.draft_len + 1))
        parts = {"full1": ("full, 1 token", lambda: dec._standard_forward(kv_end)),
                 "full2": ("full, 2 tokens", lambda: dec._full_pair(kv_end)),
                 "module": ("module, 2 slots", lambda: dec._module_pair(kv_end, dec.x_new)),
                 "standard": ("standard step",
                              again(lambda: dec.step_fn("_standard_greedy")(kv_end, dec._tables_fn(1, kv_end)))),
                 "recycle": ("recycle step",
                             again(lambda: dec.step_fn("_recycle_greedy")(kv_end, dec._tables_fn(2, kv_end)))),
                 "chain": (f"chain round K={args.draft_len}",
                           again(lambda: dec.step_fn("_chain_round")(args.draft_len, kv_round, sampling, gen))),
                 "tree": (f"tree round {tuple(shape)}",
                          again(lambda: dec.step_fn("_tree_round")(shape, kv_round, sampling, gen)))}
        if model.draft_weight is not None:
            parts["draft_head"] = ("draft head, 1 slot", lambda: model.draft_logits(dec.g))
        wanted = list(parts) if args.parts == "all" else args.parts.split(",")
        unknown = [w for w in wanted if w not in parts]
        if unknown:
            raise SystemExit(f"unknown or unavailable parts {unknown}; choose from {', '.join(parts)}")
        parts = dict(parts[w] for w in wanted)
        base_bytes = sum(p.numel() * p.element_size() for p in model.base.parameters())
        head_bytes = model.base.lm_head.weight.numel() * model.base.lm_head.weight.element_size()
        module_bytes = sum(p.numel() * p.element_size() for p in model.module.parameters()) + head_bytes
        floors = {"full, 1 token": base_bytes, "full, 2 tokens": base_bytes, "module, 2 slots": module_bytes}
        rows = []
        for name, fn in parts.items():
            graph = dec._capture(fn) if cuda else fn
            ms = replay_ms(graph, args.reps, reset)
            n, gpu_ms, by_kind, top, counts = kernels(fn, 20, args.top)
            reset()
            floor = floors.get(name)
            rows.append({"part": name, "replay_ms": ms, "kernels": n, "kernel_ms": gpu_ms,
                         "gap_ms": ms - gpu_ms, "floor_ms": 1000 * floor / args.bandwidth if floor else None,
                         "by_kind_ms": by_kind, "top": top, "counts": counts})
    name = torch.cuda.get_device_name(dev) if cuda else "cpu (no graphs; kernels = top-level aten operators)"
    print(f"device: {name}  torch {torch.__version__}  model: "
          f"{args.preset or args.shape or args.model}  module layers: {model.module.cfg.n_layer}  compile: {args.compile}  "
          f"attention backends: {args.sdpa or 'any'}  decode attention: "
          f"{'triton' if cuda and triton_attention.available() else 'sdpa'}  recycle vocab: {args.recycle_vocab}  "
          f"prompt {L}, attention over {kv_end} slots")
    print(f"{'part':<20} {'replay ms':>9} {'kernels':>8} {'kernel ms':>9} {'gap ms':>7} {'floor ms':>8}  by kind (ms)")
    for r in rows:
        floor = f"{r['floor_ms']:>8.3f}" if r["floor_ms"] is not None else f"{'-':>8}"
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in r["by_kind_ms"].items())
        print(f"{r['part']:<20} {r['replay_ms']:>9.3f} {r['kernels']:>8} {r['kernel_ms']:>9.3f} {r['gap_ms']:>7.3f} "
              f"{floor}  {kinds}")
    for r in rows:
        print(f"\n{r['part']}: top kernels ({'ms' if cuda else 'operators'} per call)")
        for n, v in r["top"]:
            print(f"  {v:7.4f}  {n}")
    by_part = {r["part"]: r for r in rows}
    if "full, 1 token" in by_part and "full, 2 tokens" in by_part:  # what the second token adds
        one, two = by_part["full, 1 token"]["counts"], by_part["full, 2 tokens"]["counts"]
        diff = {n: two.get(n, 0) - one.get(n, 0) for n in set(one) | set(two)}
        print("\nkernels per call, full call on 2 tokens minus on 1 (names whose count differs)")
        for n, d in sorted(diff.items(), key=lambda kv: -abs(kv[1])):
            if abs(d) >= 0.5:
                print(f"  {d:+6.1f}  {n}")
    ms = {r["part"]: r["replay_ms"] for r in rows}
    bound = None
    if "standard step" in ms and "recycle step" in ms:
        bound = 2 * ms["standard step"] / ms["recycle step"]
        print(f"\nrecycle's step-time bound: 2 x {ms['standard step']:.3f} / {ms['recycle step']:.3f} = {bound:.3f}x")
    print(json.dumps({"model": args.preset or args.shape or args.model, "module_layers": model.module.cfg.n_layer,
                      "compile": args.compile, "compile_steps": args.compile_steps, "device": name,
                      "torch": torch.__version__, "recycle_step_bound": bound,
                      "sdpa": args.sdpa, "recycle_vocab": args.recycle_vocab, "prompt_len": L,
                      "kv_end": kv_end,
                      "parts": [{k: v for k, v in r.items() if k not in ("top", "counts")} for r in rows]}))


if __name__ == "__main__":
    main()
