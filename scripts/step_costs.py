"""Time one decode step of each kind on the CPU, for three ways of running the few-row matmuls, and predict
recycle's speed-up.

Layouts: "row-major" is F.linear over the stored (out, in) weights; "column-major" is F.linear over weights stored
as the transpose of a contiguous (in, out) tensor (the project's CPU layout until 2026-11-26); "few-row" is
`model.linear`'s CPU path, (W @ x.T).T over row-major weights (the default now).

Random SmolLM2-135M-shaped weights (speed only). A full call on 1 token (standard's step), on 2 tokens (recycle's
full step) and one module call on 2 slots; predicted speed-up = 2 * full(1) / (full(2) + module); the module's share
of a recycle step = module / (full(2) + module).
usage: python scripts/step_costs.py [--threads N] [--reps N] [--layers 1,2]
"""

import argparse
import time

import torch

from recyclegpt.config import PRESETS, RecycleConfig
from recyclegpt import model as model_lib
from recyclegpt.model import RecycleModel


def step_costs(model: RecycleModel, reps: int) -> dict[str, float]:
    cache, mcache = model.base.new_cache(1, 512), model.module.new_cache(1, 512)
    ms = {}
    with torch.inference_mode():
        model.base(torch.arange(100)[None], input_pos=torch.arange(100), cache=cache, kv_end=100, num_logits=1)
        for name, n in (("full_q1", 1), ("full_q2", 2)) * 2:  # the second round is the measurement
            t = time.perf_counter()
            for i in range(reps):
                p = 100 + 2 * i
                model.base(torch.zeros(1, n, dtype=torch.long), input_pos=torch.arange(p, p + n), cache=cache,
                           kv_end=p + n, num_logits=1)
            ms[name] = 1000 * (time.perf_counter() - t) / reps
        h = torch.randn(1, 2, model.base.cfg.d_model)
        for _ in range(2):
            t = time.perf_counter()
            for i in range(reps):
                p = 100 + 2 * i
                model.recycle(h, torch.zeros(1, 2, dtype=torch.long), input_pos=torch.arange(p, p + 2), cache=mcache,
                              kv_end=p + 2, num_logits=1)
            ms["module"] = 1000 * (time.perf_counter() - t) / reps
    ms["predicted_speedup"] = 2 * ms["full_q1"] / (ms["full_q2"] + ms["module"])
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--layers", default="1", help="comma-separated module depths to time (default 1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'layout':<14} {'module layers':>13} {'full q=1 ms':>12} {'full q=2 ms':>12} {'module ms':>10} "
          f"{'module share':>13} {'predicted':>10}")
    for n_layer in (int(n) for n in args.layers.split(",")):
        torch.manual_seed(0)
        model = RecycleModel.build(PRESETS["smollm2-135m"], RecycleConfig(n_layer=n_layer)).eval()
        for layout in ("row-major", "column-major", "few-row"):
            model_lib.CPU_FEW_ROWS = 16 if layout == "few-row" else 0
            for m in model.modules():
                if isinstance(m, torch.nn.Linear):
                    w = m.weight.data
                    m.weight.data = w.t().contiguous().t() if layout == "column-major" else w.contiguous()
            c = step_costs(model, args.reps)
            share = c["module"] / (c["full_q2"] + c["module"])
            print(f"{layout:<14} {n_layer:>13} {c['full_q1']:>12.1f} {c['full_q2']:>12.1f} {c['module']:>10.1f} "
                  f"{share:>12.1%} {c['predicted_speedup']:>9.2f}x")

if __name__ == "__main__":
    main()
