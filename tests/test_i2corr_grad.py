"""fastad.kernels.i2corr_grad: the differentiable I2Correlation branch against autograd through
the literal formulas (float64 and float32, both detach patterns FOD uses), gradcheck, a whole FOD
training step against the materialised path, and no N×N tensor in the training graph."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fastad.kernels import I2CorrOutput, I2CorrSplitOutput, i2corr_attention
from fastad.kernels.i2corr_grad import I2CorrFunction
from fastad.models.fod import FOD, I2CorrelationAttention, fod_level_losses
from fastad.ops import at_least_fp32, patch_positions

from .test_fod import RandomBackbone, tiny_cfg

EPS = 1e-4


def make_inputs(b=2, h=2, grid=(3, 5), dh=8, dtype=torch.float64, shared_kv=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    q = torch.randn(b, h, n, dh, generator=g, dtype=torch.float64)
    k = torch.randn(1 if shared_kv else b, h, n, dh, generator=g, dtype=torch.float64)
    v = torch.randn(1 if shared_kv else b, h, n, dh, generator=g, dtype=torch.float64)
    # σ log-uniform over FOD's range (1e-5 … 2): one-hot targets and wide ones.
    sigma = torch.exp(torch.empty(b, h, n, 2, dtype=torch.float64).uniform_(math.log(1e-5), math.log(2.0),
                                                                              generator=g))
    return [t.to(dtype).requires_grad_() for t in (q, k, v, sigma)], grid


def literal_branch(q, k, v, sigma, grid, scale, kl_grad):
    """The authors' formulas, materialised, in float64: the prior with its 1/(2πσ0σ1) prefactor on
    squared-distance matrices, divided by its row sum; kl(p, q) = Σ p (log(p + ε) − log(q + ε))."""
    q, k, v, sigma = (t.double() for t in (q, k, v, sigma))
    attn = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    n = q.shape[2]
    pos = torch.arange(n)
    dist_r = ((pos // grid[1])[:, None] - (pos // grid[1])[None]).double() ** 2
    dist_c = ((pos % grid[1])[:, None] - (pos % grid[1])[None]).double() ** 2
    s0, s1 = sigma[..., 0:1], sigma[..., 1:2]
    prior = 1.0 / (2 * math.pi * s0 * s1) * torch.exp(-dist_r / (2 * s0 ** 2) - dist_c / (2 * s1 ** 2))
    prior = prior / prior.sum(-1, keepdim=True)

    def kl(p, r):
        return (p * (torch.log(p + EPS) - torch.log(r + EPS))).sum(-1)

    out = attn @ v
    entropy = -(attn * torch.log(attn + EPS)).sum(-1)
    if kl_grad == "both":
        return out, kl(prior, attn) + kl(attn, prior), entropy
    div1 = kl(prior.detach(), attn) + kl(attn, prior.detach())
    div2 = kl(prior, attn.detach()) + kl(attn.detach(), prior)
    return out, div1, div2, entropy


def grads_of(outputs, weights, inputs):
    loss = sum((w * o.double()).sum() for w, o in zip(weights, outputs))
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
@pytest.mark.parametrize("kl_grad", ["both", "split"])
@pytest.mark.parametrize("shared_kv", [True, False])
def test_gradients_match_literal_formulas(dtype, rtol, kl_grad, shared_kv):
    (q, k, v, sigma), grid = make_inputs(dtype=dtype, shared_kv=shared_kv)
    scale = q.shape[-1] ** -0.5
    ours = i2corr_attention(q, k, v, sigma, grid, scale=scale, kl_grad=kl_grad, block=4)
    assert isinstance(ours, I2CorrSplitOutput if kl_grad == "split" else I2CorrOutput)
    lit = literal_branch(q, k, v, sigma, grid, scale, kl_grad)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in lit]
    for o, ref in zip(ours, lit):
        assert torch.allclose(o.double(), ref, rtol=rtol, atol=rtol), "forward values"
    for name, got, want in zip("qkvσ", grads_of(ours, weights, (q, k, v, sigma)),
                               grads_of(lit, weights, (q, k, v, sigma))):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err <= rtol, (name, float(err))


def test_gradcheck_float64():
    (q, k, v, sigma), grid = make_inputs(b=2, h=1, grid=(2, 3), dh=3)
    sigma = (sigma.detach() * 0 + torch.empty_like(sigma).uniform_(0.2, 1.5)).requires_grad_()  # away from the floor

    def branch(q, k, v, sigma):
        out, kl, _, ent = I2CorrFunction.apply(q, k, v, sigma, grid, 0.7, 4, False)
        return out, kl, ent

    assert torch.autograd.gradcheck(branch, (q, k, v, sigma), fast_mode=True)


def test_detached_statistics_are_not_differentiable_and_no_grad_runs_forward_only():
    (q, k, v, sigma), grid = make_inputs()
    res = i2corr_attention(q, k, v, sigma, grid)
    assert res.kl.grad_fn is not None and res.entropy.grad_fn is not None
    with torch.no_grad():
        plain = i2corr_attention(q, k, v, sigma, grid)
    assert plain.kl.grad_fn is None and torch.allclose(plain.kl, res.kl.detach(), atol=1e-12)
    with pytest.raises(ValueError, match="kl_grad"):
        i2corr_attention(q, k, v, sigma, grid, kl_grad="target")


# ---- a whole FOD training step -------------------------------------------------------------------
def materialised_branch(self, x, kv, grid, loss_rows=None):
    """The training path before the fused branch (loss_queries = 0): N×N logits, the output through
    softmax·v, the statistics through `correlation_stats` (Div¹/Div² by .detach())."""
    from fastad.models.fod import BranchStats

    q, k, v, sigma = self.project(x, kv)
    b, h, n, dh = q.shape
    if k.shape[0] != b:
        k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * self.scale
    out = torch.matmul(torch.softmax(logits, dim=-1), v).transpose(1, 2).reshape(b, n, h * dh)
    r_i, c_i = patch_positions(grid, q.device)
    return out, BranchStats(*self.stats_fn(at_least_fp32(logits), sigma, r_i, c_i, grid))


def train_step_gradients(model: FOD, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradients one FODTask step (every level, every loss) applies: the parameter update of
    SGD is −lr times these, and Adam's is a function of them. (Differences of fp32 parameters
    themselves would measure their rounding, not the update's.)"""
    model.zero_grad()
    for level, x in zip(model.levels, model.tokens(images)):
        fod_level_losses(x, level(x), model.cfg).total.backward()
    return {n: p.grad.clone() for n, p in model.levels.named_parameters() if p.requires_grad}


def test_training_step_matches_materialised_path(monkeypatch):
    torch.manual_seed(0)
    model = FOD(tiny_cfg(loss_queries=0), RandomBackbone())
    images = torch.rand(2, 3, 64, 64)
    model.fit_reference(model.tokens(torch.rand(4, 3, 64, 64)))
    with torch.no_grad():  # σ over its whole range
        for m in model.modules():
            if isinstance(m, I2CorrelationAttention):
                m.sigma_proj.weight.normal_(0, 0.5)
    reference = copy.deepcopy(model)
    fused = train_step_gradients(model, images)
    monkeypatch.setattr(I2CorrelationAttention, "forward", materialised_branch)
    want = train_step_gradients(reference, images)
    scale = max(u.abs().max() for u in want.values())
    assert scale > 0
    for name, upd in fused.items():
        assert (upd - want[name]).abs().max() <= 1e-5 * scale, name


def test_training_graph_holds_no_n_by_n_tensor():
    """Every tensor autograd saves in a FOD level's training graph has fewer elements than N²·H."""
    torch.manual_seed(0)
    model = FOD(tiny_cfg(loss_queries=0), RandomBackbone())
    tokens = model.tokens(torch.rand(1, 3, 64, 64))
    level, x = model.levels[0], tokens[0]
    n = x.shape[1]
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fod_level_losses(x, level(x), model.cfg).total.backward()
    assert sizes and max(sizes) < model.cfg.n_heads * n * n
    # the materialised path does save (B, H, N, N) tensors: the check can fail
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fod_level_losses(x, level(x, torch.arange(n)), model.cfg).total.backward()
    assert max(sizes) >= model.cfg.n_heads * n * n


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    (q, k, v, sigma), grid = make_inputs(dtype=torch.float32, grid=(8, 8), dh=16)
    weights = None
    results = []
    for compiled in (False, True):
        res = i2corr_attention(q, k, v, sigma, grid, kl_grad="split", block=16, compiled=compiled)
        if weights is None:
            weights = [torch.randn(o.shape, dtype=torch.float64) for o in res]
        results.append((res, grads_of(res, weights, (q, k, v, sigma))))
    (eager, g_eager), (comp, g_comp) = results
    for a, b in zip(list(eager) + list(g_eager), list(comp) + list(g_comp)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
