"""Time decode calls on the CPU for three ways of running the few-row matmuls, and predict recycle's speed-up.

Layouts: "row-major" is F.linear over the stored (out, in) weights; "column-major" is F.linear over weights stored
as the transpose of a contiguous (in, out) tensor (the project's CPU layout until 2026-11-26); "few-row" is
`model.linear`'s CPU path, (W @ x.T).T over row-major weights (the default now).

Random SmolLM2-135M-shaped weights (speed only). Full calls on 1, 2, ... tokens (standard's step is 1, recycle's
full step 2, a verification K + 1, a draft tree its nodes + 1) with the LM head on every token, as a verification
needs (recycle's full step needs it on the last only, so its cost is a little lower), and a module call on one
slot. The layouts take turns call by call, so a machine that slows down mid-run slows them all alike; medians.
predicted recycle speed-up = 2 * full(1) / (full(2) + module on 2 slots).
usage: python scripts/step_costs.py [--threads N] [--reps N] [--layers 2] [--tokens 1,2,3,4,8,17]
"""

import argparse
import statistics
import time

import torch

from recyclegpt import model as model_lib
from recyclegpt.config import PRESETS, RecycleConfig
from recyclegpt.model import RecycleModel

LAYOUTS = ("row-major", "column-major", "few-row")


def set_layout(model: RecycleModel, layout: str) -> None:
    model_lib.CPU_FEW_ROWS = 32 if layout == "few-row" else 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            w = m.weight.data
            m.weight.data = w.t().contiguous().t() if layout == "column-major" else w.contiguous()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2, help="module layers (default 2, the shipped module's)")
    ap.add_argument("--tokens", default="1,2,3,4,8,17", help="full-call widths to time")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = [int(n) for n in args.tokens.split(",")]
    torch.manual_seed(0)
    model = RecycleModel.build(PRESETS["smollm2-135m"], RecycleConfig(n_layer=args.layers)).eval()
    cache, mcache = model.base.new_cache(1, 4096), model.module.new_cache(1, 4096)
    times: dict[tuple, list[float]] = {}

    def timed(key, fn):
        t = time.perf_counter()
        fn()
        times.setdefault(key, []).append(1000 * (time.perf_counter() - t))

    with torch.inference_mode():
        model.base(torch.arange(100)[None], input_pos=torch.arange(100), cache=cache, kv_end=100, num_logits=1)
        p = 100
        for rep in range(args.reps + 1):  # the first round warms up
            for n in widths + ["module1", "module2"]:
                for layout in LAYOUTS:
                    set_layout(model, layout)
                    if isinstance(n, int):
                        ids = torch.zeros(1, n, dtype=torch.long)
                        fn = lambda: model.base(ids, input_pos=torch.arange(p, p + n), cache=cache, kv_end=p + n,
                                                num_logits=n)
                    else:
                        q = int(n[-1])
                        h, ids = torch.randn(1, q, model.base.cfg.d_model), torch.zeros(1, q, dtype=torch.long)
                        fn = lambda: model.recycle(h, ids, input_pos=torch.arange(p, p + q), cache=mcache,
                                                   kv_end=p + q, num_logits=1)
                    if rep:
                        timed((layout, n), fn)
                    else:
                        fn()
            p += max(widths)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"full calls (ms) on n tokens, module calls on 1 and 2 slots; {args.reps} interleaved reps, medians")
    print(f"{'layout':<13}" + "".join(f"{f'n={n}':>9}" for n in widths) + f"{'module1':>9}{'module2':>9}"
          f"{'recycle predicted':>19}")
    for layout in LAYOUTS:
        pred = 2 * med[(layout, 1)] / (med[(layout, 2)] + med[(layout, "module2")]) if 2 in widths and 1 in widths \
            else float("nan")
        print(f"{layout:<13}" + "".join(f"{med[(layout, n)]:>9.1f}" for n in widths)
              + f"{med[(layout, 'module1')]:>9.1f}{med[(layout, 'module2')]:>9.1f}{pred:>18.2f}x")


if __name__ == "__main__":
    main()
