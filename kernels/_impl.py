"""The implementation names every kernel understands, and the rule for Triton: explicit `impl=`,
no import-time symbol swapping, and Triton only where it can run."""
from __future__ import annotations

import os

import torch

try:  # Triton is optional at import time: the torch paths work without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA torch wheels
    triton = tl = None

IMPLS = ("reference", "lean", "triton")


def interpreting() -> bool:
    """Triton's CPU interpreter is on (TRITON_INTERPRET=1, read when kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_impl(impl: str, tensor: torch.Tensor) -> str:
    """A known impl; "triton" needs the triton package and CUDA tensors (or the interpreter on
    CPU). Errors name the fix."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton":
        if triton is None:
            raise RuntimeError("impl='triton' needs the triton package (use impl='lean')")
        if not tensor.is_cuda and not interpreting():
            raise RuntimeError("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 on CPU "
                               "(use impl='lean' on CPU)")
    return impl
