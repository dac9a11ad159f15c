"""ADTR model: shapes, losses (literal formulas, direction on a toy case), convergence on a constant
normal pattern, synthetic anomalies, and the L2 distance through fastad.kernels."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fastad.data.synthetic import SYNTHETIC_KINDS, synthesise
from fastad.kernels import feature_distance
from fastad.models.adtr import (ADTR, ADTRConfig, anomaly_available_loss, grid_labels, image_label_loss,
                                mse_loss, pixel_label_loss, pseudo_huber_score)
from fastad.ops import set_impl


@pytest.fixture
def one_thread():
    """The toy training loops run hundreds of tiny ops: one thread avoids OpenMP hand-off costs
    (3x faster on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class RandomBackbone(torch.nn.Module):
    """Stand-in for FeatureExtractor: strides 4 and 8 at 32² input -> 8×8 and 4×4 maps."""
    strides = (4, 8)
    channels = [6, 10]

    def forward(self, x):
        b = x.shape[0]
        m = x.mean((1, 2, 3)).view(b, 1, 1, 1)
        g = torch.Generator().manual_seed(0)
        return [torch.randn(1, 6, 8, 8, generator=g) + m, torch.randn(1, 10, 4, 4, generator=g) * m]


def tiny_cfg(**kw):
    base = dict(strides=(4, 8), grid_stride=8, d_model=32, n_heads=4, n_encoder_layers=1, n_decoder_layers=1,
                ffn_dim=64, resize=32, crop=32, score_pool=4, topk=4, blur_sigma=1.0)
    return ADTRConfig(**{**base, **kw})


def test_forward_shapes_and_score_definition():
    model = ADTR(tiny_cfg(), RandomBackbone()).eval()
    images = torch.rand(3, 3, 32, 32)
    tokens = model.tokens(images)
    assert tokens.shape == (3, 16, 16)  # 4×4 grid, 6 + 10 channels
    model.fit_normalisation(tokens)
    amap, score = model(images)
    assert amap.shape == (3, 32, 32) and score.shape == (3,)
    assert torch.isfinite(amap).all()
    pooled = torch.nn.functional.avg_pool2d(amap.unsqueeze(1), 4, stride=1)
    assert torch.allclose(score, pooled.flatten(1).amax(1))
    # patch scores are the L2 norm of f − f̂ over channels
    recon = model.reconstruct(tokens)
    assert torch.allclose(model.patch_scores(tokens), (tokens - recon).norm(dim=-1), atol=1e-5)


def test_decoder_sees_features_only_through_cross_attention():
    """With the cross-attention output zeroed, the reconstruction no longer depends on the input."""
    model = ADTR(tiny_cfg(), RandomBackbone()).eval()
    for layer in model.transformer.decoder:
        torch.nn.init.zeros_(layer.cross_attn.out_proj.weight)
        torch.nn.init.zeros_(layer.cross_attn.out_proj.bias)
    a, b = torch.randn(1, 16, 16), torch.randn(1, 16, 16)
    assert torch.allclose(model.reconstruct(a), model.reconstruct(b), atol=1e-6)


def test_bad_configs_rejected():
    with pytest.raises(ValueError, match="multiple"):
        ADTR(tiny_cfg(crop=30), RandomBackbone())
    with pytest.raises(ValueError, match="synthetic"):
        ADTR(tiny_cfg(synthetic="stripes"), RandomBackbone())
    with pytest.raises(ValueError, match="topk"):
        ADTR(tiny_cfg(topk=17), RandomBackbone())
    with pytest.raises(ValueError, match="strides"):
        ADTR(tiny_cfg(strides=(4, 16)), RandomBackbone())


# ---- losses: literal formulas -----------------------------------------------------------------
def test_pseudo_huber_literal():
    f, fh = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    d = (f - fh).double()
    lit = torch.sqrt((d.abs().sum(-1) / 7) ** 2 + 1) - 1
    assert torch.allclose(pseudo_huber_score(f, fh).double(), lit, atol=1e-6)


def test_pixel_and_image_losses_literal():
    phi = torch.rand(3, 10, dtype=torch.float64) * 2
    y = (torch.rand(3, 10) > 0.6).double()
    y[2] = 0  # a normal image: no α-term (it would be −α·log 0)
    alpha = 0.003
    got = pixel_label_loss(phi, y, alpha)
    for i in range(3):
        want = ((1 - y[i]) * phi[i]).sum() / 10
        if y[i].sum() > 0:
            want = want - alpha * torch.log(1 - torch.exp(-(y[i] * phi[i]).sum() / 10))
        assert torch.allclose(got[i], want)
    k = 3
    q = phi.sort(-1, descending=True).values[:, :k].mean(-1)
    labels = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    want = (1 - labels) * q - alpha * labels * torch.log(1 - torch.exp(-q))
    assert torch.allclose(image_label_loss(phi, labels, alpha, k), want)


def test_log_guard_keeps_losses_finite():
    phi = torch.zeros(2, 8, requires_grad=True)
    y = torch.zeros(2, 8)
    y[0, 0] = 1
    loss = pixel_label_loss(phi, y, 0.003).sum() + image_label_loss(phi, torch.ones(2), 0.003, 2).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(phi.grad).all()


def test_anomaly_losses_push_anomalous_up_and_normal_down():
    """Toy case: gradient descent on the loss lowers φ at normal positions and raises it at
    anomalous ones (pixel labels), and raises the top-k of image-labelled anomalies."""
    phi = torch.full((1, 16), 0.5, requires_grad=True)
    y = torch.zeros(1, 16)
    y[0, :4] = 1
    pixel_label_loss(phi, y, alpha=0.003).sum().backward()
    assert (phi.grad[0, 4:] > 0).all() and (phi.grad[0, :4] < 0).all()
    phi_img = torch.full((1, 16), 0.5, requires_grad=True)
    image_label_loss(phi_img, torch.ones(1), alpha=0.003, k=4).sum().backward()
    assert (phi_img.grad <= 0).all() and (phi_img.grad < 0).sum() == 4
    # and an anomalous region reconstructed worse gives a lower loss than one reconstructed well
    lo, hi = torch.full((1, 16), 0.1), torch.full((1, 16), 0.1)
    hi[0, :4] = 3.0
    assert pixel_label_loss(hi, y, 0.003) < pixel_label_loss(lo, y, 0.003)
    assert pixel_label_loss(hi, torch.zeros(1, 16), 0.003) > pixel_label_loss(lo, torch.zeros(1, 16), 0.003)


def test_training_on_toy_case_separates_anomalous_regions(one_thread):
    """Train the tiny model with pixel-labelled anomalies: φ on anomalous positions ends above
    its start, φ on normal positions below."""
    torch.manual_seed(0)
    cfg = tiny_cfg(alpha=0.5)
    model = ADTR(cfg, RandomBackbone())
    pattern = torch.randn(1, 16, 16)
    normal = pattern * torch.linspace(0.5, 1.5, 6).view(6, 1, 1)  # input-dependent: the mean does not fit
    anomalous = normal[:2].clone()
    y = torch.zeros(2, 16)
    y[:, 5] = 1
    anomalous[:, 5] += 3.0
    model.fit_normalisation(normal)
    opt = torch.optim.Adam(model.transformer.parameters(), lr=3e-3)

    def phis():
        with torch.no_grad():
            return (pseudo_huber_score(normal, model.reconstruct(normal)).mean(),
                    pseudo_huber_score(anomalous, model.reconstruct(anomalous))[:, 5].mean())
    n0, a0 = phis()
    for _ in range(40):
        phi = pseudo_huber_score(torch.cat([normal, anomalous]), model.reconstruct(torch.cat([normal, anomalous])))
        loss = anomaly_available_loss(phi[:6], phi[6:], y, None, cfg).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    n1, a1 = phis()
    assert n1 < 0.9 * n0 and a1 > a0


def test_reconstruction_of_constant_pattern_converges(one_thread):
    """Normal-only MSE: a constant normal pattern is reconstructed almost exactly."""
    torch.manual_seed(0)
    model = ADTR(tiny_cfg(), RandomBackbone())
    pattern = torch.randn(1, 16, 16).expand(4, -1, -1).contiguous()
    model.fit_normalisation(pattern + 0.1 * torch.randn_like(pattern))
    opt = torch.optim.Adam(model.transformer.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = mse_loss(pattern, model.reconstruct(pattern))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * first and loss.item() < 1e-3


def test_grid_labels_are_area_fractions():
    masks = torch.zeros(1, 32, 32)
    masks[0, :8, :4] = 1  # half of cell (0, 0) at grid 4×4
    y = grid_labels(masks, (4, 4))
    assert y.shape == (1, 16) and y[0, 0] == 0.5 and y[0, 1:].sum() == 0


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_synthetic_anomalies(kind):
    images = torch.rand(3, 3, 64, 64) * 0.2 + 0.4
    imgs, masks = synthesise(images, kind, 5, seed=1)
    assert imgs.shape == (5, 3, 64, 64) and masks.shape == (5, 64, 64)
    assert imgs.min() >= 0 and imgs.max() <= 1
    for i in range(5):
        m = masks[i].bool()
        assert m.any(), kind
        src = images[i % 3]
        assert torch.equal(imgs[i][:, ~m], src[:, ~m])  # only masked pixels change
        assert not torch.allclose(imgs[i][:, m], src[:, m])
    again, _ = synthesise(images, kind, 5, seed=1)
    assert torch.equal(again, imgs)  # deterministic


# ---- scoring through fastad.kernels ---------------------------------------------------------------
CAN_TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_kernel_l2_matches_plain_formula(impl):
    if impl == "triton" and not CAN_TRITON:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    x, xh = torch.randn(2, 37, 176, generator=g) * 3, torch.randn(2, 37, 176, generator=g)
    want = (x.double() - xh.double()).pow(2).sum(-1).sqrt()
    got = feature_distance(x.to(device), xh.to(device), kind="l2", impl=impl).cpu().double()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["lean", "triton"])
def test_model_scoring_through_kernels_equals_reference(impl):
    if impl == "triton" and not CAN_TRITON:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    model = ADTR(tiny_cfg(), RandomBackbone()).eval()
    images = torch.rand(2, 3, 32, 32)
    ref_map, ref_score = model(images)
    fast_map, fast_score = set_impl(model, impl)(images)
    assert torch.allclose(fast_map, ref_map, rtol=1e-5, atol=1e-5)
    assert torch.allclose(fast_score, ref_score, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(fast_score).all()


# ---- export contract: standard ops, dynamic batch, ONNX opset 17 ------------------------------------
class ConvBackbone(torch.nn.Module):
    """A traceable stand-in backbone: strides 4 and 8."""
    strides = (4, 8)
    channels = [6, 10]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Conv2d(3, 6, 4, stride=4)
        self.b = torch.nn.Conv2d(6, 10, 2, stride=2)

    def forward(self, x):
        f1 = self.a(x)
        return [f1, self.b(f1)]


def test_onnx_export_matches_torch(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = ADTR(tiny_cfg(), ConvBackbone()).eval()
    model.fit_normalisation(model.tokens(torch.rand(4, 3, 32, 32)))
    torch.nn.init.normal_(model.transformer.output_proj.weight, std=0.1)  # non-trivial reconstruction
    path = tmp_path / "adtr.onnx"
    with torch.inference_mode():
        torch.onnx.export(model, (torch.rand(2, 3, 32, 32),), str(path), input_names=["images"],
                          output_names=["anomaly_map", "score"], opset_version=17, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}})
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 3, 32, 32)
    amap, score = sess.run(None, {"images": x.numpy()})
    with torch.no_grad():
        ref_map, ref_score = model(x)
    assert np.allclose(amap, ref_map.numpy(), rtol=1e-4, atol=1e-5)
    assert np.allclose(score, ref_score.numpy(), rtol=1e-4, atol=1e-5)


def test_jitter_noise_enters_in_standardised_units():
    """reconstruct(f, noise) is the reconstruction of f + noise·std (choice 9): the noise is added
    to the standardised tokens, so `jitter` is measured in units of the per-channel std."""
    torch.manual_seed(0)
    model = ADTR(tiny_cfg(), RandomBackbone())
    torch.nn.init.normal_(model.transformer.output_proj.weight, std=0.1)  # not the zero start
    tokens = torch.randn(3, 16, 16)
    model.fit_normalisation(tokens * 2 + 1)
    noise = torch.randn_like(tokens)
    with torch.no_grad():
        torch.testing.assert_close(model.reconstruct(tokens, noise),
                                   model.reconstruct(tokens + noise * model.feature_scale))
        assert not torch.allclose(model.reconstruct(tokens, noise), model.reconstruct(tokens))


def test_gpu_schedule_is_the_papers_transformer():
    cfg = ADTRConfig.gpu()
    assert (cfg.d_model, cfg.n_heads, cfg.n_encoder_layers, cfg.n_decoder_layers, cfg.ffn_dim) == (256, 8, 4, 4, 1024)
    assert cfg.schedule == "gpu" and ADTRConfig().schedule == "cpu"
    with pytest.raises(ValueError):
        ADTRConfig(schedule="tpu").validate()
