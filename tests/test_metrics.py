"""Tests for fastad.metrics (AUROC, AUPRO, F1, evaluate) and fastad.visualize."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from fastad import metrics as M
from fastad.errors import FastADError
from fastad.visualize import save_map_png, save_overlay


# --------------------------------------------------------------------------- helpers
def literal_aupro(masks, maps, thresholds, fpr_limit=0.3):
    """Slow, literal AUPRO: loop over thresholds, average per-region overlap, trapezoid."""
    masks = np.asarray(masks, bool)
    regions = []  # (image index, region mask)
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3), int))
        for k in range(1, n + 1):
            regions.append((i, lab == k))
    ok = ~masks
    n_ok = ok.sum()
    fprs, pros = [0.0], [0.0]
    for t in sorted(set(float(x) for x in thresholds), reverse=True):
        pred = maps >= t
        overlaps = [pred[i][r].sum() / r.sum() for i, r in regions]
        pros.append(float(np.mean(overlaps)))
        fprs.append(float((pred & ok).sum() / n_ok))
    fprs, pros = np.array(fprs), np.array(pros)
    # trapezoid up to fpr_limit, PRO interpolated at the limit
    area = 0.0
    for j in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[j - 1], fprs[j], pros[j - 1], pros[j]
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / fpr_limit


def random_case(seed, n=6, h=48, w=48, quantize=None):
    """Random blob/rectangle masks and spatially smooth maps correlated with them."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), bool)
    for i in range(1, n):  # image 0 stays anomaly-free
        for _ in range(rng.integers(1, 4)):
            if rng.random() < 0.5:  # rectangle
                y, x = rng.integers(0, h - 8, 2)
                hh, ww = rng.integers(2, 12, 2)
                masks[i, y : y + hh, x : x + ww] = True
            else:  # blob: thresholded smooth noise around a centre
                cy, cx = rng.integers(5, h - 5, 2)
                yy, xx = np.mgrid[:h, :w]
                r = rng.uniform(2, 7)
                blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2 * (0.6 + rng.random((h, w)))
                masks[i] |= blob
    noise = ndimage.gaussian_filter(rng.standard_normal((n, h, w)), sigma=(0, 1.5, 1.5))
    maps = noise + masks * rng.uniform(0.0, 1.0, (n, 1, 1)) * noise.std() * 3
    if quantize:
        lo, hi = maps.min(), maps.max()
        maps = np.round((maps - lo) / (hi - lo) * quantize) / quantize
    return masks, maps.astype(np.float32)


# --------------------------------------------------------------------------- AUROC
def test_image_auroc_hand_computed():
    assert M.image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert M.image_auroc([0, 1, 0, 1], [1, 2, 3, 4]) == pytest.approx(0.75)
    assert M.image_auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # tie counts half
    assert M.image_auroc([1, 1, 0], [0.1, 0.2, 0.3]) == pytest.approx(0.0)
    assert isinstance(M.image_auroc([0, 1], [0.0, 1.0]), float)


def test_auroc_single_class_is_nan():
    assert math.isnan(M.image_auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(M.image_auroc([1, 1], [0.1, 0.2]))
    assert math.isnan(M.pixel_auroc(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4))))


def test_pixel_auroc_hand_computed():
    masks = np.zeros((2, 2, 2), bool)
    masks[0, 0, 0] = True
    masks[1, 1, 1] = True
    maps = np.array([[[5.0, 1.0], [2.0, 3.0]], [[4.0, 0.0], [6.0, 2.5]]])
    # positives: 5 and 2.5; negatives: 1, 2, 3, 4, 0, 6 -> 5 beats 5 of 6, 2.5 beats 3 of 6
    assert M.pixel_auroc(masks, maps) == pytest.approx(8 / 12)


def test_input_validation():
    with pytest.raises(FastADError):
        M.image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(FastADError):
        M.image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(FastADError):
        M.image_auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(FastADError):
        M.aupro(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 5)))
    with pytest.raises(FastADError):
        M.aupro(np.ones((1, 4, 4), bool), np.zeros((1, 4, 4)), fpr_limit=0.0)


# --------------------------------------------------------------------------- AUPRO
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_literal_on_dense_threshold_grid(seed):
    masks, maps = random_case(seed)
    # grid dense in FPR over [0, 0.35] (quantiles of the normal pixels) plus a uniform grid
    ok_scores = maps[~masks]
    grid = np.concatenate([
        np.quantile(ok_scores, 1.0 - np.linspace(0.0, 0.35, 350)),
        np.linspace(maps.min(), maps.max(), 150),
    ])
    fast = M.aupro(masks, maps)
    slow = literal_aupro(masks, maps, grid)
    assert 0.05 < fast < 0.999
    assert fast == pytest.approx(slow, abs=1e-3)


@pytest.mark.parametrize("seed", [3, 4])
def test_aupro_exact_at_every_distinct_value_with_ties(seed):
    # quantized maps: many ties between normal and anomalous pixels; literal version evaluated
    # at every distinct value is then exact, so both must agree to rounding error
    masks, maps = random_case(seed, quantize=40)
    for limit in (0.3, 0.05, 1.0):
        fast = M.aupro(masks, maps, fpr_limit=limit)
        slow = literal_aupro(masks, maps, np.unique(maps), fpr_limit=limit)
        assert fast == pytest.approx(slow, abs=1e-9)


def test_aupro_hand_computed_ties_and_interpolation():
    # 10 normal pixels scored 10..1, one anomalous pixel tied with the normal pixel at 9:
    # curve (0,0) (0.1,0) (0.2,1) (0.3,1) ...
    maps = np.array([[[10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 9]]], dtype=np.float64)
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 0, -1] = True
    assert M.aupro(masks, maps, fpr_limit=0.3) == pytest.approx((0.05 + 0.1) / 0.3)
    # limit inside the sloped segment: PRO interpolated to 0.5 at FPR 0.15
    assert M.aupro(masks, maps, fpr_limit=0.15) == pytest.approx(0.5 * 0.5 * 0.05 / 0.15)
    fpr, pro = M.pro_curve(masks, maps)
    np.testing.assert_allclose(fpr[:4], [0, 0.1, 0.2, 0.3])
    np.testing.assert_allclose(pro[:4], [0, 0, 1, 1])


def test_aupro_perfect_detector_is_one():
    masks, _ = random_case(5)
    rng = np.random.default_rng(5)
    maps = rng.random(masks.shape) + 2.0 * masks  # every anomalous pixel above every normal
    assert M.aupro(masks, maps) == pytest.approx(1.0, abs=1e-6)
    assert M.pixel_auroc(masks, maps) == pytest.approx(1.0)


def test_aupro_inverted_detector_is_zero():
    masks, _ = random_case(6)
    rng = np.random.default_rng(6)
    maps = rng.random(masks.shape) - 2.0 * masks  # every anomalous pixel below everything
    assert M.aupro(masks, maps) == pytest.approx(0.0, abs=1e-6)


def test_aupro_uses_8_connectivity_and_weights_regions_equally():
    # a 1-pixel region touching a 3x3 region only diagonally: one 8-connected region of 10
    masks = np.zeros((1, 8, 8), bool)
    masks[0, 1, 1] = True
    masks[0, 2:5, 2:5] = True
    maps = np.full((1, 8, 8), 0.5)
    maps[0, 1, 1] = 1.0  # detected
    maps[0, 2:5, 2:5] = 0.0  # below every normal pixel
    # 8-connectivity: PRO = 1/10 for all FPR in (0, 1); 4-connectivity would give 1/2
    assert M.aupro(masks, maps) == pytest.approx(0.1)
    # separate regions (in different images) are averaged with equal weight
    masks2 = np.zeros((2, 8, 8), bool)
    masks2[0, 1, 1] = True
    masks2[1, 2:5, 2:5] = True
    maps2 = np.concatenate([maps, maps])
    maps2[1, 1, 1] = 0.5
    assert M.aupro(masks2, maps2) == pytest.approx(0.5)


def test_aupro_without_anomalous_pixels_is_nan():
    assert math.isnan(M.aupro(np.zeros((3, 8, 8), bool), np.random.rand(3, 8, 8)))
    assert math.isnan(M.aupro(np.ones((1, 4, 4), bool), np.random.rand(1, 4, 4)))


def test_aupro_fast_on_mvtec_sized_input():
    rng = np.random.default_rng(0)
    n, h, w = 83, 256, 256
    masks = np.zeros((n, h, w), bool)
    for i in range(20, n):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, 220, 2)
            hh, ww = rng.integers(5, 40, 2)
            masks[i, y : y + hh, x : x + ww] = True
    maps = (rng.random((n, h, w)) + masks * rng.random((n, 1, 1))).astype(np.float32)
    t0 = time.perf_counter()
    value = M.aupro(masks, maps)
    elapsed = time.perf_counter() - t0
    assert 0.0 < value < 1.0
    assert elapsed < 2.0, f"aupro took {elapsed:.2f} s"


# --------------------------------------------------------------------------- F1
def test_f1_max_and_threshold_hand_computed():
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    # t=0.35: predicted {0.35, 0.4, 0.8} -> P=2/3, R=1 -> F1=0.8 (best)
    assert M.f1_max(labels, scores) == pytest.approx(0.8)
    assert math.isnan(M.f1_max([0, 0], [0.1, 0.2]))
    masks = np.array([[[True, False], [False, True]]])
    maps = np.array([[[0.9, 0.8], [0.1, 0.7]]])
    # t=0.7: predicted {0.9, 0.8, 0.7} -> P=2/3, R=1 -> 0.8; t=0.9: P=1, R=0.5 -> 2/3
    assert M.pixel_f1_max(masks, maps) == pytest.approx(0.8)


# --------------------------------------------------------------------------- evaluate
METRIC_KEYS = {"image_auroc", "pixel_auroc", "aupro", "f1_max", "pixel_f1_max",
               "num_images", "num_anomalous"}


def test_evaluate_structure_and_per_defect():
    masks, maps = random_case(7, n=9, h=32, w=32)
    masks[1:3] = False  # images 0..2 are good
    labels = masks.reshape(9, -1).any(1).astype(int)
    scores = maps.reshape(9, -1).max(1)
    defects = ["good", "good", "good", "crack", "crack", "crack", "hole", "hole", "hole"]
    r = M.evaluate(labels, scores, masks, maps, defects=defects)
    assert set(r) == METRIC_KEYS | {"per_defect"}
    assert r["num_images"] == 9 and r["num_anomalous"] == 6
    assert set(r["per_defect"]) == {"crack", "hole"}
    for d, sub in r["per_defect"].items():
        assert set(sub) == METRIC_KEYS
        assert sub["num_images"] == 6 and sub["num_anomalous"] == 3
        idx = [0, 1, 2] + [i for i, n in enumerate(defects) if n == d]
        assert sub["image_auroc"] == pytest.approx(M.image_auroc(labels[idx], scores[idx]))
        assert sub["aupro"] == pytest.approx(M.aupro(masks[idx], maps[idx]))
    for key in METRIC_KEYS:
        assert r[key] is not None
        assert type(r[key]) in (float, int)
    assert r["aupro"] == pytest.approx(M.aupro(masks, maps))
    json.dumps(r)  # plain Python types only


def test_evaluate_image_only_and_single_class():
    r = M.evaluate([0, 0, 0], [0.1, 0.2, 0.3])
    assert r["image_auroc"] is None and r["f1_max"] is None
    assert r["pixel_auroc"] is None and r["aupro"] is None and r["pixel_f1_max"] is None
    assert r["per_defect"] == {}
    assert r["num_images"] == 3 and r["num_anomalous"] == 0
    json.dumps(r)

    # anomalous images without good ones: AUROC undefined per defect, no crash
    masks = np.zeros((2, 8, 8), bool)
    masks[:, 2:4, 2:4] = True
    r = M.evaluate([1, 1], [0.5, 0.6], masks, np.random.rand(2, 8, 8), defects=["a", "b"])
    assert r["image_auroc"] is None and r["pixel_auroc"] is not None
    assert r["per_defect"]["a"]["image_auroc"] is None
    json.dumps(r)

    with pytest.raises(FastADError):
        M.evaluate([0, 1], [0.1, 0.2], masks=np.zeros((2, 4, 4), bool))
    with pytest.raises(FastADError):
        M.evaluate([0, 1], [0.1, 0.2], defects=["good"])


# --------------------------------------------------------------------------- visualize
def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("float_image", [False, True])
def test_save_overlay_writes_png_of_image_size(tmp_path, float_image):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    if float_image:
        image = image / 255.0
    amap = rng.random((10, 15))  # smaller than the image: resized
    mask = np.zeros((40, 60), bool)
    mask[10:20, 10:30] = True
    out = tmp_path / "sub" / "overlay.png"
    save_overlay(out, image, amap, vmin=0.0, vmax=1.0, mask=mask, alpha=0.5)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (60, 40) and im.mode == "RGB"
        arr = np.asarray(im)
    assert (arr[10, 10:30] == 255).all()  # white contour on the mask's top edge
    assert _leftovers(out.parent) == ["overlay.png"]


def test_save_overlay_alpha_extremes_and_shared_scale(tmp_path):
    image = np.full((8, 8, 3), 100, np.uint8)
    save_overlay(tmp_path / "a.png", image, np.zeros((8, 8)), vmin=0, vmax=1, alpha=0.0)
    assert (np.asarray(Image.open(tmp_path / "a.png")) == 100).all()
    # same map value, different scales -> different colours; same scale -> same colours
    save_overlay(tmp_path / "b.png", image, np.full((8, 8), 0.5), vmin=0, vmax=1, alpha=1.0)
    save_overlay(tmp_path / "c.png", image, np.full((8, 8), 0.5), vmin=0, vmax=10, alpha=1.0)
    save_overlay(tmp_path / "d.png", image, np.full((8, 8), 5.0), vmin=0, vmax=10, alpha=1.0)
    b, c, d = (np.asarray(Image.open(tmp_path / f"{k}.png")) for k in "bcd")
    assert not np.array_equal(b, c)
    assert np.array_equal(b, d)


def test_save_overlay_failure_writes_nothing(tmp_path, monkeypatch):
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(FastADError):
        save_overlay(tmp_path / "x.png", image, np.zeros((8, 8)), vmin=1.0, vmax=1.0)
    with pytest.raises(FastADError):
        save_overlay(tmp_path / "x.png", np.zeros((8, 8, 5)), np.zeros((8, 8)), vmin=0, vmax=1)

    def broken_save(self, *args, **kwargs):
        with open(args[0], "wb") as f:  # partial output, then failure
            f.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        save_overlay(tmp_path / "x.png", image, np.zeros((8, 8)), vmin=0, vmax=1)
    assert _leftovers(tmp_path) == []


def test_save_map_png_grayscale(tmp_path):
    amap = np.array([[-1.0, 0.0], [0.5, 2.0]])
    save_map_png(tmp_path / "m.png", amap, 0.0, 1.0)
    with Image.open(tmp_path / "m.png") as im:
        assert im.format == "PNG" and im.mode == "L" and im.size == (2, 2)
        np.testing.assert_array_equal(np.asarray(im), [[0, 0], [128, 255]])
    assert _leftovers(tmp_path) == ["m.png"]
