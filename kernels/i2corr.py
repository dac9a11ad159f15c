"""Fused I2Correlation attention with the RBF target, symmetric KL and entropy (FOD, inference).

Read top-down: the Triton kernel → its launcher → the torch formulas (RBF target, divergences;
also FOD's training statistics) → the lean blocked torch path → the plain reference → the public
`i2corr_attention`.

For one head and query row i (patch i at row r_i = i // W, column c_i = i % W of the grid):

    S[i, j]  = softmax_j(q_i · k_j · scale)                          attention, over M = N keys
    out[i]   = Σ_j S[i, j] v_j
    T̂[i, j]  = exp(−(r_i − r_j)²/(2σ_i0²) − (c_i − c_j)²/(2σ_i1²)) / Σ_j (same)   RBF target
    kl[i]    = Σ_j T̂ (log(T̂ + ε) − log(S + ε)) + Σ_j S (log(S + ε) − log(T̂ + ε))
             = Σ_j (T̂ − S)(log(T̂ + ε) − log(S + ε))
    entropy[i] = −Σ_j S log(S + ε),      ε = 1e-4

(FOD, Yao et al. ICCV 2023, Eq. 3–5, 12; the `+1e-4` and the sym-KL are the authors' code at
xcyao00/FOD@7d36ddc, `losses.py` / `trainer.py`.) The 1/(2πσ0σ1) prefactor cancels in the
normalisation; the normaliser is separable, so log Σ_j = logsumexp over grid rows + logsumexp
over grid columns — O(H + W) per query, computed by the launcher in fp32.

The Triton kernel never writes an N×M tensor: pass 1 is flash attention (online max / sum and
the output); the `+ε` terms need the *normalised* S, so pass 2 recomputes q·kᵀ with the final
row max and sum and accumulates kl and entropy with T̂ generated from positions on the fly.
Two passes over the keys is the exact minimum: log(S + ε) cannot be rescaled online.

The lean torch path computes one softmax per block of query rows and serves both the output and
the statistics; it is plain MatMul / Softmax / Log / ReduceSum, so it is also what the ONNX
export traces (with blocks of 256 rows, see `fastad.ops`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._impl import check_impl, interpreting, tl, triton

LOG_EPS = 1e-4  # the authors' smoothing constant inside every log
# The smallest σ of FOD's transform 3 ** (sigmoid(·) + 1e-5) − 1, as fp32 computes it (≈ 1.0986e-5).
# fp16 rounds that expression to 0 (then 1/(2σ²) = ∞ and the target is NaN), so σ is kept in fp32
# and floored here; fp32 never goes below it, so fp32 results do not change.
SIGMA_MIN = float(torch.pow(3.0, torch.tensor(1e-5)) - 1)

if triton is not None:
    # The same ε for the kernel: a GPU build reads only constexpr globals (the interpreter is lenient).
    TL_LOG_EPS: tl.constexpr = tl.constexpr(LOG_EPS)


class I2CorrOutput(NamedTuple):
    out: torch.Tensor                    # (B, H, N, Dh), dtype of q
    kl: torch.Tensor | None = None       # (B, H, N) fp32
    entropy: torch.Tensor | None = None  # (B, H, N) fp32


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE_DOT: tl.constexpr):
        if IEEE_DOT:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _logits_block(q, k_base, offs_n, offs_d, d_ok, skn, skd, M, scale,
                      IEEE_DOT: tl.constexpr, UPCAST: tl.constexpr):
        """q·kᵀ·scale for one block of keys, −inf on the ragged tail. -> (BLOCK_M, BLOCK_N) fp32."""
        col_ok = offs_n < M
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skn + offs_d[None, :] * skd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        qk = _dot(q, tl.trans(k), IEEE_DOT)
        return tl.where(col_ok[None, :], qk * scale, float("-inf"))

    @triton.jit
    def _i2corr_fwd_kernel(
        Q, K, V, InvTwoSigmaSq, LogNorm, Out, KL, Ent,
        sqb, sqh, sqn, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        sob, soh, son, sod,
        H, N, M, GRID_W, scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        WITH_STATS: tl.constexpr, IEEE_DOT: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)  # int64: B·H·N·Dh can exceed 2³¹ at 1024² inputs
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < N
        d_ok = offs_d < HEAD_DIM

        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:  # interpreter only: its tl.dot mis-computes bf16 operands (numpy has no bf16)
            q = q.to(tl.float32)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh

        # Pass 1: flash attention — running row max m_i, running sum l_i, output accumulator.
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, M, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            qk = _logits_block(q, k_base, offs_n, offs_d, d_ok, skn, skd, M, scale, IEEE_DOT, UPCAST)
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svn + offs_d[None, :] * svd,
                        mask=(offs_n < M)[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE_DOT)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(Out + b * sob + h * soh + offs_m[:, None].to(tl.int64) * son + offs_d[None, :] * sod,
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

        if WITH_STATS:
            # Pass 2: normalised S with the final (m_i, l_i); T̂ from positions; accumulate.
            stat_off = pid_bh.to(tl.int64) * N + offs_m
            inv0 = tl.load(InvTwoSigmaSq + stat_off * 2, mask=row_ok, other=0.0)      # 1/(2σ0²), rows
            inv1 = tl.load(InvTwoSigmaSq + stat_off * 2 + 1, mask=row_ok, other=0.0)  # 1/(2σ1²), cols
            log_norm = tl.load(LogNorm + stat_off, mask=row_ok, other=0.0)
            r_i = (offs_m // GRID_W).to(tl.float32)
            c_i = (offs_m % GRID_W).to(tl.float32)
            kl = tl.zeros([BLOCK_M], tl.float32)
            ent = tl.zeros([BLOCK_M], tl.float32)
            for start_n in range(0, M, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                col_ok = offs_n < M
                qk = _logits_block(q, k_base, offs_n, offs_d, d_ok, skn, skd, M, scale, IEEE_DOT, UPCAST)
                s = tl.exp(qk - m_i[:, None]) / l_i[:, None]  # 0 on masked columns
                dr = r_i[:, None] - (offs_n // GRID_W).to(tl.float32)[None, :]
                dc = c_i[:, None] - (offs_n % GRID_W).to(tl.float32)[None, :]
                t = tl.exp(-dr * dr * inv0[:, None] - dc * dc * inv1[:, None] - log_norm[:, None])
                t = tl.where(col_ok[None, :], t, 0.0)
                log_s = tl.log(s + TL_LOG_EPS)
                kl += tl.sum((t - s) * (tl.log(t + TL_LOG_EPS) - log_s), 1)
                ent -= tl.sum(s * log_s, 1)
            tl.store(KL + stat_off, kl, mask=row_ok)
            tl.store(Ent + stat_off, ent, mask=row_ok)


def _target_terms(sigma: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """σ (B, H, N, 2) -> 1/(2σ²) (B, H, N, 2) and log of the separable normaliser (B, H, N), fp32.

    log Σ_j exp(−(r_i − r_j)²/(2σ0²) − (c_i − c_j)²/(2σ1²)) over the N = Hg·Wg grid positions
    = logsumexp_r(−(r_i − r)²/(2σ0²)) + logsumexp_c(−(c_i − c)²/(2σ1²)).
    """
    hg, wg = grid
    inv = 0.5 / sigma.float().clamp_min(SIGMA_MIN).pow(2)  # the kernel's σ, floored when called directly
    n = torch.arange(hg * wg, device=sigma.device)
    r_i, c_i = (n // wg).float(), (n % wg).float()
    rows = torch.arange(hg, device=sigma.device, dtype=torch.float32)
    cols = torch.arange(wg, device=sigma.device, dtype=torch.float32)
    log_norm = torch.logsumexp(-(r_i[:, None] - rows) ** 2 * inv[..., 0:1], dim=-1)
    log_norm = log_norm + torch.logsumexp(-(c_i[:, None] - cols) ** 2 * inv[..., 1:2], dim=-1)
    return inv.contiguous(), log_norm.contiguous()


def _upcast(dtype: torch.dtype) -> bool:
    """Under TRITON_INTERPRET, bf16 tiles are upcast before tl.dot (the interpreter's bf16 dot is
    wrong); products of bf16 values are exact in fp32, so this matches tensor-core results."""
    return dtype == torch.bfloat16 and interpreting()


def _use_ieee(dtype: torch.dtype) -> bool:
    """fp32 inputs: no TF32 rounding, parity with the reference."""
    return dtype == torch.float32 or _upcast(dtype)


class LaunchConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int


# Tensor-core dots (fp16/bf16) keep their tiles in few registers; fp32's IEEE dots run on the FMA
# units with whole tiles per thread, and 64×64 tiles with 4 warps spill on sm_80–sm_90 (Dh = 32
# and 64; bench/results/kernels-aot.md).
TENSOR_CORE_LAUNCH = LaunchConfig(block_m=64, block_n=64, num_warps=4)
IEEE_LAUNCH = LaunchConfig(block_m=64, block_n=16, num_warps=8)
# The interpreter runs a tile as numpy arrays, so its cost is per tile: one large fixed config.
INTERPRETER_LAUNCH = LaunchConfig(block_m=128, block_n=128, num_warps=4)


def gpu_launch(dtype: torch.dtype) -> LaunchConfig:
    """The launch a GPU build uses (the AOT builds record these)."""
    return IEEE_LAUNCH if dtype == torch.float32 else TENSOR_CORE_LAUNCH


def default_launch(dtype: torch.dtype) -> LaunchConfig:
    return INTERPRETER_LAUNCH if interpreting() else gpu_launch(dtype)


def i2corr_forward_triton(q, k, v, sigma, grid, scale: float, with_stats: bool,
                          block_m: int | None = None, block_n: int | None = None,
                          num_warps: int | None = None) -> I2CorrOutput:
    """Launch the fused kernel. q (B, H, N, Dh); k, v (B or 1, H, M, Dh); σ (B, H, N, 2).
    Tiles and warps default to `default_launch(q.dtype)`."""
    launch = default_launch(q.dtype)
    block_m, block_n = block_m or launch.block_m, block_n or launch.block_n
    num_warps = num_warps or launch.num_warps
    b, h, n, dh = q.shape
    m = k.shape[2]
    k = k.expand(b, -1, -1, -1)
    v = v.expand(b, -1, -1, -1)
    out = torch.empty_like(q)
    if with_stats:
        inv, log_norm = _target_terms(sigma, grid)
        kl = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
        ent = torch.empty_like(kl)
    else:
        inv = log_norm = kl = ent = torch.empty(1, device=q.device, dtype=torch.float32)
    launch = (triton.cdiv(n, block_m), b * h)
    _i2corr_fwd_kernel[launch](
        q, k, v, inv, log_norm, out, kl, ent,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        h, n, m, grid[1], scale,
        HEAD_DIM=dh, BLOCK_D=max(16, triton.next_power_of_2(dh)),
        BLOCK_M=block_m, BLOCK_N=block_n, WITH_STATS=with_stats, IEEE_DOT=_use_ieee(q.dtype),
        UPCAST=_upcast(q.dtype),
        num_warps=num_warps,
    )
    return I2CorrOutput(out, kl, ent) if with_stats else I2CorrOutput(out)


# --------------------------------------------------------------------------------------------
# Torch formulas: the RBF target, divergences, entropy (one statement each; FOD's training
# statistics use them too)
# --------------------------------------------------------------------------------------------
def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Correlation statistics run in fp32 (fp64 stays fp64, for reference checks)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def safe_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """σ in at least fp32 and ≥ SIGMA_MIN: finite 1/(2σ²) whatever dtype σ was computed in."""
    return at_least_fp32(sigma).clamp_min(SIGMA_MIN)


def patch_positions(grid: tuple[int, int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column index of each patch, n -> (n // W, n % W). Returns two (N,) float32."""
    h, w = grid
    n = torch.arange(h * w, device=device)
    return (n // w).float(), (n % w).float()


def rbf_target_at(sigma: torch.Tensor, r_i: torch.Tensor, c_i: torch.Tensor,
                  grid: tuple[int, int]) -> torch.Tensor:
    """T̂ for queries at rows r_i, columns c_i (Nq,) with σ (B, H, Nq, 2) -> (B, H, Nq, h*w), ≥ fp32.

    log T̂[i, j] = a_i[r_j] + b_i[c_j] with a_i[r] = −(r_i − r)²/(2σ_i0²) − logsumexp_r(·) and
    b_i[c] likewise over columns: the normaliser of a separable kernel is separable, and the
    log-space softmax has no under/overflow when σ ≈ 1e-5.
    """
    h, w = grid
    sigma = at_least_fp32(sigma)
    rows = torch.arange(h, device=sigma.device, dtype=sigma.dtype)
    cols = torch.arange(w, device=sigma.device, dtype=sigma.dtype)
    # (B, H, Nq, h) and (B, H, Nq, w)
    log_row = -((r_i[:, None] - rows[None, :]) ** 2) / (2 * sigma[..., 0:1] ** 2)
    log_col = -((c_i[:, None] - cols[None, :]) ** 2) / (2 * sigma[..., 1:2] ** 2)
    row = torch.softmax(log_row, dim=-1)
    col = torch.softmax(log_col, dim=-1)
    # Outer product per query: (B, H, Nq, h, 1) * (B, H, Nq, 1, w) -> (B, H, Nq, h*w)
    return (row.unsqueeze(-1) * col.unsqueeze(-2)).flatten(-2)


def sym_kl(p: torch.Tensor, q: torch.Tensor, log_q: torch.Tensor | None = None) -> torch.Tensor:
    """kl(p, q) + kl(q, p) = Σ_j (p − q)(log(p + ε) − log(q + ε)) — one pass instead of two.
    `log_q`: log(q + ε) when the caller has it already."""
    # Evaluated in the order of the one-line formula: autograd accumulates in creation order, and
    # FOD's training must not change by a rounding.
    diff, log_p = p - q, torch.log(p + LOG_EPS)
    log_q = torch.log(q + LOG_EPS) if log_q is None else log_q
    return (diff * (log_p - log_q)).sum(-1)


def attn_entropy(p: torch.Tensor, log_p: torch.Tensor | None = None) -> torch.Tensor:
    """−Σ_j p log(p + ε) over the last dim. `log_p`: log(p + ε) when the caller has it already."""
    log_p = torch.log(p + LOG_EPS) if log_p is None else log_p
    return -(p * log_p).sum(-1)


# --------------------------------------------------------------------------------------------
# Lean blocked torch path (CPU, GPUs without Triton, and the ONNX export)
# --------------------------------------------------------------------------------------------
def _rows_per_block(b: int, h: int, m: int, budget: int = 1 << 19) -> int:
    """Query rows per block so that one (B, H, rows, M) fp32 tile holds about `budget` elements
    (2 MB): the element-wise statistics then run in cache (block sizes timed in docs/results.md,
    "Kernels: I2Correlation branch")."""
    rows = max(16, budget // max(1, b * h * m))
    return 1 << (rows.bit_length() - 1)  # a power of two


def i2corr_forward_lean(q, k, v, sigma, grid, scale: float, with_stats: bool,
                        block: int | None = None) -> I2CorrOutput:
    """`block` query rows at a time (default: sized for the cache): peak extra memory
    O(B·H·block·M) instead of O(B·H·N·M). One softmax per block serves both the output and the
    statistics, which run in fp32 from fp32 logits; the P·V product runs in the input dtype. k and v may keep a batch of 1 (a shared reference) and
    broadcast in the matmuls: no expand, so an exported graph has no shape arithmetic for it.
    Without statistics only the output is needed, which PyTorch's fused SDPA computes in O(N)
    memory.
    """
    b, h, n, dh = q.shape
    if not with_stats:
        if k.shape[0] != b:  # SDPA wants one batch; fixed at trace time when exporting
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        return I2CorrOutput(F.scaled_dot_product_attention(q, k, v, scale=scale))
    block = block or _rows_per_block(b, h, k.shape[2])
    r_i, c_i = patch_positions(grid, q.device)
    k_t = at_least_fp32(k).transpose(-1, -2)  # fp16/bf16 logits in fp32, as the kernel's tl.dot
    out, kl, entropy = [], [], []
    for start in range(0, n, block):
        rows = slice(start, start + block)
        attn = torch.softmax(torch.matmul(at_least_fp32(q[:, :, rows]), k_t) * scale, -1)
        out.append(torch.matmul(attn if attn.dtype == v.dtype else attn.to(v.dtype), v))
        log_attn = torch.log(attn + LOG_EPS)
        kl.append(sym_kl(rbf_target_at(sigma[:, :, rows], r_i[rows], c_i[rows], grid), attn, log_attn))
        entropy.append(attn_entropy(attn, log_attn))
    return I2CorrOutput(torch.cat(out, dim=2), torch.cat(kl, dim=-1), torch.cat(entropy, dim=-1))


# --------------------------------------------------------------------------------------------
# Plain reference: the formulas as written, everything materialised (tests; float64 inputs
# give float64 results)
# --------------------------------------------------------------------------------------------
def i2corr_reference(q, k, v, sigma, grid, scale: float | None = None) -> I2CorrOutput:
    """Slow and obviously correct: full S and T̂ (B, H, N, M), at least fp32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = at_least_fp32(q), at_least_fp32(k), at_least_fp32(v)
    attn = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    r_i, c_i = patch_positions(grid, q.device)
    target = rbf_target_at(sigma.to(q.dtype), r_i, c_i, grid)
    return I2CorrOutput(attn @ v, sym_kl(target, attn), attn_entropy(attn))


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, sigma, grid):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, Dh), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, n, dh = q.shape
    if k.shape[1:] != v.shape[1:] or k.shape[1] != h or k.shape[3] != dh or k.shape[0] not in (1, b) \
            or v.shape[0] != k.shape[0]:
        raise ValueError(f"k/v {tuple(k.shape)}/{tuple(v.shape)} do not match q {tuple(q.shape)}")
    if k.shape[2] != n:
        raise ValueError(f"keys must sit on the same grid as the queries (M = N = {n}), got M = {k.shape[2]}")
    if sigma.shape != (b, h, n, 2):
        raise ValueError(f"sigma must be (B, H, N, 2) = {(b, h, n, 2)}, got {tuple(sigma.shape)}")
    if len(grid) != 2 or int(grid[0]) * int(grid[1]) != n:
        raise ValueError(f"grid {tuple(grid)} does not hold N = {n} patches")
    floats = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    if q.dtype not in floats or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of fp64/fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if len({q.device, k.device, v.device, sigma.device}) != 1:
        raise ValueError("q, k, v and sigma must be on one device")


def i2corr_attention(q, k, v, sigma, grid, *, scale: float | None = None, with_stats: bool = True,
                     impl: str = "lean", block: int | None = None) -> I2CorrOutput:
    """One I2Correlation attention branch, forward only.

    q (B, H, N, Dh); k, v (B or 1, H, N, Dh) — intra: keys from x, inter: from the reference;
    sigma (B, H, N, 2) already transformed (used in fp32, floored at SIGMA_MIN), [..., 0] with the row distance, [..., 1] with the
    column distance; grid = (Hg, Wg), N = Hg·Wg, patch n at (n // Wg, n % Wg).
    -> I2CorrOutput(out (B, H, N, Dh) in q's dtype, kl (B, H, N), entropy (B, H, N), at least
    fp32); kl/entropy are None without `with_stats`.
    impl: "lean" (blocked torch, `block` query rows at a time; default sized for the cache),
    "triton" (fp16/bf16/fp32 on CUDA, or CPU under TRITON_INTERPRET=1), "reference" (everything
    materialised).
    """
    _check_inputs(q, k, v, sigma, grid)
    sigma = safe_sigma(sigma)
    grid = (int(grid[0]), int(grid[1]))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    impl = check_impl(impl, q)
    if impl == "triton":
        if q.dtype == torch.float64:
            raise ValueError("impl='triton' takes fp32/fp16/bf16, got float64")
        return i2corr_forward_triton(q, k, v, sigma, grid, scale, with_stats)
    if impl == "reference":
        res = i2corr_reference(q, k, v, sigma, grid, scale)
        return res._replace(out=res.out.to(q.dtype)) if with_stats else I2CorrOutput(res.out.to(q.dtype))
    return i2corr_forward_lean(q, k, v, sigma, grid, scale, with_stats, block)


__all__ = ["I2CorrOutput", "i2corr_attention", "i2corr_reference", "i2corr_forward_lean",
           "i2corr_forward_triton", "rbf_target_at", "sym_kl", "attn_entropy", "patch_positions",
           "at_least_fp32", "safe_sigma", "LOG_EPS", "SIGMA_MIN"]
