"""fastad.kernels.i2corr: Triton kernel (interpreter on CPU, real on CUDA) and the lean torch
path against the plain float64 reference, every dtype, odd grids, shared and per-image keys."""
from __future__ import annotations

import os

import pytest
import torch

from fastad.kernels import i2corr_attention
from fastad.kernels.i2corr import i2corr_forward_lean, i2corr_forward_triton, i2corr_reference

# Per-dtype tolerances (atol, rtol) for out / kl / entropy against the fp64 reference.
# fp16/bf16: inputs are rounded the same way for both sides; the kernel's P·V product runs in
# the input dtype (as flash attention does), which bounds `out` by the dtype's resolution.
TOL = {
    torch.float32: {"out": (2e-5, 1e-4), "kl": (1e-4, 1e-4), "entropy": (1e-4, 1e-4)},
    torch.float16: {"out": (3e-3, 1e-2), "kl": (2e-3, 1e-3), "entropy": (2e-3, 1e-3)},
    torch.bfloat16: {"out": (2e-2, 2e-2), "kl": (5e-3, 2e-3), "entropy": (5e-3, 2e-3)},
}

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CAN_TRITON = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def make_inputs(b=2, h=2, grid=(7, 9), dh=32, dtype=torch.float32, shared_kv=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    q = torch.randn(b, h, n, dh, generator=g) * 1.5
    k = torch.randn(1 if shared_kv else b, h, n, dh, generator=g) * 1.5
    v = torch.randn(1 if shared_kv else b, h, n, dh, generator=g)
    # σ over FOD's whole range, including ~1e-5 (a one-hot target) and 2.
    choices = torch.tensor([1.1e-5, 1e-3, 0.3, 0.9, 2.0])
    sigma = choices[torch.randint(0, len(choices), (b, h, n, 2), generator=g)]
    cast = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), sigma.to(DEVICE), grid


def reference64(q, k, v, sigma, grid):
    """The plain reference in float64: the oracle every path is checked against."""
    return i2corr_reference(q.double(), k.double(), v.double(), sigma.double(), grid)


def check(result, ref, dtype):
    for name in ("out", "kl", "entropy"):
        got, want = getattr(result, name).double(), getattr(ref, name)
        atol, rtol = TOL[dtype][name]
        err = (got - want).abs()
        assert torch.all(err <= atol + rtol * want.abs()), f"{name}: max abs err {err.max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shared_kv", [False, True])
def test_lean_path_matches_reference(dtype, shared_kv):
    q, k, v, sigma, grid = make_inputs(dtype=dtype, shared_kv=shared_kv)
    ref = reference64(q, k, v, sigma, grid)
    scale = q.shape[-1] ** -0.5
    check(i2corr_forward_lean(q, k, v, sigma, grid, scale, True, block=16), ref, dtype)
    check(i2corr_forward_lean(q, k, v, sigma, grid, scale, True), ref, dtype)  # default block: all rows
    plain = i2corr_forward_lean(q, k, v, sigma, grid, scale, False)  # SDPA
    assert plain.kl is None
    atol, rtol = TOL[dtype]["out"]
    assert torch.allclose(plain.out.double(), ref.out, atol=atol, rtol=rtol)


def test_benchmark_eager_baseline_is_the_reference_formula():
    """bench/bench_kernels.py times the authors' formulation: it must compute the same numbers."""
    from bench.bench_kernels import eager_i2corr

    q, k, v, sigma, grid = make_inputs(grid=(10, 10))
    ref = reference64(q, k, v, sigma, grid)
    check(eager_i2corr(q, k, v, sigma, grid, q.shape[-1] ** -0.5, True), ref, torch.float32)


@pytest.mark.skipif(not CAN_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dh,grid,shared_kv", [(32, (7, 9), False), (64, (5, 13), True), (48, (4, 4), False)])
def test_triton_matches_reference(dtype, dh, grid, shared_kv):
    q, k, v, sigma, grid = make_inputs(grid=grid, dh=dh, dtype=dtype, shared_kv=shared_kv)
    ref = reference64(q, k, v, sigma, grid)
    res = i2corr_forward_triton(q, k, v, sigma, grid, dh ** -0.5, True, block_m=16, block_n=16)
    check(res, ref, dtype)
    plain = i2corr_forward_triton(q, k, v, sigma, grid, dh ** -0.5, False, block_m=16, block_n=16)
    assert plain.kl is None  # without statistics: SDPA
    torch.testing.assert_close(plain.out.double(), ref.out, atol=TOL[dtype]["out"][0], rtol=TOL[dtype]["out"][1])


def test_reference_matches_literal_formulas():
    """The reference against the formulas spelled out: Gaussian target normalised by its sum,
    kl(T, S) + kl(S, T) as two KLs, entropy — in float64."""
    q, k, v, sigma, grid = make_inputs(dtype=torch.float32)
    ref = reference64(q, k, v, sigma, grid)
    q, k, v, sigma = q.double(), k.double(), v.double(), sigma.double()
    attn = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
    n = torch.arange(grid[0] * grid[1])
    dr = ((n // grid[1])[:, None] - (n // grid[1])[None, :]).double() ** 2
    dc = ((n % grid[1])[:, None] - (n % grid[1])[None, :]).double() ** 2
    gauss = torch.exp(-dr / (2 * sigma[..., 0:1] ** 2) - dc / (2 * sigma[..., 1:2] ** 2))
    target = gauss / gauss.sum(-1, keepdim=True)

    def kl(p, r):
        return (p * (torch.log(p + 1e-4) - torch.log(r + 1e-4))).sum(-1)

    assert torch.allclose(attn @ v, ref.out, atol=1e-12)
    assert torch.allclose(kl(target, attn) + kl(attn, target), ref.kl, atol=1e-9)
    assert torch.allclose(-(attn * torch.log(attn + 1e-4)).sum(-1), ref.entropy, atol=1e-9)


def test_lean_blocks_do_not_change_numbers():
    """Any block size gives the same rows (fp64, so only the blocking could differ)."""
    q, k, v, sigma, grid = (t.double() if torch.is_tensor(t) else t for t in make_inputs(shared_kv=True))
    whole = i2corr_forward_lean(q, k, v, sigma, grid, 0.2, True, block=q.shape[2])
    for block in (3, 16):
        part = i2corr_forward_lean(q, k, v, sigma, grid, 0.2, True, block=block)
        for a, b in zip(part, whole):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_public_entry_point_and_errors():
    q, k, v, sigma, grid = make_inputs()
    res = i2corr_attention(q, k, v, sigma, grid, impl="lean")
    assert res.out.shape == q.shape and res.kl.shape == q.shape[:3] and res.kl.dtype == torch.float32
    assert i2corr_attention(q, k, v, sigma, grid, with_stats=False).kl is None
    with pytest.raises(ValueError, match="grid"):
        i2corr_attention(q, k, v, sigma, (7, 8))
    with pytest.raises(ValueError, match="sigma"):
        i2corr_attention(q, k, v, sigma[:, :, :5], grid)
    ref = i2corr_attention(q, k, v, sigma, grid, impl="reference")
    assert ref.out.dtype == q.dtype
    check(ref, reference64(q, k, v, sigma, grid), torch.float32)
    with pytest.raises(ValueError, match="impl"):
        i2corr_attention(q, k, v, sigma, grid, impl="cuda")
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            i2corr_attention(q, k, v, sigma, grid, impl="triton")
