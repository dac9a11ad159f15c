"""Finding the images (and masks) of a dataset on disk.

Supported layouts (image files: .png .jpg .jpeg .bmp .tif .tiff .webp, any case; hidden files skipped):

- ``mvtec``:   train/good/*, test/<defect>/*, masks ground_truth/<defect>/<stem>_mask.png
- ``mvtec3d``: train/good/rgb/*, test/<defect>/rgb/*, masks test/<defect>/gt/<stem>.png (RGB only)
- ``btad``:    train/ok/*, test/ok/*, test/ko/*, masks ground_truth/ko/<stem>.(png|bmp|...)
- ``visa``:    a split CSV with columns split,label,image,mask (an ``object`` column is optional).
               label is normal/anomaly; image/mask paths are relative to the CSV's base directory;
               mask is empty for normal rows. Accepted forms:
                 (a) ROOT/*.csv or ROOT/split_csv/*.csv, paths relative to ROOT (one object only);
                 (b) ROOT is one class folder of the original VisA tree (e.g. VisA/candle) and
                     VisA/split_csv/*.csv lists it in its ``object`` column; paths relative to VisA/.
               When several CSVs qualify, ``1cls.csv`` is used.
- ``folder``:  normal/*, abnormal/*, optional mask/ (or masks/) with <stem>.png or <stem>_mask.png,
               optional normal_test/. Without normal_test/, a deterministic 20% of normal/ (evenly
               spaced in sorted order) is held out as test-good images and the rest is train.

Masks are matched to images by file stem (``<stem>_mask`` or ``<stem>``, any image suffix). Every
problem raises a one-line `FastADError`: missing root, no images for the split, an anomalous test image
without its mask ("image without mask"), a mask whose image is missing ("mask without image").
Samples are sorted by path (natural order: 2.png before 10.png).
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fastad.errors import FastADError

LAYOUTS = ("mvtec", "mvtec3d", "btad", "visa", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "test")
HOLDOUT_FRACTION = 0.2

_NORMAL_LABELS = {"normal", "good", "ok", "0"}
_ANOMALY_LABELS = {"anomaly", "anomalous", "abnormal", "bad", "defect", "ko", "1"}
_VISA_COLUMNS = {"split", "label", "image", "mask"}


@dataclass(frozen=True)
class Sample:
    """One image of a dataset: label 0 normal / 1 anomalous, defect "good" for normal images."""

    path: str
    label: int
    defect: str
    mask_path: str | None = None


# ----------------------------------------------------------------------------- helpers


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _sorted_paths(paths) -> list[Path]:
    return sorted(paths, key=lambda p: _natural_key(str(p)))


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _images_in(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, naturally sorted ([] if it is not a directory)."""
    if not folder.is_dir():
        return []
    return _sorted_paths(p for p in folder.iterdir() if _is_image(p))


def _subdirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return _sorted_paths(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _require_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FastADError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise FastADError(f"{what} {path} is not a directory")
    return path


def _mask_stem(mask: Path) -> str:
    stem = mask.stem
    return stem[: -len("_mask")] if stem.endswith("_mask") else stem


def _mask_index(mask_dir: Path | None) -> dict[str, Path]:
    """Image stem -> mask file for every mask in `mask_dir` (<stem>_mask.* or <stem>.*)."""
    index: dict[str, Path] = {}
    for mask in _images_in(mask_dir) if mask_dir is not None else []:
        stem = _mask_stem(mask)
        if stem in index:
            raise FastADError(f"two masks for image stem '{stem}' in {mask_dir}: {index[stem].name} and {mask.name}")
        index[stem] = mask
    return index


def _pair_masks(
    image_dir: Path,
    label: int,
    defect: str,
    mask_dir: Path | None,
    need_masks: bool,
    expected: str,
) -> list[Sample]:
    """Samples for the images in `image_dir` with masks from `mask_dir` (matched by stem).

    Checks image-without-mask (when `need_masks` and label 1) and mask-without-image.
    `expected` names where a missing mask should be (for the error message).
    """
    images = _images_in(image_dir)
    index = _mask_index(mask_dir)
    stems = {p.stem for p in images}
    samples = []
    for image in images:
        mask = index.get(image.stem)
        if label == 1 and mask is None and need_masks:
            where = expected.replace("{stem}", image.stem)
            raise FastADError(f"image without mask: {image} has no mask (expected {where})")
        samples.append(Sample(str(image), label, defect, str(mask) if (mask is not None and label == 1) else None))
    for stem, mask in index.items():
        if stem not in stems:
            raise FastADError(f"mask without image: {mask} has no image named '{stem}.*' in {image_dir}")
    return samples


def _nonempty(samples: list[Sample], split: str, where: str) -> list[Sample]:
    if not samples:
        raise FastADError(f"no {split} images found in {where}")
    return samples


# ----------------------------------------------------------------------------- mvtec / mvtec3d / btad


def _mvtec(root: Path, split: str, require_masks: bool) -> list[Sample]:
    if split == "train":
        folder = root / "train" / "good"
        return _nonempty([Sample(str(p), 0, "good") for p in _images_in(folder)], split, folder)
    test, gt = root / "test", root / "ground_truth"
    _require_dir(test, "mvtec test folder")
    samples: list[Sample] = []
    for folder in _subdirs(test):
        defect = folder.name
        label = 0 if defect == "good" else 1
        mask_dir = gt / defect if (gt / defect).is_dir() else None
        samples += _pair_masks(
            folder, label, defect, mask_dir, require_masks, f"{gt / defect}/{{stem}}_mask.png"
        )
    for mask_dir in _subdirs(gt):
        if not (test / mask_dir.name).is_dir() and _images_in(mask_dir):
            first = _images_in(mask_dir)[0]
            raise FastADError(f"mask without image: {first} has no image folder {test / mask_dir.name}")
    return _nonempty(samples, split, test)


def _mvtec3d(root: Path, split: str, require_masks: bool) -> list[Sample]:
    if split == "train":
        folder = root / "train" / "good" / "rgb"
        return _nonempty([Sample(str(p), 0, "good") for p in _images_in(folder)], split, folder)
    test = _require_dir(root / "test", "mvtec3d test folder")
    samples: list[Sample] = []
    for folder in _subdirs(test):
        defect = folder.name
        label = 0 if defect == "good" else 1
        mask_dir = folder / "gt" if (folder / "gt").is_dir() else None
        samples += _pair_masks(
            folder / "rgb", label, defect, mask_dir, require_masks, f"{folder / 'gt'}/{{stem}}.png"
        )
    return _nonempty(samples, split, f"{test}/*/rgb")


def _btad(root: Path, split: str, require_masks: bool) -> list[Sample]:
    if split == "train":
        folder = root / "train" / "ok"
        return _nonempty([Sample(str(p), 0, "good") for p in _images_in(folder)], split, folder)
    test, gt = _require_dir(root / "test", "btad test folder"), root / "ground_truth"
    samples = [Sample(str(p), 0, "good") for p in _images_in(test / "ok")]
    mask_dir = gt / "ko" if (gt / "ko").is_dir() else None
    samples += _pair_masks(test / "ko", 1, "ko", mask_dir, require_masks, f"{gt / 'ko'}/{{stem}}.png")
    return _nonempty(samples, split, f"{test}/ok and {test}/ko")


# ----------------------------------------------------------------------------- visa


def _csv_header(path: Path) -> set[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return {c.strip().lower() for c in next(csv.reader(f), [])}
    except (OSError, UnicodeDecodeError, csv.Error):
        return set()


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [
                {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(f)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise FastADError(f"cannot read split CSV {path}: {err}") from None


def _pick_csv(folders: list[Path], need_object: bool) -> Path | None:
    """The split CSV among `folders`' *.csv files (1cls.csv preferred); None if there is none."""
    found = []
    for folder in folders:
        for path in sorted(folder.glob("*.csv")) if folder.is_dir() else []:
            header = _csv_header(path)
            if _VISA_COLUMNS <= header and (not need_object or "object" in header):
                found.append(path)
    if not found:
        return None
    preferred = [p for p in found if p.name == "1cls.csv"]
    if preferred:
        return preferred[0]
    if len(found) > 1:
        names = ", ".join(str(p) for p in found)
        raise FastADError(f"several split CSVs found ({names}): keep one or name it 1cls.csv")
    return found[0]


def _visa_source(root: Path) -> tuple[Path, Path, str | None] | None:
    """(csv, base dir of its paths, object to keep or None) for a VisA-style root, or None."""
    path = _pick_csv([root, root / "split_csv"], need_object=False)
    if path is not None:
        return path, root, None
    parent = root.parent
    path = _pick_csv([parent / "split_csv", parent], need_object=True)
    if path is not None and any(row.get("object") == root.name for row in _read_csv(path)):
        return path, parent, root.name
    return None


def _visa_label(value: str, path: Path, line: int) -> int:
    value = value.lower()
    if value in _NORMAL_LABELS:
        return 0
    if value in _ANOMALY_LABELS:
        return 1
    raise FastADError(f"split CSV {path} line {line}: unknown label '{value}' (expected normal or anomaly)")


def _visa(root: Path, split: str, require_masks: bool) -> list[Sample]:
    source = _visa_source(root)
    if source is None:
        raise FastADError(
            f"no split CSV with columns split,label,image,mask found in {root}, {root / 'split_csv'} "
            f"or {root.parent / 'split_csv'}"
        )
    path, base, obj = source
    rows = [(i + 2, row) for i, row in enumerate(_read_csv(path))]  # line numbers (header is line 1)
    if obj is not None:
        rows = [(line, row) for line, row in rows if row.get("object") == obj]
    else:
        objects = sorted({row.get("object", "") for _, row in rows} - {""})
        if len(objects) > 1:
            raise FastADError(
                f"split CSV {path} lists several objects ({', '.join(objects)}): "
                f"pass one class folder, e.g. {root / objects[0]}"
            )
    samples: list[Sample] = []
    listed_masks: set[Path] = set()
    inside = base.resolve()
    for line, row in rows:
        mask = row.get("mask", "")
        for listed in (row.get("image"), mask):
            if listed and (Path(listed).is_absolute() or "\0" in listed
                           or not (base / listed).resolve().is_relative_to(inside)):
                raise FastADError(f"split CSV {path} line {line} lists {listed!r}, outside {base} "
                                  "(paths must be relative and stay inside the dataset)")
        if mask:
            listed_masks.add((base / mask).resolve())
        if not row.get("image"):
            if mask:
                raise FastADError(
                    f"mask without image: split CSV {path} line {line} lists mask {base / mask} but no image"
                )
            continue
        if row.get("split", "").lower() != split:
            continue
        label = _visa_label(row.get("label", ""), path, line)
        image = base / row["image"]
        if not image.is_file():
            raise FastADError(f"split CSV {path} line {line} lists image {image}, which does not exist")
        mask_path = None
        if label == 1 and mask:
            if not (base / mask).is_file():
                raise FastADError(f"image without mask: {image} has mask {base / mask} in {path}, which does not exist")
            mask_path = str(base / mask)
        elif label == 1 and require_masks:
            raise FastADError(f"image without mask: {image} has no mask in split CSV {path} line {line}")
        samples.append(Sample(str(image), label, "good" if label == 0 else "anomaly", mask_path))
    # every mask file beside the listed ones must belong to a listed image
    for folder in sorted({m.parent for m in listed_masks}):
        for mask in _images_in(folder):
            if mask.resolve() not in listed_masks:
                raise FastADError(f"mask without image: {mask} is not listed in split CSV {path}")
    samples.sort(key=lambda s: _natural_key(s.path))
    return _nonempty(samples, split, f"split CSV {path}" + (f" (object {obj})" if obj else ""))


# ----------------------------------------------------------------------------- folder


def _holdout(images: list[Path]) -> tuple[list[Path], list[Path]]:
    """Split sorted normal images into (train, held-out test): every ~5th image, evenly spaced."""
    n = len(images)
    k = max(1, round(n * HOLDOUT_FRACTION)) if n >= 2 else 0
    held = {int((j + 0.5) * n / k) for j in range(k)}
    return [p for i, p in enumerate(images) if i not in held], [p for i, p in enumerate(images) if i in held]


def list_folder_samples(
    normal_dir: str | os.PathLike,
    abnormal_dir: str | os.PathLike | None = None,
    mask_dir: str | os.PathLike | None = None,
    split: str = "train",
    normal_test_dir: str | os.PathLike | None = None,
    require_masks: bool = True,
) -> list[Sample]:
    """Samples from plain folders of normal / abnormal images (see the module docstring).

    Train: normal_dir (minus the 20% hold-out when normal_test_dir is None).
    Test: normal_test_dir or the hold-out (label 0), then abnormal_dir (label 1, defect "abnormal"),
    masks from mask_dir by stem; with a mask_dir every abnormal image needs a mask.
    """
    _check_split(split)
    normal = _require_dir(normal_dir, "normal image folder")
    normal_images = _images_in(normal)
    if normal_test_dir is None:
        train_images, good_test = _holdout(normal_images)
    else:
        train_images = normal_images
        good_test = _images_in(_require_dir(normal_test_dir, "normal test image folder"))
    if split == "train":
        return _nonempty([Sample(str(p), 0, "good") for p in train_images], split, normal)
    samples = [Sample(str(p), 0, "good") for p in good_test]
    if abnormal_dir is not None:
        abnormal = _require_dir(abnormal_dir, "abnormal image folder")
        masks = _require_dir(mask_dir, "mask folder") if mask_dir is not None else None
        samples += _pair_masks(
            abnormal, 1, "abnormal", masks, require_masks and masks is not None, f"{masks}/{{stem}}.png"
        )
    where = " and ".join(str(p) for p in (normal_test_dir or f"held-out part of {normal}", abnormal_dir) if p)
    return _nonempty(samples, split, where)


def _folder(root: Path, split: str, require_masks: bool) -> list[Sample]:
    abnormal = root / "abnormal"
    mask = next((root / name for name in ("mask", "masks") if (root / name).is_dir()), None)
    normal_test = root / "normal_test"
    return list_folder_samples(
        root / "normal",
        abnormal if abnormal.is_dir() else None,
        mask,
        split,
        normal_test if normal_test.is_dir() else None,
        require_masks,
    )


# ----------------------------------------------------------------------------- public entry points


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise FastADError(f"unknown split '{split}': expected one of {', '.join(SPLITS)}")


def detect_layout(root: str | os.PathLike) -> str:
    """Name of the layout of dataset folder `root` (one of LAYOUTS). Raises FastADError if none fits."""
    root = _require_dir(root, "dataset folder")
    test_dirs = _subdirs(root / "test")
    if (root / "train" / "good" / "rgb").is_dir() or any((d / "rgb").is_dir() for d in test_dirs):
        return "mvtec3d"
    if (root / "train" / "good").is_dir() or (root / "test" / "good").is_dir():
        return "mvtec"
    if (root / "train" / "ok").is_dir() or (root / "test" / "ko").is_dir():
        return "btad"
    if _visa_source(root) is not None:
        return "visa"
    if (root / "normal").is_dir():
        return "folder"
    raise FastADError(
        f"cannot tell the dataset layout of {root}: expected train/good/ (mvtec), train/good/rgb/ (mvtec3d), "
        "train/ok/ (btad), a split CSV with columns split,label,image,mask (visa), or normal/ [+ abnormal/] (folder)"
    )


_READERS = {"mvtec": _mvtec, "mvtec3d": _mvtec3d, "btad": _btad, "visa": _visa, "folder": _folder}


def list_samples(
    root: str | os.PathLike,
    split: str,
    layout: str | None = None,
    require_masks: bool = True,
) -> list[Sample]:
    """All samples of `split` ("train" or "test") under `root`, sorted by path.

    `layout` is one of LAYOUTS, or None to detect it. With `require_masks=False` anomalous images
    without a mask are accepted (their mask_path is None).
    """
    _check_split(split)
    root = _require_dir(root, "dataset folder")
    if layout is None:
        layout = detect_layout(root)
    if layout not in _READERS:
        raise FastADError(f"unknown dataset layout '{layout}': expected one of {', '.join(LAYOUTS)}")
    return _READERS[layout](root, split, require_masks)


# ----------------------------------------------------------------------------- labelled anomalies

ANOMALY_MASK_DIRS = ("masks", "mask", "ground_truth")


def list_anomaly_samples(
    root: str | os.PathLike,
    labels: str | None = None,
    mask_dir: str | os.PathLike | None = None,
) -> tuple[list[Sample], str]:
    """Labelled anomalous images for anomaly-available training (ADTR+). -> (samples, labels).

    `root` holds the anomalous images directly; masks (<stem>.png or <stem>_mask.png, any image
    suffix) come from `mask_dir`, else from ROOT/masks, ROOT/mask or ROOT/ground_truth when present.
    `labels`: "pixel" (every image needs a mask), "image" (masks ignored) or None (pixel when every
    image has a mask, image when none has; a partial set is an error). Every sample has label 1.
    """
    if labels not in (None, "image", "pixel"):
        raise FastADError(f"anomaly labels must be 'image' or 'pixel', got {labels!r}")
    folder = _require_dir(root, "anomaly folder")
    if mask_dir is not None:
        masks = _require_dir(mask_dir, "anomaly mask folder")
    else:
        masks = next((folder / n for n in ANOMALY_MASK_DIRS if (folder / n).is_dir()), None)
    images = _images_in(folder)
    if not images:
        raise FastADError(f"no anomalous images found in {folder} (images must be directly inside it)")
    if labels == "image":
        return [Sample(str(p), 1, "anomaly") for p in images], "image"
    expected = f"{masks}/{{stem}}.png" if masks is not None else f"{folder}/masks/{{stem}}.png"
    samples = _pair_masks(folder, 1, "anomaly", masks, labels == "pixel", expected)
    with_mask = [s for s in samples if s.mask_path is not None]
    if labels is None and 0 < len(with_mask) < len(samples):
        missing = next(s for s in samples if s.mask_path is None)
        raise FastADError(f"image without mask: {missing.path} has no mask in {masks} while other anomalous images "
                          "have one (give every image a mask, or use --anomaly-labels image)")
    return samples, "pixel" if with_mask else "image"
