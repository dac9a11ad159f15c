"""ADTR learning curve: validation (and optionally test) AUROC after every epoch, against the
untrained start, which for ADTR is the per-position-mean baseline (zero-initialised output).

Validation without test images: every `--holdout`-th normal *training* image is held out; the
held-out images and three synthetic-defect copies of each (Perlin, CutPaste, confetti; the set of
`bench/fod_level_validation.py`) are the validation set, and the model trains on the remaining
training images only. `--holdout 0` trains on every training image (then use `--test` to follow
the test split instead — for reporting, never for choosing defaults).

    python bench/adtr_learning_curve.py --data ../shared/data/mvtec_ad/bottle --out runs/adtr_lc \\
        [--set jitter=1.0 --set epochs=20 ...] [--schedule gpu] [--test]

Prints one line per epoch (steps, loss, image / pixel AUROC) and writes them to OUT/curve.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

from bench.fod_level_validation import validation_set
from fastad.data.dataset import AnomalyDataset
from fastad.data.layouts import list_samples
from fastad.metrics import image_auroc, pixel_auroc
from fastad.models.adtr import ADTRConfig
from fastad.training.loop import train


def _parse_overrides(pairs: list[str]) -> dict:
    """FIELD=VALUE pairs -> ADTRConfig overrides; VALUE is JSON (lists become tuples), else a string."""
    names, out = {f.name for f in fields(ADTRConfig)}, {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        if key not in names:
            raise SystemExit(f"error: {key} is not an ADTRConfig field")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


class Evaluation:
    """Cached backbone tokens of a labelled image set; `aurocs(model)` -> (image, pixel) AUROC."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, labels: np.ndarray):
        self.images, self.masks, self.labels, self.tokens = images, masks.numpy() > 0.5, labels, None

    def aurocs(self, model, batch_size: int = 16) -> tuple[float, float]:
        if self.tokens is None:  # the backbone is frozen: features once
            self.tokens = torch.cat([model.tokens(self.images[i:i + batch_size])
                                     for i in range(0, len(self.images), batch_size)])
        maps, scores = zip(*(model.score_tokens(self.tokens[i:i + batch_size])
                             for i in range(0, len(self.tokens), batch_size)))
        return (image_auroc(self.labels, torch.cat(scores).numpy()),
                pixel_auroc(self.masks, torch.cat(maps).numpy()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--holdout", type=int, default=4, help="hold out every k-th training image (0: none)")
    p.add_argument("--schedule", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="ADTRConfig override")
    p.add_argument("--test", action="store_true", help="also follow the test split")
    p.add_argument("--device", default="cpu")
    p.add_argument("--record-every", type=int, default=1, metavar="K", help="evaluate every K-th epoch (and the last)")
    args = p.parse_args(argv)

    cfg = replace(ADTRConfig.gpu() if args.schedule == "gpu" else ADTRConfig(), **_parse_overrides(args.set))
    evaluations = {}
    train_paths = [s.path for s in list_samples(args.data, "train")]
    tmp = Path(tempfile.mkdtemp(prefix="adtr_lc_"))
    try:
        data = args.data
        if args.holdout:
            images, masks, n_clean = validation_set(args.data, args.holdout, cfg.resize, cfg.crop)
            evaluations["val"] = Evaluation(images, masks, np.r_[np.zeros(n_clean), np.ones(len(images) - n_clean)])
            good = tmp / "train" / "good"
            good.mkdir(parents=True)
            held = set(train_paths[::args.holdout])
            for path in train_paths:
                if path not in held:
                    (good / Path(path).name).symlink_to(Path(path).resolve())
            data = tmp
        if args.test:
            ds = AnomalyDataset(list_samples(args.data, "test"), cfg.resize, cfg.crop)
            items = [ds[i] for i in range(len(ds))]
            evaluations["test"] = Evaluation(torch.stack([it["image"] for it in items]),
                                             torch.stack([it["mask"][0] for it in items]),
                                             np.array([it["label"] for it in items]))
        curve = []
        steps_per_epoch = {}

        def record(stage: str, epoch: int, model) -> dict | None:
            if epoch % args.record_every and epoch != cfg.epochs:
                return None
            row = {"epoch": epoch, "steps": epoch * steps_per_epoch.setdefault(
                "n", (len(train_paths) - (len(held) if args.holdout else 0)) // min(cfg.batch_size, len(train_paths)))}
            for name, ev in evaluations.items():
                row[f"{name}_image_auroc"], row[f"{name}_pixel_auroc"] = (round(v, 4) for v in ev.aurocs(model))
            curve.append(row)
            print(json.dumps(row), flush=True)
            return row

        out = Path(args.out)
        start = train(data, out / "untrained", model="adtr", config=replace(cfg, epochs=0), overwrite=True,
                      progress=False, device=args.device)
        from fastad.run import load_model
        model, _ = load_model(start, device=args.device)
        with torch.no_grad():
            record("train", 0, model.eval())
        run = train(data, out / "run", model="adtr", config=cfg, overwrite=True, progress=False,
                    device=args.device, on_epoch_end=record)
        conf = json.loads((run / "config.json").read_text())
        losses = {h["epoch"]: h["loss"] for h in conf["training"]["history"]}
        for row in curve:
            row["loss"] = losses.get(row["epoch"])
        (out / "curve.json").write_text(json.dumps({"config": conf["config"], "holdout": args.holdout,
                                                    "train_seconds": conf["training"]["train_seconds"],
                                                    "curve": curve}, indent=1))
        print(f"train_seconds {conf['training']['train_seconds']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
