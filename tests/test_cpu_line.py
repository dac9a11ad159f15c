"""CPU production lines (issue 19): every reduced-precision backend against the fp32 torch reference
on a tiny run, and `fastad bench`'s CPU-line fields (FLOPs, the machine's matrix-product rate,
test-set AUROC)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fastad.cli import main
from fastad.export import export_onnx, read_sidecar
from fastad.preprocess import prepare_images
from fastad.runtime import Predictor


@pytest.fixture(scope="module")
def run_dir(tiny_run_128) -> Path:
    return tiny_run_128


@pytest.fixture(scope="module")
def reference(run_dir, demo_data):
    """The demo test images (normal and defective) through the fp32 torch reference."""
    x = prepare_images(sorted(str(p) for p in (demo_data / "test").rglob("*.png")), 128, 128).numpy()
    return x, *Predictor(run_dir, backend="torch", device="cpu").scores_and_maps(x)


@pytest.fixture(scope="module")
def int8_onnx(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "tiny-int8.onnx"
    export_onnx(run_dir, out, int8=True, check=False)
    return out


def _max_delta(maps, ref_maps) -> float:
    """max |Δ map| as a fraction of the reference map's range."""
    return float(np.abs(maps - ref_maps).max() / (ref_maps.max() - ref_maps.min()))


def test_int8_onnx_matches_torch(int8_onnx, reference):
    x, ref_maps, ref_scores = reference
    side = read_sidecar(int8_onnx)
    assert side["precision"] == "int8" and side["quantization"]["calibration_images"] == 8
    assert side["quantization"]["int8_layers"] > 0
    p = Predictor(int8_onnx, device="cpu")
    maps, scores = p.scores_and_maps(x)
    # Linear layers in int8 (σ heads and their input float): 0.036 of the range on this one-epoch model.
    assert _max_delta(maps, ref_maps) <= 0.06
    assert np.corrcoef(scores, ref_scores)[0, 1] >= 0.98


def test_int8_cli_errors(run_dir, demo_data, tmp_path, capsys):
    for argv, needle in [
        (["--format", "engine", "--out", str(tmp_path / "m.engine"), "--int8"], "apply to --format onnx and openvino"),
        (["--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--calibration", str(demo_data)], "add --int8"),
        (["--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--int8", "--fp16"], "exclude each other"),
        (["--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--int8", "--calibration", str(tmp_path / "no")],
         "not a directory"),
    ]:
        capsys.readouterr()
        assert main(["export", "--run", str(run_dir), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, err
    assert not (tmp_path / "m.onnx").exists()
