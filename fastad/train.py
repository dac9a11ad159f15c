"""Training: a plain PyTorch loop for the reference models (no framework).

Read top-down: device/run-dir helpers → cached backbone tokens → checkpoint I/O → `train` (per
family dispatch) → `train_fod` → helpers shared with the other families' trainers (config
resolution and resume rules, final run files, score statistics). ADTR's loop: `train_adtr.py`.

A run directory holds everything needed to use the model later, nothing pickled:
    config.json          model config, backbone spec + fingerprint, training record
    model.safetensors    all weights (backbone included, so a run is self-contained)
    checkpoint.safetensors / checkpoint.json   model + Adam state after the last finished epoch,
                         for `--resume` (also to continue a finished run with more `--epochs`)
Every file is written atomically (temp file + rename): an interrupted run leaves the previous
complete checkpoint, never a truncated one.

The backbone is frozen and the authors use no augmentation, so its tokens are computed once
per run and cached in memory (bottle: 209 images → ~60 MB); each epoch then costs only the
transformers. Model selection never looks at the test set: the schedule is fixed.
"""
from __future__ import annotations

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
from .backbones import FeatureExtractor
from .preprocess import prepare_images
from .data.layouts import Sample, list_samples
from .errors import FastADError
from .models.fod import FOD, FODConfig, fod_level_losses
from .utils import atomic_path, seed_everything, write_json

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CKPT_FILE = "checkpoint.safetensors"
CKPT_STATE_FILE = "checkpoint.json"
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, CKPT_FILE, CKPT_STATE_FILE)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    """"auto" → cuda when available, else cpu. Unknown or unavailable devices are a FastADError."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise FastADError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastADError(f"device {name!r} requested but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise FastADError(f"unsupported device {name!r} (use auto, cpu, cuda or cuda:N)")
    return device


@torch.no_grad()
def cache_tokens(model: FOD, samples: list[Sample], device: torch.device, batch_size: int = 16,
                 progress: bool = True) -> list[torch.Tensor]:
    """Backbone tokens of every sample, per level [(n, N_l, C_l)] on the CPU (fp32)."""
    from tqdm.auto import tqdm

    cfg = model.cfg
    parts: list[list[torch.Tensor]] = [[] for _ in model.levels]
    bar = tqdm(total=len(samples), desc="features", unit="img", disable=None if progress else True, leave=False)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        images = prepare_images([s.path for s in chunk], cfg.resize, cfg.crop).to(device)
        for level, toks in enumerate(model.tokens(images)):
            parts[level].append(toks.float().cpu())
        bar.update(len(chunk))
    bar.close()
    return [torch.cat(p) for p in parts]


def _check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if out.exists() and not out.is_dir():
        raise FastADError(f"--out {out} exists and is not a directory")
    if resume:
        if not (out / CKPT_STATE_FILE).exists():
            raise FastADError(f"cannot resume: {out} has no {CKPT_STATE_FILE} (start without --resume)")
    elif existing and not overwrite:
        raise FastADError(f"{out} already holds a run ({', '.join(existing)}); "
                          "use --resume to continue it, --overwrite to replace it, or another --out")


# --------------------------------------------------------------------------------------------
# Checkpoints: safetensors for tensors, JSON for everything else (never pickle)
# --------------------------------------------------------------------------------------------
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = opt.state_dict()
    tensors = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            tensors[f"optim.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def model_state(model: FOD) -> dict[str, torch.Tensor]:
    """Persistent weights as contiguous CPU tensors (safetensors refuses shared/strided ones)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(out: Path, model: FOD, opt: torch.optim.Optimizer, record: dict) -> None:
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    tensors = {f"model.{k}": v for k, v in model_state(model).items()} | opt_tensors
    with atomic_path(out / CKPT_FILE) as tmp:
        save_file(tensors, str(tmp))
    write_json(out / CKPT_STATE_FILE, {**record, "optimizer": opt_meta})


def load_checkpoint(out: Path, model: FOD, opt: torch.optim.Optimizer) -> dict:
    try:
        record = json.loads((out / CKPT_STATE_FILE).read_text())
        tensors = load_file(str(out / CKPT_FILE))
    except (OSError, ValueError) as e:
        raise FastADError(f"cannot read checkpoint in {out}: {e}") from None
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
        _load_optimizer(opt, tensors, record["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise FastADError(f"checkpoint in {out} does not match this model: {str(e).splitlines()[0]}") from None
    return record


def run_config(model, extra: dict) -> dict:
    """The config.json of a run: enough to rebuild the model and check the weights match."""
    bb = model.backbone
    return {
        "model": model.family,
        "fastad_version": __version__,
        "config": model.cfg.to_dict(),
        "backbone": {
            "name": bb.name,
            "strides": list(bb.strides),
            "channels": list(bb.channels),
            "weights_source": bb.weights_source,
            "mean": bb.mean.flatten().tolist(),
            "std": bb.std.flatten().tolist(),
            "model_kwargs": bb.model_kwargs,
            "fingerprint": bb.fingerprint(),
        },
        **extra,
    }


# --------------------------------------------------------------------------------------------
# The training loops: one per model family (ADTR's in fastad/train_adtr.py)
# --------------------------------------------------------------------------------------------
MODELS = ("fod", "adtr")


def train(data: str | os.PathLike, out: str | os.PathLike, *, model: str = "fod", **kwargs) -> Path:
    """Train a model family ("fod" or "adtr") on `data`, writing the run to `out`. Keyword arguments
    are those of `train_fod` / `fastad.train_adtr.train_adtr`."""
    if model == "fod":
        return train_fod(data, out, **kwargs)
    if model == "adtr":
        from .train_adtr import train_adtr

        return train_adtr(data, out, **kwargs)
    raise FastADError(f"unknown model {model!r} (use {', '.join(MODELS)})")


def train_fod(
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
    hypercolumn: bool | None = None,
    resume: bool = False,
    overwrite: bool = False,
    compile_stats: bool | None = None,
    progress: bool = True,
    config: FODConfig | None = None,
) -> Path:
    """Train FOD on the normal training images of `data`; write the run to `out`. -> `out`.

    Arguments left at None take the FODConfig defaults (or, with `resume`, the run's config).
    `compile_stats` (default: on unless the environment sets FASTAD_COMPILE=0) compiles the
    KL/entropy statistics with torch.compile — ~3x faster steps on CPU after ~20 s of compiling.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    if compile_stats is None:
        compile_stats = os.environ.get("FASTAD_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")
    _check_run_dir(out, resume, overwrite)
    dev = resolve_device(device)
    overrides = dict(epochs=epochs, backbone=backbone, batch_size=batch_size, lr=lr, seed=seed,
                     hypercolumn=hypercolumn)
    cfg, saved = resolve_config(FODConfig, "fod", out, resume, overrides, config)

    # Everything that can fail on user input happens before the first byte is written.
    samples = list_samples(data, "train", layout=layout)
    seed_everything(cfg.seed)
    extractor = FeatureExtractor(cfg.backbone, cfg.backbone_strides(), weights=weights)
    model = FOD(cfg, extractor).to(dev)
    if resume:
        check_resume_backbone(out, saved, extractor)
    t0 = time.perf_counter()
    tokens = cache_tokens(model, samples, dev, progress=progress)
    feature_seconds = time.perf_counter() - t0
    model.fit_reference([t.to(dev) for t in tokens])
    if compile_stats:
        model.compile_stats()

    params = [p for p in model.levels.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    history: list[dict] = []
    start_epoch, train_seconds = 0, 0.0
    if resume:
        record = load_checkpoint(out, model, opt)
        start_epoch, history = record["epochs_done"], record["history"]
        train_seconds = record["train_seconds"]
        if record["reference_fingerprint"] != _tensor_digest(model):
            log.warning("training images changed since the checkpoint: reference features recomputed")
        model.fit_reference([t.to(dev) for t in tokens])

    n = len(samples)
    bs = min(cfg.batch_size, n)
    steps = n // bs  # drop the ragged last batch: static shapes (compiled stats), equal weights
    meta = {"data": str(Path(data).resolve()), "layout": layout, "num_train_images": n,
            "device": str(dev), "torch": torch.__version__, "python": platform.python_version(),
            "compiled_stats": compile_stats}
    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # resumable shuffling
        order = torch.randperm(n, generator=gen)
        sums: dict[str, float] = {}
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=None if progress else True, leave=False)
        for step in bar:
            idx = order[step * bs:(step + 1) * bs]
            for li, (level, toks) in enumerate(zip(model.levels, tokens)):
                x = toks[idx].to(dev, non_blocking=True)
                n_tok = x.shape[1]
                rows = None
                if cfg.loss_queries and cfg.loss_queries < n_tok:
                    rows = torch.randperm(n_tok, generator=gen)[:cfg.loss_queries].to(dev)
                losses = fod_level_losses(x, level(x, rows), cfg)
                losses.total.backward()  # per level: frees its graph before the next level
                for k in ("loss1", "loss2", "rec"):
                    sums[f"l{li}_{k}"] = sums.get(f"l{li}_{k}", 0.0) + losses._asdict()[k].item()
            if not all(math.isfinite(v) for v in sums.values()):
                raise FastADError(f"training diverged at epoch {epoch + 1} step {step + 1} (non-finite loss)")
            opt.step()
            opt.zero_grad(set_to_none=True)
            bar.set_postfix(rec=f"{sums['l0_rec'] / (step + 1):.4f}")
        bar.close()
        epoch_seconds = time.perf_counter() - t_epoch
        train_seconds += epoch_seconds
        history.append({"epoch": epoch + 1, "seconds": round(epoch_seconds, 2),
                        **{k: round(v / steps, 6) for k, v in sums.items()}})
        log.info("epoch %d/%d  %.1fs  %s", epoch + 1, cfg.epochs, epoch_seconds,
                 "  ".join(f"{k}={v / steps:.4f}" for k, v in sums.items()))
        record = {"epochs_done": epoch + 1, "history": history, "train_seconds": round(train_seconds, 2),
                  "reference_fingerprint": _tensor_digest(model),
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


# --------------------------------------------------------------------------------------------
# Shared by the trainers of every model family
# --------------------------------------------------------------------------------------------
def resolve_config(config_cls, family: str, out: Path, resume: bool, overrides: dict, config=None):
    """The run's config: `config` (or the class defaults) with the non-None `overrides`, or, with
    `resume`, the saved config where only `epochs` may change. -> (cfg, saved run config | None)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    saved = None
    if resume:
        saved = json.loads((out / CONFIG_FILE).read_text()) if (out / CONFIG_FILE).exists() else \
            json.loads((out / CKPT_STATE_FILE).read_text())["run"]
        if saved.get("model", "fod") != family:
            raise FastADError(f"cannot resume {out} as {family}: it is a {saved.get('model')} run")
        cfg = config_cls.from_dict(saved["config"])
        changed = {k: (getattr(cfg, k), v) for k, v in overrides.items() if k not in ("epochs",)
                   and getattr(cfg, k) != v}
        if changed:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise FastADError(f"cannot resume {out} with a different config ({what}); only --epochs may change")
        cfg = replace(cfg, epochs=overrides.get("epochs", cfg.epochs))
    else:
        cfg = replace(config or config_cls(), **overrides)
    if cfg.epochs < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise FastADError(f"epochs and batch size must be >= 1 and lr > 0 (got {cfg.epochs}, {cfg.batch_size}, {cfg.lr})")
    return cfg, saved


def check_resume_backbone(out: Path, saved: dict, extractor: FeatureExtractor) -> None:
    if saved["backbone"]["fingerprint"] != extractor.fingerprint():
        raise FastADError(f"cannot resume {out}: its backbone weights ({saved['backbone']['weights_source']}) "
                          f"differ from the ones loaded now ({extractor.weights_source})")


def write_run(out: Path, model, training: dict, normal: dict) -> None:
    """The final run files: model.safetensors (backbone included) and config.json, atomically."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(model_state(model), str(tmp), metadata={"format": f"fastad-{model.family}", "version": __version__})
    write_json(out / CONFIG_FILE, run_config(model, {"training": training, "normal_scores": normal}))


def score_stats(scores) -> dict:
    """Statistics of image scores on normal training images (the `normal_scores` of a run)."""
    s = np.asarray(scores, dtype=np.float64)
    return {"num_images": int(s.size), "mean": float(s.mean()), "std": float(s.std()), "max": float(s.max()),
            "p99": float(np.percentile(s, 99))}


@torch.no_grad()
def normal_score_stats(model: FOD, tokens: list[torch.Tensor], device: torch.device,
                       max_images: int = 64, batch_size: int = 8) -> dict:
    """Image-score statistics on (up to `max_images`) training images, in-sample: a scale for
    heatmap colours and a starting point for thresholds — never a test-set statistic."""
    n = min(max_images, tokens[0].shape[0])
    scores = []
    for start in range(0, n, batch_size):
        batch = [t[start:min(start + batch_size, n)].to(device) for t in tokens]
        amap = model.anomaly_map(model.patch_scores(batch))
        scores.append(amap.flatten(1).amax(1).float().cpu())
    return score_stats(torch.cat(scores).numpy())


def _tensor_digest(model: FOD) -> str:
    """A short digest of the reference features (to notice changed training data on resume)."""
    import hashlib

    h = hashlib.sha256()
    for level in model.levels:
        h.update(level.reference.detach().cpu().numpy().astype(np.float32).tobytes())
    return h.hexdigest()[:16]
