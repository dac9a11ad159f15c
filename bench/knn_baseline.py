"""A training-free nearest-neighbour baseline over a family's own features: what every trained
family must beat.

For family F (its defaults, or the config of a run): the memory bank holds every patch of every
feature level of F's features on the normal training images (full bank, no coreset); a test patch
scores its L2 distance to the nearest bank patch (k = 1, PatchCore without subsampling); the
per-level patch scores then go through F's own upsampling, level combination and blur, and the
image score is F's own. Only the learned part of F is replaced, so "trained F minus this
baseline" is what F's training adds.

    python bench/knn_baseline.py --model fod --data ../shared/data/mvtec_ad/bottle
    python bench/knn_baseline.py --run runs/bottle --data ../shared/data/mvtec_ad/bottle --compare
    python bench/knn_baseline.py --model fod --data ../shared/data/piped/PA_BDP01_TL --validation

`--validation`: no test images — every 4th normal training image is held out of the bank and
scored with three synthetic-defect copies of each (fastad.data.synthetic), as
bench/fod_level_validation.py builds its set. `--compare` (with `--run`) scores the run's trained
model on the same images; each `--variant KEY=VALUE[,KEY=VALUE]` scores it again with those
config fields changed (scoring options only, e.g. FOD's `inter_weight=global`). `--resample lanczos` resizes with PIL's Lanczos filter instead of the
default bilinear one (the FOD authors' `ANTIALIAS`). `--training-folder OUT` writes the
validation split's training images as a folder-layout dataset, so a trained run can be compared on
the validation set without having seen its images:

    python bench/knn_baseline.py --data ../shared/data/piped/PA_BDP01_TL --model fod --training-folder /tmp/val/BDP
    fastad train --model fod --data /tmp/val/BDP --layout folder --out runs/val_BDP
    python bench/knn_baseline.py --run runs/val_BDP --data ../shared/data/piped/PA_BDP01_TL --validation --compare
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fastad import registry
from fastad.data.layouts import list_samples
from fastad.data.synthetic import synthesise
from fastad.errors import FastADError
from fastad.metrics import evaluate
from fastad.preprocess import image_to_tensor, load_image, load_mask, mask_to_tensor
from fastad.run import load_model

RESAMPLE = {"bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}


# --------------------------------------------------------------------------------------------
# Each family's features and scoring, with its learned part left out
# --------------------------------------------------------------------------------------------
class FeatureView(NamedTuple):
    # images (B, 3, S, S) in [0, 1] -> per-level patch features [(B, N_l, C_l)]
    features: Callable[[torch.Tensor], list[torch.Tensor]]
    # per-level patch scores [(B, N_l)] -> (anomaly map (B, S, S), image score (B,))
    score: Callable[[list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
    # normalise each level's distances by their mean on held-out normal images (F sums levels)
    normalise_levels: bool = False


def _fod_view(model) -> FeatureView:
    def score(levels):
        amap = model.anomaly_map(levels)  # upsample, geometric mean of levels, blur
        return amap, amap.flatten(1).amax(1)
    return FeatureView(model.tokens, score)


def _adtr_view(model) -> FeatureView:
    def score(levels):
        amap = model.anomaly_map(levels[0])  # upsample, blur
        return amap, model.image_score(amap)
    return FeatureView(lambda images: [model.tokens(images)], score)


def _utad_view(model) -> FeatureView:
    """UTAD's perceptual measurement on the image itself: its PM network's levels, upsampled
    (align_corners=True) and summed after per-level normalisation by normal images, then blurred."""
    cfg = model.cfg

    def features(images):
        return [f.flatten(2).transpose(1, 2) for f in model.backbone(model.to_internal(images))]

    def score(levels):
        size = (cfg.crop, cfg.crop)
        amap = sum(F.interpolate(d.view(len(d), 1, cfg.size // s, cfg.size // s), size=size, mode="bilinear",
                                 align_corners=True)[:, 0] for d, s in zip(levels, cfg.pm_strides))
        amap = model.blur(amap)
        return amap, amap.flatten(1).amax(1)
    return FeatureView(features, score, normalise_levels=True)


VIEWS: dict[str, Callable] = {"fod": _fod_view, "adtr": _adtr_view, "utad": _utad_view}


def feature_view(model) -> FeatureView:
    if model.family not in VIEWS:
        raise FastADError(f"no nearest-neighbour view for family {model.family!r}: add one to bench/knn_baseline.py")
    return VIEWS[model.family](model)


# --------------------------------------------------------------------------------------------
# The memory bank and the search
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def level_features(view: FeatureView, images: torch.Tensor, batch_size: int = 16) -> list[torch.Tensor]:
    """-> per level (n, N_l, C_l) float32."""
    parts = [view.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return [torch.cat(level).float() for level in zip(*parts)]


@torch.no_grad()
def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """L2 distance of each query (Q, C) to its nearest row of `bank` (M, C) -> (Q,); blocks of
    `chunk` × 8·`chunk` distances at a time (512 MB in fp32 at the default)."""
    out = torch.empty(len(queries))
    for i in range(0, len(queries), chunk):
        q = queries[i:i + chunk]
        best = torch.full((len(q),), float("inf"))
        for j in range(0, len(bank), 8 * chunk):
            best = torch.minimum(best, torch.cdist(q, bank[j:j + 8 * chunk]).amin(1))
        out[i:i + chunk] = best
    return out


@torch.no_grad()
def knn_scores(view: FeatureView, train: torch.Tensor, images: torch.Tensor,
               calibration: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bank from `train` images, score `images` -> (maps (n, S, S), scores (n,)). With
    `view.normalise_levels`, each level is divided by its mean distance on `calibration` (normal
    images not in the bank)."""
    banks = [f.flatten(0, 1) for f in level_features(view, train)]
    feats = level_features(view, images)
    dists = [nearest_distance(f.flatten(0, 1), bank).view(f.shape[:2]) for f, bank in zip(feats, banks)]
    if view.normalise_levels:
        if calibration is None:
            raise ValueError("this family sums levels: pass normal calibration images")
        cal = level_features(view, calibration)
        means = [nearest_distance(f.flatten(0, 1), bank).mean().clamp_min(1e-8) for f, bank in zip(cal, banks)]
        dists = [d / m for d, m in zip(dists, means)]
    maps, scores = zip(*(view.score([d[i:i + 16] for d in dists]) for i in range(0, len(images), 16)))
    return torch.cat(maps), torch.cat(scores)


# --------------------------------------------------------------------------------------------
# Data: the test split, or a validation set built from training images only
# --------------------------------------------------------------------------------------------
def _load(paths, resize, crop, resample) -> torch.Tensor:
    return torch.stack([image_to_tensor(load_image(p), resize, crop, resample=resample) for p in paths])


def test_split(data, layout, resize, crop, resample):
    """-> train images, test images, test masks (n, S, S) bool, labels, defects."""
    train = _load([s.path for s in list_samples(data, "train", layout=layout)], resize, crop, resample)
    samples = list_samples(data, "test", layout=layout)
    images = _load([s.path for s in samples], resize, crop, resample)
    masks = torch.stack([
        mask_to_tensor(load_mask(s.mask_path), resize, crop)[0] if s.mask_path
        else torch.zeros(crop, crop) for s in samples]) > 0.5
    return train, images, masks, np.array([s.label for s in samples]), [s.defect for s in samples]


HOLDOUT_EVERY = 4


def held_out(n: int, every: int = HOLDOUT_EVERY) -> torch.Tensor:
    """Which of n training images the validation set holds out: every `every`-th."""
    held = torch.zeros(n, dtype=torch.bool)
    held[::every] = True
    return held


def validation_split(data, layout, resize, crop, resample):
    """Every 4th training image held out, plus three synthetic-defect copies of each."""
    train = _load([s.path for s in list_samples(data, "train", layout=layout)], resize, crop, resample)
    held = held_out(len(train))
    clean = train[held]
    parts = [(clean, torch.zeros(len(clean), crop, crop, dtype=torch.bool))]
    for i, kind in enumerate(("perlin", "cutpaste", "confetti")):
        img, mask = synthesise(clean, kind, len(clean), seed=100 + i)
        parts.append((img, mask > 0.5))
    images = torch.cat([p[0] for p in parts])
    masks = torch.cat([p[1] for p in parts])
    labels = np.r_[np.zeros(len(clean)), np.ones(len(images) - len(clean))].astype(int)
    defects = ["good"] * len(clean) + [k for k in ("perlin", "cutpaste", "confetti") for _ in range(len(clean))]
    return train[~held], images, masks, labels, defects


def write_training_folder(data, layout, out: str) -> None:
    """The validation split's bank as a `folder`-layout dataset of links (normal/ = the training
    images kept, normal_test/ = the held-out ones), so a run trained on it never saw the images the
    validation set scores."""
    samples = list_samples(data, "train", layout=layout)
    if os.path.exists(out):
        raise FastADError(f"--training-folder {out} exists; remove it or pick another path")
    for sample, held in zip(samples, held_out(len(samples)).tolist()):
        folder = os.path.join(out, "normal_test" if held else "normal")
        os.makedirs(folder, exist_ok=True)
        # an index prefix keeps names unique (MVTec's train/good and test/good reuse 000.png)
        name = f"{len(os.listdir(folder)):04d}_{os.path.basename(sample.path)}"
        os.symlink(os.path.abspath(sample.path), os.path.join(folder, name))


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def untrained(family_name: str):
    """A family's model with its default config and frozen backbone; nothing trained."""
    family = registry.get(family_name)
    task = family.task({})
    cfg = task.default_config()
    return family.build(cfg, task.backbone(cfg, None)).eval()


def parse_variant(cfg, text: str) -> dict:
    """"k=v,k2=v2" -> {field: value} typed like `cfg`'s current values."""
    changes = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not hasattr(cfg, key):
            raise FastADError(f"--variant {text!r}: expected KEY=VALUE with KEY a field of {type(cfg).__name__}")
        current = getattr(cfg, key)
        if isinstance(current, bool):
            changes[key] = value.lower() in ("1", "true", "yes")
        else:
            changes[key] = value if isinstance(current, str) else type(current)(value)
    return changes


@torch.no_grad()
def model_scores(model, images, labels, masks, defects) -> dict:
    out = [model(images[i:i + 8]) for i in range(0, len(images), 8)]
    return evaluate(labels, torch.cat([o[1] for o in out]).numpy(), masks.numpy(),
                    torch.cat([o[0] for o in out]).numpy(), defects=defects)


def summary(result: dict) -> dict:
    return {k: result.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="family with its default config (no run needed)")
    src.add_argument("--run", help="use this run's family and config")
    p.add_argument("--data", required=True)
    p.add_argument("--layout", default=None)
    p.add_argument("--validation", action="store_true", help="held-out training images + synthetic defects")
    p.add_argument("--compare", action="store_true", help="also score the --run's trained model")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="with --compare: also score the model with these config fields changed")
    p.add_argument("--resample", choices=sorted(RESAMPLE), default="bilinear")
    p.add_argument("--report", help="write the numbers as JSON here")
    p.add_argument("--training-folder", metavar="OUT",
                   help="only write the validation split's training images as a folder-layout "
                        "dataset at OUT (train a run on it, then score it with --validation --compare)")
    args = p.parse_args(argv)
    try:
        if args.training_folder:
            write_training_folder(args.data, args.layout, args.training_folder)
            print(f"wrote {args.training_folder} (train with --layout folder)")
            return 0
        if (args.compare or args.variant) and not args.run:
            raise FastADError("--compare and --variant need --run")
        model = load_model(args.run, device="cpu")[0].eval() if args.run else untrained(args.model)
        cfg = model.cfg
        variants = {v: parse_variant(cfg, v) for v in args.variant}
        split = validation_split if args.validation else test_split
        train, images, masks, labels, defects = split(args.data, args.layout, cfg.resize, cfg.crop,
                                                      RESAMPLE[args.resample])
    except FastADError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    view = feature_view(model)
    bank, calibration = train, None
    if view.normalise_levels:  # the calibration images stay out of the bank
        held = held_out(len(train), every=8)
        bank, calibration = train[~held], train[held]
    maps, scores = knn_scores(view, bank, images, calibration)
    rows = {"knn": summary(evaluate(labels, scores.numpy(), masks.numpy(), maps.numpy(), defects=defects))}
    if args.compare or variants:
        rows["model"] = summary(model_scores(model, images, labels, masks, defects))
    for name, changes in variants.items():
        saved = {k: getattr(cfg, k) for k in changes}
        vars(cfg).update(changes)
        rows[f"model[{name}]"] = summary(model_scores(model, images, labels, masks, defects))
        vars(cfg).update(saved)
    what = "validation (held-out training images + synthetic defects)" if args.validation else "test split"
    print(f"{model.family} features, {args.data}, {what}, resample {args.resample}: "
          f"{len(bank)} bank images, {len(images)} scored")
    for name, r in rows.items():
        print(f"  {name:24s} image AUROC {r['image_auroc']:.4f}  pixel AUROC {r['pixel_auroc']:.4f}  "
              f"AUPRO {r['aupro']:.4f}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"family": model.family, "data": args.data, "validation": args.validation,
                       "resample": args.resample, **rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
