"""`fastad demo`: the main job on the embedded default, fully offline.

Builds the synthetic-defect demo dataset (real scikit-image brick texture, scratches / spots /
cut-paste / colour defects with exact masks), trains FOD on it with the offline
EfficientNet-Lite0 backbone, evaluates, and writes heatmap overlays:

    OUT/data/        the demo dataset (MVTec layout; rebuilt each run)
    OUT/run/         the trained run (config.json, model.safetensors)
    OUT/report.json  metrics
    OUT/heatmaps/    overlay PNGs (ground-truth contours in white)
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from .data.demo import make_demo_dataset

# Small enough for a 2-core CPU in a few minutes; the model config is the default one.
DEMO_EPOCHS = 4


def run_demo(out: str | os.PathLike = "demo_out", *, epochs: int | None = None, device: str = "auto",
             progress: bool = True) -> dict:
    from .evaluate import evaluate_run, print_metrics
    from .runtime import Predictor
    from .training.loop import train

    out = Path(out)
    t0 = time.perf_counter()
    data = make_demo_dataset(out / "data", overwrite=True)
    print(f"demo dataset -> {data}")
    run = train(data, out / "run", model="fod", epochs=epochs or DEMO_EPOCHS, device=device, overwrite=True,
                progress=progress)
    print(f"trained -> {run}")
    result = evaluate_run(Predictor(run, device=device, warmup=False), data, report=out / "report.json",
                          overlays=out / "heatmaps", progress=progress)
    print_metrics(result)
    print(f"report -> {out / 'report.json'}, heatmaps -> {out / 'heatmaps'} "
          f"({time.perf_counter() - t0:.0f} s)")
    return result
