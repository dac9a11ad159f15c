"""The pipeline model inside Triton Inference Server's Python backend (see fastad.serving for the
wire format, fastad.export.triton for the repository that names it).

Each `execute` gets the requests the dynamic batcher gathered: every image of every request is
decoded (fastad.preprocess.decode_image), all of them go through one `fastad.Predictor.predict`
— fastad's preprocessing, the network file of the repository's network model run by this
process's engine (onnxruntime, or TensorRT for a .plan), fastad's post-processing with the
thresholds of the model config — and each request gets its own rows back. A request with an
image that cannot be decoded gets an error response naming it; the others in the batch are
answered as usual.

`Pipeline` holds the logic and is tested without a server; `TritonPythonModel` adapts it to
the Python backend's API (`triton_python_backend_utils`, which exists only inside the stub).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import FastADError
from .preprocess import decode_image
from .serving import PIPELINE_INPUT, encode_mask, encode_regions


def _optional_float(text: str) -> float | None:
    return float(text) if text.strip() else None


class Pipeline:
    """Encoded images of several requests -> per request, its output arrays or an error line."""

    def __init__(self, network_file: str | Path, *, device: str = "cpu", max_batch: int = 8,
                 image_threshold: float | None = None, pixel_threshold: float | None = None,
                 min_region_area: int = 1):
        from .runtime import Predictor

        self.predictor = Predictor(network_file, device=device, batch_size=max_batch, threshold=image_threshold,
                                   pixel_threshold=pixel_threshold, min_region_area=min_region_area)

    @classmethod
    def from_triton_args(cls, args: dict) -> "Pipeline":
        """From the `args` of the Python backend's initialize: the model config's parameters."""
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        repo = Path(args["model_repository"]).resolve().parent  # model_repository is this model's folder
        gpu = args.get("model_instance_kind") == "GPU"
        return cls(repo / params["network_file"], device=f"cuda:{args['model_instance_device_id']}" if gpu else "cpu",
                   max_batch=int(config["max_batch_size"]),
                   image_threshold=_optional_float(params.get("image_threshold", "")),
                   pixel_threshold=_optional_float(params.get("pixel_threshold", "")),
                   min_region_area=int(params.get("min_region_area", "1")))

    def run(self, requests: list[np.ndarray]) -> list[dict[str, np.ndarray] | str]:
        """requests: each an object array (k, 1) of image-file bytes. -> per request the output
        arrays (fastad.serving.PIPELINE_OUTPUTS) or one error line."""
        decoded: list[list | str] = []
        for rows in requests:
            try:  # Triton has checked the shape [k, 1] and the type BYTES against the config
                decoded.append([decode_image(b, f"image {i} of the request") for i, b in enumerate(rows.reshape(-1))])
            except FastADError as e:
                decoded.append(str(e))
        images = [img for d in decoded if not isinstance(d, str) for img in d]
        if not images:
            return decoded
        try:
            res = self.predictor.predict(images)
        except FastADError as e:
            return [d if isinstance(d, str) else str(e) for d in decoded]
        answers: list[dict[str, np.ndarray] | str] = []
        start = 0
        for d in decoded:
            if isinstance(d, str):
                answers.append(d)
                continue
            rows = slice(start, start + len(d))
            start += len(d)
            answers.append({
                "score": res.scores[rows].astype(np.float32).reshape(-1, 1),
                "is_anomalous": np.asarray(res.is_anomalous[rows], dtype=bool).reshape(-1, 1),
                "anomaly_map": np.ascontiguousarray(res.anomaly_maps[rows], dtype=np.float32),
                "mask": np.array([[encode_mask(m)] for m in res.masks[rows]], dtype=np.object_).reshape(-1, 1),
                "regions": np.array([[encode_regions(g)] for g in res.regions[rows]], dtype=np.object_).reshape(-1, 1),
            })
        return answers


class TritonPythonModel:
    """The Python backend's model class (model.py in the repository re-exports it)."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.pipeline = Pipeline.from_triton_args(args)
        pb_utils.Logger.log_info(f"fastad pipeline ready: {self.pipeline.predictor!r}")

    def execute(self, requests):
        pb = self.pb
        inputs = [pb.get_input_tensor_by_name(r, PIPELINE_INPUT).as_numpy() for r in requests]
        responses = []
        for answer in self.pipeline.run(inputs):
            if isinstance(answer, str):
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(answer)))
            else:
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(k, v) for k, v in answer.items()]))
        return responses
