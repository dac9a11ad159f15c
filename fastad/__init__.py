"""fastad: transformer-based industrial visual anomaly detection, built for deployment."""
from .errors import FastADError

__version__ = "0.1.0"


def load(path, backend: str = "auto", device: str = "auto", **kw):
    """Load a run directory, an exported .onnx or a TensorRT .engine for inference: the same as
    `fastad.Predictor(path, backend, device, **kw)`, e.g. `fastad.load(RUN).predict(images)`."""
    from .runtime import Predictor

    return Predictor(path, backend, device, **kw)


def __getattr__(name):
    # Lazy: `import fastad` stays light (no torch import) until the runtime is used.
    if name == "Predictor":
        from .runtime import Predictor

        return Predictor
    raise AttributeError(f"module 'fastad' has no attribute {name!r}")


__all__ = ["FastADError", "Predictor", "load", "__version__"]
