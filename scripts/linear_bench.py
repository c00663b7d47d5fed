"""Time triton_linear's fused few-row products against what they replace, at SmolLM2's layer shapes, on CUDA.

For each of a layer's four products (QKV with the attention norm before it; output with the residual after it;
gate-up with the MLP norm before it; down, reading the SwiGLU activation, with the residual after it), for the QKV
product with the rotary embedding folded in too (`qkv_rope`, the fused path's QKV kernel) and for gate-up with
SwiGLU in its epilogue (`gate_up_swiglu`, the fused path's gate-up kernel), this captures --calls calls in one CUDA
graph and reports the replay time per call: the torch path (the norm, cuBLAS's product, the rotary embedding or
SwiGLU and the add, each its own kernel, as in the compiled step without inductor's fusions) and the Triton kernel
at its default launch settings, with programmatic dependent launch (the `pdl` keyword; Hopper and later) and
without, checked against torch. Then the MLP both ways: the fused path's two kernels (gate_up_swiglu, then the down
product with the residual) against the torch path's. Prints a table for each row count and a final JSON line.

    python scripts/linear_bench.py [--rows 1[,2,...]] [--calls 50]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from recyclegpt.kernels import linear as tl_  # noqa: E402

D, FF, QKV = 576, 1536, 960  # SmolLM2-135M: d_model, d_ff, (9 + 2 * 3) heads * 64
SHAPES = {  # name: (N, K, norm, residual)
    "qkv (norm before)": (QKV, D, True, False),
    "out (+ residual)": (D, D, False, True),
    "gate-up (norm before)": (2 * FF, D, True, False),
    "down (+ residual)": (D, FF, False, True),
}


def torch_path(x, w, nw, res, eps=1e-5):
    if nw is not None:
        xf = x.float()
        x = nw * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = F.linear(x, w)
    return y if res is None else res + y


def swiglu(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def per_call_us(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / (10 * calls))
    return best


def time_torch(results: list, name: str, call, calls: int) -> None:
    us = per_call_us(call, calls)
    results.append({"product": name, "path": "torch", "us": us})
    print(f"{name:<34} {'torch':<14} {us:8.2f}")


def time_kernel(results: list, name: str, call, want: torch.Tensor, calls: int, n: int, k: int) -> None:
    """Time call(pdl) with programmatic dependent launch on and off, each checked against `want`; the kernel's grid
    is over n columns (or column pairs) of width k (the `blocks` column: BLOCK_N, BLOCK_K)."""
    blocks = list(tl_.blocks(n, k, torch.cuda.get_device_properties(want.device).multi_processor_count))
    for pdl in (True, False):
        err = (call(pdl).float() - want.float()).abs().max().item()
        ok = err < 6e-2 * max(1.0, want.float().abs().max().item() / 8)
        us = per_call_us(lambda: call(pdl), calls)
        path = "kernel pdl" if pdl else "kernel"
        results.append({"product": name, "path": path, "pdl": pdl, "us": us, "ok": ok, "max_err": err,
                        "blocks": blocks})
        print(f"{name:<34} {path:<14} {us:8.2f}  {'yes' if ok else 'NO'}")


def measure(rows: int, calls: int, g: torch.Generator) -> list:
    """The table for calls of `rows` rows: each product's torch path, then its kernel with and without PDL."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    results = []
    print(f"device: {torch.cuda.get_device_name(dev)}  torch {torch.__version__}  rows {rows}  bf16")
    print(f"{'product':<34} {'path':<14} {'us/call':>8}  ok")
    for name, (N, K, norm, residual) in SHAPES.items():
        x = torch.randn(rows, K, generator=g).to(dev, dt)
        w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dev, dt)
        nw = (1 + 0.1 * torch.randn(K, generator=g)).to(dev, dt) if norm else None
        res = torch.randn(rows, N, generator=g).to(dev, dt) if residual else None
        time_torch(results, name, lambda: torch_path(x, w, nw, res), calls)
        time_kernel(results, name, lambda pdl: tl_.linear(x, w, norm_weight=nw, eps=1e-5, residual=res, pdl=pdl),
                    torch_path(x, w, nw, res), calls, N, K)
    # the QKV product with its norm and the rotary embedding of its 9 + 3 query and key heads folded in (the fused
    # path's QKV kernel)
    from recyclegpt.models import apply_rotary, rotary
    x = torch.randn(1, rows, D, generator=g).to(dev, dt)
    w = (torch.randn(QKV, D, generator=g) / D ** 0.5).to(dev, dt)
    nw = (1 + 0.1 * torch.randn(D, generator=g)).to(dev, dt)
    rope = rotary(torch.arange(rows, device=dev)[None] + 100, 64, 10000.0, dt)

    def qkv_torch():
        y = torch_path(x, w, nw, None).view(1, rows, 15, 64).transpose(1, 2)
        return torch.cat((apply_rotary(y[:, :12], *rope), y[:, 12:]), 1).transpose(1, 2).reshape(1, rows, QKV)

    name = "qkv (norm before, rotary after)"
    time_torch(results, name, qkv_torch, calls)
    time_kernel(results, name, lambda pdl: tl_.qkv_rope(x, w, nw, 1e-5, rope, 12, pdl=pdl), qkv_torch(), calls,
                QKV // 2, D)
    mlp(results, rows, calls, g)
    for r in results:
        r["rows"] = rows
    return results


def mlp(results: list, rows: int, calls: int, g: torch.Generator) -> None:
    """The gate-up product with SwiGLU in its epilogue (`gate_up_swiglu`), and the MLP with the residual both ways:
    the torch path (the norm, cuBLAS's gate-up product, SwiGLU, cuBLAS's down product, the add) and the fused
    path's two kernels (gate_up_swiglu, then `linear` with the residual)."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(rows, D, generator=g).to(dev, dt)
    w13 = (torch.randn(2 * FF, D, generator=g) / D ** 0.5).to(dev, dt)
    nw = (1 + 0.1 * torch.randn(D, generator=g)).to(dev, dt)
    w2 = (torch.randn(D, FF, generator=g) / FF ** 0.5).to(dev, dt)
    res = torch.randn(rows, D, generator=g).to(dev, dt)
    name = "gate-up (norm before, swiglu after)"
    time_torch(results, name, lambda: swiglu(torch_path(x, w13, nw, None)), calls)
    time_kernel(results, name, lambda pdl: tl_.gate_up_swiglu(x, w13, nw, 1e-5, pdl=pdl),
                swiglu(torch_path(x, w13, nw, None)), calls, FF, D)

    def mlp_torch():
        return torch_path(swiglu(torch_path(x, w13, nw, None)), w2, None, res)

    def mlp_fused(pdl):
        return tl_.linear(tl_.gate_up_swiglu(x, w13, nw, 1e-5, pdl=pdl), w2, residual=res, pdl=pdl)

    name = "mlp (gate-up, down, + residual)"
    time_torch(results, name, mlp_torch, calls)
    time_kernel(results, name, mlp_fused, mlp_torch(), calls, FF, D)  # blocks: the gate-up kernel's


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1", help="rows a call, or several, comma-separated (one table each)")
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        raise SystemExit(f"--rows takes integers separated by commas, not {args.rows!r}") from None
    if min(rows) < 1 or max(rows) > tl_.MAX_ROWS:
        raise SystemExit(f"--rows: each between 1 and {tl_.MAX_ROWS} (the few-row kernels' most), not {args.rows!r}")
    if not torch.cuda.is_available() or not tl_.available():
        raise SystemExit("linear_bench needs a CUDA device and triton")
    g = torch.Generator().manual_seed(0)
    results = [r for n in rows for r in measure(n, args.calls, g)]
    best = {}
    for r in results:
        key = f"{r['product']} @ {r['rows']} rows"
        if r["path"] != "torch" and r["ok"] and r["us"] < best.get(key, {"us": float("inf")})["us"]:
            best[key] = r
    for key, r in best.items():
        print(f"best for {key}: {r['path']} {r['us']:.2f} us")
    print(json.dumps({"device": torch.cuda.get_device_name(torch.device("cuda")), "rows": rows,
                      "results": results, "best": best}))


if __name__ == "__main__":
    main()
