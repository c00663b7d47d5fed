"""Does the module's LM head find the base head's bytes in L2? A probe of cuBLAS's head products on the GPU.

    python scripts/head_l2_probe.py [--vocab 49152] [--dim 576] [--between 0,15] [--calls 20] [--reps 50]

In a recycle step the base's head reads the (tied) LM head weight, then the module's layers run (~15 MB of weights
for SmolLM2's two-layer module), then the module's head reads the same weight again. The weight (56.6 MB) is larger
than an H100's L2 (50 MB), so which of its bytes are still there depends on the order of the two reads. Each case
below is a CUDA graph of --calls rounds of (the base's head on one row, a read of --between MB, the module's head in
some form), minus the same graph without the module's head:
- `whole`: one product over the whole head (as the step runs it);
- `K halves, back first` / `front first`: the product as two, over the second and the first half of the model
  dimension (strided views, no copy), the half cuBLAS's base-head kernel read last first or second;
- `row halves, back first`: over the second half of the vocabulary, then the first.
- `model, N K parts`: `model.head_k_split` in N parts with the argmax, compiled (N = 1: one product).
Each on the same weight as the base's head and on a separate copy (nothing in L2 from the base's read). A table, then
one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from attention_bench import graph_time
from recyclegpt import topk
from recyclegpt.model import head_k_split


def floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--between", type=floats, default=[0.0, 15.0], help="MB read between the two heads")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--k-parts", type=lambda v: [int(p) for p in v.split(",") if p], default=[1, 2, 3, 4],
                    help="model.head_k_split with these part counts, with the argmax, compiled")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("head_l2_probe: needs a CUDA device")
    dev, dtype = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    weight = torch.randn(args.vocab, args.dim, device=dev, dtype=dtype, generator=g) * 0.05
    other = weight.clone()
    x0 = torch.randn(1, args.dim, device=dev, dtype=dtype, generator=g)
    x = torch.randn(1, args.dim, device=dev, dtype=dtype, generator=g)
    h, hv = args.dim // 2, args.vocab // 2
    forms = {
        "whole": lambda w: F.linear(x, w),
        "K halves, back first": lambda w: F.linear(x[:, h:], w[:, h:]) + F.linear(x[:, :h], w[:, :h]),
        "K halves, front first": lambda w: F.linear(x[:, :h], w[:, :h]) + F.linear(x[:, h:], w[:, h:]),
        "row halves, back first": lambda w: torch.cat((F.linear(x, w[hv:]), F.linear(x, w[:hv])), -1),
    }
    for parts in args.k_parts:  # what the model runs (model.head_k_split), compiled as in the step
        forms[f"model, {parts} K parts"] = torch.compile(
            lambda w, parts=parts: topk.argmax(head_k_split(x, w, parts)), dynamic=False)
    print(f"device: {torch.cuda.get_device_name()}  head {args.vocab} x {args.dim} bf16 "
          f"({weight.numel() * 2 / 1e6:.1f} MB); µs a round after the base's head")
    print(f"{'between MB':>10}  {'form':<24} {'same weight':>12} {'a copy':>8}")
    results = []
    for mb in args.between:
        between = torch.randn(max(1, int(mb * 2 ** 20) // 2), device=dev, dtype=dtype, generator=g)

        def before():
            F.linear(x0, weight)
            if mb:
                between.sum()  # reads the buffer, writes one value

        t0 = graph_time(before, calls=args.calls, reps=args.reps)
        for name, form in forms.items():
            same = graph_time(lambda: (before(), form(weight)), calls=args.calls, reps=args.reps) - t0
            cold = graph_time(lambda: (before(), form(other)), calls=args.calls, reps=args.reps) - t0
            results.append({"between_mb": mb, "form": name, "same_us": round(same, 2), "copy_us": round(cold, 2)})
            print(f"{mb:>10g}  {name:<24} {same:>12.2f} {cold:>8.2f}")
    print(json.dumps({"probe": "head_l2", "device": torch.cuda.get_device_name(), "vocab": args.vocab,
                      "dim": args.dim, "results": results}))


if __name__ == "__main__":
    main()
