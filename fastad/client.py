"""A client for line software: `fastad.Client(url).predict(images)` returns what
`fastad.Predictor.predict` returns, computed by a fastad pipeline model on Triton Inference
Server (`fastad export --format triton`, `fastad serve`). tritonclient underneath, HTTP or gRPC:

    import fastad
    client = fastad.Client("http://127.0.0.1:8000")        # or "grpc://127.0.0.1:8001"
    res = client.predict(["a.png", "b.jpg"])                 # paths, image-file bytes, PIL, uint8 arrays
    res.scores, res.is_anomalous, res.anomaly_maps, res.masks, res.regions

Images travel as image files (a path's bytes as stored; PIL images and uint8 arrays as PNG), so
the server decodes exactly what the in-process Predictor would read. A call with more images
than the model's max_batch_size is sent as several requests. One Client may be shared by
threads (each thread gets its own connection). Errors (server unreachable, a rejected request,
an image the server cannot decode) raise FastADError with the server's message.
"""
from __future__ import annotations

import threading
from urllib.parse import urlparse

import numpy as np

from .errors import FastADError
from .results import Result
from .serving import (PIPELINE_INPUT, PIPELINE_OUTPUTS, ROLE_PIPELINE, decode_mask, decode_regions,
                      encode_image)

PROTOCOLS = ("http", "grpc")


def _parse_url(url: str) -> tuple[str, str]:
    """'http://host:port' / 'grpc://host:port' / 'host:port' (HTTP) -> (protocol, 'host:port')."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in PROTOCOLS or not parsed.hostname or parsed.port is None:
        raise FastADError(f"server url {url!r}: expected http://HOST:PORT or grpc://HOST:PORT")
    return parsed.scheme, f"{parsed.hostname}:{parsed.port}"


class Client:
    """`model`: the pipeline model's name (default: the server's one ready fastad pipeline model)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", model: str | None = None, *, timeout: float = 120.0):
        self.protocol, self.address = _parse_url(url)
        self.url, self.timeout = url, float(timeout)
        self._local = threading.local()
        self.model = model or self._find_pipeline()
        config = self._config(self.model)
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if params.get("fastad_role") != ROLE_PIPELINE:
            raise FastADError(f"model {self.model!r} at {url} is not a fastad pipeline model")
        self.max_batch = max(1, int(config.get("max_batch_size", 1)))
        self.image_threshold = float(params["image_threshold"]) if params.get("image_threshold") else None
        self.pixel_threshold = float(params["pixel_threshold"]) if params.get("pixel_threshold") else None
        self.image_size = int(params.get("crop", 0)) or None

    # ---- tritonclient, one connection per thread
    @property
    def _module(self):
        if self.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        return module

    @property
    def connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            kw = {"network_timeout": self.timeout, "connection_timeout": self.timeout} if self.protocol == "http" else {}
            conn = self._local.conn = self._module.InferenceServerClient(self.address, **kw)
        return conn

    def _call(self, what: str, fn, *args, **kwargs):
        from tritonclient.utils import InferenceServerException

        try:
            return fn(*args, **kwargs)
        except InferenceServerException as e:
            raise FastADError(f"{what} at {self.url}: {e.message() or e}") from None
        except (OSError, ConnectionError) as e:
            raise FastADError(f"cannot reach Triton at {self.url}: {e}") from None

    def _config(self, model: str) -> dict:
        if self.protocol == "grpc":
            return self._call("model config", self.connection.get_model_config, model, as_json=True)["config"]
        return self._call("model config", self.connection.get_model_config, model)

    def _find_pipeline(self) -> str:
        index = self._call("repository index", self.connection.get_model_repository_index,
                           **({"as_json": True} if self.protocol == "grpc" else {}))
        entries = index.get("models", []) if isinstance(index, dict) else index
        ready = [m["name"] for m in entries if m.get("state") == "READY"]
        found = [name for name in ready
                 if self._config(name).get("parameters", {}).get("fastad_role", {}).get("string_value") == ROLE_PIPELINE]
        if len(found) != 1:
            raise FastADError(f"{self.url}: {'no' if not found else 'more than one'} ready fastad pipeline model "
                              f"({', '.join(found or ready) or 'no ready models'}); name one with Client(url, model=...)")
        return found[0]

    # ---- the API
    def infer(self, encoded: list[bytes]) -> dict[str, np.ndarray]:
        """One request of at most max_batch image files -> the pipeline's output arrays."""
        module = self._module
        data = np.array([[b] for b in encoded], dtype=np.object_)
        tensor = module.InferInput(PIPELINE_INPUT, list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        outputs = [module.InferRequestedOutput(name) for name in PIPELINE_OUTPUTS]
        result = self._call(f"model {self.model}", self.connection.infer, self.model, [tensor], outputs=outputs)
        return {name: result.as_numpy(name) for name in PIPELINE_OUTPUTS}

    def predict(self, images):
        """Images (a path, image-file bytes, PIL image or uint8 array, or a list of these) -> the
        `fastad.results.Result` that `fastad.Predictor.predict` returns for them."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise FastADError("no images given: the list is empty")
        encoded = [encode_image(item, f"image {i}") for i, item in enumerate(items)]
        parts = [self.infer(encoded[i:i + self.max_batch]) for i in range(0, len(encoded), self.max_batch)]
        out = {name: np.concatenate([p[name] for p in parts]) for name in PIPELINE_OUTPUTS}
        return Result(out["score"].reshape(-1).astype(np.float32), out["is_anomalous"].reshape(-1).astype(bool),
                      out["anomaly_map"].astype(np.float32, copy=False),
                      [decode_mask(b) for b in out["mask"].reshape(-1)],
                      [decode_regions(b) for b in out["regions"].reshape(-1)],
                      self.image_threshold, self.pixel_threshold)

    def statistics(self) -> dict:
        """The server's statistics of the pipeline model (Triton's statistics extension), summed
        up: {"inference_count": images, "execution_count": model executions,
        "batches": {batch size: executions of that size}}."""
        kw = {"as_json": True} if self.protocol == "grpc" else {}
        stats = self._call("statistics", self.connection.get_inference_statistics, self.model, **kw)["model_stats"][0]
        return {"inference_count": int(stats.get("inference_count", 0)),
                "execution_count": int(stats.get("execution_count", 0)),
                "batches": {int(b["batch_size"]): int(b.get("compute_infer", {}).get("count", 0))
                            for b in stats.get("batch_stats", [])}}

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def __repr__(self) -> str:
        return f"Client({self.url!r}, model={self.model!r}, threshold={self.image_threshold})"
