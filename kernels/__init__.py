"""Model-agnostic inference kernels (installed as ``fastad.kernels``): each op holds its fused
Triton kernel, launcher, lean torch path and plain reference; `impl=` picks one explicitly.
Inside fastad only `fastad.ops` imports this package."""
from ._impl import IMPLS
from .feature_distance import feature_distance
from .i2corr import I2CorrOutput, i2corr_attention

__all__ = ["IMPLS", "I2CorrOutput", "feature_distance", "i2corr_attention"]
