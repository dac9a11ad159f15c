"""fastad.kernels.feature_distance: fused kernel and torch formula vs plain float64 formulas."""
from __future__ import annotations

import os

import pytest
import torch

from fastad.kernels import feature_distance
from fastad.kernels.feature_distance import feature_distance_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CAN_TRITON = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 1e-4), torch.bfloat16: (1e-4, 1e-4)}


def plain(x, x_hat, weight=None):
    """The formula spelled out in float64."""
    x, x_hat = x.double(), x_hat.double()
    mse = ((x - x_hat) ** 2).mean(-1)
    cos = (x * x_hat).sum(-1) / torch.clamp((x.norm(dim=-1) * x_hat.norm(dim=-1)), min=1e-8)
    d = mse + 1 - cos
    return d if weight is None else d * weight.double()


@pytest.mark.skipif(not CAN_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c", [40, 112, 300])
def test_triton_matches_plain(dtype, c):
    g = torch.Generator().manual_seed(c)
    x = (torch.randn(2, 37, c, generator=g) * 3).to(DEVICE, dtype)
    xh = (x.float() + torch.randn(2, 37, c, generator=g).to(DEVICE)).to(dtype)
    w = torch.rand(2, 37, generator=g).to(DEVICE)
    atol, rtol = TOL[dtype]
    for weight in (None, w):
        got = feature_distance_triton(x, xh, weight).double()
        want = plain(x, xh, weight)
        assert torch.allclose(got, want, atol=atol, rtol=rtol), (got - want).abs().max()


@pytest.mark.parametrize("impl", ["reference", "lean"])
def test_torch_path_matches_plain(impl):
    x, xh, w = torch.randn(2, 50, 40), torch.randn(2, 50, 40), torch.rand(2, 50)
    assert torch.allclose(feature_distance(x, xh, impl=impl).double(), plain(x, xh), atol=1e-5)
    assert torch.allclose(feature_distance(x, xh, weight=w, impl=impl).double(), plain(x, xh, w), atol=1e-5)


def test_zero_vectors_do_not_make_nan():
    x = torch.zeros(1, 4, 8)
    assert torch.isfinite(feature_distance(x, x, impl="reference")).all()
    if CAN_TRITON:
        assert torch.isfinite(feature_distance_triton(x.to(DEVICE), x.to(DEVICE))).all()


@pytest.mark.skipif(not CAN_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c", [40, 176, 300])
def test_triton_l2_matches_plain(dtype, c):
    """ADTR's metric: sqrt(Σ_c (x − x̂)²), optionally weighted."""
    g = torch.Generator().manual_seed(c + 1)
    x = (torch.randn(2, 37, c, generator=g) * 3).to(DEVICE, dtype)
    xh = (x.float() + torch.randn(2, 37, c, generator=g).to(DEVICE)).to(dtype)
    w = torch.rand(2, 37, generator=g).to(DEVICE)
    atol, rtol = TOL[dtype]
    for weight in (None, w):
        got = feature_distance_triton(x, xh, weight, kind="l2").double()
        want = (x.double() - xh.double()).pow(2).sum(-1).sqrt()
        want = want if weight is None else want * weight.double()
        assert torch.allclose(got, want, atol=atol, rtol=rtol), (got - want).abs().max()


def test_l2_torch_path_and_bad_arguments():
    x, xh = torch.randn(2, 50, 40), torch.randn(2, 50, 40)
    assert torch.allclose(feature_distance(x, xh, kind="l2", impl="reference"), (x - xh).norm(dim=-1), atol=1e-5)
    assert torch.isfinite(feature_distance(x, x, kind="l2", impl="reference")).all()
    with pytest.raises(ValueError, match="kind"):
        feature_distance(x, xh, kind="cosine")
    with pytest.raises(ValueError, match="impl"):
        feature_distance(x, xh, impl="torch")
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            feature_distance(x, xh, impl="triton")
