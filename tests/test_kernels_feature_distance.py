"""fastad.kernels.feature_distance: fused kernel and multi-level maps vs plain torch formulas."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from fastad.kernels.feature_distance import (feature_distance_map, feature_distance_triton,
                                             multi_level_distance_map)
from fastad.models.fod import reconstruction_score

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


def test_torch_path_equals_fod_score():
    x, xh = torch.randn(2, 50, 40), torch.randn(2, 50, 40)
    assert torch.allclose(feature_distance_map(x, xh, backend="torch"), reconstruction_score(x, xh), atol=1e-6)
    assert torch.allclose(feature_distance_map(x, xh, backend="torch").double(), plain(x, xh), atol=1e-5)


def test_zero_vectors_do_not_make_nan():
    x = torch.zeros(1, 4, 8)
    assert torch.isfinite(feature_distance_map(x, x, backend="torch")).all()
    if CAN_TRITON:
        assert torch.isfinite(feature_distance_triton(x.to(DEVICE), x.to(DEVICE))).all()


def test_multi_level_map():
    g = torch.Generator().manual_seed(0)
    lv = [(torch.randn(2, 16, 5, generator=g), torch.randn(2, 16, 5, generator=g)),
          (torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g))]
    grids = [(4, 4), (2, 2)]
    got = multi_level_distance_map(lv, grids, (32, 32), backend="torch")
    ups = [F.interpolate(plain(a, b).float().view(2, 1, *gr), size=(32, 32), mode="bilinear", align_corners=True)
           for (a, b), gr in zip(lv, grids)]
    assert torch.allclose(got, (ups[0] + ups[1])[:, 0] / 2, atol=1e-5)
    summed = multi_level_distance_map(lv, grids, (32, 32), reduce="sum", backend="torch")
    assert torch.allclose(summed, 2 * got, atol=1e-5)
    with pytest.raises(ValueError, match="grid"):
        multi_level_distance_map(lv, [(3, 3), (2, 2)], (32, 32))


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
        got = feature_distance_triton(x, xh, weight, metric="l2").double()
        want = (x.double() - xh.double()).pow(2).sum(-1).sqrt()
        want = want if weight is None else want * weight.double()
        assert torch.allclose(got, want, atol=atol, rtol=rtol), (got - want).abs().max()


def test_l2_torch_path_and_bad_metric():
    x, xh = torch.randn(2, 50, 40), torch.randn(2, 50, 40)
    assert torch.allclose(feature_distance_map(x, xh, metric="l2", backend="torch"), (x - xh).norm(dim=-1), atol=1e-5)
    assert torch.isfinite(feature_distance_map(x, x, metric="l2", backend="torch")).all()
    with pytest.raises(ValueError, match="metric"):
        feature_distance_map(x, xh, metric="cosine")
