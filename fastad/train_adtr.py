"""Training ADTR: normal-only (MSE) and anomaly-available (ADTR+) modes, a plain loop.

Read top-down: feature caching (normal images, synthetic anomalies, labelled anomalies) → the
anomaly pool → `train_adtr`. The run directory, checkpoints, resume rules and atomic writes are
the shared ones of `fastad.train` (a run differs from FOD's only in `"model": "adtr"` and its config).

The backbone is frozen, so every image's features are computed once per run and cached in memory
(bottle: 209 images → 256 positions × 176 channels, ~37 MB): epochs cost only the transformer.
With `synthetic`, a fixed pool of synthetic anomalies (one per training image by default) is
generated from the training images at the start of the run, deterministically from the seed, and
cached the same way; a resumed run rebuilds the identical pool.

The learning rate follows a cosine decay over the planned steps (epochs × steps per epoch): an
interrupted run resumed with `--resume` continues exactly; `--resume --epochs N` with a larger N
re-plans the decay over the new total (not identical to a fresh N-epoch run). The labelled
anomaly folder is not fingerprinted: pass the same `--anomalies DIR` when resuming.

Modes (combinable): normal-only (default) · `synthetic` (pixel labels from the synthetic masks) ·
`anomalies` with `anomaly_labels="image"` · `anomalies` with `anomaly_labels="pixel"` (masks).
"""
from __future__ import annotations

import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import NamedTuple

import torch

from .backbones import FeatureExtractor
from .data.dataset import AnomalyDataset
from .preprocess import prepare_images
from .data.layouts import Sample, list_anomaly_samples, list_samples
from .errors import FastADError
from .models.adtr import (ADTR, ADTRConfig, anomaly_available_loss, grid_labels, mse_loss,
                          pseudo_huber_score, synthesise)
from .train import (_check_run_dir, check_resume_backbone, load_checkpoint, resolve_config,
                    resolve_device, run_config, save_checkpoint, score_stats, write_run)
from .utils import seed_everything

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Cached features
# --------------------------------------------------------------------------------------------
class AnomalyPool(NamedTuple):
    """Anomalous training images as cached features.

    tokens (n, N, C); y (n, N) pixel labels on the grid (area fractions), only meaningful where
    pixel[i]; pixel (n,) bool: True → L_px with y, False → image-level L_img.
    """
    tokens: torch.Tensor
    y: torch.Tensor
    pixel: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]


@torch.no_grad()
def cache_normal_and_synthetic(model: ADTR, samples: list[Sample], device: torch.device, batch_size: int = 16,
                               progress: bool = True) -> tuple[torch.Tensor, AnomalyPool | None]:
    """Features of the normal training images (n, N, C) and, when cfg.synthetic is set, of a pool
    of synthetic anomalies made from them (cfg.synthetic_pool images, default one per image)."""
    from tqdm.auto import tqdm

    cfg = model.cfg
    n = len(samples)
    n_syn = (cfg.synthetic_pool or n) if cfg.synthetic else 0
    per_chunk = [0] * math.ceil(n / batch_size)
    for i in range(n_syn):  # synthetic image i comes from chunk (i mod n) // batch_size
        per_chunk[(i % n) // batch_size] += 1
    normal, syn_tokens, syn_y = [], [], []
    bar = tqdm(total=n + n_syn, desc="features", unit="img", disable=None if progress else True, leave=False)
    for c, start in enumerate(range(0, n, batch_size)):
        chunk = samples[start:start + batch_size]
        images = prepare_images([s.path for s in chunk], cfg.resize, cfg.crop)
        normal.append(model.tokens(images.to(device)).float().cpu())
        if per_chunk[c]:
            imgs, masks = synthesise(images, cfg.synthetic, per_chunk[c], seed=cfg.seed * 7919 + c)
            syn_tokens.append(model.tokens(imgs.to(device)).float().cpu())
            syn_y.append(grid_labels(masks, model.grid))
        bar.update(len(chunk) + per_chunk[c])
    bar.close()
    pool = None
    if n_syn:
        t = torch.cat(syn_tokens)
        pool = AnomalyPool(t, torch.cat(syn_y), torch.ones(len(t), dtype=torch.bool))
    return torch.cat(normal), pool


@torch.no_grad()
def cache_labelled_anomalies(model: ADTR, samples: list[Sample], labels: str, device: torch.device,
                             batch_size: int = 16) -> AnomalyPool:
    """Features (and grid labels from the masks, for pixel labels) of user-labelled anomalies."""
    cfg = model.cfg
    ds = AnomalyDataset(samples, cfg.resize, cfg.crop)
    items = [ds[i] for i in range(len(ds))]  # reads (and checks) every file before training
    masks = torch.stack([it["mask"][0] for it in items])
    if labels == "pixel":
        for s, m in zip(samples, masks):
            if not bool(m.any()):
                raise FastADError(f"mask {s.mask_path} of anomalous image {s.path} is empty "
                                  "(pixel labels need the defect marked; use --anomaly-labels image otherwise)")
    images = torch.stack([it["image"] for it in items])
    tokens = torch.cat([model.tokens(images[i:i + batch_size].to(device)).float().cpu()
                        for i in range(0, len(images), batch_size)])
    y = grid_labels(masks, model.grid)
    return AnomalyPool(tokens, y, torch.full((len(tokens),), labels == "pixel"))


def _merge(pools: list[AnomalyPool | None]) -> AnomalyPool | None:
    pools = [p for p in pools if p is not None]
    if not pools:
        return None
    return AnomalyPool(*(torch.cat(parts) for parts in zip(*pools)))


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------
def train_adtr(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layout: str | None = None,
    epochs: int | None = None,
    backbone: str | None = None,
    weights="auto",
    device: str = "auto",
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    config: ADTRConfig | None = None,
    anomalies: str | os.PathLike | None = None,
    anomaly_labels: str | None = None,
    anomaly_masks: str | os.PathLike | None = None,
    synthetic: str | None = None,
) -> Path:
    """Train ADTR on the normal training images of `data` (plus anomalies, see the module
    docstring); write the run to `out`. -> `out`.

    `anomalies`: a folder of labelled anomalous images (masks in ANOMALIES/masks or `anomaly_masks`);
    `anomaly_labels`: "image" or "pixel" (default: pixel when every image has a mask);
    `synthetic`: "confetti", "perlin" or "cutpaste". Arguments left at None take the ADTRConfig
    defaults (or, with `resume`, the run's config).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    if anomalies is None and (anomaly_labels is not None or anomaly_masks is not None):
        raise FastADError("--anomaly-labels/--anomaly-masks need --anomalies DIR (a folder of labelled anomalous images)")
    _check_run_dir(out, resume, overwrite)
    dev = resolve_device(device)
    # Anomalous images are checked (and their label kind decided) before anything is written.
    anomaly_samples, labels = ([], None)
    if anomalies is not None:
        anomaly_samples, labels = list_anomaly_samples(anomalies, anomaly_labels, anomaly_masks)
    overrides = dict(epochs=epochs, backbone=backbone, batch_size=batch_size, lr=lr, seed=seed,
                     anomaly_labels=labels, synthetic=synthetic)
    cfg, saved = resolve_config(ADTRConfig, "adtr", out, resume, overrides, config)
    if cfg.anomaly_labels is not None and anomalies is None:
        raise FastADError(f"{'cannot resume ' + str(out) + ' without' if resume else 'config asks for'} "
                          "labelled anomalies: pass --anomalies DIR")
    try:
        cfg.validate()
    except ValueError as e:
        raise FastADError(f"invalid ADTR config: {e}") from None

    samples = list_samples(data, "train", layout=layout)
    seed_everything(cfg.seed)
    extractor = FeatureExtractor(cfg.backbone, cfg.strides, weights=weights)
    if resume:
        check_resume_backbone(out, saved, extractor)
    try:
        model = ADTR(cfg, extractor).to(dev)
    except ValueError as e:
        raise FastADError(f"invalid ADTR config: {e}") from None
    t0 = time.perf_counter()
    tokens, synthetic_pool = cache_normal_and_synthetic(model, samples, dev, progress=progress)
    labelled = cache_labelled_anomalies(model, anomaly_samples, labels, dev) if anomaly_samples else None
    pool = _merge([labelled, synthetic_pool])
    feature_seconds = time.perf_counter() - t0
    model.fit_normalisation(tokens)
    seed_everything(cfg.seed)  # the transformer's init does not depend on the pool's RNG use

    params = [p for p in model.transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(samples)
    bs = min(cfg.batch_size, n)
    steps = n // bs  # drop the ragged last batch: equal weights, static shapes
    total_steps = cfg.epochs * steps
    # Cosine decay from lr to 1% of lr over the whole schedule (a function of the global step, so
    # resuming with more epochs stretches the remaining schedule deterministically).
    lr_at = lambda step: cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))  # noqa: E731
    history: list[dict] = []
    start_epoch, train_seconds = 0, 0.0
    if resume:
        record = load_checkpoint(out, model, opt)
        start_epoch, history, train_seconds = record["epochs_done"], record["history"], record["train_seconds"]
        model.fit_normalisation(tokens)

    meta = {"data": str(Path(data).resolve()), "layout": layout, "num_train_images": n,
            "num_labelled_anomalies": len(anomaly_samples),
            "anomalies": str(Path(anomalies).resolve()) if anomalies is not None else None,
            "num_synthetic_anomalies": len(synthetic_pool) if synthetic_pool is not None else 0,
            "device": str(dev), "torch": torch.__version__, "python": platform.python_version()}
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t_epoch = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # resumable shuffling
        order = torch.randperm(n, generator=gen)
        anomaly_order = torch.randperm(len(pool), generator=gen) if pool is not None else None
        sums = {"loss": 0.0, "normal": 0.0, "anomalous": 0.0}
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=None if progress else True, leave=False)
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps + step)
            x = tokens[order[step * bs:(step + 1) * bs]].to(dev, non_blocking=True)
            if pool is None:
                loss = mse_loss(x, model.reconstruct(x))
                parts = {"loss": loss.item(), "normal": loss.item(), "anomalous": 0.0}
            else:
                k = min(cfg.anomaly_batch, len(pool))
                pick = anomaly_order[(step * k + torch.arange(k)) % len(pool)]
                xa = pool.tokens[pick].to(dev)
                phi = pseudo_huber_score(torch.cat([x, xa]), model.reconstruct(torch.cat([x, xa])))
                phi_n, phi_a = phi[:len(x)], phi[len(x):]
                px = pool.pixel[pick].to(dev)
                losses = anomaly_available_loss(
                    phi_n, phi_a[px] if bool(px.any()) else None, pool.y[pick].to(dev)[px],
                    phi_a[~px] if bool((~px).any()) else None, cfg)
                loss = losses.total
                parts = {"loss": loss.item(), "normal": losses.normal.item(), "anomalous": losses.anomalous.item()}
            if not math.isfinite(parts["loss"]):
                raise FastADError(f"training diverged at epoch {epoch + 1} step {step + 1} (non-finite loss)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for key, v in parts.items():
                sums[key] += v
            bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.4f}")
        bar.close()
        epoch_seconds = time.perf_counter() - t_epoch
        train_seconds += epoch_seconds
        history.append({"epoch": epoch + 1, "seconds": round(epoch_seconds, 2),
                        **{k: round(v / steps, 6) for k, v in sums.items()}})
        log.info("epoch %d/%d  %.1fs  %s", epoch + 1, cfg.epochs, epoch_seconds,
                 "  ".join(f"{k}={v / steps:.4f}" for k, v in sums.items()))
        record = {"epochs_done": epoch + 1, "history": history, "train_seconds": round(train_seconds, 2),
                  "run": run_config(model, {"training": meta})}
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(out, model, opt, record)

    if start_epoch >= cfg.epochs:
        log.info("nothing to train: %s already has %d epochs", out, start_epoch)
    model.eval()
    normal = normal_score_stats(model, tokens, dev)
    training = {**meta, "epochs_done": cfg.epochs, "feature_seconds": round(feature_seconds, 2),
                "train_seconds": round(train_seconds, 2), "history": history}
    write_run(out, model, training, normal)
    return out


@torch.no_grad()
def normal_score_stats(model: ADTR, tokens: torch.Tensor, device: torch.device, max_images: int = 64,
                       batch_size: int = 16) -> dict:
    """Image-score statistics on (up to `max_images`) training images — same keys as FOD's."""
    n = min(max_images, tokens.shape[0])
    scores = [model.score_tokens(tokens[i:min(i + batch_size, n)].to(device))[1].float().cpu()
              for i in range(0, n, batch_size)]
    return score_stats(torch.cat(scores).numpy())
