"""Layers shared by the models: the Gaussian blur of the final anomaly map and the fixed 2-D
sin/cos position code. Plain torch, no model knowledge."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter's 1-D kernel: radius = int(truncate·σ + 0.5), normalised."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def symmetric_pad_index(size: int, radius: int) -> torch.Tensor:
    """Gather indices padding a length-`size` axis by `radius` with scipy's 'reflect' rule
    (d c b a | a b c d | d c b a), valid for any radius (repeats the reflection)."""
    idx = torch.arange(-radius, size + radius)
    period = 2 * size
    idx = torch.remainder(idx, period)
    return torch.where(idx >= size, period - 1 - idx, idx)


class GaussianBlur(nn.Module):
    """Separable Gaussian blur equal to scipy.ndimage.gaussian_filter(sigma, mode='reflect')."""

    def __init__(self, sigma: float, size: int):
        super().__init__()
        kernel = gaussian_kernel1d(sigma)
        self.radius = (kernel.numel() - 1) // 2
        self.register_buffer("kernel", kernel, persistent=False)
        self.register_buffer("pad_index", symmetric_pad_index(size, self.radius), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:  # (B, S, S) -> (B, S, S)
        x = maps.unsqueeze(1)
        k = self.kernel.to(x.dtype)
        x = x.index_select(3, self.pad_index)
        x = F.conv2d(x, k.view(1, 1, 1, -1))
        x = x.index_select(2, self.pad_index)
        x = F.conv2d(x, k.view(1, 1, -1, 1))
        return x[:, 0]  # not squeeze(1): that exports as an If on the dynamic batch


def sincos_position_code(d_model: int, h: int, w: int) -> torch.Tensor:
    """The authors' fixed 2-D sin/cos code, (h*w, d): first half encodes the column, second the row."""
    if d_model % 4:
        raise ValueError(f"sin/cos position code needs d_model % 4 == 0, got {d_model}")
    half = d_model // 2
    div = torch.exp(torch.arange(0.0, half, 2) * -(math.log(1e4) / half))  # (half/2,)
    pe = torch.zeros(d_model, h, w)
    col = torch.arange(w, dtype=torch.float32)[:, None] * div  # (w, half/2)
    row = torch.arange(h, dtype=torch.float32)[:, None] * div
    pe[0:half:2] = torch.sin(col).T[:, None, :].expand(-1, h, -1)
    pe[1:half:2] = torch.cos(col).T[:, None, :].expand(-1, h, -1)
    pe[half::2] = torch.sin(row).T[:, :, None].expand(-1, -1, w)
    pe[half + 1::2] = torch.cos(row).T[:, :, None].expand(-1, -1, w)
    return pe.flatten(1).T.contiguous()
