"""A Triton Inference Server model repository of a trained run (installed as ``fastad.export.triton``).

    fastad export --run runs/bottle --format triton --out repo [--engine onnx|tensorrt]
                  [--max-batch 8] [--instance-kind gpu|cpu] [--name bottle] [--fp16]

writes two models into the repository `repo` (other models already there are left alone; two
of the same names are replaced):

    repo/bottle/                 the network, for clients that preprocess themselves
        config.pbtxt             platform onnxruntime_onnx | tensorrt_plan
        1/model.onnx + model.onnx.json      (or 1/model.plan + model.plan.json, TensorRT)
    repo/bottle_pipeline/        the whole pipeline, for line software (Python backend)
        config.pbtxt
        1/model.py               -> fastad.triton_pipeline.TritonPythonModel

The network: `images` FP32 [-1, 3, S, S] in [0, 1] -> `anomaly_map` FP32 [-1, S, S] and `score`
FP32 [-1, 1] (the graph's (B,) score, reshaped: Triton's batch dimension needs one more axis).
The pipeline: encoded image files of any size in, fastad's own preprocessing, the network file
above run in the pipeline's own process (fastad.Predictor: onnxruntime or TensorRT), fastad's
post-processing with the sidecar's thresholds, and the `fastad.Predictor` result out (the wire
format is fastad.serving's). Both batch dynamically up to `max_batch`.

Every config is built as Triton's own `ModelConfig` protobuf message (tritonclient ships the
generated bindings) and written in its text format, so it cannot hold a field Triton lacks.
Files are written into a hidden folder of the repository first and renamed into place: a
failed export leaves the repository as it was.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from fastad.errors import FastADError
from fastad.serving import (NETWORK_INPUT, NETWORK_OUTPUTS, PIPELINE_INPUT, PIPELINE_OUTPUTS,
                            PIPELINE_SUFFIX, ROLE_NETWORK, ROLE_PIPELINE)
from fastad.sidecar import read_sidecar

try:
    from tritonclient.grpc import model_config_pb2  # Triton's model-config schema, generated bindings
except ImportError:  # pragma: no cover - tritonclient is in requirements.txt
    model_config_pb2 = None

ENGINES = ("onnx", "tensorrt")
PLATFORM_OF_ENGINE = {"onnx": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
FILE_OF_ENGINE = {"onnx": "model.onnx", "tensorrt": "model.plan"}  # Triton's default file names
INSTANCE_KINDS = ("gpu", "cpu")
DEFAULT_MAX_QUEUE_DELAY_US = 2000
PIPELINE_FILE = """\
# The Triton Python-backend entry point of a fastad pipeline model (fastad export --format triton).
import os
import sys

# The Python backend's stub ignores PYTHONPATH; `fastad serve` passes its interpreter's path here
# (a Triton install whose Python has fastad installed needs nothing).
sys.path[:0] = [p for p in os.environ.get("FASTAD_PYTHON_PATH", "").split(os.pathsep) if p and p not in sys.path]

from fastad.triton_pipeline import TritonPythonModel  # noqa: E402,F401
"""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def model_name_of(run_dir: str | os.PathLike) -> str:
    """A Triton model name from the run directory's name (characters other than letters,
    digits, '_', '-', '.' become '_')."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(run_dir).resolve().name).lstrip("._-")
    return name or "fastad"


# --------------------------------------------------------------------------------------------
# The two configs
# --------------------------------------------------------------------------------------------
def _batching(config, max_batch: int, max_queue_delay_us: int) -> None:
    config.max_batch_size = max_batch
    config.dynamic_batching.preferred_batch_size[:] = sorted({min(4, max_batch), max_batch})
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us


def _instances(config, kind: str, count: int) -> None:
    kinds = {"gpu": model_config_pb2.ModelInstanceGroup.KIND_GPU,
             "cpu": model_config_pb2.ModelInstanceGroup.KIND_CPU}
    config.instance_group.add(kind=kinds[kind], count=count)


def network_config(name: str, engine: str, crop: int, max_batch: int, *, instance_kind: str = "gpu",
                   instances: int = 1, max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US):
    """The network model's ModelConfig: `images` [-1, 3, S, S] -> `anomaly_map`, `score`."""
    fp32 = model_config_pb2.TYPE_FP32
    config = model_config_pb2.ModelConfig(name=name, platform=PLATFORM_OF_ENGINE[engine],
                                          default_model_filename=FILE_OF_ENGINE[engine])
    _batching(config, max_batch, max_queue_delay_us)
    config.input.add(name=NETWORK_INPUT, data_type=fp32, dims=[3, crop, crop])
    amap_name, score_name = NETWORK_OUTPUTS
    config.output.add(name=amap_name, data_type=fp32, dims=[crop, crop])
    score = config.output.add(name=score_name, data_type=fp32, dims=[1])
    score.reshape.SetInParent()  # the graph's score is (B,): shape [] per image, [1] on the wire
    _instances(config, instance_kind, instances)
    config.parameters["fastad_role"].string_value = ROLE_NETWORK
    return config


def pipeline_config(name: str, network_file: str, side: dict, max_batch: int, *, instance_kind: str = "gpu",
                    instances: int = 1, max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
                    min_region_area: int = 1):
    """The pipeline model's ModelConfig (Python backend): one encoded image file per batch row in;
    see fastad.serving for the outputs. `network_file` is relative to the repository."""
    crop = int(side["input"]["crop"])
    config = model_config_pb2.ModelConfig(name=name, backend="python")
    _batching(config, max_batch, max_queue_delay_us)
    config.input.add(name=PIPELINE_INPUT, data_type=model_config_pb2.TYPE_STRING, dims=[1])
    for out_name, (dtype, per_image) in PIPELINE_OUTPUTS.items():
        dims = [crop, crop] if per_image == "map" else [1]
        config.output.add(name=out_name, data_type=getattr(model_config_pb2, dtype), dims=dims)
    _instances(config, instance_kind, instances)
    thresholds = side.get("thresholds") or {}
    params = {"fastad_role": ROLE_PIPELINE, "network_file": network_file, "min_region_area": str(min_region_area),
              "image_threshold": "" if thresholds.get("image") is None else repr(float(thresholds["image"])),
              "pixel_threshold": "" if thresholds.get("pixel") is None else repr(float(thresholds["pixel"])),
              "model": str(side.get("model") or ""), "resize": str(side["input"]["resize"]), "crop": str(crop)}
    for key, value in params.items():
        config.parameters[key].string_value = value
    return config


def config_text(config) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


# --------------------------------------------------------------------------------------------
# The repository
# --------------------------------------------------------------------------------------------
def export_triton(run_dir: str | os.PathLike, repo: str | os.PathLike, *, engine: str = "onnx",
                  max_batch: int = 8, instance_kind: str = "gpu", instances: int = 1, name: str | None = None,
                  fp16: bool = False, max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
                  min_region_area: int = 1) -> dict:
    """Write the network and pipeline models of `run_dir` into the Triton repository `repo`.
    -> {"network": name, "pipeline": name + "_pipeline", "repository": repo, "sidecar": dict}."""
    if model_config_pb2 is None:
        raise FastADError("tritonclient is not installed: pip install 'tritonclient[grpc,http]' (requirements.txt has it)")
    if engine not in ENGINES:
        raise FastADError(f"unknown engine {engine!r}: use {', '.join(ENGINES)}")
    if instance_kind not in INSTANCE_KINDS:
        raise FastADError(f"unknown instance kind {instance_kind!r}: use {', '.join(INSTANCE_KINDS)}")
    if max_batch < 1 or instances < 1 or max_queue_delay_us < 0:
        raise FastADError(f"need max batch >= 1, instances >= 1, queue delay >= 0; got {max_batch}, "
                          f"{instances}, {max_queue_delay_us}")
    name = name or model_name_of(run_dir)
    if not _NAME.match(name):
        raise FastADError(f"model name {name!r}: use letters, digits, '_', '-' and '.' (first a letter or digit)")
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise FastADError(f"{repo} exists and is not a directory (a Triton model repository is one)")
    if not Path(run_dir).is_dir():
        raise FastADError(f"--run {run_dir}: not a run directory")
    created = not repo.exists()
    repo.mkdir(parents=True, exist_ok=True)
    try:
        return _write_models(run_dir, repo, name, engine, max_batch, fp16, min_region_area,
                             dict(instance_kind=instance_kind, instances=instances, max_queue_delay_us=max_queue_delay_us))
    except BaseException:
        if created:
            shutil.rmtree(repo, ignore_errors=True)
        raise


def _write_models(run_dir, repo: Path, name: str, engine: str, max_batch: int, fp16: bool, min_region_area: int,
                  kw: dict) -> dict:
    from .onnx import export_onnx
    from .tensorrt import export_engine

    pipeline = name + PIPELINE_SUFFIX
    network_file = f"{name}/1/{FILE_OF_ENGINE[engine]}"
    with tempfile.TemporaryDirectory(prefix=".fastad-export-", dir=repo) as tmp:
        staged = Path(tmp)
        artifact = staged / network_file
        artifact.parent.mkdir(parents=True)
        if engine == "onnx":
            export_onnx(run_dir, artifact, fp16=fp16, check_batch=max_batch)
        else:
            export_engine(run_dir, artifact, fp16=fp16, min_batch=1, opt_batch=min(8, max_batch), max_batch=max_batch)
        side = read_sidecar(artifact)
        crop = int(side["input"]["crop"])
        (staged / name / "config.pbtxt").write_text(config_text(network_config(name, engine, crop, max_batch, **kw)))
        (staged / pipeline / "1").mkdir(parents=True)
        (staged / pipeline / "1" / "model.py").write_text(PIPELINE_FILE)
        (staged / pipeline / "config.pbtxt").write_text(config_text(
            pipeline_config(pipeline, network_file, side, max_batch, min_region_area=min_region_area, **kw)))
        for model in (name, pipeline):
            _replace_dir(staged / model, repo / model)
    return {"network": name, "pipeline": pipeline, "repository": str(repo), "sidecar": side}


def _replace_dir(src: Path, dst: Path) -> None:
    """Move `src` to `dst`, replacing an existing `dst` (renamed away first, then deleted)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["export_triton", "network_config", "pipeline_config", "config_text", "model_name_of",
           "ENGINES", "INSTANCE_KINDS"]
