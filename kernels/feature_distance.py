"""Per-patch feature distance, fused over channels. Two kinds:

    kind="mse_cos":  d[b, n] = (1/C) Σ_c (x − x̂)²  +  1 − cos(x, x̂)     (× weight[b, n] when given)
    kind="l2":       d[b, n] = sqrt(Σ_c (x − x̂)²)                        (× weight[b, n] when given)

with cos(x, x̂) = Σ x x̂ / max(‖x‖·‖x̂‖, 1e-8), as `torch.nn.functional.cosine_similarity`.
"mse_cos" is FOD's reconstruction score (authors' `trainer.py`: MSE(reduction='none').mean(-1) +
1 − CosineSimilarity) and UTAD's perceptual distance; "l2" is ADTR's per-position score. The
Triton kernel accumulates Σ(x − x̂)² (and for "mse_cos" Σ x x̂, Σ x², Σ x̂²) in fp32 in one pass
over the channels — no (B, N, C) temporaries.

Read top-down: Triton kernel → launcher → torch formula → public function. The torch formula is
both the plain reference and the lean path: it is one fused reduction per term already, so a
blocked variant would only add code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._impl import check_impl, tl, triton

COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default eps
KINDS = ("mse_cos", "l2")

if triton is not None:
    # The same eps for the kernel: a GPU build reads only constexpr globals.
    TL_COS_EPS: tl.constexpr = tl.constexpr(COS_EPS)

    @triton.jit
    def _feature_distance_fwd_kernel(X, Xh, W, Out, R, C, sxr, sxc, shr, shc,
                                     HAS_WEIGHT: tl.constexpr, L2: tl.constexpr, BLOCK_R: tl.constexpr,
                                     BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        rows64 = rows.to(tl.int64)
        sq = tl.zeros([BLOCK_R], tl.float32)
        dot = tl.zeros([BLOCK_R], tl.float32)
        n1 = tl.zeros([BLOCK_R], tl.float32)
        n2 = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, C, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            mask = row_ok[:, None] & (cols < C)[None, :]
            a = tl.load(X + rows64[:, None] * sxr + cols[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(Xh + rows64[:, None] * shr + cols[None, :] * shc, mask=mask, other=0.0).to(tl.float32)
            diff = a - b
            sq += tl.sum(diff * diff, 1)
            if not L2:
                dot += tl.sum(a * b, 1)
                n1 += tl.sum(a * a, 1)
                n2 += tl.sum(b * b, 1)
        if L2:
            d = tl.sqrt(sq)
        else:
            cos = dot / tl.maximum(tl.sqrt(n1 * n2), TL_COS_EPS)
            d = sq / C + 1.0 - cos
        if HAS_WEIGHT:
            d = d * tl.load(W + rows64, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(Out + rows64, d, mask=row_ok)


def feature_distance_triton(x: torch.Tensor, x_hat: torch.Tensor, weight: torch.Tensor | None = None,
                            kind: str = "mse_cos", block_r: int = 32, num_warps: int = 8) -> torch.Tensor:
    """Launch the fused kernel: x, x̂ (B, N, C) any float dtype -> (B, N) fp32.

    8 warps: with 4, a 32×128 tile of the "mse_cos" kind spills registers on sm_80–sm_90
    (bench/results/kernels-aot.md)."""
    b, n, c = x.shape
    x2, h2 = x.reshape(b * n, c), x_hat.reshape(b * n, c)
    out = torch.empty(b * n, device=x.device, dtype=torch.float32)
    w = weight.reshape(b * n).contiguous() if weight is not None else out
    block_c = min(128, triton.next_power_of_2(c))
    _feature_distance_fwd_kernel[(triton.cdiv(b * n, block_r),)](
        x2, h2, w, out, b * n, c, *x2.stride(), *h2.stride(),
        HAS_WEIGHT=weight is not None, L2=kind == "l2", BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out.view(b, n)


def feature_distance_torch(x: torch.Tensor, x_hat: torch.Tensor, weight: torch.Tensor | None = None,
                           kind: str = "mse_cos") -> torch.Tensor:
    """The formula with torch ops, in the inputs' dtype (what the models' reference ops and their
    exported graphs compute); also the reference the kernel is tested against."""
    if kind == "l2":
        d = ((x - x_hat) ** 2).sum(-1).sqrt()
    else:
        d = ((x - x_hat) ** 2).mean(-1) + 1 - F.cosine_similarity(x, x_hat, dim=-1, eps=COS_EPS)
    return d if weight is None else d * weight


def feature_distance(x: torch.Tensor, x_hat: torch.Tensor, *, kind: str = "mse_cos",
                     weight: torch.Tensor | None = None, impl: str = "lean") -> torch.Tensor:
    """Per-patch distance (B, N) from features x, x̂ (B, N, C); optional weight (B, N).

    kind: "mse_cos" (MSE + 1 − cos) or "l2" (‖x − x̂‖₂). impl: "reference" / "lean" (the torch
    formula, in the inputs' dtype) or "triton" (CUDA, or CPU under TRITON_INTERPRET=1; fp32 out).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if x.dim() != 3 or x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must both be (B, N, C), got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    if weight is not None and weight.shape != x.shape[:2]:
        raise ValueError(f"weight must be (B, N) = {tuple(x.shape[:2])}, got {tuple(weight.shape)}")
    if check_impl(impl, x) == "triton":
        return feature_distance_triton(x, x_hat, weight, kind)
    return feature_distance_torch(x, x_hat, weight, kind)


__all__ = ["feature_distance", "feature_distance_torch", "feature_distance_triton", "KINDS"]
