"""The sidecar JSON next to an exported .onnx / .engine: its name, format tag and reader.

Export writes it (fastad.export.onnx.build_sidecar), the runtime reads it; both import this
module, so running an exported file never imports the export code.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import FastADError

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
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT or "input" not in meta:
        raise FastADError(f"{path} is not a fastad sidecar (format {SIDECAR_FORMAT})")
    return meta
