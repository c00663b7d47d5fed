"""A module checkpoint cut to its first N layers: a starting point for `retrofit --init-module` at a smaller depth.

The input map, the norms, the first N layers and the draft vocabulary are kept; the later layers are dropped, so the
N-th layer's output goes straight to the shared final norm and head. Fine-tuning then teaches the shallower stack
what the dropped layers did (docs/training.md, the one-layer module).
    python scripts/truncate_module.py src/recyclegpt/modules/smollm2-135m-instruct work/l1-init --layers 1
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import safetensors.torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="a module checkpoint folder (module.safetensors, recycle.json)")
    ap.add_argument("dst", type=Path)
    ap.add_argument("--layers", type=int, required=True, help="layers to keep, from the first")
    args = ap.parse_args()
    meta = json.loads((args.src / "recycle.json").read_text())
    have = meta["recycle"]["n_layer"]
    if not 1 <= args.layers < have:
        raise SystemExit(f"truncate_module: --layers must be between 1 and {have - 1} (the module has {have})")
    tensors = safetensors.torch.load_file(str(args.src / "module.safetensors"))
    kept = {k: v for k, v in tensors.items()
            if not (m := re.match(r"layers\.(\d+)\.", k)) or int(m.group(1)) < args.layers}
    meta["recycle"]["n_layer"] = args.layers
    meta.pop("metrics", None)
    meta["truncated_from"] = {"module": str(args.src), "n_layer": have}
    args.dst.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(kept, str(args.dst / "module.safetensors"))
    (args.dst / "recycle.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{args.dst}: {len(kept)} of {len(tensors)} tensors, {args.layers} of {have} layers")


if __name__ == "__main__":
    main()
