"""FOD level combinations on a validation set built without test images.

Every 4th normal *training* image plus three synthetic-defect copies of each (DRAEM-style Perlin,
CutPaste, confetti from `fastad.data.synthetic.synthesise`) are scored once per level; the level
maps are then combined several ways and blurred as the model does, and image / pixel AUROC are
printed for each, next to the no-model baseline (score = distance of each feature to the
per-position mean training feature, i.e. FOD's reference, without transformer or weight). A diagnostic for choosing how levels are combined without looking at the test
split (docs/results.md); not a pass/fail test.

    python bench/fod_level_validation.py --run runs/bottle --data ../shared/data/mvtec_ad/bottle
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from fastad.preprocess import image_to_tensor, load_image
from fastad.run import load_model
from fastad.data.layouts import list_samples
from fastad.metrics import image_auroc, pixel_auroc
from fastad.data.synthetic import synthesise
from fastad.ops import feature_distance


def validation_set(data: str, every: int, resize: int, size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """-> images (n, 3, S, S), masks (n, S, S), number of clean images (they come first)."""
    paths = [s.path for s in list_samples(data, split="train")][::every]
    clean = torch.stack([image_to_tensor(load_image(p), resize, size) for p in paths])
    parts = [(clean, torch.zeros(len(clean), size, size))]
    for i, kind in enumerate(("perlin", "cutpaste", "confetti")):
        parts.append(synthesise(clean, kind, len(clean), seed=100 + i))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), len(clean)


def validation_aurocs(blurred: torch.Tensor, masks: torch.Tensor, n_clean: int) -> tuple[float, float]:
    """Image AUROC (each map's max) and pixel AUROC of final maps (n, S, S) of `validation_set`."""
    labels = np.r_[np.zeros(n_clean), np.ones(len(blurred) - n_clean)]
    return (image_auroc(labels, blurred.flatten(1).amax(1).numpy()),
            pixel_auroc(masks.numpy() > 0.5, blurred.numpy()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--every", type=int, default=4, help="use every k-th training image")
    args = p.parse_args(argv)
    model, _ = load_model(args.run, device="cpu")
    if getattr(model, "family", None) != "fod":
        raise SystemExit("error: --run must be an FOD run")
    cfg = model.cfg
    images, masks, n_clean = validation_set(args.data, args.every, cfg.resize, cfg.crop)
    with torch.no_grad():
        model_scores, baseline_scores = [], []
        for i in range(0, len(images), 8):
            tokens = model.tokens(images[i:i + 8])
            model_scores.append(model.patch_scores(tokens))
            # No model: the reconstruction is the per-position mean training feature, no weight.
            baseline_scores.append([
                feature_distance(t, level.reference.expand_as(t), kind="mse_cos", impl="reference")
                for level, t in zip(model.levels, tokens)])
        maps = model.level_maps([torch.cat(s) for s in zip(*model_scores)])
        baseline = model.level_maps([torch.cat(s) for s in zip(*baseline_scores)])
        variants = {f"level {i} alone": m for i, m in enumerate(maps)}
        variants["arithmetic mean (authors)"] = model.combine_levels(maps, "mean")
        variants["sum of levels / their clean-image mean"] = sum(m / m[:n_clean].mean() for m in maps)
        variants["geometric mean (default)"] = model.combine_levels(maps, "geometric")
        variants |= {f"no model: level {i} alone": m for i, m in enumerate(baseline)}
        variants["no model: geometric mean"] = model.combine_levels(baseline, "geometric")
        print(f"{len(images)} images ({n_clean} clean training images + 3 synthetic copies of each)")
        for name, m in variants.items():
            image, pixel = validation_aurocs(model.blur(m), masks, n_clean)
            print(f"{name:40s} image AUROC {image:.4f}  pixel AUROC {pixel:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
