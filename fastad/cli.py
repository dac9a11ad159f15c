"""The `fastad` command: train (FOD or ADTR), eval, predict, export, check, bench, demo.

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

from .backends import BACKENDS
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
    if args.hypercolumn is not None:
        if args.model != "fod":
            raise FastADError("--no-hypercolumn is an FOD option (--model fod)")
        extra["hypercolumn"] = args.hypercolumn
    if args.model == "utad":
        return cmd_train_utad(args)
    if args.pm_backbone or args.pm_weights or args.schedule:
        raise FastADError("--pm-backbone, --pm-weights and --schedule are UTAD options (--model utad)")
    t0 = time.perf_counter()
    out = train(args.data, args.out, model=args.model, layout=args.layout, epochs=args.epochs,
                backbone=args.backbone, weights=args.weights, device=args.device,
                batch_size=args.batch_size, lr=args.lr, seed=args.seed, resume=args.resume,
                overwrite=args.overwrite, progress=not args.quiet, **extra)
    print(f"trained {args.model.upper()} in {time.perf_counter() - t0:.0f} s -> {out}")
    return 0


def cmd_train_utad(args) -> int:
    from .train_utad import train_utad

    if args.backbone or args.weights != "auto":
        raise FastADError("UTAD has no feature backbone: use --pm-backbone / --pm-weights for its perceptual network")
    t0 = time.perf_counter()
    out = train_utad(args.data, args.out, layout=args.layout, schedule=args.schedule,
                     epochs1=None if args.resume else args.epochs, epochs2=args.epochs,
                     pm_backbone=args.pm_backbone, pm_weights=args.pm_weights, device=args.device,
                     batch_size=args.batch_size, lr=args.lr, seed=args.seed, resume=args.resume,
                     overwrite=args.overwrite, progress=not args.quiet)
    print(f"trained UTAD in {time.perf_counter() - t0:.0f} s -> {out}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate_run, print_metrics
    from .runtime import Predictor

    if args.intermediates and Path(args.run).is_file():
        raise FastADError("--intermediates needs a UTAD run directory, not an exported model")
    predictor = Predictor(args.run, backend=args.backend, device=args.device, warmup=False)
    if args.intermediates and predictor.family != "utad":
        raise FastADError("--intermediates needs a UTAD run (the model's stages are the intermediates)")
    exclude = [d.strip() for d in (args.exclude_defects or "").split(",") if d.strip()]
    result = evaluate_run(predictor, args.data, layout=args.layout, report=args.report,
                          overlays=args.overlays, progress=not args.quiet, exclude_defects=exclude)
    print_metrics(result)
    if args.intermediates:
        from .train_utad import eval_intermediates

        eval_intermediates(predictor, args.data, args.layout, args.intermediates)
        print(f"intermediate images -> {args.intermediates}")
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
    from PIL import Image

    from .runtime import Predictor
    from .utils import atomic_path, write_json
    from .visualize import save_map_png

    paths = _expand_inputs(args.inputs)
    predictor = Predictor(args.run, backend=args.backend, device=args.device, threshold=args.threshold,
                          warmup=False)
    res = predictor.predict([str(p) for p in paths])  # reads every image before writing anything
    out = Path(args.out)
    names = _unique_names(paths)
    # Colour scale of the map PNGs: 0 .. twice the threshold (or the largest score seen).
    vmax = 2 * predictor.image_threshold if predictor.image_threshold else float(res.anomaly_maps.max())
    rows = []
    for p, s, flag, regions, n in zip(paths, res.scores, res.is_anomalous, res.regions, names):
        rows.append({"path": str(p), "score": float(s), "anomalous": bool(flag), "regions": len(regions),
                     "map": f"maps/{n}.png"})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["path", "score", "anomalous", "regions", "map"])
    writer.writeheader()
    writer.writerows(rows)
    for name, amap, mask in zip(names, res.anomaly_maps, res.masks):
        save_map_png(out / "maps" / f"{name}.png", amap, 0.0, vmax)
        if args.save_masks:
            with atomic_path(out / "masks" / f"{name}.png") as tmp:
                Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
        if args.save_npy:
            with atomic_path(out / "maps" / f"{name}.npy") as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, amap.astype(np.float32))
    with atomic_path(out / "scores.csv") as tmp:
        tmp.write_text(buf.getvalue())
    details = [{**row, "regions": [r._asdict() for r in regs]} for row, regs in zip(rows, res.regions)]
    write_json(out / "scores.json", {"model": str(Path(args.run).resolve()), "backend": predictor.backend,
                                     "threshold": predictor.image_threshold, "map_vmax": vmax, "images": details})
    for r in rows:
        flag = "ANOMALOUS" if r["anomalous"] else "ok"
        print(f"{r['score']:.5f}  {flag:9s}  {r['path']}")
    print(f"{len(rows)} images -> {out / 'scores.csv'}")
    return 0


def cmd_export(args) -> int:
    from fastad.export import CheckReport, export_engine, export_onnx

    t0 = time.perf_counter()
    if args.format == "onnx":
        side = export_onnx(args.run, args.out, fp16=args.fp16, opset=args.opset, check_batch=args.max_batch)
        print("\n".join(CheckReport.from_summary(side["trt_check"]).lines()))
    else:
        side = export_engine(args.run, args.out, fp16=args.fp16, min_batch=args.min_batch,
                             opt_batch=args.opt_batch, max_batch=args.max_batch,
                             timing_cache=args.timing_cache, keep_onnx=args.keep_onnx)
    print(f"exported {side['precision']} {args.format} in {time.perf_counter() - t0:.0f} s -> {args.out} "
          f"(+ {Path(args.out).name}.json)")
    return 0


def cmd_check(args) -> int:
    from fastad.export import check_onnx

    if not Path(args.model).is_file():
        raise FastADError(f"no such file: {args.model}")
    report = check_onnx(args.model, batch=args.batch)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in _csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def cmd_bench(args) -> int:
    from .benchmark import markdown_table, run_bench, write_outputs

    for path in (args.json, args.md, args.png):
        if path and Path(path).is_dir():
            raise FastADError(f"{path} is a directory")
    result = run_bench(args.run, _csv_list(args.backend), args.batch, device=args.device, data=args.data,
                       rounds=args.rounds, max_seconds=args.max_seconds, onnx=args.onnx, engine=args.engine,
                       command="fastad " + " ".join(args.argv))
    write_outputs(result, args.json, args.md, args.png)
    print(markdown_table(result), end="")
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

    def backend_option(p):
        p.add_argument("--backend", default="auto",
                       help=f"auto (default: triton for a run directory on CUDA, else torch; an exported file's own "
                            f"engine), {', '.join(BACKENDS)}")

    def common(p):
        p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("train", help="train a model on the normal images of a dataset")
    p.add_argument("--model", default="fod", choices=["fod", "adtr", "utad"], help="model family (default fod)")
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
    p.add_argument("--no-hypercolumn", dest="hypercolumn", action="store_false", default=None,
                   help="FOD: the authors' features, each level's own backbone stage only (deviation 10)")
    p.add_argument("--schedule", choices=["cpu", "gpu"], help="UTAD: cpu (default, short) or gpu (paper-sized)")
    p.add_argument("--pm-backbone", help="UTAD: perceptual network (default efficientnet_lite0; vgg19)")
    p.add_argument("--pm-weights", help="UTAD: perceptual network weights file (alone: VGG-19 weights)")
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run on a dataset's test split")
    p.add_argument("--run", required=True, help="run directory written by fastad train, or an exported .onnx / .engine")
    p.add_argument("--data", required=True, help="dataset root (one category)")
    p.add_argument("--layout", choices=LAYOUT_CHOICES)
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--overlays", help="write heatmap overlay PNGs into this directory")
    p.add_argument("--exclude-defects", metavar="NAMES",
                   help="comma-separated defect types to leave out of the test set (e.g. the type "
                        "whose images were given to anomaly-available training)")
    p.add_argument("--intermediates", help="UTAD: write per-image strips (input, impression, reconstruction, "
                   "naive impression, PM maps) into this directory")
    backend_option(p)
    common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="score images with a run directory, an .onnx or a TensorRT .engine")
    p.add_argument("--run", required=True, help="run directory, exported .onnx, or .engine")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--out", required=True, help="output directory (scores.csv, scores.json, maps/)")
    backend_option(p)
    p.add_argument("--threshold", type=float, help="image/pixel threshold (default: from the run or sidecar)")
    p.add_argument("--save-masks", action="store_true", help="also save binary masks (original image size)")
    p.add_argument("--save-npy", action="store_true", help="also save the raw float maps as .npy")
    common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a run to ONNX or a TensorRT engine")
    p.add_argument("--run", required=True, help="run directory written by fastad train")
    p.add_argument("--format", required=True, choices=["onnx", "engine"])
    p.add_argument("--out", required=True, help="model.onnx or model.engine (a .json sidecar is written next to it)")
    p.add_argument("--fp16", action="store_true", help="fp16 weights/activations (statistics stay fp32)")
    p.add_argument("--opset", type=_positive_int, default=17, help="ONNX opset (17..20, default 17)")
    p.add_argument("--min-batch", type=_positive_int, default=1, help="engine profile: minimum batch")
    p.add_argument("--opt-batch", type=_positive_int, default=8, help="engine profile: batch tuned for")
    p.add_argument("--max-batch", type=_positive_int, default=32,
                   help="engine profile maximum; also the batch the ONNX check sizes tensors at")
    p.add_argument("--timing-cache", help="TensorRT timing cache file (read and updated)")
    p.add_argument("--keep-onnx", action="store_true", help="engine: keep the intermediate ONNX next to it")
    p.set_defaults(func=cmd_export, quiet=False)

    p = sub.add_parser("check", help="check an ONNX model against TensorRT's supported ops and limits")
    p.add_argument("model", help="model.onnx")
    p.add_argument("--batch", type=_positive_int, default=32, help="largest batch to size tensors at")
    p.set_defaults(func=cmd_check, quiet=False)

    p = sub.add_parser("bench", help="latency/throughput/memory/parity of backends and batch sizes")
    p.add_argument("--run", required=True, help="run directory written by fastad train")
    p.add_argument("--backend", default="torch,onnx", help=f"comma-separated: {', '.join(BACKENDS)}")
    p.add_argument("--batch", type=_csv_ints, default=[1, 8], help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--json", help="write the JSON result here")
    p.add_argument("--md", help="write a Markdown table here")
    p.add_argument("--png", help="write a throughput/latency plot here")
    p.add_argument("--data", help="time on this dataset's test images (default: seeded noise)")
    p.add_argument("--rounds", type=_positive_int, help="timed rounds per batch size (default: until --max-seconds)")
    p.add_argument("--max-seconds", type=_positive_float, default=60.0, help="time budget per batch size (default 60)")
    p.add_argument("--onnx", help="use this .onnx instead of exporting the run")
    p.add_argument("--engine", help="use this TensorRT engine instead of building one")
    common(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="train and evaluate on the embedded offline demo dataset")
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    p.add_argument("--epochs", type=_positive_int, help="override the demo's epochs")
    common(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.argv = argv
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
