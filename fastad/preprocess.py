"""Preprocessing: decoding images (and dataset masks), resize and centre crop, any input to a
float batch in [0, 1], and the crop geometry that `postprocess.map_to_original` inverts.

    batch, sizes = prepare_batch(["a.png", pil_image, uint8_hwc, float_chw], resize, crop)
    # batch: float32 (B, 3, crop, crop) in [0, 1]; sizes: each input's own (H, W)

Every image becomes an 8-bit RGB `PIL.Image.Image`, whatever its file stores:

- grayscale (`1`, `L`), palette (`P`), CMYK, YCbCr, LAB, HSV: converted by PIL.
- alpha (`RGBA`, `LA`, `PA`, ...): the alpha channel is DROPPED; colour values are kept as stored,
  not composited onto a background (industrial images rarely use alpha for anything).
- more than 8 bits (`I;16*`, `I`, `F`, 16-bit RGB TIFF): rescaled, never clipped. Integers are divided
  by 2**d - 1 where d is the smallest of 8, 10, 12, 14, 16, ... bits that holds the image's maximum,
  so 12-bit camera data in a 16-bit file keeps its brightness and full-range 16-bit data maps
  65535 -> 255. Floats in [0, 1] are multiplied by 255; larger floats use the same rule. Negative
  values become 0.
- TIFF that PIL cannot read (float RGB, many samples, ...) is read with `tifffile`.

A missing, empty, corrupt or truncated file raises `FastADError("cannot read image FILE: reason")`.
Truncated files are caught because the whole image is decoded (`img.load()`); this module never sets
PIL's `ImageFile.LOAD_TRUNCATED_IMAGES`. An image whose header declares more pixels than
`PIL.Image.MAX_IMAGE_PIXELS` (PIL's default, 89,478,485; raise it for larger sensors) is refused
from the header, before any pixel memory is allocated (decompression bombs); a TIFF is read only
up to its first page.

Masks are read here too, not in fastad.data: they share the file checks with images and must be
resized and cropped by the same geometry as the image they belong to.

Geometry follows the FOD authors: `Resize((resize, resize))` (bilinear, antialiased) then
`CenterCrop(crop)`, as torchvision does on PIL images; masks use nearest-neighbour; float inputs
of another size are resized by torch with the same filter. The crop window starts at
`crop_offset(resize, crop)` on both axes. Tensors are float32 in [0, 1]; mean/std normalisation
happens inside the model (and inside the exported graph).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import FastADError

_TIFF_SUFFIXES = (".tif", ".tiff")
_FLOAT_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------- reading


def _array_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Rescale any numeric array to uint8 (see the module docstring for the rule)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        arr = np.clip(arr, 0.0, None)
        peak = float(arr.max()) if arr.size else 0.0
        if peak <= 1.0:
            return np.round(arr * 255.0).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer):
        arr = np.clip(arr.astype(np.float64), 0.0, None)
        peak = float(arr.max()) if arr.size else 0.0
    else:
        raise ValueError(f"unsupported pixel type {arr.dtype}")
    depth = 8
    while peak > 2.0**depth - 1:
        depth += 2
    return np.round(np.clip(arr * (255.0 / (2.0**depth - 1)), 0, 255)).astype(np.uint8)


def _array_to_rgb(arr: np.ndarray) -> Image.Image:
    """(H, W), (H, W, C) or (C, H, W) array of any numeric type -> RGB PIL image."""
    arr = np.asarray(arr)
    while arr.ndim > 3 and arr.shape[0] == 1:  # leading singleton pages/frames
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[-1] > 4 and arr.shape[0] <= 4:  # planar (C, H, W)
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    elif arr.ndim == 3 and arr.shape[-1] == 2:  # gray + alpha
        arr = np.stack([arr[..., 0]] * 3, axis=-1)
    elif arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3]
    else:
        raise ValueError(f"unsupported image array shape {tuple(arr.shape)}")
    return Image.fromarray(np.ascontiguousarray(_array_to_uint8(arr)), mode="RGB")


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (alpha dropped, high bit depths rescaled)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _array_to_rgb(np.array(img))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    return img.convert("RGB")  # RGBA/RGBa drop alpha; 1, L, CMYK, YCbCr, LAB, HSV convert


def _tiff_has_deep_samples(img: Image.Image) -> bool:
    """True for a TIFF whose samples have more than 8 bits but that PIL decoded as 8-bit RGB(A)."""
    tags = getattr(img, "tag_v2", None)
    if tags is None or img.mode not in ("RGB", "RGBA"):
        return False
    bits = tags.get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    return max(bits) > 8


# Pixels a file may declare per byte it holds: deflate peaks near 1,032:1 (x 8 for 1-bit images),
# LZW and fax codings of blank pages stay below ~40,000 pixels per byte; a header declaring more
# belongs to a truncated file or a bomb (fuzzing found a 132-byte TIFF decoded as 10 x 4,194,438).
MAX_PIXELS_PER_BYTE = 100_000
_SMALL_IMAGE_PIXELS = 1 << 20


def _check_pixels(what: str, n_bytes: int, width: int, height: int) -> None:
    """Refuse, from the header alone, an image declaring more pixels than
    PIL.Image.MAX_IMAGE_PIXELS, or far more than its `n_bytes` bytes can encode."""
    limit = Image.MAX_IMAGE_PIXELS
    pixels = int(width) * int(height)
    if limit and pixels > limit:
        raise FastADError(f"cannot read {what}: it declares {width} x {height} pixels, over the limit of "
                          f"{limit:,} (PIL.Image.MAX_IMAGE_PIXELS; a decompression bomb?)")
    if pixels > _SMALL_IMAGE_PIXELS + MAX_PIXELS_PER_BYTE * n_bytes:
        raise FastADError(f"cannot read {what}: it declares {width} x {height} pixels in only {n_bytes:,} bytes "
                          "(truncated, or a decompression bomb)")


# Bytes one pixel may decode to: 4 samples of 8 bytes (RGBA float64). A TIFF's samples-per-pixel
# tag is not bounded by its pixel count (fuzzing found 132 bytes declaring 10 x 33,793 pixels of
# 65,535 one-bit samples: 22 GB for tifffile to allocate).
MAX_DECODED_BYTES_PER_PIXEL = 32


def _check_decoded_bytes(what: str, n_bytes: int, width: int, height: int, decoded: int) -> None:
    """Refuse, from the header alone, an image whose decoded array would exceed 32 bytes for each
    pixel `_check_pixels` allows a file of `n_bytes` bytes."""
    allowed = _SMALL_IMAGE_PIXELS + MAX_PIXELS_PER_BYTE * n_bytes
    if Image.MAX_IMAGE_PIXELS:
        allowed = min(allowed, Image.MAX_IMAGE_PIXELS)
    if decoded > MAX_DECODED_BYTES_PER_PIXEL * allowed:
        raise FastADError(f"cannot read {what}: it declares {width} x {height} pixels decoding to {decoded:,} bytes "
                          f"in only {n_bytes:,} bytes (too many samples per pixel, or a decompression bomb)")


def _size(source: Path | bytes) -> int:
    return len(source) if isinstance(source, bytes) else source.stat().st_size


def _read_tiff_array(source: Path | bytes, what: str) -> np.ndarray:
    """The first page of a TIFF (a file or its bytes) through tifffile, its size checked from the
    header first."""
    import logging

    import tifffile

    logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # its complaints end as our one error line
    with tifffile.TiffFile(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as tif:
        if not tif.pages:
            raise ValueError("TIFF without pages")
        page = tif.pages[0]
        shape = tuple(page.shape)
        if len(shape) < 2:
            raise ValueError(f"unsupported TIFF page shape {shape}")
        planar = len(shape) == 3 and shape[0] <= 4 < shape[-1]
        height, width = shape[-2:] if planar else shape[:2]
        _check_pixels(what, _size(source), width, height)
        _check_decoded_bytes(what, _size(source), width, height, int(np.prod(shape)) * page.dtype.itemsize)
        return page.asarray()


def _read_tiff(source: Path | bytes, what: str) -> Image.Image:
    return _array_to_rgb(_read_tiff_array(source, what))


def _looks_like_tiff(source: Path | bytes) -> bool:
    if isinstance(source, bytes):
        head = source[:4]
    else:
        with open(source, "rb") as f:
            head = f.read(4)
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _open_checked(path: str | os.PathLike, kind: str = "image") -> Path:
    """Check that `path` is a non-empty file; return it as a Path."""
    path = Path(path)
    if not path.exists():
        raise FastADError(f"cannot read {kind} {path}: file does not exist")
    if path.is_dir():
        raise FastADError(f"cannot read {kind} {path}: it is a directory, not a file")
    if path.stat().st_size == 0:
        raise FastADError(f"cannot read {kind} {path}: file is empty")
    return path


def _reason(err: Exception) -> str:
    """An exception as one line of text."""
    return " ".join(str(err).split()) or type(err).__name__


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file fully and return it as 8-bit RGB (H, W, 3). Raises FastADError."""
    path = _open_checked(path)
    return _decode(path, f"image {path}", path.suffix.lower() in _TIFF_SUFFIXES)


def decode_image(data: bytes, what: str = "image") -> Image.Image:
    """The bytes of an image file (PNG, JPEG, BMP, TIFF, ... as stored on disk or sent over a
    network) -> 8-bit RGB, by the same rules as `load_image`. Raises FastADError naming `what`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FastADError(f"cannot read {what}: expected the bytes of an image file, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise FastADError(f"cannot read {what}: no bytes")
    return _decode(data, what, False)


def _decode(source: Path | bytes, what: str, is_tiff: bool) -> Image.Image:
    """A checked file path or an image file's bytes -> 8-bit RGB; FastADError("cannot read {what}: ...")."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            _check_pixels(what, _size(source), img.width, img.height)
            if (is_tiff or img.format == "TIFF") and _tiff_has_deep_samples(img):
                return _read_tiff(source, what)
            img.load()  # full decode: truncated or corrupt data fail here
            return _pil_to_rgb(img).copy()
    except FastADError:
        raise
    except Image.DecompressionBombError as bomb:  # PIL's own check, at twice the limit
        raise FastADError(f"cannot read {what}: {_reason(bomb)}") from None
    except Exception as pil_err:  # any decoder failure means the file is unreadable
        if is_tiff or _looks_like_tiff(source):
            try:
                return _read_tiff(source, what)
            except FastADError:
                raise
            except Exception:
                pass
        raise FastADError(f"cannot read {what}: {_reason(pil_err)}") from None


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a mask file as bool (H, W): nonzero = anomalous. Any mode (gray, RGB, 16-bit, palette)."""
    path = _open_checked(path, "mask")
    try:
        with Image.open(path) as img:
            _check_pixels(f"mask {path}", _size(path), img.width, img.height)
            img.load()
            if img.mode == "P":
                img = img.convert("RGBA")
            arr = np.array(img)
    except FastADError:
        raise
    except Exception as pil_err:
        if path.suffix.lower() not in _TIFF_SUFFIXES:
            raise FastADError(f"cannot read mask {path}: {_reason(pil_err)}") from None
        try:
            arr = np.squeeze(_read_tiff_array(path, f"mask {path}"))
        except FastADError:
            raise
        except Exception:
            raise FastADError(f"cannot read mask {path}: {_reason(pil_err)}") from None
    if arr.ndim == 3:
        channels = arr.shape[-1]
        if channels in (2, 4):  # drop alpha
            arr = arr[..., : channels - 1]
        arr = arr.any(axis=-1) if arr.dtype == np.bool_ else (arr != 0).any(axis=-1)
    if arr.ndim != 2:
        raise FastADError(f"cannot read mask {path}: unsupported mask shape {tuple(arr.shape)}")
    return arr != 0


# ----------------------------------------------------------------------------- geometry


def crop_offset(resize: int, crop: int) -> int:
    """Top (= left) edge of the centre crop window inside the resize x resize image."""
    return int(round((resize - crop) / 2.0))


def _check_sizes(resize: int, crop: int) -> None:
    if int(resize) < 1 or int(crop) < 1 or int(crop) > int(resize):
        raise FastADError(f"invalid preprocessing sizes resize={resize}, crop={crop}: need 1 <= crop <= resize")


def _resize_crop(img: Image.Image, resize: int, crop: int, resample: int) -> Image.Image:
    """torchvision `Resize((resize, resize))` + `CenterCrop(crop)` on a PIL image."""
    _check_sizes(resize, crop)
    img = img.resize((int(resize), int(resize)), resample)
    top = crop_offset(resize, crop)
    return img.crop((top, top, top + crop, top + crop))


def image_to_tensor(img: Image.Image, resize: int = 256, crop: int = 256,
                    resample: int = Image.BILINEAR) -> torch.Tensor:
    """RGB PIL image -> float32 (3, crop, crop) in [0, 1] (antialiased resize with `resample`,
    bilinear by default; centre crop)."""
    img = _resize_crop(_pil_to_rgb(img), resize, crop, resample)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def mask_to_tensor(mask: np.ndarray | Image.Image, resize: int = 256, crop: int = 256) -> torch.Tensor:
    """bool/numeric (H, W) mask or PIL mask -> float32 (1, crop, crop) in {0, 1} (nearest resize)."""
    if isinstance(mask, Image.Image):
        mask = np.array(mask.convert("L"))
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = (mask != 0).any(axis=-1)
    img = Image.fromarray((mask != 0).astype(np.uint8) * 255, mode="L")
    img = _resize_crop(img, resize, crop, Image.NEAREST)
    return torch.from_numpy(np.asarray(img) > 0).float().unsqueeze(0)


def _float_to_batch(x: torch.Tensor, resize: int, crop: int, what: str) -> torch.Tensor:
    """A float (3, H, W) / (B, 3, H, W) image in [0, 1] -> float32 (B, 3, crop, crop). crop² is used
    as is; another size is resized and centre-cropped like the PIL path (bilinear, antialiased)."""
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] == 0 or x.shape[3] == 0:
        raise FastADError(f"{what} has shape {tuple(x.shape)}: float images must be (3, H, W) or "
                          "(B, 3, H, W) RGB in [0, 1]")
    if x.shape[0] == 0:
        raise FastADError(f"{what} is an empty batch")
    x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise FastADError(f"{what} contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -_FLOAT_TOLERANCE or hi > 1.0 + _FLOAT_TOLERANCE:
        raise FastADError(
            f"{what} has values in [{lo:.4g}, {hi:.4g}]: float input must be in [0, 1] "
            "(not mean/std normalised, not 0..255)"
        )
    if x.shape[2] != crop or x.shape[3] != crop:
        x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False, antialias=True)
        top = crop_offset(resize, crop)
        x = x[:, :, top:top + crop, top:top + crop]
    return x.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- any input -> batch


def _items(images) -> list:
    """User input -> a list of single images (a float 4-D array or tensor stays one item: a batch)."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4:
        images = list(images)  # stack of H x W x C images
        if not images:
            raise FastADError("no images given: the uint8 array stack is empty")
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise FastADError("no images given: the list is empty")
        return list(images)
    return [images]


def _one_item(item, resize: int, crop: int, what: str) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """One path / PIL image / uint8 array / float (3, H, W) or (B, 3, H, W) ->
    ((n, 3, crop, crop), [(H, W)] * n), decoding a file once."""
    if isinstance(item, (str, os.PathLike)):
        item = load_image(item)
    if isinstance(item, Image.Image):
        return image_to_tensor(item, resize, crop).unsqueeze(0), [(item.height, item.width)]
    if isinstance(item, np.ndarray) and np.issubdtype(item.dtype, np.floating):
        item = torch.from_numpy(np.ascontiguousarray(item))
    if isinstance(item, torch.Tensor):
        if not item.is_floating_point():
            raise FastADError(
                f"{what} is a {item.dtype} tensor: tensors must be float in [0, 1] shaped (3, H, W) or "
                "(B, 3, H, W); pass uint8 images as numpy H x W x 3 arrays"
            )
        batch = _float_to_batch(item.detach().cpu(), resize, crop, what)
        return batch, [tuple(int(v) for v in item.shape[-2:])] * batch.shape[0]
    if isinstance(item, np.ndarray):
        if item.dtype == np.uint8:
            if item.ndim == 2 or (item.ndim == 3 and item.shape[-1] in (1, 3, 4)):
                if 0 in item.shape:
                    raise FastADError(f"{what} is an empty array of shape {item.shape}")
                return image_to_tensor(_array_to_rgb(item), resize, crop).unsqueeze(0), [item.shape[:2]]
            raise FastADError(f"{what} is a uint8 array of shape {item.shape}: expected H x W, H x W x 3 or H x W x 4")
        raise FastADError(f"{what} has unsupported dtype {item.dtype}: use uint8 images or float32 in [0, 1]")
    raise FastADError(
        f"{what} has unsupported type {type(item).__name__}: expected a path, PIL image, numpy array or tensor"
    )


def prepare_batch(images, resize: int = 256, crop: int = 256) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """User input -> (float32 batch (B, 3, crop, crop) in [0, 1], [(H, W) of each input image]).

    Accepts a path (str/Path), PIL image, uint8 numpy array (H x W, H x W x 3, H x W x 4, or a
    B x H x W x 3 stack), a float numpy array / torch tensor (3, H, W) or (B, 3, H, W) in [0, 1]
    of any size (crop x crop is used as is), or a list/tuple mixing these. Everything but
    crop-sized floats is resized to resize x resize and centre-cropped to crop x crop.
    Raises FastADError for empty input, wrong shape, non-finite or out-of-range values, bad types.
    """
    _check_sizes(resize, crop)
    items = _items(images)
    several = isinstance(images, (list, tuple)) or len(items) > 1
    parts, sizes = [], []
    for i, item in enumerate(items):
        batch, item_sizes = _one_item(item, resize, crop, f"image {i}" if several else "input")
        parts.append(batch)
        sizes.extend((int(h), int(w)) for h, w in item_sizes)
    return torch.cat(parts, dim=0), sizes


def prepare_images(images, resize: int = 256, crop: int = 256) -> torch.Tensor:
    """`prepare_batch` without the input sizes: user input -> float32 (B, 3, crop, crop) in [0, 1]."""
    return prepare_batch(images, resize, crop)[0]


__all__ = [
    "load_image",
    "decode_image",
    "load_mask",
    "crop_offset",
    "image_to_tensor",
    "mask_to_tensor",
    "prepare_batch",
    "prepare_images",
]
