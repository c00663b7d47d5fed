"""The draft-head kernel (triton_draft_head) on the GPU: its launch settings swept, against the torch path.

    python scripts/draft_head_bench.py [--rows 1,4] [--vocab 16384] [--dim 576] [--calls 20] [--reps 100]
                                       [--block-v 32,64,128] [--block-k 64,128] [--warps 4,8] [--stages 0,2,4]
                                       [--dtype bfloat16]

One case is one drafting call of the tree: R rows (1 at the root's level, topk at the others; batch 1) through
the final norm, the head over V draft-vocabulary rows of width K and the top-4, merge kernel included
(`head_top_k`). The torch path is what `RecycleModel.draft_top` runs without the kernel: F.rms_norm, the matmul,
log_softmax and `topk.top_k`. Each path is captured in a CUDA graph of --calls calls, replayed --reps times
(attention_bench.graph_time); the time is per call. The floor is the head's bytes over --bandwidth. `ok`: the
kernel's 4 distinct picks have, by an fp32 reference, the reference's top-4 log-probabilities, and so do its own
values (both within 0.03); a setting that fails is reported and never "best". Stages 0 means Triton's default. A
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
from attention_bench import graph_time

from recyclegpt.decoding import topk
from recyclegpt.kernels import draft_head as dh


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=ints, default=[1, 4])
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--block-v", type=ints, default=[32, 64, 128])
    ap.add_argument("--block-k", type=ints, default=[64, 128])
    ap.add_argument("--warps", type=ints, default=[4, 8])
    ap.add_argument("--stages", type=ints, default=[0, 2, 4])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes/s for the floor (H100 SXM)")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not dh.available():
        raise SystemExit("draft_head_bench: needs a CUDA device and triton")
    dtype, k = getattr(torch, args.dtype), dh.KTOP
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(args.vocab, args.dim, device="cuda", dtype=dtype, generator=g) * 0.05
    norm_w = 1 + 0.1 * torch.randn(args.dim, device="cuda", dtype=dtype, generator=g)
    floor_us = weight.numel() * weight.element_size() / args.bandwidth * 1e6
    defaults = (dh.BLOCK_V, dh.BLOCK_K, dh.NUM_WARPS, 0)
    rows_out = []
    print(f"device: {torch.cuda.get_device_name()}  head {args.vocab} x {args.dim} {args.dtype}  "
          f"floor {floor_us:.2f} us  default BLOCK_V {defaults[0]}, BLOCK_K {defaults[1]}, warps {defaults[2]}, "
          f"stages {defaults[3]}")
    print(f"{'rows':>4} {'path':<34} {'us/call':>8} {'of floor':>8}  ok")
    for R in args.rows:
        x = torch.randn(R, args.dim, device="cuda", dtype=dtype, generator=g)

        def torch_path():
            logits = F.linear(F.rms_norm(x, (args.dim,), norm_w, 1e-5), weight).float()
            return topk.top_k(torch.log_softmax(logits, -1), k)

        # the reference in fp32 products: the kernel accumulates in fp32 and never rounds a logit to bf16, so its
        # picks are checked by their reference log-probabilities, not by ids (bf16 rounding makes ties)
        ref = torch.log_softmax(F.rms_norm(x, (args.dim,), norm_w, 1e-5).float() @ weight.float().T, -1)
        want_lp = ref.topk(k, dim=-1).values
        t = graph_time(torch_path, calls=args.calls, reps=args.reps)
        rows_out.append({"rows": R, "path": "torch", "us": t})
        print(f"{R:>4} {'torch (norm, matmul, top-k)':<34} {t:>8.2f} {floor_us / t:>7.0%}")
        for bv, bk, w, st in itertools.product(args.block_v, args.block_k, args.warps, args.stages):
            launch = {"block_v": bv, "block_k": bk, "num_warps": w, "num_stages": st}
            name = f"kernel V{bv} K{bk} w{w} s{st}"
            try:
                lp, ids = dh.head_top_k(x, norm_w, 1e-5, weight, k, **launch)
                ok = ((ref.gather(-1, ids) - want_lp).abs().max().item() < 3e-2
                      and (lp - want_lp).abs().max().item() < 3e-2 and all(len(set(r)) == k for r in ids.tolist()))
                t = graph_time(lambda: dh.head_top_k(x, norm_w, 1e-5, weight, k, **launch), calls=args.calls,
                               reps=args.reps)
            except Exception as e:  # a setting Triton cannot build (shared memory) is reported, not fatal
                print(f"{R:>4} {name:<34} failed: {type(e).__name__}: {e}"[:160])
                continue
            rows_out.append({"rows": R, "path": "kernel", "block_v": bv,
                             "block_k": bk, "warps": w, "stages": st, "us": t, "ids_ok": ok})
            print(f"{R:>4} {name:<34} {t:>8.2f} {floor_us / t:>7.0%}  {'yes' if ok else 'NO'}")
    best = {}
    for r in rows_out:
        if r["path"] != "torch" and r["ids_ok"] and (r["rows"] not in best or r["us"] < best[r["rows"]]["us"]):
            best[r["rows"]] = r
    for R, r in best.items():
        print(f"best for {R} rows: {r['path']}, BLOCK_V {r['block_v']}, BLOCK_K {r['block_k']}, "
              f"warps {r['warps']}, stages {r['stages']}: {r['us']:.2f} us")
    print(json.dumps({"device": torch.cuda.get_device_name(), "vocab": args.vocab, "dim": args.dim,
                      "floor_us": floor_us, "results": rows_out,
                      "best": {str(R): r for R, r in best.items()}}))


if __name__ == "__main__":
    main()
