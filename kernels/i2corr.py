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
over grid columns — O(H + W) per query, in fp32 (inside the Triton kernel).

Without statistics (FOD's intra branches at inference) every path is plain attention, which
PyTorch's SDPA computes (`plain_attention`). With them, the Triton kernel never writes an N×M
tensor and runs as one launch (σ's fp32 floor and the
target's normaliser are computed inside it). Per program: BLOCK_M query rows of one (batch,
head); pass 1 is flash attention (online max m and sum l, the output); the `+ε` terms need the
*normalised* S, so pass 2 recomputes q·kᵀ and reads S = 2^(qk − lse₂) with lse₂ = m + log2 l
(no division by the row sum), T̂ generated from positions on the fly. Two passes over the keys is
the exact minimum: log(S + ε) cannot be rescaled online. For training, the SAVE_STATS variant
also stores lse₂, the target's normaliser and four row sums of pass 2 (STAT_NAMES), from which
the backward kernels of `fastad.kernels.i2corr_grad` recompute S and T̂ tile by tile.
Choices, each exact (parity tests against float64):
  - exp2/log2 throughout (the GPU's native MUFU ops): log2(e) is folded into the logit scale and
    into a = log2(e)/(2σ²); kl and entropy are summed in log2 units and scaled by ln 2 per row;
  - key tiles whose grid rows lie so far from the tile's queries that T̂ < 2^−150 for all of
    them (bounded from the smallest a₀ of the tile and the row gap) are exactly 0 in fp32 and
    skip the target: (0 − S)(log ε − log(S + ε)) needs no exp2/log2 of T̂;
  - tensor-core dots for fp16/bf16, IEEE fp32 dots only for fp32 inputs;
  - not adopted: T̂ as an outer product of row and column factors. With key tiles contiguous in
    n, both factors vary per element; tiles shaped as grid rectangles would need the (BLOCK_M,
    rows, cols) product re-laid-out into the dot's layout through shared memory, which costs
    about what the exp2 it saves does (16 elements/clk/SM either way) and wastes lanes on grid
    widths that are not a multiple of the tile. The separable normaliser is used (O(H + W)).

Work per (query, key) pair, N = M = 1024, B = H = 8, Dh = 32 (6.7e7 pairs), against public H100
SXM peaks (989 TFLOP/s dense fp16 tensor core; 67 TFLOP/s fp32 = 3.35e13 ALU ops/s; MUFU 16
ops/clk/SM × 132 SMs × 1.83 GHz = 3.87e12 ops/s):
  - tensor core: q·kᵀ twice + P·V = 6·Dh = 192 FLOP/pair → 13 µs;
  - MUFU: 5 transcendentals/pair (pass 1: exp2; pass 2: exp2 S, log2(S + ε), exp2 T̂,
    log2(T̂ + ε)) → 87 µs; 3/pair on skipped tiles → 52 µs;
  - ALU: ~26 fp32/int ops/pair (scale, mask, max, sums, distances, the kl product) → 52 µs.
The bound is MUFU, ≈ 87 µs (52 µs where every tile skips the target). SDPA on the same shapes
does 1 MUFU op/pair (17 µs bound), so the bounds' ratio is 5× (3× with every tile skipped): the
"≤ 3× SDPA" goal holds only if SDPA runs below ~60% of its own bound or σ is small. Next step
if measured short: evaluate part of the exp2s with FMA polynomials on the ALU pipe (as
FlashAttention-4 does). None of this is measured yet: no GPU has been lent (docs/results.md).

The lean torch path computes one softmax per block of query rows and serves both the output and
the statistics; it is plain MatMul / Softmax / Log / ReduceSum, so it is also what the ONNX
export traces (with blocks of 256 rows, see `fastad.ops`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._impl import check_impl, interpreting, tl, triton

LOG_EPS = 1e-4  # the authors' smoothing constant inside every log
# The smallest σ of FOD's transform 3 ** (sigmoid(·) + 1e-5) − 1, as fp32 computes it (≈ 1.0986e-5).
# fp16 rounds that expression to 0 (then 1/(2σ²) = ∞ and the target is NaN), so σ is kept in fp32
# and floored here; fp32 never goes below it, so fp32 results do not change.
SIGMA_MIN = float(torch.pow(3.0, torch.tensor(1e-5)) - 1)

LOG2E = 1.4426950408889634  # log2(e): the kernel works in exp2/log2 (the GPU's native MUFU ops)

if triton is not None:
    # Constants read inside @triton.jit: a GPU build reads only constexpr globals (the
    # interpreter is lenient).
    TL_LOG_EPS: tl.constexpr = tl.constexpr(LOG_EPS)
    TL_LOG2_EPS: tl.constexpr = tl.constexpr(math.log2(LOG_EPS))  # log2(0 + ε): the zero target's log
    TL_SIGMA_MIN: tl.constexpr = tl.constexpr(SIGMA_MIN)
    TL_HALF_LOG2E: tl.constexpr = tl.constexpr(0.5 * LOG2E)  # a = log2(e)/(2σ²)
    TL_LN2: tl.constexpr = tl.constexpr(math.log(2.0))  # log2 sums -> natural-log kl and entropy
    # 2^−x rounds to exactly 0 in fp32 once x ≥ 150 (half the smallest subnormal, 2^−149, ties to
    # even); one more for the rounding of x itself.
    TL_ZERO_EXP2: tl.constexpr = tl.constexpr(151.0)
    # Grid positions per step of the in-kernel normaliser loop (any grid size; a constant so that
    # it adds no kernel variant).
    TL_NORM_CHUNK: tl.constexpr = tl.constexpr(32)


# Per-row statistics the forward stores with SAVE_STATS (training), in this order; with
# d = log(T̂ + ε) − log(S + ε) and h = ∂kl/∂T̂ = d + (T̂ − S)/(T̂ + ε):
STAT_NAMES = (
    "lse2",         # log2 Σ_j 2^(q·k_j·scale·log2 e): S_j = 2^(q·k_j·scale·log2 e − lse2)
    "target_lse2",  # z₂, log2 of the target's separable normaliser: T̂_j = 2^(−Δr²a₀ − Δc²a₁ − z₂)
    "kl_dot",       # Σ_j S_j ∂kl/∂S_j = Σ_j S_j (−d_j + (S_j − T̂_j)/(S_j + ε))
    "ent_dot",      # Σ_j S_j (∂entropy/∂S_j + 1) = Σ_j S_j (−log(S_j + ε) + ε/(S_j + ε))
    "kl_u_row",     # ∂kl/∂u₀ = Σ_j h_j T̂_j (μ₀ − Δr_j²), u₀ = 1/(2σ₀²), μ₀ = E_row[Δr²]
    "kl_u_col",     # ∂kl/∂u₁, the same over grid columns
)


class I2CorrOutput(NamedTuple):
    out: torch.Tensor                    # (B, H, N, Dh), dtype of q
    kl: torch.Tensor | None = None       # (B, H, N) fp32
    entropy: torch.Tensor | None = None  # (B, H, N) fp32


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _tile_of_program(pid, num_m_tiles):
        """Program id -> (query tile, batch·head). One launch axis (≤ 2³¹ − 1 programs) holds every
        B·H: CUDA caps grid axes 1 and 2 at 65535. Query tiles vary fastest, so neighbouring
        programs share one head's K and V in L2. Plain integer arithmetic: the tests run it as
        Python (`_tile_of_program.fn`) on B·H > 65535 without a GPU."""
        bh = pid // num_m_tiles
        return pid - bh * num_m_tiles, bh

    @triton.jit
    def _log2_gauss_sum(pos, a, LENGTH, CHUNK: tl.constexpr):
        """log2 Σ_{g < LENGTH} 2^(−(pos − g)²·a) for each query: one grid axis of the separable
        normaliser, O(LENGTH) per query. The g = pos term is 2⁰ = 1, so the sum is ≥ 1 and needs
        no max shift."""
        total = tl.zeros(pos.shape, tl.float32)
        for start in range(0, LENGTH, CHUNK):
            g = start + tl.arange(0, CHUNK)
            d = (pos[:, None] - g[None, :]).to(tl.float32)
            total += tl.sum(tl.where(g[None, :] < LENGTH, tl.exp2(-d * d * a[:, None]), 0.0), 1)
        return tl.log2(total)

    @triton.jit
    def _gauss_mean_sq(pos, a, LENGTH, CHUNK: tl.constexpr):
        """μ = Σ_g p(g)·(pos − g)² with p(g) ∝ 2^(−(pos − g)²·a) over g < LENGTH, per query: the
        derivative of one axis' log-normaliser with respect to its 1/(2σ²) (training statistics)."""
        total = tl.zeros(pos.shape, tl.float32)
        moment = tl.zeros(pos.shape, tl.float32)
        for start in range(0, LENGTH, CHUNK):
            g = start + tl.arange(0, CHUNK)
            d = (pos[:, None] - g[None, :]).to(tl.float32)
            p = tl.where(g[None, :] < LENGTH, tl.exp2(-d * d * a[:, None]), 0.0)
            total += tl.sum(p, 1)
            moment += tl.sum(p * d * d, 1)
        return moment / total

    @triton.jit
    def _scaled_logits(q, k_base, offs_n, offs_d, d_ok, skn, skd, N, qk_scale,
                       UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """One key tile's log2-scaled logits (BLOCK_M, BLOCK_N), −inf past N; -> (logits, which
        keys are real). Both passes call it, so pass 2 recomputes exactly pass 1's logits."""
        col_ok = offs_n < N
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skn + offs_d[None, :] * skd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        return tl.where(col_ok[None, :], qk * qk_scale, float("-inf")), col_ok

    @triton.jit
    def _i2corr_fwd_kernel(
        Q, K, V, Sigma, Out, KL, Ent, Stats, stat_stride,
        sqb, sqh, sqn, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        ssb, ssh, ssn, ssc,
        sob, soh, son, sod,
        H, N, GRID_H, GRID_W, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, SAVE_STATS: tl.constexpr,
    ):
        """One program: BLOCK_M query rows of one (batch, head); out, kl and entropy for them.

        Everything runs in log2 units: qk_scale = scale·log2(e), S = 2^(qk − lse₂) with
        lse₂ = m + log2(l) (no division by the row sum), T̂ = 2^(−Δr²·a₀ − Δc²·a₁ − z₂) with
        a = log2(e)/(2σ²) and z₂ the log2 normaliser, and the sums are scaled by ln 2 once per
        row at the end.

        SAVE_STATS (training): also store the STAT_NAMES rows at Stats + index·stat_stride +
        (b·H + h)·N + n — lse₂ and z₂ (the backward recomputes S and T̂ from them) and four row
        sums of pass 2 that make the backward's row reductions and σ's gradient per-row algebra
        (`fastad.kernels.i2corr_grad`). Inference builds use SAVE_STATS=False (no extra work).
        """
        pid_m, pid_bh = _tile_of_program(tl.program_id(0), tl.cdiv(N, BLOCK_M))
        b = (pid_bh // H).to(tl.int64)  # int64: B·H·N·Dh can exceed 2³¹ at 1024² inputs
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < N
        d_ok = offs_d < HEAD_DIM

        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:  # interpreter only: numpy has no bf16 and a slow fp16 matmul
            q = q.to(tl.float32)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh

        # Pass 1: flash attention — running row max m_i, running sum l_i, output accumulator.
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            qk, col_ok = _scaled_logits(q, k_base, offs_n, offs_d, d_ok, skn, skd, N, qk_scale,
                                        UPCAST, DOT_PRECISION)
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svn + offs_d[None, :] * svd,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        out = acc * (1.0 / l_i)[:, None]
        tl.store(Out + b * sob + h * soh + offs_m[:, None].to(tl.int64) * son + offs_d[None, :] * sod,
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        lse2 = m_i + tl.log2(l_i)  # S[i, j] = 2^(qk[i, j] − lse2[i])

        # The target's terms, from σ: a = log2(e)/(2σ²) per axis (σ floored at SIGMA_MIN, so
        # finite whatever σ's dtype was), and the separable log2 normaliser z₂ (row axis + column
        # axis). Padding rows get a = 0: a finite uniform target that is never stored.
        s_ptr = Sigma + b * ssb + h * ssh + offs_m.to(tl.int64) * ssn
        sig0 = tl.maximum(tl.load(s_ptr, mask=row_ok, other=1.0).to(tl.float32), TL_SIGMA_MIN)
        sig1 = tl.maximum(tl.load(s_ptr + ssc, mask=row_ok, other=1.0).to(tl.float32), TL_SIGMA_MIN)
        a0 = tl.where(row_ok, TL_HALF_LOG2E / (sig0 * sig0), 0.0)  # rows
        a1 = tl.where(row_ok, TL_HALF_LOG2E / (sig1 * sig1), 0.0)  # columns
        r_i = offs_m // GRID_W
        c_i = offs_m % GRID_W
        z2 = _log2_gauss_sum(r_i, a0, GRID_H, TL_NORM_CHUNK) + _log2_gauss_sum(c_i, a1, GRID_W, TL_NORM_CHUNK)

        # Key tiles whose grid rows are all ≥ `TL_ZERO_EXP2` (log2 units) away for the flattest
        # query of this tile: T̂ ≤ 2^−(Δr²·a₀) < 2^−150 rounds to exactly 0 in fp32 there (the
        # normaliser only makes it smaller), so (T̂ − S)(log(T̂ + ε) − log(S + ε)) = S·(log(S + ε)
        # − log ε) — no target, one exp2 and one log2 per pair fewer. Exact, not an approximation.
        a0_min = tl.min(tl.where(row_ok, a0, float("inf")), 0)
        rq_lo = (pid_m * BLOCK_M) // GRID_W
        rq_hi = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, N) - 1) // GRID_W

        # Pass 2: normalised S with the final lse2, T̂ from positions; accumulate in log2 units.
        kl = tl.zeros([BLOCK_M], tl.float32)
        ent = tl.zeros([BLOCK_M], tl.float32)
        # SAVE_STATS sums (natural units, see STAT_NAMES): Σ S·d₂ and Σ S(S − T̂)/(S + ε) form
        # kl_dot; Σ S·ε/(S + ε) forms ent_dot; Σ h T̂ and Σ h T̂ Δ² (per axis) form kl_u_row/col.
        s_d = tl.zeros([BLOCK_M], tl.float32)
        s_frac = tl.zeros([BLOCK_M], tl.float32)
        s_eps = tl.zeros([BLOCK_M], tl.float32)
        ht = tl.zeros([BLOCK_M], tl.float32)
        ht_r = tl.zeros([BLOCK_M], tl.float32)
        ht_c = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            qk, col_ok = _scaled_logits(q, k_base, offs_n, offs_d, d_ok, skn, skd, N, qk_scale,
                                        UPCAST, DOT_PRECISION)
            s = tl.exp2(qk - lse2[:, None])  # 0 on the ragged tail
            log_s = tl.log2(s + TL_LOG_EPS)
            ent += tl.sum(s * log_s, 1)
            if SAVE_STATS:
                inv_s = 1.0 / (s + TL_LOG_EPS)
                s_eps += tl.sum(s * inv_s, 1)
            rk_lo = start_n // GRID_W
            rk_hi = (tl.minimum(start_n + BLOCK_N, N) - 1) // GRID_W
            gap = tl.maximum(tl.maximum(rk_lo - rq_hi, rq_lo - rk_hi), 0).to(tl.float32)
            if gap * gap * a0_min >= TL_ZERO_EXP2:
                kl += tl.sum(s * (log_s - TL_LOG2_EPS), 1)
                if SAVE_STATS:  # T̂ = 0: d₂ = log2 ε − log2(S + ε), (S − T̂) = S, no σ terms
                    s_d += tl.sum(s * (TL_LOG2_EPS - log_s), 1)
                    s_frac += tl.sum(s * s * inv_s, 1)
            else:
                dr = (r_i[:, None] - (offs_n // GRID_W)[None, :]).to(tl.float32)
                dc = (c_i[:, None] - (offs_n % GRID_W)[None, :]).to(tl.float32)
                t = tl.exp2(-dr * dr * a0[:, None] - dc * dc * a1[:, None] - z2[:, None])
                t = tl.where(col_ok[None, :], t, 0.0)
                d2 = tl.log2(t + TL_LOG_EPS) - log_s
                kl += tl.sum((t - s) * d2, 1)
                if SAVE_STATS:
                    s_d += tl.sum(s * d2, 1)
                    s_frac += tl.sum(s * (s - t) * inv_s, 1)
                    h_t = (d2 * TL_LN2 + (t - s) / (t + TL_LOG_EPS)) * t  # ∂kl/∂T̂ · T̂
                    ht += tl.sum(h_t, 1)
                    ht_r += tl.sum(h_t * dr * dr, 1)
                    ht_c += tl.sum(h_t * dc * dc, 1)
        stat_off = pid_bh.to(tl.int64) * N + offs_m
        tl.store(KL + stat_off, kl * TL_LN2, mask=row_ok)
        tl.store(Ent + stat_off, -ent * TL_LN2, mask=row_ok)
        if SAVE_STATS:  # in STAT_NAMES order
            tl.store(Stats + stat_off, lse2, mask=row_ok)
            tl.store(Stats + stat_stride + stat_off, z2, mask=row_ok)
            tl.store(Stats + 2 * stat_stride + stat_off, s_frac - s_d * TL_LN2, mask=row_ok)
            tl.store(Stats + 3 * stat_stride + stat_off, -ent * TL_LN2 + s_eps * TL_LOG_EPS, mask=row_ok)
            # ∂kl/∂u = Σ_j h_j T̂_j (μ − Δ_j²) per axis, u = 1/(2σ²) (natural-unit Δ², the grid's)
            mu_r = _gauss_mean_sq(r_i, a0, GRID_H, TL_NORM_CHUNK)
            mu_c = _gauss_mean_sq(c_i, a1, GRID_W, TL_NORM_CHUNK)
            tl.store(Stats + 4 * stat_stride + stat_off, mu_r * ht - ht_r, mask=row_ok)
            tl.store(Stats + 5 * stat_stride + stat_off, mu_c * ht - ht_c, mask=row_ok)


def _upcast(dtype: torch.dtype) -> bool:
    """Under TRITON_INTERPRET, fp16/bf16 tiles are upcast before tl.dot: numpy has no bf16 (the
    interpreter's bf16 dot is wrong) and its fp16 matmul is a slow loop. Products of fp16/bf16
    values are exact in fp32 and tensor cores accumulate in fp32, so results match the GPU's."""
    return dtype in (torch.float16, torch.bfloat16) and interpreting()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: "ieee" for fp32 inputs (no TF32 rounding, parity with the
    reference) and for the interpreter's upcast tiles; "tf32", Triton's default, which fp16/bf16
    operands ignore (tensor cores, fp32 accumulation)."""
    return "ieee" if dtype == torch.float32 or _upcast(dtype) else "tf32"


class LaunchConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int


# The autotune grid (GPU): one list for every dtype, keyed on (N, Dh) (Triton adds the dtypes),
# pruned per dot kind and head dim by `spills_registers`. bench/build_kernels_aot.py builds every
# entry for sm_90/89/87/80 and records which spill (bench/results/kernels-aot.md).
AUTOTUNE_CONFIGS = (
    LaunchConfig(64, 64, 4), LaunchConfig(64, 32, 4), LaunchConfig(64, 32, 8),
    LaunchConfig(64, 16, 8), LaunchConfig(32, 32, 4), LaunchConfig(32, 16, 4), LaunchConfig(16, 16, 4),
)
# The interpreter runs a tile as numpy arrays, so its cost is per tile: one large fixed config.
INTERPRETER_LAUNCH = LaunchConfig(block_m=128, block_n=128, num_warps=4)
# Largest logits tile (BLOCK_M × BLOCK_N elements) that built without a spill on every recorded
# arch (sm_80–sm_90): tensor-core dots at Dh 32 and 64; IEEE fp32 dots at Dh 32 (BLOCK_D = 32),
# shrinking with BLOCK_D² (see `spills_registers`).
TENSOR_CORE_TILE_MAX = 64 * 32
IEEE_TILE_MAX_AT_D32 = 32 * 32


def block_d(head_dim: int) -> int:
    """The kernel's head-dim tile: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def spills_registers(config: LaunchConfig, ieee_dot: bool, head_dim: int) -> bool:
    """The named prune predicate of the autotune grid: True for the configs whose build spilled
    registers on one of sm_80–sm_90 (tests/test_kernels_compile.py checks it against every build
    recorded in bench/results/kernels-aot.json, Dh 32 and 64). Pass 2 keeps about five
    (BLOCK_M, BLOCK_N) fp32 tiles live (logits, S, log S, T̂, the kl term): what spills is the
    tile area, not the elements per thread (several 8-warp builds were held to 128 registers
    and spilled like the 4-warp build of the same area). Tensor-core dots keep their operands in
    shared memory and fit 64 × 32 at either head dim; IEEE fp32 dots run on the FMA units with
    operand rows of BLOCK_D per thread, and the tile that fits shrinks with BLOCK_D² (32 × 32 at
    Dh 32, 16 × 16 at Dh 64, where 32 × 16 already spilled; bench/results/kernels-aot.md)."""
    area = config.block_m * config.block_n
    if ieee_dot:
        return area * (block_d(head_dim) // 32) ** 2 > IEEE_TILE_MAX_AT_D32
    return area > TENSOR_CORE_TILE_MAX


def autotune_configs(dtype: torch.dtype, head_dim: int) -> list[LaunchConfig]:
    """The configs the autotuner may try for one dtype and head dim."""
    return [c for c in AUTOTUNE_CONFIGS if not spills_registers(c, dtype == torch.float32, head_dim)]


def gpu_launch(dtype: torch.dtype, head_dim: int) -> LaunchConfig:
    """The fixed GPU launch for a dtype and head dim — the largest tile the autotuner may try,
    used when a call passes some but not all of the block sizes; the AOT test builds these."""
    return max(autotune_configs(dtype, head_dim), key=lambda c: (c.block_m * c.block_n, -c.num_warps))


def launch_grid(n: int, batch_heads: int, block_m: int) -> tuple[int]:
    """Programs of one launch: query tiles × B·H on grid axis 0 (see `_tile_of_program`)."""
    programs = (n + block_m - 1) // block_m * batch_heads
    if programs > 2 ** 31 - 1:
        raise ValueError(f"{programs} programs exceed CUDA's grid limit (N = {n}, B·H = {batch_heads})")
    return (programs,)


def prune_spilling(configs, named_args, **kwargs):
    """The autotuner's early_config_prune: drop the triton.Configs `spills_registers` names for
    this launch (its constexprs say the dot kind and the head dim)."""
    return [c for c in configs if not spills_registers(
        LaunchConfig(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps), kwargs["DOT_PRECISION"] == "ieee",
        kwargs["HEAD_DIM"])]


if triton is not None and not interpreting():  # the interpreter runs INTERPRETER_LAUNCH only
    _i2corr_fwd_autotuned = triton.autotune(
        configs=[triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps)
                 for c in AUTOTUNE_CONFIGS],
        key=["N", "HEAD_DIM"], prune_configs_by={"early_config_prune": prune_spilling},
    )(_i2corr_fwd_kernel)


def i2corr_forward_triton(q, k, v, sigma, grid, scale: float, with_stats: bool,
                          block_m: int | None = None, block_n: int | None = None,
                          num_warps: int | None = None, save_stats: bool = False):
    """Launch the fused kernel. q (B, H, N, Dh); k, v (B or 1, H, N, Dh); σ (B, H, N, 2), any
    float dtype (used in fp32, floored at SIGMA_MIN inside the kernel).

    Without statistics this is plain attention: PyTorch's SDPA (flash / memory-efficient kernels).
    Tiles: `block_m`/`block_n`/`num_warps` when given; else the interpreter's fixed
    INTERPRETER_LAUNCH, or on a GPU the autotuner over AUTOTUNE_CONFIGS (pruned by
    `spills_registers`), keyed on (N, Dh) and the dtypes.
    `save_stats` (training; needs with_stats and explicit tiles, the training launcher's choice)
    -> (I2CorrOutput, stats (len(STAT_NAMES), B, H, N) fp32 in STAT_NAMES order).
    """
    if not with_stats:
        return I2CorrOutput(plain_attention(q, k, v, scale))
    b, h, n, dh = q.shape
    k = k.expand(b, -1, -1, -1)
    v = v.expand(b, -1, -1, -1)
    sigma = sigma if sigma.dtype == torch.float32 else sigma.float()
    out = torch.empty_like(q)
    kl = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    ent = torch.empty_like(kl)
    # Never written without save_stats: one element stands in for the pointer.
    stats = torch.empty((len(STAT_NAMES), b, h, n) if save_stats else (1,), device=q.device, dtype=torch.float32)
    args = (q, k, v, sigma, out, kl, ent, stats, b * h * n, *q.stride(), *k.stride(), *v.stride(),
            *sigma.stride(), *out.stride(), h, n, grid[0], grid[1], scale * LOG2E)
    consts = dict(HEAD_DIM=dh, BLOCK_D=block_d(dh), DOT_PRECISION=dot_precision(q.dtype),
                  UPCAST=_upcast(q.dtype), SAVE_STATS=save_stats)
    if block_m is None and block_n is None and num_warps is None and not interpreting() and not save_stats:
        _i2corr_fwd_autotuned[lambda meta: launch_grid(n, b * h, meta["BLOCK_M"])](*args, **consts)
    else:
        fixed = INTERPRETER_LAUNCH if interpreting() else gpu_launch(q.dtype, dh)
        block_m, block_n = block_m or fixed.block_m, block_n or fixed.block_n
        _i2corr_fwd_kernel[launch_grid(n, b * h, block_m)](
            *args, **consts, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps or fixed.num_warps)
    res = I2CorrOutput(out, kl, ent)
    return (res, stats) if save_stats else res

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


def plain_attention(q, k, v, scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v without statistics: PyTorch's fused SDPA (flash / memory-efficient
    kernels on CUDA), O(N) memory. k, v with a batch of 1 are expanded (SDPA wants one batch;
    fixed at trace time when exporting)."""
    if k.shape[0] != q.shape[0]:
        k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


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
        return I2CorrOutput(plain_attention(q, k, v, scale))
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
    grid = (int(grid[0]), int(grid[1]))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    impl = check_impl(impl, q)
    if impl == "triton":  # one launch: σ's fp32 floor and the target's normaliser are in the kernel
        if q.dtype == torch.float64:
            raise ValueError("impl='triton' takes fp32/fp16/bf16, got float64")
        return i2corr_forward_triton(q, k, v, sigma, grid, scale, with_stats)
    sigma = safe_sigma(sigma)
    if impl == "reference":
        res = i2corr_reference(q, k, v, sigma, grid, scale)
        return res._replace(out=res.out.to(q.dtype)) if with_stats else I2CorrOutput(res.out.to(q.dtype))
    return i2corr_forward_lean(q, k, v, sigma, grid, scale, with_stats, block)


__all__ = ["I2CorrOutput", "i2corr_attention", "i2corr_reference", "i2corr_forward_lean",
           "i2corr_forward_triton", "rbf_target_at", "sym_kl", "attn_entropy", "patch_positions",
           "at_least_fp32", "safe_sigma", "LOG_EPS", "SIGMA_MIN", "STAT_NAMES"]
