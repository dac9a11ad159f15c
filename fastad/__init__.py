"""fastad: transformer-based industrial visual anomaly detection, built for deployment."""
from .errors import FastADError

from ._version import __version__


def load(run_dir, device: str = "auto", backend: str | None = None):
    """Load a trained run directory for inference: `fastad.load(RUN).predict(images)`.
    `backend` ("auto", "triton", "torch") scores through the fastad.kernels fast paths."""
    from .api import load as _load

    return _load(run_dir, device=device, backend=backend)


def train(data, out, *, model: str = "fod", **kwargs):
    """Train a model family on the normal images of `data`, writing the run directory `out`
    (see fastad.training.loop.train for the options)."""
    from .training.loop import train as _train

    return _train(data, out, model=model, **kwargs)


def __getattr__(name):
    # Lazy: `import fastad` stays light (no torch import) until the runtime is used.
    if name == "Predictor":
        from .runtime import Predictor

        return Predictor
    raise AttributeError(f"module 'fastad' has no attribute {name!r}")


__all__ = ["FastADError", "Predictor", "load", "train", "__version__"]
