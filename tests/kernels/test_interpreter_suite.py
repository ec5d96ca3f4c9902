"""Runs test_triton_interpreter.py in a fresh process with TRITON_INTERPRET=1 (see that module for why)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process already runs the interpreter module in-process")
    here = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("MMKIT_KERNEL_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "test_triton_interpreter.py")],
        cwd=here.parents[1], env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
