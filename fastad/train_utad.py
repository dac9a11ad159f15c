"""Training UTAD: stage 1 (IE-Net), stage 2 (Expert-Net on the stage-1 impressions), then the
perceptual-measurement normalisers — a plain loop, the same run directory as FOD's.

Run directory (see fastad.train): config.json ("model": "utad", config, backbone = the PM network's
spec + fingerprint, training record, normal_scores), model.safetensors (IE-Net, Expert-Net, PM
network, PM normalisers), checkpoint.safetensors/.json after every finished epoch of either stage
for `--resume` (also to extend a finished run with more epochs of stage 2).

CPU facts that shaped the default ("cpu") schedule, measured on the 2-core development machine
while two other jobs were running (load ≈ 5): at 128² internal resolution a stage-1 step (batch 8)
costs ≈ 1.9 s with IE-Net filters 8/16/32/64 and a stage-2 step ≈ 0.7 s with Expert-Net width 8,
with ONE intra-op thread — with two threads the same steps took up to 25× longer (OpenMP threads
waiting for a core another process holds). So on CPU the trainer uses half the cores (at least
one) unless FASTAD_THREADS says otherwise.

Everything frozen is computed once: the training images at the internal resolution, and after
stage 1 their impressions (stage 2's inputs). No augmentation. No model selection on test data.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .backbones import FeatureExtractor, available_strides
from .preprocess import prepare_images
from .data.layouts import list_samples
from .errors import FastADError
from .models.utad import PM_DEFAULTS, UTAD, UTADConfig, stage1_losses, stage2_losses
from .train import (CKPT_FILE, CKPT_STATE_FILE, CONFIG_FILE, WEIGHTS_FILE, _check_run_dir, _load_optimizer,
                    _optimizer_tensors, model_state, resolve_device, run_config, score_stats)
from .utils import atomic_path, seed_everything, write_json

log = logging.getLogger(__name__)

SCHEDULES = ("cpu", "gpu")


def cpu_threads() -> int:
    """Intra-op threads for CPU training: FASTAD_THREADS, else half the cores (>= 1)."""
    env = os.environ.get("FASTAD_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise FastADError(f"FASTAD_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise FastADError(f"FASTAD_THREADS must be a positive integer, got {env!r}")
        return n
    return max(1, (os.cpu_count() or 2) // 2)


def _restores_thread_count(fn):
    """train_utad narrows torch's intra-op threads for CPU training; callers get theirs back."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


def pm_network_defaults(pm_backbone: str | None, pm_weights) -> tuple[str, tuple[int, ...]]:
    """Which PM network: a given `pm_weights` file without a name means the paper's VGG-19."""
    name = pm_backbone or ("vgg19" if pm_weights not in (None, "auto") else "efficientnet_lite0")
    if name in PM_DEFAULTS:
        return name, PM_DEFAULTS[name]
    strides = available_strides(name)  # unknown name -> FastADError
    if len(strides) < 3:
        raise FastADError(f"PM backbone {name} has fewer than three feature depths ({strides})")
    return name, tuple(strides[:3])


def _config(out: Path, config, resume: bool, overrides: dict, schedule: str | None) -> tuple[UTADConfig, dict | None]:
    if resume:
        saved = json.loads((out / CONFIG_FILE).read_text()) if (out / CONFIG_FILE).exists() else \
            json.loads((out / CKPT_STATE_FILE).read_text())["run"]
        if saved.get("model") != "utad":
            raise FastADError(f"cannot resume {out} as UTAD: it holds a {saved.get('model')!r} run")
        cfg = UTADConfig.from_dict(saved["config"])
        free = ("epochs1", "epochs2")
        changed = {k: (getattr(cfg, k), v) for k, v in overrides.items() if k not in free and getattr(cfg, k) != v}
        if changed:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise FastADError(f"cannot resume {out} with a different config ({what}); only the epochs may change")
        return replace(cfg, **{k: v for k, v in overrides.items() if k in free}), saved
    if schedule is not None and schedule not in SCHEDULES:
        raise FastADError(f"unknown schedule {schedule!r} (use cpu or gpu)")
    base = config or (UTADConfig.gpu() if schedule == "gpu" else UTADConfig())
    return replace(base, **overrides), None


def _save_checkpoint(out: Path, model: UTAD, opts, record: dict) -> None:
    tensors = {f"model.{k}": v for k, v in model_state(model).items()}
    metas = []
    for i, opt in enumerate(opts):
        t, meta = _optimizer_tensors(opt)
        tensors |= {f"opt{i}.{k}": v for k, v in t.items()}
        metas.append(meta)
    with atomic_path(out / CKPT_FILE) as tmp:
        save_file(tensors, str(tmp))
    write_json(out / CKPT_STATE_FILE, {**record, "optimizers": metas})


def _load_checkpoint(out: Path, model: UTAD, opts) -> dict:
    try:
        record = json.loads((out / CKPT_STATE_FILE).read_text())
        tensors = load_file(str(out / CKPT_FILE))
    except (OSError, ValueError) as e:
        raise FastADError(f"cannot read checkpoint in {out}: {e}") from None
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        for i, opt in enumerate(opts):
            pre = f"opt{i}."
            _load_optimizer(opt, {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)},
                            record["optimizers"][i])
    except (RuntimeError, KeyError, ValueError, IndexError) as e:
        raise FastADError(f"checkpoint in {out} does not match this model: {str(e).splitlines()[0]}") from None
    return record


@torch.no_grad()
def _batched(fn, x: torch.Tensor, device, batch_size: int = 16) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size].to(device)).cpu() for i in range(0, x.shape[0], batch_size)])


def _run_stage(name, n_epochs, start, step_fn, n, bs, seed, history, progress, on_epoch):
    from tqdm.auto import tqdm

    steps = n // bs  # drop the ragged last batch (BatchNorm and the MI shuffle want full batches)
    for epoch in range(start, n_epochs):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed * 1000 + epoch + (0 if name == "stage1" else 500))
        order = torch.randperm(n, generator=gen)
        sums: dict[str, float] = {}
        bar = tqdm(range(steps), desc=f"{name} epoch {epoch + 1}/{n_epochs}", unit="step",
                   disable=None if progress else True, leave=False)
        for step in bar:
            losses = step_fn(order[step * bs:(step + 1) * bs], gen)
            for k, v in losses._asdict().items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            if not all(math.isfinite(v) for v in sums.values()):
                raise FastADError(f"{name} diverged at epoch {epoch + 1} step {step + 1} (non-finite loss)")
        bar.close()
        secs = time.perf_counter() - t0
        rec = {"stage": name, "epoch": epoch + 1, "seconds": round(secs, 2),
               **{k: round(v / steps, 6) for k, v in sums.items()}}
        history.append(rec)
        log.info("%s epoch %d/%d  %.1fs  %s", name, epoch + 1, n_epochs, secs,
                 "  ".join(f"{k}={v / steps:.5f}" for k, v in sums.items()))
        on_epoch(epoch + 1, secs)


@_restores_thread_count
def train_utad(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layout: str | None = None,
    schedule: str | None = None,
    epochs1: int | None = None,
    epochs2: int | None = None,
    pm_backbone: str | None = None,
    pm_weights=None,
    device: str = "auto",
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    config: UTADConfig | None = None,
) -> Path:
    """Train UTAD on the normal training images of `data`; write the run to `out`. -> `out`.

    schedule: "cpu" (default: 128² internal, small nets) or "gpu" (the released model's sizes).
    pm_backbone / pm_weights: the perceptual network (default offline EfficientNet-Lite0; a
    weights file without a name means VGG-19). `lr` sets both stages' learning rates.
    """
    out = Path(out)
    _check_run_dir(out, resume, overwrite)
    dev = resolve_device(device)
    overrides = {k: v for k, v in dict(epochs1=epochs1, epochs2=epochs2, batch_size=batch_size,
                                         seed=seed).items() if v is not None}
    if lr is not None:
        overrides |= {"lr1": lr, "lr2": lr}
    if pm_backbone is not None or pm_weights not in (None, "auto"):
        name, strides = pm_network_defaults(pm_backbone, pm_weights)
        overrides |= {"pm_backbone": name, "pm_strides": strides}
    cfg, saved = _config(out, config, resume, overrides, schedule)
    try:
        cfg.validate()
    except ValueError as e:
        raise FastADError(f"invalid UTAD config: {e}") from None
    if min(cfg.epochs1, cfg.epochs2) < 0 or cfg.batch_size < 2 or not (cfg.lr1 > 0 and cfg.lr2 > 0):
        raise FastADError(f"epochs must be >= 0, batch size >= 2 (the MI term shuffles within a batch) "
                          f"and lr > 0 (got {cfg.epochs1}/{cfg.epochs2}, {cfg.batch_size}, {cfg.lr1}/{cfg.lr2})")

    # Everything that can fail on user input happens before the first byte is written.
    samples = list_samples(data, "train", layout=layout)
    if len(samples) < 2:
        raise FastADError(f"UTAD needs at least 2 training images, found {len(samples)}")
    if dev.type == "cpu":
        torch.set_num_threads(cpu_threads())
    seed_everything(cfg.seed)
    if pm_weights in (None, "auto") and cfg.pm_backbone == "vgg19":
        raise FastADError("the VGG-19 perceptual network needs its weights file (--pm-weights FILE); "
                          "none can be downloaded here")
    weights = saved["backbone"]["weights_source"] if saved and pm_weights in (None, "auto") and \
        saved["backbone"]["weights_source"].startswith("file:") else (pm_weights or "auto")
    if isinstance(weights, str) and weights.startswith("file:"):
        weights = weights[5:]
    pm = FeatureExtractor(cfg.pm_backbone, cfg.pm_strides, weights=weights)
    model = UTAD(cfg, pm).to(dev)
    if saved is not None and saved["backbone"]["fingerprint"] != pm.fingerprint():
        raise FastADError(f"cannot resume {out}: its PM network weights ({saved['backbone']['weights_source']}) "
                          f"differ from the ones loaded now ({pm.weights_source})")
    t0 = time.perf_counter()
    images = prepare_images([s.path for s in samples], cfg.resize, cfg.crop)
    images = _batched(model.to_internal, images, "cpu")  # (n, 3, s, s) on the CPU
    load_seconds = time.perf_counter() - t0

    opt1 = torch.optim.Adam(model.ie.parameters(), lr=cfg.lr1)
    opt2 = torch.optim.Adam(model.expert.parameters(), lr=cfg.lr2)
    history: list[dict] = []
    done1 = done2 = 0
    seconds = {"stage1": 0.0, "stage2": 0.0}
    if resume:
        record = _load_checkpoint(out, model, (opt1, opt2))
        done1, done2, history = record["epochs1_done"], record["epochs2_done"], record["history"]
        seconds = record["seconds"]
        if done2 > 0 and cfg.epochs1 != done1:
            raise FastADError(f"cannot change stage-1 epochs of {out} after stage 2 started "
                              f"({done1} done); only stage 2 can be extended")
    n, bs = len(samples), min(cfg.batch_size, len(samples))
    meta = {"data": str(Path(data).resolve()), "layout": layout, "num_train_images": n, "device": str(dev),
            "threads": torch.get_num_threads() if dev.type == "cpu" else None,
            "torch": torch.__version__, "python": platform.python_version()}
    out.mkdir(parents=True, exist_ok=True)

    def checkpoint(stage):
        def on_epoch(epoch, secs):
            nonlocal done1, done2
            if stage == "stage1":
                done1 = epoch
            else:
                done2 = epoch
            seconds[stage] = round(seconds[stage] + secs, 2)
            _save_checkpoint(out, model, (opt1, opt2), {
                "epochs1_done": done1, "epochs2_done": done2, "history": history, "seconds": seconds,
                "run": {**run_config(model, {"training": meta}), "model": "utad"}})
        return on_epoch

    # Stage 1: IE-Net on the normal images.
    def step1(idx, gen):
        x = images[idx].to(dev, non_blocking=True)
        losses = stage1_losses(model.ie, x, cfg, generator=gen)
        losses.total.backward()
        opt1.step()
        opt1.zero_grad(set_to_none=True)
        return losses

    model.ie.train()
    _run_stage("stage1", cfg.epochs1, done1, step1, n, bs, cfg.seed, history, progress, checkpoint("stage1"))
    model.ie.eval()

    # Stage 2: Expert-Net on (image, impression) pairs; the impressions are frozen, computed once.
    t1 = time.perf_counter()
    impressions = _batched(model.ie, images, dev)
    impression_seconds = time.perf_counter() - t1

    def step2(idx, gen):
        x = images[idx].to(dev, non_blocking=True)
        imp = impressions[idx].to(dev, non_blocking=True)
        losses = stage2_losses(model.expert, x, imp, cfg)
        losses.total.backward()
        opt2.step()
        opt2.zero_grad(set_to_none=True)
        return losses

    model.expert.train()
    _run_stage("stage2", cfg.epochs2, done2, step2, n, bs, cfg.seed, history, progress, checkpoint("stage2"))
    model.eval()

    # PM normalisers (choice 2 of models/utad.py) and normal-score statistics, training images only.
    t2 = time.perf_counter()
    with torch.no_grad():
        model.pm_scale.fill_(1.0)
        sums = torch.zeros(2, len(cfg.pm_strides))
        for i in range(0, n, 16):
            chunk = images[i:i + 16].to(dev)
            sums += model.level_means(chunk) * chunk.shape[0]
        model.fit_pm(sums / n)
    normal = utad_normal_score_stats(model, images, dev)
    fit_seconds = time.perf_counter() - t2
    training = {**meta, "schedule": cfg.schedule, "epochs1_done": cfg.epochs1, "epochs2_done": cfg.epochs2,
                "load_seconds": round(load_seconds, 2), "impression_seconds": round(impression_seconds, 2),
                "stage1_seconds": seconds["stage1"], "stage2_seconds": seconds["stage2"],
                "fit_seconds": round(fit_seconds, 2), "pm_scale": model.pm_scale.cpu().tolist(),
                "history": history}
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(model_state(model), str(tmp), metadata={"format": "fastad-utad", "version": __version__})
    conf = run_config(model, {"training": training, "normal_scores": normal})
    conf["model"] = "utad"
    write_json(out / CONFIG_FILE, conf)
    return out


@torch.no_grad()
def utad_normal_score_stats(model: UTAD, images: torch.Tensor, device, max_images: int = 64,
                            batch_size: int = 8) -> dict:
    """As fastad.train.normal_score_stats: image scores of up to 64 training images (in-sample)."""
    n = min(max_images, images.shape[0])
    scores = []
    for i in range(0, n, batch_size):
        x = images[i:min(i + batch_size, n)].to(device)
        st = model.stages(x)
        amap = model.blur(model.pm_terms(st).sum(1))
        scores.append(amap.flatten(1).amax(1).float().cpu())
    return score_stats(torch.cat(scores).numpy())


# --------------------------------------------------------------------------------------------
# Loading a run, intermediate images
# --------------------------------------------------------------------------------------------
def load_utad(run: Path, conf: dict, device: str = "auto") -> UTAD:
    """fastad.api.load_model's UTAD branch: read model.safetensors, rebuild, move, eval mode."""
    from .api import read_weights

    state = read_weights(run)
    return restore_utad(run, conf, state).to(resolve_device(device)).eval()


def restore_utad(run: Path, conf: dict, state: dict[str, torch.Tensor]) -> UTAD:
    """Rebuild a UTAD model from a run's config.json and model.safetensors tensors."""
    try:
        cfg = UTADConfig.from_dict(conf["config"])
        cfg.validate()
    except (TypeError, ValueError) as e:
        raise FastADError(f"{run / CONFIG_FILE}: invalid UTAD config: {e}") from None
    backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    pm = FeatureExtractor.restore(conf["backbone"], backbone_state)
    if list(cfg.pm_strides) != list(pm.strides):
        raise FastADError(f"{run}: config PM strides {cfg.pm_strides} do not match the network's {pm.strides}")
    from .api import load_state_checked

    return load_state_checked(UTAD(cfg, pm), state, run, "other PM network or config?")


@torch.no_grad()
def save_intermediates(model: UTAD, images: torch.Tensor, names: list[str], out_dir: str | os.PathLike,
                       vmax: float | None = None, batch_size: int = 8) -> list[Path]:
    """Per image one PNG strip: input | impression | reconstruction | naïve impression |
    PM(input, reconstruction) | PM(naïve, impression) | final map, all at the internal resolution
    (maps resized to it), maps on one colour scale 0..vmax (default: the largest final-map value)."""
    from PIL import Image

    from .visualize import normalize_map

    device = next(model.parameters()).device
    parts = []
    for i in range(0, images.shape[0], batch_size):
        ex = model.explain(images[i:i + batch_size].to(device))
        parts.append({k: v.float().cpu() for k, v in ex.items()})
    ex = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    s = model.cfg.size
    top = float(ex["anomaly_map"].max()) if vmax is None else float(vmax)
    import matplotlib

    cmap = matplotlib.colormaps["jet"]
    out = Path(out_dir)
    written = []
    for j, name in enumerate(names):
        tiles = [(ex[k][j].permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
                 for k in ("image", "impression", "reconstruction", "naive_impression")]
        for k in ("map_recon", "map_impression", "anomaly_map"):
            m = torch.nn.functional.interpolate(ex[k][j][None, None], size=(s, s), mode="area")[0, 0].numpy()
            tiles.append((cmap(normalize_map(m, 0.0, top))[..., :3] * 255).astype(np.uint8))
        strip = np.concatenate(tiles, axis=1)
        path = out / f"{name}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(strip).save(tmp, format="PNG")
        written.append(path)
    return written


def eval_intermediates(predictor, data, layout: str | None, out_dir: str | os.PathLike) -> list[Path]:
    """`fastad eval --intermediates DIR`: one strip per test image (see save_intermediates), named
    like the overlays (defect_name.png), maps on one colour scale (the largest final-map value)."""
    from .evaluate import _overlay_name, load_test_set

    cfg = predictor.model.cfg
    samples, images, _ = load_test_set(data, layout, cfg.resize, cfg.crop)
    names = [_overlay_name(s, Path(data))[:-4] for s in samples]
    return save_intermediates(predictor.model, images, names, out_dir)
