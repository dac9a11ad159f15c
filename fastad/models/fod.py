"""FOD — Focus the Discrepancy (Yao et al., ICCV 2023), reference PyTorch implementation.

Read top-down: config → correlation math (target, divergences) → I2Correlation attention →
transformer layer → one feature level → the whole model (backbone → levels → anomaly map) →
training losses.

Faithful to the paper and to the authors' public code (xcyao00/FOD, commit 7d36ddc):
- two feature levels (strides 8 and 16) of a frozen backbone, each smoothed by AvgPool2d(3, 1, 1)
  (with deviation 10 each level also carries the stage at half its stride);
- per level a 3-layer transformer (d = 256 / 512, 8 heads, FFN 4d with GELU, dropout 0) over the
  patch tokens, 1×1 projection + fixed 2-D sin/cos positional code as embedding, a separate
  embedding of the reference features (per-position mean of the training features);
- I2Correlation layer: intra = self-attention on x, inter = cross-attention with queries from x
  and keys/values from the embedded reference; Z = Z_intra − Z_inter (in the authors' code the
  residual x is added to both branches and cancels), then LN, FFN, LN (Eq. 1–2);
- σ per (batch, head, query) = 3 ** (sigmoid(5·Linear(x)) + 1e-5) − 1, σ[..., 0] with the row
  (vertical) distance, σ[..., 1] with the column distance;
- target T[i, j] ∝ exp(−(r_i − r_j)²/(2σ0²) − (c_i − c_j)²/(2σ1²)), row-normalised;
- kl(p, q) = Σ_j p (log(p + 1e-4) − log(q + 1e-4)), sym-KL and entropy with the same 1e-4,
  mean over heads, then over layers;
- min-max training (λ1 = λ2 = 0.5, rec = MSE + mean(1 − cos)), Adam lr 1e-4;
- scoring: rec = mean_c (x − x̂)² + 1 − cos, weighted by max − softmax(−div_inter) over patches
  (the code's variant of Eq. 12), bilinear upsample (align_corners=True), level average,
  Gaussian σ = 4, image score = max.

Deliberate deviations (each is tested or numerically identical):
1. No attention output projection. The authors' code computes `out_projection(out)` and discards
   the result, so their trained models have none; we follow the code (the published numbers come
   from it) and do not create the unused parameter.
2. The target is computed in log space and normalised directly: the 1/(2πσ0σ1) prefactor cancels
   in the row normalisation and the normaliser is separable (Σ_rows · Σ_cols), so
   log T = log_row[r_j] + log_col[c_j]. Identical math, but no under/overflow when σ ≈ 1e-5.
3. `loss1.backward(retain_graph=True); loss2.backward(); step()` accumulates ∇loss1 + ∇loss2 before
   one step, so we backpropagate `loss1 + loss2` once: identical gradients, half the backward work.
   The stop-gradient pairs Div¹/Div² are formed with `.detach()` exactly as in the code.
4. The inter weight is `1 − exp(−div)` (`inter_weight="global"`), not the authors'
   `max − softmax(−div)` over each image's patches (`"softmax"`, still available; `"none"` drops
   the weight). The authors' weight is normalised per image, so its scale — and the image score,
   the map's max — depends on how alike all of that image's patches diverge, and one image's map
   is not comparable with another's; `1 − exp(−div)` keeps the shape anchored at div = 0 (sym-KL
   ≥ 0) without the per-image normaliser. Chosen on the validation sets of the three PIPED
   classes (normal held-out training images + synthetic defects, trained without them): pixel
   AUROC +0.0018 / +0.0021 / +0.0016 and AUPRO +0.002 / +0.017 / +0.041 over `"softmax"` on
   BDP / FLR / ZPB, image AUROC 1.0 for both (docs/results.md, "Trained FOD on the PIPED
   classes"). At the trained models' divergences the weight is close to 1 almost everywhere, so
   `"global"` and `"none"` score alike: on these features the per-patch inter weight adds nothing
   to localisation. A scoring option only: the same trained weights serve every variant.
   (With `"softmax"` the max is taken per image; the authors take it over the whole test
   tensor, the same at their test batch size of 1.)
5. The Gaussian blur runs inside the model (separable conv, scipy's `reflect` boundary and
   `truncate=4.0`) so that the exported graph produces the final map; pixel metrics are computed
   on that final (blurred) map, whereas the authors compute pixel AUROC before the blur.
6. Off by default (`loss_queries = 0`: every query row, as the authors). Every row trains
   through the fused I2Correlation branch (`fastad.kernels.i2corr_grad`: O(N) memory, exactly the
   gradients of the materialised formulas, tests/test_i2corr_grad.py). `loss_queries = K > 0`
   computes the divergence/entropy losses on a random subset of K query rows per step at levels
   with more tokens (an unbiased estimate of their mean over queries), a CPU-time knob: on bottle
   256 rows trained in 18–19 min instead of 22.5 min with the same test metrics
   (docs/results.md, "FOD training in O(N) memory"). The attention outputs and the
   reconstruction always use every query.
7. No checkpoint selection on the test set (the authors keep the best test-set epoch): the trainer
   runs a fixed schedule.
8. Tokens are standardised per channel (mean/std of the training tokens) before both embeddings,
   and the head's output is mapped back (× std + mean). This is an affine re-parametrisation of
   the 1×1 embedding and head — the same family of functions, the losses and scores stay in the
   backbone's feature space — but Adam no longer has to grow the head to the features' scale
   (std ≈ 5–6 for EfficientNet-Lite0), which dominated the first hundreds of steps.
9. Levels are combined by their geometric mean (`level_combine="geometric"`), not the authors'
   arithmetic mean (`"mean"`, still available). The inter weight max − softmax over N_l patches
   scales each level's map by roughly 1/N_l, so the arithmetic mean is dominated by the coarse
   level (measured on bottle with EfficientNet-Lite0: level-1 scores 30× level-0's; image/pixel
   AUROC 0.9937/0.9547 with the mean vs 0.9992/0.9741 with the geometric mean, same weights).
   The product is scale-free; the authors' code keeps it as a commented-out alternative.
   With the default inter weight `global` (deviation 4) that 1/N_l scale is gone; re-scored on
   the three PIPED validation sets the arithmetic mean is mixed (pixel AUROC +0.0000 / +0.0002 /
   −0.0007, AUPRO +0.013 / +0.014 / −0.005 for BDP / FLR / ZPB), so the geometric mean stays.
10. Hypercolumn tokens (`hypercolumn=True`, default): each level's tokens are its own smoothed
   backbone stage concatenated with the smoothed stage at half its stride, 2×2-average-pooled
   onto the level's grid (stride 8: 40 + 24 channels, stride 16: 112 + 40 for EfficientNet-Lite0).
   The grids, transformers and scoring are unchanged. Reason: the authors' wide_resnet50_2
   stages carry 512/1024 channels with much local detail; EfficientNet-Lite0's carry 40/112.
   Chosen on a validation set without test images (normal training images + synthetic defects;
   bench/fod_token_screen.py, bench/fod_level_validation.py): trained-model pixel AUROC
   0.9691 -> 0.9743; on bottle's test set afterwards 0.9741 -> 0.9784 (docs/results.md).
   `hypercolumn=False` (CLI `--no-hypercolumn`) gives the authors' features; runs saved before
   this option existed load with it off.
11. The update: one Adam step per batch on the summed gradients of both levels. The authors'
   trainer (torch 1.13.1) calls zero_grad / backward / step once per level with one shared Adam;
   torch 1.13's zero_grad keeps zero tensors, so from the second level's step on every parameter
   also takes a zero-gradient Adam step for the other level (its momentum keeps moving it): about
   twice the effective step. `per_level_steps=True` (CLI `--per-level-steps`) reproduces that
   update exactly (tests/test_fod.py); its measured effect is in docs/results.md.

Where the paper and the authors' code differ, fastad follows the code (the published numbers come
from it):
- Eq. 3, reconstruction: the paper's ℓ2 norm ‖x − x̂‖₂; the code's MSE (mean over elements) plus
  mean(1 − cos), in training and scoring.
- Eq. 5, the RBF target: the paper's isotropic kernel over the distance with 2(σx² + σy²); the
  code's per-axis kernel, σ[..., 0] with row distances and σ[..., 1] with column distances.
- Eq. 7, the divergences and entropy: the paper's sums without ε; the code's sum over keys with
  +1e-4 inside each log, then the mean over heads.
- The attention scale: the paper's 1/√d_model; the code's 1/√d_head (d_model / heads).
- Resizing: the authors' `T.Resize(size, Image.ANTIALIAS)` is Lanczos; fastad resizes bilinear
  (antialiased) for every family: on four validation sets (training-free, FOD's features) Lanczos
  changed pixel AUROC by −0.0024 … +0.0001 and lowered AUPRO (docs/results.md, "Resize filter").
- The backbone: the paper's EfficientNet-B6 and the code's default wide_resnet50_2 are replaced by
  EfficientNet-Lite0 (weights embedded in the package, so training and `make demo` run offline,
  far fewer backbone FLOPs on a CPU line); deviation 10 compensates for its thinner stages.
  Not measured against wide_resnet50_2 here: its weights are not available offline.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastad import ops
from fastad.backbones import FeatureExtractor
from fastad.layers import GaussianBlur, sincos_position_code
from fastad.ops import at_least_fp32, attn_entropy, patch_positions, rbf_target_at, safe_sigma, sym_kl
from fastad.preprocess import prepare_images
from fastad.training.task import Option, Stage, Task, int_at_least
from fastad.utils import JSONConfig

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass
class FODConfig(JSONConfig):
    backbone: str = "efficientnet_lite0"
    strides: tuple[int, ...] = (8, 16)      # feature levels, as backbone reductions
    d_models: tuple[int, ...] = (256, 512)  # transformer width per level
    n_heads: int = 8
    n_layers: int = 3
    ffn_ratio: int = 4
    resize: int = 256
    crop: int = 256
    lambda1: float = 0.5
    lambda2: float = 0.5
    blur_sigma: float = 4.0
    # How the upsampled level maps are combined: "geometric" (default, deviation 9) or "mean"
    # (the authors' arithmetic mean).
    level_combine: str = "geometric"
    # The inter-correlation weight on the reconstruction error (INTER_WEIGHTS, deviation 4):
    # "global" (1 − exp(−div)), "softmax" (the authors' max − softmax(−div) over each image's
    # patches) or "none" (reconstruction error only).
    inter_weight: str = "global"
    # Training schedule (FODTask; stored so a run can be resumed/reproduced).
    # The authors' batch size and learning rate; 8 epochs (they run 100 and keep the best test
    # epoch) keep MVTec bottle within a 30-minute CPU budget, and batch 1 is also the cheapest
    # per image on CPU (timings: docs/results.md, "Training speed notes").
    epochs: int = 8
    batch_size: int = 1
    lr: float = 1e-4
    seed: int = 3407
    # Query rows per step in the KL/entropy losses at levels with more tokens than this
    # (deviation 6); 0 = all rows, as the authors, through the fused O(N)-memory branch.
    loss_queries: int = 0
    # Deviation 10: each level's tokens also carry the backbone stage at half its stride,
    # 2×2-average-pooled onto the level's grid (a hypercolumn). False = the authors' features.
    hypercolumn: bool = True
    # The authors' update (deviation 11): per level zero_grad (keeping zero tensors), backward
    # and an Adam step, instead of one step per batch on the summed gradients.
    per_level_steps: bool = False

    @classmethod
    def from_dict(cls, d: dict):
        # Runs saved before `hypercolumn` existed were trained on the authors' features.
        return super().from_dict({"hypercolumn": False, **d})

    def grid(self, level: int) -> tuple[int, int]:
        s = self.strides[level]
        return (self.crop // s, self.crop // s)

    def backbone_strides(self) -> tuple[int, ...]:
        """The backbone outputs the levels need: their own strides, plus half of each with
        `hypercolumn`."""
        finer = {s // 2 for s in self.strides} if self.hypercolumn else set()
        return tuple(sorted(set(self.strides) | finer))


# --------------------------------------------------------------------------------------------
# Correlation math: σ and the training statistics (the target and divergence formulas are
# fastad.kernels.i2corr's, through fastad.ops)
# --------------------------------------------------------------------------------------------
def transform_sigma(raw: torch.Tensor) -> torch.Tensor:
    """σ = 3 ** (sigmoid(5·raw) + 1e-5) − 1, in [SIGMA_MIN ≈ 1.1e-5, 2). The authors' constants.

    Always fp32 (fp64 stays fp64): in fp16 the expression rounds to 0 once sigmoid < ~4.4e-4."""
    return safe_sigma(torch.pow(3.0, torch.sigmoid(at_least_fp32(raw) * 5) + 1e-5) - 1)


def correlation_stats(logits: torch.Tensor, sigma: torch.Tensor, r_i: torch.Tensor,
                      c_i: torch.Tensor, grid: tuple[int, int]):
    """Training statistics of one branch from attention logits (B, H, Nq, M) and σ (B, H, Nq, 2)
    of the queries at rows r_i, columns c_i (Nq,). -> (Div¹, Div², entropy), each (B, H, Nq).

    Div¹ = sym-KL(T̂.detach(), S) reaches the attention; Div² = sym-KL(T̂, S.detach()) reaches σ.
    A pure function of tensors so that the trainer can `torch.compile` it (one fused loop over
    the N×M elements instead of ~20 eager passes; see `FOD.compile_stats`).
    """
    attn = torch.softmax(logits, dim=-1)
    target = rbf_target_at(sigma, r_i, c_i, grid)
    return sym_kl(target.detach(), attn), sym_kl(target, attn.detach()), attn_entropy(attn)


class CompiledWithFallback:
    """`torch.compile(fn)` that permanently falls back to eager `fn` if compiling fails (no C
    compiler, unsupported platform). Shapes are static per level, so each compiles once."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=False)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - any backend failure means "use eager"
                warnings.warn(f"torch.compile unavailable ({type(e).__name__}); using eager ops")
                self.compiled = None
        return self.fn(*args)


# --------------------------------------------------------------------------------------------
# I2Correlation attention
# --------------------------------------------------------------------------------------------
class BranchStats(NamedTuple):
    """Training-time statistics of one attention branch of one layer.

    div_s: sym-KL(T̂, S) with T̂ detached (gradient reaches the attention S) — Div¹, (B, H, Nq)
    div_t: sym-KL(T̂, S) with S detached (gradient reaches σ) — Div², (B, H, Nq)
    entropy: −Σ S log(S + ε), (B, H, Nq)
    """
    div_s: torch.Tensor
    div_t: torch.Tensor
    entropy: torch.Tensor


class I2CorrelationAttention(nn.Module):
    """Multi-head attention that also predicts per-query σ for the RBF target.

    x: (B, N, d) queries; kv: (Bk, M, d) keys/values with Bk ∈ {1, B} (the inter branch shares
    one reference across the batch). No output projection (see deviation 1).
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        assert d_model % n_heads == 0, (d_model, n_heads)
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.scale = self.head_dim ** -0.5
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.sigma_proj = nn.Linear(d_model, 2 * n_heads)
        self.stats_fn = correlation_stats  # swapped for a compiled version by FOD.compile_stats
        self.compiled = False  # the fused training branch's blocks through torch.compile (ditto)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)

    def project(self, x: torch.Tensor, kv: torch.Tensor):
        """-> q (B,H,N,Dh), k, v (Bk,H,M,Dh), sigma (B,H,N,2) already transformed."""
        b, n, _ = x.shape
        q = self._heads(self.q_proj(x))
        k = self._heads(self.k_proj(kv))
        v = self._heads(self.v_proj(kv))
        sigma = transform_sigma(self.sigma_proj(x).view(b, n, self.n_heads, 2).transpose(1, 2))
        return q, k, v, sigma

    def forward(self, x, kv, grid, loss_rows: torch.Tensor | None = None):
        """Training path: -> (out (B, N, d), BranchStats).

        `loss_rows`: optional (Nq,) query indices for the divergence/entropy statistics
        (deviation 6); the output always attends with every query.
        """
        q, k, v, sigma = self.project(x, kv)
        b, h, n, dh = q.shape
        if loss_rows is None:
            # Every query row: the fused branch (fastad.kernels.i2corr_grad), O(N) memory.
            res = ops.i2corr_training(q, k, v, sigma, grid, scale=self.scale, compiled=self.compiled)
            out = res.out.transpose(1, 2).reshape(b, n, h * dh)
            return out, BranchStats(res.kl, res.kl_target, res.entropy)
        if k.shape[0] != b:  # a shared reference (batch 1)
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        # Fused attention for the output; statistics on a subset of query rows.
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, n, h * dh)
        q, sigma = q[:, :, loss_rows], sigma[:, :, loss_rows]
        logits = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        r_i, c_i = patch_positions(grid, q.device)
        r_i, c_i = r_i[loss_rows], c_i[loss_rows]
        return out, BranchStats(*self.stats_fn(at_least_fp32(logits), sigma, r_i, c_i, grid))

    def inference(self, x, kv, grid, *, with_kl: bool, impl: str):
        """Scoring path: -> (out (B, N, d), sym-KL (B, H, N) or None). No gradients needed.
        `impl` picks the implementation (`fastad.ops`); all keep memory below O(B·H·N²)."""
        q, k, v, sigma = self.project(x, kv)
        b, h, n, dh = q.shape
        res = ops.i2corr_attention(q, k, v, sigma, grid, scale=self.scale, with_stats=with_kl, impl=impl)
        return res.out.transpose(1, 2).reshape(b, n, h * dh), res.kl


# --------------------------------------------------------------------------------------------
# Transformer layer and one feature level
# --------------------------------------------------------------------------------------------
class PatchEmbedding(nn.Module):
    """1×1 projection C -> d plus the fixed position code. (B, N, C) -> (B, N, d)."""

    def __init__(self, in_channels: int, d_model: int, grid: tuple[int, int]):
        super().__init__()
        self.proj = nn.Linear(in_channels, d_model)  # a 1×1 Conv1d, as a Linear over tokens
        nn.init.kaiming_normal_(self.proj.weight, mode="fan_in", nonlinearity="leaky_relu")
        self.register_buffer("pos", sincos_position_code(d_model, *grid), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.pos


class I2CorrelationLayer(nn.Module):
    """Z = Z_intra − Z_inter; x' = LN(Z); out = LN(x' + FFN(x')) (paper Eq. 1–2)."""

    def __init__(self, d_model: int, n_heads: int, ffn_ratio: int):
        super().__init__()
        self.intra = I2CorrelationAttention(d_model, n_heads)
        self.inter = I2CorrelationAttention(d_model, n_heads)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_ratio * d_model), nn.GELU(), nn.Linear(ffn_ratio * d_model, d_model)
        )
        self.norm2 = nn.LayerNorm(d_model)

    def _mix(self, z_intra, z_inter):
        x = self.norm1(z_intra - z_inter)
        return self.norm2(x + self.ffn(x))

    def forward(self, x, ref, grid, loss_rows=None):
        """Training: -> (out, intra BranchStats, inter BranchStats)."""
        z_intra, intra = self.intra(x, x, grid, loss_rows)
        z_inter, inter = self.inter(x, ref, grid, loss_rows)
        return self._mix(z_intra, z_inter), intra, inter

    def inference(self, x, ref, grid, impl: str):
        """Scoring: intra needs only its output, inter its output and sym-KL. -> (out, kl)."""
        z_intra, _ = self.intra.inference(x, x, grid, with_kl=False, impl=impl)
        z_inter, kl = self.inter.inference(x, ref, grid, with_kl=True, impl=impl)
        return self._mix(z_intra, z_inter), kl


class LevelOutput(NamedTuple):
    recon: torch.Tensor            # (B, N, C) reconstructed features
    intra: list[BranchStats]       # one per layer
    inter: list[BranchStats]


INTER_WEIGHTS = ("softmax", "global", "none")


def inter_weight(div: torch.Tensor, how: str) -> torch.Tensor | None:
    """Per-patch weight (B, N) from the inter-branch divergence `div` (B, N), FOD's Eq. 12.

    "softmax": the authors' max − softmax(−div) over each image's patches (deviation 4). Its scale
    is exp(−min div) / Σ exp(−div) of that image: an image whose patches all diverge alike (a
    global change) gets a small weight everywhere. "global": 1 − exp(−div), the same shape anchored
    at div = 0 (sym-KL ≥ 0) with no per-image normaliser. "none": no weight.
    """
    if how == "softmax":
        weight = torch.softmax(-div, dim=-1)
        return weight.amax(dim=-1, keepdim=True) - weight
    if how == "global":
        return 1.0 - torch.exp(-div)  # not expm1: ONNX has no such operator
    return None


class FODLevel(nn.Module):
    """The transformer of one feature level. Tokens (B, N, C) -> reconstruction (B, N, C)."""

    def __init__(self, in_channels: int, d_model: int, grid: tuple[int, int], cfg: FODConfig):
        super().__init__()
        self.grid = grid
        self.embed = PatchEmbedding(in_channels, d_model, grid)
        self.ref_embed = PatchEmbedding(in_channels, d_model, grid)
        n = grid[0] * grid[1]
        # Per-position mean of the (avg-pooled) training features; set by `FOD.fit_reference`.
        self.register_buffer("reference", torch.zeros(n, in_channels))
        # Per-channel mean/std of the training tokens (deviation 8): inputs are standardised
        # before the embeddings and the reconstruction is mapped back, so the loss and scores
        # stay in the backbone's feature space. Identity (0/1) until `FOD.fit_reference`.
        self.register_buffer("feature_shift", torch.zeros(in_channels))
        self.register_buffer("feature_scale", torch.ones(in_channels))
        self.layers = nn.ModuleList(
            I2CorrelationLayer(d_model, cfg.n_heads, cfg.ffn_ratio) for _ in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, in_channels)

    def _standardise(self, t: torch.Tensor) -> torch.Tensor:
        return (t - self.feature_shift) / self.feature_scale

    def _reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x)) * self.feature_scale + self.feature_shift

    def _embed(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> embedded tokens (B, N, d) and embedded reference (1, N, d), shared by the batch."""
        x = self.embed(self._standardise(tokens))
        return x, self.ref_embed(self._standardise(self.reference)).unsqueeze(0)

    def forward(self, tokens: torch.Tensor, loss_rows: torch.Tensor | None = None) -> LevelOutput:
        x, ref = self._embed(tokens)
        intra, inter = [], []
        for layer in self.layers:
            x, s_intra, s_inter = layer(x, ref, self.grid, loss_rows)
            intra.append(s_intra)
            inter.append(s_inter)
        return LevelOutput(self._reconstruct(x), intra, inter)

    def score(self, tokens: torch.Tensor, impl: str, weighting: str = "softmax") -> torch.Tensor:
        """Per-patch anomaly score (B, N): reconstruction error (mean_c (x − x̂)² + 1 − cos) ×
        inter-correlation weight (`inter_weight(div, weighting)`)."""
        x, ref = self._embed(tokens)
        div = 0.0
        for layer in self.layers:
            x, kl = layer.inference(x, ref, self.grid, impl)
            div = div + kl.mean(1)  # mean over heads
        div = div / len(self.layers)
        return ops.feature_distance(tokens, self._reconstruct(x), kind="mse_cos",
                                    weight=inter_weight(div, weighting), impl=impl)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class FOD(nn.Module):
    """Backbone features -> per-level I2Correlation transformers -> anomaly map.

    `forward(images)` takes float (B, 3, S, S) RGB in [0, 1] (S = cfg.crop; normalisation is in
    the backbone) and returns (anomaly_map (B, S, S), score (B,)).
    """

    family = "fod"  # the "model" key of a run's config.json

    def __init__(self, cfg: FODConfig, backbone: nn.Module, *, impl: str = "reference"):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.impl = ops.check_impl(impl)  # scoring's hot ops (fastad.ops); training ignores it
        if cfg.level_combine not in ("geometric", "mean"):
            raise ValueError(f"level_combine must be 'geometric' or 'mean', got {cfg.level_combine!r}")
        if cfg.inter_weight not in INTER_WEIGHTS:
            raise ValueError(f"inter_weight must be one of {INTER_WEIGHTS}, got {cfg.inter_weight!r}")
        if any(cfg.crop % s for s in cfg.backbone_strides()):
            raise ValueError(f"crop {cfg.crop} must be a multiple of every backbone stride {cfg.backbone_strides()}")
        if list(backbone.strides) != list(cfg.backbone_strides()):
            raise ValueError(f"backbone strides {tuple(backbone.strides)} != {cfg.backbone_strides()} "
                             f"needed by levels {cfg.strides} (hypercolumn={cfg.hypercolumn})")
        self.smooth = nn.AvgPool2d(3, stride=1, padding=1)  # count_include_pad=True, as authors
        channels = dict(zip(backbone.strides, backbone.channels))
        self.levels = nn.ModuleList(
            FODLevel(channels[s] + (channels[s // 2] if cfg.hypercolumn else 0), d, cfg.grid(i), cfg)
            for i, (s, d) in enumerate(zip(cfg.strides, cfg.d_models))
        )
        self.blur = GaussianBlur(cfg.blur_sigma, cfg.crop)

    def compile_stats(self) -> None:
        """Use a `torch.compile`d `correlation_stats` in every attention branch (faster training,
        docs/results.md "Training speed notes"). Falls back to eager, with a warning, where
        compilation fails."""
        fn = CompiledWithFallback(correlation_stats)
        for module in self.modules():
            if isinstance(module, I2CorrelationAttention):
                module.stats_fn = fn
                module.compiled = True

    def tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, S, S) in [0, 1] -> per-level smoothed tokens [(B, N_l, C_l)]."""
        assert images.dim() == 4 and images.shape[1] == 3, images.shape
        with torch.no_grad():
            feats = dict(zip(self.backbone.strides, (self.smooth(f) for f in self.backbone(images))))
        levels = []
        for s in self.cfg.strides:
            f = feats[s]
            if self.cfg.hypercolumn:  # deviation 10: the finer stage, pooled onto this grid
                f = torch.cat([f, F.avg_pool2d(feats[s // 2], 2)], 1)
            levels.append(f.flatten(2).transpose(1, 2))
        return levels

    @torch.no_grad()
    def fit_reference(self, level_tokens: list[torch.Tensor]) -> None:
        """Set each level's reference to the per-position mean of training tokens [(n, N, C)],
        and its per-channel standardisation to their mean/std (deviation 8)."""
        for level, toks in zip(self.levels, level_tokens):
            toks = toks.float()
            level.reference.copy_(toks.mean(0))
            level.feature_shift.copy_(toks.mean((0, 1)))
            level.feature_scale.copy_(toks.std((0, 1)).clamp_min(1e-6))

    def patch_scores(self, level_tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        return [level.score(t, self.impl, self.cfg.inter_weight) for level, t in zip(self.levels, level_tokens)]

    def level_maps(self, patch_scores: list[torch.Tensor]) -> torch.Tensor:
        """Per-level (B, N_l) -> (L, B, S, S), bilinear upsample (align_corners)."""
        size = (self.cfg.crop, self.cfg.crop)
        return torch.stack([
            F.interpolate(s.view(-1, 1, *self.cfg.grid(i)), size=size, mode="bilinear",
                          align_corners=True)[:, 0]
            for i, s in enumerate(patch_scores)
        ])

    @staticmethod
    def combine_levels(maps: torch.Tensor, how: str) -> torch.Tensor:
        """(L, B, S, S) -> (B, S, S): "mean" (the authors') or "geometric" (deviation 9)."""
        if how == "mean":
            return maps.mean(0)
        # geometric mean: invariant to each level's scale
        return maps.clamp_min(0).prod(0).pow(1.0 / len(maps))

    def anomaly_map(self, patch_scores: list[torch.Tensor]) -> torch.Tensor:
        """Per-level (B, N_l) -> bilinear upsample (align_corners) -> combine levels -> blur."""
        return self.blur(self.combine_levels(self.level_maps(patch_scores), self.cfg.level_combine))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = self.anomaly_map(self.patch_scores(self.tokens(images)))
        return amap, amap.flatten(1).amax(1)


# --------------------------------------------------------------------------------------------
# Training losses (the min-max pattern of the authors' trainer)
# --------------------------------------------------------------------------------------------
class FODLosses(NamedTuple):
    total: torch.Tensor   # loss1 + loss2: what is backpropagated (deviation 3)
    loss1: torch.Tensor
    loss2: torch.Tensor
    rec: torch.Tensor
    intra_div: torch.Tensor
    inter_div: torch.Tensor
    intra_entropy: torch.Tensor
    inter_entropy: torch.Tensor


def _layer_mean(stats: list[BranchStats], field_name: str) -> torch.Tensor:
    """Mean over (batch, heads, queries) per layer, then over layers (torch.mean(kl_loss(...)))."""
    return torch.stack([getattr(s, field_name).mean() for s in stats]).mean()


def fod_level_losses(tokens: torch.Tensor, out: LevelOutput, cfg: FODConfig) -> FODLosses:
    """loss1 = rec + λ1·Div²_intra − λ1·Div²_inter
    loss2 = rec − λ1·Div¹_intra − λ2·Ent_intra + λ1·Div¹_inter + λ2·Ent_inter"""
    rec = F.mse_loss(out.recon, tokens) + (1 - F.cosine_similarity(out.recon, tokens, dim=-1)).mean()
    div1_intra, div2_intra = _layer_mean(out.intra, "div_s"), _layer_mean(out.intra, "div_t")
    div1_inter, div2_inter = _layer_mean(out.inter, "div_s"), _layer_mean(out.inter, "div_t")
    ent_intra, ent_inter = _layer_mean(out.intra, "entropy"), _layer_mean(out.inter, "entropy")
    l1, l2 = cfg.lambda1, cfg.lambda2
    loss1 = rec + l1 * div2_intra - l1 * div2_inter
    loss2 = rec - l1 * div1_intra - l2 * ent_intra + l1 * div1_inter + l2 * ent_inter
    return FODLosses(loss1 + loss2, loss1, loss2, rec, div1_intra.detach(), div1_inter.detach(),
                     ent_intra.detach(), ent_inter.detach())


# --------------------------------------------------------------------------------------------
# Training task (driven by fastad.training.loop)
# --------------------------------------------------------------------------------------------
TRAIN_OPTIONS = (
    Option("hypercolumn", "--no-hypercolumn",
           dict(action="store_false", default=None,
                help="the authors' features: each level's own backbone stage only (deviation 10)")),
    Option("per_level_steps", "--per-level-steps",
           dict(action="store_true", default=None,
                help="the authors' update: one Adam step per level, zero gradients kept (deviation 11)")),
    Option("loss_queries", "--loss-queries",
           dict(type=int_at_least(0, "non-negative"), default=None,
                help="query rows per step in the KL/entropy losses (deviation 6); 0 = every row, "
                     "as the authors")),
    Option("inter_weight", "--inter-weight",
           dict(choices=list(INTER_WEIGHTS), default=None,
                help="scoring weight from the inter-branch divergence: global (1 - exp(-div), "
                     "default), softmax (the authors', per image) or none")),
    # Python API only: torch.compile the KL/entropy statistics (default on unless FASTAD_COMPILE=0);
    # ~3x faster CPU steps after ~20 s of compiling.
    Option("compile_stats", None),
)


class FODTask(Task):
    """The backbone is frozen and the authors use no augmentation, so every training image's
    tokens are computed once and cached (bottle: 209 images, ~60 MB); an epoch costs only the
    transformers. One Adam over all levels; a step's loss is the sum of the levels' losses (they
    share no parameters, so each level gets its own gradients), backpropagated once by the loop."""

    config_class = FODConfig

    def backbone(self, cfg: FODConfig, saved_run):
        return FeatureExtractor(cfg.backbone, cfg.backbone_strides(), weights=self.options.get("weights") or "auto")

    def prepare(self, model: FOD, samples, device, progress: bool) -> dict:
        self.model, self.device = model, device
        t0 = time.perf_counter()
        self.tokens = cache_tokens(model, [s.path for s in samples], device, self.map_batches, progress=progress)
        feature_seconds = time.perf_counter() - t0
        model.fit_reference([t.to(device) for t in self.tokens])
        compile_stats = self.options.get("compile_stats")
        if compile_stats is None:
            compile_stats = os.environ.get("FASTAD_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")
        if compile_stats:
            model.compile_stats()
        return {"compiled_stats": compile_stats, "feature_seconds": round(feature_seconds, 2)}

    def stages(self, model: FOD, device) -> list[Stage]:
        cfg = model.cfg
        params = [p for p in model.levels.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=cfg.lr)

        def level_losses(li, idx, gen):
            x = self.tokens[li][idx].to(device, non_blocking=True)
            rows = None
            if cfg.loss_queries and cfg.loss_queries < x.shape[1]:  # deviation 6
                rows = torch.randperm(x.shape[1], generator=gen)[:cfg.loss_queries].to(device)
            return fod_level_losses(x, model.levels[li](x, rows), cfg)

        def record(li, out):
            return {f"l{li}_{k}": getattr(out, k).item() for k in ("loss1", "loss2", "rec")}

        def step(idx, gen, _):
            losses, total = {}, 0.0
            for li in range(len(model.levels)):
                out = level_losses(li, idx, gen)
                total = total + out.total  # the levels share no parameters: one backward, same gradients
                losses |= record(li, out)
            return total, losses

        def authors_step(idx, gen, _):
            """The authors' trainer under torch 1.13: for each level zero_grad() — which kept
            zero tensors — backward, step. Every parameter that ever had a gradient then takes
            one Adam step per level, the other levels' with a zero gradient (momentum moves it)."""
            if self.fill_zero_grads:  # resumed mid-run: the grads the uninterrupted run would hold
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                self.fill_zero_grads = False
            losses = {}
            for li in range(len(model.levels)):
                out = level_losses(li, idx, gen)
                opt.zero_grad(set_to_none=False)
                out.total.backward()
                opt.step()
                losses |= record(li, out)
            return None, losses

        self.fill_zero_grads = False
        if cfg.per_level_steps:
            return [Stage("train", cfg.epochs, opt, authors_step, len(self.tokens[0]), cfg.batch_size,
                          steps_itself=True)]
        return [Stage("train", cfg.epochs, opt, step, len(self.tokens[0]), cfg.batch_size)]

    def checkpoint_state(self) -> dict:
        return {"reference_fingerprint": self._reference_digest()}

    def resumed(self, record: dict) -> None:
        self.fill_zero_grads = any(record.get("epochs_done", {}).values())
        if record.get("reference_fingerprint") != self._reference_digest():
            log.warning(
                "training images changed since the checkpoint: reference features recomputed")
        self.model.fit_reference([t.to(self.device) for t in self.tokens])

    def _reference_digest(self) -> str:
        """A short digest of the reference features (to notice changed training data on resume)."""
        h = hashlib.sha256()
        for level in self.model.levels:
            h.update(level.reference.detach().cpu().numpy().astype("float32").tobytes())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def image_scores(self, indices: list[int], batch_size: int = 8):
        scores = [torch.zeros(0)]
        for start in range(0, len(indices), batch_size):
            rows = torch.as_tensor(indices[start:start + batch_size], dtype=torch.long)
            batch = [t[rows].to(self.device) for t in self.tokens]
            amap = self.model.anomaly_map(self.model.patch_scores(batch))
            scores.append(amap.flatten(1).amax(1).float().cpu())
        return torch.cat(scores).numpy()


@torch.no_grad()
def cache_tokens(model: FOD, paths: list, device: torch.device, map_batches, batch_size: int = 16,
                 progress: bool = True) -> list[torch.Tensor]:
    """Backbone tokens of every image, per level [(n, N_l, C_l)] on the CPU (fp32), computed
    batch by batch through `map_batches` (`Task.map_batches`: spread over the processes of a
    data-parallel run)."""
    from tqdm.auto import tqdm

    cfg = model.cfg
    bar = tqdm(total=len(paths), desc="features", unit="img", disable=None if progress else True, leave=False)

    def batch_tokens(_, start, stop):
        images = prepare_images(paths[start:stop], cfg.resize, cfg.crop).to(device)
        toks = [t.float().cpu() for t in model.tokens(images)]
        bar.update(stop - start)
        return toks

    batches = map_batches(batch_tokens, len(paths), batch_size)
    bar.close()
    return [torch.cat(level) for level in zip(*batches)]
