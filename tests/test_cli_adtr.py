"""ADTR through the trainer, the run directory, the Python API and the `fastad` command, including
the anomaly-available modes and bad input (one `error:` line, exit 2, nothing written).

A tiny ADTR config (d 32, one encoder and one decoder layer) on the 64 px demo dataset keeps each
training to seconds.
"""
from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fastad
from fastad.run import load_model
from fastad.errors import FastADError
from fastad.models.adtr import ADTR, ADTRConfig
from fastad.training.loop import train

train_adtr = partial(train, model="adtr")

from .test_cli import assert_user_error, run_cli

TINY = ADTRConfig(d_model=32, n_heads=4, n_encoder_layers=1, n_decoder_layers=1, ffn_dim=64, epochs=1,
                  batch_size=4, anomaly_batch=2)


@pytest.fixture(scope="module")
def data(demo_data) -> Path:
    return demo_data


@pytest.fixture(scope="module")
def adtr_run(data, tmp_path_factory) -> Path:
    return train_adtr(data, tmp_path_factory.mktemp("adtr_runs") / "tiny", config=TINY, progress=False)


def anomaly_dir(data: Path, dst: Path, masks: bool = True, defect: str = "spot") -> Path:
    """A labelled-anomaly folder from one demo defect type: images + masks/<stem>_mask.png."""
    dst.mkdir(parents=True)
    for p in sorted((data / "test" / defect).glob("*.png")):
        shutil.copy(p, dst / p.name)
        if masks:
            (dst / "masks").mkdir(exist_ok=True)
            shutil.copy(data / "ground_truth" / defect / f"{p.stem}_mask.png", dst / "masks")
    return dst


# ---- run directory, API ------------------------------------------------------------------------
def test_run_directory_and_load(adtr_run, data):
    names = sorted(p.name for p in adtr_run.iterdir())
    assert names == ["checkpoint.json", "checkpoint.safetensors", "config.json", "model.safetensors"]
    conf = json.loads((adtr_run / "config.json").read_text())
    assert conf["model"] == "adtr" and conf["config"]["d_model"] == 32
    assert conf["backbone"]["weights_source"].startswith("offline:") and conf["backbone"]["fingerprint"]
    assert set(conf["normal_scores"]) == {"num_images", "mean", "std", "max", "p99"}
    assert any(k.startswith("backbone.") for k in load_file(str(adtr_run / "model.safetensors")))
    model, conf2 = load_model(adtr_run, device="cpu")
    assert isinstance(model, ADTR) and conf2 == conf
    assert model.cfg.resize == 256 and model.cfg.crop == 256
    res = fastad.load(adtr_run, device="cpu").predict(str(data / "test" / "spot" / "000.png"))
    assert res.scores.shape == (1,) and res.anomaly_maps.shape == (1, 256, 256)
    assert np.isfinite(res.anomaly_maps).all()


def test_predictor_matches_forward_and_kernels(adtr_run, data):
    paths = [str(p) for p in sorted((data / "test" / "scratch").glob("*.png"))]
    ref = fastad.load(adtr_run, device="cpu").predict(paths)
    fast = fastad.load(adtr_run, device="cpu", backend="torch-lean").predict(paths)
    assert np.allclose(fast.anomaly_maps, ref.anomaly_maps, rtol=1e-5, atol=1e-5)
    single = np.array([fastad.load(adtr_run, device="cpu").predict([p]).scores[0] for p in paths])
    assert np.allclose(single, ref.scores, rtol=1e-4, atol=1e-6)  # batch-independent


def test_reproducible_and_resume(data, adtr_run, tmp_path, monkeypatch):
    again = train_adtr(data, tmp_path / "again", config=TINY, progress=False)
    a, b = load_file(str(adtr_run / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A run interrupted after its first epoch, resumed, equals the uninterrupted run (the cosine
    # schedule is a function of the global step and the planned epochs).
    two = ADTRConfig(**{**TINY.__dict__, "epochs": 2})
    full = train_adtr(data, tmp_path / "full", config=two, progress=False)
    import fastad.training.loop as ta

    real_save = ta.save_checkpoint

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(ta, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_adtr(data, tmp_path / "part", config=two, progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "part" / "model.safetensors").exists()
    part = train_adtr(data, tmp_path / "part", resume=True, progress=False)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_refuses_other_family(data, adtr_run):
    with pytest.raises(FastADError, match="it is a adtr run"):
        train(data, adtr_run, model="fod", resume=True, progress=False)


# ---- anomaly-available modes --------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["synthetic", "pixel", "image", "image_no_masks"])
def test_anomaly_available_modes(data, tmp_path, mode):
    kw = {}
    if mode == "synthetic":
        kw["synthetic"] = "confetti"
    else:
        kw["anomalies"] = anomaly_dir(data, tmp_path / "anom", masks=mode != "image_no_masks")
        if mode == "image":
            kw["anomaly_labels"] = "image"
    run = train_adtr(data, tmp_path / "run", config=TINY, progress=False, **kw)
    conf = json.loads((run / "config.json").read_text())
    want = {"synthetic": None, "pixel": "pixel", "image": "image", "image_no_masks": "image"}[mode]
    assert conf["config"]["anomaly_labels"] == want
    assert conf["config"]["synthetic"] == kw.get("synthetic")
    hist = conf["training"]["history"][0]
    assert np.isfinite(hist["loss"]) and hist["anomalous"] != 0.0
    if mode == "synthetic":
        assert conf["training"]["num_synthetic_anomalies"] == 8
    else:
        assert conf["training"]["num_labelled_anomalies"] == 2


def test_cli_train_adtr_with_anomalies_then_eval_excluding(capsys, data, tmp_path):
    anom = anomaly_dir(data, tmp_path / "anom")
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--model", "adtr", "--data", data, "--out", run, "--epochs", "1",
                             "--batch-size", "4", "--anomalies", anom, "--anomaly-labels", "pixel",
                             "--synthetic", "cutpaste", "--quiet", "--device", "cpu")
    assert code == 0, err
    assert "trained ADTR" in out
    conf = json.loads((run / "config.json").read_text())
    assert conf["model"] == "adtr" and conf["config"]["d_model"] == ADTRConfig().d_model  # the CLI trains the defaults
    report = tmp_path / "r.json"
    code, out, err = run_cli(capsys, "eval", "--run", run, "--data", data, "--report", report,
                             "--exclude-defects", "spot", "--quiet", "--device", "cpu")
    assert code == 0, err
    rep = json.loads(report.read_text())
    assert set(rep["per_defect"]) == {"scratch", "cutpaste", "color"} and rep["excluded_defects"] == ["spot"]
    code, out, err = run_cli(capsys, "predict", "--run", run, data / "test" / "good", "--out", tmp_path / "pred",
                             "--device", "cpu")
    assert code == 0, err
    assert len((tmp_path / "pred" / "scores.csv").read_text().splitlines()) == 4


# ---- bad input -------------------------------------------------------------------------------------
def test_bad_anomaly_options(capsys, data, tmp_path):
    out = tmp_path / "run"
    base = ["train", "--data", data, "--out", out, "--quiet", "--epochs", "1"]
    empty = tmp_path / "empty"
    empty.mkdir()
    no_masks = anomaly_dir(data, tmp_path / "nomask", masks=False)
    partial = anomaly_dir(data, tmp_path / "partial")
    next((partial / "masks").iterdir()).unlink()
    cases = [
        (["--model", "adtr", "--anomalies", tmp_path / "missing"], "does not exist"),
        (["--model", "adtr", "--anomalies", empty], "no anomalous images"),
        (["--model", "adtr", "--anomalies", no_masks, "--anomaly-labels", "pixel"], "without mask"),
        (["--model", "adtr", "--anomalies", partial], "without mask"),
        (["--model", "adtr", "--anomaly-labels", "pixel"], "need --anomalies"),
        (["--model", "fod", "--synthetic", "perlin"], "option of --model adtr"),
        (["--model", "fod", "--anomalies", no_masks], "option of --model adtr"),
    ]
    for extra, needle in cases:
        code, _, err = run_cli(capsys, *base, *extra)
        assert_user_error(code, err, needle)
        assert not out.exists()


def test_empty_mask_with_pixel_labels(capsys, data, tmp_path):
    from PIL import Image

    anom = anomaly_dir(data, tmp_path / "anom")
    victim = next((anom / "masks").iterdir())
    Image.new("L", Image.open(victim).size, 0).save(victim)
    code, _, err = run_cli(capsys, "train", "--model", "adtr", "--data", data, "--out", tmp_path / "run",
                           "--anomalies", anom, "--quiet", "--epochs", "1")
    assert_user_error(code, err, "empty")
    assert not (tmp_path / "run").exists()


def test_eval_exclude_unknown_defect(capsys, data, adtr_run, tmp_path):
    code, _, err = run_cli(capsys, "eval", "--run", adtr_run, "--data", data, "--exclude-defects", "dent",
                           "--report", tmp_path / "r.json", "--quiet")
    assert_user_error(code, err, "no such defect")
    assert not (tmp_path / "r.json").exists()


def test_mismatched_adtr_checkpoint(capsys, data, adtr_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(adtr_run, run)
    conf = json.loads((run / "config.json").read_text())
    conf["config"]["d_model"] = 64
    (run / "config.json").write_text(json.dumps(conf))
    code, _, err = run_cli(capsys, "eval", "--run", run, "--data", data, "--quiet")
    assert_user_error(code, err, "does not match")
    conf["config"]["d_model"] = 32
    conf["config"]["synthetic"] = "stripes"
    (run / "config.json").write_text(json.dumps(conf))
    code, _, err = run_cli(capsys, "eval", "--run", run, "--data", data, "--quiet")
    assert_user_error(code, err, "invalid model config")
