"""What a prediction returns, in a module that needs only numpy: `fastad.Predictor` (in-process)
and `fastad.Client` (a Triton server) return the same `Result`, so line software that only
talks to a server does not need torch."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Region(NamedTuple):
    bbox: tuple[int, int, int, int]   # (x0, y0, x1, y1), inclusive-exclusive, map coordinates
    area: int                         # pixels in the component
    peak_score: float                 # max map value inside the component
    peak_xy: tuple[int, int]          # (x, y) of that max, first in row-major order on ties
    mean_score: float                 # mean map value inside the component


class Result(NamedTuple):
    scores: np.ndarray              # (B,) image anomaly scores
    is_anomalous: np.ndarray        # (B,) bool: score > image threshold (all False without one)
    anomaly_maps: np.ndarray        # (B, S, S) float32 maps at the model's resolution
    masks: list[np.ndarray]         # per image (H_i, W_i) bool: map > pixel threshold
    regions: list[list[Region]]     # per image, connected defect regions, highest peak first
    image_threshold: float | None
    pixel_threshold: float | None
