"""fastad: transformer-based industrial visual anomaly detection, built for deployment."""
from fastad.errors import FastADError

__version__ = "0.1.0"
__all__ = ["FastADError", "__version__"]
