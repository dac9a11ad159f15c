"""UTAD: shapes, each loss, a stage-1 overfit check, PM parity with the plain torch formula, the
run directory / API / CLI, ONNX export, and bad input (one `error:` line, exit status 2).

Tiny configs (32² internal, a few filters) keep everything to seconds; the real-data check is
behind `-m slow`.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import fastad
from fastad.run import load_model
from fastad.backbones import FeatureExtractor

from .test_cli import assert_user_error, run_cli
from fastad.data import make_demo_dataset
from fastad.errors import FastADError
from fastad.models.utad import (UTAD, IECritics, IENet, UTADConfig, derangement, kl_standard_normal, map_score,
                                pair_bce, parse_score, sample_code, stage1_critic_loss, stage1_losses,
                                stage2_critic_loss, stage2_losses)
from fastad.training.loop import train

train_utad = partial(train, model="utad")

TINY = UTADConfig(resize=64, crop=64, size=32, ie_filters=(4, 4, 8, 8), ie_dec_filters=(8, 8, 4, 4), info_hidden=8,
                  latent_dim=8, critic_width=8, critic_scales=2, ex_dim=4, ex_res=1, mlp_dim=16,
                  w_self=1.0, w_gan_ex=1.0,
                  epochs1=2, epochs2=2, batch_size=4, batch_size2=4)
BOTTLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mvtec_ad" / "bottle"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny convolutions: on the shared 2-core machine two intra-op threads made steps up to 25×
    slower than one (see UTADTask in fastad/models/utad.py); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pm_net():
    return FeatureExtractor(TINY.pm_backbone, TINY.pm_strides)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("utad_demo") / "data", n_train=8, n_test_good=3,
                             n_test_defect=2, size=64)


@pytest.fixture(scope="module")
def tiny_run(demo_data, tmp_path_factory) -> Path:
    return train_utad(demo_data, tmp_path_factory.mktemp("utad_runs") / "tiny", config=TINY, progress=False)


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------
def test_fresh_expert_net_returns_its_bases(pm_net):
    torch.manual_seed(0)
    model = UTAD(TINY, pm_net).eval()
    x, imp = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        recon, naive = model.expert(x, imp)
    torch.testing.assert_close(recon, imp)
    torch.testing.assert_close(naive, x)


def test_shapes(pm_net):
    torch.manual_seed(0)
    model = UTAD(TINY, pm_net).eval()
    x = torch.rand(3, 3, 64, 64)
    assert model.ie.encode(model.to_internal(x)).shape == (3, 32, 2, 2)  # 4·8 channels, 32 / 16
    out = model.ie.outputs(model.to_internal(x))
    assert out.local.shape == (3, 32, 1, 1) and out.info.shape == (3, 32) and out.mu.shape == out.logvar.shape == (3, 8)
    with torch.no_grad():
        amap, score = model(x)
        ex = model.explain(x)
    assert amap.shape == (3, 64, 64) and score.shape == (3,)
    for k in ("image", "impression", "reconstruction", "naive_impression"):
        assert ex[k].shape == (3, 3, 32, 32), k
        assert 0 <= float(ex[k].min()) and float(ex[k].max()) <= 1, k
    for k in ("map_recon", "map_impression", "anomaly_map"):
        assert ex[k].shape == (3, 64, 64), k
    torch.testing.assert_close(ex["anomaly_map"], amap)
    torch.testing.assert_close(score, map_score(amap, TINY.score))


def test_gpu_schedule_is_the_released_configuration():
    """The release: inceptionCAE.Model(n_filters=128) at 256², IE-Net/configs/mvtec.yaml,
    Expert-Net/configs/mvtec_ad.yaml."""
    cfg = UTADConfig.gpu()
    cfg.validate()
    ie = IENet(cfg)
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        out = ie.outputs(x)
        h = ie.encode(x)
    assert h.shape == (1, 512, 8, 8) and out.impression.shape == x.shape and out.local.shape == (1, 512, 4, 4)
    assert out.mu.shape == (1, 128)
    # filters 32/32/64/128 (encoder) and 128/64/64/32 (decoder), as channel counts of the blocks
    assert [b.b1[0].out_channels for b in ie.enc] == [32, 32, 64, 128]
    assert [b.b1[0].out_channels for b in ie.dec] == [128, 64, 64, 32]
    assert [b.b5[0].in_channels for b in ie.dec] == [512, 512, 256, 256]
    conv, bn, act = ie.enc[0].b5
    assert conv.bias is None and conv.kernel_size == (5, 5) and bn.eps == 1e-3 and act.negative_slope == 0.1
    assert ie.out.kernel_size == (1, 1) and ie.out.bias is None
    assert (cfg.w_rec, cfg.w_kl, cfg.w_mi_local, cfg.w_mi_global, cfg.w_gan_img) == (100, 0.1, 1.5, 0.5, 0.1)
    assert (cfg.w_recon_x, cfg.w_detail, cfg.w_content, cfg.w_gan_ex) == (10, 1, 1, 1)
    assert cfg.optimizer1 == "sgd" and cfg.batch_size == 128 and cfg.epochs1 == 400 and cfg.lr1_drops == (0.5, 0.875)
    assert cfg.ex_dim == 64 and cfg.mlp_dim == 256 and cfg.batch_size2 == 1 and cfg.betas2 == (0.5, 0.999)


@pytest.mark.parametrize("bad", [dict(ie_pools=(2, 2, 3, 2)), dict(size=48), dict(ie_filters=(4, 4)),
                                 dict(ie_ups=(2, 2, 2, 4)), dict(critic_scales=3), dict(optimizer1="lbfgs"),
                                 dict(score="top:0.9"), dict(score="median")])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        UTADConfig(**{**TINY.to_dict(), **bad}).validate()
    assert UTADConfig.from_dict(TINY.to_dict()) == TINY
    assert UTADConfig.from_dict(json.loads(json.dumps(UTADConfig.gpu().to_dict()))) == UTADConfig.gpu()


# --------------------------------------------------------------------------------------------
# Losses and the image score
# --------------------------------------------------------------------------------------------
def test_kl_and_derangement():
    assert float(kl_standard_normal(torch.zeros(4, 8), torch.zeros(4, 8))) == 0.0
    mu, lv = torch.randn(4, 8), torch.randn(4, 8)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, (0.5 * lv).exp()),
                                            torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
    torch.testing.assert_close(kl_standard_normal(mu, lv), ref)
    for n in (2, 3, 8):
        perm = derangement(n, torch.Generator().manual_seed(n))
        assert sorted(perm.tolist()) == list(range(n)) and (perm != torch.arange(n)).all()


def test_pair_bce_rewards_a_critic_that_tells_pairs_apart():
    real, fake = torch.ones(4, 2), -torch.ones(4, 2)

    def oracle(pairs):  # large logit for real pairs, small for shuffled ones
        return 50 * pairs[:, :1]

    def coin(pairs):
        return torch.zeros(pairs.shape[0], 1)

    assert float(pair_bce(oracle, real, fake)) < 1e-4
    assert float(pair_bce(coin, real, fake)) == pytest.approx(2 * np.log(2), rel=1e-5)


def test_map_score_variants():
    amap = torch.zeros(2, 10, 10)
    amap[0, 0, 0] = 5.0
    amap[1] += 1.0
    amap[1, :2] = 3.0  # 20 pixels at 3 on a level of 1
    torch.testing.assert_close(map_score(amap, "max"), torch.tensor([5.0, 3.0]))
    torch.testing.assert_close(map_score(amap, "top:0.1"), torch.tensor([0.5, 3.0]))
    torch.testing.assert_close(map_score(amap, "peak:0.1"), torch.tensor([0.5, 2.0]))
    assert parse_score("peak:0.01") == ("peak", 0.01)


def _step_losses(model, x, imp, cfg):
    gen = torch.Generator().manual_seed(0)
    out = model.ie.outputs(x)
    z, perm = sample_code(out, gen), derangement(x.shape[0], gen)
    c1 = stage1_critic_loss(model.ie_critics, x, out, z, perm, cfg)
    l1 = stage1_losses(model.ie_critics, x, out, z, perm, cfg)
    t = model.expert.translate(x, imp)
    c2 = stage2_critic_loss(model.expert_critics, x, imp, t)
    l2 = stage2_losses(model.expert, model.expert_critics, x, imp, t, cfg)
    return c1, l1, c2, l2


def _grads(module):
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_stage_losses_finite_and_reach_their_parameters(pm_net):
    torch.manual_seed(0)
    model = UTAD(TINY, pm_net)
    x, imp = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    with torch.no_grad():  # the decoders' last conv starts at zero (residual form); wake it up
        for dec in (model.expert.dec_img, model.expert.dec_imp):
            dec.up[-1].weight.normal_(0, 0.01)
    c1, l1, c2, l2 = _step_losses(model, x, imp, TINY)
    assert all(torch.isfinite(v) for v in (c1, c2, *l1, *l2))
    assert all(float(v.detach()) > 0 for v in (c1, c2, *l1[1:], *l2[1:])), (l1, l2)
    expected = TINY.w_rec * l1.rec + TINY.w_kl * l1.kl + TINY.w_mi_local * l1.mi_local + \
        TINY.w_mi_global * l1.mi_global + TINY.w_gan_img * l1.gan
    torch.testing.assert_close(l1.total.detach(), expected)
    # the critics' losses reach only the critics (their inputs are detached)
    (c1 + c2).backward()
    assert _grads(model.ie_critics.image) and _grads(model.ie_critics.local) and _grads(model.ie_critics.glob)
    assert _grads(model.expert_critics.image) and _grads(model.expert_critics.impression)
    assert not _grads(model.ie) and not _grads(model.expert)
    model.zero_grad(set_to_none=True)
    l1.total.backward()
    for part in (model.ie.enc, model.ie.dec, model.ie.info, model.ie.mean, model.ie.log_var):
        assert _grads(part)
    assert not _grads(model.expert)
    l2.total.backward()
    for part in (model.expert.content_imp, model.expert.content_img, model.expert.detail_img,
                 model.expert.detail_imp, model.expert.dec_img, model.expert.dec_imp):
        assert _grads(part)
    # a zero weight drops its term (and its compute)
    from dataclasses import replace

    bare = replace(TINY, w_gan_img=0.0, w_mi_local=0.0, w_mi_global=0.0, w_gan_ex=0.0, w_content=0.0, w_self=0.0)
    c1, l1, _, l2 = _step_losses(model, x, imp, bare)
    assert float(c1) == 0 and float(l1.gan) == float(l1.mi_local) == 0 and float(l2.gan) == float(l2.content) == 0


def test_stage1_overfits_a_few_images():
    torch.manual_seed(0)
    cfg = UTADConfig(resize=32, crop=32, size=32, ie_filters=(4, 8, 8, 16), ie_dec_filters=(16, 8, 8, 4),
                     latent_dim=8, critic_scales=1, batch_size=4, w_gan_img=0.0, w_mi_local=0.0, w_mi_global=0.0)
    ie, critics = IENet(cfg), IECritics(cfg)
    # Four smooth images (blurry is what an impression is allowed to be).
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    x = torch.stack([torch.stack([(yy * a + xx * (1 - a)), (1 - yy) * a, xx * a]) for a in (0.2, 0.4, 0.6, 0.8)])
    opt = torch.optim.Adam(ie.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    first = None
    for _ in range(100):
        out = ie.outputs(x)
        losses = stage1_losses(critics, x, out, sample_code(out, gen), derangement(4, gen), cfg)
        losses.total.backward()
        opt.step()
        opt.zero_grad()
        first = float(losses.rec) if first is None else first
    ie.eval()
    with torch.no_grad():
        final = float(torch.nn.functional.mse_loss(ie(x), x))
    assert final < 0.1 * first and final < 2e-3, (first, final)


# --------------------------------------------------------------------------------------------
# Perceptual measurement
# --------------------------------------------------------------------------------------------
def pm_reference(feats_a: list[torch.Tensor], feats_b: list[torch.Tensor], size: tuple[int, int],
                 scale: torch.Tensor) -> torch.Tensor:
    """PM of one pair with plain torch ops: feature maps [(B, C_l, h_l, w_l)] ->
    Σ_l upsample(mean_c (a − b)² + 1 − cos(a, b)) / scale_l -> (B, H, W)."""
    total = 0
    for i, (a, b) in enumerate(zip(feats_a, feats_b)):
        d = ((a - b) ** 2).mean(1) + 1 - F.cosine_similarity(a, b, dim=1, eps=1e-8)
        total = total + F.interpolate((d / scale[i])[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
    return total


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_pm_matches_plain_torch(pm_net, impl):
    torch.manual_seed(0)
    model = UTAD(TINY, pm_net, impl=impl).eval()
    model.fit_pm(torch.rand(2, 3) + 0.5)
    x = torch.rand(1 if impl == "triton" else 2, 3, 32, 32)  # the interpreter is slow
    with torch.no_grad():
        st = model.stages(x)
        terms = model.pm_terms(st)
        ref = [pm_reference(pm_net(st[a]), pm_net(st[b]), (64, 64), model.pm_scale[p])
               for p, (a, b) in enumerate((("image", "reconstruction"), ("naive_impression", "impression")))]
    tol = dict(atol=1e-5, rtol=1e-4)  # fp32, fused channel sums vs torch's cosine_similarity
    torch.testing.assert_close(terms[:, 0], ref[0], **tol)
    torch.testing.assert_close(terms[:, 1], ref[1], **tol)
    # level means computed the same way are what fit_pm normalises by
    means = model.level_means(torch.rand(2, 3, 64, 64))
    assert means.shape == (2, 3) and (means > 0).all()


# --------------------------------------------------------------------------------------------
# Run directory, API, CLI
# --------------------------------------------------------------------------------------------
def test_run_directory_and_api(tiny_run, demo_data):
    conf = json.loads((tiny_run / "config.json").read_text())
    assert conf["model"] == "utad" and conf["config"]["size"] == 32
    assert conf["backbone"]["name"] == "efficientnet_lite0" and conf["backbone"]["strides"] == [4, 8, 16]
    assert set(conf["normal_scores"]) == {"num_images", "mean", "std", "max", "p99"}
    assert [h["stage"] for h in conf["training"]["history"]] == ["stage1"] * 2 + ["stage2"] * 2
    assert (np.array(conf["training"]["pm_scale"]) > 0).all()
    model, conf2 = load_model(tiny_run, device="cpu")
    assert isinstance(model, UTAD) and conf2 == conf
    p = fastad.load(tiny_run)
    imgs = sorted((demo_data / "test").rglob("*.png"))[:3]
    res = p.predict([str(i) for i in imgs])
    assert res.scores.shape == (3,) and res.anomaly_maps.shape == (3, 64, 64)
    # batch independence (BatchNorm in eval mode, no cross-sample op)
    one = p.predict(str(imgs[1]))
    np.testing.assert_allclose(one.scores, res.scores[1:2], rtol=1e-5, atol=1e-6)
    # in-sample training scores are what default_thresholds reads
    assert conf["normal_scores"]["max"] >= conf["normal_scores"]["mean"] > 0


def test_resume_equals_uninterrupted(demo_data, tiny_run, tmp_path):
    out = tmp_path / "r"
    from dataclasses import replace

    threads = torch.get_num_threads()
    train_utad(demo_data, out, config=replace(TINY, epochs2=1), progress=False)
    assert torch.get_num_threads() == threads  # the trainer's CPU thread limit does not leak
    train_utad(demo_data, out, epochs2=2, resume=True, progress=False)
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model.safetensors")), load_file(str(tiny_run / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_cli_train_eval_predict(capsys, demo_data, tiny_run, tmp_path):
    out = tmp_path / "cli"
    code, stdout, err = run_cli(capsys, "train", "--model", "utad", "--data", demo_data, "--out", out,
                                "--epochs", "1", "--quiet")
    assert code == 0, err
    assert "trained UTAD" in stdout and json.loads((out / "config.json").read_text())["config"]["size"] == 128
    inter = tmp_path / "inter"
    code, stdout, err = run_cli(capsys, "eval", "--run", tiny_run, "--data", demo_data, "--report",
                                tmp_path / "rep.json", "--intermediates", inter, "--quiet")
    assert code == 0, err
    assert "image AUROC" in stdout
    strips = sorted(inter.glob("*.png"))
    assert len(strips) == 3 + 4 * 2
    from PIL import Image

    assert Image.open(strips[0]).size == (7 * 32, 32)
    code, stdout, err = run_cli(capsys, "predict", "--run", tiny_run, demo_data / "test" / "good",
                                "--out", tmp_path / "pred", "--quiet")
    assert code == 0, err
    assert (tmp_path / "pred" / "scores.csv").is_file()


def test_onnx_export_matches_torch(tiny_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from fastad.export import export_onnx
    from fastad.runtime import Predictor

    export_onnx(tiny_run, tmp_path / "u.onnx", check_batch=2)
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    m1, s1 = Predictor(tiny_run, backend="torch", warmup=False).scores_and_maps(x)
    m2, s2 = Predictor(tmp_path / "u.onnx", backend="onnx", warmup=False).scores_and_maps(x)
    np.testing.assert_allclose(m2, m1, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(s2, s1, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
def test_pm_weights_missing_or_not_vgg(capsys, demo_data, tmp_path):
    out = tmp_path / "x"
    code, _, err = run_cli(capsys, "train", "--model", "utad", "--data", demo_data, "--out", out,
                           "--pm-weights", tmp_path / "nope.pth")
    assert_user_error(code, err, "nope.pth")
    bad = tmp_path / "not_vgg.safetensors"
    save_file({"features.0.weight": torch.zeros(8, 3, 3, 3)}, str(bad))
    code, _, err = run_cli(capsys, "train", "--model", "utad", "--data", demo_data, "--out", out,
                           "--pm-weights", bad)
    assert_user_error(code, err, "not_vgg")
    code, _, err = run_cli(capsys, "train", "--model", "utad", "--data", demo_data, "--out", out,
                           "--pm-backbone", "vgg19")
    assert_user_error(code, err, "--pm-weights")
    assert not out.exists()


@pytest.mark.parametrize("argv, needle", [
    (["--model", "fod", "--schedule", "gpu"], "option of --model adtr, utad, not of --model fod"),
    (["--model", "utad", "--backbone", "resnet18"], "--pm-backbone"),
    (["--model", "utad", "--pm-backbone", "no_such_net"], "no_such_net"),
    (["--model", "utad", "--batch-size", "1"], "batch size"),
])
def test_bad_train_options(capsys, demo_data, tmp_path, argv, needle):
    out = tmp_path / "x"
    code, _, err = run_cli(capsys, "train", "--data", demo_data, "--out", out, *argv)
    assert_user_error(code, err, needle)
    assert not out.exists()


def test_bad_runs(capsys, demo_data, tiny_run, tmp_path):
    import shutil

    # existing run, no --overwrite
    code, _, err = run_cli(capsys, "train", "--model", "utad", "--data", demo_data, "--out", tiny_run)
    assert_user_error(code, err, "already holds a run")
    # config that does not match the weights
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    conf = json.loads((broken / "config.json").read_text())
    conf["config"]["ex_dim"] = 8
    (broken / "config.json").write_text(json.dumps(conf))
    code, _, err = run_cli(capsys, "eval", "--run", broken, "--data", demo_data)
    assert_user_error(code, err, "does not match")
    # resuming a UTAD run with another geometry
    with pytest.raises(FastADError, match="different config"):
        train_utad(demo_data, tiny_run, batch_size=2, resume=True, progress=False)


def test_intermediates_need_utad(capsys, demo_data, tmp_path):
    from fastad.models.fod import FODConfig

    fod = train(demo_data, tmp_path / "fod", model="fod", config=FODConfig(d_models=(32, 64), n_heads=4, n_layers=1,
                                                                  epochs=1, batch_size=4),
                    progress=False, compile_stats=False)
    code, _, err = run_cli(capsys, "eval", "--run", fod, "--data", demo_data, "--intermediates", tmp_path / "i")
    assert_user_error(code, err, "model with intermediates (utad)")
    assert not (tmp_path / "i").exists()


# --------------------------------------------------------------------------------------------
# Real data (long)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not BOTTLE.is_dir(), reason="MVTec AD bottle not present")
def test_bottle_defaults(tmp_path):
    from fastad.evaluate import evaluate_run

    run = train_utad(BOTTLE, tmp_path / "bottle", progress=False)
    result = evaluate_run(fastad.load(run), BOTTLE, progress=False)
    assert result["image_auroc"] >= 0.90 and result["pixel_auroc"] >= 0.90, result
