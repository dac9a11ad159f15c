"""An offline demo dataset in MVTec layout, built from scikit-image's bundled real textures.

Normal images are random crops (with flips and mild brightness jitter) of a tinted texture photo
(`skimage.data.brick()`, `grass()` or `gravel()`, 512 x 512 grayscale). Defective images get one of:

- ``scratch``:  thin dark or bright curved lines;
- ``spot``:     irregular blobs of an off colour (texture faintly visible through them);
- ``cutpaste``: a patch from elsewhere in the image pasted back rotated and slightly re-lit;
- ``color``:    an irregular region whose hue is shifted (brightness kept).

(The defect functions live in `fastad.data.synthetic`.)

Every defect comes with its exact binary mask (the pixels that were changed, 0/255 PNG). Output:
train/good, test/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png and fastad_demo.json.
The result depends only on the arguments (deterministic given `seed`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from fastad.data.synthetic import DEMO_DEFECTS
from fastad.errors import FastADError
from fastad.utils import write_json

TEXTURES = ("brick", "grass", "gravel")
DEFECTS = tuple(DEMO_DEFECTS)  # scratch, spot, cutpaste, color
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
            img, mask = DEMO_DEFECTS[defect](_normal_image(tex, size, rng), rng)
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
