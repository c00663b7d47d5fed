"""The head-argmax kernel (triton_head) on the GPU: its launch settings and block order, against the operators.

    python scripts/head_bench.py [--rows 1,2] [--vocab 49152] [--draft 16384] [--dim 576] [--between 16]
                                 [--calls 20] [--reps 50] [--shapes 32x256,64x128,...] [--warps 4,8]

A case is recycle's greedy module token: the module's output rows through the final norm, a head and the argmax.
Heads: the full head (V rows), a draft head as a copy of N evenly spaced rows, and the same rows gathered in place
from the full head. Paths: the operators (compiled F.rms_norm, F.linear and topk.split_argmax: what
`RecycleModel.module_argmax` runs without the kernel) and the kernel.

Each path is timed after the base's head: a CUDA graph holds --calls rounds of (the base's head product over the
full weight on one row, by cuBLAS as in the step; --between MB of bf16 summed in float32, which writes and reads a
float32 copy as well, ~5x the MB in traffic, more than an H100's L2 holds; the path), and the time of the same graph
without the path is subtracted. The path so meets an L2 that holds little of the base's read (`head_l2_probe.py`
asks what it holds). First the kernel's shapes (BLOCK_V x BLOCK_K)
and warps are swept on the full head at one row, blocks back to front; then the best shape runs every head, row
count and block order. `ok`: the kernel's token is the operators' or its logit is the best to a bf16 step. A table,
then one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from attention_bench import graph_time
from recyclegpt import topk, triton_head as th


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def shapes(s: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in p.split("x")) for p in s.split(",") if p]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=ints, default=[1, 2])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--draft", type=int, default=16384, help="rows of the draft head (every V/N-th row)")
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--between", type=float, default=16.0,
                    help="MB of bf16 summed in float32 between the base's head and the path (a float32 copy too)")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--shapes", type=shapes, default=shapes("32x256,64x128,64x256,128x128,32x512,64x512,128x256"))
    ap.add_argument("--warps", type=ints, default=[4, 8])
    ap.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes/s for the floor (H100 SXM)")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not th.available():
        raise SystemExit("head_bench: needs a CUDA device and triton")
    topk.SPLIT_ARGMAX = "cuda"
    dev, dtype = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    weight = torch.randn(args.vocab, args.dim, device=dev, dtype=dtype, generator=g) * 0.05
    norm_w = 1 + 0.1 * torch.randn(args.dim, device=dev, dtype=dtype, generator=g)
    ids = torch.linspace(0, args.vocab - 1, args.draft, device=dev).long().unique()
    draft_w = weight[ids].contiguous()
    base_x = torch.randn(1, args.dim, device=dev, dtype=dtype, generator=g)
    between = torch.empty(int(args.between * 2 ** 20) // 2, device=dev, dtype=dtype).normal_(generator=g)
    sink = torch.zeros((), device=dev, dtype=torch.float32)
    tickets = torch.zeros(1, device=dev, dtype=torch.int32)

    def before():  # the base's head, then what stands for the module's layers
        F.linear(base_x, weight)
        if between.numel():
            sink.copy_(between.float().sum())

    @torch.compile(dynamic=False)
    def operators(x, w, ids_):
        xn = F.rms_norm(x, (x.shape[-1],), norm_w, 1e-5)
        best = topk.argmax(F.linear(xn, w))
        return best if ids_ is None else ids_[best]

    heads = {"full": (weight, None, False), "draft": (draft_w, ids, False), "gathered": (weight, ids, True)}
    t_before = graph_time(before, calls=args.calls, reps=args.reps)
    results = []

    def time_path(name, rows, order, fn, want):
        got = fn()
        t = graph_time(lambda: (before(), fn()), calls=args.calls, reps=args.reps) - t_before
        w_head = weight if name == "full" else draft_w
        x = xs[rows]
        logits = (F.rms_norm(x, (x.shape[-1],), norm_w, 1e-5).float() @ w_head.float().T)
        at = got if name == "full" else torch.searchsorted(ids, got)
        picked = logits.gather(-1, at.view(-1, 1)).squeeze(-1)
        ok = bool(torch.equal(got, want) or ((logits.amax(-1) - picked) <= 1e-2 * logits.amax(-1).abs()).all())
        v = weight.shape[0] if name == "full" else ids.numel()
        floor = v * args.dim * 2 / args.bandwidth * 1e6
        row = {"head": name, "rows": rows, "path": order, "us": round(t, 2), "floor_us": round(floor, 2), "ok": ok}
        results.append(row)
        print(f"{name:9s} {rows:4d}  {order:34s} {t:8.2f} {floor:8.2f}  {ok}")
        return t

    xs = {r: torch.randn(r, args.dim, device=dev, dtype=dtype, generator=g) for r in args.rows}
    print(f"device: {torch.cuda.get_device_name()}  head {args.vocab} x {args.dim}, draft {ids.numel()} rows, "
          f"{args.between:g} MB between; the base's head and the read alone: {t_before:.2f} us a round")
    print(f"{'head':9s} {'rows':>4s}  {'path':34s} {'us':>8s} {'floor':>8s}  ok")
    defaults = th.BLOCK_V, th.BLOCK_K, th.NUM_WARPS, th.REVERSE
    want = {}
    for n, (w, i, gather) in heads.items():
        for r in args.rows:
            if gather:  # the same rows as the copy: the same token
                want[(n, r)] = want[("draft", r)]
                continue
            want[(n, r)] = operators(xs[r], w, i)
            time_path(n, r, "operators", lambda: operators(xs[r], w, i), want[(n, r)])
    best = None
    th.REVERSE = True
    r0 = args.rows[0]
    for (bv, bk) in args.shapes:
        for warps in args.warps:
            th.BLOCK_V, th.BLOCK_K, th.NUM_WARPS = bv, bk, warps
            t = time_path("full", r0, f"kernel {bv}x{bk} w{warps} reverse",
                          lambda: th.head_argmax(xs[r0], norm_w, 1e-5, weight, tickets), want[("full", r0)])
            if results[-1]["ok"] and (best is None or t < best[0]):
                best = (t, bv, bk, warps)
    th.BLOCK_V, th.BLOCK_K, th.NUM_WARPS = best[1:]
    for n, (w, i, gather) in heads.items():
        for r in args.rows:
            for reverse in (True, False):
                th.REVERSE = reverse
                time_path(n, r, f"kernel {best[1]}x{best[2]} w{best[3]} {'reverse' if reverse else 'forward'}",
                          lambda: th.head_argmax(xs[r], norm_w, 1e-5, w, tickets, ids=i, gather=gather),
                          want[(n, r)])
    th.BLOCK_V, th.BLOCK_K, th.NUM_WARPS, th.REVERSE = defaults
    print(json.dumps({"bench": "head_argmax", "device": torch.cuda.get_device_name(), "vocab": args.vocab,
                      "draft": ids.numel(), "dim": args.dim, "between_mb": args.between,
                      "best": {"block_v": best[1], "block_k": best[2], "warps": best[3], "us": round(best[0], 2)},
                      "results": results}))


if __name__ == "__main__":
    main()
