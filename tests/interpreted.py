"""Running a test file's Triton checks on the CPU: under Triton's interpreter, which must be chosen before triton is
imported, so in a subprocess that runs the file as a script with TRITON_INTERPRET=1. `OpLog` tells those checks which
path a model's call took."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from torch.utils._python_dispatch import TorchDispatchMode


def needs_interpreter_3_7(triton):
    """Skip below Triton 3.7, whose interpreter cannot loop over bounds computed in a kernel."""
    return pytest.mark.skipif(tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7),
                              reason="older Triton interpreters cannot loop over bounds computed in the kernel; the "
                                     "CUDA tests cover the kernels there")


def run_interpreted(path: str, timeout: int = 1200) -> None:
    """Run `path` as a script under TRITON_INTERPRET=1 and fail with its output if it fails."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    res = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout + res.stderr


class OpLog(TorchDispatchMode):
    """The operators that reach the dispatcher inside it, in order: `ops` holds (name, args), the name qualified
    ("aten::index_copy_", "recyclegpt::fused_qkv_rope"), args kept for the project's custom ops only. Which ones ran
    shows which path a call took, with nothing of the library replaced. A custom op's body runs outside the log;
    what an eager op body calls directly (decode_attention's, cached_attention's) is logged as its ATen operators."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name
        self.ops.append((name, args if name.startswith("recyclegpt::") else ()))
        return func(*args, **(kwargs or {}))

    def names(self, start: int = 0) -> list[str]:
        return [name for name, _ in self.ops[start:]]
