"""Decode attention on the GPU: torch's SDPA with an additive mask against the Triton kernel (triton_attention).

    python scripts/attention_bench.py [--shapes 1.3b smollm2 7b] [--calls 20] [--reps 100] [--bandwidth 3.35e12]
                                      [--splits 1,2,4,8]

Each case is one layer's attention of a cached decode call: R query rows (GQA heads folded into rows) over L
slots of a static cache, k and v being views cache[layer, :, :, :L] of a 5-D buffer, as in the model. Each
implementation is captured in a CUDA graph of --calls back-to-back calls, replayed --reps times between CUDA events;
the time is per call. The floor is the K and V bytes over --bandwidth (H100 SXM's by default). The error is the
Triton output's max abs difference from SDPA's, both in --dtype. --splits also times the kernel with each of these
numbers of KV ranges forced (the heuristic's choice is the `split` column): the data for tuning `plan`. A table,
then one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from recyclegpt.kernels import attention as triton_attention

# name -> (B, Hkv, D, rows, cached lengths)
SHAPES = {
    "1.3b": (1, 16, 128, (1, 2, 17), (256, 512, 1024)),
    "smollm2": (1, 3, 64, (3, 6, 51), (256, 512, 1024)),  # 9 query heads on 3 KV heads: R = 3 T
    "7b": (1, 32, 128, (1, 2), (512,)),
}


def graph_time(fn, *, calls: int, reps: int) -> float:
    """Microseconds per call of fn(), captured `calls` times in one CUDA graph and replayed `reps` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture: kernel compilation, cuDNN plans
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * calls)


def case(B: int, Hkv: int, D: int, R: int, L: int, *, dtype: torch.dtype, calls: int, reps: int,
         bandwidth: float, splits: tuple[int, ...] = ()) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    cache = torch.randn(2, 2, B, Hkv, L + 256, D, device="cuda", dtype=dtype, generator=g)  # (k|v, layer, ...)
    k, v = cache[0, 1, :, :, :L], cache[1, 1, :, :, :L]
    q = torch.randn(B, Hkv, R, D, device="cuda", dtype=dtype, generator=g)
    # row r sees the slots up to its own, the last R slots being the call's new ones
    visible = torch.arange(L, device="cuda") <= torch.arange(L - R, L, device="cuda")[:, None].clamp(min=0)
    mask = torch.zeros(1, 1, R, L, device="cuda", dtype=dtype).masked_fill_(~visible, float("-inf"))

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def kernel():
        return triton_attention.decode_attention(q, k, v, mask)

    err = (kernel().float() - sdpa().float()).abs().max().item()
    return {"B": B, "Hkv": Hkv, "D": D, "R": R, "L": L,
            "n_split": triton_attention.plan(B, Hkv, R, L)[1],
            "floor_us": 2 * k.numel() * k.element_size() / bandwidth * 1e6,
            "sdpa_us": graph_time(sdpa, calls=calls, reps=reps),
            "triton_us": graph_time(kernel, calls=calls, reps=reps), "max_err": err,
            "split_us": {n: graph_time(lambda n=n: triton_attention.decode_attention(q, k, v, mask, n_split=n),
                                       calls=calls, reps=reps) for n in splits}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--calls", type=int, default=20, help="calls captured in one CUDA graph")
    p.add_argument("--reps", type=int, default=100, help="timed replays of the graph")
    p.add_argument("--bandwidth", type=float, default=3.35e12, help="memory bandwidth for the floor, bytes/s")
    p.add_argument("--splits", default="", help="comma-separated KV-range counts to time the kernel with as well")
    args = p.parse_args()
    try:
        splits = tuple(int(n) for n in args.splits.split(",") if n.strip())
    except ValueError:
        raise SystemExit(f"--splits takes comma-separated integers, got {args.splits!r}") from None
    if any(n < 1 for n in splits):
        raise SystemExit(f"--splits must be positive, got {args.splits!r}")
    if not torch.cuda.is_available() or not triton_attention.available():
        raise SystemExit("attention_bench needs a CUDA device and triton")

    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}; µs per call")
    print(f"{'shape':8} {'B':>2} {'Hkv':>3} {'D':>4} {'R':>3} {'L':>5} {'split':>5} {'floor':>6} {'sdpa':>7} "
          f"{'triton':>7} {'speedup':>7} {'max err':>8}")
    for name in args.shapes:
        B, Hkv, D, rs, ls = SHAPES[name]
        for R in rs:
            for L in ls:
                r = {"shape": name, **case(B, Hkv, D, R, L, dtype=getattr(torch, args.dtype), calls=args.calls,
                                           reps=args.reps, bandwidth=args.bandwidth, splits=splits)}
                rows.append(r)
                print(f"{name:8} {B:>2} {Hkv:>3} {D:>4} {R:>3} {L:>5} {r['n_split']:>5} {r['floor_us']:>6.2f} "
                      f"{r['sdpa_us']:>7.2f} {r['triton_us']:>7.2f} {r['sdpa_us'] / r['triton_us']:>6.2f}x "
                      f"{r['max_err']:>8.1e}" + "".join(f"  {n}: {us:.2f}" for n, us in r["split_us"].items()))
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
                      "calls": args.calls, "reps": args.reps, "results": rows}))


if __name__ == "__main__":
    main()
