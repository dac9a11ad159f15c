"""Model-agnostic inference kernels (installed as ``fastad.kernels``): each op holds its fused
Triton kernel, launcher, lean torch path and plain reference; `impl=` picks one explicitly.
Inside fastad only `fastad.ops` imports this package."""
from ._impl import IMPLS
from .feature_distance import feature_distance
from .i2corr import I2CorrOutput, i2corr_attention
from .i2corr_grad import I2CorrSplitOutput

__all__ = ["IMPLS", "I2CorrOutput", "I2CorrSplitOutput", "feature_distance", "i2corr_attention"]
