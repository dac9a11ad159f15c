"""OpenVINO: `fastad export --format openvino` (fp32 IR; INT8 from onnxruntime's QDQ graph or NNCF)
and the `openvino` backend (fp32, bf16 precision hint), each against the torch reference on the
same inputs, and the IR's integrity check."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

from fastad.cli import main  # noqa: E402
from fastad.errors import FastADError  # noqa: E402
from fastad.export import export_openvino, read_sidecar  # noqa: E402
from fastad.preprocess import prepare_images  # noqa: E402
from fastad.runtime import Predictor  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tiny_run_128) -> Path:
    return tiny_run_128


@pytest.fixture(scope="module")
def ir_path(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ov") / "tiny.xml"
    export_openvino(run_dir, out)
    return out


@pytest.fixture(scope="module")
def reference(run_dir, demo_data):
    """The demo test images (normal and defective) through the fp32 torch reference."""
    x = prepare_images(sorted(str(p) for p in (demo_data / "test").rglob("*.png")), 128, 128).numpy()
    return x, *Predictor(run_dir, backend="torch", device="cpu").scores_and_maps(x)


def _max_delta(maps, ref_maps) -> float:
    return float(np.abs(maps - ref_maps).max() / (ref_maps.max() - ref_maps.min()))


def test_fp32_ir_matches_torch(ir_path, reference):
    x, ref_maps, ref_scores = reference
    p = Predictor(ir_path, device="cpu")
    assert p.backend == "openvino"
    maps, scores = p.scores_and_maps(x)
    assert maps.shape == ref_maps.shape and scores.shape == ref_scores.shape
    assert _max_delta(maps, ref_maps) <= 1e-4  # fp32: summation order only
    assert (np.argsort(scores) == np.argsort(ref_scores)).all()
    side = read_sidecar(ir_path)
    assert side["artifact"] == "openvino" and side["precision"] == "fp32"
    assert ir_path.with_suffix(".bin").is_file()


def test_bf16_hint_stays_close(ir_path, reference):
    import openvino as ov

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(FastADError, match="bf16"):
            Predictor(ir_path, device="cpu", precision="bf16")
        return
    x, ref_maps, _ = reference
    maps, scores = Predictor(ir_path, device="cpu", precision="bf16").scores_and_maps(x)
    assert np.isfinite(maps).all() and np.isfinite(scores).all()
    # bf16 everywhere, the statistics and the output map included (the CPU plugin ignores
    # fp32 markings under a bf16 hint): 0.093 of the range on this tiny model
    assert _max_delta(maps, ref_maps) <= 0.15


# quantizer -> (max |Δ map| / range, score correlation) bounds on this one-epoch tiny model.
# Linear layers only in int8 (quantising the backbone as well gave 0.88 of the range here).
# onnxruntime's QDQ graph converted: 0.036, the σ heads reading float input; NNCF: 0.135 (0.25
# with its default activation ranges and SmoothQuant).
INT8_BOUNDS = {"onnxruntime": (0.06, 0.98), "nncf": (0.2, 0.95)}


@pytest.mark.parametrize("quantizer", sorted(INT8_BOUNDS))
def test_int8_export_runs_close(run_dir, demo_data, reference, tmp_path, quantizer):
    if quantizer == "nncf":
        pytest.importorskip("nncf")
    out = tmp_path / "tiny-int8.xml"
    side = export_openvino(run_dir, out, calibration=demo_data / "train" / "good", int8=True, quantizer=quantizer)
    assert side["precision"] == "int8" and side["quantization"]["calibration_images"] > 0
    assert side["quantization"]["tool"].startswith(quantizer)
    x, ref_maps, ref_scores = reference
    maps, scores = Predictor(out, device="cpu").scores_and_maps(x)
    assert np.isfinite(maps).all() and np.isfinite(scores).all()
    max_delta, min_corr = INT8_BOUNDS[quantizer]
    assert _max_delta(maps, ref_maps) <= max_delta
    assert np.corrcoef(scores, ref_scores)[0, 1] >= min_corr


def test_cli_export_and_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "m.xml"
    assert main(["export", "--run", str(run_dir), "--format", "openvino", "--out", str(out)]) == 0
    assert json.loads(Path(str(out) + ".json").read_text())["file"] == "m.xml"
    for argv, needle in [
        (["--out", str(tmp_path / "m.onnx")], "must end in .xml"),
        (["--out", str(tmp_path / "n.xml"), "--fp16"], "--fp16 does not apply"),
        (["--out", str(tmp_path / "n.xml"), "--quantizer", "nncf"], "--quantizer applies to --format openvino --int8"),
    ]:
        capsys.readouterr()
        assert main(["export", "--run", str(run_dir), "--format", "openvino", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, err
    assert not (tmp_path / "n.xml").exists()
    with pytest.raises(FastADError, match="backend openvino"):
        Predictor(out, backend="onnx", device="cpu")


def test_ir_integrity(ir_path, tmp_path):
    """The sidecar's sha256 of the graph and of the weights are checked on the bytes OpenVINO
    compiles; a changed, missing or misnamed file is one FastADError line."""
    import shutil

    def copy(name: str) -> Path:
        out = tmp_path / name / "m.xml"
        out.parent.mkdir()
        for src, dst in ((ir_path, out), (ir_path.with_suffix(".bin"), out.with_suffix(".bin"))):
            shutil.copy(src, dst)
        side = json.loads(Path(str(ir_path) + ".json").read_text())
        side["file"], side["openvino"]["weights"] = "m.xml", "m.bin"
        Path(str(out) + ".json").write_text(json.dumps(side))
        return out

    Predictor(copy("ok"), device="cpu", warmup=False)
    graph = copy("graph")
    graph.write_text(graph.read_text().replace("<net ", "<net  ", 1))
    weights = copy("weights")
    data = bytearray(weights.with_suffix(".bin").read_bytes())
    data[len(data) // 2] ^= 1
    weights.with_suffix(".bin").write_bytes(bytes(data))
    missing = copy("missing")
    missing.with_suffix(".bin").unlink()
    escaping = copy("escaping")
    side = json.loads(Path(str(escaping) + ".json").read_text())
    side["openvino"]["weights"] = "../ok/m.bin"
    Path(str(escaping) + ".json").write_text(json.dumps(side))
    for path, needle in ((graph, "does not match the sha256"), (weights, "m.bin does not match the sha256"),
                         (missing, "has no m.bin"), (escaping, "only a file name")):
        with pytest.raises(FastADError) as e:
            Predictor(path, device="cpu", warmup=False)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.xfail(strict=True, reason="known: with FOD's inter weight `global` (session 12) NNCF's accuracy "
                   "control leaves the held-out ranking at 0.964 (bound 0.99) even with 16 restore rounds; "
                   "not investigated (docs/deployment.md)")
def test_nncf_accuracy_control(run_dir, demo_data, tmp_path):
    """With held-out normal images, NNCF quantises under accuracy control: the held-out scores'
    ranking against the fp32 model's may drop by MAX_RANK_DROP at most."""
    pytest.importorskip("nncf")
    import openvino as ov

    from fastad.export.onnx import export_onnx
    from fastad.export.openvino import MAX_RANK_DROP, openvino_runner, quantize_nncf
    from fastad.export.quantize import int8_check, normal_images

    calibration, held_out = normal_images(run_dir, demo_data / "train" / "good", 128, 128, limit=4)
    # The tiny run's four held-out normal images score within 0.2 % of each other, so one
    # int8 rounding swaps their ranks; the defect images spread the scores so that the ranking
    # the accuracy control keeps is a real one (the mechanism, not the data, is under test).
    defects = [normal_images(run_dir, demo_data / "test" / d, 128, 128, limit=2, held_out=1)[0]
               for d in ("color", "scratch", "spot")]
    held_out = np.concatenate([held_out, *defects])
    onnx_path = tmp_path / "fp32.onnx"
    export_onnx(run_dir, onnx_path, check=False)
    fp32 = ov.convert_model(str(onnx_path))
    model, record = quantize_nncf(fp32.clone(), calibration, held_out)
    assert record["accuracy_control"]["max_drop"] == MAX_RANK_DROP
    check = int8_check(openvino_runner(fp32), openvino_runner(model), held_out)
    assert check["score_rank_correlation"] >= 1 - MAX_RANK_DROP
