"""Backend choice shared by the kernels: explicit `backend=`, no import-time symbol swapping."""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """Triton's CPU interpreter is on (TRITON_INTERPRET=1, read when kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pick_backend(backend: str, tensor: torch.Tensor, has_triton: bool) -> str:
    """"auto" -> "triton" on CUDA tensors when Triton is installed, else "torch". An explicit
    "triton" on CPU tensors needs the interpreter; errors name the fix."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if (tensor.is_cuda and has_triton) else "torch"
    if backend == "triton":
        if not has_triton:
            raise RuntimeError("backend='triton' needs the triton package")
        if not tensor.is_cuda and not interpreting():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (or use backend='torch')")
    return backend
