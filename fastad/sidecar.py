"""The sidecar JSON next to an exported .onnx / .engine: its name, format tag and reader.

Export writes it (fastad.export.onnx.build_sidecar), the runtime reads it; both import this
module, so running an exported file never imports the export code.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import FastADError
from .utils import confined_file, read_verified

SIDECAR_FORMAT = "fastad-onnx/1"


def sidecar_path(artifact: str | os.PathLike) -> Path:
    """model.onnx -> model.onnx.json, model.engine -> model.engine.json."""
    return Path(str(artifact) + ".json")


def read_sidecar(artifact: str | os.PathLike) -> dict:
    """The sidecar JSON next to an .onnx / .engine file, validated enough to run it."""
    path = sidecar_path(artifact)
    if not path.is_file():
        raise FastADError(f"{artifact}: no sidecar {path.name} next to it (export writes one; "
                          "copy it along with the model)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FastADError(f"cannot read {path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT or not isinstance(meta.get("input"), dict):
        raise FastADError(f"{path} is not a fastad sidecar (format {SIDECAR_FORMAT})")
    size = {k: meta["input"].get(k) for k in ("resize", "crop")}
    if not all(type(v) is int and 1 <= v <= 1 << 15 for v in size.values()) or size["crop"] > size["resize"]:
        raise FastADError(f"{path}: input resize/crop must be integers with 1 <= crop <= resize, got {size}")
    thresholds = meta.get("thresholds")
    if thresholds is not None and not (isinstance(thresholds, dict) and all(
            thresholds.get(k) is None or type(thresholds[k]) in (int, float) for k in ("image", "pixel"))):
        raise FastADError(f"{path}: thresholds image/pixel must be numbers or null, got {thresholds!r}")
    if "file" in meta:
        confined_file(Path(artifact).parent, meta["file"], str(path))
    if not isinstance(meta.get("sha256"), (str, type(None))):
        raise FastADError(f"{path}: sha256 must be a hex string")
    return meta


def read_artifact(artifact: str | os.PathLike, meta: dict) -> bytes:
    """The bytes of an exported file, checked against the sha256 its sidecar records (exports
    older than the check carry one too); read once, so what is checked is what runs."""
    path = Path(artifact)
    return read_verified(path, meta.get("sha256"), str(sidecar_path(path)))
