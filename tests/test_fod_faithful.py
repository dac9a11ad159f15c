"""FOD against a literal, slow re-statement of the paper's / authors' formulas.

The restatement follows the authors' code path step by step, in float64, with explicit loops
and materialised N×N tensors: residual added to both branches (it cancels), the output
projection computed and thrown away, the 1/(2π σ0 σ1) prior prefactor, the prior normalised
by its row sum, the authors' `kl_loss` (mean over heads), Div¹/Div² as two separate
`.detach()` pairs, `loss1.backward(retain_graph=True); loss2.backward()`, and the
`max − softmax(−kl)` scoring. Our model runs with all query rows (loss_queries = 0) on the
same random weights; losses, gradients and scores must agree.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from fastad.kernels import i2corr_attention
from fastad.models.fod import FOD, FODConfig, FODLevel, fod_level_losses

GRID = (4, 5)
N = GRID[0] * GRID[1]
C, D, HEADS, LAYERS, B = 6, 16, 2, 2, 3


def make_level(seed=0) -> FODLevel:
    torch.manual_seed(seed)
    cfg = FODConfig(d_models=(D,), strides=(8,), n_heads=HEADS, n_layers=LAYERS, loss_queries=0)
    level = FODLevel(C, D, GRID, cfg).double()
    with torch.no_grad():  # σ spread over its whole range, including tiny values
        for layer in level.layers:
            for attn in (layer.intra, layer.inter):
                attn.sigma_proj.weight.normal_(0, 1.0)
        level.reference.normal_()
    return level


# ---- the literal restatement ------------------------------------------------------------------
def literal_prior(sigma):
    """sigma (B, H, N, 2) -> prior (B, H, N, N), authors' form: Gaussian with its prefactor on
    materialised squared distances, then divided by the row sum."""
    b, h = sigma.shape[:2]
    dist_r = torch.zeros(N, N, dtype=torch.float64)
    dist_c = torch.zeros(N, N, dtype=torch.float64)
    for i in range(N):
        for j in range(N):
            dist_r[i, j] = (i // GRID[1] - j // GRID[1]) ** 2
            dist_c[i, j] = (i % GRID[1] - j % GRID[1]) ** 2
    prior = torch.zeros(b, h, N, N, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(N):
                s0, s1 = sigma[bi, hi, i, 0], sigma[bi, hi, i, 1]
                g = 1.0 / (2 * math.pi * s0 * s1) * torch.exp(-dist_r[i] / (2 * s0 ** 2) - dist_c[i] / (2 * s1 ** 2))
                prior[bi, hi, i] = g / g.sum()
    return prior


def authors_kl_loss(p, q):
    res = p * (torch.log(p + 0.0001) - torch.log(q + 0.0001))
    return torch.mean(torch.sum(res, dim=-1), dim=1)  # sum over keys, mean over heads -> (B, N)


def literal_attention(attn, x, kv):
    b = x.shape[0]
    dh = D // HEADS
    q = attn.q_proj(x).view(b, N, HEADS, dh)
    k = attn.k_proj(kv).expand(b, -1, -1).reshape(b, N, HEADS, dh)
    v = attn.v_proj(kv).expand(b, -1, -1).reshape(b, N, HEADS, dh)
    scores = torch.einsum("blhe,bshe->bhls", q, k) / math.sqrt(dh)
    series = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhls,bshd->blhd", series, v).reshape(b, N, D)
    _ = torch.nn.Linear(D, D).double()(out)  # the authors' out_projection, discarded
    raw = attn.sigma_proj(x).view(b, N, HEADS, 2).transpose(1, 2)
    sigma = torch.pow(3, torch.sigmoid(raw * 5) + 1e-5) - 1
    return out, series, literal_prior(sigma)


def literal_level(level, tokens):
    """-> recon, [(series, prior)] intra and inter per layer."""
    x = level.embed.proj(tokens) + level.embed.pos
    ref = level.ref_embed.proj(level.reference) + level.ref_embed.pos
    intra, inter = [], []
    for layer in level.layers:
        o_intra, s_intra, p_intra = literal_attention(layer.intra, x, x)
        o_inter, s_inter, p_inter = literal_attention(layer.inter, x, ref[None])
        z_intra, z_inter = x + o_intra, x + o_inter  # residual in both branches
        y = layer.norm1(z_intra - z_inter)
        x = layer.norm2(y + layer.ffn(y))
        intra.append((s_intra, p_intra))
        inter.append((s_inter, p_inter))
    return level.head(level.norm(x)), intra, inter


def literal_losses(tokens, recon, intra, inter, l1=0.5, l2=0.5):
    rec = torch.mean((recon - tokens) ** 2) + torch.mean(1 - F.cosine_similarity(recon, tokens, dim=-1))

    def divs(pairs):
        d1 = d2 = ent = 0.0
        for series, prior in pairs:
            d1 = d1 + torch.mean(authors_kl_loss(series, prior.detach())) + torch.mean(authors_kl_loss(prior.detach(), series))
            d2 = d2 + torch.mean(authors_kl_loss(prior, series.detach())) + torch.mean(authors_kl_loss(series.detach(), prior))
            ent = ent + torch.mean(torch.mean(-torch.sum(series * torch.log(series + 0.0001), dim=-1), dim=1))
        return d1 / len(pairs), d2 / len(pairs), ent / len(pairs)

    d1_intra, d2_intra, e_intra = divs(intra)
    d1_inter, d2_inter, e_inter = divs(inter)
    loss1 = rec + l1 * d2_intra - l1 * d2_inter
    loss2 = rec - l1 * d1_intra - l2 * e_intra + l1 * d1_inter + l2 * e_inter
    return loss1, loss2


def literal_scores(level, tokens, weighting="softmax"):
    with torch.no_grad():
        recon, _, inter = literal_level(level, tokens)
        kl = 0.0
        for series, prior in inter:
            kl = kl + authors_kl_loss(series, prior) + authors_kl_loss(prior, series)
        kl = kl / len(inter)  # (B, N)
        weight = torch.softmax(-kl, dim=-1)
        weight = weight.max(dim=-1, keepdim=True).values - weight
        rec = torch.mean((tokens - recon) ** 2, dim=-1) + 1 - F.cosine_similarity(tokens, recon, dim=-1)
        # fastad's other weightings of the same divergence (FODConfig.inter_weight)
        return {"softmax": rec * weight, "global": rec * (1 - torch.exp(-kl)), "none": rec}[weighting]


# ---- the comparisons --------------------------------------------------------------------------
def test_losses_and_gradients_match_literal():
    level = make_level()
    tokens = torch.randn(B, N, C, dtype=torch.float64)
    sig = [torch.pow(3, torch.sigmoid(5 * layer.intra.sigma_proj(level.embed(tokens))) + 1e-5) - 1
           for layer in level.layers[:1]]
    assert sig[0].min() < 1e-3 and sig[0].max() > 1.0  # the test covers tiny and large σ

    recon, intra, inter = literal_level(level, tokens)
    loss1, loss2 = literal_losses(tokens, recon, intra, inter)
    level.zero_grad()
    loss1.backward(retain_graph=True)
    loss2.backward()
    ref_grads = {n: p.grad.clone() for n, p in level.named_parameters()}

    level.zero_grad()
    ours = fod_level_losses(tokens, level(tokens), FODConfig(loss_queries=0))
    ours.total.backward()
    assert torch.allclose(ours.loss1, loss1, rtol=1e-9, atol=1e-9)
    assert torch.allclose(ours.loss2, loss2, rtol=1e-9, atol=1e-9)
    for name, p in level.named_parameters():
        assert torch.allclose(p.grad, ref_grads[name], rtol=1e-6, atol=1e-9), name


@pytest.mark.parametrize("weighting", ["softmax", "global", "none"])
def test_scores_match_literal(weighting):
    level = make_level(1)
    tokens = torch.randn(B, N, C, dtype=torch.float64)
    with torch.no_grad():
        ours = level.score(tokens, "reference", weighting)
    assert torch.allclose(ours, literal_scores(level, tokens, weighting), rtol=1e-9, atol=1e-12)


class FixedBackbone(torch.nn.Module):
    strides, channels = (8, 16), [5, 7]

    def forward(self, x):
        b = x.shape[0]
        g = torch.Generator().manual_seed(0)
        return [torch.randn(b, 5, 8, 8, generator=g) * (1 + x.mean()), torch.randn(b, 7, 4, 4, generator=g)]


def test_anomaly_map_matches_authors_postprocessing():
    """Upsample (bilinear, align_corners) each level, average, scipy Gaussian σ=4, max."""
    torch.manual_seed(0)
    cfg = FODConfig(d_models=(16, 16), n_heads=2, n_layers=1, resize=64, crop=64, hypercolumn=False)
    model = FOD(cfg, FixedBackbone()).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        per_level = model.patch_scores(model.tokens(images))
    ups = [F.interpolate(s.view(2, 1, *cfg.grid(i)), size=(64, 64), mode="bilinear", align_corners=True)
           for i, s in enumerate(per_level)]
    avg = (ups[0] + ups[1]).squeeze(1).numpy() / 2
    ref = np.stack([gaussian_filter(m.astype(np.float64), sigma=4) for m in avg])
    model.cfg.level_combine = "mean"  # the authors' combination
    with torch.no_grad():
        amap, score = model(images)
    assert np.abs(amap.numpy() - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    assert np.allclose(score.numpy(), amap.flatten(1).amax(1).numpy())
    # Deviation 9 (default): geometric mean of the upsampled level maps, then the same blur.
    model.cfg.level_combine = "geometric"
    with torch.no_grad():
        amap, _ = model(images)
    geo = np.sqrt((ups[0] * ups[1]).squeeze(1).numpy())
    ref = np.stack([gaussian_filter(m.astype(np.float64), sigma=4) for m in geo])
    assert np.abs(amap.numpy() - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("queries", [7, 20])
def test_query_subsampling_is_unbiased_subset(queries):
    """Deviation 6: statistics on a row subset equal the full statistics restricted to it."""
    level = make_level(2)
    tokens = torch.randn(B, N, C, dtype=torch.float64)
    rows = torch.randperm(N)[:queries]
    with torch.no_grad():
        full = level(tokens)
        sub = level(tokens, rows)
    assert torch.allclose(full.recon, sub.recon, atol=1e-10)
    for a, b in zip(full.intra + full.inter, sub.intra + sub.inter):
        for fa, fb in zip(a, b):
            assert torch.allclose(fa[:, :, rows], fb, rtol=1e-9, atol=1e-10)


def test_blocked_inference_kl_equals_unblocked():
    level = make_level(3)
    x = level.embed(torch.randn(B, N, C, dtype=torch.float64))
    attn = level.layers[0].inter
    with torch.no_grad():
        q, k, v, sigma = attn.project(x, x)
        out_a, kl_a, _ = i2corr_attention(q, k, v, sigma, GRID, scale=attn.scale, impl="lean", block=3)
        out_b, kl_b, _ = i2corr_attention(q, k, v, sigma, GRID, scale=attn.scale, impl="lean", block=N)
    assert torch.allclose(out_a, out_b) and torch.allclose(kl_a, kl_b, rtol=1e-12, atol=1e-12)


def test_standardisation_is_a_reparametrisation():
    """Deviation 8: standardised tokens == the authors' plain model with folded 1×1 weights."""
    std_level = make_level(4)
    with torch.no_grad():
        std_level.feature_shift.uniform_(-3, 3)
        std_level.feature_scale.uniform_(0.5, 6)
    plain = make_level(4)
    mu, sd = std_level.feature_shift, std_level.feature_scale
    with torch.no_grad():
        for name in ("embed", "ref_embed"):
            src, dst = getattr(std_level, name).proj, getattr(plain, name).proj
            dst.weight.copy_(src.weight / sd)
            dst.bias.copy_(src.bias - src.weight @ (mu / sd))
        plain.head.weight.copy_(std_level.head.weight * sd[:, None])
        plain.head.bias.copy_(std_level.head.bias * sd + mu)
        plain.feature_shift.zero_()
        plain.feature_scale.fill_(1)
        tokens = torch.randn(B, N, C, dtype=torch.float64)
        assert torch.allclose(std_level(tokens).recon, plain(tokens).recon, rtol=1e-9, atol=1e-9)
        assert torch.allclose(std_level.score(tokens, "reference"), plain.score(tokens, "reference"),
                              rtol=1e-9, atol=1e-12)
