"""`fastad train --epochs 0`: every family writes its untrained starting point — reference
features and statistics, the model as initialised — as a complete run that loads and predicts, so
that what training adds can be measured against it. Tiny configs (64 px) keep it to seconds."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fastad
from fastad import registry
from fastad.cli import build_parser, main
from fastad.models.adtr import ADTRConfig
from fastad.models.fod import FODConfig
from fastad.models.utad import UTADConfig
from fastad.run import load_model
from fastad.training.loop import train

TINY = {"fod": FODConfig(d_models=(32, 64), n_heads=4, n_layers=1, batch_size=4, resize=64, crop=64),
        "adtr": ADTRConfig(d_model=32, n_heads=4, n_encoder_layers=1, n_decoder_layers=1, ffn_dim=64,
                           batch_size=4, resize=64, crop=64, score_pool=4, topk=4),
        "utad": UTADConfig(resize=64, crop=64, size=32, ie_filters=(4, 4, 8, 8), ie_dec_filters=(8, 8, 4, 4),
                           info_hidden=8, latent_dim=8, critic_width=8, critic_scales=2, ex_dim=4, ex_res=1,
                           mlp_dim=16, batch_size=4)}
OPTIONS = {"fod": {"compile_stats": False}}


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("FASTAD_COMPILE", "0")


@pytest.fixture(scope="module")
def untrained_runs(demo_data, tmp_path_factory):
    """family -> its `--epochs 0` run on the demo data (trained once per module)."""
    root, runs = tmp_path_factory.mktemp("untrained"), {}

    def get(family):
        if family not in runs:
            run = root / family
            runs[family] = train(demo_data, run, model=family, config=TINY[family], epochs=0, progress=False,
                                 device="cpu", **OPTIONS.get(family, {}))
        return runs[family]
    return get


def test_every_family_has_a_tiny_config():
    assert set(TINY) == set(registry.FAMILIES)


@pytest.mark.parametrize("family", sorted(registry.FAMILIES))
def test_epochs_zero_writes_the_untrained_start(demo_data, untrained_runs, family):
    run = untrained_runs(family)
    conf = json.loads((run / "config.json").read_text())
    assert conf["model"] == family
    record = conf["training"]
    assert record.get("epochs_done", 0) == 0 and record["history"] == []
    assert all(s["epochs_done"] == 0 for s in record.get("stages", {}).values())
    assert conf["normal_scores"]["num_images"] == 8 and np.isfinite(conf["normal_scores"]["mean"])
    assert (run / "model.safetensors").exists() and not (run / "checkpoint.safetensors").exists()
    res = fastad.load(run, device="cpu").predict(str(demo_data / "test" / "good" / "000.png"))
    assert np.isfinite(res.anomaly_maps).all() and np.isfinite(res.scores).all()


def test_adtr_untrained_start_is_the_per_position_mean(demo_data, untrained_runs):
    """ADTR's zero-initialised output: before training f̂ is the per-position mean training feature,
    so the untrained start is the per-position-mean baseline."""
    from fastad.preprocess import prepare_images

    model, _ = load_model(untrained_runs("adtr"), device="cpu")
    images = prepare_images(sorted(str(p) for p in (demo_data / "train" / "good").glob("*.png")),
                            model.cfg.resize, model.cfg.crop)
    with torch.no_grad():
        tokens = model.tokens(images)
        recon = model.reconstruct(tokens)
    torch.testing.assert_close(recon, tokens.mean(0, keepdim=True).expand_as(recon), atol=1e-4, rtol=1e-4)


def test_cli_accepts_epochs_zero():
    assert build_parser().parse_args(["train", "--data", "d", "--out", "o", "--epochs", "0"]).epochs == 0


def test_negative_epochs_is_a_user_error(capsys, demo_data, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(demo_data), "--out", str(tmp_path / "r"), "--epochs=-1"])
    assert e.value.code == 2 and "non-negative" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_fod_options_parse_and_bad_values_are_user_errors(capsys, demo_data, tmp_path):
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--loss-queries", "64",
                                      "--inter-weight", "global"])
    assert (args.loss_queries, args.inter_weight) == (64, "global")
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(demo_data), "--out", str(tmp_path / "r"), "--loss-queries=-1"])
    assert e.value.code == 2 and "non-negative" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
