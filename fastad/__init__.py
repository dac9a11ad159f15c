"""fastad: transformer-based industrial visual anomaly detection, built for deployment."""
from .errors import FastADError

__version__ = "0.1.0"


def load(run_dir, device: str = "auto"):
    """Load a trained run directory for inference: `fastad.load(RUN).predict(images)`."""
    from .api import load as _load

    return _load(run_dir, device=device)


__all__ = ["FastADError", "load", "__version__"]
