"""OpenVINO export of a trained run, for CPU production lines: IR (model.xml + model.bin) + sidecar.

    fastad export --run runs/bottle --format openvino --out bottle.xml
    fastad export --run runs/bottle --format openvino --out bottle-int8.xml --int8 \
                  [--calibration DIR] [--quantizer nncf]

The graph is the ONNX export's (the same inputs, outputs and fp32 statistics, see export/onnx.py),
converted with `openvino.convert_model`; weights stay fp32 in the file. Reduced precision:

- bf16: not a file property. The fp32 IR runs in bf16 on CPUs with AVX512-BF16 / AMX when the
  runtime is asked for it (`fastad.load(xml, precision="bf16")`: OpenVINO's
  INFERENCE_PRECISION_HINT), so one file serves both.
- int8 (`--int8`): the linear layers only, calibrated on normal training images (the run's
  training data unless `--calibration DIR` names a folder of normal images); which layers and
  which images: export/quantize.py. By default the int8 ONNX export's QDQ graph (onnxruntime's
  quantiser) is converted, its QuantizeLinear/DequantizeLinear pairs becoming OpenVINO
  FakeQuantize operations, so both formats carry the same quantisation. `quantizer="nncf"`
  quantises the IR with NNCF instead (`nncf.quantize`, transformer preset, the same layers); it
  moved the maps further from the fp32 reference (docs/deployment.md).

Every file is written atomically: a failed export leaves nothing behind.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from fastad.errors import FastADError
from fastad.sidecar import sidecar_path
from fastad.utils import atomic_path

from .quantize import int8_check, normal_images, openvino_linear_layers, quantization_record, run_batched


def import_openvino():
    try:
        import openvino as ov
    except ImportError:
        raise FastADError("OpenVINO is not installed: pip install openvino (and nncf for --int8)") from None
    return ov


def openvino_runner(model):
    """An ov.Model compiled for the CPU (fp32) as `batch -> (maps, scores)`, for `int8_check`."""
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def run(batch):
        res = compiled(batch)
        return res[compiled.output("anomaly_map")], res[compiled.output("score")]
    return run


def quantize_nncf(ov_model, images: np.ndarray, held_out: np.ndarray, calibration=None):
    """NNCF post-training INT8 quantisation of the linear layers, calibrated on `images`
    (n, 3, S, S), one per call. With `held_out` normal images, under NNCF's accuracy control:
    layers go back to float until the rank correlation of the held-out image scores with the fp32
    model's stays within MAX_RANK_DROP of 1. -> (the quantised model, its sidecar "quantization"
    entry)."""
    try:
        import nncf
    except ImportError:
        raise FastADError("--int8 needs NNCF: pip install nncf") from None
    from nncf.quantization.advanced_parameters import (AdvancedAccuracyRestorerParameters,
                                                       AdvancedQuantizationParameters, AdvancedSmoothQuantParameters)
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet
    from scipy.stats import spearmanr

    nncf.set_log_level(logging.ERROR)  # its per-step INFO lines and progress bars
    linear, other = openvino_linear_layers(ov_model)
    if not linear:
        raise FastADError("--int8: the model has no linear layers to quantise")
    dataset = nncf.Dataset([images[i:i + 1] for i in range(len(images))])
    # Activation ranges from the whole calibration set's min/max, as onnxruntime's: the default
    # (mean of per-image ranges) clips the large activations of defects. No SmoothQuant: it
    # rescales the activations the float σ heads also read.
    advanced = AdvancedQuantizationParameters(
        activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
    options = dict(model_type=nncf.ModelType.TRANSFORMER, subset_size=len(images),
                   ignored_scope=nncf.IgnoredScope(names=other, validate=False))
    record = quantization_record(f"nncf {nncf.__version__}", linear, images, calibration)
    if len(held_out) < 4:  # too few to rank: plain post-training quantisation
        return nncf.quantize(ov_model, dataset, advanced_parameters=advanced, **options), record
    reference = run_batched(openvino_runner(ov_model), held_out)[1]

    def rank_agreement(compiled, items) -> tuple[float, None]:
        scores = np.concatenate([compiled(x)[compiled.output("score")] for x in items])
        return float(spearmanr(reference, scores).statistic), None

    validation = nncf.Dataset([held_out[i:i + 1] for i in range(len(held_out))])
    model = nncf.quantize_with_accuracy_control(ov_model, dataset, validation, rank_agreement,
                                                max_drop=MAX_RANK_DROP, drop_type=nncf.DropType.ABSOLUTE,
                                                advanced_quantization_parameters=advanced,
                                                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                                                    max_num_iterations=MAX_RESTORE_ITERATIONS), **options)
    record["accuracy_control"] = {"metric": "rank correlation of held-out normal image scores with fp32",
                                  "max_drop": MAX_RANK_DROP, "max_iterations": MAX_RESTORE_ITERATIONS}
    return model, record


# NNCF accuracy control: the held-out normal images' score ranking may drop this much (Spearman),
# and at most this many rounds of layers go back to float (each round re-scores the held-out
# images, so the rounds bound the export's time).
MAX_RANK_DROP = 0.01
MAX_RESTORE_ITERATIONS = 8


QUANTIZERS = ("onnxruntime", "nncf")


def export_openvino(run_dir: str | os.PathLike, out: str | os.PathLike, *, int8: bool = False,
                    calibration: str | os.PathLike | None = None, quantizer: str = "onnxruntime") -> dict:
    """Run directory -> OpenVINO IR `out` (.xml, + .bin and `out`.json sidecar). -> the sidecar.
    `quantizer` (with `int8`): "onnxruntime", the int8 ONNX export's QDQ graph converted, or "nncf"."""
    from .onnx import export_onnx, file_sha256

    from fastad.sidecar import read_sidecar

    out = Path(out)
    if out.suffix != ".xml":
        raise FastADError(f"--out must end in .xml (OpenVINO IR; the weights go to .bin beside it), got {out}")
    if out.exists() and out.is_dir():
        raise FastADError(f"{out} is a directory")
    if quantizer not in QUANTIZERS:
        raise FastADError(f"unknown quantizer {quantizer!r}: use {' or '.join(QUANTIZERS)}")
    ov = import_openvino()
    with tempfile.TemporaryDirectory(prefix="fastad-ov-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        qdq = int8 and quantizer == "onnxruntime"
        export_onnx(run_dir, onnx_path, int8=qdq, calibration=calibration, check=False)
        side = read_sidecar(onnx_path)
        model = ov.convert_model(str(onnx_path))  # QuantizeLinear/DequantizeLinear -> FakeQuantize
        if int8 and not qdq:
            images, held_out = normal_images(run_dir, calibration, side["input"]["resize"], side["input"]["crop"])
            fp32 = model.clone()
            model, side["quantization"] = quantize_nncf(model, images, held_out, calibration)
            side["quantization"]["check"] = int8_check(openvino_runner(fp32), openvino_runner(model), held_out)
        ir = Path(tmp) / "model.xml"
        ov.save_model(model, str(ir), compress_to_fp16=False)
        side.update({
            "file": out.name, "artifact": "openvino", "precision": "int8" if int8 else "fp32",
            "openvino": {"version": ov.get_version(), "weights": out.with_suffix(".bin").name,
                         "weights_sha256": file_sha256(ir.with_suffix(".bin"))},
            "sha256": file_sha256(ir),
        })
        # .bin first: a reader that finds the .xml finds its weights
        with atomic_path(out.with_suffix(".bin")) as tmp_bin:
            tmp_bin.write_bytes(ir.with_suffix(".bin").read_bytes())
        with atomic_path(out) as tmp_xml, atomic_path(sidecar_path(out)) as tmp_json:
            tmp_xml.write_bytes(ir.read_bytes())
            tmp_json.write_text(json.dumps(side, indent=2) + "\n")
    return side


__all__ = ["export_openvino"]
