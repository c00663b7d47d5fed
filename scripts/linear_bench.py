"""Time triton_linear's fused few-row products against what they replace, at SmolLM2's layer shapes, on CUDA.

For each of a layer's four products (QKV with the attention norm before it; output with the residual after it;
gate-up with the MLP norm before it; down with SwiGLU before it and the residual after it), and for the QKV product
with the rotary embedding folded in too (`qkv_rope`, the fused path's QKV kernel), this captures 50 calls
in one CUDA graph and reports the replay time per call: the torch path (the norm or SwiGLU, cuBLAS's product and
the add, each its own kernel, as in the compiled step without inductor's fusions) and the Triton kernel with each of
a few launch settings (TILE, MAX_BLOCK_N, warps, programmatic dependent launch, rows a program), checked against
torch. Then SWIGLU_EPILOGUE's two kernels and the MLP both ways. Prints a table
for each row count and a final JSON line.

    python scripts/linear_bench.py [--rows 1[,2,...]] [--calls 50] [--settings all|default]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from recyclegpt import triton_attention, triton_linear as tl_  # noqa: E402

D, FF, QKV = 576, 1536, 960  # SmolLM2-135M: d_model, d_ff, (9 + 2 * 3) heads * 64
SHAPES = {  # name: (N, K, norm, swiglu, residual)
    "qkv (norm before)": (QKV, D, True, False, False),
    "out (+ residual)": (D, D, False, False, True),
    "gate-up (norm before)": (2 * FF, D, True, False, False),
    "down (swiglu before, + residual)": (D, FF, False, True, True),
}
# (TILE, MAX_BLOCK_N, warps, programmatic dependent launch, rows a program). Without PDL, 4096 was the best tile
# for every product on an H100; with PDL each of the 50 calls in the graph launches while the one before it runs and
# loads its first weight block before waiting on it. One row a program (ROWS_PER_PROGRAM 1) is timed for calls of
# more than one row only
ALL = tl_.MAX_ROWS  # every row of a call in one program
SETTINGS = [(4096, 64, 4, False, ALL), (8192, 64, 4, False, ALL), (16384, 64, 4, False, ALL), (4096, 8, 4, False, ALL),
            (8192, 8, 4, False, ALL), (2048, 64, 4, False, ALL), (4096, 64, 4, True, ALL), (8192, 64, 4, True, ALL),
            (16384, 64, 4, True, ALL), (4096, 8, 4, True, ALL), (8192, 8, 4, True, ALL), (16384, 64, 8, True, ALL),
            (8192, 64, 8, True, ALL), (16384, 64, 4, True, 1), (16384, 64, 8, True, 1)]


def torch_path(x, w, nw, res, swiglu, eps=1e-5):
    if nw is not None:
        xf = x.float()
        x = nw * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if swiglu:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    y = F.linear(x, w)
    return y if res is None else res + y


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


def sweep(results: list, name: str, call, want: torch.Tensor, calls: int, n: int, k: int,
          settings: list | None = None) -> None:
    """Time `call` under each of `settings` (default SETTINGS; the module constants restored after each; None in a
    setting: the module's default), checked against `want`; the kernel's grid is over n columns (or column pairs)
    of width k."""
    names = ("TILE", "MAX_BLOCK_N", "NUM_WARPS", "MULTI_ROW_WARPS", "SWIGLU_WARPS", "ROWS_PER_PROGRAM")
    defaults = [getattr(tl_, attr) for attr in names], triton_attention.PDL
    for setting in SETTINGS if settings is None else settings:
        if setting is None:  # the modules' defaults, as the engine runs them
            setting = (tl_.TILE, tl_.MAX_BLOCK_N, None, triton_attention.PDL, tl_.ROWS_PER_PROGRAM)
        tile, max_bn, warps, pdl, per_program = setting
        if per_program < ALL and want.numel() // want.shape[-1] == 1:
            continue  # a one-row call has one row block either way
        for attr, v in zip(names, (tile, max_bn, warps, warps, warps, per_program)):  # one warp count for all
            if v is not None:  # warps None: each product's own default
                setattr(tl_, attr, v)
        triton_attention.PDL = pdl
        try:
            err = (call().float() - want.float()).abs().max().item()
            ok = err < 6e-2 * max(1.0, want.float().abs().max().item() / 8)
            us = per_call_us(call, calls)
            bn, bk = tl_.blocks(n, k, torch.cuda.get_device_properties(want.device).multi_processor_count)
        finally:
            for attr, v in zip(names, defaults[0]):
                setattr(tl_, attr, v)
            triton_attention.PDL = defaults[1]
        split = f" {per_program}r" if per_program < ALL else ""  # rows a program, where not all
        path = f"kernel T{tile} N<={max_bn} w{warps or '*'}{' pdl' if pdl else ''}{split}"
        results.append({"product": name, "path": path, "tile": tile, "max_block_n": max_bn, "warps": warps,
                        "pdl": pdl, "rows_per_program": per_program, "us": us, "ok": ok,
                        "max_err": err, "blocks": [bn, bk]})
        print(f"{name:<34} {path:<29} {us:8.2f}  {'yes' if ok else 'NO'}")


def mlp(results: list, rows: int, calls: int, g: torch.Generator, settings: list | None) -> None:
    """triton_linear.SWIGLU_EPILOGUE's kernels (gate-up with SwiGLU after it; down reading the activation) and the MLP
    both ways, its two kernels a call: gate-up then down with SwiGLU before it, and the epilogue form."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(rows, D, generator=g).to(dev, dt)
    w13 = (torch.randn(2 * FF, D, generator=g) / D ** 0.5).to(dev, dt)
    nw = (1 + 0.1 * torch.randn(D, generator=g)).to(dev, dt)
    w2 = (torch.randn(D, FF, generator=g) / FF ** 0.5).to(dev, dt)
    res = torch.randn(rows, D, generator=g).to(dev, dt)
    gate, up = torch_path(x, w13, nw, None, False).chunk(2, dim=-1)
    act = F.silu(gate) * up
    want = torch_path(act, w2, None, res, False)
    sweep(results, "gate-up with swiglu after", lambda: tl_.gate_up_swiglu(x, w13, nw, 1e-5), act, calls, FF, D,
          settings)
    sweep(results, "down (activation, + residual)",
          lambda: tl_.linear(act, w2, residual=res), want, calls, D, FF, settings)
    sweep(results, "mlp: gate-up, down with swiglu",
          lambda: tl_.linear(tl_.linear(x, w13, norm_weight=nw, eps=1e-5), w2, residual=res, swiglu=True), want,
          calls, 2 * FF, D, settings)
    sweep(results, "mlp: swiglu in gate-up's epilogue",
          lambda: tl_.linear(tl_.gate_up_swiglu(x, w13, nw, 1e-5), w2, residual=res),
          want, calls, FF, D, settings)


def measure(rows: int, calls: int, g: torch.Generator, settings: list | None = None) -> list:
    """The table for calls of `rows` rows: each product's torch path, then each setting of its kernel."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    results = []
    print(f"device: {torch.cuda.get_device_name(dev)}  torch {torch.__version__}  rows {rows}  bf16")
    print(f"{'product':<34} {'path':<29} {'us/call':>8}  ok")
    for name, (N, K, norm, swiglu, residual) in SHAPES.items():
        x = torch.randn(rows, 2 * K if swiglu else K, generator=g).to(dev, dt)
        w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dev, dt)
        nw = (1 + 0.1 * torch.randn(K, generator=g)).to(dev, dt) if norm else None
        res = torch.randn(rows, N, generator=g).to(dev, dt) if residual else None
        want = torch_path(x, w, nw, res, swiglu)
        us = per_call_us(lambda: torch_path(x, w, nw, res, swiglu), calls)
        results.append({"product": name, "path": "torch", "us": us})
        print(f"{name:<34} {'torch':<29} {us:8.2f}")
        sweep(results, name, lambda: tl_.linear(x, w, norm_weight=nw, eps=1e-5, residual=res, swiglu=swiglu), want,
              calls, N, K, settings)
    # the QKV product with its norm and the rotary embedding of its 9 + 3 query and key heads folded in (the fused
    # path's QKV kernel), each setting
    from recyclegpt.model import apply_rotary, rotary
    x = torch.randn(1, rows, D, generator=g).to(dev, dt)
    w = (torch.randn(QKV, D, generator=g) / D ** 0.5).to(dev, dt)
    nw = (1 + 0.1 * torch.randn(D, generator=g)).to(dev, dt)
    rope = rotary(torch.arange(rows, device=dev)[None] + 100, 64, 10000.0, dt)
    y = torch_path(x, w, nw, None, False).view(1, rows, 15, 64).transpose(1, 2)
    want = torch.cat((apply_rotary(y[:, :12], *rope), y[:, 12:]), 1).transpose(1, 2).reshape(1, rows, QKV)
    sweep(results, "qkv (norm before, rotary after)", lambda: tl_.qkv_rope(x, w, nw, 1e-5, rope, 12), want,
          calls, QKV // 2, D, settings)
    mlp(results, rows, calls, g, settings)
    for r in results:
        r["rows"] = rows
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1", help="rows a call, or several, comma-separated (one table each)")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--settings", default="all", choices=("all", "default"),
                    help="every launch setting of SETTINGS, or only the modules' defaults as the engine runs them")
    args = ap.parse_args()
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        raise SystemExit(f"--rows takes integers separated by commas, not {args.rows!r}") from None
    if min(rows) < 1 or max(rows) > tl_.MAX_ROWS:
        raise SystemExit(f"--rows: each between 1 and {tl_.MAX_ROWS} (the few-row kernels' most), not {args.rows!r}")
    if not torch.cuda.is_available():
        raise SystemExit("linear_bench needs a CUDA device")
    g = torch.Generator().manual_seed(0)
    chosen = {"all": None, "default": [None]}[args.settings]
    results = [r for n in rows for r in measure(n, args.calls, g, chosen)]
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
