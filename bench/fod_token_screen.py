"""Screen FOD token choices with the no-model baseline on the synthetic-defect validation set.

No training: every bottle training image gives the per-position mean feature (FOD's reference),
and each validation image (every 4th training image + Perlin/CutPaste/confetti copies, see
fod_level_validation.py) is scored by its distance to it, for several ways of building the
stride-8 and stride-16 level tokens from EfficientNet-Lite0's stages. The screen behind FOD's
deviation 10 (docs/results.md); a diagnostic, not a pass/fail test. ~2 min on 2 cores.

    python bench/fod_token_screen.py --data ../shared/data/mvtec_ad/bottle
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fastad.backbones import FeatureExtractor
from fastad.preprocess import image_to_tensor, load_image
from fastad.data.layouts import list_samples
from fastad.layers import GaussianBlur
from fastad.models.fod import FOD, FODConfig
from fastad.ops import feature_distance
from fod_level_validation import validation_aurocs, validation_set


def stage_features(extractor: FeatureExtractor, images: torch.Tensor) -> dict[int, torch.Tensor]:
    """-> {stride: smoothed (n, C, h, w)}, FOD's AvgPool2d(3, 1, 1) applied."""
    chunks = []
    with torch.no_grad():
        for i in range(0, len(images), 16):
            chunks.append([F.avg_pool2d(f, 3, 1, 1) for f in extractor(images[i:i + 16])])
    return dict(zip(extractor.strides, (torch.cat(c) for c in zip(*chunks))))


def token_variants(f: dict[int, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """-> {name: (stride-8 level map, stride-16 level map)}."""
    pool = lambda t: F.avg_pool2d(t, 2)  # noqa: E731 - finer stage onto the coarser grid
    up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True)  # noqa: E731
    return {
        "own stage only (authors)": (f[8], f[16]),
        "8 + 16 upsampled / 16": (torch.cat([f[8], up(f[16])], 1), f[16]),
        "8 + 4 pooled / 16": (torch.cat([f[8], pool(f[4])], 1), f[16]),
        "8 + 4 pooled / 16 + 8 pooled (deviation 10)": (torch.cat([f[8], pool(f[4])], 1),
                                                         torch.cat([f[16], pool(f[8])], 1)),
    }


def distance_map(train: torch.Tensor, val: torch.Tensor, size: int) -> torch.Tensor:
    """Distance of each validation token to the per-position training mean, upsampled."""
    tokens = val.flatten(2).transpose(1, 2)
    reference = train.mean(0).flatten(1).t().expand_as(tokens)
    score = feature_distance(tokens, reference, kind="mse_cos", impl="reference").clamp_min(0).view(len(val), 1, *val.shape[-2:])
    return F.interpolate(score, size=(size, size), mode="bilinear", align_corners=True)[:, 0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--every", type=int, default=4, help="validation: every k-th training image")
    args = p.parse_args(argv)
    cfg = FODConfig()
    extractor = FeatureExtractor(cfg.backbone, (4, 8, 16))
    paths = [s.path for s in list_samples(args.data, split="train")]
    train = torch.stack([image_to_tensor(load_image(q), cfg.resize, cfg.crop) for q in paths])
    val, masks, n_clean = validation_set(args.data, args.every, cfg.resize, cfg.crop)
    train_variants = token_variants(stage_features(extractor, train))
    val_variants = token_variants(stage_features(extractor, val))
    blur = GaussianBlur(cfg.blur_sigma, cfg.crop)
    print(f"{len(val)} images ({n_clean} clean training images + 3 synthetic copies of each), no model")
    for name, (t8, t16) in train_variants.items():
        v8, v16 = val_variants[name]
        maps = torch.stack([distance_map(t8, v8, cfg.crop), distance_map(t16, v16, cfg.crop)])
        for label, m in [("stride 8", maps[0]), ("stride 16", maps[1]),
                         ("geometric", FOD.combine_levels(maps, "geometric"))]:
            image, pixel = validation_aurocs(blur(m), masks, n_clean)
            print(f"{name:45s} {label:10s} image AUROC {image:.4f}  pixel AUROC {pixel:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
