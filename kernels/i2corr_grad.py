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

Neither pass stores an N×M tensor: both run over blocks of query rows (each block against all M
keys, sized for the cache as the lean forward's), and the backward recomputes each block's scores
from q and k (flash attention's backward recomputes tiles the same way). Saved for the backward:
q, k, v and σ only.

`kl_grad` picks which factor the kl's gradient reaches (FOD's min-max scheme needs both kinds):
"both" — S and T̂, autograd's gradient through the plain formulas; "split" — two kl outputs of
equal value, `kl` reaching only S (sym-KL(T̂.detach(), S), the model's Div¹) and `kl_target`
reaching only σ (sym-KL(T̂, S.detach()), Div²).
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from ._impl import check_impl
from .i2corr import (LOG_EPS, I2CorrOutput, _check_inputs, _rows_per_block, at_least_fp32, attn_entropy,
                     patch_positions, rbf_target_at, safe_sigma, sym_kl)
from .i2corr import i2corr_attention as forward_attention

KL_GRADS = ("both", "split")
# Elements of one (B, H, rows, M) tile: 2²⁰ (4 MB fp32) — 128 query rows at B = 1, H = 8, N = 1024,
# the fastest of 32–256 rows forward + backward, eager and compiled (docs/results.md, "FOD
# training in O(N) memory").
TILE_BUDGET = 1 << 20


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
    """apply(q, k, v, σ, grid, scale, block, split, compiled) -> (out, kl, kl_target, entropy).

    q (B, H, N, Dh); k, v (B or 1, H, M, Dh); σ (B, H, N, 2), already floored (`safe_sigma`).
    `kl` and `kl_target` hold the same values; with split=False the gradient of `kl` reaches S and
    σ (and `kl_target` is unused), with split=True `kl`'s reaches S only and `kl_target`'s σ only.
    Statistics run in at least fp32 (fp64 stays fp64); `out` has q's dtype. `compiled`: run the
    block functions through torch.compile."""

    @staticmethod
    def forward(ctx, q, k, v, sigma, grid, scale, block, split, compiled=False):
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
        ctx.grid, ctx.scale, ctx.block, ctx.split, ctx.compiled = grid, scale, block, split, compiled
        kl_target = kl.clone()
        ctx.mark_non_differentiable(*([] if split else [kl_target]))
        return out, kl, kl_target, ent

    @staticmethod
    def backward(ctx, g_out, g_kl, g_kl_target, g_ent):
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
                None, None, None, None, None)


def i2corr_attention(q, k, v, sigma, grid, *, scale: float | None = None, with_stats: bool = True,
                     impl: str = "lean", block: int | None = None, kl_grad: str = "both",
                     compiled: bool = False):
    """One I2Correlation attention branch (the public `fastad.kernels.i2corr_attention`):
    `fastad.kernels.i2corr.i2corr_attention`'s forward (shapes, dtypes and `impl` as there),
    differentiable in q, k, v and σ.

    Gradients: impl "reference" is autograd through the materialised formulas; otherwise, when
    an input requires grad (or kl_grad="split"), the statistics come from `I2CorrFunction`
    (blocked torch, O(N) memory, any device — also for impl "triton", which has no backward yet).
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
    split = kl_grad == "split"
    out, kl, kl_target, ent = I2CorrFunction.apply(q, k, v, sigma, grid, scale, block, split, compiled)
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
