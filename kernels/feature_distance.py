"""Per-patch feature reconstruction distance, fused over channels. Two metrics:

    metric="fod":  d[b, n] = (1/C) Σ_c (x − x̂)²  +  1 − cos(x, x̂)     (× weight[b, n] when given)
    metric="l2":   d[b, n] = sqrt(Σ_c (x − x̂)²)                        (× weight[b, n] when given)

with cos(x, x̂) = Σ x x̂ / max(‖x‖·‖x̂‖, 1e-8), as `torch.nn.functional.cosine_similarity`.
"fod" is FOD's reconstruction score (authors' `trainer.py`: MSE(reduction='none').mean(-1) +
1 − CosineSimilarity), weighted by the inter-correlation weight; "l2" is ADTR's per-position
score (the L2 norm of f − f̂ over channels, `fastad.models.adtr.l2_distance`). UTAD's per-level
maps use the multi-level form. One pass over the channels accumulates Σ(x − x̂)² (and for "fod"
Σ x x̂, Σ x², Σ x̂²) in fp32 — no (B, N, C) temporaries.

Read top-down: Triton kernel → launcher → torch path/reference → public functions.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ._backend import pick_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default eps
METRICS = ("fod", "l2")

if triton is not None:

    @triton.jit
    def _feature_distance_kernel(X, Xh, W, Out, R, C, sxr, sxc, shr, shc,
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
            cos = dot / tl.maximum(tl.sqrt(n1 * n2), COS_EPS)
            d = sq / C + 1.0 - cos
        if HAS_WEIGHT:
            d = d * tl.load(W + rows64, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(Out + rows64, d, mask=row_ok)


def feature_distance_triton(x: torch.Tensor, x_hat: torch.Tensor, weight: torch.Tensor | None = None,
                            block_r: int = 32, metric: str = "fod") -> torch.Tensor:
    b, n, c = x.shape
    x2, h2 = x.reshape(b * n, c), x_hat.reshape(b * n, c)
    out = torch.empty(b * n, device=x.device, dtype=torch.float32)
    w = weight.reshape(b * n).contiguous() if weight is not None else out
    block_c = min(128, triton.next_power_of_2(c))
    _feature_distance_kernel[(triton.cdiv(b * n, block_r),)](
        x2, h2, w, out, b * n, c, *x2.stride(), *h2.stride(),
        HAS_WEIGHT=weight is not None, L2=metric == "l2", BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return out.view(b, n)


def feature_distance_torch(x: torch.Tensor, x_hat: torch.Tensor, weight: torch.Tensor | None = None,
                           metric: str = "fod") -> torch.Tensor:
    """The formula with torch ops (fp32): also the reference the kernel is tested against."""
    x, x_hat = x.float(), x_hat.float()
    if metric == "l2":
        d = ((x - x_hat) ** 2).sum(-1).sqrt()
    else:
        d = ((x - x_hat) ** 2).mean(-1) + 1 - F.cosine_similarity(x, x_hat, dim=-1, eps=COS_EPS)
    return d if weight is None else d * weight.float()


def feature_distance_map(x: torch.Tensor, x_hat: torch.Tensor, *, weight: torch.Tensor | None = None,
                         metric: str = "fod", backend: str = "auto") -> torch.Tensor:
    """Per-patch distance (B, N) fp32 from features x, x̂ (B, N, C); optional weight (B, N).
    metric: "fod" (MSE + 1 − cos) or "l2" (‖x − x̂‖₂); backend: "triton" (CUDA, or CPU under
    TRITON_INTERPRET=1), "torch", "auto"."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if x.dim() != 3 or x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must both be (B, N, C), got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    if weight is not None and weight.shape != x.shape[:2]:
        raise ValueError(f"weight must be (B, N) = {tuple(x.shape[:2])}, got {tuple(weight.shape)}")
    if pick_backend(backend, x, triton is not None) == "triton":
        return feature_distance_triton(x, x_hat, weight, metric=metric)
    return feature_distance_torch(x, x_hat, weight, metric=metric)


def multi_level_distance_map(
    levels: Sequence[tuple[torch.Tensor, torch.Tensor]],
    grids: Sequence[tuple[int, int]],
    size: tuple[int, int],
    *,
    weights: Sequence[torch.Tensor | None] | None = None,
    reduce: str = "mean",
    metric: str = "fod",
    backend: str = "auto",
) -> torch.Tensor:
    """Per-level distances -> bilinear upsample (align_corners=True) to `size` -> mean or sum.

    levels: [(x_l, x̂_l)] each (B, N_l, C_l) with N_l = grid_l[0]·grid_l[1]. -> (B, H, W) fp32.
    """
    if len(levels) != len(grids) or not levels:
        raise ValueError("need one grid per level and at least one level")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be mean or sum, got {reduce!r}")
    weights = list(weights) if weights is not None else [None] * len(levels)
    total = None
    for (x, x_hat), grid, w in zip(levels, grids, weights):
        if x.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"grid {tuple(grid)} does not hold N = {x.shape[1]} patches")
        d = feature_distance_map(x, x_hat, weight=w, metric=metric, backend=backend)
        up = F.interpolate(d.view(d.shape[0], 1, *grid), size=size, mode="bilinear", align_corners=True)[:, 0]
        total = up if total is None else total + up
    return total / len(levels) if reduce == "mean" else total


__all__ = ["feature_distance_map", "multi_level_distance_map", "feature_distance_torch",
           "feature_distance_triton"]
