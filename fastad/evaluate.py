"""Evaluate a trained model on a dataset's test split: metrics report and optional overlays."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from .data.dataset import AnomalyDataset
from .data.layouts import list_samples
from .errors import FastADError
from .metrics import evaluate
from .utils import write_json


def load_test_set(data, layout: str | None, resize: int, crop: int, exclude_defects=()):
    """-> (samples, images (n, 3, S, S), masks (n, S, S) bool). Reads everything up front, so a
    bad file fails before any output is written. `exclude_defects`: defect types to leave out."""
    samples = list_samples(data, "test", layout=layout)
    if exclude_defects:
        known = sorted({s.defect for s in samples})
        unknown = [d for d in exclude_defects if d not in known]
        if unknown:
            raise FastADError(f"--exclude-defects {', '.join(unknown)}: no such defect type in the test set "
                              f"(found: {', '.join(known)})")
        samples = [s for s in samples if s.defect not in set(exclude_defects)]
        if not samples:
            raise FastADError("--exclude-defects leaves no test images")
    items = [AnomalyDataset(samples, resize, crop)[i] for i in range(len(samples))]
    images = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["mask"][0] > 0.5 for it in items])
    return samples, images, masks.numpy()


def _overlay_name(sample, root: Path) -> str:
    try:
        rel = Path(sample.path).resolve().relative_to(root.resolve())
    except ValueError:
        rel = Path(sample.defect) / Path(sample.path).name
    return "_".join(p for p in rel.with_suffix("").parts if p not in ("test", "rgb")) + ".png"


def evaluate_run(predictor, data: str | os.PathLike, *, layout: str | None = None,
                 report: str | os.PathLike | None = None, overlays: str | os.PathLike | None = None,
                 batch_size: int = 16, progress: bool = True, exclude_defects=()) -> dict:
    """Score every test image with `predictor` (a fastad.Predictor: run directory, .onnx or
    .engine), compute metrics (overall and per defect) and write the JSON `report` (and overlay
    PNGs into `overlays`) — outputs only after everything succeeded."""
    from tqdm.auto import tqdm

    from .visualize import save_overlay

    samples, images, masks = load_test_set(data, layout, predictor.resize, predictor.crop, exclude_defects)
    t0 = time.perf_counter()
    scores, maps = [], []
    for start in tqdm(range(0, len(samples), batch_size), desc="eval", unit="batch",
                      disable=None if progress else True, leave=False):
        # The test images are already cropped float32: straight to the engine, no preprocessing.
        m, s = predictor.scores_and_maps(images[start:start + batch_size].numpy())
        scores.append(s)
        maps.append(m)
    seconds = time.perf_counter() - t0
    scores, maps = np.concatenate(scores), np.concatenate(maps)
    labels = np.array([s.label for s in samples])
    has_masks = any(s.mask_path is not None for s in samples)
    result = evaluate(labels, scores, masks if has_masks else None, maps if has_masks else None,
                      defects=[s.defect for s in samples])
    result["data"] = str(Path(data).resolve())
    result["excluded_defects"] = sorted(exclude_defects)
    result["inference_seconds"] = round(seconds, 2)
    result["images"] = [{"path": s.path, "defect": s.defect, "label": int(s.label), "score": float(v)}
                        for s, v in zip(samples, scores)]
    if report is not None:
        write_json(report, result)
    if overlays is not None:
        out = Path(overlays)
        vmin, vmax = float(maps.min()), float(maps.max())  # one colour scale for the whole set
        for s, img, amap, m in zip(samples, images, maps, masks):
            save_overlay(out / _overlay_name(s, Path(data)), img.permute(1, 2, 0).numpy(), amap,
                         vmin=vmin, vmax=vmax, mask=m if s.mask_path is not None else None)
    return result


def print_metrics(result: dict) -> None:
    """One line of an `evaluate_run` result: the metrics and the test-set size."""
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    print(f"image AUROC {fmt(result['image_auroc'])}  pixel AUROC {fmt(result['pixel_auroc'])}  "
          f"AUPRO {fmt(result['aupro'])}  F1-max {fmt(result['f1_max'])}  "
          f"({result['num_images']} images, {result['num_anomalous']} anomalous)")


@torch.no_grad()
def eval_intermediates(model, explain, data, layout: str | None, out_dir: str | os.PathLike,
                       batch_size: int = 8) -> list[Path]:
    """`fastad eval --intermediates DIR`: one strip per test image of the family's `explain`
    output (fastad.visualize.save_intermediate_strips), named like the overlays."""
    from .visualize import save_intermediate_strips

    samples, images, _ = load_test_set(data, layout, model.cfg.resize, model.cfg.crop)
    device = next(model.parameters()).device
    parts = []
    for i in range(0, len(images), batch_size):
        ex = explain(model, images[i:i + batch_size].to(device))
        parts.append({k: v.float().cpu() for k, v in ex.items()})
    merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    names = [_overlay_name(s, Path(data))[:-4] for s in samples]
    return save_intermediate_strips(merged, names, out_dir)
