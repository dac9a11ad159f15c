"""Serving through NVIDIA Triton Inference Server: the wire format of the pipeline model, and
running a `tritonserver` process on a model repository (`fastad serve`, the tests, the benchmark).

The repository is written by `fastad export --format triton` (fastad.export.triton); the pipeline
model's code is fastad.triton_pipeline; line software talks to it with fastad.client.Client.

Wire format of the pipeline model (one row per image; Triton's batch axis first):
    in   image          BYTES [-1, 1]     the bytes of an image file (PNG, JPEG, BMP, TIFF, ...), any size
    out  score          FP32  [-1, 1]     image anomaly score
         is_anomalous   BOOL  [-1, 1]     score > the image threshold (False without one)
         anomaly_map    FP32  [-1, S, S]  the map at the model's resolution
         mask           BYTES [-1, 1]     PNG (1 bit) of map > pixel threshold, in the image's own pixels
         regions        BYTES [-1, 1]     JSON list of the mask's connected regions (fastad.postprocess.Region)

The server binary: a Triton install (`--tritonserver /opt/tritonserver/bin/tritonserver`, its
`backends/` beside `bin/`), or the one in PyPI's nvidia-pytriton wheel (the default, installed by
requirements.txt). That wheel's binary runs on a CPU machine with only the Python backend (no
ONNX Runtime or TensorRT backend), and needs three things this module sets up:
  - the Python backend's stub for this interpreter's version beside libtriton_python.so (the
    wheel keeps one per Python version apart): a backend folder of links, per server;
  - LD_LIBRARY_PATH to this interpreter's own libpython, else the stub binds the system's
    (older) libpython and fails inside the stdlib;
  - this interpreter's sys.path, passed as FASTAD_PYTHON_PATH and put first by the pipeline's
    model.py: the stub starts Python isolated (it ignores PYTHONPATH), so it would otherwise
    import the base interpreter's site-packages. There a numpy 2 answered every request with
    outputs of size 0 — the stub is built against numpy 1's C layout (the wheel pins numpy<2).
Models whose backend the server lacks are not loaded (explicit model control) and are named.
The server listens on 127.0.0.1 only, in a process group of its own that `stop()` ends whole.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from .errors import FastADError

# --------------------------------------------------------------------------------------------
# Names and the wire format
# --------------------------------------------------------------------------------------------
NETWORK_INPUT = "images"
NETWORK_OUTPUTS = ("anomaly_map", "score")
PIPELINE_SUFFIX = "_pipeline"
PIPELINE_INPUT = "image"
# output name -> (Triton data type, per image: "scalar" = one value, "map" = (S, S))
PIPELINE_OUTPUTS = {
    "score": ("TYPE_FP32", "scalar"),
    "is_anomalous": ("TYPE_BOOL", "scalar"),
    "anomaly_map": ("TYPE_FP32", "map"),
    "mask": ("TYPE_STRING", "scalar"),
    "regions": ("TYPE_STRING", "scalar"),
}
ROLE_NETWORK, ROLE_PIPELINE = "network", "pipeline"  # config parameter "fastad_role"


def encode_mask(mask: np.ndarray) -> bytes:
    """(H, W) bool mask -> 1-bit PNG bytes (lossless)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=bool)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("1"), dtype=bool)


def encode_regions(regions) -> bytes:
    """[Region] -> JSON bytes (floats as Python writes them: they read back bit-exact)."""
    return json.dumps([{"bbox": [int(v) for v in r.bbox], "area": int(r.area), "peak_score": float(r.peak_score),
                        "peak_xy": [int(v) for v in r.peak_xy], "mean_score": float(r.mean_score)}
                       for r in regions]).encode()


def decode_regions(data: bytes) -> list:
    from .results import Region

    return [Region(tuple(r["bbox"]), r["area"], r["peak_score"], tuple(r["peak_xy"]), r["mean_score"])
            for r in json.loads(data)]


def encode_image(item, what: str) -> bytes:
    """One client input -> the bytes of an image file: a path (its bytes as stored), bytes (as
    given), a PIL image or a uint8 H x W[x C] array (PNG, lossless)."""
    from PIL import Image

    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise FastADError(f"cannot read {what} {path}: no such file")
        return path.read_bytes()
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or not (item.ndim == 2 or (item.ndim == 3 and item.shape[-1] in (1, 3, 4))):
            raise FastADError(f"{what}: the client sends image files; arrays must be uint8 H x W, H x W x 3 or "
                              f"H x W x 4, got {item.dtype} {item.shape} (float images: use fastad.Predictor)")
        item = Image.fromarray(item[..., 0] if item.ndim == 3 and item.shape[-1] == 1 else item)
    if isinstance(item, Image.Image):
        buf = io.BytesIO()
        item.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    raise FastADError(f"{what} has unsupported type {type(item).__name__}: expected a path, bytes of an image file, "
                      "a PIL image or a uint8 array")


# --------------------------------------------------------------------------------------------
# The tritonserver process
# --------------------------------------------------------------------------------------------
BACKEND_OF_PLATFORM = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt",
                       "pytorch_libtorch": "pytorch", "tensorflow_savedmodel": "tensorflow"}


def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FastADError("no tritonserver: install nvidia-pytriton (requirements.txt) or give a Triton install's "
                          "binary with --tritonserver")
    return Path(list(spec.submodule_search_locations)[0]) / "tritonserver"


def find_tritonserver(tritonserver: str | os.PathLike | None = None) -> tuple[Path, Path, bool]:
    """-> (binary, backends folder, whether it is nvidia-pytriton's wheel). `tritonserver` (or
    $FASTAD_TRITONSERVER): a Triton install's binary, its backends in ../backends."""
    explicit = tritonserver or os.environ.get("FASTAD_TRITONSERVER")
    if explicit:
        binary = Path(explicit)
        if not binary.is_file():
            raise FastADError(f"tritonserver {binary}: no such file")
        return binary, binary.resolve().parent.parent / "backends", False
    root = _pytriton_root()
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        raise FastADError(f"{binary}: the nvidia-pytriton wheel has no tritonserver binary for this platform")
    return binary, root / "backends", True


def link_pytriton_backends(root: Path, into: Path) -> Path:
    """A backends folder for nvidia-pytriton's server: its backends, linked, with the Python
    backend's stub for this interpreter's version beside libtriton_python.so. -> `into`."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise FastADError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")
    for backend in (root / "backends").iterdir():
        (into / backend.name).mkdir(parents=True)
        for f in backend.iterdir():
            (into / backend.name / f.name).symlink_to(f)
    (into / "python" / stub.name).symlink_to(stub)
    return into


def server_environment() -> dict:
    """The environment of a tritonserver whose Python backend runs fastad (see the module docstring)."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and sysconfig.get_config_var("Py_ENABLE_SHARED"):
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
    env["FASTAD_PYTHON_PATH"] = os.pathsep.join(p for p in sys.path if p and Path(p).exists())
    return env


def read_config(path: str | os.PathLike):
    """Parse a config.pbtxt with Triton's ModelConfig schema (tritonclient's generated bindings);
    FastADError naming the problem."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError) as e:
        raise FastADError(f"{path}: not a valid Triton model config: {e}") from None


def repository_models(repo: Path) -> dict[str, object]:
    """Model name -> parsed ModelConfig, for every model folder of the repository."""
    return {d.name: read_config(d / "config.pbtxt") for d in sorted(repo.iterdir())
            if d.is_dir() and not d.name.startswith(".") and (d / "config.pbtxt").is_file()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """A tritonserver process on `repo`, on 127.0.0.1 only; a context manager.

        with TritonServer("repo", http_port=0) as server:   # 0: a free port
            Client(server.http_url).predict(images)

    `models`: the models to load (default: every model whose backend this server has)."""

    def __init__(self, repo: str | os.PathLike, *, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, tritonserver: str | os.PathLike | None = None,
                 models: list[str] | None = None, log_path: str | os.PathLike | None = None,
                 log_verbose: int = 0):
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise FastADError(f"{repo}: no such model repository")
        self.binary, self._backends, self._pytriton = find_tritonserver(tritonserver)
        self.http_port, self.grpc_port, self.metrics_port = (p or free_port() for p in (http_port, grpc_port, metrics_port))
        self._requested = models
        self._log_path = log_path
        self._log_verbose = log_verbose
        self.process: subprocess.Popen | None = None
        self.models: list[str] = []
        self.skipped: dict[str, str] = {}

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _choose_models(self, backends: Path) -> None:
        configs = repository_models(self.repo)
        if not configs:
            raise FastADError(f"{self.repo}: no models (folders with a config.pbtxt)")
        unknown = sorted(set(self._requested or ()) - set(configs))
        if unknown:
            raise FastADError(f"{self.repo} has no model {', '.join(unknown)} (it has {', '.join(configs)})")
        for name, config in configs.items():
            if self._requested is not None and name not in self._requested:
                continue
            backend = config.backend or BACKEND_OF_PLATFORM.get(config.platform, config.platform)
            if (backends / backend).is_dir():
                self.models.append(name)
            else:
                self.skipped[name] = f"this tritonserver has no {backend} backend"
        if not self.models:
            raise FastADError(f"no model of {self.repo} can be served by {self.binary}: " +
                              "; ".join(f"{k}: {v}" for k, v in self.skipped.items()))

    def start(self, timeout: float = 120.0) -> "TritonServer":
        self._tmp = tempfile.TemporaryDirectory(prefix="fastad-triton-")
        try:
            backends = (link_pytriton_backends(self._backends.parent, Path(self._tmp.name) / "backends")
                        if self._pytriton else self._backends)
            self._choose_models(backends)
            self.log_path = Path(self._log_path) if self._log_path else Path(self._tmp.name) / "tritonserver.log"
            cmd = [str(self.binary), f"--model-repository={self.repo}", f"--backend-directory={backends}",
                   "--model-control-mode=explicit", *(f"--load-model={m}" for m in self.models),
                   "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                   "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                   "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
                   "--allow-gpu-metrics=false", f"--log-verbose={self._log_verbose}", "--exit-timeout-secs=10"]
            self._log = open(self.log_path, "ab")
            # A process group of its own: stop() ends the server and its Python backend stubs together.
            self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=server_environment(),
                                            start_new_session=True, stdin=subprocess.DEVNULL)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return 0

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AttributeError):
            return ""

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FastADError(f"tritonserver exited with status {self.process.returncode} while starting; "
                                  f"its log ({self.log_path}) ends:\n{self.log_tail()}")
            if self._get("/v2/health/ready") == 200 and all(self._get(f"/v2/models/{m}/ready") == 200
                                                            for m in self.models):
                return
            time.sleep(0.25)
        raise FastADError(f"tritonserver not ready after {timeout:.0f} s; its log ({self.log_path}) ends:\n"
                          f"{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """End the server's whole process group: SIGTERM, then SIGKILL after `timeout` s."""
        proc, self.process = self.process, None
        if proc is not None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                    if sig == signal.SIGTERM:  # the group may outlive its leader by a moment
                        _wait_group_gone(proc.pid, 5.0)
                    break
                except subprocess.TimeoutExpired:
                    continue
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, if any
            except ProcessLookupError:
                pass
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        if getattr(self, "_tmp", None) is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
