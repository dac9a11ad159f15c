"""Post-processing after the network: upsample -> blur -> threshold -> regions, and the default
thresholds. `postprocess_image` is the predictor's one call per image: map back to the input's
pixel grid, threshold, regions. (The models blur inside their forward, and so does the exported
graph; `gaussian_blur` here is the same filter for callers holding raw maps.)

Two backends with equal outputs (tested in tests/test_postprocess.py):
- "python": numpy/scipy reference (scipy.ndimage.gaussian_filter, scipy.ndimage.label, ...).
- "cpp": the compiled pybind11 module `fastad._postprocess` (csrc/), built by `pip install` when
  a C++ compiler is present; it releases the GIL while it computes.

Every function takes `backend="auto"` (the default), "python" or "cpp". "auto" means BACKEND:
"cpp" when fastad._postprocess imports, else "python"; FASTAD_POSTPROCESS=python (or =cpp, which
fails loudly when the module is missing) pins it. Maps are float32 in and float32 out; any
dtype/stride is accepted and converted with np.ascontiguousarray(..., dtype=np.float32).

Tie rule shared by both backends: a region's peak is the first maximum in row-major order, and
regions with equal peak scores are ordered by peak position (row-major).
"""
from __future__ import annotations

import math
import os
from numbers import Integral, Real

import numpy as np
from scipy import ndimage

from .preprocess import crop_offset
from .results import Region  # noqa: F401 - part of this module's interface

try:
    from fastad import _postprocess as _cpp
except ImportError:  # not built (no compiler at install time): the numpy/scipy path still works
    _cpp = None

BACKENDS = ("auto", "python", "cpp")
MAX_BLUR_RADIUS = 1e7  # keeps the C++ kernel radius a valid int (same limit in csrc/postprocess.cpp)


def _default_backend() -> str:
    forced = os.environ.get("FASTAD_POSTPROCESS", "").strip().lower()
    if forced not in ("", "auto", "python", "cpp"):
        raise ValueError(f"FASTAD_POSTPROCESS must be 'python' or 'cpp', got {forced!r}")
    if forced == "cpp" and _cpp is None:
        raise ImportError("FASTAD_POSTPROCESS=cpp but fastad._postprocess is not built "
                          "(reinstall with a C++ compiler: make install)")
    if forced == "python" or _cpp is None:
        return "python"
    return "cpp"


BACKEND: str = _default_backend()


# ---------------------------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------------------------
def default_thresholds(conf: dict) -> dict:
    """Thresholds from the scores of the normal training images recorded at training time (a run's
    config.json): image = max(max, mean + 4·std) of those scores; pixel = the same value, so an
    image is flagged exactly when its mask is non-empty (its score is the map's maximum). Training
    scores are optimistic (the model has seen these images): `Predictor.calibrate` on held-out
    normal images is the better choice when they exist. The export sidecar stores the same dict."""
    ns = conf.get("normal_scores") or {}
    if not all(k in ns for k in ("mean", "std", "max")):
        return {"image": None, "pixel": None, "source": "none (no normal scores recorded)"}
    thr = float(max(ns["max"], ns["mean"] + 4 * ns["std"]))
    return {"image": thr, "pixel": thr,
            "source": f"normal training scores ({ns.get('num_images', '?')} images): max(max, mean + 4 std)"}


# ---------------------------------------------------------------------------------------------
# Argument checks shared by both backends (one-line ValueErrors)
# ---------------------------------------------------------------------------------------------
def _pick(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return BACKEND
    if backend == "cpp" and _cpp is None:
        raise RuntimeError("backend='cpp' needs the compiled module fastad._postprocess "
                           "(reinstall with a C++ compiler: make install)")
    return backend


def _as_maps(maps, allow_2d: bool = True) -> tuple[np.ndarray, bool]:
    """(B, H, W) or (H, W) -> C-contiguous float32 (B, H, W), and whether the input was 2-D."""
    maps = np.asarray(maps)
    if maps.ndim != 3 and not (allow_2d and maps.ndim == 2):
        expected = "(B, H, W) or (H, W)" if allow_2d else "(B, H, W)"
        raise ValueError(f"maps must be {expected}, got shape {maps.shape}")
    if maps.size == 0:
        raise ValueError(f"maps must not be empty, got shape {maps.shape}")
    single = maps.ndim == 2
    maps = np.ascontiguousarray(maps, dtype=np.float32)
    return (maps[None] if single else maps), single


def _as_size(size) -> tuple[int, int]:
    try:
        h, w = size
    except (TypeError, ValueError):
        raise ValueError(f"size must be (height, width), got {size!r}") from None
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) \
                or int(v) != v or v < 1:
            raise ValueError(f"size must be two positive integers, got {size!r}")
    return int(h), int(w)


def _as_finite(value, name: str, minimum: float | None = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def upsample_bilinear(maps: np.ndarray, size: tuple[int, int], align_corners: bool = True,
                      backend: str = "auto") -> np.ndarray:
    """(B, h, w) or (h, w) -> (B, H, W) / (H, W) float32, equal to torch's
    F.interpolate(mode="bilinear", align_corners=align_corners) (PyTorch's source-index rule:
    align_corners=False is src = (dst + 0.5) * in/out - 0.5 clamped at 0)."""
    maps, single = _as_maps(maps)
    out_h, out_w = _as_size(size)
    if _pick(backend) == "cpp":
        out = _cpp.upsample_bilinear(maps, out_h, out_w, bool(align_corners))
    else:
        out = _upsample_bilinear_numpy(maps, out_h, out_w, bool(align_corners))
    return out[0] if single else out


def gaussian_blur(maps: np.ndarray, sigma: float = 4.0, truncate: float = 4.0,
                  backend: str = "auto") -> np.ndarray:
    """(B, H, W) or (H, W) float32, each map equal to
    scipy.ndimage.gaussian_filter(map, sigma, mode="reflect", truncate=truncate)."""
    maps, single = _as_maps(maps)
    sigma = _as_finite(sigma, "sigma", minimum=0.0, strict=True)
    truncate = _as_finite(truncate, "truncate", minimum=0.0)
    if sigma * truncate >= MAX_BLUR_RADIUS:
        raise ValueError(f"sigma * truncate (the kernel radius) must be < {MAX_BLUR_RADIUS:g}, "
                         f"got {sigma * truncate:g}")
    if _pick(backend) == "cpp":
        out = _cpp.gaussian_blur(maps, sigma, truncate)
    else:
        out = np.stack([ndimage.gaussian_filter(m, sigma, mode="reflect", truncate=truncate)
                        for m in maps])
    return out[0] if single else out


def threshold(maps: np.ndarray, thr: float, backend: str = "auto") -> np.ndarray:
    """Bool masks, maps > thr: strictly greater, compared in float32 (thr is rounded to float32
    first, as numpy does for a float32 array). NaN is never above the threshold."""
    maps, single = _as_maps(maps)
    thr = np.float32(_as_finite(thr, "thr"))
    if _pick(backend) == "cpp":
        out = _cpp.threshold(maps, float(thr))
    else:
        out = maps > thr
    return out[0] if single else out


def regions(mask: np.ndarray, amap: np.ndarray, min_area: int = 1, connectivity: int = 8,
            backend: str = "auto") -> list[Region]:
    """Connected components of one (H, W) bool mask, scored with the (H, W) map `amap` (finite
    inside the mask), components with fewer than `min_area` pixels dropped, sorted by
    peak_score descending (ties: peak position in row-major order)."""
    mask, amap = np.asarray(mask), np.asarray(amap)
    if mask.ndim != 2 or amap.ndim != 2:
        raise ValueError(f"mask and amap must be 2-D (H, W), got shapes {mask.shape} and {amap.shape}")
    if mask.shape != amap.shape:
        raise ValueError(f"mask and amap must have the same shape, got {mask.shape} and {amap.shape}")
    if mask.size == 0:
        raise ValueError(f"mask must not be empty, got shape {mask.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    if isinstance(min_area, bool) or not isinstance(min_area, Integral):
        raise ValueError(f"min_area must be an integer, got {min_area!r}")
    mask = np.ascontiguousarray(mask, dtype=bool)
    amap = np.ascontiguousarray(amap, dtype=np.float32)
    if _pick(backend) == "cpp":
        found = _cpp.regions(mask, amap, int(min_area), int(connectivity))
        return [Region((x0, y0, x1, y1), area, peak, (px, py), mean)
                for x0, y0, x1, y1, area, peak, px, py, mean in found]
    return _regions_numpy(mask, amap, int(min_area), int(connectivity))


def map_to_original(amap: np.ndarray, size: tuple[int, int], resize: int, crop: int,
                    backend: str = "auto") -> np.ndarray:
    """A (crop, crop) map -> (H, W) float32 in the input image's pixel grid: placed into the crop
    window of a resize x resize canvas (zero outside, i.e. "not anomalous"), then resized
    bilinearly (align_corners=False: plain image resize) to `size`. Inverts fastad.preprocess."""
    if resize != crop:
        canvas = np.zeros((resize, resize), np.float32)
        top = crop_offset(resize, crop)
        canvas[top:top + crop, top:top + crop] = amap
        amap = canvas
    if amap.shape == tuple(size):
        return amap
    return upsample_bilinear(amap, size, align_corners=False, backend=backend)


def postprocess_image(amap: np.ndarray, size: tuple[int, int], resize: int, crop: int,
                      thr: float | None, min_area: int = 1, backend: str = "auto"
                      ) -> tuple[np.ndarray, list[Region]]:
    """One image's (crop, crop) map -> its (H, W) bool mask (map > thr, in the input's pixel grid,
    see `map_to_original`) and its 8-connected regions. thr None: an empty mask, no regions."""
    amap = np.asarray(amap)
    if amap.ndim != 2:
        raise ValueError(f"postprocess_image takes one (h, w) map, got shape {amap.shape}")
    full = map_to_original(amap, _as_size(size), resize, crop, backend=backend)
    if thr is None:
        return np.zeros(full.shape, bool), []
    mask = threshold(full, thr, backend=backend)
    return mask, regions(mask, full, min_area=min_area, backend=backend)


# ---------------------------------------------------------------------------------------------
# numpy/scipy reference implementations
# ---------------------------------------------------------------------------------------------
def _linear_taps(in_size: int, out_size: int, align_corners: bool):
    """PyTorch's source indices and weights along one axis, computed in float32 like its CPU
    kernel: (index0, index1, weight0, weight1), each (out_size,)."""
    dst = np.arange(out_size, dtype=np.float32)
    if align_corners:
        scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
        src = scale * dst
    else:
        scale = np.float32(in_size) / np.float32(out_size)
        src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1))
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, np.float32(1) - lam, lam


def _upsample_bilinear_numpy(maps: np.ndarray, out_h: int, out_w: int,
                             align_corners: bool) -> np.ndarray:
    r0, r1, rw0, rw1 = _linear_taps(maps.shape[1], out_h, align_corners)
    c0, c1, cw0, cw1 = _linear_taps(maps.shape[2], out_w, align_corners)
    top = cw0 * maps[:, r0][:, :, c0] + cw1 * maps[:, r0][:, :, c1]     # (B, H, W)
    bottom = cw0 * maps[:, r1][:, :, c0] + cw1 * maps[:, r1][:, :, c1]
    return rw0[:, None] * top + rw1[:, None] * bottom


def _regions_numpy(mask: np.ndarray, amap: np.ndarray, min_area: int,
                   connectivity: int) -> list[Region]:
    structure = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
    labels, n = ndimage.label(mask, structure=structure)
    if n == 0:
        return []
    flat_labels = labels.ravel()
    pixels = np.flatnonzero(flat_labels)            # row-major order
    lab = flat_labels[pixels]
    values = amap.ravel()[pixels]
    if not np.isfinite(values).all():
        raise ValueError("regions needs finite map values inside the mask")
    area = np.bincount(lab, minlength=n + 1)
    total = np.bincount(lab, weights=values, minlength=n + 1)   # float64, summed in row-major order
    # Per label, the highest value and, among equal values, the first pixel in row-major order.
    order = np.lexsort((pixels, -values, lab))
    first_of_label = np.searchsorted(lab[order], np.arange(1, n + 1))
    peak_pixel = pixels[order[first_of_label]]
    boxes = ndimage.find_objects(labels)
    width = amap.shape[1]
    found = []
    for i, (rows, cols) in enumerate(boxes, start=1):
        if area[i] < min_area:
            continue
        p = int(peak_pixel[i - 1])
        found.append(Region((cols.start, rows.start, cols.stop, rows.stop), int(area[i]),
                            float(amap.flat[p]), (p % width, p // width),
                            float(total[i] / area[i])))
    found.sort(key=lambda r: (-r.peak_score, r.peak_xy[1], r.peak_xy[0]))
    return found
