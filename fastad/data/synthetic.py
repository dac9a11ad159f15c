"""Synthetic defects on normal images, seeded by a numpy Generator (same seed, same RNG calls,
same output).

- Training anomalies (ADTR's anomaly-available training, the FOD validation scripts in bench/):
  images float (3, S, S) in [0, 1] -> (image, bool mask (S, S)). `confetti` (FCDD),
  `perlin_defect` (DRAEM, with a noise texture instead of DTD), `cutpaste` (CutPaste);
  `synthesise` makes a batch.
- Demo-dataset defects (`fastad.data.demo`): images uint8 (S, S, 3) in [0, 255] -> (float32
  image, bool mask (S, S)). `scratch_defect`, `spot_defect`, `rotated_patch_defect`,
  `color_defect`, keyed by their dataset names in DEMO_DEFECTS.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

SYNTHETIC_KINDS = ("confetti", "perlin", "cutpaste")


# --------------------------------------------------------------------------------------------
# Training anomalies. Images: float (3, S, S) in [0, 1].
# --------------------------------------------------------------------------------------------
def _perlin(size: int, res: int, rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin noise (S, S) in about [−1, 1] on a res × res lattice (size % res == 0)."""
    d = size // res
    angles = rng.uniform(0, 2 * np.pi, (res + 1, res + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], -1)
    lin = (np.arange(size) % d) / d
    gy, gx = np.meshgrid(lin, lin, indexing="ij")
    cy, cx = np.meshgrid(np.arange(size) // d, np.arange(size) // d, indexing="ij")

    def dot(oy, ox):
        g = grads[cy + oy, cx + ox]
        return g[..., 0] * (gy - oy) + g[..., 1] * (gx - ox)

    fade = lambda t: 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3  # noqa: E731
    uy, ux = fade(gy), fade(gx)
    top = dot(0, 0) * (1 - ux) + dot(0, 1) * ux
    bottom = dot(1, 0) * (1 - ux) + dot(1, 1) * ux
    return math.sqrt(2) * (top * (1 - uy) + bottom * uy)


def confetti(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """FCDD-style confetti noise: a few small blobs (rectangles) of random colour, partly blended."""
    _, s, _ = img.shape
    out, mask = img.copy(), np.zeros((s, s), bool)
    for _ in range(int(rng.integers(1, 6))):
        h, w = (int(v) for v in rng.integers(max(2, s // 40), max(3, s // 10), size=2))
        y, x = int(rng.integers(0, s - h)), int(rng.integers(0, s - w))
        colour = rng.uniform(0, 1, size=(3, 1, 1))
        a = rng.uniform(0.6, 1.0)
        out[:, y:y + h, x:x + w] = (1 - a) * out[:, y:y + h, x:x + w] + a * colour
        mask[y:y + h, x:x + w] = True
    return out, mask


def perlin_defect(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """DRAEM-style: a thresholded Perlin-noise region filled with a coloured noise texture."""
    _, s, _ = img.shape
    res = int(rng.choice([r for r in (2, 4, 8, 16) if s % r == 0] or [1]))
    mask = _perlin(s, res, rng) > 0.5
    if mask.mean() < 0.002:  # too small to learn from: force one blob at the noise maximum
        noise = _perlin(s, res, rng)
        mask = noise > np.quantile(noise, 0.99)
    tex_res = int(rng.choice([r for r in (8, 16, 32) if s % r == 0] or [1]))
    t = (_perlin(s, tex_res, rng) + 1) / 2
    c0, c1 = rng.uniform(0, 1, size=(2, 3, 1, 1))
    texture = c0 * t + c1 * (1 - t)
    beta = rng.uniform(0.0, 0.6)  # share of the original image kept inside the region
    out = np.where(mask, beta * img + (1 - beta) * texture, img)
    return out.astype(img.dtype), mask


def cutpaste(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste: a rectangle (2–15% of the area, aspect 0.3–3.3) copied, colour-jittered, pasted elsewhere."""
    _, s, _ = img.shape
    area = rng.uniform(0.02, 0.15) * s * s
    aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
    h = int(min(s - 1, max(2, round(math.sqrt(area * aspect)))))
    w = int(min(s - 1, max(2, round(math.sqrt(area / aspect)))))
    sy, sx, ty, tx = (int(rng.integers(0, s - h)), int(rng.integers(0, s - w)),
                      int(rng.integers(0, s - h)), int(rng.integers(0, s - w)))
    patch = img[:, sy:sy + h, sx:sx + w] * rng.uniform(0.7, 1.3, size=(3, 1, 1)) + rng.uniform(-0.1, 0.1)
    out, mask = img.copy(), np.zeros((s, s), bool)
    out[:, ty:ty + h, tx:tx + w] = np.clip(patch, 0, 1)
    mask[ty:ty + h, tx:tx + w] = True
    return out, mask


SYNTHESISERS = {"confetti": confetti, "perlin": perlin_defect, "cutpaste": cutpaste}


def synthesise(images: torch.Tensor, kind: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` synthetic anomalies from normal images (B, 3, S, S) in [0, 1], cycling through them.
    -> images (n, 3, S, S), masks (n, S, S) float {0, 1}. Deterministic given `seed`."""
    if kind not in SYNTHESISERS:
        raise ValueError(f"unknown synthetic anomaly kind {kind!r} (use {', '.join(SYNTHETIC_KINDS)})")
    rng = np.random.default_rng(seed)
    fn = SYNTHESISERS[kind]
    src = images.cpu().numpy()
    outs, masks = [], []
    for i in range(n):
        img, m = fn(src[i % len(src)], rng)
        outs.append(np.clip(img, 0, 1).astype(np.float32))
        masks.append(m.astype(np.float32))
    return torch.from_numpy(np.stack(outs)), torch.from_numpy(np.stack(masks))


# --------------------------------------------------------------------------------------------
# Demo-dataset defects. Images: uint8 (S, S, 3) in [0, 255].
# --------------------------------------------------------------------------------------------
def blob_mask(size: int, rng: np.random.Generator, radius: float) -> np.ndarray:
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


def scratch_defect(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """1–2 thin dark or bright curved lines (quadratic Bézier curves)."""
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


def spot_defect(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """1–3 irregular blobs of an off colour, the texture faintly visible through them."""
    size = img.shape[0]
    m = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        m |= blob_mask(size, rng, rng.uniform(0.035, 0.08) * size)
    colours = np.array([(45, 35, 30), (210, 195, 70), (80, 90, 130), (235, 235, 225)], dtype=np.float32)
    colour = colours[int(rng.integers(len(colours)))]
    out = img.astype(np.float32)
    out[m] = 0.35 * out[m] + 0.65 * colour
    return out, m


def rotated_patch_defect(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A patch from elsewhere in the image pasted back rotated and slightly re-lit."""
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


def color_defect(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An irregular region whose hue is shifted (brightness kept)."""
    size = img.shape[0]
    m = blob_mask(size, rng, rng.uniform(0.08, 0.14) * size)
    shift = rng.normal(size=3)
    shift -= shift.mean()  # change hue, keep brightness
    shift *= rng.uniform(35, 55) / max(np.linalg.norm(shift), 1e-6)
    out = img.astype(np.float32)
    out[m] += shift.astype(np.float32)
    return out, m


DEMO_DEFECTS = {"scratch": scratch_defect, "spot": spot_defect, "cutpaste": rotated_patch_defect,
                "color": color_defect}
