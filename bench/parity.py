"""Parity of exported models against the torch predictor on a dataset's whole test split.

    python bench/parity.py --run runs/bottle --data ../shared/data/mvtec_ad/bottle \
        --model bottle.onnx [--model bottle16.onnx ...] --json bench/results/onnx_parity_bottle.json

For each model: max |Δ anomaly_map| (absolute and relative to the reference maps' range),
max |Δ score|, whether the image-score ranking is identical, and the image AUROC of both.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
from sklearn.metrics import roc_auc_score

from fastad.benchmark import device_name
from fastad.data.layouts import list_samples
from fastad.preprocess import prepare_images
from fastad.runtime import Predictor
from fastad.utils import library_versions, write_json


def predict_all(predictor: Predictor, batch: np.ndarray, chunk: int = 8):
    maps, scores = [], []
    for i in range(0, len(batch), chunk):
        m, s = predictor.scores_and_maps(batch[i:i + chunk])
        maps.append(m)
        scores.append(s)
    return np.concatenate(maps), np.concatenate(scores)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", action="append", required=True, help=".onnx or .engine (repeatable)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    reference = Predictor(args.run, backend="torch", device=args.device)
    samples = list_samples(args.data, split="test")
    labels = np.array([s.label for s in samples])
    batch = prepare_images([str(s.path) for s in samples], reference.resize, reference.crop).numpy()
    ref_maps, ref_scores = predict_all(reference, batch)
    span = float(ref_maps.max() - ref_maps.min())
    result = {"device": device_name(args.device), "versions": library_versions(), "command": "python bench/parity.py " + " ".join(sys.argv[1:]),
              "run": args.run, "data": args.data, "num_images": len(samples), "map_range": span,
              "reference_image_auroc": float(roc_auc_score(labels, ref_scores)), "models": []}
    for path in args.model:
        p = Predictor(path, device=args.device)
        maps, scores = predict_all(p, batch)
        diff = float(np.abs(maps - ref_maps).max())
        rec = {"model": path, "backend": p.backend, "precision": p.engine.meta.get("precision"),
               "max_abs_diff_map": diff, "max_rel_diff_map": diff / span,
               "max_abs_diff_score": float(np.abs(scores - ref_scores).max()),
               "identical_ranking": bool((np.argsort(scores, kind="stable") == np.argsort(ref_scores, kind="stable")).all()),
               "image_auroc": float(roc_auc_score(labels, scores))}
        result["models"].append(rec)
        print(rec)
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
