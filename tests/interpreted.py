"""Running a test file's Triton checks on the CPU: under Triton's interpreter, which must be chosen before triton is
imported, so in a subprocess that runs the file as a script with TRITON_INTERPRET=1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


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
