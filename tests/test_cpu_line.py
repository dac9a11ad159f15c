"""CPU production lines (issue 19): every reduced-precision backend against the fp32 torch reference
on a tiny run, and `fastad bench`'s CPU-line fields (FLOPs, the machine's matrix-product rate,
test-set AUROC)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fastad.cli import main
from fastad.errors import FastADError
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


def test_bench_cpu_line_fields(run_dir, demo_data, int8_onnx, tmp_path, capsys):
    """One `fastad bench` over the CPU-line backends: each record names its precision and carries
    FLOPs, GFLOP/s, its fraction of the matrix-product rate measured in the same run, and the
    test-set AUROC and parity; the given int8 file serves onnx:int8 (none is exported)."""
    j, md = tmp_path / "b.json", tmp_path / "b.md"
    argv = ["bench", "--run", str(run_dir), "--backend", "torch,onnx:int8", "--onnx", str(int8_onnx),
            "--batch", "2", "--rounds", "1", "--matmul-size", "128", "--threads", "1", "--data", str(demo_data),
            "--test-set", "--device", "cpu", "--json", str(j), "--md", str(md)]
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads(j.read_text())
    assert result["threads"] == 1 and result["matmul"]["size"] == 128
    assert result["matmul"]["fp32_gflops"] > 0 and result["matmul"]["bf16_gflops"] > 0
    assert result["flops_per_image"] > 1e8  # the tiny model at 128²: 0.2 GFLOP
    n_test = len(list((demo_data / "test").rglob("*.png")))
    by_name = {r["backend"]: r for r in result["records"]}
    assert set(by_name) == {"torch", "onnx:int8"}
    torch_rec, int8_rec = by_name["torch"], by_name["onnx:int8"]
    assert (torch_rec["precision"], torch_rec["matmul_rate_ref"]) == ("fp32", "fp32")
    assert (int8_rec["precision"], int8_rec["matmul_rate_ref"]) == ("int8", "bf16")
    for r in result["records"]:
        assert r["gflops"] == pytest.approx(r["flops_per_image"] * r["throughput_img_s"] / 1e9)
        rate = result["matmul"][f"{r['matmul_rate_ref']}_gflops"]
        assert r["fraction_of_matmul_rate"] == pytest.approx(r["gflops"] / rate)
        assert r["test_images"] == n_test and 0.0 <= r["test_auroc"] <= 1.0
    assert torch_rec["test_max_rel_diff_map"] == 0.0 and 0 < int8_rec["test_max_rel_diff_map"] <= 0.06
    assert "GFLOP per image" in md.read_text() and "onnx:int8" in md.read_text()
    for bad, needle in ((["--backend", "onnx:bf16"], "onnx runs at fp32, fp16, int8"),
                        (["--backend", "openvx"], "unknown backend"),
                        (["--test-set"], "--test-set needs --data")):
        capsys.readouterr()
        assert main(["bench", "--run", str(run_dir), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, err


def test_torch_bf16_stays_close(run_dir, reference):
    """torch:bf16 (a run directory's weights and activations in bf16, statistics fp32)."""
    x, ref_maps, ref_scores = reference
    maps, scores = Predictor(run_dir, backend="torch", device="cpu", precision="bf16").scores_and_maps(x[:4])
    assert np.isfinite(maps).all() and np.isfinite(scores).all()
    # bf16's 8-bit mantissa through the backbone and transformers: 0.099 of the range on this tiny model
    assert _max_delta(maps, ref_maps[:4]) <= 0.15


def test_backend_names():
    from fastad.benchmark import backend_label, parse_backend

    assert parse_backend("onnx") == ("onnx", "fp32") and parse_backend("torch:bf16") == ("torch", "bf16")
    assert parse_backend("openvino:int8+bf16") == ("openvino", "int8+bf16")
    assert backend_label("onnx", "fp32") == "onnx" and backend_label("onnx", "int8") == "onnx:int8"
    with pytest.raises(FastADError, match="torch runs at fp32, fp16, bf16"):
        parse_backend("torch:int8")


def test_int8_check_on_held_out_images(run_dir, demo_data, int8_onnx):
    """The export's int8 check: normal images left out of the calibration, the int8 graph against
    the fp32 model on them (here the torch reference stands for the fp32 graph)."""
    from fastad.export.quantize import int8_check, normal_images, onnx_runner

    calibration, held_out = normal_images(run_dir, demo_data / "train" / "good", 128, 128, limit=4)
    assert len(calibration) == 4 and len(held_out) == 4
    assert not any((held_out[i] == calibration[j]).all() for i in range(4) for j in range(4))
    reference = Predictor(run_dir, backend="torch", device="cpu").scores_and_maps
    check = int8_check(reference, onnx_runner(int8_onnx), held_out)
    assert check["validation_images"] == 4 and check["max_rel_diff_map"] <= 0.06
    assert -1.0 <= check["score_rank_correlation"] <= 1.0
    assert read_sidecar(int8_onnx)["quantization"]["check"] == {"validation_images": 0}  # all 8 calibrate
