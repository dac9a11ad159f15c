"""Anomaly-map images: heatmap overlays and 8-bit grayscale maps, written atomically as PNG.

Both functions take an explicit ``vmin``/``vmax`` so that every image of a run is drawn on the
same scale (pass e.g. the min/max of all test maps, or 0 and the image-score threshold range).
Only the non-interactive matplotlib colormap API is used; no figure is ever created.
"""
from __future__ import annotations

import os

import numpy as np

from fastad.errors import FastADError
from fastad.utils import atomic_path

__all__ = ["save_overlay", "save_map_png", "normalize_map", "overlay", "save_intermediate_strips"]

_CONTOUR_RGB = np.array([1.0, 1.0, 1.0])  # ground-truth contour colour (white)


def normalize_map(anomaly_map, vmin: float, vmax: float) -> np.ndarray:
    """``(map - vmin) / (vmax - vmin)`` clipped to [0, 1], float64; NaN maps to 0."""
    vmin, vmax = float(vmin), float(vmax)
    if not (np.isfinite(vmin) and np.isfinite(vmax)) or vmax <= vmin:
        raise FastADError(f"need finite vmin < vmax for the anomaly-map scale, got {vmin}, {vmax}")
    a = np.asarray(anomaly_map, dtype=np.float64)
    a = np.nan_to_num((a - vmin) / (vmax - vmin), nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(a, 0.0, 1.0)


def _image_float(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.shape[0] == 0 or img.shape[1] == 0:
        raise FastADError(f"image must be (H, W, 3) (or (H, W) gray), got shape {img.shape}")
    img = img[..., :3]
    if img.dtype == np.uint8:
        return img.astype(np.float64) / 255.0
    if np.issubdtype(img.dtype, np.floating):
        return np.clip(np.nan_to_num(img.astype(np.float64)), 0.0, 1.0)
    raise FastADError(f"image must be uint8 or float in [0, 1], got dtype {img.dtype}")


def _map_2d(anomaly_map, shape: tuple[int, int], order: int, what: str) -> np.ndarray:
    a = np.asarray(anomaly_map)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2 or a.size == 0:
        raise FastADError(f"{what} must be (H, W), got shape {a.shape}")
    if a.shape != shape:
        from skimage.transform import resize

        dtype = a.dtype
        a = resize(
            a.astype(np.float64), shape, order=order, mode="edge",
            anti_aliasing=False, preserve_range=True,
        )
        if dtype == bool:
            a = a > 0.5
    return a


def overlay(image, anomaly_map, *, vmin: float, vmax: float, mask=None, alpha: float = 0.5,
            cmap: str = "jet") -> np.ndarray:
    """The overlay as a uint8 (H, W, 3) array (see :func:`save_overlay`)."""
    import matplotlib

    if not 0.0 <= float(alpha) <= 1.0:
        raise FastADError(f"alpha must be in [0, 1], got {alpha}")
    img = _image_float(image)
    hw = img.shape[:2]
    norm = normalize_map(_map_2d(anomaly_map, hw, order=1, what="anomaly map"), vmin, vmax)
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError as e:
        raise FastADError(f"unknown matplotlib colormap {cmap!r}") from e
    heat = colormap(norm)[..., :3]
    out = (1.0 - alpha) * img + alpha * heat
    if mask is not None:
        from skimage.segmentation import find_boundaries

        m = _map_2d(np.asarray(mask).astype(bool), hw, order=0, what="mask")
        out[find_boundaries(m, mode="inner")] = _CONTOUR_RGB
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def save_overlay(path: str | os.PathLike, image, anomaly_map, *, vmin: float, vmax: float,
                 mask=None, alpha: float = 0.5, cmap: str = "jet") -> None:
    """Write a PNG of ``image`` blended with a heatmap of ``anomaly_map``.

    Args:
        path: output PNG path (parent folders are created; written atomically).
        image: (H, W, 3) uint8, or float in [0, 1]; (H, W) grayscale is accepted.
        anomaly_map: (H, W) scores; bilinearly resized to the image size if it differs.
        vmin, vmax: the colour scale (shared by all images of a run); values are clipped.
        mask: optional (H, W) ground-truth mask; its contour is drawn in white.
        alpha: heatmap weight in the blend (0 = image only, 1 = heatmap only).
        cmap: matplotlib colormap name ("jet" by default, "turbo" also works).
    """
    from PIL import Image

    rgb = overlay(image, anomaly_map, vmin=vmin, vmax=vmax, mask=mask, alpha=alpha, cmap=cmap)
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


def save_map_png(path: str | os.PathLike, anomaly_map, vmin: float, vmax: float) -> None:
    """Write ``anomaly_map`` as an 8-bit grayscale PNG: vmin → 0, vmax → 255 (clipped), atomically."""
    from PIL import Image

    a = np.asarray(anomaly_map)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2 or a.size == 0:
        raise FastADError(f"anomaly map must be (H, W), got shape {a.shape}")
    gray = np.rint(normalize_map(a, vmin, vmax) * 255.0).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(gray).save(tmp, format="PNG")


def save_intermediate_strips(intermediates: dict, names: list[str], out_dir: str | os.PathLike) -> list:
    """One PNG strip per image from a family's `explain` output: its image-like intermediates
    ((B, 3, s, s) RGB in [0, 1]) then its maps ((B, S, S), resized to s × s), left to right in
    the dict's order; maps on one colour scale, 0 .. the largest `anomaly_map` value."""
    from pathlib import Path

    import matplotlib
    import torch.nn.functional as F
    from PIL import Image

    images = {k: v for k, v in intermediates.items() if v.dim() == 4}
    maps = {k: v for k, v in intermediates.items() if v.dim() == 3}
    s = next(iter(images.values())).shape[-1]
    top = float(intermediates["anomaly_map"].max())
    cmap = matplotlib.colormaps["jet"]
    written = []
    for j, name in enumerate(names):
        tiles = [(v[j].permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8) for v in images.values()]
        for v in maps.values():
            m = F.interpolate(v[j][None, None].float(), size=(s, s), mode="area")[0, 0].numpy()
            tiles.append((cmap(normalize_map(m, 0.0, top))[..., :3] * 255).astype(np.uint8))
        path = Path(out_dir) / f"{name}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(np.concatenate(tiles, axis=1)).save(tmp, format="PNG")
        written.append(path)
    return written
