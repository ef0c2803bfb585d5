"""Running Triton kernels' own code on a CPU: Triton's interpreter (``TRITON_INTERPRET=1``) in a fresh process, since
it must be on before Triton is first imported."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest


def interpreter_runs_the_kernels() -> bool:
    """Triton's interpreter runs loops whose bounds are read from memory (attention's) from 3.9 on: the version CI
    installs. The GPU machine's 3.6 compiles them for the GPU tests but cannot interpret them."""
    major, minor = (int(part) for part in importlib.metadata.version("triton").split(".")[:2])
    return (major, minor) >= (3, 9)


def run_interpreted(script: str, *args: str, expect: str) -> None:
    """Runs ``python script args`` under the interpreter on the CPU; it must exit 0 and print ``expect``."""
    if not interpreter_runs_the_kernels():
        pytest.skip("this Triton's interpreter cannot run the kernels (3.9 or later can): the GPU tests cover them")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    assert expect in done.stdout
