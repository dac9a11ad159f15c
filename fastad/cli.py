"""The `fastad` command: train (any registered model family), eval, predict, export, check, bench, demo.

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
import warnings
from pathlib import Path

from .backends import BACKENDS, BENCH_PRECISIONS, PRECISIONS
from .errors import FastADError
from .training.task import int_at_least

log = logging.getLogger("fastad")

LAYOUT_CHOICES = ("mvtec", "mvtec3d", "btad", "visa", "folder")


_positive_int = int_at_least(1, "positive")
_nonnegative_int = int_at_least(0, "non-negative")


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
SHARED_TRAIN_OPTIONS = ("epochs", "backbone", "weights", "batch_size", "lr", "seed")


def cmd_train(args) -> int:
    from . import registry
    from .training.loop import train

    if args.nproc is not None:
        return _launch_data_parallel(args)
    family = registry.get(args.model)
    options = {k: getattr(args, k) for k in SHARED_TRAIN_OPTIONS}
    own = {o.dest for o in family.options}
    for other in registry.FAMILIES.values():
        for o in other.options:
            value = getattr(args, o.dest, None) if o.flag else None
            if value is None:
                continue
            if o.dest not in own:
                owners = ", ".join(f.name for f in registry.FAMILIES.values() if o.dest in {p.dest for p in f.options})
                raise FastADError(f"{o.flag} is an option of --model {owners}, not of --model {family.name}")
            options[o.dest] = value
    t0 = time.perf_counter()
    out = train(args.data, args.out, model=family.name, layout=args.layout, device=args.device,
                resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, **options)
    if os.environ.get("RANK", "0") == "0":  # one line from a data-parallel run (torchrun sets RANK)
        print(f"trained {family.name.upper()} in {time.perf_counter() - t0:.0f} s -> {out}")
    return 0


def _launch_data_parallel(args) -> int:
    """`fastad train --nproc N …`: the same command in N processes on this machine (torchrun)."""
    from .training.distributed import launch, launched_world_size

    if launched_world_size() > 1:
        raise FastADError("--nproc starts torchrun itself: leave it out when running under torchrun")
    argv, skip = [], False
    for a in args.argv:  # the command line without --nproc N / --nproc=N
        if skip or a == "--nproc" or a.startswith("--nproc="):
            skip = a == "--nproc"
            continue
        argv.append(a)
    if args.nproc == 1:
        args.nproc = None
        return cmd_train(args)
    t0 = time.perf_counter()
    launch(argv, args.nproc, args.device)
    print(f"trained in {args.nproc} processes in {time.perf_counter() - t0:.0f} s -> {args.out}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate_run, print_metrics
    from .runtime import Predictor

    explain = _explainer(args.run) if args.intermediates else None
    predictor = Predictor(args.run, backend=args.backend, device=args.device, warmup=False,
                          precision=args.precision)
    exclude = [d.strip() for d in (args.exclude_defects or "").split(",") if d.strip()]
    result = evaluate_run(predictor, args.data, layout=args.layout, report=args.report,
                          overlays=args.overlays, progress=not args.quiet, exclude_defects=exclude)
    print_metrics(result)
    if args.intermediates:
        from .evaluate import eval_intermediates

        eval_intermediates(predictor.model, explain, args.data, args.layout, args.intermediates)
        print(f"intermediate images -> {args.intermediates}")
    if args.report:
        print(f"report -> {args.report}")
    return 0


def _explainer(run: str):
    """The `explain` of the run's family, for --intermediates; one error line where there is none."""
    from . import registry
    from .run import read_run_config

    able = ", ".join(f.name for f in registry.FAMILIES.values() if f.explain is not None)
    if Path(run).is_file():
        raise FastADError(f"--intermediates needs a run directory ({able}), not an exported model")
    family = registry.get(read_run_config(run).get("model"))
    if family.explain is None:
        raise FastADError(f"--intermediates needs a run of a model with intermediates ({able}), "
                          f"not a {family.name} run")
    return family.explain


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
                          warmup=False, precision=args.precision)
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
    from fastad.export import CheckReport, export_engine, export_onnx, export_openvino

    t0 = time.perf_counter()
    if (args.int8 or args.calibration) and args.format not in ("onnx", "openvino"):
        raise FastADError("--int8 and --calibration apply to --format onnx and openvino")
    if args.quantizer != "onnxruntime" and not (args.int8 and args.format == "openvino"):
        raise FastADError("--quantizer applies to --format openvino --int8")
    if args.calibration and not args.int8:
        raise FastADError("--calibration calibrates --int8: add --int8")
    if args.format == "triton":
        from fastad.export.triton import export_triton

        info = export_triton(args.run, args.out, engine=args.engine, max_batch=args.max_batch,
                             instance_kind=args.instance_kind, instances=args.instances, name=args.name,
                             fp16=args.fp16, max_queue_delay_us=args.max_queue_delay_us)
        print(f"exported Triton models {info['network']} ({args.engine}) and {info['pipeline']} (Python backend) "
              f"in {time.perf_counter() - t0:.0f} s -> {args.out}")
        return 0
    if args.format == "onnx":
        side = export_onnx(args.run, args.out, fp16=args.fp16, int8=args.int8, calibration=args.calibration,
                           opset=args.opset, check_batch=args.max_batch)
        print("\n".join(CheckReport.from_summary(side["trt_check"]).lines()))
    elif args.format == "openvino":
        if args.fp16:
            raise FastADError("--fp16 does not apply to OpenVINO IR: export fp32 and run it with --precision bf16, "
                              "or quantise with --int8")
        side = export_openvino(args.run, args.out, int8=args.int8, calibration=args.calibration,
                               quantizer=args.quantizer)
    else:
        side = export_engine(args.run, args.out, fp16=args.fp16, min_batch=args.min_batch,
                             opt_batch=args.opt_batch, max_batch=args.max_batch,
                             timing_cache=args.timing_cache, keep_onnx=args.keep_onnx)
    check = (side.get("quantization") or {}).get("check") or {}
    if "score_rank_correlation" in check:
        print(f"int8 against fp32 on {check['validation_images']} held-out normal images: max |Δ map| "
              f"{check['max_rel_diff_map']:.3f} of the map range, image-score rank correlation "
              f"{check['score_rank_correlation']:.3f}")
    print(f"exported {side['precision']} {args.format} in {time.perf_counter() - t0:.0f} s -> {args.out} "
          f"(+ {Path(args.out).name}.json)")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_serve(args) -> int:
    import signal
    import tempfile

    from .serving import TritonServer

    if (args.repo is None) == (args.run is None):
        raise FastADError("give one of --repo (a Triton model repository) or --run (a run directory, exported on the fly)")
    with tempfile.TemporaryDirectory(prefix="fastad-serve-") as tmp:
        repo = args.repo
        if args.run is not None:
            import torch

            from fastad.export.triton import export_triton

            kind = args.instance_kind or ("gpu" if torch.cuda.is_available() else "cpu")
            info = export_triton(args.run, Path(tmp) / "repo", engine=args.engine, max_batch=args.max_batch,
                                 instance_kind=kind)
            repo = info["repository"]
            print(f"exported {args.run} -> {info['network']}, {info['pipeline']} ({kind} instances)")
        models = _csv_list(args.models) if args.models else None
        server = TritonServer(repo, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                              tritonserver=args.tritonserver, models=models, log_path=args.log)
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            with server:
                print(f"tritonserver {server.binary} serving {repo} on 127.0.0.1 only")
                print(f"  HTTP     {server.http_url}")
                print(f"  gRPC     {server.grpc_url}")
                print(f"  metrics  {server.metrics_url}")
                print(f"  models   {', '.join(server.models)}")
                print(f"  pid      {server.process.pid} (a process group of its own)")
                for name, why in server.skipped.items():
                    print(f"  not loaded: {name} ({why})")
                print("Ctrl-C stops it.", flush=True)
                code = server.process.wait()
                raise FastADError(f"tritonserver exited with status {code}; its log ({server.log_path}) ends:\n"
                                  f"{server.log_tail()}")
        except KeyboardInterrupt:
            print("stopped")
            return 0
        finally:
            signal.signal(signal.SIGTERM, previous)


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
    if args.server:
        from .benchmark import run_server_bench

        result = run_server_bench(args.server, args.concurrency, run=args.run, data=args.data, per_thread=args.rounds,
                                  max_seconds=args.max_seconds, device=args.device, model=args.model,
                                  command="fastad " + " ".join(args.argv))
        write_outputs(result, args.json, args.md, args.png)
        print(markdown_table(result), end="")
        return 0
    if args.run is None:
        raise FastADError("give --run (a run directory), or --server URL to benchmark a Triton server")
    result = run_bench(args.run, _csv_list(args.backend), args.batch, device=args.device, data=args.data,
                       rounds=args.rounds, max_seconds=args.max_seconds, engine=args.engine,
                       onnx=_csv_list(args.onnx) if args.onnx else None,
                       openvino=_csv_list(args.openvino) if args.openvino else None,
                       calibration=args.calibration, threads=args.threads, matmul_size=args.matmul_size,
                       test_set=args.test_set, command="fastad " + " ".join(args.argv))
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
    from . import registry

    parser = argparse.ArgumentParser(prog="fastad", description="Transformer-based visual anomaly detection.")
    sub = parser.add_subparsers(dest="command", required=True)

    def backend_option(p):
        p.add_argument("--backend", default="auto",
                       help=f"auto (default: triton for a run directory on CUDA, else torch; an exported file's own "
                            f"engine), {', '.join(BACKENDS)}")
        p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                       help="a run directory's weights/activations: fp32 (default), fp16, bf16 "
                            "(statistics stay fp32); an exported file keeps its own")

    def common(p):
        p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("train", help="train a model on the normal images of a dataset")
    p.add_argument("--model", default=registry.DEFAULT, choices=list(registry.FAMILIES),
                   help=f"model family (default {registry.DEFAULT}): " + "; ".join(f"{f.name}: {f.title}" for f in registry.FAMILIES.values()))
    p.add_argument("--data", required=True, help="dataset root (one category)")
    p.add_argument("--layout", choices=LAYOUT_CHOICES, help="dataset layout (detected when omitted)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--epochs", type=_nonnegative_int,
                   help="training epochs (default from the model config); 0 writes the untrained starting "
                        "point (reference features and statistics only), to measure what training adds")
    p.add_argument("--backbone", help="timm backbone name (default efficientnet_lite0)")
    p.add_argument("--weights", help="backbone weights: auto (default: hub, else offline default), none (random), or a file")
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--lr", type=_positive_float)
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--nproc", type=_positive_int, metavar="N",
                   help="data-parallel training in N processes on this machine (torchrun; one GPU each on "
                        "CUDA); the batch size is the global batch, split over them. Several machines: "
                        "run `torchrun … -m fastad train …` on each (docs/distributed.md)")
    added: set[str] = set()
    for family in registry.FAMILIES.values():  # each family's own options, in a group of its own
        options = [o for o in family.options if o.flag and o.dest not in added]
        if options:
            g = p.add_argument_group(f"--model {family.name}")
            for o in options:
                g.add_argument(o.flag, dest=o.dest, **o.kwargs)
                added.add(o.dest)
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
    p.add_argument("--intermediates", help="write per-image strips of the model's intermediates into this "
                   "directory (families with intermediates: " +
                   ", ".join(f.name for f in registry.FAMILIES.values() if f.explain) + ")")
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

    p = sub.add_parser("export", help="export a run to ONNX, a TensorRT engine or a Triton model repository")
    p.add_argument("--run", required=True, help="run directory written by fastad train")
    p.add_argument("--format", required=True, choices=["onnx", "engine", "openvino", "triton"])
    p.add_argument("--out", required=True, help="model.onnx, model.engine or model.xml (OpenVINO; + model.bin); a .json "
                   "sidecar goes next to it; triton: the model repository folder")
    p.add_argument("--int8", action="store_true",
                   help="onnx, openvino: the linear layers in INT8 (post-training quantisation: onnxruntime QDQ, "
                        "NNCF), calibrated on normal images")
    p.add_argument("--calibration", help="--int8: folder of normal images (default: the run's training data)")
    p.add_argument("--quantizer", default="onnxruntime", choices=["onnxruntime", "nncf"],
                   help="openvino --int8: convert onnxruntime's QDQ graph (default, as --format onnx --int8) or "
                        "quantise the IR with NNCF (under accuracy control on held-out normal images)")
    p.add_argument("--fp16", action="store_true", help="fp16 weights/activations (statistics stay fp32)")
    p.add_argument("--opset", type=_positive_int, default=17, help="ONNX opset (17..20, default 17)")
    p.add_argument("--min-batch", type=_positive_int, default=1, help="engine profile: minimum batch")
    p.add_argument("--opt-batch", type=_positive_int, default=8, help="engine profile: batch tuned for")
    p.add_argument("--max-batch", type=_positive_int, default=32,
                   help="engine profile maximum; also the batch the ONNX check sizes tensors at; "
                        "triton: max_batch_size of both models")
    p.add_argument("--timing-cache", help="TensorRT timing cache file (read and updated)")
    p.add_argument("--keep-onnx", action="store_true", help="engine: keep the intermediate ONNX next to it")
    g = p.add_argument_group("--format triton")
    g.add_argument("--engine", default="onnx", choices=["onnx", "tensorrt"],
                   help="the network model: onnx (platform onnxruntime_onnx, default) or tensorrt (tensorrt_plan)")
    g.add_argument("--instance-kind", default="gpu", choices=["gpu", "cpu"], help="instance group kind (default gpu)")
    g.add_argument("--instances", type=_positive_int, default=1, help="instances per model (default 1)")
    g.add_argument("--name", help="model name (default: the run directory's name)")
    g.add_argument("--max-queue-delay-us", type=int, default=2000,
                   help="dynamic batching: longest wait for a fuller batch, microseconds (default 2000)")
    p.set_defaults(func=cmd_export, quiet=False)

    p = sub.add_parser("serve", help="serve a Triton model repository (or a run) with Triton Inference Server")
    p.add_argument("--repo", help="model repository written by fastad export --format triton")
    p.add_argument("--run", help="or a run directory: exported into a temporary repository first")
    p.add_argument("--engine", default="onnx", choices=["onnx", "tensorrt"], help="--run: the network model's engine")
    p.add_argument("--instance-kind", choices=["gpu", "cpu"], help="--run: instance kind (default gpu with CUDA, else cpu)")
    p.add_argument("--max-batch", type=_positive_int, default=8, help="--run: max_batch_size (default 8)")
    p.add_argument("--models", help="comma-separated models to load (default: every model this server has a backend for)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000; 0: any free port)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port on 127.0.0.1 (default 8001; 0: any free port)")
    p.add_argument("--metrics-port", type=int, default=8002, help="metrics port on 127.0.0.1 (default 8002; 0: any free port)")
    p.add_argument("--tritonserver", help="a Triton install's tritonserver binary (default: nvidia-pytriton's)")
    p.add_argument("--log", help="write the server's log here (default: a temporary file)")
    p.set_defaults(func=cmd_serve, quiet=False)

    p = sub.add_parser("check", help="check an ONNX model against TensorRT's supported ops and limits")
    p.add_argument("model", help="model.onnx")
    p.add_argument("--batch", type=_positive_int, default=32, help="largest batch to size tensors at")
    p.set_defaults(func=cmd_check, quiet=False)

    p = sub.add_parser("bench", help="latency/throughput/memory/parity of backends and batch sizes, or of a Triton server")
    p.add_argument("--run", help="run directory written by fastad train; with --server: what to run in-process beside it "
                   "(a run directory or the repository's model.onnx)")
    p.add_argument("--backend", default="torch,onnx",
                   help="comma-separated backend[:precision], e.g. torch,onnx,onnx:int8,openvino:bf16 (default "
                        "torch,onnx); " + "; ".join(f"{b}: {'/'.join(ps)}" for b, ps in BENCH_PRECISIONS.items()))
    p.add_argument("--batch", type=_csv_ints, default=[1, 8], help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--json", help="write the JSON result here")
    p.add_argument("--md", help="write a Markdown table here")
    p.add_argument("--png", help="write a throughput/latency plot here")
    p.add_argument("--data", help="time on this dataset's test images (default: seeded noise)")
    p.add_argument("--rounds", type=_positive_int, help="timed rounds per batch size (default: until --max-seconds)")
    p.add_argument("--max-seconds", type=_positive_float, default=60.0, help="time budget per batch size (default 60)")
    p.add_argument("--onnx", help="comma-separated .onnx files to use instead of exporting the run (each serves "
                   "the precision its sidecar records)")
    p.add_argument("--openvino", help="comma-separated OpenVINO .xml files, likewise (an fp32 IR serves fp32 and bf16)")
    p.add_argument("--engine", help="use this TensorRT engine instead of building one")
    p.add_argument("--calibration", help="normal images for int8 files exported on the fly (default: the run's training data)")
    p.add_argument("--threads", type=_positive_int, help="CPU threads per backend (default: each engine's own choice)")
    p.add_argument("--matmul-size", type=_positive_int,
                   help="also time an N×N torch matrix product in fp32 and bf16 among the backends, and report each "
                        "backend's GFLOP/s as a fraction of that rate (e.g. 2048)")
    p.add_argument("--test-set", action="store_true",
                   help="also score --data's whole test set with every backend: image AUROC and max |Δ map| / range")
    g = p.add_argument_group("a Triton server (fastad serve)")
    g.add_argument("--server", help="benchmark this server: http://HOST:PORT or grpc://HOST:PORT")
    g.add_argument("--model", help="the pipeline model's name (default: the server's one fastad pipeline model)")
    g.add_argument("--concurrency", type=_csv_ints, default=[1, 4, 16],
                   help="comma-separated numbers of client threads (default 1,4,16); --rounds: requests per thread")
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
    # Decoders' chatter about a damaged file (PIL's warnings and log records) would come before
    # the one error line that names the file; a file that decodes needs none of it either.
    logging.getLogger("PIL").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"PIL\.")
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
