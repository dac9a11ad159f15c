"""FOD model: shapes, blur parity with scipy, target normalisation, loss plumbing."""
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from fastad.layers import GaussianBlur
from fastad.models.fod import FOD, FODConfig, fod_level_losses
from fastad.ops import LOG_EPS, patch_positions, rbf_target_at, sym_kl


class RandomBackbone(torch.nn.Module):
    """Feature maps of a 64-pixel image; by default strides 4/8/16, what FOD's levels 8/16 need
    with the hypercolumn."""

    def __init__(self, strides=(4, 8, 16), channels=(6, 12, 20)):
        super().__init__()
        self.strides, self.channels = tuple(strides), list(channels)

    def forward(self, x):
        g = torch.Generator().manual_seed(0)
        b = x.shape[0]
        return [torch.randn(b, c, 64 // s, 64 // s, generator=g) + x.mean()
                for s, c in zip(self.strides, self.channels)]


def tiny_cfg(**kw):
    return FODConfig(d_models=(32, 64), n_layers=2, crop=64, resize=64, **kw)


@pytest.mark.parametrize("size", [64, 37])
def test_blur_matches_scipy(size):
    x = np.random.default_rng(0).random((2, size, size)).astype(np.float32)
    ours = GaussianBlur(4.0, size)(torch.from_numpy(x)).numpy()
    ref = np.stack([gaussian_filter(m.astype(np.float64), sigma=4) for m in x])
    assert np.abs(ours - ref).max() < 1e-5


def test_rbf_target_rows_normalised_and_literal():
    grid = (5, 7)
    sigma = torch.tensor([1e-5, 0.3, 2.0])[torch.randint(0, 3, (1, 2, 35, 2))]
    t = rbf_target_at(sigma, *patch_positions(grid), grid)
    assert torch.allclose(t.sum(-1), torch.ones(1, 2, 35), atol=1e-5)
    n = torch.arange(35)
    r, c = (n // 7).double(), (n % 7).double()
    s = sigma.double()
    lit = torch.exp(-(r[:, None] - r[None]) ** 2 / (2 * s[..., 0:1] ** 2)
                    - (c[:, None] - c[None]) ** 2 / (2 * s[..., 1:2] ** 2))
    lit = lit / lit.sum(-1, keepdim=True)
    assert (t.double() - lit).abs().max() < 1e-6


def kl_div(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ_j p (log(p + 1e-4) − log(q + 1e-4)), the authors' kl_loss."""
    return (p * (torch.log(p + LOG_EPS) - torch.log(q + LOG_EPS))).sum(-1)


def test_sym_kl_is_two_kls():
    p = torch.rand(3, 10).softmax(-1)
    q = torch.rand(3, 10).softmax(-1)
    assert torch.allclose(sym_kl(p, q), kl_div(p, q) + kl_div(q, p), atol=1e-6)


def test_hypercolumn_tokens_are_own_stage_plus_pooled_finer_stage():
    """Deviation 10: level tokens = [smoothed stage s, 2x2 mean of the smoothed stage s/2]."""
    model = FOD(tiny_cfg(), RandomBackbone())
    images = torch.rand(2, 3, 64, 64)
    feats = [torch.nn.functional.avg_pool2d(f, 3, 1, 1) for f in RandomBackbone()(images)]
    toks = model.tokens(images)
    for level, (finer, own) in enumerate([(feats[0], feats[1]), (feats[1], feats[2])]):
        b, c, h, w = own.shape
        pooled = finer.view(b, finer.shape[1], h, 2, w, 2).mean((3, 5))
        want = torch.cat([own, pooled], 1).flatten(2).transpose(1, 2)
        assert toks[level].shape == (b, h * w, c + finer.shape[1])
        assert torch.allclose(toks[level], want, atol=1e-6)
    authors = FOD(tiny_cfg(hypercolumn=False), RandomBackbone((8, 16), (12, 20)))
    assert [t.shape[-1] for t in authors.tokens(images)] == [12, 20]


def test_crop_must_fit_the_strides():
    with pytest.raises(ValueError, match="multiple of every backbone stride"):
        FOD(FODConfig(d_models=(32, 64), crop=72, resize=72), RandomBackbone())


def test_unknown_inter_weight_is_refused():
    with pytest.raises(ValueError, match="inter_weight must be one of"):
        FOD(tiny_cfg(inter_weight="max"), RandomBackbone())


def test_config_without_hypercolumn_key_loads_the_authors_features():
    saved = {k: v for k, v in FODConfig().to_dict().items() if k != "hypercolumn"}
    assert FODConfig.from_dict(saved).hypercolumn is False
    assert FODConfig.from_dict(FODConfig().to_dict()).hypercolumn is True
    assert FODConfig().backbone_strides() == (4, 8, 16)
    assert FODConfig(hypercolumn=False).backbone_strides() == (8, 16)


def test_forward_shapes_and_losses_finite():
    cfg = tiny_cfg()
    model = FOD(cfg, RandomBackbone())
    images = torch.rand(3, 3, 64, 64)
    toks = model.tokens(images)
    model.fit_reference(toks)
    out = model.levels[0](toks[0])
    losses = fod_level_losses(toks[0], out, cfg)
    assert torch.isfinite(losses.total)
    losses.total.backward()
    amap, score = model(images)
    assert amap.shape == (3, 64, 64) and score.shape == (3,)
    assert torch.isfinite(amap).all()
    assert torch.allclose(score, amap.flatten(1).amax(1))


def _task_with_tokens(model, n=4):
    """An FODTask on `model` with `n` random images' tokens cached (no data directory)."""
    from fastad.models.fod import FODTask

    task = FODTask({})
    task.model, task.device = model, torch.device("cpu")
    with torch.no_grad():
        images = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        task.tokens = [t.to(next(model.levels.parameters()).dtype) for t in model.tokens(images)]
    model.fit_reference(task.tokens)
    return task


def test_per_level_steps_reproduce_the_authors_update():
    """Deviation 11: two steps of `per_level_steps` equal the authors' literal sequence under
    torch 1.13 — per level zero_grad(set_to_none=False), backward of loss1 and loss2, Adam step —
    and differ from the default one-step-per-batch update. float64: Adam turns the rounding noise
    of gradients that are zero in exact arithmetic (the key bias) into full-size steps in fp32."""
    torch.manual_seed(0)
    cfg = tiny_cfg(loss_queries=0, per_level_steps=True)
    ours = FOD(cfg, RandomBackbone()).double()
    literal = FOD(cfg, RandomBackbone()).double()
    literal.load_state_dict(ours.state_dict())
    default = FOD(tiny_cfg(loss_queries=0), RandomBackbone()).double()
    default.load_state_dict(ours.state_dict())

    task = _task_with_tokens(ours)
    [stage] = task.stages(ours, torch.device("cpu"))
    assert stage.steps_itself
    batches = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    for idx in batches:
        stage.step(idx, torch.Generator().manual_seed(0), 0)

    lit_tokens = _task_with_tokens(literal).tokens
    opt = torch.optim.Adam([p for p in literal.levels.parameters() if p.requires_grad], lr=cfg.lr)
    for idx in batches:
        for level, toks in zip(literal.levels, lit_tokens):
            x = toks[idx]
            out = fod_level_losses(x, level(x), cfg)
            opt.zero_grad(set_to_none=False)
            out.loss1.backward(retain_graph=True)
            out.loss2.backward()
            opt.step()

    dtask = _task_with_tokens(default)
    [dstage] = dtask.stages(default, torch.device("cpu"))
    for idx in batches:
        dstage.step(idx, torch.Generator().manual_seed(0), 0)
        dstage.optimizer.step()
        dstage.optimizer.zero_grad(set_to_none=True)

    for (name, a), b, c in zip(ours.levels.named_parameters(), literal.levels.parameters(), default.levels.parameters()):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), name
    assert max((a - c).abs().max() for a, c in zip(ours.levels.parameters(), default.levels.parameters())) > 1e-6
