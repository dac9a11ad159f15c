"""pytest-benchmark suite for FOD inference's hot functions (not part of `make test`).

    .venv/bin/python -m pytest bench/test_hot_functions.py --benchmark-only [--benchmark-json out.json]

Shapes are those of the default model at 256² input (level 0: N = 1024 patches, 8 heads of 32).
Compare the rows of one run (ratios), not absolute times across machines. On CUDA the fused
Triton kernels are included.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastad.kernels import feature_distance, i2corr_attention
from fastad.kernels.i2corr import patch_positions, rbf_target_at, sym_kl
from fastad.layers import GaussianBlur
from fastad.preprocess import prepare_batch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["lean"] + (["triton"] if DEVICE == "cuda" else [])


def _sync(fn):
    def run():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out
    return run


@pytest.fixture(scope="module")
def level0():
    g = torch.Generator().manual_seed(0)
    b, h, n, dh = 2, 8, 1024, 32
    q, k, v = (torch.randn(b, h, n, dh, generator=g).to(DEVICE) for _ in range(3))
    sigma = (torch.rand(b, h, n, 2, generator=g) * 2 + 0.1).to(DEVICE)
    return q, k, v, sigma, (32, 32)


def test_i2corr_materialised(benchmark, level0):
    """The formulas with everything materialised: full (B, H, N, N) attention, target and sym-KL."""
    q, k, v, sigma, grid = level0

    def run():
        attn = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
        return attn @ v, sym_kl(rbf_target_at(sigma, *patch_positions(grid, q.device), grid), attn)

    benchmark(_sync(run))


@pytest.mark.parametrize("impl", IMPLS)
def test_i2corr_kernel(benchmark, level0, impl):
    q, k, v, sigma, grid = level0
    benchmark(_sync(lambda: i2corr_attention(q, k, v, sigma, grid, with_stats=True, impl=impl)))


@pytest.mark.parametrize("impl", IMPLS)
def test_feature_distance(benchmark, impl):
    x = torch.randn(8, 1024, 40, device=DEVICE)
    benchmark(_sync(lambda: feature_distance(x, x + 0.1, weight=torch.rand(8, 1024, device=DEVICE), impl=impl)))


def test_blur_256(benchmark):
    blur = GaussianBlur(4.0, 256).to(DEVICE)
    maps = torch.rand(8, 256, 256, device=DEVICE)
    benchmark(_sync(lambda: blur(maps)))


def test_preprocess_uint8_any_size(benchmark):
    images = [np.random.default_rng(i).integers(0, 255, (900, 900, 3), dtype=np.uint8) for i in range(8)]
    benchmark(lambda: prepare_batch(images, 256, 256))
