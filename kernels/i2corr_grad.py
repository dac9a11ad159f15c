"""A differentiable I2Correlation branch in O(N) memory: the attention output, the symmetric KL to
the RBF target and the entropy, with their gradients into q, k, v and σ (FOD's training).

Notation as in `fastad.kernels.i2corr` (one head, query row i, keys j, ε = LOG_EPS):

    z = q kᵀ·scale,  S = softmax_j(z),  out = S v,
    T̂_j = p_i(r_j) · p'_i(c_j),  p_i(r) = softmax_r(−(r_i − r)² u0),  p'_i(c) = softmax_c(−(c_i − c)² u1),
    u = 1/(2σ²),  d_j = log(T̂_j + ε) − log(S_j + ε),
    kl = Σ_j (T̂_j − S_j) d_j,   entropy = −Σ_j S_j log(S_j + ε).

Backward for upstream gradients dO (row vector), g_S (of kl, through S), g_T (of kl, through T̂)
and g_E (of the entropy), all per query row:

    ∂L/∂S_j = dO·v_j + g_S (−d_j + (S_j − T̂_j)/(S_j + ε)) + g_E (−log(S_j + ε) + ε/(S_j + ε)) − g_E
    ∂L/∂z_j = S_j (∂L/∂S_j − Σ_l S_l ∂L/∂S_l)          (the constant −g_E cancels here)
    ∂L/∂q = scale Σ_j ∂L/∂z_j k_j,  ∂L/∂k_j = scale Σ_i ∂L/∂z_ij q_i,  ∂L/∂v_j = Σ_i S_ij dO_i

    ∂kl/∂T̂_j = d_j + (T̂_j − S_j)/(T̂_j + ε) =: h_j,   w_j = g_T h_j T̂_j
    ∂L/∂u0 = μ0 Σ_j w_j − Σ_j w_j (r_i − r_j)²,   μ0 = Σ_r p_i(r) (r_i − r)²   (u1: columns alike)
    ∂L/∂σ = −∂L/∂u / σ³

The target's normaliser enters through μ: ∂ log p_i(r)/∂u0 = −(r_i − r)² + μ0, and μ needs only
the query's row (column) factor, O(Hg + Wg) per query.

Two implementations, neither storing an N×M tensor:
  - lean (any device; the reference for the other): both passes run over blocks of query rows
    (each block against all M keys, sized for the cache as the lean forward's), and the backward
    recomputes each block's scores from q and k (flash attention's backward recomputes tiles the
    same way). Saved for the backward: q, k, v and σ only.
  - triton (CUDA; the interpreter in tests): the forward kernel of `fastad.kernels.i2corr` with
    SAVE_STATS, which also stores the STAT_NAMES rows, then two backward kernels that recompute S
    and T̂ tile by tile from lse₂ and z₂: dk/dv with one program per key tile looping over the
    query tiles, dq with one program per query tile looping over the key tiles (no atomics).
    The row reductions are per-row sums the forward already formed: Σ_l S_l ∂L/∂S_l =
    dO·out + g_S·kl_dot + g_E·ent_dot (`delta`, O(N·Dh) torch), and σ's gradient is
    −g_T·kl_u/σ³ per axis — in torch, since no tile needs recomputing for it (the forward had S
    and T̂ when it summed h T̂ (μ − Δ²)). Saved: q, k, v, σ, out and the statistics.

`kl_grad` picks which factor the kl's gradient reaches (FOD's min-max scheme needs both kinds):
"both" — S and T̂, autograd's gradient through the plain formulas; "split" — two kl outputs of
equal value, `kl` reaching only S (sym-KL(T̂.detach(), S), the model's Div¹) and `kl_target`
reaching only σ (sym-KL(T̂, S.detach()), Div²).
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from ._impl import check_impl, interpreting, tl, triton
from .i2corr import (LOG2E, LOG_EPS, STAT_NAMES, I2CorrOutput, LaunchConfig, _check_inputs, _rows_per_block,
                     _upcast, at_least_fp32, attn_entropy, block_d, dot_precision, i2corr_forward_triton,
                     launch_grid, patch_positions, rbf_target_at, safe_sigma, sym_kl)
from .i2corr import i2corr_attention as forward_attention

KL_GRADS = ("both", "split")
# Elements of one (B, H, rows, M) tile: 2²⁰ (4 MB fp32) — 128 query rows at B = 1, H = 8, N = 1024,
# the fastest of 32–256 rows forward + backward, eager and compiled (docs/results.md, "FOD
# training in O(N) memory").
TILE_BUDGET = 1 << 20


# --------------------------------------------------------------------------------------------
# Triton backward (impl "triton"): the forward kernel with SAVE_STATS, then two kernels
# --------------------------------------------------------------------------------------------
class TrainLaunch(NamedTuple):
    """Tiles of one training step's three launches. `stats`: the forward with SAVE_STATS
    (BLOCK_M query rows per program, BLOCK_N keys per step); `dkdv`: BLOCK_N keys per program, a
    loop over BLOCK_M query rows; `dq`: BLOCK_M query rows per program, a loop over BLOCK_N keys."""
    stats: LaunchConfig
    dkdv: LaunchConfig
    dq: LaunchConfig


# (IEEE fp32 dots, head dim) -> launches: the largest tiles whose builds for sm_90 and sm_87
# spill no register (tests/test_kernels_compile.py; bench/results/kernels-aot-train.txt, which
# also lists the spilling candidates). The dk/dv kernel holds two (BLOCK_N, BLOCK_D) fp32
# accumulators and the v tile across its loop on top of the backward's score tiles, so its key
# tile stays at 32 (64 spilled on sm_87 at either head dim); the SAVE_STATS forward keeps six
# more row sums than inference and takes 8 warps at 64 × 32. IEEE fp32 dots hold operand rows in
# registers, so their tiles shrink as the head dim grows (as the inference forward's do).
TRAIN_LAUNCHES = {
    (False, 32): TrainLaunch(LaunchConfig(64, 32, 8), LaunchConfig(32, 32, 4), LaunchConfig(64, 32, 4)),
    (False, 64): TrainLaunch(LaunchConfig(64, 32, 8), LaunchConfig(32, 32, 8), LaunchConfig(64, 16, 4)),
    (True, 32): TrainLaunch(LaunchConfig(32, 32, 4), LaunchConfig(16, 32, 8), LaunchConfig(32, 32, 4)),
    (True, 64): TrainLaunch(LaunchConfig(16, 16, 4), LaunchConfig(16, 16, 8), LaunchConfig(32, 16, 4)),
}
# Rows of the per-row input of the backward kernels, in this order: the forward's lse₂ and z₂,
# the upstream gradients of kl through S (g_S) and of the entropy (g_E), and
# delta = Σ_j S_j ∂L/∂S_j (without the entropy's −g_E, which the softmax backward cancels).
BWD_ROW_NAMES = ("lse2", "target_lse2", "g_attn_kl", "g_ent", "delta")


def train_launch(dtype: torch.dtype, head_dim: int) -> TrainLaunch:
    """The training launches for a dtype and head dim (the interpreter runs the GPU's tiles too,
    so the parity tests cover the production tiling); head dims above 32 take the 64 entry."""
    return TRAIN_LAUNCHES[(dtype == torch.float32, 32 if head_dim <= 32 else 64)]


if triton is not None:
    from .i2corr import (TL_HALF_LOG2E, TL_LN2, TL_LOG2_EPS, TL_LOG_EPS, TL_SIGMA_MIN, TL_ZERO_EXP2,
                         _scaled_logits, _tile_of_program)

    @triton.jit
    def _row_target_terms(Sigma, s_off, ssc, row_ok, offs_m, GRID_W):
        """Per query row: a = log2(e)/(2σ²) per axis (σ floored as the forward floors it; padding
        rows 0), the grid row and column."""
        sig0 = tl.maximum(tl.load(Sigma + s_off, mask=row_ok, other=1.0).to(tl.float32), TL_SIGMA_MIN)
        sig1 = tl.maximum(tl.load(Sigma + s_off + ssc, mask=row_ok, other=1.0).to(tl.float32), TL_SIGMA_MIN)
        a0 = tl.where(row_ok, TL_HALF_LOG2E / (sig0 * sig0), 0.0)
        a1 = tl.where(row_ok, TL_HALF_LOG2E / (sig1 * sig1), 0.0)
        return a0, a1, offs_m // GRID_W, offs_m % GRID_W

    @triton.jit
    def _attn_grad_tile(qk, dp, lse2, z2, g_s, g_e, delta, a0, a1, r_i, c_i, offs_n, col_ok,
                        start_m, start_n, N, GRID_W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One (query, key) tile of the backward: from the log2-scaled logits `qk` and dp = dO·vᵀ
        -> (S, ∂L/∂z / scale) with z the natural logits, recomputing S and T̂ as the forward does
        (including its exact skip of tiles where T̂ is 0 in fp32):

            ∂L/∂S = dp − g_S·d − g_E·log(S + ε) + (g_S(S − T̂) + g_E·ε)/(S + ε),
            ∂L/∂z = S (∂L/∂S − delta),   d = log(T̂ + ε) − log(S + ε)."""
        s = tl.exp2(qk - lse2[:, None])  # 0 past N
        log_s = tl.log2(s + TL_LOG_EPS)
        a0_min = tl.min(tl.where(a0 > 0, a0, float("inf")), 0)
        rq_lo = start_m // GRID_W
        rq_hi = (tl.minimum(start_m + BLOCK_M, N) - 1) // GRID_W
        rk_lo = start_n // GRID_W
        rk_hi = (tl.minimum(start_n + BLOCK_N, N) - 1) // GRID_W
        gap = tl.maximum(tl.maximum(rk_lo - rq_hi, rq_lo - rk_hi), 0).to(tl.float32)
        if gap * gap * a0_min >= TL_ZERO_EXP2:  # T̂ = 0 exactly (see the forward kernel)
            t = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            log_t = t + TL_LOG2_EPS
        else:
            dr = (r_i[:, None] - (offs_n // GRID_W)[None, :]).to(tl.float32)
            dc = (c_i[:, None] - (offs_n % GRID_W)[None, :]).to(tl.float32)
            t = tl.exp2(-dr * dr * a0[:, None] - dc * dc * a1[:, None] - z2[:, None])
            t = tl.where(col_ok[None, :], t, 0.0)
            log_t = tl.log2(t + TL_LOG_EPS)
        g = (dp - g_s[:, None] * ((log_t - log_s) * TL_LN2) - g_e[:, None] * (log_s * TL_LN2)
             + (g_s[:, None] * (s - t) + g_e[:, None] * TL_LOG_EPS) / (s + TL_LOG_EPS))
        return s, s * (g - delta[:, None])

    @triton.jit
    def _load_rows(Rows, row_stride, row_off, row_ok):
        """The BWD_ROW_NAMES values of BLOCK_M query rows."""
        lse2 = tl.load(Rows + row_off, mask=row_ok, other=0.0)
        z2 = tl.load(Rows + row_stride + row_off, mask=row_ok, other=0.0)
        g_s = tl.load(Rows + 2 * row_stride + row_off, mask=row_ok, other=0.0)
        g_e = tl.load(Rows + 3 * row_stride + row_off, mask=row_ok, other=0.0)
        delta = tl.load(Rows + 4 * row_stride + row_off, mask=row_ok, other=0.0)
        return lse2, z2, g_s, g_e, delta

    @triton.jit
    def _query_tiles(Q, DO, b, h, offs_m, offs_d, q_mask, sqb, sqh, sqn, sqd, sdb, sdh, sdn, sdd,
                     UPCAST: tl.constexpr):
        """The q and dL/d(out) tiles of query rows offs_m (both backward kernels read them alike)."""
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :] * sqd,
                    mask=q_mask, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None].to(tl.int64) * sdn + offs_d[None, :] * sdd,
                     mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        return q, do

    @triton.jit
    def _i2corr_bwd_dkdv_kernel(
        Q, K, V, Sigma, DO, Rows, DK, DV, row_stride,
        sqb, sqh, sqn, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        ssb, ssh, ssn, ssc,
        sdb, sdh, sdn, sdd,
        H, N, GRID_W, qk_scale, scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """One program: BLOCK_N keys of one (batch, head); loops over every query tile and
        accumulates dk = scale·Σ_i ∂L/∂z_ij q_i and dv = Σ_i S_ij dO_i (fp32; DK and DV are
        (B, H, N, Dh) contiguous, a shared k/v batch is summed by the launcher). DO is dL/d(out),
        (B, H, N, Dh) in q's dtype; Rows holds BWD_ROW_NAMES, row_stride = B·H·N apart."""
        pid_n, pid_bh = _tile_of_program(tl.program_id(0), tl.cdiv(N, BLOCK_N))
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        start_n = pid_n * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < N
        d_ok = offs_d < HEAD_DIM
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k_base = K + b * skb + h * skh
        v = tl.load(V + b * svb + h * svh + offs_n[:, None].to(tl.int64) * svn + offs_d[None, :] * svd,
                    mask=kv_mask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < N
            q_mask = row_ok[:, None] & d_ok[None, :]
            q, do = _query_tiles(Q, DO, b, h, offs_m, offs_d, q_mask, sqb, sqh, sqn, sqd,
                                 sdb, sdh, sdn, sdd, UPCAST)
            lse2, z2, g_s, g_e, delta = _load_rows(Rows, row_stride, pid_bh.to(tl.int64) * N + offs_m, row_ok)
            a0, a1, r_i, c_i = _row_target_terms(Sigma, b * ssb + h * ssh + offs_m.to(tl.int64) * ssn, ssc,
                                                 row_ok, offs_m, GRID_W)
            qk, _ = _scaled_logits(q, k_base, offs_n, offs_d, d_ok, skn, skd, N, qk_scale, UPCAST, DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            s, ds = _attn_grad_tile(qk, dp, lse2, z2, g_s, g_e, delta, a0, a1, r_i, c_i, offs_n, col_ok,
                                    start_m, start_n, N, GRID_W, BLOCK_M, BLOCK_N)
            s = tl.where(row_ok[:, None], s, 0.0)  # padding rows hold a finite, unused S
            dv += tl.dot(tl.trans(s.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        out_off = pid_bh.to(tl.int64) * N * HEAD_DIM + offs_n[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
        tl.store(DK + out_off, dk * scale, mask=kv_mask)
        tl.store(DV + out_off, dv, mask=kv_mask)

    @triton.jit
    def _i2corr_bwd_dq_kernel(
        Q, K, V, Sigma, DO, Rows, DQ, row_stride,
        sqb, sqh, sqn, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        ssb, ssh, ssn, ssc,
        sdb, sdh, sdn, sdd,
        H, N, GRID_W, qk_scale, scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """One program: BLOCK_M query rows of one (batch, head); loops over every key tile and
        accumulates dq = scale·Σ_j ∂L/∂z_ij k_j (fp32, DQ (B, H, N, Dh) contiguous)."""
        pid_m, pid_bh = _tile_of_program(tl.program_id(0), tl.cdiv(N, BLOCK_M))
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < N
        d_ok = offs_d < HEAD_DIM
        q_mask = row_ok[:, None] & d_ok[None, :]
        q, do = _query_tiles(Q, DO, b, h, offs_m, offs_d, q_mask, sqb, sqh, sqn, sqd,
                             sdb, sdh, sdn, sdd, UPCAST)
        lse2, z2, g_s, g_e, delta = _load_rows(Rows, row_stride, pid_bh.to(tl.int64) * N + offs_m, row_ok)
        a0, a1, r_i, c_i = _row_target_terms(Sigma, b * ssb + h * ssh + offs_m.to(tl.int64) * ssn, ssc,
                                             row_ok, offs_m, GRID_W)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            qk, col_ok = _scaled_logits(q, k_base, offs_n, offs_d, d_ok, skn, skd, N, qk_scale, UPCAST,
                                        DOT_PRECISION)
            kv_mask = col_ok[:, None] & d_ok[None, :]
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
                k = k.to(tl.float32)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            _, ds = _attn_grad_tile(qk, dp, lse2, z2, g_s, g_e, delta, a0, a1, r_i, c_i, offs_n, col_ok,
                                    start_m, start_n, N, GRID_W, BLOCK_M, BLOCK_N)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        tl.store(DQ + pid_bh.to(tl.int64) * N * HEAD_DIM + offs_m[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :],
                 dq * scale, mask=q_mask)


def i2corr_stats_forward_triton(q, k, v, sigma, grid, scale: float):
    """The forward of one training step: the fused kernel with SAVE_STATS at the training tiles
    -> (I2CorrOutput, stats (len(STAT_NAMES), B, H, N) fp32)."""
    launch = train_launch(q.dtype, q.shape[-1]).stats
    return i2corr_forward_triton(q, k, v, sigma, grid, scale, True, block_m=launch.block_m,
                                 block_n=launch.block_n, num_warps=launch.num_warps, save_stats=True)


def i2corr_backward_triton(q, k, v, sigma, out, stats, d_out, g_attn_kl, g_target_kl, g_ent, grid, scale: float):
    """Gradients of one branch from the forward's `out` and `stats`: q (B, H, N, Dh); k, v (B or
    1, H, N, Dh); σ (B, H, N, 2) fp32, floored; upstream d_out (B, H, N, Dh), the rest (B, H, N)
    -> dq, dk, dv (fp32; dk/dv summed over the batch for a shared k/v) and dσ (fp32).

    dσ needs no kernel: σ enters only through the target's terms of kl, and ∂kl/∂u per row
    (u = 1/(2σ²)) is a product of the upstream g_T and the forward's kl_u_row/kl_u_col — the
    forward already had T̂ and S, so no tile is recomputed for it. The same holds for the
    softmax backward's row reductions, folded into `delta` here (O(B·H·N·Dh) torch)."""
    b, h, n, dh = q.shape
    kv_batch = k.shape[0]
    k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
    d_out = d_out.to(q.dtype)
    st = dict(zip(STAT_NAMES, stats))
    g_s, g_t, g_e = (g.float() for g in (g_attn_kl, g_target_kl, g_ent))
    delta = (d_out.float() * out.float()).sum(-1) + g_s * st["kl_dot"] + g_e * st["ent_dot"]
    rows = torch.stack([st["lse2"], st["target_lse2"], g_s, g_e, delta]).contiguous()
    dq = torch.empty(b, h, n, dh, device=q.device, dtype=torch.float32)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    strides = (*q.stride(), *k.stride(), *v.stride(), *sigma.stride(), *d_out.stride())
    consts = dict(HEAD_DIM=dh, BLOCK_D=block_d(dh), DOT_PRECISION=dot_precision(q.dtype), UPCAST=_upcast(q.dtype))
    tail = (h, n, grid[1], scale * LOG2E, scale)
    launch = train_launch(q.dtype, dh)
    _i2corr_bwd_dkdv_kernel[launch_grid(n, b * h, launch.dkdv.block_n)](
        q, k, v, sigma, d_out, rows, dk, dv, b * h * n, *strides, *tail, **consts,
        BLOCK_M=launch.dkdv.block_m, BLOCK_N=launch.dkdv.block_n, num_warps=launch.dkdv.num_warps)
    _i2corr_bwd_dq_kernel[launch_grid(n, b * h, launch.dq.block_m)](
        q, k, v, sigma, d_out, rows, dq, b * h * n, *strides, *tail, **consts,
        BLOCK_M=launch.dq.block_m, BLOCK_N=launch.dq.block_n, num_warps=launch.dq.num_warps)
    d_u = torch.stack([st["kl_u_row"], st["kl_u_col"]], -1) * g_t[..., None]
    d_sigma = -d_u / sigma.float().pow(3)  # u = 1/(2σ²)
    return dq, _split_kv_grad(dk, kv_batch), _split_kv_grad(dv, kv_batch), d_sigma


class I2CorrSplitOutput(NamedTuple):
    out: torch.Tensor        # (B, H, N, Dh), dtype of q
    kl: torch.Tensor         # (B, H, N): gradient reaches the attention S only (Div¹)
    kl_target: torch.Tensor  # (B, H, N): same value, gradient reaches σ only (Div²)
    entropy: torch.Tensor    # (B, H, N)


def _compute_dtype(q: torch.Tensor, sigma: torch.Tensor) -> torch.dtype:
    return torch.promote_types(at_least_fp32(q).dtype, at_least_fp32(sigma).dtype)


def _axis_target(inv: torch.Tensor, pos_i: torch.Tensor, size: int):
    """One axis of the separable target for queries at positions pos_i (R,) with u = 1/(2σ²)
    (B, H, R): -> p (B, H, R, size) = softmax over the axis, sq (R, size) = squared distances,
    μ (B, H, R) = Σ p·sq."""
    axis = torch.arange(size, device=inv.device, dtype=inv.dtype)
    sq = (pos_i.to(inv.dtype)[:, None] - axis) ** 2
    p = torch.softmax(-sq * inv[..., None], dim=-1)
    return p, sq, (p * sq).sum(-1)


class _BlockTerms(NamedTuple):
    attn: torch.Tensor      # S (B, H, R, M)
    log_attn: torch.Tensor  # log(S + ε)
    target: torch.Tensor    # T̂ (B, H, R, M)
    diff_log: torch.Tensor  # log(T̂ + ε) − log(S + ε)
    rows: tuple             # p, sq, μ over grid rows
    cols: tuple             # same over grid columns


def _block_terms(q_blk, k_t, inv_blk, r_blk, c_blk, grid, scale) -> _BlockTerms:
    """Everything of one block of query rows that the forward and the backward share."""
    hg, wg = grid
    attn = torch.softmax(torch.matmul(q_blk, k_t) * scale, dim=-1)
    log_attn = torch.log(attn + LOG_EPS)
    rows = _axis_target(inv_blk[..., 0], r_blk, hg)
    cols = _axis_target(inv_blk[..., 1], c_blk, wg)
    target = (rows[0].unsqueeze(-1) * cols[0].unsqueeze(-2)).flatten(-2)
    diff_log = torch.log(target + LOG_EPS) - log_attn
    return _BlockTerms(attn, log_attn, target, diff_log, rows, cols)


def _split_kv_grad(grad: torch.Tensor, kv_batch: int) -> torch.Tensor:
    """A gradient (B, H, M, Dh) of keys/values shared across the batch (Bk = 1) sums over B."""
    return grad.sum(0, keepdim=True) if kv_batch != grad.shape[0] else grad


def forward_block(q_blk, k_t, v, inv_blk, r_blk, c_blk, grid: tuple[int, int], scale: float):
    """One block of R query rows: -> out (B, H, R, Dh), kl, entropy (B, H, R)."""
    t = _block_terms(q_blk, k_t, inv_blk, r_blk, c_blk, grid, scale)
    return (torch.matmul(t.attn, v), ((t.target - t.attn) * t.diff_log).sum(-1),
            -(t.attn * t.log_attn).sum(-1))


def backward_block(q_blk, k, v, inv_blk, r_blk, c_blk, r_keys, c_keys, d_out, g_attn_kl, g_target_kl,
                   g_ent, grid: tuple[int, int], scale: float):
    """Gradients of one block of R query rows at grid rows / columns r_blk, c_blk (R,) against
    keys at r_keys, c_keys (M,) (upstream d_out (B, H, R, Dh), the rest (B, H, R)):
    -> dq (B, H, R, Dh), this block's share of dk and dv (B, H, M, Dh), ∂L/∂u (B, H, R, 2)."""
    t = _block_terms(q_blk, k.transpose(-1, -2), inv_blk, r_blk, c_blk, grid, scale)
    gs, gt, ge = g_attn_kl[..., None], g_target_kl[..., None], g_ent[..., None]
    # ∂L/∂S without the row constant −g_E (the softmax backward cancels it)
    g_attn = (torch.matmul(d_out, v.transpose(-1, -2)) - gs * t.diff_log - ge * t.log_attn
              + (gs * (t.attn - t.target) + ge * LOG_EPS) / (t.attn + LOG_EPS))
    g_z = t.attn * (g_attn - (t.attn * g_attn).sum(-1, keepdim=True)) * scale
    dq = torch.matmul(g_z, k)
    dk = torch.matmul(g_z.transpose(-1, -2), q_blk)
    dv = torch.matmul(t.attn.transpose(-1, -2), d_out)
    w = (t.diff_log + (t.target - t.attn) / (t.target + LOG_EPS)) * t.target * gt
    # Squared row / column distances of each (query, key) pair, as broadcasts: compiled, they are
    # index arithmetic inside the one loop that also forms w and its three row sums.
    dist_r = (r_blk[:, None] - r_keys) ** 2
    dist_c = (c_blk[:, None] - c_keys) ** 2
    total = w.sum(-1)
    du_r = t.rows[2] * total - (w * dist_r).sum(-1)
    du_c = t.cols[2] * total - (w * dist_c).sum(-1)
    return dq, dk, dv, torch.stack([du_r, du_c], -1)


_COMPILED: dict = {}


def _block_fns(compiled: bool):
    """(forward_block, backward_block), `torch.compile`d when asked: the element-wise work of a
    block then runs as a few fused loops instead of ~30 passes. Falls back to eager, with a
    warning, where compiling fails (no C compiler)."""
    if not compiled or _COMPILED.get("failed"):
        return forward_block, backward_block
    if "fns" not in _COMPILED:
        _COMPILED["fns"] = (torch.compile(forward_block, dynamic=False),
                            torch.compile(backward_block, dynamic=False))
    return _COMPILED["fns"]


def _run_compiled(index: int, compiled: bool, *args):
    fn = _block_fns(compiled)[index]
    if fn is forward_block or fn is backward_block:
        return fn(*args)
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - any backend failure means "use eager"
        warnings.warn(f"torch.compile unavailable ({type(e).__name__}); I2Correlation training uses eager ops")
        _COMPILED["failed"] = True
        return (forward_block, backward_block)[index](*args)


class I2CorrFunction(torch.autograd.Function):
    """apply(q, k, v, σ, grid, scale, block, split, compiled, impl) -> (out, kl, kl_target, entropy).

    q (B, H, N, Dh); k, v (B or 1, H, M, Dh); σ (B, H, N, 2), already floored (`safe_sigma`).
    `kl` and `kl_target` hold the same values; with split=False the gradient of `kl` reaches S and
    σ (and `kl_target` is unused), with split=True `kl`'s reaches S only and `kl_target`'s σ only.
    Statistics run in at least fp32 (fp64 stays fp64); `out` has q's dtype. `compiled`: run the
    block functions through torch.compile. impl "lean": blocks of query rows in torch (saves q,
    k, v, σ); "triton": the forward kernel with SAVE_STATS and the two backward kernels (saves
    also `out` and the STAT_NAMES rows; fp32/fp16/bf16, CUDA or the interpreter)."""

    @staticmethod
    def forward(ctx, q, k, v, sigma, grid, scale, block, split, compiled=False, impl="lean"):
        ctx.grid, ctx.scale, ctx.split, ctx.impl = grid, scale, split, impl
        if impl == "triton":
            res, stats = i2corr_stats_forward_triton(q, k, v, sigma, grid, scale)
            ctx.save_for_backward(q, k, v, sigma, res.out, stats)
            kl_target = res.kl.clone()
            ctx.mark_non_differentiable(*([] if split else [kl_target]))
            return res.out, res.kl, kl_target, res.entropy
        b, h, n, _ = q.shape
        ct = _compute_dtype(q, sigma)
        k_t = k.to(ct).transpose(-1, -2)
        vc = v.to(ct)
        inv = 0.5 / sigma.to(ct).pow(2)
        r_i, c_i = patch_positions(grid, q.device)
        block = block or _rows_per_block(b, h, k.shape[2], budget=TILE_BUDGET)
        out = q.new_empty(q.shape)
        kl = torch.empty(b, h, n, device=q.device, dtype=ct)
        ent = torch.empty_like(kl)
        for start in range(0, n, block):
            rs = slice(start, start + block)
            out[:, :, rs], kl[:, :, rs], ent[:, :, rs] = _run_compiled(
                0, compiled, q[:, :, rs].to(ct), k_t, vc, inv[:, :, rs], r_i[rs], c_i[rs], grid, scale)
        ctx.save_for_backward(q, k, v, sigma)
        ctx.block, ctx.compiled = block, compiled
        kl_target = kl.clone()
        ctx.mark_non_differentiable(*([] if split else [kl_target]))
        return out, kl, kl_target, ent

    @staticmethod
    def backward(ctx, g_out, g_kl, g_kl_target, g_ent):
        if ctx.impl == "triton":
            q, k, v, sigma, out, stats = ctx.saved_tensors
            dq, dk, dv, d_sigma = i2corr_backward_triton(
                q, k, v, sigma, out, stats, g_out, g_kl, g_kl_target if ctx.split else g_kl, g_ent,
                ctx.grid, ctx.scale)
            return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_sigma.to(sigma.dtype),
                    None, None, None, None, None, None)
        q, k, v, sigma = ctx.saved_tensors
        grid, scale, block = ctx.grid, ctx.scale, ctx.block
        b, h, n, _ = q.shape
        ct = _compute_dtype(q, sigma)
        g_attn_kl = g_kl.to(ct)
        g_target_kl = (g_kl_target if ctx.split else g_kl).to(ct)
        g_ent, g_out = g_ent.to(ct), g_out.to(ct)
        kc, vc = k.to(ct), v.to(ct)
        sig = sigma.to(ct)
        inv = 0.5 / sig.pow(2)
        r_i, c_i = (p.to(ct) for p in patch_positions(grid, q.device))
        dq = torch.empty(q.shape, device=q.device, dtype=ct)
        dk = torch.zeros(b, *k.shape[1:], device=q.device, dtype=ct)
        dv = torch.zeros_like(dk)
        du = torch.empty(inv.shape, device=q.device, dtype=ct)
        for start in range(0, n, block):
            rs = slice(start, start + block)
            dq[:, :, rs], dk_part, dv_part, du[:, :, rs] = _run_compiled(
                1, ctx.compiled, q[:, :, rs].to(ct), kc, vc, inv[:, :, rs], r_i[rs], c_i[rs],
                r_i, c_i, g_out[:, :, rs], g_attn_kl[:, :, rs], g_target_kl[:, :, rs], g_ent[:, :, rs], grid, scale)
            dk += dk_part
            dv += dv_part
        d_sigma = -du / sig.pow(3)  # u = 1/(2σ²)
        return (dq.to(q.dtype), _split_kv_grad(dk, k.shape[0]).to(k.dtype),
                _split_kv_grad(dv, v.shape[0]).to(v.dtype), d_sigma.to(sigma.dtype),
                None, None, None, None, None, None)


def i2corr_attention(q, k, v, sigma, grid, *, scale: float | None = None, with_stats: bool = True,
                     impl: str = "lean", block: int | None = None, kl_grad: str = "both",
                     compiled: bool = False):
    """One I2Correlation attention branch (the public `fastad.kernels.i2corr_attention`):
    `fastad.kernels.i2corr.i2corr_attention`'s forward (shapes, dtypes and `impl` as there),
    differentiable in q, k, v and σ.

    Gradients: impl "reference" is autograd through the materialised formulas; otherwise, when
    an input requires grad (or kl_grad="split"), the statistics come from `I2CorrFunction`, O(N)
    memory: impl "lean" blocked torch on any device, "triton" the Triton forward and backward
    kernels (fp32/fp16/bf16; CUDA, or CPU under TRITON_INTERPRET=1).
    Without statistics the output is PyTorch's SDPA (differentiable, O(N) memory).
    kl_grad: "both" — kl's gradient reaches S and σ; "split" -> I2CorrSplitOutput, `kl` reaching
    S only and `kl_target` σ only (FOD's min-max losses). `compiled`: I2CorrFunction's blocks
    through torch.compile.
    """
    if kl_grad not in KL_GRADS:
        raise ValueError(f"kl_grad must be one of {KL_GRADS}, got {kl_grad!r}")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, sigma))
    if not with_stats or (kl_grad == "both" and (impl == "reference" or not needs_grad)):
        return forward_attention(q, k, v, sigma, grid, scale=scale, with_stats=with_stats, impl=impl,
                                 block=block)
    _check_inputs(q, k, v, sigma, grid)
    check_impl(impl, q)
    sigma = safe_sigma(sigma)
    grid = (int(grid[0]), int(grid[1]))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if impl == "reference":
        return i2corr_reference_split(q, k, v, sigma, grid, scale)
    if impl == "triton" and q.dtype == torch.float64:
        raise ValueError("impl='triton' takes fp32/fp16/bf16, got float64")
    split = kl_grad == "split"
    out, kl, kl_target, ent = I2CorrFunction.apply(q, k, v, sigma, grid, scale, block, split, compiled, impl)
    return I2CorrSplitOutput(out, kl, kl_target, ent) if split else I2CorrOutput(out, kl, ent)


def i2corr_reference_split(q, k, v, sigma, grid, scale: float) -> I2CorrSplitOutput:
    """kl_grad="split" through the plain, materialised formulas (autograd; tests)."""
    ct = _compute_dtype(q, sigma)
    attn = torch.softmax(q.to(ct) @ k.to(ct).transpose(-1, -2) * scale, dim=-1)
    r_i, c_i = patch_positions(grid, q.device)
    target = rbf_target_at(sigma.to(ct), r_i, c_i, grid)
    return I2CorrSplitOutput((attn @ v.to(ct)).to(q.dtype), sym_kl(target.detach(), attn),
                             sym_kl(target, attn.detach()), attn_entropy(attn))


__all__ = ["I2CorrFunction", "I2CorrSplitOutput", "KL_GRADS", "i2corr_attention",
           "i2corr_reference_split"]
