"""Turn a `recyclegpt retrofit` checkpoint into the folder the package ships: bf16 module weights and recycle.json.

The optimizer and trainer state stay behind; bf16 halves the file (a 2-layer SmolLM2 module: 15.5 MB) and is the
dtype the module runs in on CUDA (on the CPU it is widened to fp32 exactly).
    python scripts/ship_module.py CKPT src/recyclegpt/modules/smollm2-135m-instruct
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import safetensors.torch


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    tensors = safetensors.torch.load_file(str(src / "module.safetensors"))
    dst.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: (v.bfloat16() if v.is_floating_point() else v).contiguous()  # ids stay ints
                                 for k, v in tensors.items()},
                                str(dst / "module.safetensors"))
    shutil.copy(src / "recycle.json", dst / "recycle.json")
    data = (dst / "module.safetensors").read_bytes()
    n = sum(v.numel() for v in tensors.values() if v.is_floating_point())
    print(f"{dst}: {n / 1e6:.2f}M parameters, {len(data) / 1e6:.1f} MB, sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
