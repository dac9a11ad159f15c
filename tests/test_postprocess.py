"""fastad.postprocess: the numpy/scipy path against torch/scipy, the C++ module against the
numpy/scipy path, bad input, thread safety, and the C++ example program."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import fastad.postprocess as pp

REPO = Path(__file__).resolve().parents[1]
HAS_CPP = pp._cpp is not None
BACKENDS = ["python", pytest.param("cpp", marks=pytest.mark.skipif(
    not HAS_CPP, reason="fastad._postprocess not built (no C++ compiler at install time)"))]
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="fastad._postprocess not built")
ATOL = 1e-5  # fp32, the parity bound for blur and upsample

# Map sizes for the blur: ordinary, non-square, and smaller than the kernel radius (16 at
# sigma 4), where scipy's 'reflect' extension repeats.
BLUR_SHAPES = [(64, 64), (37, 53), (3, 3), (1, 1), (1, 40), (17, 5)]
# (h, w) -> (H, W): upsampling as in FOD, downsampling, identity, 1-pixel input and output.
RESIZES = [((7, 9), (64, 50)), ((16, 16), (256, 256)), ((5, 5), (3, 2)), ((1, 1), (4, 4)),
           ((3, 8), (3, 8)), ((6, 4), (1, 1))]


def random_maps(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def reference_regions(mask, amap, connectivity):
    """Regions spelled out per scipy label with plain numpy (independent of fastad's code)."""
    structure = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
    labels, n = ndimage.label(mask, structure=structure)
    out = []
    for i in range(1, n + 1):
        inside = labels == i
        ys, xs = np.nonzero(inside)
        flat = int(np.argmax(np.where(inside, amap, -np.inf)))  # first max in row-major order
        out.append(pp.Region((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                             int(inside.sum()), float(amap.flat[flat]),
                             (flat % amap.shape[1], flat // amap.shape[1]),
                             float(amap[inside].astype(np.float64).mean())))
    return sorted(out, key=lambda r: (-r.peak_score, r.peak_xy[1], r.peak_xy[0]))


def assert_regions_match(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g._replace(mean_score=0.0) == w._replace(mean_score=0.0)
        assert g.mean_score == pytest.approx(w.mean_score, rel=1e-12)  # summation order only


# ---------------------------------------------------------------------------------------------
# Each backend against the libraries that define the semantics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("src,dst", RESIZES)
def test_upsample_matches_torch(backend, align_corners, src, dst):
    maps = random_maps((2, *src), seed=src[0])
    want = F.interpolate(torch.from_numpy(maps)[:, None], size=dst, mode="bilinear",
                         align_corners=align_corners)[:, 0].numpy()
    got = pp.upsample_bilinear(maps, dst, align_corners=align_corners, backend=backend)
    assert got.dtype == np.float32 and got.shape == (2, *dst)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    single = pp.upsample_bilinear(maps[1], dst, align_corners=align_corners, backend=backend)
    np.testing.assert_array_equal(single, got[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sigma,truncate", [(4.0, 4.0), (1.5, 4.0), (0.5, 4.0), (7.3, 2.0)])
@pytest.mark.parametrize("shape", BLUR_SHAPES)
def test_blur_matches_scipy(backend, sigma, truncate, shape):
    maps = random_maps((3, *shape), seed=shape[0] * 100 + shape[1])
    got = pp.gaussian_blur(maps, sigma, truncate, backend=backend)
    assert got.dtype == np.float32 and got.shape == maps.shape
    for g, m in zip(got, maps):
        want = ndimage.gaussian_filter(m, sigma, mode="reflect", truncate=truncate)
        np.testing.assert_allclose(g, want, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(pp.gaussian_blur(maps[0], sigma, truncate, backend=backend), got[0])


def test_blur_matches_fod_torch_blur():
    """The model's torch blur (FOD.anomaly_map) and the post-processing blur agree."""
    from fastad.layers import GaussianBlur
    maps = random_maps((2, 48, 48), seed=3)
    want = GaussianBlur(4.0, 48)(torch.from_numpy(maps)).numpy()
    np.testing.assert_allclose(pp.gaussian_blur(maps, 4.0), want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_is_strict_and_float32(backend):
    maps = np.array([[0.1, 0.2, 0.30000001, np.nan]], dtype=np.float32)
    # 0.1 as float32 equals the map value: not above it (numpy compares in float32 too)
    np.testing.assert_array_equal(pp.threshold(maps, 0.1, backend=backend), [[False, True, True, False]])
    np.testing.assert_array_equal(pp.threshold(maps, 0.3, backend=backend), [[False, False, False, False]])
    batch = random_maps((2, 9, 7))
    got = pp.threshold(batch, 0.25, backend=backend)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, batch > np.float32(0.25))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("density,seed", [(0.3, 0), (0.55, 1), (0.7, 2)])
def test_regions_match_scipy_label(backend, connectivity, density, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((41, 57)) < density
    amap = rng.random((41, 57)).astype(np.float32)
    got = pp.regions(mask, amap, connectivity=connectivity, backend=backend)
    assert_regions_match(got, reference_regions(mask, amap, connectivity))


@pytest.mark.parametrize("backend", BACKENDS)
def test_regions_ties_and_min_area(backend):
    # Quantised scores: many equal peaks inside and across components.
    rng = np.random.default_rng(5)
    mask = rng.random((30, 30)) < 0.45
    amap = (rng.integers(0, 3, (30, 30)) / 2).astype(np.float32)
    want = reference_regions(mask, amap, 8)
    assert len({r.peak_score for r in want}) < len(want)  # the ties this test is about
    assert_regions_match(pp.regions(mask, amap, backend=backend), want)
    big = [r for r in want if r.area >= 4]
    assert 0 < len(big) < len(want)
    assert_regions_match(pp.regions(mask, amap, min_area=4, backend=backend), big)
    assert pp.regions(np.zeros((4, 4), bool), amap[:4, :4], backend=backend) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_postprocess_pipeline(backend):
    maps = np.zeros((2, 16, 16), np.float32)
    maps[0, 3:6, 4:8] = 1.0
    maps[0, 12, 12] = 0.8
    maps[1, 8:10, 1:3] = 0.9
    masks, found = postprocess_all(maps, 0.5, backend=backend)
    assert masks.shape == (2, 16, 16) and masks.dtype == bool
    assert [len(f) for f in found] == [2, 1]
    assert found[0][0] == pp.Region((4, 3, 8, 6), 12, 1.0, (4, 3), 1.0)
    assert found[0][1].bbox == (12, 12, 13, 13)
    masks, found = postprocess_all(maps, 0.5, size=(64, 64), min_area=20, backend=backend)
    want = pp.upsample_bilinear(maps, (64, 64), align_corners=False, backend="python") > 0.5
    np.testing.assert_array_equal(masks, want)
    assert all(r.area >= 20 for f in found for r in f)
    mask, found = pp.postprocess_image(maps[0], (16, 16), 16, 16, None, backend=backend)
    assert mask.shape == (16, 16) and not mask.any() and found == []  # no threshold: nothing flagged


def postprocess_all(maps, thr, size=None, min_area=1, backend="auto"):
    """`postprocess_image` over a batch of maps (resize = crop: no crop window to undo)."""
    s = maps.shape[-1]
    done = [pp.postprocess_image(m, size or m.shape, s, s, thr, min_area=min_area, backend=backend) for m in maps]
    return np.stack([m for m, _ in done]), [f for _, f in done]


@pytest.mark.parametrize("backend", BACKENDS)
def test_map_to_original_undoes_the_centre_crop(backend):
    amap = np.arange(16, dtype=np.float32).reshape(4, 4) + 1
    full = pp.map_to_original(amap, (8, 8), resize=8, crop=4, backend=backend)  # window: rows/cols 2..5
    assert full.shape == (8, 8) and full.dtype == np.float32
    np.testing.assert_array_equal(full[2:6, 2:6], amap)
    assert full[:2].max() == 0 and full[:, 6:].max() == 0
    mask, found = pp.postprocess_image(amap, (8, 8), 8, 4, 15.5, backend=backend)
    assert mask.sum() == 1 and found[0].peak_xy == (5, 5)


# ---------------------------------------------------------------------------------------------
# C++ module against the numpy/scipy path
# ---------------------------------------------------------------------------------------------
def test_cpp_module_built_when_a_compiler_exists():
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the numpy/scipy fallback is expected")
    assert HAS_CPP, "a C++ compiler exists but fastad._postprocess is not built (make install)"
    if os.environ.get("FASTAD_POSTPROCESS", "").lower() != "python":
        assert pp.BACKEND == "cpp"


def test_env_forces_python_backend():
    code = "import fastad.postprocess as p; print(p.BACKEND)"
    env = {**os.environ, "FASTAD_POSTPROCESS": "python"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "python"


@needs_cpp
@pytest.mark.parametrize("shape", [(1, 256, 256), (3, 37, 53), (2, 5, 3)])
def test_cpp_equals_python(shape):
    maps = random_maps(shape, seed=sum(shape))
    for size in [(64, 80), (shape[1] * 3, shape[2] * 2)]:
        for ac in (True, False):
            np.testing.assert_allclose(pp.upsample_bilinear(maps, size, ac, backend="cpp"),
                                       pp.upsample_bilinear(maps, size, ac, backend="python"),
                                       rtol=0, atol=ATOL)
    blur_c = pp.gaussian_blur(maps, backend="cpp")
    blur_p = pp.gaussian_blur(maps, backend="python")
    np.testing.assert_allclose(blur_c, blur_p, rtol=0, atol=ATOL)
    thr = float(np.quantile(blur_p, 0.8))
    np.testing.assert_array_equal(pp.threshold(blur_c, thr, backend="cpp"),
                                  pp.threshold(blur_c, thr, backend="python"))
    for mask, amap in zip(blur_c > thr, blur_c):
        for conn in (4, 8):
            assert pp.regions(mask, amap, connectivity=conn, backend="cpp") == \
                pp.regions(mask, amap, connectivity=conn, backend="python")
    for size in (None, (shape[1] * 2, shape[2] * 2)):
        masks_c, found_c = postprocess_all(maps, 0.5, size=size, backend="cpp")
        masks_p, found_p = postprocess_all(maps, 0.5, size=size, backend="python")
        np.testing.assert_array_equal(masks_c, masks_p)
        assert found_c == found_p


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_layout_and_dtype_accepted(backend):
    base = random_maps((2, 40, 30), seed=9)
    variants = [base.astype(np.float64), np.asfortranarray(base),
                np.ascontiguousarray(base.transpose(0, 2, 1)).transpose(0, 2, 1)]
    strided = random_maps((2, 80, 30), seed=9)[:, ::2]
    for v in variants + [strided]:
        want = v.astype(np.float32).copy()
        np.testing.assert_array_equal(pp.gaussian_blur(v, backend=backend),
                                      pp.gaussian_blur(want, backend=backend))
        np.testing.assert_array_equal(pp.upsample_bilinear(v, (50, 50), backend=backend),
                                      pp.upsample_bilinear(want, (50, 50), backend=backend))
    mask = base[0] > 0.5
    assert pp.regions(mask.astype(np.uint8)[:, :], base[0].astype(np.float64), backend=backend) == \
        pp.regions(mask, base[0], backend=backend)


# ---------------------------------------------------------------------------------------------
# Bad input: one-line ValueErrors, the same for both backends
# ---------------------------------------------------------------------------------------------
GOOD = np.zeros((1, 4, 4), np.float32)
BAD_CALLS = {
    "blur 1-D": lambda b: pp.gaussian_blur(np.zeros(5, np.float32), backend=b),
    "blur 4-D": lambda b: pp.gaussian_blur(np.zeros((1, 1, 4, 4), np.float32), backend=b),
    "blur empty": lambda b: pp.gaussian_blur(np.zeros((1, 0, 4), np.float32), backend=b),
    "blur sigma nan": lambda b: pp.gaussian_blur(GOOD, float("nan"), backend=b),
    "blur sigma 0": lambda b: pp.gaussian_blur(GOOD, 0.0, backend=b),
    "blur truncate inf": lambda b: pp.gaussian_blur(GOOD, 4.0, float("inf"), backend=b),
    "blur radius huge": lambda b: pp.gaussian_blur(GOOD, 1e8, backend=b),
    "upsample 1-D": lambda b: pp.upsample_bilinear(np.zeros(3, np.float32), (4, 4), backend=b),
    "upsample empty": lambda b: pp.upsample_bilinear(np.zeros((0, 4, 4), np.float32), (4, 4), backend=b),
    "upsample size 0": lambda b: pp.upsample_bilinear(GOOD, (0, 4), backend=b),
    "upsample size nan": lambda b: pp.upsample_bilinear(GOOD, (float("nan"), 4), backend=b),
    "upsample size inf": lambda b: pp.upsample_bilinear(GOOD, (4, float("inf")), backend=b),
    "upsample size 2.5": lambda b: pp.upsample_bilinear(GOOD, (2.5, 4), backend=b),
    "upsample size len 1": lambda b: pp.upsample_bilinear(GOOD, (4,), backend=b),
    "upsample size str": lambda b: pp.upsample_bilinear(GOOD, "ab", backend=b),
    "threshold nan": lambda b: pp.threshold(GOOD, float("nan"), backend=b),
    "threshold empty": lambda b: pp.threshold(np.zeros((2, 0), np.float32), 0.5, backend=b),
    "regions 3-D": lambda b: pp.regions(GOOD > 0, GOOD, backend=b),
    "regions shapes": lambda b: pp.regions(np.zeros((4, 5), bool), GOOD[0], backend=b),
    "regions empty": lambda b: pp.regions(np.zeros((0, 4), bool), np.zeros((0, 4), np.float32), backend=b),
    "regions connectivity": lambda b: pp.regions(GOOD[0] > 0, GOOD[0], connectivity=6, backend=b),
    "regions nan inside mask": lambda b: pp.regions(np.ones((2, 2), bool),
                                                    np.array([[0, np.nan], [0, 0]], np.float32), backend=b),
    "postprocess_image 3-D": lambda b: pp.postprocess_image(GOOD, (4, 4), 4, 4, 0.5, backend=b),
    "postprocess_image size": lambda b: pp.postprocess_image(GOOD[0], (-1, 4), 4, 4, 0.5, backend=b),
    "unknown backend": lambda b: pp.gaussian_blur(GOOD, backend="fortran"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_one_line_value_error(backend, case):
    with pytest.raises(ValueError) as info:
        BAD_CALLS[case](backend)
    message = str(info.value)
    assert message and "\n" not in message


# ---------------------------------------------------------------------------------------------
# Threads (the runtime post-processes from several threads; the C++ module releases the GIL)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_results_from_four_threads(backend):
    maps = random_maps((2, 96, 96), seed=11)

    def work():
        blurred = pp.gaussian_blur(maps, backend=backend)
        big = pp.upsample_bilinear(blurred, (160, 160), align_corners=False, backend=backend)
        masks, found = postprocess_all(big, 0.1, backend=backend)
        return blurred, big, masks, found

    want = work()
    results = [None] * 4

    def run(i):
        results[i] = [work() for _ in range(3)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for per_thread in results:
        for blurred, big, masks, found in per_thread:
            np.testing.assert_array_equal(blurred, want[0])
            np.testing.assert_array_equal(big, want[1])
            np.testing.assert_array_equal(masks, want[2])
            assert found == want[3]


# ---------------------------------------------------------------------------------------------
# The C++ library without Python: the example program on a map written from Python
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_example_program_matches_python(tmp_path):
    exe = tmp_path / "fastad_postprocess_example"
    subprocess.run(["c++", "-std=c++17", "-O1", "-ffp-contract=off", f"-I{REPO / 'csrc'}",
                    str(REPO / "csrc/example/fastad_postprocess_example.cpp"),
                    str(REPO / "csrc/postprocess.cpp"), "-o", str(exe)], check=True)
    raw = np.random.default_rng(4).random((48, 64)).astype(np.float32)
    raw[10:20, 30:40] += 2.0
    raw[35:40, 5:9] += 1.5
    raw.tofile(tmp_path / "map.f32")
    out = subprocess.run([str(exe), str(tmp_path / "map.f32"), "48", "64", "0.9", "2", "3"],
                         capture_output=True, text=True, check=True).stdout
    blurred = pp.gaussian_blur(raw, 2.0, backend="python")
    want = pp.regions(blurred > np.float32(0.9), blurred, min_area=3, backend="python")
    lines = [line for line in out.splitlines() if line.startswith("  bbox")]
    assert len(lines) == len(want) >= 2
    for line, r in zip(lines, want):
        assert line.startswith(f"  bbox ({r.bbox[0]}, {r.bbox[1]}, {r.bbox[2]}, {r.bbox[3]})  "
                               f"area {r.area}  peak {r.peak_score:.6f} at ({r.peak_xy[0]}, "
                               f"{r.peak_xy[1]})  mean {r.mean_score:.6f}")
    bad = subprocess.run([str(exe), str(tmp_path / "map.f32"), "48", "63"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")


@needs_cpp
def test_cpp_defaults_equal_python_defaults():
    """Each bound function's keyword defaults are its Python twin's (pybind11 puts them in the
    signature line of the docstring)."""
    import inspect
    import re

    twins = {"upsample_bilinear": {"align_corners"}, "gaussian_blur": {"sigma", "truncate"},
             "regions": {"min_area", "connectivity"}}
    for name, keywords in twins.items():
        py = inspect.signature(getattr(pp, name)).parameters
        cpp = dict(re.findall(r"(\w+): [^,=)]+ = ([^,)]+)", getattr(pp._cpp, name).__doc__.splitlines()[0]))
        assert set(cpp) == keywords, (name, cpp)
        for kw in keywords:
            assert str(py[kw].default) == cpp[kw], (name, kw, py[kw].default, cpp[kw])
