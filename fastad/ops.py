"""The hot ops the models call, and the one place that picks their implementation.

A model is built with `impl=` (one of IMPLS; training always uses "reference") and passes it to
every op call; this module maps it onto `fastad.kernels`, the only importer of that package in
fastad. FOD's training I2Correlation (every query row, with gradients) goes through
`i2corr_training` whatever the impl: the differentiable branch of `fastad.kernels.i2corr_grad`,
whose implementation follows the tensors' device (`training_impl`).

    reference  the formulas as written in torch — what training, the parity tests and the ONNX
               export use. I2Correlation runs in blocks of 256 query rows (the kernels' blocked
               path), so no exported tensor holds B·H·N² elements.
    lean       memory-lean torch: I2Correlation in cache-sized blocks, SDPA where no statistics
               are needed.
    triton     fused Triton kernels (CUDA; the CPU interpreter under TRITON_INTERPRET=1 in tests).

User-facing backend names map onto these through `fastad.backends.IMPL_OF_BACKEND`.
"""
from __future__ import annotations

import torch

from fastad.backends import IMPL_OF_BACKEND
from fastad.errors import FastADError
from fastad.kernels import IMPLS, I2CorrOutput
from fastad.kernels import feature_distance as _feature_distance
from fastad.kernels import i2corr_attention as _i2corr_attention
from fastad.kernels._impl import interpreting, triton
from fastad.kernels.i2corr import (LOG_EPS, SIGMA_MIN, at_least_fp32, attn_entropy,  # noqa: F401
                                   patch_positions, rbf_target_at, safe_sigma, sym_kl)

# Query rows per block of the reference I2Correlation (the graph the ONNX export was built around).
REFERENCE_BLOCK = 256


def check_impl(impl: str) -> str:
    """A known implementation name, else a FastADError that lists them."""
    if impl not in IMPLS:
        raise FastADError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    return impl


def impl_of_backend(backend: str) -> str:
    """Run-directory backend name ("torch", "torch-lean", "triton") -> impl."""
    if backend not in IMPL_OF_BACKEND:
        raise FastADError(f"backend must be one of {', '.join(IMPL_OF_BACKEND)}, got {backend!r}")
    return IMPL_OF_BACKEND[backend]


def set_impl(model: torch.nn.Module, impl: str) -> torch.nn.Module:
    """Rebind a built model to another implementation of its hot ops; weights, buffers and
    everything else stay. "triton" needs the model on CUDA (or TRITON_INTERPRET=1)."""
    check_impl(impl)
    if impl == "triton":
        device = next(model.parameters()).device
        _require_triton_device(device)
    model.impl = impl
    return model


def _require_triton_device(device: torch.device) -> None:
    if triton is None:
        raise FastADError("impl 'triton' needs the triton package (use 'lean')")
    if device.type != "cuda" and not interpreting():
        raise FastADError(f"impl 'triton' needs a CUDA device, the model is on {device} (use 'lean' on CPU)")


def i2corr_attention(q, k, v, sigma, grid, *, scale: float, with_stats: bool, impl: str) -> I2CorrOutput:
    """One I2Correlation branch (see `fastad.kernels.i2corr`): q (B, H, N, Dh), k, v (B or 1, H,
    N, Dh), σ (B, H, N, 2) -> out (B, H, N, Dh), kl and entropy (B, H, N) with `with_stats`."""
    if impl == "reference":
        return _i2corr_attention(q, k, v, sigma, grid, scale=scale, with_stats=with_stats, impl="lean",
                                 block=REFERENCE_BLOCK)
    return _i2corr_attention(q, k, v, sigma, grid, scale=scale, with_stats=with_stats, impl=impl)


def training_impl(device: torch.device) -> str:
    """The one switch for FOD training's I2Correlation branch: the Triton kernels (forward with
    statistics, dk/dv and dq backward) on CUDA, the lean blocked torch function elsewhere (the
    interpreter is for tests, far too slow to train with)."""
    return "triton" if device.type == "cuda" and triton is not None else "lean"


def i2corr_training(q, k, v, sigma, grid, *, scale: float, compiled: bool = False):
    """One I2Correlation branch for training, differentiable in q, k, v and σ in O(N) memory
    (`fastad.kernels.i2corr_grad`) -> (out, kl, kl_target, entropy) (B, H, N[, Dh]): `kl` reaches
    the attention only, `kl_target` σ only (FOD's Div¹ and Div²). The implementation follows the
    device (`training_impl`), whatever the model's inference impl; `compiled`: the lean path's
    blocks through torch.compile."""
    return _i2corr_attention(q, k, v, sigma, grid, scale=scale, with_stats=True, impl=training_impl(q.device),
                             kl_grad="split", compiled=compiled)


def feature_distance(x, x_hat, *, kind: str, weight=None, impl: str) -> torch.Tensor:
    """Per-patch distance (B, N) of features (B, N, C): "mse_cos" or "l2" (see
    `fastad.kernels.feature_distance`)."""
    return _feature_distance(x, x_hat, kind=kind, weight=weight, impl=impl)


__all__ = ["IMPLS", "REFERENCE_BLOCK", "check_impl", "impl_of_backend", "set_impl", "i2corr_attention",
           "i2corr_training", "training_impl",
           "feature_distance", "rbf_target_at", "sym_kl", "attn_entropy", "patch_positions",
           "at_least_fp32", "safe_sigma", "LOG_EPS", "SIGMA_MIN"]
