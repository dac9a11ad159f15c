"""The `fastad` command: train (FOD or ADTR), eval, predict, demo.

User mistakes (bad paths, corrupt images, mismatched runs, bad values) raise FastADError and
end as one line `error: …` on stderr with exit status 2 — never a traceback. Outputs are
written only after the work succeeded, each file atomically.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .errors import FastADError

log = logging.getLogger("fastad")

LAYOUT_CHOICES = ("mvtec", "mvtec3d", "btad", "visa", "folder")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------
ADTR_ONLY = ("anomalies", "anomaly_labels", "anomaly_masks", "synthetic")


def cmd_train(args) -> int:
    from .train import train

    extra = {k: getattr(args, k) for k in ADTR_ONLY if getattr(args, k) is not None}
    if args.model != "adtr" and extra:
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise FastADError(f"{flags} only apply to --model adtr (anomaly-available training)")
    t0 = time.perf_counter()
    out = train(args.data, args.out, model=args.model, layout=args.layout, epochs=args.epochs,
                backbone=args.backbone, weights=args.weights, device=args.device,
                batch_size=args.batch_size, lr=args.lr, seed=args.seed, resume=args.resume,
                overwrite=args.overwrite, progress=not args.quiet, **extra)
    print(f"trained {args.model.upper()} in {time.perf_counter() - t0:.0f} s -> {out}")
    return 0


def _print_metrics(result: dict) -> None:
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    print(f"image AUROC {fmt(result['image_auroc'])}  pixel AUROC {fmt(result['pixel_auroc'])}  "
          f"AUPRO {fmt(result['aupro'])}  F1-max {fmt(result['f1_max'])}  "
          f"({result['num_images']} images, {result['num_anomalous']} anomalous)")


def cmd_eval(args) -> int:
    from .api import load
    from .evaluate import evaluate_run

    predictor = load(args.run, device=args.device)
    exclude = [d.strip() for d in (args.exclude_defects or "").split(",") if d.strip()]
    result = evaluate_run(predictor, args.data, layout=args.layout, report=args.report,
                          overlays=args.overlays, progress=not args.quiet, exclude_defects=exclude)
    _print_metrics(result)
    if args.report:
        print(f"report -> {args.report}")
    return 0


def _expand_inputs(items: list[str]) -> list[Path]:
    from .data.layouts import _images_in, _is_image

    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = _images_in(p)
            if not found:
                raise FastADError(f"no images in directory {p}")
            paths.extend(found)
        elif p.is_file():
            if not _is_image(p):
                raise FastADError(f"{p} is not an image file (png, jpg, bmp, tif)")
            paths.append(p)
        else:
            raise FastADError(f"no such file or directory: {p}")
    return paths


def cmd_predict(args) -> int:
    import csv
    import io

    import numpy as np

    from .api import load
    from .utils import atomic_path, write_json
    from .visualize import save_map_png

    paths = _expand_inputs(args.inputs)
    predictor = load(args.run, device=args.device)
    res = predictor.predict([str(p) for p in paths])  # reads every image before writing anything
    out = Path(args.out)
    names = _unique_names(paths)
    # Colour scale of the map PNGs: 0 .. twice the largest score seen on the training images.
    vmax = float(predictor.config.get("normal_scores", {}).get("max", 0.0)) * 2 or float(res.anomaly_map.max())
    rows = [{"path": str(p), "score": float(s), "map": f"maps/{n}.png"}
            for p, s, n in zip(paths, res.score, names)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["path", "score", "map"])
    writer.writeheader()
    writer.writerows(rows)
    for name, amap in zip(names, res.anomaly_map):
        save_map_png(out / "maps" / f"{name}.png", amap, 0.0, vmax)
        if args.save_npy:
            with atomic_path(out / "maps" / f"{name}.npy") as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, amap.astype(np.float32))
    with atomic_path(out / "scores.csv") as tmp:
        tmp.write_text(buf.getvalue())
    write_json(out / "scores.json", {"run": str(Path(args.run).resolve()), "map_vmax": vmax, "images": rows})
    for r in rows:
        print(f"{r['score']:.5f}  {r['path']}")
    print(f"{len(rows)} images -> {out / 'scores.csv'}")
    return 0


def _unique_names(paths: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        base = p.stem
        k = seen.get(base, 0)
        seen[base] = k + 1
        names.append(base if k == 0 else f"{base}_{k}")
    return names


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, epochs=args.epochs, device=args.device, progress=not args.quiet)
    return 0


# --------------------------------------------------------------------------------------------
# Parser and entry point
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastad", description="Transformer-based visual anomaly detection.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("train", help="train a model on the normal images of a dataset")
    p.add_argument("--model", default="fod", choices=["fod", "adtr"], help="model family (default fod)")
    p.add_argument("--data", required=True, help="dataset root (one category)")
    p.add_argument("--layout", choices=LAYOUT_CHOICES, help="dataset layout (detected when omitted)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--epochs", type=_positive_int, help="training epochs (default from the model config)")
    p.add_argument("--backbone", help="timm backbone name (default efficientnet_lite0)")
    p.add_argument("--weights", default="auto",
                   help="backbone weights: auto (hub, else offline default), none (random), or a file")
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--lr", type=_positive_float)
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    g = p.add_argument_group("anomaly-available training (--model adtr)")
    g.add_argument("--anomalies", metavar="DIR",
                   help="folder of labelled anomalous images (masks in DIR/masks, or --anomaly-masks)")
    g.add_argument("--anomaly-labels", choices=["image", "pixel"],
                   help="use the anomalies' masks (pixel) or only their label (image); default: pixel "
                        "when every image has a mask, else image")
    g.add_argument("--anomaly-masks", metavar="DIR", help="mask folder for --anomalies (<stem>.png or <stem>_mask.png)")
    g.add_argument("--synthetic", choices=["confetti", "perlin", "cutpaste"],
                   help="add synthetic anomalies (with masks) made from the training images")
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run on a dataset's test split")
    p.add_argument("--run", required=True, help="run directory written by fastad train")
    p.add_argument("--data", required=True, help="dataset root (one category)")
    p.add_argument("--layout", choices=LAYOUT_CHOICES)
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--overlays", help="write heatmap overlay PNGs into this directory")
    p.add_argument("--exclude-defects", metavar="NAMES",
                   help="comma-separated defect types to leave out of the test set (e.g. the type "
                        "whose images were given to anomaly-available training)")
    common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="score images with a trained run")
    p.add_argument("--run", required=True)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--out", required=True, help="output directory (scores.csv, scores.json, maps/)")
    p.add_argument("--save-npy", action="store_true", help="also save the raw float maps as .npy")
    common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="train and evaluate on the embedded offline demo dataset")
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    p.add_argument("--epochs", type=_positive_int, help="override the demo's epochs")
    common(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "fastad" / "inductor"))
    try:
        return args.func(args)
    except FastADError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
