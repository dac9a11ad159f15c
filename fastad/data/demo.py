"""An offline demo dataset in MVTec layout, built from scikit-image's bundled real textures.

Normal images are random crops (with flips and mild brightness jitter) of a tinted texture photo
(`skimage.data.brick()`, `grass()` or `gravel()`, 512 x 512 grayscale). Defective images get one of:

- ``scratch``:  thin dark or bright curved lines;
- ``spot``:     irregular blobs of an off colour (texture faintly visible through them);
- ``cutpaste``: a patch from elsewhere in the image pasted back rotated and slightly re-lit;
- ``color``:    an irregular region whose hue is shifted (brightness kept).

Every defect comes with its exact binary mask (the pixels that were changed, 0/255 PNG). Output:
train/good, test/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png and fastad_demo.json.
The result depends only on the arguments (deterministic given `seed`).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fastad.errors import FastADError
from fastad.utils import write_json

TEXTURES = ("brick", "grass", "gravel")
DEFECTS = ("scratch", "spot", "cutpaste", "color")
_TINTS = {"brick": (1.0, 0.72, 0.58), "grass": (0.72, 1.0, 0.55), "gravel": (0.95, 0.9, 0.8)}


# ----------------------------------------------------------------------------- normal images


def _texture(name: str) -> np.ndarray:
    """Tinted texture photo as float32 (512, 512, 3) in [0, 255]."""
    from skimage import data

    if name not in TEXTURES or not hasattr(data, name):
        raise FastADError(f"unknown demo texture '{name}': expected one of {', '.join(TEXTURES)}")
    gray = getattr(data, name)().astype(np.float32)
    if gray.ndim == 3:
        gray = gray[..., :3].mean(axis=-1)
    return gray[..., None] * np.asarray(_TINTS[name], dtype=np.float32)[None, None, :]


def _normal_image(texture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of the texture, flipped, resized to (size, size), brightness-jittered: uint8 (S, S, 3)."""
    full = texture.shape[0]
    side = int(rng.integers(int(0.45 * full), int(0.6 * full) + 1))
    y, x = (int(v) for v in rng.integers(0, full - side + 1, size=2))
    patch = texture[y : y + side, x : x + side]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1]
    img = Image.fromarray(np.clip(patch, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.93, 1.07)
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- defects


def _blob(size: int, rng: np.random.Generator, radius: float) -> np.ndarray:
    """An irregular filled blob (bool (S, S)) of mean radius `radius` pixels, fully inside the image."""
    cy, cx = rng.uniform(radius * 1.4, size - radius * 1.4, size=2)
    angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    wobble = np.ones_like(angles)
    for k in (2, 3, 5):
        wobble += rng.uniform(0.05, 0.15) * np.sin(k * angles + rng.uniform(0, 2 * math.pi))
    xs, ys = cx + radius * wobble * np.cos(angles), cy + radius * wobble * np.sin(angles)
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon(list(zip(xs.tolist(), ys.tolist())), fill=255)
    return np.asarray(mask) > 0


def _scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 3))):
        length = rng.uniform(0.3, 0.55) * size
        angle = rng.uniform(0, math.pi)
        cx, cy = rng.uniform(0.3 * size, 0.7 * size, size=2)
        dx, dy = math.cos(angle) * length / 2, math.sin(angle) * length / 2
        bend = rng.uniform(-0.25, 0.25) * length  # control point offset, perpendicular to the line
        p0, p2 = np.array([cx - dx, cy - dy]), np.array([cx + dx, cy + dy])
        p1 = np.array([cx, cy]) + bend * np.array([-math.sin(angle), math.cos(angle)])
        t = np.linspace(0, 1, 40)[:, None]
        points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        width = max(2, int(round(rng.uniform(2, 4) * size / 256)))
        draw.line([tuple(p) for p in points.tolist()], fill=255, width=width, joint="curve")
    m = np.asarray(mask) > 0
    out = img.astype(np.float32)
    if rng.random() < 0.5:
        out[m] = out[m] * 0.25  # dark scratch
    else:
        out[m] = out[m] * 0.3 + 0.7 * 235.0  # bright scratch
    return out, m


def _spot(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    m = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        m |= _blob(size, rng, rng.uniform(0.035, 0.08) * size)
    colours = np.array([(45, 35, 30), (210, 195, 70), (80, 90, 130), (235, 235, 225)], dtype=np.float32)
    colour = colours[int(rng.integers(len(colours)))]
    out = img.astype(np.float32)
    out[m] = 0.35 * out[m] + 0.65 * colour
    return out, m


def _cutpaste(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    h, w = (int(v) for v in rng.uniform(0.12, 0.25, size=2) * size)
    sy, sx = (int(v) for v in rng.integers(0, size - max(h, w), size=2))
    patch = Image.fromarray(img[sy : sy + h, sx : sx + w])
    angle = float(rng.uniform(25, 155))
    patch = patch.rotate(angle, resample=Image.NEAREST, expand=True)
    alpha = Image.new("L", (w, h), 255).rotate(angle, resample=Image.NEAREST, expand=True)
    py = int(rng.integers(0, size - patch.height + 1))
    px = int(rng.integers(0, size - patch.width + 1))
    canvas, mask = Image.fromarray(img), Image.new("L", (size, size), 0)
    canvas.paste(patch, (px, py), alpha)
    mask.paste(alpha, (px, py))
    m = np.asarray(mask) > 0
    out = np.asarray(canvas, dtype=np.float32).copy()
    out[m] *= rng.choice([0.8, 1.2])
    return out, m


def _color(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    m = _blob(size, rng, rng.uniform(0.08, 0.14) * size)
    shift = rng.normal(size=3)
    shift -= shift.mean()  # change hue, keep brightness
    shift *= rng.uniform(35, 55) / max(np.linalg.norm(shift), 1e-6)
    out = img.astype(np.float32)
    out[m] += shift.astype(np.float32)
    return out, m


_DEFECT_FNS = {"scratch": _scratch, "spot": _spot, "cutpaste": _cutpaste, "color": _color}


# ----------------------------------------------------------------------------- writer


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8)).save(path, compress_level=1)


def _write_all(
    tmp: Path, texture: str, n_train: int, n_test_good: int, n_test_defect: int, size: int, seed: int
) -> None:
    tex = _texture(texture)
    for i in range(n_train):
        _save(_normal_image(tex, size, np.random.default_rng([seed, 0, 0, i])), tmp / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        _save(_normal_image(tex, size, np.random.default_rng([seed, 1, 0, i])), tmp / "test" / "good" / f"{i:03d}.png")
    for d, defect in enumerate(DEFECTS, start=1):
        for i in range(n_test_defect):
            rng = np.random.default_rng([seed, 2, d, i])
            img, mask = _DEFECT_FNS[defect](_normal_image(tex, size, rng), rng)
            if not mask.any():  # cannot happen with the sizes above; never write an empty mask
                raise RuntimeError(f"demo defect {defect} {i} has an empty mask")
            _save(img, tmp / "test" / defect / f"{i:03d}.png")
            _save(mask.astype(np.uint8) * 255, tmp / "ground_truth" / defect / f"{i:03d}_mask.png")
    write_json(
        tmp / "fastad_demo.json",
        {
            "generator": "fastad.data.demo.make_demo_dataset",
            "source": f"skimage.data.{texture}()",
            "texture": texture,
            "seed": seed,
            "size": size,
            "n_train": n_train,
            "n_test_good": n_test_good,
            "n_test_defect": n_test_defect,
            "defects": list(DEFECTS),
        },
    )


def make_demo_dataset(
    out_dir: str | os.PathLike,
    n_train: int = 60,
    n_test_good: int = 20,
    n_test_defect: int = 10,
    size: int = 256,
    texture: str = "brick",
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic-defect dataset in MVTec layout to `out_dir` and return its path.

    `n_test_defect` images per defect type (scratch, spot, cutpaste, color); images are (size, size) RGB
    PNGs. The dataset is built in a temporary folder beside `out_dir` and renamed into place, so an
    interrupted run leaves nothing behind. An existing non-empty `out_dir` is an error unless `overwrite`.
    """
    out = Path(out_dir)
    if texture not in TEXTURES:
        raise FastADError(f"unknown demo texture '{texture}': expected one of {', '.join(TEXTURES)}")
    if int(size) < 32:
        raise FastADError(f"demo image size {size} is too small: use at least 32")
    if min(n_train, n_test_good, n_test_defect) < 0 or n_train < 1:
        raise FastADError("demo dataset counts must be >= 0 and n_train >= 1")
    if out.exists() and not out.is_dir():
        raise FastADError(f"demo dataset path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FastADError(
            f"demo dataset folder {out} already exists and is not empty (pass overwrite=True to replace it)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is an ordinary folder
        _write_all(tmp, texture, int(n_train), int(n_test_good), int(n_test_defect), int(size), int(seed))
        if out.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "data")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
