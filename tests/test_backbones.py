"""Backbone weights and the frozen feature extractor (CPU, offline, < 60 s)."""
from __future__ import annotations

import logging
import re
import shutil
import time

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from fastad import backbones as bb  # noqa: E402
from fastad.backbones import (  # noqa: E402
    FeatureExtractor,
    efficientnet_lite0_offline_state_dict,
    load_pretrained_state_dict,
)
from fastad.errors import FastADError  # noqa: E402

CAT_CLASSES = list(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may touch the network: the hub is disabled and must not even be tried."""
    monkeypatch.setenv("FASTAD_OFFLINE", "1")

    def _no_hub(name):  # pragma: no cover - only runs if the offline switch is broken
        raise AssertionError("hub tried while FASTAD_OFFLINE=1")

    monkeypatch.setattr(bb, "_load_hub", _no_hub)


def _chelsea_views(short_sides=(224,), crops="center", flip=False) -> torch.Tensor:
    from skimage import data

    x0 = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float()[None] / 255.0
    views = []
    for short in short_sides:
        s = short / min(x0.shape[2:])
        x = F.interpolate(x0, size=(round(x0.shape[2] * s), round(x0.shape[3] * s)), mode="bilinear", antialias=True)
        h, w = x.shape[2:]
        corners = [((h - 224) // 2, (w - 224) // 2)]
        if crops == "all":
            corners += [(0, 0), (h - 224, w - 224)]
        for t, l in corners:
            v = x[:, :, t : t + 224, l : l + 224]
            views += [v, v.flip(3)] if flip else [v]
    return torch.cat(views)


def _norm(x, mean_std):
    mean, std = mean_std
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def classifier():
    prof = bb.weights_profile("efficientnet_lite0", "offline:")
    assert prof["model_kwargs"] == {"bn_eps": 1e-3}  # TF-trained weights
    model = timm.create_model("efficientnet_lite0", **prof["model_kwargs"]).eval()
    model.load_state_dict(efficientnet_lite0_offline_state_dict(), strict=True)
    return model


@pytest.fixture(scope="module")
def lite0():
    return FeatureExtractor("efficientnet_lite0", strides=(8, 16))


# ---------------------------------------------------------------- offline weights / mapping
def test_offline_state_dict_covers_timm_keys_in_order():
    sd = efficientnet_lite0_offline_state_dict()
    ref = timm.create_model("efficientnet_lite0").state_dict()
    assert list(sd) == list(ref) and len(sd) == 296
    for k, t in sd.items():
        assert t.shape == ref[k].shape, k
    # BN buffers landed on BN buffers: variances >= 0 (TF-trained nets have some dead channels with
    # variance exactly 0; their running mean is ~0 too), counters are integer scalars.
    n_dead = n_all = 0
    for k in sd:
        if k.endswith("running_var"):
            dead = sd[k] == 0
            assert (sd[k] >= 0).all(), k
            assert sd[k[: -len("running_var")] + "running_mean"][dead].abs().le(1e-4).all(), k
            n_dead, n_all = n_dead + int(dead.sum()), n_all + dead.numel()
    assert n_dead / n_all < 0.02  # 130 of 21008
    assert all(sd[k].dtype == torch.int64 and sd[k].dim() == 0 for k in sd if k.endswith("num_batches_tracked"))


def test_offline_mapping_classifies_chelsea(classifier):
    """The mapping is right iff the real ImageNet classifier recognises a real cat photo."""
    with torch.no_grad():
        p = classifier(_norm(_chelsea_views(short_sides=(256,)), TF)).softmax(-1)[0]
    assert int(p.argmax()) in CAT_CLASSES
    assert float(p[CAT_CLASSES].sum()) > 0.8


def test_tf_normalisation_fits_offline_weights_better(classifier, lite0):
    """Offline Lite0 weights expect [-1, 1] inputs: lower NLL of the cat classes than ImageNet stats."""
    x = _chelsea_views(short_sides=(224, 256, 288, 320), crops="all", flip=True)  # 24 views
    nll = {}
    for key, ms in (("tf", TF), ("imagenet", IMAGENET)):
        with torch.no_grad():
            p = classifier(_norm(x, ms)).softmax(-1)
        assert (torch.isin(p.argmax(1), torch.tensor(CAT_CLASSES))).all()
        nll[key] = float(-p[:, CAT_CLASSES].sum(1).log().mean())
    assert nll["tf"] < nll["imagenet"], nll
    assert lite0.mean.flatten().tolist() == [0.5, 0.5, 0.5] and lite0.std.flatten().tolist() == [0.5] * 3


def test_lukemelas_mapping_is_not_a_blind_zip(tmp_path):
    """Swapping two same-shaped BN tensors in the source must be detected by name, not shape."""
    src = torch.load(bb._offline_file(), map_location="cpu", weights_only=True)
    items = list(src.items())
    i = next(j for j, (k, _) in enumerate(items) if k.endswith("running_mean"))
    items[i - 2], items[i] = items[i], items[i - 2]  # weight <-> running_mean, both (C,)
    path = tmp_path / "swapped.pth"
    torch.save(dict(items), path)
    with pytest.raises(FastADError, match="lukemelas"):
        load_pretrained_state_dict("efficientnet_lite0", path)


# ---------------------------------------------------------------- feature extractor
def test_lite0_shapes_channels_and_source(lite0):
    assert lite0.name == "efficientnet_lite0" and lite0.strides == (8, 16)
    assert lite0.channels == [40, 112]
    assert lite0.weights_source.startswith("offline:")
    x = torch.rand(2, 3, 256, 256)
    feats = lite0(x)
    assert [tuple(f.shape) for f in feats] == [(2, 40, 32, 32), (2, 112, 16, 16)]
    # Same as timm's unpruned features_only model fed with the normalised image.
    assert lite0.model_kwargs == {"bn_eps": 1e-3}
    ref = timm.create_model("efficientnet_lite0", features_only=True, out_indices=(2, 3), bn_eps=1e-3).eval()
    ref.load_state_dict({k: v for k, v in efficientnet_lite0_offline_state_dict().items() if k in ref.state_dict()})
    with torch.no_grad():
        expect = ref(_norm(x, TF))
    for f, e in zip(feats, expect):
        torch.testing.assert_close(f, e)
    # uint8 input is scaled to [0, 1]
    u8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(lite0(u8)[0], lite0(u8.float() / 255)[0])


@pytest.mark.parametrize(
    "name,channels",
    [("resnet18", [128, 256]), ("wide_resnet50_2", [512, 1024]), ("efficientnet_b6", [72, 200])],
)
def test_other_backbones_random_weights(name, channels, caplog):
    with caplog.at_level(logging.WARNING, logger="fastad.backbones"):
        fe = FeatureExtractor(name, strides=(8, 16), weights="none")
    assert "random weights" in caplog.text
    assert fe.channels == channels and fe.weights_source.startswith("none")
    feats = fe(torch.rand(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, channels[0], 8, 12), (1, channels[1], 4, 6)]
    spec_mean = tuple(timm.create_model(name, pretrained=False).pretrained_cfg["mean"])
    assert tuple(round(v, 6) for v in fe.mean.flatten().tolist()) == tuple(round(v, 6) for v in spec_mean)


def test_strides_are_sorted_and_single_stride():
    fe = FeatureExtractor("resnet18", strides=(16, 4), weights="none")
    assert fe.strides == (4, 16) and fe.channels == [64, 256]
    assert len(FeatureExtractor("resnet18", strides=32, weights="none")(torch.rand(1, 3, 64, 64))) == 1


def test_frozen_and_always_eval(lite0):
    assert all(not p.requires_grad for p in lite0.parameters())
    lite0.train()
    assert not lite0.training and not any(m.training for m in lite0.modules())
    before = {k: v.clone() for k, v in lite0.body.state_dict().items() if "running" in k}
    out = lite0(torch.rand(2, 3, 64, 64))
    assert not out[0].requires_grad
    after = lite0.body.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # BN stats untouched


def test_fingerprint(lite0):
    fp = lite0.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert FeatureExtractor("efficientnet_lite0").fingerprint() == fp
    assert FeatureExtractor("efficientnet_lite0", weights="none").fingerprint() != fp
    assert FeatureExtractor("efficientnet_lite0", strides=(16,)).fingerprint() != fp
    assert FeatureExtractor("efficientnet_lite0", mean=IMAGENET[0], std=IMAGENET[1]).fingerprint() != fp


# ---------------------------------------------------------------- local weight files
def test_local_weights_roundtrip(tmp_path, lite0):
    from safetensors.torch import save_file

    sd = efficientnet_lite0_offline_state_dict()
    st = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    pth = tmp_path / "lite0_ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, pth)
    luke = tmp_path / "luke.pth"
    shutil.copy(bb._offline_file(), luke)
    headless = tmp_path / "headless.pt"
    torch.save({k: v for k, v in sd.items() if not k.startswith("classifier")}, headless)

    x = torch.rand(1, 3, 128, 128)
    ref = lite0(x)
    for path in (st, pth, luke, headless):
        fe = FeatureExtractor("efficientnet_lite0", weights=str(path))
        assert fe.weights_source == f"file:{path}"
        assert fe.fingerprint() == lite0.fingerprint(), path
        for a, b in zip(fe(x), ref):
            assert torch.equal(a, b), path


def _one_line_error(fn, *patterns):
    with pytest.raises(FastADError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg
    for p in patterns:
        assert p in msg, msg
    return msg


def test_bad_weight_files(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01not a safetensors file" * 10)
    _one_line_error(lambda: FeatureExtractor(weights=corrupt), str(corrupt))

    corrupt_pth = tmp_path / "corrupt.pth"
    corrupt_pth.write_bytes(b"garbage" * 100)
    _one_line_error(lambda: load_pretrained_state_dict("efficientnet_lite0", corrupt_pth), str(corrupt_pth))

    wrong_arch = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), wrong_arch)
    _one_line_error(lambda: FeatureExtractor(weights=wrong_arch), str(wrong_arch), "conv1.weight")

    sd = efficientnet_lite0_offline_state_dict()
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in sd.items() if k != "blocks.2.0.conv_dw.weight"}, missing)
    _one_line_error(lambda: FeatureExtractor(weights=missing), str(missing), "missing key blocks.2.0.conv_dw.weight")

    shape = tmp_path / "shape.pth"
    bad = dict(sd)
    bad["blocks.1.0.bn1.weight"] = torch.ones(7)
    torch.save(bad, shape)
    _one_line_error(lambda: FeatureExtractor(weights=shape), "shape mismatch for blocks.1.0.bn1.weight")

    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": sd, "cfg": ValueError("arbitrary object")}, pickled)  # needs full unpickling
    _one_line_error(lambda: FeatureExtractor(weights=pickled), str(pickled))

    _one_line_error(lambda: FeatureExtractor(weights=tmp_path / "nope.safetensors"), "not found")
    txt = tmp_path / "w.txt"
    txt.write_text("x")
    _one_line_error(lambda: FeatureExtractor(weights=txt), "unsupported extension")


# ---------------------------------------------------------------- names, strides, offline hub
def test_unknown_backbone():
    _one_line_error(lambda: FeatureExtractor("efficientnet_lite00", weights="none"), "unknown backbone", "efficientnet_lite0")
    _one_line_error(lambda: load_pretrained_state_dict("no_such_net"), "unknown backbone")


def test_unavailable_stride():
    _one_line_error(lambda: FeatureExtractor("resnet18", strides=(8, 64), weights="none"), "stride 64", "2, 4, 8, 16, 32")
    _one_line_error(lambda: FeatureExtractor("resnet18", strides=(3,), weights="none"), "stride 3")


def test_hub_skipped_fast_offline():
    assert not bb.hub_reachable()
    t0 = time.perf_counter()
    sd, src = load_pretrained_state_dict("efficientnet_lite0")
    assert src.startswith("offline:") and len(sd) == 296
    msg = _one_line_error(lambda: load_pretrained_state_dict("resnet18"), "no pretrained weights for resnet18 (offline)")
    assert "--weights FILE" in msg and "--weights none" in msg
    assert time.perf_counter() - t0 < 5.0
    assert load_pretrained_state_dict("resnet18", "none") == (None, "none (random init)")
