"""ADTR screen: several transformer configs trained on cached features, scored on the validation set.

A fast stand-in for `bench/adtr_learning_curve.py` when comparing settings: the backbone features
of the training images (every `--holdout`-th held out) and of the validation set (the held-out
images + Perlin / CutPaste / confetti copies, `bench/fod_level_validation.validation_set`) are
computed once and cached in `--cache`; each `--try` then trains a fresh transformer with ADTRTask's
update (AdamW, cosine decay to 1% of lr over the planned steps, batch of `batch_size` tokens drawn
without replacement per epoch, feature jitter as in `ADTR.reconstruct`) and prints validation
image / pixel AUROC at step 0 (the untrained start = the per-position-mean baseline) and every
`--eval-every` steps. No test image is read.

    python bench/adtr_screen.py --data ../shared/data/mvtec_ad/bottle --steps 400 --eval-every 100 \\
        --try "jitter=0" --try "jitter=1.0" --try "jitter=1.0 d_model=128 n_encoder_layers=2"
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.adtr_learning_curve import Evaluation, _parse_overrides
from bench.fod_level_validation import validation_set
from fastad.backbones import FeatureExtractor
from fastad.data.layouts import list_samples
from fastad.models.adtr import ADTR, ADTRConfig, mse_loss
from fastad.preprocess import prepare_images
from fastad.utils import seed_everything


def cached_tokens(data: str, holdout: int, cfg: ADTRConfig, cache: Path):
    if cache.exists():
        return torch.load(cache)
    model = ADTR(cfg, FeatureExtractor(cfg.backbone, cfg.strides, weights="auto")).eval()
    paths = [s.path for s in list_samples(data, "train")]
    held = set(paths[::holdout])
    train_paths = [p for p in paths if p not in held]
    with torch.no_grad():
        train = torch.cat([model.tokens(prepare_images(train_paths[i:i + 16], cfg.resize, cfg.crop))
                           for i in range(0, len(train_paths), 16)])
        images, masks, n_clean = validation_set(data, holdout, cfg.resize, cfg.crop)
        val = torch.cat([model.tokens(images[i:i + 16]) for i in range(0, len(images), 16)])
    out = {"train": train, "val": val, "masks": masks > 0.5, "n_clean": n_clean}
    torch.save(out, cache)
    return out


class _NoBackbone(torch.nn.Module):
    """Stands in for the frozen backbone: the screen works on cached tokens only."""

    def __init__(self, cfg: ADTRConfig, channels: list[int]):
        super().__init__()
        self.strides, self.channels = list(cfg.strides), channels


def run_one(cfg: ADTRConfig, data: dict, steps: int, eval_every: int, channels: list[int]) -> list[dict]:
    seed_everything(cfg.seed)
    model = ADTR(cfg, _NoBackbone(cfg, channels))
    model.fit_normalisation(data["train"])
    ev = Evaluation(None, torch.zeros(0), np.r_[np.zeros(data["n_clean"]), np.ones(len(data["val"]) - data["n_clean"])])
    ev.masks, ev.tokens = data["masks"].numpy(), data["val"]
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, rows, order, t0, losses = len(data["train"]), [], torch.zeros(0, dtype=torch.long), time.perf_counter(), []

    def evaluate(step):
        model.eval()
        with torch.no_grad():
            image, pixel = ev.aurocs(model)
        rows.append({"steps": step, "val_image_auroc": round(image, 4), "val_pixel_auroc": round(pixel, 4),
                     "loss": round(float(np.mean(losses)), 4) if losses else None,
                     "train_s": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
        losses.clear()
        model.train()

    evaluate(0)
    t0 = time.perf_counter()
    for step in range(steps):
        if len(order) < cfg.batch_size:
            order = torch.randperm(n, generator=gen)
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        for g in opt.param_groups:
            g["lr"] = cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x = data["train"][idx]
        noise = torch.randn(x.shape, generator=gen) * cfg.jitter if cfg.jitter else None
        loss = mse_loss(x, model.reconstruct(x, noise))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            train_s = time.perf_counter() - t0
            evaluate(step + 1)
            rows[-1]["train_s"] = round(train_s, 1)
            t0 = time.perf_counter() - train_s
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--holdout", type=int, default=4)
    p.add_argument("--cache", required=True, help="file for the cached features (made on first use)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--try", dest="tries", action="append", default=[], metavar="'FIELD=VALUE ...'")
    p.add_argument("--out", help="append the results (JSON lines) here")
    args = p.parse_args(argv)
    base = ADTRConfig()
    data = cached_tokens(args.data, args.holdout, base, Path(args.cache))
    channels = [data["train"].shape[-1]]  # only the sum matters to ADTR
    print(f"train {tuple(data['train'].shape)}  val {tuple(data['val'].shape)} ({data['n_clean']} clean)", flush=True)
    for spec in args.tries or [""]:
        cfg = replace(base, **_parse_overrides(spec.split()))
        print(f"== {spec or 'defaults'}", flush=True)
        rows = run_one(cfg, data, args.steps, args.eval_every, channels)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({"try": spec, "steps": args.steps, "curve": rows}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
