"""UTAD choices on a validation set built without test images.

Every `--every`-th normal *training* image is held out; UTAD is trained on the rest (a folder of
links in the MVTec layout under `--work`) with the given config overrides, then scored on the
held-out images plus three synthetic-defect copies of each (DRAEM-style Perlin, CutPaste,
confetti from `fastad.data.synthetic.synthesise`, as bench/fod_level_validation.py does). Prints
image / pixel AUROC for every image-score variant (same blurred map), and each stage-1 epoch's
KL and MI terms from the training history. A diagnostic for choosing defaults; not a test.

    python bench/utad_validation.py --data ../shared/data/mvtec_ad/bottle --work /tmp/uv \
        --set epochs1=4 --set epochs2=8
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch

from fastad.data.layouts import list_samples
from fastad.metrics import image_auroc, pixel_auroc
from fastad.models.utad import UTADConfig, map_score
from fastad.preprocess import image_to_tensor, load_image
from fastad.data.synthetic import synthesise
from fastad.run import load_model
from fastad.training.loop import train

SCORE_VARIANTS = ("max", "top:0.001", "top:0.01", "top:0.05", "top:0.1", "top:0.2", "peak:0.001", "peak:0.01", "peak:0.05")


def split(data: str, every: int, work: Path) -> tuple[Path, list[str]]:
    """-> (a training folder of links without every `every`-th image, the held-out paths)."""
    paths = [s.path for s in list_samples(data, split="train")]
    held = paths[::every]
    train_dir = work / "train" / "good"
    train_dir.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(paths):
        if i % every:
            link = train_dir / f"{i:04d}{Path(p).suffix}"
            if not link.exists():
                os.symlink(os.path.abspath(p), link)
    return work, held


def validation_set(held: list[str], resize: int, crop: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    clean = torch.stack([image_to_tensor(load_image(p), resize, crop) for p in held])
    parts = [(clean, torch.zeros(len(clean), crop, crop))]
    for i, kind in enumerate(("perlin", "cutpaste", "confetti")):
        parts.append(synthesise(clean, kind, len(clean), seed=100 + i))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), len(clean)


@torch.no_grad()
def term_maps(model, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, pairs, levels, S, S): each (pair, level) PM term as the model sums it
    (upsampled, divided by its pm_scale), unblurred."""
    return torch.cat([model.pm_terms(model.stages(model.to_internal(images[i:i + 8])), per_level=True)
                      for i in range(0, len(images), 8)])


def print_terms(model, images: torch.Tensor, masks: torch.Tensor, labels: np.ndarray) -> None:
    """Pixel / image AUROC of every pair and level subset of the map (same blur and score)."""
    terms = term_maps(model, images)
    n_pairs, n_levels = terms.shape[1], terms.shape[2]
    names = [f"{a}~{b}" for a, b in model.PAIRS]
    for pairs in [[0], [1], [0, 1]]:
        for k in range(1, n_levels + 1):
            for levels in itertools.combinations(range(n_levels), k):
                amap = model.blur(terms[:, pairs][:, :, list(levels)].sum((1, 2)))
                pix = pixel_auroc(masks.numpy() > 0.5, amap.numpy())
                img = image_auroc(labels, model.image_score(amap).numpy())
                strides = "/".join(str(model.cfg.pm_strides[j]) for j in levels)
                print(f"  terms {'+'.join(names[p] for p in pairs):45s} strides {strides:8s} "
                      f"pixel AUROC {pix:.4f}  image AUROC {img:.4f}")


def parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--work", required=True, help="folder for the training links and the run")
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--set", action="append", default=[], help="config override FIELD=JSON (repeatable)")
    p.add_argument("--name", default="run")
    p.add_argument("--terms", action="store_true", help="also score every pair and level subset of the map")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        k, _, v = item.partition("=")
        v = parse_value(v)
        overrides[k] = tuple(v) if isinstance(v, list) else v
    cfg = UTADConfig(**overrides)
    work = Path(args.work)
    root, held = split(args.data, args.every, work / "data")
    run = work / args.name
    if not (run / "config.json").exists():
        train(root, run, model="utad", config=cfg, progress=False)
    model, conf = load_model(run, device="cpu")
    images, masks, n_clean = validation_set(held, model.cfg.resize, model.cfg.crop)
    with torch.no_grad():
        maps = torch.cat([model(images[i:i + 8])[0] for i in range(0, len(images), 8)])
    labels = np.r_[np.zeros(n_clean), np.ones(len(images) - n_clean)]
    pix = pixel_auroc(masks.numpy() > 0.5, maps.numpy())
    print(f"{args.name}: {len(images)} images ({n_clean} held-out normal + 3 synthetic copies); "
          f"train {conf['training'].get('train_seconds')} s; pixel AUROC {pix:.4f}")
    for score in SCORE_VARIANTS:
        s = map_score(maps, score).numpy()
        per_kind = [image_auroc(np.r_[np.zeros(n_clean), np.ones(n_clean)],
                                np.r_[s[:n_clean], s[n_clean * (k + 1):n_clean * (k + 2)]]) for k in range(3)]
        print(f"  score {score:12s} image AUROC {image_auroc(labels, s):.4f}  "
              f"(perlin {per_kind[0]:.3f} cutpaste {per_kind[1]:.3f} confetti {per_kind[2]:.3f})")
    if args.terms:
        print_terms(model, images, masks, labels)
    for h in conf["training"]["history"]:
        keys = [k for k in ("rec", "kl", "mi_local", "mi_global", "gan", "critic", "recon", "naive", "content")
                if k in h]
        print("  ", h.get("stage"), h["epoch"], " ".join(f"{k}={h[k]:.4f}" for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
