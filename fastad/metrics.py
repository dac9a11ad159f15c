"""Evaluation metrics for anomaly detection: image/pixel AUROC, AUPRO, max-F1.

Conventions
-----------
* Higher score = more anomalous. Label / mask 1 (True) = anomalous.
* A metric that is undefined for the given data (e.g. AUROC with a single class, AUPRO
  without any anomalous pixel) is returned as ``nan`` by the individual functions and as
  ``None`` by :func:`evaluate`, whose output is JSON-serialisable.
* Wrong shapes, NaN scores or non-binary labels are user mistakes and raise ``FastADError``.

AUPRO (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021)
---------------------------------------------------------------------------
For a threshold ``t`` a pixel is predicted anomalous when ``map >= t``.

* Ground-truth regions are the connected components of each image's mask, labelled with
  ``scipy.ndimage.label`` and a 3x3 ones structure, i.e. **8-connectivity** (as the MVTec
  reference code). Regions never span images.
* PRO(t) = mean over all regions (of all images, each region weighted equally) of the
  fraction of the region's pixels with ``map >= t``.
* FPR(t) = fraction of all anomaly-free pixels (pixels outside the masks, over all images)
  with ``map >= t``.
* The curve is evaluated exactly at every distinct map value (plus the point (0, 0)): the
  pixels are sorted once and PRO/FPR are cumulative sums of per-pixel increments
  (``1 / (region size * number of regions)`` for anomalous pixels, ``1 / #normal`` for
  normal ones). Only pixels scoring at least the threshold where FPR first reaches
  ``fpr_limit`` are sorted, which is exact because the curve beyond that point is not used.
* PRO is integrated over FPR from 0 to ``fpr_limit`` with the trapezoid rule, the PRO value
  at exactly ``fpr_limit`` being linearly interpolated between the two neighbouring curve
  points, and the area is divided by ``fpr_limit`` so a perfect detector scores 1.0.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from fastad.errors import FastADError

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "pro_curve",
    "f1_max",
    "pixel_f1_max",
    "evaluate",
]

_NAN = float("nan")
_STRUCTURE_8 = np.ones((3, 3), dtype=int)


# --------------------------------------------------------------------------- validation
def _labels_scores(labels, scores, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.ndim != 1 or scores.ndim != 1:
        raise FastADError(
            f"{what} labels and scores must be 1-D, got shapes {labels.shape} and {scores.shape}"
        )
    if labels.shape != scores.shape:
        raise FastADError(
            f"{what} labels and scores differ in length: {labels.shape[0]} vs {scores.shape[0]}"
        )
    return _as_binary(labels, what), _as_scores(scores, what)


def _masks_maps(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.ndim == 2:
        masks = masks[None]
    if maps.ndim == 2:
        maps = maps[None]
    if masks.ndim != 3 or maps.ndim != 3:
        raise FastADError(
            f"masks and maps must be (N, H, W), got shapes {masks.shape} and {maps.shape}"
        )
    if masks.shape != maps.shape:
        raise FastADError(
            f"masks and anomaly maps differ in shape: {masks.shape} vs {maps.shape}"
            " (resize the maps to the mask size first)"
        )
    return _as_binary(masks, "pixel"), _as_scores(maps, "pixel")


def _as_binary(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype == bool:
        return a
    if a.size and not np.isin(a, (0, 1)).all():
        raise FastADError(f"{what} labels/masks must be 0/1 (or bool), got values {np.unique(a)[:5]}")
    return a.astype(bool)


def _as_scores(a: np.ndarray, what: str) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.floating):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise FastADError(f"{what} scores must be numeric, got dtype {a.dtype}")
        a = a.astype(np.float64)
    if a.size and not np.isfinite(a).all():
        raise FastADError(f"{what} scores contain NaN or infinite values")
    return a


def _two_classes(y: np.ndarray) -> bool:
    n_pos = int(np.count_nonzero(y))
    return 0 < n_pos < y.size


# --------------------------------------------------------------------------- AUROC
def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores; ``nan`` when only one class is present."""
    y, s = _labels_scores(labels, scores)
    if not _two_classes(y):
        return _NAN
    return float(roc_auc_score(y, s))


def pixel_auroc(masks, maps) -> float:
    """Pixel-level AUROC over all pixels of all images; ``nan`` when only one class is present.

    Maps are flattened as float32 (kept as float64 if already so) to bound memory.
    """
    m, a = _masks_maps(masks, maps)
    y = m.ravel()
    if not _two_classes(y):
        return _NAN
    s = a.ravel()
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float32)
    return float(roc_auc_score(y, s))


# --------------------------------------------------------------------------- AUPRO
def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per anomalous pixel (in ``masks[masks]`` order): 1 / size of its connected region.

    Returns the weights and the total number of regions (8-connectivity, per image).
    """
    weights = []
    n_regions = 0
    for mask in masks:
        if not mask.any():
            continue
        lab, n = ndimage.label(mask, structure=_STRUCTURE_8)
        sizes = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64)
        weights.append(1.0 / sizes[lab[mask]])
        n_regions += n
    if not weights:
        return np.zeros(0), 0
    return np.concatenate(weights), n_regions


def pro_curve(masks, maps, fpr_limit: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve: ``(fpr, pro)`` at every distinct map value, starting at (0, 0).

    Points are ordered by decreasing threshold (so ``fpr`` is non-decreasing). With
    ``fpr_limit`` the curve is truncated after the first point whose FPR is ``>= fpr_limit``
    (everything needed to integrate up to the limit). Returns empty arrays when there are no
    anomalous or no anomaly-free pixels.
    """
    m, a = _masks_maps(masks, maps)
    weights, n_regions = _region_weights(m)
    scores_anom = a[m]
    scores_ok = a[~m]
    n_ok = scores_ok.size
    if n_regions == 0 or n_ok == 0:
        return np.zeros(0), np.zeros(0)
    weights /= n_regions

    if fpr_limit is not None and fpr_limit < 1.0:
        # threshold t_cut with #{normal >= t_cut} >= fpr_limit * n_ok: only pixels scoring
        # >= t_cut influence the curve up to (and including) the first point past the limit.
        k = min(math.ceil(fpr_limit * n_ok), n_ok - 1)  # 0-based rank from the top
        t_cut = np.partition(scores_ok, n_ok - 1 - k)[n_ok - 1 - k]
        scores_ok = scores_ok[scores_ok >= t_cut]
        keep = scores_anom >= t_cut
        scores_anom = scores_anom[keep]
        weights = weights[keep]

    values = np.concatenate([scores_ok, scores_anom])
    fp_inc = np.zeros(values.size, dtype=np.float64)
    fp_inc[: scores_ok.size] = 1.0
    pro_inc = np.zeros(values.size, dtype=np.float64)
    pro_inc[scores_ok.size :] = weights

    order = np.argsort(values, kind="stable")[::-1]  # descending score
    values = values[order]
    fpr = np.cumsum(fp_inc[order]) / n_ok
    pro = np.cumsum(pro_inc[order])
    # one point per distinct threshold: the last pixel of each run of equal scores
    last = np.append(values[1:] != values[:-1], True)
    fpr = np.clip(np.concatenate([[0.0], fpr[last]]), 0.0, 1.0)
    pro = np.clip(np.concatenate([[0.0], pro[last]]), 0.0, 1.0)

    if fpr_limit is not None:
        stop = int(np.searchsorted(fpr, fpr_limit, side="left"))  # first fpr >= limit
        fpr, pro = fpr[: stop + 1], pro[: stop + 1]
    return fpr, pro


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under (x, y) (x non-decreasing) from x[0] to ``x_max``.

    The y value at ``x_max`` is linearly interpolated between its neighbouring points.
    """
    i = int(np.searchsorted(x, x_max, side="right")) - 1  # last index with x <= x_max
    xs, ys = x[: i + 1], y[: i + 1]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if x[i] < x_max and i + 1 < x.size:
        y_at = y[i] + (y[i + 1] - y[i]) * (x_max - x[i]) / (x[i + 1] - x[i])
        area += 0.5 * (y[i] + y_at) * (x_max - x[i])
    return area


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD definition).

    See the module docstring for the exact definition (8-connected regions, ``map >= t``,
    trapezoid rule with interpolation at ``fpr_limit``, division by ``fpr_limit``).
    A perfect detector gives 1.0. Returns ``nan`` when there is no anomalous pixel (or no
    anomaly-free pixel).
    """
    if not (0.0 < float(fpr_limit) <= 1.0):
        raise FastADError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(masks, maps, fpr_limit=fpr_limit)
    if fpr.size == 0:
        return _NAN
    return float(_trapezoid_to(fpr, pro, fpr_limit) / fpr_limit)


# --------------------------------------------------------------------------- F1
def _f1_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    precision, recall, thresholds = precision_recall_curve(y, s)
    precision, recall = precision[:-1], recall[:-1]  # last point (P=1, R=0) has no threshold
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return f1, thresholds


def f1_max(labels, scores) -> float:
    """Maximum F1 over all thresholds ``score >= t`` (image level); ``nan`` without positives."""
    y, s = _labels_scores(labels, scores)
    if not y.any():
        return _NAN
    f1, _ = _f1_curve(y, s)
    return float(f1.max())


def pixel_f1_max(masks, maps) -> float:
    """Maximum F1 over thresholds at pixel level (all pixels pooled); ``nan`` without positives."""
    m, a = _masks_maps(masks, maps)
    y = m.ravel()
    if not y.any():
        return _NAN
    s = a.ravel()
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float32)
    f1, _ = _f1_curve(y, s)
    return float(f1.max())


# --------------------------------------------------------------------------- evaluate
def _clean(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _metrics(labels, scores, masks, maps) -> dict:
    out = {
        "image_auroc": _clean(image_auroc(labels, scores)),
        "pixel_auroc": None,
        "aupro": None,
        "f1_max": _clean(f1_max(labels, scores)),
        "pixel_f1_max": None,
        "num_images": int(labels.size),
        "num_anomalous": int(np.count_nonzero(labels)),
    }
    if masks is not None:
        out["pixel_auroc"] = _clean(pixel_auroc(masks, maps))
        out["aupro"] = _clean(aupro(masks, maps))
        out["pixel_f1_max"] = _clean(pixel_f1_max(masks, maps))
    return out


def evaluate(labels, scores, masks=None, maps=None, defects: Sequence[str] | None = None) -> dict:
    """All metrics of a test run as a JSON-serialisable dict.

    Args:
        labels: (N,) 0/1 image labels (1 = anomalous).
        scores: (N,) image anomaly scores.
        masks, maps: optional (N, H, W) ground-truth masks and anomaly maps (both or neither).
        defects: optional (N,) defect-type name per image (MVTec: "good", "broken_large", ...).

    Returns ``{"image_auroc", "pixel_auroc", "aupro", "f1_max", "pixel_f1_max",
    "num_images", "num_anomalous", "per_defect"}``. Pixel metrics are ``None`` without
    masks/maps; undefined metrics (single class) are ``None``. ``per_defect`` maps each
    defect type of the anomalous (label 1) images to the same metrics computed on that
    type's images together with all good (label 0) images; it is ``{}`` without ``defects``.
    """
    y, s = _labels_scores(labels, scores)
    if (masks is None) != (maps is None):
        raise FastADError("evaluate() needs both masks and maps for pixel metrics, or neither")
    if masks is not None:
        masks, maps = _masks_maps(masks, maps)
        if masks.shape[0] != y.size:
            raise FastADError(
                f"got {masks.shape[0]} masks/maps for {y.size} image labels"
            )
    result = _metrics(y, s, masks, maps)
    per_defect: dict[str, dict] = {}
    if defects is not None:
        names = np.asarray([str(d) for d in defects], dtype=object)
        if names.shape != y.shape:
            raise FastADError(f"got {names.size} defect names for {y.size} images")
        good = ~y
        for name in sorted(set(names[y].tolist())):
            idx = np.flatnonzero(good | ((names == name) & y))
            per_defect[name] = _metrics(
                y[idx],
                s[idx],
                None if masks is None else masks[idx],
                None if maps is None else maps[idx],
            )
    result["per_defect"] = per_defect
    return result
