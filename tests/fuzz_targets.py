"""Fuzz targets for fastad's readers of untrusted files, shared by atheris and the corpus replay.

Each target takes bytes and feeds them to one reader; the contract is that nothing but a
`FastADError` escapes (anything else is a crash the fuzzer reports). The same functions replay
the committed corpus in `make test` (tests/test_fuzz_corpus.py).

    python -m tests.fuzz_targets TARGET [atheris/libFuzzer options]      # fuzz, e.g.
    nice -n 5 python -m tests.fuzz_targets image tests/fuzz_corpus/image -max_total_time=300

TARGET: image (any bytes as png/jpg/bmp/tif, decoded as an image and as a mask), layout
(directory trees with odd names and contents: layout detection, listing, mask pairing, folder
layout), config (config.json of a run directory), sidecar (the .onnx.json sidecar),
safetensors (model.safetensors headers and data). Reproduce a crash: the same command with the
crash file as the only argument.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("FASTAD_COMPILE", "0")

from fastad.errors import FastADError  # noqa: E402

TARGETS = ("image", "layout", "config", "sidecar", "safetensors")
CORPUS = Path(__file__).parent / "fuzz_corpus"
_WORK = Path(tempfile.mkdtemp(prefix="fastad-fuzz-"))
atexit.register(shutil.rmtree, _WORK, True)
_IMAGE_SUFFIXES = (".png", ".jpg", ".bmp", ".tif", ".tiff", ".jpeg")


def _png_bytes(size: int = 8, mode: str = "RGB") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 128, np.uint8)).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------- image
def fuzz_image(data: bytes) -> None:
    from fastad.preprocess import load_image, load_mask, prepare_batch

    if not data:
        return
    suffix = _IMAGE_SUFFIXES[data[0] % len(_IMAGE_SUFFIXES)]
    path = _WORK / f"img{suffix}"
    path.write_bytes(data[1:])
    for reader in (load_image, load_mask):
        try:
            reader(path)
        except FastADError:
            pass
    try:
        prepare_batch([str(path)], 32, 32)
    except FastADError:
        pass


# ------------------------------------------------------------------------------------ layout
_NAME_PARTS = ["train", "test", "good", "ground_truth", "defect", "crack", "rgb", "gt", "ok", "ko",
               "normal", "anomaly", "images", "masks", "Data", "Images", "Masks", "Anomaly", "Normal",
               "split_csv", "1cls.csv", "000", "001", "000_mask", "a b", "é", "x.png", "y.PNG", ".hidden",
               "..png", "z.jpg", "w.tif", "0", "-", " ", "ü.bmp", "name.with.dots.png", "noext"]
_CSV_HEAD = "object,split,label,image,mask\n"


def _tree_from_bytes(data: bytes, root: Path) -> None:
    """A small directory tree from `data`: each 4-byte record adds one path of up to 3 parts,
    a file (valid PNG, garbage, empty, or a VisA-style CSV) or a folder."""
    root.mkdir(parents=True)
    png = _png_bytes()
    for i in range(0, min(len(data), 4 * 40) - 3, 4):
        a, b, c, kind = data[i:i + 4]
        depth = 1 + kind % 3
        parts = [_NAME_PARTS[x % len(_NAME_PARTS)] for x in (a, b, c)[:depth]]
        if kind & 0x80 and depth > 1:
            parts[-1] = parts[-1] + f"_{a % 7}.png"
        path = root.joinpath(*parts)
        try:
            if (kind >> 3) % 5 == 0:
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() and path.is_dir():
                continue
            content = (kind >> 3) % 5
            if content == 1:
                path.write_bytes(png)
            elif content == 2:
                path.write_bytes(bytes(data[i:i + 16]))
            elif content == 3:
                rows = [f"{parts[0]},{'train' if a & 1 else 'test'},{'normal' if b & 1 else 'anomaly'},"
                        f"{'/'.join(parts)},{'' if c & 1 else '../' + '/'.join(parts)}"]
                path.write_text(_CSV_HEAD + "\n".join(rows) + "\n")
            else:
                path.write_bytes(b"")
        except OSError:
            continue  # a name clash between a file and a folder: skip that record


def fuzz_layout(data: bytes) -> None:
    from fastad.data.layouts import detect_layout, list_anomaly_samples, list_samples

    root = _WORK / "tree"
    shutil.rmtree(root, ignore_errors=True)
    _tree_from_bytes(data, root)
    layouts = (None, "mvtec", "mvtec3d", "btad", "visa", "folder")
    layout = layouts[data[-1] % len(layouts)] if data else None
    try:
        detect_layout(root)
    except FastADError:
        pass
    for split in ("train", "test"):
        try:
            list_samples(root, split, layout=layout)
        except FastADError:
            pass
    try:
        list_anomaly_samples(root)
    except FastADError:
        pass


# ---------------------------------------------------------------------------- run directory
_RUN: Path | None = None


def tiny_run() -> Path:
    """A loadable run directory of an untrained tiny FOD model (random backbone), made once."""
    global _RUN
    if _RUN is not None:
        return _RUN
    import torch

    from fastad import registry
    from fastad.backbones import FeatureExtractor
    from fastad.models.fod import FODConfig
    from fastad.run import write_run

    torch.manual_seed(0)
    family = registry.get("fod")
    cfg = FODConfig(d_models=(32, 64), n_heads=4, n_layers=1, epochs=1, batch_size=4, resize=64, crop=64)
    backbone = FeatureExtractor(cfg.backbone, cfg.backbone_strides(), weights="none")
    model = family.build(cfg, backbone)
    out = _WORK / "run"
    write_run(out, "fod", model, {"epochs_done": 0}, {"num_images": 1, "mean": 0.0, "std": 1.0, "max": 1.0,
                                                       "p99": 1.0})
    _RUN = out
    return out


def _mutate_json(value, data: bytes, pos: list[int]):
    """`value` with leaves replaced / keys dropped as the next bytes of `data` say."""
    def byte() -> int:
        pos[0] += 1
        return data[pos[0] - 1] if pos[0] - 1 < len(data) else 0

    odd = [None, -1, 0, 1, 2 ** 63, -2 ** 70, 1e308, float("nan"), "", "../x", "/etc/passwd", [], {}, [1, 2],
           {"a": 1}, True, "x" * 300, 0.5, [64, 64], "model.safetensors", "..", "\x00"]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            b = byte()
            if b % 11 == 0:
                continue  # dropped key
            out[k] = _mutate_json(v, data, pos)
        if byte() % 13 == 0:
            out["unknown_" + str(byte())] = odd[byte() % len(odd)]
        return out
    if isinstance(value, list):
        return [_mutate_json(v, data, pos) for v in value][: max(0, len(value) - (byte() % 3 == 0))]
    b = byte()
    return odd[b % len(odd)] if b % 4 == 0 else value


def _json_input(valid: dict, data: bytes) -> bytes:
    """Either the raw bytes (first byte odd) or a structured mutation of `valid`."""
    if not data or data[0] % 2:
        return data[1:]
    return json.dumps(_mutate_json(valid, data[1:], [0])).encode()


def fuzz_config(data: bytes) -> None:
    from fastad.run import load_model

    base = tiny_run()
    run = _WORK / "run_config"
    if not run.exists():
        shutil.copytree(base, run)
    valid = json.loads((base / "config.json").read_text())
    (run / "config.json").write_bytes(_json_input(valid, data))
    try:
        load_model(run, device="cpu")
    except FastADError:
        pass


def fuzz_safetensors(data: bytes) -> None:
    """model.safetensors bytes: raw, or a valid file with its header / data bytes mutated. The
    config's sha256 is left out (an old run) so the parser itself is reached."""
    from fastad.run import load_model

    base = tiny_run()
    run = _WORK / "run_st"
    if not run.exists():
        shutil.copytree(base, run)
        conf = json.loads((run / "config.json").read_text())
        del conf["files"]
        (run / "config.json").write_text(json.dumps(conf))
    valid = (base / "model.safetensors").read_bytes()
    if not data:
        return
    if data[0] % 3 == 0:
        body = data[1:]
    else:  # overwrite a few bytes of the valid file (header first, where the parser decides)
        body = bytearray(valid)
        header_len = int.from_bytes(valid[:8], "little") + 8
        for i in range(1, len(data) - 2, 3):
            at = int.from_bytes(data[i:i + 2], "little") % (header_len if data[0] % 3 == 1 else len(body))
            body[at] = data[i + 2]
        body = bytes(body)
    (run / "model.safetensors").write_bytes(body)
    try:
        load_model(run, device="cpu")
    except FastADError:
        pass


# ---------------------------------------------------------------------------------- sidecar
_VALID_SIDECAR = {
    "format": "fastad-onnx/1", "file": "m.onnx", "sha256": None, "precision": "fp32", "model": "fod",
    "input": {"name": "images", "resize": 64, "crop": 64}, "thresholds": {"image": 1.0, "pixel": 1.0},
}


def fuzz_sidecar(data: bytes) -> None:
    from fastad.runtime import _meta_from_sidecar
    from fastad.sidecar import read_artifact

    model = _WORK / "m.onnx"
    model.write_bytes(b"not an onnx graph")
    side = dict(_VALID_SIDECAR, sha256=None)
    (_WORK / "m.onnx.json").write_bytes(_json_input(side, data))
    try:
        meta = _meta_from_sidecar(model)
        read_artifact(model, meta["sidecar"])
        int(meta["resize"]), int(meta["crop"])
    except FastADError:
        pass


def seeds(target: str) -> dict[str, bytes]:
    """Starting inputs for a target: valid files of each kind, so mutation starts from the
    formats' structure rather than from nothing."""
    import io

    from PIL import Image

    out: dict[str, bytes] = {}
    if target == "image":
        rgb = np.arange(12 * 10 * 3, dtype=np.uint8).reshape(12, 10, 3)
        for i, (fmt, mode) in enumerate([("PNG", "RGB"), ("PNG", "L"), ("PNG", "RGBA"), ("JPEG", "RGB"),
                                         ("BMP", "RGB"), ("TIFF", "RGB"), ("PNG", "I;16"), ("TIFF", "I;16"),
                                         ("PNG", "P"), ("PNG", "1")]):
            buf = io.BytesIO()
            img = Image.fromarray(rgb)
            img = img.convert("L").convert(mode) if mode in ("I;16",) else img.convert(mode)
            img.save(buf, format=fmt)
            suffix = {"PNG": 0, "JPEG": 1, "BMP": 2, "TIFF": 3}[fmt]
            out[f"seed_{i}_{fmt.lower()}_{mode.replace(';', '')}"] = bytes([suffix]) + buf.getvalue()
    elif target == "layout":
        out["seed_mvtec"] = bytes([0, 2, 10, 0x0A, 1, 3, 10, 0x8A, 1, 4, 10, 0x8A, 3, 4, 19, 0x8A, 255])
        out["seed_folder"] = bytes([14, 15, 0, 0x89, 17, 18, 0, 0x89, 255])
        out["seed_visa"] = bytes([19, 20, 0, 0x18, 0, 0, 0, 0x1A, 4])
    elif target in ("config", "sidecar"):
        out["seed_valid"] = bytes([0]) + bytes([1]) * 400  # the valid file, unchanged
        out["seed_mutated"] = bytes([0]) + bytes((7 * i + 3) % 256 for i in range(400))
        out["seed_raw"] = bytes([1]) + b'{"format": "fastad-onnx/1", "input": {"resize": 64, "crop": 64}}'
    elif target == "safetensors":
        out["seed_header"] = bytes([1, 0, 0, 0x7B, 3, 0, 0x22])
        out["seed_data"] = bytes([2, 0, 0x10, 0xFF])
        out["seed_raw"] = bytes([0]) + b"\x80\x04\x95pickle"
    return out


FUZZERS = {"image": fuzz_image, "layout": fuzz_layout, "config": fuzz_config, "sidecar": fuzz_sidecar,
           "safetensors": fuzz_safetensors}


def main(argv: list[str]) -> None:
    import atheris

    if len(argv) < 2 or argv[1] not in FUZZERS:
        sys.exit(f"usage: python -m tests.fuzz_targets {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = FUZZERS[argv[1]]
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.WARNING)
    with atheris.instrument_imports(include=["fastad"]):  # coverage feedback from fastad's code
        import fastad.data.layouts  # noqa: F401
        import fastad.preprocess  # noqa: F401
        import fastad.run  # noqa: F401
        import fastad.runtime  # noqa: F401
        import fastad.sidecar  # noqa: F401
    corpus = CORPUS / argv[1]
    corpus.mkdir(parents=True, exist_ok=True)
    for name, data in seeds(argv[1]).items():
        if not (corpus / name).exists():
            (corpus / name).write_bytes(data)
    if argv[1] in ("config", "safetensors"):
        tiny_run()
    atheris.Setup([argv[0]] + argv[2:], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
