"""Backend choice for mmkit kernels: Triton on CUDA when it imports, the torch reference everywhere else.

`MMKIT_KERNEL_BACKEND=torch|triton|auto` overrides the choice for every op. `TRITON_INTERPRET=1` (Triton's own
CPU interpreter) lets the Triton backend run on CPU tensors, which is how the kernels are tested without a GPU.
Importing this module never imports triton; the check runs on the first call and is cached.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

logger = logging.getLogger(__name__)

ENV_BACKEND = "MMKIT_KERNEL_BACKEND"
BACKENDS = ("torch", "triton")
_logged: set[tuple[str, str]] = set()


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when `import triton` succeeds (cached: a failed import is not retried)."""
    try:
        importlib.import_module("triton")
    except Exception as exc:  # a broken install raises more than ImportError; any failure means "not usable"
        logger.debug("triton is not importable: %s", exc)
        return False
    return True


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on (read live: tests toggle it)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_run_triton(tensor: torch.Tensor) -> bool:
    """Whether the Triton backend can run on `tensor`'s device: CUDA, or any device under the interpreter."""
    return triton_available() and (tensor.is_cuda or (interpreter_enabled() and tensor.device.type == "cpu"))


def _override() -> str | None:
    value = os.environ.get(ENV_BACKEND, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={value!r} is not valid; use one of torch, triton, auto")
    return value


def choose_backend(tensor: torch.Tensor, op_name: str) -> str:
    """Pick "triton" or "torch" for running `op_name` on `tensor`, logging each (op, backend) pair once.

    Raises RuntimeError when `MMKIT_KERNEL_BACKEND=triton` forces a backend that cannot run here.
    """
    forced = _override()
    if forced == "triton" and not can_run_triton(tensor):
        raise RuntimeError(
            f"{ENV_BACKEND}=triton but {op_name} cannot use Triton on a {tensor.device.type} tensor "
            f"(triton importable: {triton_available()}); unset it or set TRITON_INTERPRET=1 for CPU"
        )
    if forced is not None:
        backend, why = forced, f"{ENV_BACKEND}={forced}"
    elif can_run_triton(tensor):
        backend, why = "triton", f"{tensor.device.type} tensor, triton importable"
    else:
        backend, why = "torch", ("triton not importable" if not triton_available() else f"{tensor.device.type} tensor")
    if (op_name, backend) not in _logged:
        _logged.add((op_name, backend))
        logger.info("mmkit.kernels: %s uses the %s backend (%s)", op_name, backend, why)
    return backend
