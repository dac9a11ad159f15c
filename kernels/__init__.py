"""Model-agnostic kernels (installed as ``fastad.kernels``): each op holds its fused Triton
kernel, launcher, lean torch path and plain reference; `impl=` picks one explicitly.
`i2corr_attention` is differentiable (i2corr_grad.py: FOD's training branch in O(N) memory, lean
torch or Triton forward + backward kernels).
Inside fastad only `fastad.ops` imports this package."""
from ._impl import IMPLS
from .feature_distance import feature_distance
from .i2corr import I2CorrOutput
from .i2corr_grad import I2CorrSplitOutput, i2corr_attention

__all__ = ["IMPLS", "I2CorrOutput", "I2CorrSplitOutput", "feature_distance", "i2corr_attention"]
