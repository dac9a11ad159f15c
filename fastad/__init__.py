"""fastad: transformer-based industrial visual anomaly detection, built for deployment."""
from ._version import __version__
from .errors import FastADError


def load(path, backend: str = "auto", device: str = "auto", **kw):
    """Load a run directory, an exported .onnx or a TensorRT .engine for inference: the same as
    `fastad.Predictor(path, backend, device, **kw)`, e.g. `fastad.load(RUN).predict(images)`."""
    from .runtime import Predictor

    return Predictor(path, backend, device, **kw)


def train(data, out, *, model: str | None = None, **kwargs):
    """Train a model family (default: FOD, the flagship) on the normal images of `data`, writing
    the run directory `out` (see fastad.training.loop.train for the options)."""
    from .training.loop import train as _train

    return _train(data, out, model=model, **kwargs)


def __getattr__(name):
    # Lazy: `import fastad` stays light (no torch import) until the runtime is used.
    if name == "Predictor":
        from .runtime import Predictor

        return Predictor
    if name == "Client":
        from .client import Client

        return Client
    raise AttributeError(f"module 'fastad' has no attribute {name!r}")


__all__ = ["Client", "FastADError", "Predictor", "load", "train", "__version__"]
