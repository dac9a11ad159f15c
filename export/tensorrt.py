"""TensorRT engine export: run -> ONNX -> serialized engine, with the TensorRT Python API.

    fastad export --run runs/bottle --format engine --out bottle.engine [--fp16]
                  [--min-batch 1 --opt-batch 8 --max-batch 32] [--timing-cache trt.cache]

Equivalent trtexec command (from the exported ONNX; drop --fp16 for fp32):

    trtexec --onnx=bottle.onnx --saveEngine=bottle.engine --fp16 \
            --minShapes=images:1x3x256x256 --optShapes=images:8x3x256x256 \
            --maxShapes=images:32x3x256x256 --timingCacheFile=trt.cache

TensorRT 10.x (JetPack 6, desktop): fp32 ONNX; fp16 through `BuilderFlag.FP16` (weakly typed:
TensorRT picks fp16 kernels where it deems them accurate).
TensorRT 11.x: networks are strongly typed — every tensor keeps the type the ONNX gives it and
`BuilderFlag.FP16` no longer exists — so fp16 engines are built from the fp16 ONNX (fp32
statistics inside, see `export/onnx.py`); trtexec: `--stronglyTyped` and the fp16 ONNX.

Engines are specific to the GPU and TensorRT version that built them. The sidecar JSON
(`bottle.engine.json`) records both, the optimisation profile and the model metadata.

Not run on these machines (TensorRT cannot be installed without a GPU); written against the
documented TensorRT 10 Python API. Without TensorRT, `import_tensorrt` is one clear error.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from fastad.errors import FastADError
from fastad.utils import atomic_path


def import_tensorrt():
    """`import tensorrt`, or one FastADError line saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise FastADError(
            "TensorRT is not installed: `pip install tensorrt` (x86-64 with an NVIDIA GPU) or use "
            "JetPack's python3-libnvinfer on Jetson; the ONNX export (--format onnx) needs no TensorRT"
        ) from None
    return trt


def tensorrt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def trtexec_command(onnx_path, engine_path, crop: int, *, fp16: bool, strongly_typed: bool,
                    min_batch: int, opt_batch: int, max_batch: int, timing_cache=None) -> str:
    shape = lambda b: f"images:{b}x3x{crop}x{crop}"  # noqa: E731
    parts = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
             f"--minShapes={shape(min_batch)}", f"--optShapes={shape(opt_batch)}",
             f"--maxShapes={shape(max_batch)}"]
    if strongly_typed:
        parts.append("--stronglyTyped")
    elif fp16:
        parts.append("--fp16")
    if timing_cache:
        parts.append(f"--timingCacheFile={timing_cache}")
    return " ".join(parts)


def build_engine_from_onnx(trt, onnx_path, *, crop: int, fp16: bool, strongly_typed: bool,
                           min_batch: int, opt_batch: int, max_batch: int,
                           workspace_gb: float = 4.0, timing_cache: Path | None = None) -> bytes:
    """Parse the ONNX, set the profile/precision, build. -> serialized engine bytes."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)  # explicit batch is the only mode since TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise FastADError(f"TensorRT could not parse {onnx_path}: {errors[0] if errors else 'unknown error'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape("images", (min_batch, 3, crop, crop), (opt_batch, 3, crop, crop), (max_batch, 3, crop, crop))
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FastADError("TensorRT engine build failed (see the TensorRT log above)")
    if timing_cache is not None:
        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def export_engine(run_dir: str | os.PathLike, out: str | os.PathLike, *, fp16: bool = False,
                  min_batch: int = 1, opt_batch: int = 8, max_batch: int = 32,
                  timing_cache: str | os.PathLike | None = None, workspace_gb: float = 4.0,
                  keep_onnx: bool = False) -> dict:
    """Run directory -> TensorRT engine `out` (+ `out`.json sidecar). -> the sidecar dict."""
    from fastad.sidecar import read_sidecar, sidecar_path

    from .onnx import export_onnx

    out = Path(out)
    if out.suffix not in (".engine", ".plan"):
        raise FastADError(f"--out must end in .engine or .plan, got {out}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise FastADError(f"need 1 <= min batch <= opt batch <= max batch, got {min_batch}, {opt_batch}, {max_batch}")
    trt = import_tensorrt()  # before any work: without TensorRT nothing is written
    major = tensorrt_major(trt)
    strongly_typed = major >= 11
    with tempfile.TemporaryDirectory(prefix="fastad-trt-") as tmp:
        onnx_path = (out.with_suffix(".onnx") if keep_onnx else Path(tmp) / "model.onnx")
        # TensorRT 11 is strongly typed: fp16 must come from the fp16 graph. The export checks the
        # graph against TensorRT's limits at max_batch and refuses an incompatible one.
        export_onnx(run_dir, onnx_path, fp16=fp16 and strongly_typed, check_batch=max_batch)
        side = read_sidecar(onnx_path)
        crop = side["input"]["crop"]
        cache = Path(timing_cache) if timing_cache else None
        engine = build_engine_from_onnx(trt, onnx_path, crop=crop, fp16=fp16, strongly_typed=strongly_typed,
                                        min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                                        workspace_gb=workspace_gb, timing_cache=cache)
        side.update({
            "file": out.name, "artifact": "engine", "precision": "fp16" if fp16 else "fp32",
            "tensorrt": {"version": str(trt.__version__), "strongly_typed": strongly_typed,
                         "profile": {"min": min_batch, "opt": opt_batch, "max": max_batch},
                         "workspace_gb": workspace_gb, "timing_cache": str(cache) if cache else None,
                         "trtexec": trtexec_command(onnx_path.name, out.name, crop, fp16=fp16,
                                                    strongly_typed=strongly_typed, min_batch=min_batch,
                                                    opt_batch=opt_batch, max_batch=max_batch,
                                                    timing_cache=cache)},
        })
        try:
            import torch

            side["tensorrt"]["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001 - informational only
            pass
        with atomic_path(sidecar_path(out)) as tmp_json, atomic_path(out) as tmp_engine:  # sidecar renamed last
            tmp_engine.write_bytes(engine)
            from .onnx import file_sha256

            side["sha256"] = file_sha256(tmp_engine)
            tmp_json.write_text(json.dumps(side, indent=2) + "\n")
    return side
