"""ADTR — Anomaly Detection Transformer with feature reconstruction (You et al., arXiv 2209.01816).

Read top-down: config → transformer blocks → the model (backbone → one feature grid →
reconstruction transformer → L2 distance map → upsample, blur, image score) → losses (normal-only
MSE and the anomaly-available FCDD-style objectives of ADTR+) → synthetic anomalies.

The paper has no public code. This is our reconstruction of its method from public summaries
(the issue text is the specification):
- features of a frozen ImageNet CNN, several stages resized to one grid and concatenated
  (paper: EfficientNet-B4, five stages, 720 channels, 16×16 at 256² input);
- a 1×1 conv C → 256, learned position embedding, 4 encoder + 4 decoder layers (8 heads,
  FFN 256 → 1024 → 256, residual + LayerNorm); decoder layers do self-attention, then
  cross-attention to the encoder output; the decoder's input is a learnable auxiliary query
  embedding (one vector per grid position), so the encoded features enter only through
  cross-attention; a 1×1 conv 256 → C back to feature space;
- normal-only loss: MSE between features f and reconstruction f̂;
- ADTR+ (anomalies available), d = f − f̂, φ(u) = sqrt(((1/C)·Σ_i |d(i, u)|)² + 1) − 1:
  pixel labels  L_px  = (1/HW)·Σ_u (1 − y(u))·φ(u) − α·log(1 − exp(−(1/HW)·Σ_u y(u)·φ(u)));
  image labels  L_img = (1 − y)·q − α·y·log(1 − exp(−q)),  q = mean of the top-k φ(u);
  α = 0.003 (paper);
- scoring: per-position L2 norm of d over channels → upsample → Gaussian blur → anomaly map;
  image score = max of the average-pooled map.

Choices where the specification is silent or ambiguous (each is a config field):
1. Backbone stages. The offline default is EfficientNet-Lite0 (strides 2/4/8/16/32 with
   16/24/40/112/320 channels). We use strides 4, 8, 16 (24 + 40 + 112 = 176 channels) on the
   stride-16 grid (16×16 at 256², the paper's grid). Measured on MVTec bottle with a model-free
   baseline (L2 distance to the per-position mean feature): adding the stride-32 stage lowers pixel
   AUROC from 0.975 to 0.964, the stride-2 stage adds nothing; the 32×32 grid gains +0.002 pixel
   AUROC for 4× the tokens (16× the attention cost) — not worth it on a CPU budget.
2. Resizing to the grid: each stage is first smoothed by AvgPool2d(3, stride 1, pad 1) (as FOD;
   +0.007 pixel AUROC in the baseline), then finer stages are average-pooled with kernel = stride =
   grid_stride / stage_stride, coarser ones bilinearly upsampled. Static shapes, ONNX-friendly.
3. Features f stay in the backbone's scale (loss and score are computed there), but the
   transformer sees them standardised — minus the per-position mean of the training features,
   divided by the per-channel std — and its output is mapped back (× std + per-position mean).
   The 1×1 conv back to feature space is zero-initialised, so training starts from f̂ = the
   per-position mean (a sound detector already: image/pixel AUROC 0.996/0.975 on bottle) instead of
   random features; the transformer learns the input-dependent part. This is *not* a
   re-parametrisation of the paper's network: the per-position offset −μ_u/σ enters the input
   tokens and therefore the attention values (the paper's position embedding is added to queries
   and keys only, and its 1×1 conv has one bias for every position), and the output gets a fixed
   per-position bias μ_u; the paper's network can only approximate either through its learned
   queries. Consequence: ADTR's untrained start (`fastad train --epochs 0`) *is* the
   per-position-mean baseline, which is what every trained model here is measured against
   (docs/results.md). Raw scale rather than standardised features for the distance: the baseline
   scores 0.975 vs 0.972 pixel AUROC.
4. Position embedding: one learned vector per grid position, initialised with the 2-D sin/cos
   code, added to queries and keys of every attention (DETR style); the auxiliary decoder query is
   a learned (N, d) parameter initialised N(0, 0.02²). Post-norm layers, ReLU FFN, dropout 0 by
   default (the data are small and the budget is a few minutes on a CPU; set `dropout` otherwise).
5. Upsampling is bilinear with align_corners=False (grid cells are pixel blocks), blur σ = 4
   (scipy-equal, shared with FOD), and the image score is the max of AvgPool2d(score_pool = 16,
   stride 1) over the final map — one grid cell's worth of pixels.
6. ADTR+ details: normal training images always get the pixel-level loss with y ≡ 0 (every
   position of a normal image is known normal), i.e. mean φ — also in the image-label mode, where
   only the labelled anomalous images use the top-k term. Pixel labels y(u) on the grid are the
   fraction of the cell covered by the mask (area average), not a hard 0/1. The α-term is applied
   only to images that contain anomalous positions, and log(1 − exp(−s)) is computed as
   log(−expm1(−s)) with s ≥ 1e-6 (no log 0). k for the top-k mean defaults to 20 (the paper's
   CIFAR-10 value; ~8% of a 16×16 grid).
7. Each ADTR+ step uses a batch of normal images plus `anomaly_batch` anomalous images drawn
   cyclically from the anomaly pool (real labelled images and/or the synthetic pool), so the few
   labelled anomalies are seen every few steps.
8. Synthetic anomalies (`confetti`, `perlin`, `cutpaste`) are generated once per run from the
   training images (seeded, so `--resume` rebuilds the same pool), their features cached like the
   normal ones. The paper uses confetti noise (FCDD); Perlin-noise defects follow DRAEM (with a
   noise texture instead of DTD images, which are not available offline) and cut-paste follows
   CutPaste.
9. Feature jitter (UniAD, You et al. 2022 — the same authors' follow-up with released code; not in
   the ADTR paper): during training the standardised input tokens get Gaussian noise of std
   `jitter` (in units of the per-channel std) while the target stays the clean f. A network that
   sees clean inputs can lower its loss by copying them (the identity shortcut the learned queries
   are meant to block, but cross-attention can still route each position to itself); with noisy
   inputs it has to learn what normal features look like and restore them, so anomalous features
   are "restored" towards normal ones and keep a large error (the intent; how little it changed
   the scores here is in docs/results.md). UniAD's jitter has std
   20·‖f_u‖/C on raw features (prob. 1); here the std is a plain constant on standardised tokens
   (comparable: ‖f_u‖/C·20 ≈ 20/√C ≈ 1.5 for unit-variance channels, C = 176). Default 1.0,
   chosen on a validation set without test images; the measurements, including the other values
   tried, are in docs/results.md ("ADTR learning curve").
10. CPU schedule (`schedule="cpu"`, the default): a smaller transformer than the paper's (d 128,
   4 heads, 2 encoder + 2 decoder layers, FFN 512; lr 1e-3, 12 epochs) so that a CPU run takes
   several hundred steps in the time the paper's (d 256, 4 + 4 layers) takes for about a hundred.
   Step costs and how much these steps change the scores: docs/results.md ("ADTR learning
   curve"). `ADTRConfig.gpu()` / `--schedule gpu` keeps the paper's transformer with UniAD's
   released optimiser and schedule (AdamW 1e-4, 1000 epochs; ADTR's own schedule is not
   published).
11. Decoder cross-attention bias (off unless the config sets it): `neighbour_mask` is UniAD's
   neighbour masked attention (its released MVTec config masks a 7×7 window of a 14×14 grid in the
   decoder's cross-attention): a query cannot read the memory around its own position, so it must
   predict it from context. `locality` adds −d²/(2σ²) (d: grid distance) to the same logits, a
   local prior so that each query starts by reading its surroundings instead of the uniform
   average that random projections give — a device of ours for learning fast on a CPU, not in
   either paper. Both stay off by default; what they did on the validation set is in
   docs/results.md ("ADTR learning curve").
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastad import ops
from fastad.backbones import FeatureExtractor
from fastad.data.dataset import AnomalyDataset
from fastad.preprocess import prepare_images
from fastad.data.layouts import list_anomaly_samples
from fastad.data.synthetic import SYNTHETIC_KINDS, synthesise
from fastad.errors import FastADError
from fastad.layers import GaussianBlur, sincos_position_code
from fastad.training.task import Option, Stage, Task
from fastad.utils import JSONConfig, seed_everything

ANOMALY_LABELS = ("image", "pixel")
SCHEDULES = ("cpu", "gpu")
LOG_GUARD = 1e-6  # smallest s in log(1 − exp(−s)): keeps the α-term finite


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass
class ADTRConfig(JSONConfig):
    backbone: str = "efficientnet_lite0"
    strides: tuple[int, ...] = (4, 8, 16)  # backbone stages, as reductions (choice 1)
    grid_stride: int = 16                  # the one feature grid: crop // grid_stride per side
    smooth: int = 3                        # AvgPool2d kernel on each stage before resizing; 1 = off
    # CPU schedule (choice 10): a smaller transformer than the paper's (ADTRConfig.gpu()).
    d_model: int = 128
    n_heads: int = 4
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    ffn_dim: int = 512
    dropout: float = 0.0
    jitter: float = 1.0                    # std of the training noise on the standardised input tokens (choice 9)
    neighbour_mask: int = 0                # decoder cross-attention cannot see this window around the query; 0 = off (choice 11)
    locality: float = 0.0                  # σ (grid cells) of a Gaussian local prior on the decoder cross-attention; 0 = off
    resize: int = 256
    crop: int = 256
    blur_sigma: float = 4.0
    score_pool: int = 16                   # AvgPool2d kernel on the final map before the max
    # Training schedule (ADTRTask). AdamW as DETR-style transformers; cosine decay to 1% of lr.
    epochs: int = 12
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 3407
    # Anomaly-available training (ADTR+). anomaly_labels: None, "image" or "pixel" for real
    # labelled anomalies; synthetic: None or one of SYNTHETIC_KINDS.
    anomaly_labels: str | None = None
    synthetic: str | None = None
    synthetic_pool: int = 0                # synthetic images generated per run; 0 = one per training image
    anomaly_batch: int = 4                 # anomalous images added to every step (choice 7)
    alpha: float = 0.003
    topk: int = 20
    schedule: str = "cpu"

    @classmethod
    def gpu(cls, **kw) -> "ADTRConfig":
        """The paper's transformer (d 256, 8 heads, 4 + 4 layers, FFN 1024) with UniAD's released
        schedule (AdamW, lr 1e-4, weight decay 1e-4, 1000 epochs, batch 8 per GPU). Needs a GPU."""
        base = dict(d_model=256, n_heads=8, n_encoder_layers=4, n_decoder_layers=4, ffn_dim=1024,
                    epochs=1000, batch_size=8, lr=1e-4, schedule="gpu")
        return cls(**(base | kw))


    @property
    def grid(self) -> tuple[int, int]:
        return (self.crop // self.grid_stride, self.crop // self.grid_stride)

    @property
    def anomaly_available(self) -> bool:
        return self.anomaly_labels is not None or self.synthetic is not None

    def validate(self) -> None:
        """Raise ValueError for inconsistent settings (the trainer turns it into a FastADError)."""
        if self.crop % self.grid_stride:
            raise ValueError(f"crop {self.crop} must be a multiple of grid_stride {self.grid_stride}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by n_heads {self.n_heads}")
        if self.anomaly_labels not in (None, *ANOMALY_LABELS):
            raise ValueError(f"anomaly_labels must be image or pixel, got {self.anomaly_labels!r}")
        if self.synthetic not in (None, *SYNTHETIC_KINDS):
            raise ValueError(f"synthetic must be one of {', '.join(SYNTHETIC_KINDS)}, got {self.synthetic!r}")
        n = self.grid[0] * self.grid[1]
        if not 1 <= self.topk <= n:
            raise ValueError(f"topk must be in 1..{n} (grid positions), got {self.topk}")
        if self.alpha < 0 or self.anomaly_batch < 1 or self.synthetic_pool < 0 or self.jitter < 0:
            raise ValueError("alpha and jitter must be >= 0, anomaly_batch >= 1, synthetic_pool >= 0")
        if self.neighbour_mask < 0 or self.neighbour_mask % 2 == 0 and self.neighbour_mask or self.locality < 0:
            raise ValueError("neighbour_mask must be 0 or an odd window size, locality >= 0")
        if self.neighbour_mask and self.neighbour_mask >= min(self.grid):
            raise ValueError(f"neighbour_mask {self.neighbour_mask} must be smaller than the grid {self.grid}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.score_pool < 1 or self.score_pool > self.crop or self.smooth < 1 or self.smooth % 2 == 0:
            raise ValueError("score_pool must be in 1..crop and smooth an odd kernel size >= 1")


# --------------------------------------------------------------------------------------------
# Transformer blocks (post-norm, DETR style: positions added to queries and keys)
# --------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head attention. q_in (B, Nq, d), k_in/v_in (B, Nk, d) -> (B, Nq, d)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, q_in, k_in, v_in, bias: torch.Tensor | None = None):
        """`bias` (Nq, Nk): added to the attention logits (−inf: masked)."""
        b, n, d = q_in.shape
        q, k, v = self._heads(self.q_proj(q_in)), self._heads(self.k_proj(k_in)), self._heads(self.v_proj(v_in))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, ffn_dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, d_model))

    def forward(self, x):
        return self.net(x)


class EncoderLayer(nn.Module):
    """x = LN(x + SelfAttn(x + pos, x + pos, x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: ADTRConfig):
        super().__init__()
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, pos):
        qk = x + pos
        x = self.norm1(x + self.drop(self.attn(qk, qk, x)))
        return self.norm2(x + self.drop(self.ffn(x)))


class DecoderLayer(nn.Module):
    """t = LN(t + SelfAttn(t + pos, t + pos, t)); t = LN(t + CrossAttn(t + pos, mem + pos, mem));
    t = LN(t + FFN(t))."""

    def __init__(self, cfg: ADTRConfig):
        super().__init__()
        self.self_attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.cross_attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.dropout)
        self.norm3 = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, t, memory, pos, cross_bias=None):
        qk = t + pos
        t = self.norm1(t + self.drop(self.self_attn(qk, qk, t)))
        t = self.norm2(t + self.drop(self.cross_attn(t + pos, memory + pos, memory, cross_bias)))
        return self.norm3(t + self.drop(self.ffn(t)))


class ReconstructionTransformer(nn.Module):
    """Standardised tokens (B, N, C) -> reconstruction (B, N, C) in the same (standardised) space.

    The decoder starts from a learned query embedding (N, d) shared by all images: the encoded
    features reach the output only through cross-attention (the paper's remedy for the "identical
    mapping" that lets a reconstruction network copy anomalies through).
    """

    def __init__(self, in_channels: int, n_tokens: int, cfg: ADTRConfig):
        super().__init__()
        self.input_proj = nn.Linear(in_channels, cfg.d_model)   # the 1×1 conv C -> d
        grid = int(round(math.sqrt(n_tokens)))
        pos = sincos_position_code(cfg.d_model, grid, n_tokens // grid)
        self.pos_embed = nn.Parameter(pos.unsqueeze(0))           # (1, N, d), learned
        self.query_embed = nn.Parameter(torch.randn(1, n_tokens, cfg.d_model) * 0.02)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        self.output_proj = nn.Linear(cfg.d_model, in_channels)  # the 1×1 conv d -> C
        bias = cross_attention_bias(grid, n_tokens // grid, cfg.neighbour_mask, cfg.locality)
        self.register_buffer("cross_bias", bias, persistent=False)  # derived from the config
        # Zero-initialised: training starts from f̂ = the per-position mean feature (choice 3).
        nn.init.zeros_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        memory = self.input_proj(tokens)
        for layer in self.encoder:
            memory = layer(memory, self.pos_embed)
        t = self.query_embed.expand(b, -1, -1)
        for layer in self.decoder:
            t = layer(t, memory, self.pos_embed, self.cross_bias)
        return self.output_proj(t)


def cross_attention_bias(h: int, w: int, neighbour_mask: int, locality: float) -> torch.Tensor | None:
    """Decoder cross-attention logit bias (N, N) on an h × w grid (choice 11), or None when both are
    off: −d²/(2·locality²) for grid distance d (a local prior), and −inf for the memory positions
    within the `neighbour_mask` × `neighbour_mask` window around the query (UniAD's neighbour masked
    attention: a position cannot read its own neighbourhood, so it cannot copy itself)."""
    if not neighbour_mask and not locality:
        return None
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    p = torch.stack([ys.flatten(), xs.flatten()], 1).float()
    diff = p[:, None, :] - p[None, :, :]
    bias = torch.zeros(h * w, h * w)
    if locality:
        bias = bias - diff.pow(2).sum(-1) / (2 * locality ** 2)
    if neighbour_mask:
        bias = bias.masked_fill(diff.abs().amax(-1) <= neighbour_mask // 2, float("-inf"))
    return bias


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class ADTR(nn.Module):
    """Frozen backbone -> one feature grid -> reconstruction transformer -> anomaly map.

    `forward(images)` takes float (B, 3, S, S) RGB in [0, 1] (S = cfg.crop; normalisation is in the
    backbone) and returns (anomaly_map (B, S, S), score (B,)): the map is the blurred, upsampled
    per-position L2 reconstruction error; the score the max of its average-pooled version.
    """

    family = "adtr"

    def __init__(self, cfg: ADTRConfig, backbone: nn.Module, *, impl: str = "reference"):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.backbone = backbone
        self.impl = ops.check_impl(impl)  # the distance's implementation (fastad.ops)
        if list(backbone.strides) != list(cfg.strides):
            raise ValueError(f"backbone strides {backbone.strides} != config {cfg.strides}")
        self.grid = cfg.grid
        self.in_channels = int(sum(backbone.channels))
        n_tokens = self.grid[0] * self.grid[1]
        self.smooth = nn.AvgPool2d(cfg.smooth, stride=1, padding=cfg.smooth // 2) if cfg.smooth > 1 else nn.Identity()
        # Per-position mean and per-channel std of the training features (choice 3); identity
        # until fit_normalisation.
        self.register_buffer("feature_shift", torch.zeros(n_tokens, self.in_channels))
        self.register_buffer("feature_scale", torch.ones(self.in_channels))
        self.transformer = ReconstructionTransformer(self.in_channels, n_tokens, cfg)
        self.blur = GaussianBlur(cfg.blur_sigma, cfg.crop) if cfg.blur_sigma > 0 else nn.Identity()
        self.score_pool = nn.AvgPool2d(cfg.score_pool, stride=1)

    # -- features ----------------------------------------------------------------------------
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [0, 1] -> features f on the grid as tokens (B, N, C)."""
        assert images.dim() == 4 and images.shape[1] == 3, images.shape
        gh, gw = self.grid
        with torch.no_grad():
            feats = self.backbone(images)
        parts = []
        for stride, f in zip(self.cfg.strides, feats):
            f = self.smooth(f)
            if stride < self.cfg.grid_stride:
                k = self.cfg.grid_stride // stride
                f = F.avg_pool2d(f, k, stride=k)
            elif stride > self.cfg.grid_stride:
                f = F.interpolate(f, size=(gh, gw), mode="bilinear", align_corners=False)
            parts.append(f)
        return torch.cat(parts, 1).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def fit_normalisation(self, tokens: torch.Tensor) -> None:
        """Per-position mean (N, C) and per-channel std (C,) of training tokens (n, N, C) (choice 3)."""
        tokens = tokens.float()
        shift = tokens.mean(0)
        self.feature_shift.copy_(shift)
        self.feature_scale.copy_((tokens - shift).std((0, 1)).clamp_min(1e-6))

    # -- reconstruction and scoring ------------------------------------------------------------
    def reconstruct(self, tokens: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """f (B, N, C) -> f̂ (B, N, C), both in the backbone's feature scale. `noise` (B, N, C),
        training only: added to the standardised tokens the transformer sees (choice 9)."""
        assert tokens.dim() == 3 and tokens.shape[1:] == (self.grid[0] * self.grid[1], self.in_channels), \
            (tuple(tokens.shape), self.grid, self.in_channels)
        x = (tokens - self.feature_shift) / self.feature_scale
        if noise is not None:
            x = x + noise
        return self.transformer(x) * self.feature_scale + self.feature_shift

    def patch_scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-position ‖f − f̂‖₂ over channels (B, N)."""
        return ops.feature_distance(tokens, self.reconstruct(tokens), kind="l2", impl=self.impl)

    def anomaly_map(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """(B, N) -> bilinear upsample to (S, S) -> Gaussian blur -> (B, S, S)."""
        b = patch_scores.shape[0]
        size = (self.cfg.crop, self.cfg.crop)
        up = F.interpolate(patch_scores.reshape(b, 1, *self.grid), size=size, mode="bilinear", align_corners=False)
        return self.blur(up[:, 0])

    def image_score(self, amap: torch.Tensor) -> torch.Tensor:
        """Max of the average-pooled map: (B, S, S) -> (B,)."""
        return self.score_pool(amap.unsqueeze(1)).flatten(1).amax(1)

    def score_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = self.anomaly_map(self.patch_scores(tokens))
        return amap, self.image_score(amap)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.score_tokens(self.tokens(images))


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
def mse_loss(tokens: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Normal-only ADTR: mean squared error between features and reconstruction."""
    return F.mse_loss(recon, tokens)


def pseudo_huber_score(tokens: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """φ(u) = sqrt(((1/C)·Σ_i |d(i, u)|)² + 1) − 1 with d = f − f̂: (B, N, C) -> (B, N)."""
    a = (tokens - recon).abs().mean(-1)
    return torch.sqrt(a * a + 1) - 1


def _log_one_minus_exp_neg(s: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(−s)) for s ≥ 0, guarded: s clamped to ≥ LOG_GUARD, computed as log(−expm1(−s))."""
    return torch.log(-torch.expm1(-s.clamp_min(LOG_GUARD)))


def pixel_label_loss(phi: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """L_px per image: (1/HW)·Σ (1 − y)·φ − α·log(1 − exp(−(1/HW)·Σ y·φ)).

    phi, y: (B, N) with y in [0, 1] (area fraction of the cell that is anomalous). The α-term is
    applied only to images with anomalous positions (for y ≡ 0 it is −α·log 0). -> (B,)
    """
    normal = ((1 - y) * phi).mean(-1)
    s = (y * phi).mean(-1)
    has = (y.sum(-1) > 0).to(phi.dtype)
    return normal - alpha * has * _log_one_minus_exp_neg(s)


def image_label_loss(phi: torch.Tensor, y: torch.Tensor, alpha: float, k: int) -> torch.Tensor:
    """L_img per image: (1 − y)·q − α·y·log(1 − exp(−q)), q = mean of the top-k φ. phi (B, N),
    y (B,) in {0, 1}. -> (B,)"""
    q = phi.topk(min(k, phi.shape[-1]), dim=-1).values.mean(-1)
    y = y.to(phi.dtype)
    return (1 - y) * q - alpha * y * _log_one_minus_exp_neg(q)


class ADTRLosses(NamedTuple):
    total: torch.Tensor   # what is backpropagated
    normal: torch.Tensor  # mean loss over the normal images (MSE or mean φ)
    anomalous: torch.Tensor  # mean loss over the anomalous images (0 without any)


def anomaly_available_loss(phi_normal: torch.Tensor, phi_px: torch.Tensor | None, y_px: torch.Tensor | None,
                           phi_img: torch.Tensor | None, cfg: ADTRConfig) -> ADTRLosses:
    """ADTR+ objective on one step (choice 6): normal images (B, N) get mean φ (pixel loss with y ≡ 0),
    pixel-labelled anomalies L_px, image-labelled anomalies L_img with y = 1. Mean over all images."""
    zero = phi_normal.new_zeros(())
    normal = phi_normal.mean(-1)
    parts = []
    if phi_px is not None:
        parts.append(pixel_label_loss(phi_px, y_px, cfg.alpha))
    if phi_img is not None:
        parts.append(image_label_loss(phi_img, torch.ones(phi_img.shape[0], device=phi_img.device), cfg.alpha, cfg.topk))
    anomalous = torch.cat(parts) if parts else normal[:0]
    total = torch.cat([normal, anomalous]).mean()
    return ADTRLosses(total, normal.mean().detach(), anomalous.mean().detach() if parts else zero)


def grid_labels(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Pixel masks (B, S, S) or (B, 1, S, S) in {0, 1} -> y (B, N): anomalous area fraction per cell."""
    if masks.dim() == 3:
        masks = masks.unsqueeze(1)
    return F.adaptive_avg_pool2d(masks.float(), grid).flatten(1)


# --------------------------------------------------------------------------------------------
# Training task (driven by fastad.training.loop): normal-only and anomaly-available modes
# --------------------------------------------------------------------------------------------
TRAIN_OPTIONS = (
    Option("anomalies", "--anomalies",
           dict(metavar="DIR", help="folder of labelled anomalous images (masks in DIR/masks, or --anomaly-masks)")),
    Option("anomaly_labels", "--anomaly-labels",
           dict(choices=list(ANOMALY_LABELS), help="use the anomalies' masks (pixel) or only their label (image); "
                "default: pixel when every image has a mask, else image")),
    Option("anomaly_masks", "--anomaly-masks",
           dict(metavar="DIR", help="mask folder for --anomalies (<stem>.png or <stem>_mask.png)")),
    Option("synthetic", "--synthetic",
           dict(choices=list(SYNTHETIC_KINDS), help="add synthetic anomalies (with masks) made from the training images")),
    Option("schedule", "--schedule", dict(choices=list(SCHEDULES), help="cpu (default, short) or gpu (paper-sized)")),
)


class AnomalyPool(NamedTuple):
    """Anomalous training images as cached features.

    tokens (n, N, C); y (n, N) pixel labels on the grid (area fractions), only meaningful where
    pixel[i]; pixel (n,) bool: True → L_px with y, False → image-level L_img.
    """
    tokens: torch.Tensor
    y: torch.Tensor
    pixel: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]


class ADTRTask(Task):
    """Modes (combinable): normal-only (default) · `synthetic` (pixel labels from the synthetic
    masks) · `anomalies` with image labels · `anomalies` with pixel labels (masks).

    The backbone is frozen, so every image's features are computed once per run and cached
    (bottle: 209 images → 256 positions × 176 channels, ~37 MB). With `synthetic`, a fixed pool
    of synthetic anomalies (one per training image by default) is made from the training images
    at the start of the run, deterministically from the seed; a resumed run rebuilds the same
    pool. The labelled anomaly folder is not fingerprinted: pass the same one when resuming.

    The learning rate follows a cosine decay over the planned steps (epochs × steps per epoch),
    a function of the global step: an interrupted run resumed continues exactly; resuming with
    more epochs re-plans the decay over the new total.
    """

    config_class = ADTRConfig

    def __init__(self, options: dict, resume: bool = False):
        super().__init__(options, resume)
        if options.get("anomalies") is None and (options.get("anomaly_labels") is not None
                                                 or options.get("anomaly_masks") is not None):
            raise FastADError("--anomaly-labels/--anomaly-masks need --anomalies DIR "
                              "(a folder of labelled anomalous images)")
        # Anomalous images are checked (and their label kind decided) before anything is written.
        self.anomaly_samples, self.labels = [], None
        if options.get("anomalies") is not None:
            self.anomaly_samples, self.labels = list_anomaly_samples(
                options["anomalies"], options.get("anomaly_labels"), options.get("anomaly_masks"))

    def config_overrides(self) -> dict:
        return super().config_overrides() | {"anomaly_labels": self.labels}

    def default_config(self) -> ADTRConfig:
        return ADTRConfig.gpu() if self.options.get("schedule") == "gpu" else ADTRConfig()

    def check_config(self, cfg: ADTRConfig) -> None:
        super().check_config(cfg)
        if cfg.anomaly_labels is not None and not self.anomaly_samples:
            raise FastADError(f"{'cannot resume without' if self.resume else 'config asks for'} "
                              "labelled anomalies: pass --anomalies DIR")

    def backbone(self, cfg: ADTRConfig, saved_run):
        return FeatureExtractor(cfg.backbone, cfg.strides, weights=self.options.get("weights") or "auto")

    def prepare(self, model: ADTR, samples, device, progress: bool) -> dict:
        self.model, self.device = model, device
        cfg = model.cfg
        t0 = time.perf_counter()
        self.tokens, synthetic_pool = _cache_normal_and_synthetic(model, samples, device, progress, self.map_batches)
        labelled = (_cache_labelled_anomalies(model, self.anomaly_samples, self.labels, device)
                    if self.anomaly_samples else None)
        pools = [p for p in (labelled, synthetic_pool) if p is not None]
        self.pool = AnomalyPool(*(torch.cat(parts) for parts in zip(*pools))) if pools else None
        feature_seconds = time.perf_counter() - t0
        model.fit_normalisation(self.tokens)
        seed_everything(cfg.seed)  # the transformer's training does not depend on the pool's RNG use
        anomalies = self.options.get("anomalies")
        return {"num_labelled_anomalies": len(self.anomaly_samples),
                "anomalies": str(Path(anomalies).resolve()) if anomalies is not None else None,
                "num_synthetic_anomalies": len(synthetic_pool) if synthetic_pool is not None else 0,
                "feature_seconds": round(feature_seconds, 2)}

    def stages(self, model: ADTR, device) -> list[Stage]:
        cfg, pool = model.cfg, self.pool
        params = [p for p in model.transformer.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        stage = Stage("train", cfg.epochs, opt, None, len(self.tokens), cfg.batch_size)
        total_steps = cfg.epochs * stage.steps_per_epoch
        order = {}

        def lr_at(step: int) -> float:  # cosine decay from lr to 1% of lr over the whole schedule
            return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))

        def epoch_begin(gen):
            model.train()
            order["anomalies"] = torch.randperm(len(pool), generator=gen) if pool is not None else None

        def jitter(x, gen):  # feature jitter (choice 9), drawn from the epoch's generator: resumable
            if not cfg.jitter:
                return None
            return (torch.randn(x.shape, generator=gen) * cfg.jitter).to(device)

        def step(idx, gen, step_index):
            x = self.tokens[idx].to(device, non_blocking=True)
            if pool is None:
                loss = mse_loss(x, model.reconstruct(x, jitter(x, gen)))
                return loss, {"loss": loss.item(), "normal": loss.item(), "anomalous": 0.0}
            k = min(cfg.anomaly_batch, len(pool))
            pick = order["anomalies"][(step_index * k + torch.arange(k)) % len(pool)]
            xs = torch.cat([x, pool.tokens[pick].to(device)])
            phi = pseudo_huber_score(xs, model.reconstruct(xs, jitter(xs, gen)))
            phi_n, phi_a = phi[:len(x)], phi[len(x):]
            px = pool.pixel[pick].to(device)
            losses = anomaly_available_loss(
                phi_n, phi_a[px] if bool(px.any()) else None, pool.y[pick].to(device)[px],
                phi_a[~px] if bool((~px).any()) else None, cfg)
            return losses.total, {"loss": losses.total.item(), "normal": losses.normal.item(),
                                  "anomalous": losses.anomalous.item()}

        stage.step, stage.lr_at, stage.epoch_begin = step, lr_at, epoch_begin
        return [stage]

    def resumed(self, record: dict) -> None:
        self.model.fit_normalisation(self.tokens)

    @torch.no_grad()
    def image_scores(self, indices: list[int], batch_size: int = 16):
        rows = torch.as_tensor(indices, dtype=torch.long)
        scores = [torch.zeros(0)] + [self.model.score_tokens(self.tokens[rows[i:i + batch_size]].to(self.device))[1]
                                     .float().cpu() for i in range(0, len(rows), batch_size)]
        return torch.cat(scores).numpy()


@torch.no_grad()
def _cache_normal_and_synthetic(model: ADTR, samples: list, device: torch.device, progress: bool, map_batches,
                                batch_size: int = 16) -> tuple[torch.Tensor, AnomalyPool | None]:
    """Features of the normal training images (n, N, C) and, when cfg.synthetic is set, of a pool
    of synthetic anomalies made from them (cfg.synthetic_pool images, default one per image),
    batch by batch through `map_batches` (`Task.map_batches`: spread over data-parallel ranks)."""
    from tqdm.auto import tqdm

    cfg = model.cfg
    n = len(samples)
    n_syn = (cfg.synthetic_pool or n) if cfg.synthetic else 0
    per_chunk = [0] * math.ceil(n / batch_size)
    for i in range(n_syn):  # synthetic image i comes from chunk (i mod n) // batch_size
        per_chunk[(i % n) // batch_size] += 1
    bar = tqdm(total=n + n_syn, desc="features", unit="img", disable=None if progress else True, leave=False)

    def batch_features(c, start, stop):
        images = prepare_images([s.path for s in samples[start:stop]], cfg.resize, cfg.crop)
        normal, syn = model.tokens(images.to(device)).float().cpu(), None
        if per_chunk[c]:
            imgs, masks = synthesise(images, cfg.synthetic, per_chunk[c], seed=cfg.seed * 7919 + c)
            syn = (model.tokens(imgs.to(device)).float().cpu(), grid_labels(masks, model.grid))
        bar.update(stop - start + per_chunk[c])
        return normal, syn

    batches = map_batches(batch_features, n, batch_size)
    bar.close()
    normal = [b[0] for b in batches]
    syn_tokens, syn_y = [b[1][0] for b in batches if b[1] is not None], [b[1][1] for b in batches if b[1] is not None]
    pool = None
    if n_syn:
        t = torch.cat(syn_tokens)
        pool = AnomalyPool(t, torch.cat(syn_y), torch.ones(len(t), dtype=torch.bool))
    return torch.cat(normal), pool


@torch.no_grad()
def _cache_labelled_anomalies(model: ADTR, samples: list, labels: str, device: torch.device,
                              batch_size: int = 16) -> AnomalyPool:
    """Features (and grid labels from the masks, for pixel labels) of user-labelled anomalies."""
    cfg = model.cfg
    ds = AnomalyDataset(samples, cfg.resize, cfg.crop)
    items = [ds[i] for i in range(len(ds))]  # reads (and checks) every file before training
    masks = torch.stack([it["mask"][0] for it in items])
    if labels == "pixel":
        for s, m in zip(samples, masks):
            if not bool(m.any()):
                raise FastADError(f"mask {s.mask_path} of anomalous image {s.path} is empty "
                                  "(pixel labels need the defect marked; use --anomaly-labels image otherwise)")
    images = torch.stack([it["image"] for it in items])
    tokens = torch.cat([model.tokens(images[i:i + batch_size].to(device)).float().cpu()
                        for i in range(0, len(images), batch_size)])
    return AnomalyPool(tokens, grid_labels(masks, model.grid), torch.full((len(tokens),), labels == "pixel"))
