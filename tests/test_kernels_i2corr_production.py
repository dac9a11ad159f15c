"""I2Correlation at production tile sizes (issue 14, item 5), against an independent float64
statement of the paper's formulas, and the launch grid for any B·H.

The other kernel tests run 16×16 tiles on N ≤ 65; here the GPU's tiles (passed explicitly, so
the interpreter runs them too) meet N = 1024 (16 query × 32 key tiles at the fp16 default of
64 × 32) and ragged N, in fp16, bf16 and fp32 with B = 2, and every autotune config the pruning
keeps (at Dh 32 or 64) runs once per dtype. Under the interpreter one case runs in `make test`
(the fp16 default at N = 1024); the rest are `slow` there (the interpreter's cost is per tile)
and run in full on a GPU (bench/gpu_session.sh).
"""
from __future__ import annotations

import math

import pytest
import torch

from fastad.kernels import i2corr_attention
from fastad.kernels.i2corr import (AUTOTUNE_CONFIGS, SIGMA_MIN, autotune_configs, gpu_launch,
                                   i2corr_forward_lean, i2corr_forward_triton, launch_grid,
                                   plain_attention)
from tests.test_kernels_i2corr import CAN_TRITON, DEVICE, TOL, check, reference64

needs_triton = pytest.mark.skipif(not CAN_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
slow_on_cpu = [pytest.mark.slow] if DEVICE == "cpu" else []  # the interpreter: seconds per case


def literal_float64(q, k, v, sigma, grid, scale):
    """FOD's I2Correlation written from the paper's definitions (Yao et al., ICCV 2023, Eq. 3–5,
    12, with the authors' +1e-4 inside the logs), in float64, sharing no code with the library:

        S = softmax(q kᵀ · scale),  out = S v
        G[i, j] = exp(−(r_i − r_j)²/(2σ_i0²) − (c_i − c_j)²/(2σ_i1²)) / (2π σ_i0 σ_i1),  T = G / Σ_j G
        kl = KL(T ‖ S) + KL(S ‖ T),  KL(P ‖ R) = Σ_j P (log(P + ε) − log(R + ε)),  entropy = −Σ_j S log(S + ε)

    The Gaussian is evaluated in log space before normalising (the 2π σσ prefactor cancels), as
    float64 would underflow G for σ ≈ 1e-5 otherwise — still one row-wise softmax of the exponent.
    """
    q, k, v, sigma = (t.double().cpu() for t in (q, k, v, sigma))
    s = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    hg, wg = grid
    rows = torch.tensor([n // wg for n in range(hg * wg)], dtype=torch.float64)
    cols = torch.tensor([n % wg for n in range(hg * wg)], dtype=torch.float64)
    dr2 = (rows[:, None] - rows[None, :]) ** 2
    dc2 = (cols[:, None] - cols[None, :]) ** 2
    log_g = -dr2 / (2 * sigma[..., 0:1] ** 2) - dc2 / (2 * sigma[..., 1:2] ** 2) \
        - torch.log(2 * math.pi * sigma[..., 0:1] * sigma[..., 1:2])
    t = torch.softmax(log_g, dim=-1)
    eps = 1e-4

    def kl(p, r):
        return (p * (torch.log(p + eps) - torch.log(r + eps))).sum(-1)

    return s @ v, kl(t, s) + kl(s, t), -(s * torch.log(s + eps)).sum(-1)


def production_inputs(b=2, h=1, grid=(32, 32), dh=32, dtype=torch.float16, seed=0):
    """Random q, k, v (shared k/v batch when b = 1 is asked for k) and σ: batch 0 spans FOD's
    whole range log-uniformly (SIGMA_MIN … 2), batch 1 has σ ≤ 0.9, so most of its key tiles are
    ≥ 14 grid rows from every query and skip the target (exactly 0 there)."""
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    q, k, v = (torch.randn(b, h, n, dh, generator=g) * s for s in (1.5, 1.5, 1.0))
    log_lo, log_hi = math.log(SIGMA_MIN), math.log(2.0)
    sigma = torch.exp(torch.empty(b, h, n, 2).uniform_(log_lo, log_hi, generator=g))
    if b > 1:
        sigma[1] = sigma[1].clamp_max(0.9)
    cast = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), sigma.to(DEVICE), grid


def tile_cases():
    """(dtype, grid, config): the GPU default at N = 1024 in make test (fp16, Dh 32); every
    config the autotuner may pick (Dh 32 or 64) once per dtype, and ragged N, behind `slow` on
    CPU (the interpreter ignores num_warps, so there configs differing only in warps repeat)."""
    default = gpu_launch(torch.float16, 32)
    yield pytest.param(torch.float16, (32, 32), default, id="fp16-N1024-default")
    seen = {(torch.float16, default)}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for c in autotune_configs(dtype, 32) + autotune_configs(dtype, 64):
            if (dtype, c) in seen:
                continue
            seen.add((dtype, c))
            yield pytest.param(dtype, (32, 32), c, marks=slow_on_cpu,
                               id=f"{str(dtype)[6:]}-N1024-{c.block_m}x{c.block_n}x{c.num_warps}")
    for dtype, grid in ((torch.float16, (25, 40)), (torch.bfloat16, (1, 257)), (torch.float32, (25, 40))):
        c = gpu_launch(dtype, 32)
        yield pytest.param(dtype, grid, c, marks=slow_on_cpu,
                           id=f"{str(dtype)[6:]}-N{grid[0] * grid[1]}-ragged")


@needs_triton
@pytest.mark.parametrize("dtype,grid,config", list(tile_cases()))
def test_triton_at_production_tiles(dtype, grid, config):
    q, k, v, sigma, grid = production_inputs(grid=grid, dtype=dtype)
    res = i2corr_forward_triton(q, k, v, sigma, grid, q.shape[-1] ** -0.5, True,
                                block_m=config.block_m, block_n=config.block_n, num_warps=config.num_warps)
    for name in ("out", "kl", "entropy"):
        assert torch.isfinite(getattr(res, name)).all(), name
    check(res, reference64(q, k, v, sigma, grid), dtype)


def test_every_autotune_config_is_covered_once():
    """The production cases above run each config the autotuner may pick, for every dtype."""
    covered = {(p.values[0], p.values[2]) for p in tile_cases()}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for dh in (32, 64):
            for c in autotune_configs(dtype, dh):
                assert (dtype, c) in covered, (dtype, c)
            assert gpu_launch(dtype, dh) in autotune_configs(dtype, dh)


# fp32: max abs error ≤ 1e-4 against the literal float64 formulas for out, kl and entropy.
LITERAL_ATOL = 1e-4


@pytest.mark.parametrize("impl", ["lean", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("grid,shared_kv", [((7, 9), False), ((12, 16), True)])
def test_fp32_matches_the_literal_float64_formulas(impl, grid, shared_kv):
    g = torch.Generator().manual_seed(1)
    b, h, dh = 2, 2, 32
    n = grid[0] * grid[1]
    q = torch.randn(b, h, n, dh, generator=g) * 1.5
    k, v = (torch.randn(1 if shared_kv else b, h, n, dh, generator=g) for _ in range(2))
    sigma = torch.exp(torch.empty(b, h, n, 2).uniform_(math.log(SIGMA_MIN), math.log(2.0), generator=g))
    res = i2corr_attention(*(t.to(DEVICE) for t in (q, k, v, sigma)), grid, impl=impl)  # default launch
    want = literal_float64(q, k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), sigma, grid, dh ** -0.5)
    for name, w in zip(("out", "kl", "entropy"), want):
        err = (getattr(res, name).double().cpu() - w).abs().max().item()
        assert err <= LITERAL_ATOL, f"{impl} {name}: max abs err {err:.3g}"


@pytest.mark.parametrize("impl", ["lean", pytest.param("triton", marks=needs_triton)])
def test_fp16_sigma_extremes_stay_finite(impl):
    """σ = 0 (what fp16 rounds FOD's smallest σ to), SIGMA_MIN, 2 and σ given in fp16: finite
    results that match fp32 on the same rounded inputs."""
    q, k, v, _, grid = production_inputs(b=2, h=2, grid=(8, 12), dtype=torch.float16)
    sigma = torch.tensor([0.0, SIGMA_MIN, 2.0], device=DEVICE)[torch.arange(q.shape[2] * 2 * 2 * 2) % 3]
    sigma = sigma.reshape(2, 2, q.shape[2], 2).half()
    res = i2corr_attention(q, k, v, sigma, grid, impl=impl)
    ref = i2corr_attention(q.float(), k.float(), v.float(), sigma.float(), grid, impl="reference")
    for name in ("out", "kl", "entropy"):
        got = getattr(res, name).float()
        assert torch.isfinite(got).all(), name
        atol, rtol = TOL[torch.float16][name]
        torch.testing.assert_close(got, getattr(ref, name).float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("impl", ["lean", pytest.param("triton", marks=needs_triton)])
def test_without_stats_is_sdpa(impl):
    q, k, v, sigma, grid = production_inputs(b=2, h=2, grid=(4, 5), dtype=torch.float32)
    res = i2corr_attention(q, k[:1], v[:1], sigma, grid, with_stats=False, impl=impl)
    assert res.kl is None and torch.equal(res.out, plain_attention(q, k[:1], v[:1], q.shape[-1] ** -0.5))


def test_launch_grid_fits_any_batch_times_heads():
    """B·H > 65535 (CUDA's cap on grid axes 1 and 2): one axis of query tiles × B·H, and the
    kernel's own decomposition (`_tile_of_program`, run here as Python) maps every program to a
    distinct (query tile, batch·head) inside the bounds."""
    pytest.importorskip("triton")
    from fastad.kernels.i2corr import _tile_of_program

    split = _tile_of_program.fn
    for n, bh, block_m in ((1024, 70_000, 64), (16_384, 2 * 65_536 + 3, 128), (257, 65_537, 64)):
        (programs,) = launch_grid(n, bh, block_m)
        tiles = -(-n // block_m)
        assert programs == tiles * bh and programs <= 2 ** 31 - 1
        for pid in (0, 1, tiles - 1, tiles, programs // 2, programs - tiles, programs - 1):
            m, head = split(pid, tiles)
            assert 0 <= m < tiles and 0 <= head < bh and head * tiles + m == pid
    seen = {split(pid, 3) for pid in range(3 * 5)}  # small: every pair exactly once
    assert seen == {(m, head) for m in range(3) for head in range(5)}
    with pytest.raises(ValueError, match="grid limit"):
        launch_grid(16_384, 2 ** 24, 64)


def test_autotuner_prunes_with_the_named_predicate():
    """The GPU autotuner's early_config_prune keeps exactly `autotune_configs` for each dtype."""
    triton = pytest.importorskip("triton")
    from fastad.kernels.i2corr import dot_precision, prune_spilling

    configs = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps)
               for c in AUTOTUNE_CONFIGS]
    for dtype in (torch.float32, torch.float16):
        for dh in (32, 64):
            kept = prune_spilling(configs, {}, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                                  HEAD_DIM=dh)
            got = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in kept]
            assert got == [tuple(c) for c in autotune_configs(dtype, dh)] and got, (dtype, dh)
    assert dot_precision(torch.float32) == "ieee"
