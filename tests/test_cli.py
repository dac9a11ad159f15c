"""Training, the run directory, the Python API and the `fastad` command, including bad input.

A tiny FOD config (d 32/64, one layer) keeps training to seconds; one test trains the default
model through the CLI. Every user mistake must end as exit status 2 with one `error:` line on
stderr, no traceback, and no output files.
"""
from __future__ import annotations

import json
from functools import partial
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import fastad
from fastad.cli import main
from fastad.errors import FastADError
from fastad.models.fod import FODConfig
from fastad.training.loop import train


train_fod = partial(train, model="fod")
TINY = FODConfig(d_models=(32, 64), n_heads=4, n_layers=1, epochs=1, batch_size=4)


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("FASTAD_COMPILE", "0")  # compile time would dominate these tiny runs


@pytest.fixture(scope="session")
def tiny_run(demo_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    return train_fod(demo_data, out, config=TINY, progress=False, compile_stats=False)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert needle.lower() in lines[0].lower(), lines[0]


# ---- training and the run directory -----------------------------------------------------------
def test_run_directory_contents(tiny_run):
    names = sorted(p.name for p in tiny_run.iterdir())
    assert names == ["checkpoint.json", "checkpoint.safetensors", "config.json", "model.safetensors"]
    conf = json.loads((tiny_run / "config.json").read_text())
    assert conf["model"] == "fod" and conf["config"]["d_models"] == [32, 64]
    assert conf["backbone"]["name"] == "efficientnet_lite0"
    assert conf["backbone"]["weights_source"].startswith("offline:")
    assert conf["training"]["num_train_images"] == 8 and conf["training"]["epochs_done"] == 1
    assert len(conf["training"]["history"]) == 1
    assert not list(tiny_run.glob(".*.tmp"))


def test_training_is_reproducible(demo_data, tiny_run, tmp_path):
    again = train_fod(demo_data, tmp_path / "again", config=TINY, progress=False, compile_stats=False)
    a, b = load_file(str(tiny_run / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_equals_uninterrupted(demo_data, tmp_path):
    cfg = FODConfig(**{**TINY.__dict__, "epochs": 2})
    full = train_fod(demo_data, tmp_path / "full", config=cfg, progress=False, compile_stats=False)
    part = train_fod(demo_data, tmp_path / "part", config=TINY, progress=False, compile_stats=False)
    part = train_fod(demo_data, part, epochs=2, resume=True, progress=False, compile_stats=False)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert json.loads((part / "config.json").read_text())["training"]["epochs_done"] == 2


def test_existing_run_is_not_overwritten(demo_data, tiny_run):
    before = (tiny_run / "model.safetensors").read_bytes()
    with pytest.raises(FastADError, match="already holds a run"):
        train_fod(demo_data, tiny_run, config=TINY, progress=False)
    assert (tiny_run / "model.safetensors").read_bytes() == before


def test_resume_refuses_other_config(demo_data, tiny_run):
    with pytest.raises(FastADError, match="different config"):
        train_fod(demo_data, tiny_run, backbone="resnet18", resume=True, progress=False)


# ---- Python API -------------------------------------------------------------------------------
def test_load_and_predict_inputs(tiny_run, demo_data):
    model = fastad.load(tiny_run, device="cpu")
    paths = sorted((demo_data / "test" / "scratch").glob("*.png"))
    res = model.predict([str(p) for p in paths])
    assert res.scores.shape == (2,) and res.anomaly_maps.shape == (2, 256, 256)
    assert res.scores.dtype == np.float32 and np.isfinite(res.anomaly_maps).all()
    assert np.allclose(res.scores, res.anomaly_maps.reshape(2, -1).max(1))
    pil = [Image.open(p) for p in paths]
    arrays = [np.asarray(im.convert("RGB")) for im in pil]
    assert np.allclose(model.predict(pil).scores, res.scores, atol=1e-5)
    assert np.allclose(model.predict(arrays).scores, res.scores, atol=1e-5)
    floats = np.stack([np.asarray(im.convert("RGB").resize((256, 256), Image.BILINEAR)) for im in pil])
    floats = floats.transpose(0, 3, 1, 2).astype(np.float32) / 255
    assert model.predict(floats).anomaly_maps.shape == (2, 256, 256)


def test_predict_rejects_non_finite_and_bad_shapes(tiny_run):
    model = fastad.load(tiny_run, device="cpu")
    bad = np.full((1, 3, 256, 256), 0.5, np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(FastADError, match="NaN or infinite"):
        model.predict(bad)
    with pytest.raises(FastADError, match="shape"):
        model.predict(np.zeros((1, 4, 64, 64), np.float32))


def test_predict_batch_independent(tiny_run, demo_data):
    """Scores do not depend on which other images share the batch (deviation 4)."""
    model = fastad.load(tiny_run, device="cpu")
    paths = [str(p) for p in sorted((demo_data / "test").rglob("*.png"))][:4]
    together = model.predict(paths).scores
    alone = np.array([model.predict([p]).scores[0] for p in paths])
    assert np.allclose(together, alone, rtol=1e-4, atol=1e-6)


# ---- the command line --------------------------------------------------------------------------
def test_cli_eval_report_and_overlays(capsys, tiny_run, demo_data, tmp_path):
    report, overlays = tmp_path / "r.json", tmp_path / "ov"
    code, out, err = run_cli(capsys, "eval", "--run", tiny_run, "--data", demo_data, "--report", report,
                             "--overlays", overlays, "--quiet", "--device", "cpu")
    assert code == 0, err
    assert "image AUROC" in out and "pixel AUROC" in out
    rep = json.loads(report.read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "per_defect"):
        assert key in rep
    assert set(rep["per_defect"]) == {"scratch", "spot", "cutpaste", "color"}
    assert len(list(overlays.glob("*.png"))) == 11


def test_cli_predict(capsys, tiny_run, demo_data, tmp_path):
    out_dir = tmp_path / "pred"
    code, out, err = run_cli(capsys, "predict", "--run", tiny_run, demo_data / "test" / "spot",
                             demo_data / "test" / "good" / "000.png", "--out", out_dir, "--device", "cpu")
    assert code == 0, err
    lines = (out_dir / "scores.csv").read_text().splitlines()
    assert lines[0] == "path,score,anomalous,regions,map" and len(lines) == 4
    assert len(list((out_dir / "maps").glob("*.png"))) == 3
    assert len(json.loads((out_dir / "scores.json").read_text())["images"]) == 3


def test_cli_train_defaults(capsys, demo_data, tmp_path):
    """The default model through the CLI (one epoch, small batch), then predict with it."""
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--model", "fod", "--data", demo_data, "--out", run,
                             "--epochs", "1", "--batch-size", "4", "--quiet", "--device", "cpu")
    assert code == 0, err
    conf = json.loads((run / "config.json").read_text())
    assert conf["config"]["d_models"] == [256, 512] and conf["config"]["n_layers"] == 3
    res = fastad.load(run, device="cpu").predict(str(demo_data / "test" / "good" / "000.png"))
    assert res.anomaly_maps.shape == (1, 256, 256)


def test_cli_train_authors_features(capsys, demo_data, tmp_path):
    """--no-hypercolumn trains on the authors' features (deviation 10 off); a run saved before the
    option existed (no key in config.json) loads that way too."""
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", demo_data, "--out", run, "--epochs", "1",
                           "--batch-size", "4", "--quiet", "--device", "cpu", "--no-hypercolumn")
    assert code == 0, err
    conf = json.loads((run / "config.json").read_text())
    assert conf["config"]["hypercolumn"] is False and conf["backbone"]["strides"] == [8, 16]
    image = str(demo_data / "test" / "good" / "000.png")
    before = fastad.load(run, device="cpu").predict(image).scores
    del conf["config"]["hypercolumn"]
    (run / "config.json").write_text(json.dumps(conf))
    assert np.array_equal(fastad.load(run, device="cpu").predict(image).scores, before)
    code, _, err = run_cli(capsys, "train", "--model", "adtr", "--data", demo_data, "--out", tmp_path / "adtr",
                           "--no-hypercolumn", "--quiet")
    assert_user_error(code, err, "option of --model fod")
    assert not (tmp_path / "adtr").exists()


# ---- bad input: one line, exit 2, nothing written ------------------------------------------------
def _copy_demo(demo_data: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(demo_data, dst)
    return dst


@pytest.mark.parametrize("case", ["missing", "empty", "not_a_dataset"])
def test_train_bad_data_dir(capsys, tmp_path, case):
    data = tmp_path / "data"
    if case != "missing":
        data.mkdir()
    if case == "not_a_dataset":
        (data / "notes.txt").write_text("hello")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", data, "--out", out, "--quiet")
    assert_user_error(code, err, "data" if case == "missing" else "")
    assert not out.exists()


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_train_bad_image(capsys, demo_data, tmp_path, damage):
    data = _copy_demo(demo_data, tmp_path / "data")
    victim = data / "train" / "good" / "003.png"
    raw = victim.read_bytes()
    victim.write_bytes(b"not an image at all" if damage == "corrupt" else raw[: len(raw) // 2])
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", data, "--out", out, "--quiet")
    assert_user_error(code, err, "003.png")
    assert not out.exists()


@pytest.mark.parametrize("case", ["mask_without_image", "image_without_mask"])
def test_eval_unpaired_masks(capsys, demo_data, tiny_run, tmp_path, case):
    data = _copy_demo(demo_data, tmp_path / "data")
    if case == "mask_without_image":
        (data / "test" / "spot" / "000.png").unlink()
    else:
        (data / "ground_truth" / "spot" / "000_mask.png").unlink()
    report = tmp_path / "report.json"
    code, _, err = run_cli(capsys, "eval", "--run", tiny_run, "--data", data, "--report", report, "--quiet")
    assert_user_error(code, err, "mask")
    assert not report.exists()


def test_eval_corrupt_test_image_writes_nothing(capsys, demo_data, tiny_run, tmp_path):
    data = _copy_demo(demo_data, tmp_path / "data")
    (data / "test" / "color" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    report, overlays = tmp_path / "report.json", tmp_path / "ov"
    code, _, err = run_cli(capsys, "eval", "--run", tiny_run, "--data", data, "--report", report,
                           "--overlays", overlays, "--quiet")
    assert_user_error(code, err, "001.png")
    assert not report.exists() and not overlays.exists()


def _clone_run(run: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(run, dst)
    return dst


def test_mismatched_checkpoint_config(capsys, demo_data, tiny_run, tmp_path):
    run = _clone_run(tiny_run, tmp_path / "run")
    conf = json.loads((run / "config.json").read_text())
    conf["config"]["d_models"] = [64, 64]
    (run / "config.json").write_text(json.dumps(conf))
    code, _, err = run_cli(capsys, "eval", "--run", run, "--data", demo_data, "--quiet")
    assert_user_error(code, err, "does not match")


def test_flipped_hypercolumn_in_config_is_refused(capsys, demo_data, tiny_run, tmp_path):
    run = _clone_run(tiny_run, tmp_path / "run")
    conf = json.loads((run / "config.json").read_text())
    conf["config"]["hypercolumn"] = not conf["config"]["hypercolumn"]
    (run / "config.json").write_text(json.dumps(conf))
    code, _, err = run_cli(capsys, "eval", "--run", run, "--data", demo_data, "--quiet")
    assert_user_error(code, err, "strides")


def test_mismatched_checkpoint_backbone(capsys, demo_data, tiny_run, tmp_path):
    run = _clone_run(tiny_run, tmp_path / "run")
    conf = json.loads((run / "config.json").read_text())
    conf["backbone"]["name"] = "mobilenetv3_large_100"
    (run / "config.json").write_text(json.dumps(conf))
    code, _, err = run_cli(capsys, "predict", "--run", run, demo_data / "test" / "good", "--out",
                           tmp_path / "pred", "--quiet")
    assert_user_error(code, err, "backbone")
    assert not (tmp_path / "pred").exists()


def test_tampered_backbone_weights_detected(capsys, demo_data, tiny_run, tmp_path):
    run = _clone_run(tiny_run, tmp_path / "run")
    state = load_file(str(run / "model.safetensors"))
    key = next(k for k in state if k.startswith("backbone.") and k.endswith("weight"))
    state[key] = state[key] + 0.01
    save_file(state, str(run / "model.safetensors"))
    code, _, err = run_cli(capsys, "eval", "--run", run, "--data", demo_data, "--quiet")
    assert_user_error(code, err, "sha256")  # the weights hash in config.json catches it first
    conf = json.loads((run / "config.json").read_text())
    del conf["files"]  # a run written before the hash: the backbone fingerprint still catches it
    (run / "config.json").write_text(json.dumps(conf))
    code, _, err = run_cli(capsys, "eval", "--run", run, "--data", demo_data, "--quiet")
    assert_user_error(code, err, "fingerprint")


@pytest.mark.parametrize("what", ["no_run", "not_a_run", "bad_weights_file"])
def test_bad_run_dir(capsys, demo_data, tiny_run, tmp_path, what):
    if what == "no_run":
        run = tmp_path / "nothing"
    elif what == "not_a_run":
        run = tmp_path / "empty"
        run.mkdir()
    else:
        run = _clone_run(tiny_run, tmp_path / "run")
        (run / "model.safetensors").write_bytes(b"\x00" * 100)
    code, _, err = run_cli(capsys, "eval", "--run", run, "--data", demo_data, "--quiet")
    assert_user_error(code, err, "run" if what != "bad_weights_file" else "model.safetensors")


def test_predict_bad_inputs(capsys, tiny_run, tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    for target, needle in ((tmp_path / "missing.png", "no such file"), (txt, "not an image")):
        code, _, err = run_cli(capsys, "predict", "--run", tiny_run, target, "--out", tmp_path / "o", "--quiet")
        assert_user_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_unknown_backbone_and_device(capsys, demo_data, tmp_path):
    code, _, err = run_cli(capsys, "train", "--data", demo_data, "--out", tmp_path / "r", "--backbone",
                           "efficientnet_lite9", "--quiet")
    assert_user_error(code, err, "unknown backbone")
    code, _, err = run_cli(capsys, "train", "--data", demo_data, "--out", tmp_path / "r", "--device",
                           "cuda:3" if not torch.cuda.is_available() else "tpu", "--quiet")
    assert_user_error(code, err, "device")
    assert not (tmp_path / "r").exists()


def test_entry_point_prints_one_line(tmp_path):
    """The installed console script, as a user runs it: no traceback, exit status 2."""
    exe = Path(sys.executable).with_name("fastad")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fastad.cli"]
    proc = subprocess.run(cmd + ["eval", "--run", str(tmp_path / "none"), "--data", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")


@pytest.mark.parametrize("backend", ["torch-lean", "triton"])
def test_kernel_backends_match_reference_scoring(tiny_run, demo_data, backend):
    """Scoring through fastad.kernels (lean torch path; Triton via the interpreter on CPU)
    equals the model's own ops. fp32 tolerance: different summation orders only."""
    if backend == "triton" and not (torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    paths = [str(p) for p in sorted((demo_data / "test" / "spot").glob("*.png"))]
    ref = fastad.load(tiny_run, device="cpu").predict(paths)
    fast = fastad.load(tiny_run, device="cpu", backend=backend).predict(paths)
    scale = float(np.abs(ref.anomaly_maps).max())
    assert np.abs(fast.anomaly_maps - ref.anomaly_maps).max() <= 1e-4 * scale
    assert np.allclose(fast.scores, ref.scores, rtol=1e-4, atol=1e-4 * scale)
