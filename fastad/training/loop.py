"""The training loop, once for every family: `train(data, out, model=..., **options)`.

Read top-down: `train` (checks, config, model, task, stages, run files) → `_run_stages` (resume
bookkeeping, one stage after another) → `_run_epoch` (shuffle, steps, finite checks) → config
resolution. Family specifics come from the registry entry's `Task` (fastad.training.task).

Everything that can fail on user input (paths, options, data, configs) fails before the first
byte is written. The schedule is fixed: model selection never looks at test data. A run
interrupted after an epoch continues from its checkpoint with `resume=True` and ends with the
same weights as an uninterrupted run (shuffling is seeded per epoch).

Data-parallel training (under torchrun, fastad.training.distributed): every rank shuffles the
same seeded `order` and takes its part of each step's batch (`par.shard`), the step runs in
DistributedDataParallel (`par.wrap_step`) so the loop's `backward()` averages gradients across
ranks, loss values are averaged, normal scores gathered, and rank 0 alone checkpoints and writes
the run. N processes with batch B/N each end with the weights of one process with batch B.
Seam for what comes later: a fused training kernel is an `impl` of the family's ops, chosen when
the model is built.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .. import registry
from ..data.layouts import list_samples
from ..errors import FastADError
from ..run import (check_run_dir, exclusive_run_dir, load_checkpoint, run_config, save_checkpoint,
                   saved_run_config, write_run)
from ..utils import resolve_device, seed_everything
from .distributed import Parallel
from .task import Stage, Task

log = logging.getLogger(__name__)


@exclusive_run_dir  # one training process per run directory (a lock file; see fastad.run)
def train(data: str | os.PathLike, out: str | os.PathLike, *, model: str | None = None, layout: str | None = None,
          device: str = "auto", resume: bool = False, overwrite: bool = False, progress: bool = True,
          config=None, on_epoch_end=None, **options) -> Path:
    """Train a model family (default: `registry.DEFAULT`) on the normal training images of
    `data`; write the run to `out`.

    `options`: the shared ones (epochs, backbone, weights, batch_size, lr, seed; None = the
    config's value) and the family's own (`Family.options` of its registry entry).
    `config`: a full config to start from instead of the family's defaults.
    With `resume`, only the epochs may change. `epochs=0` writes the untrained starting point (the
    cached reference features and statistics, the model as initialised), a complete loadable run,
    so that what training adds can be measured against it.
    `on_epoch_end(stage_name, epoch, model)`: called after every epoch with the model in eval mode
    and gradients off (e.g. to record a learning curve on a validation set); a dict it returns is
    added to that epoch's history entry. -> `out`.
    """
    family = registry.get(model or registry.DEFAULT)
    known = {"epochs", "backbone", "weights", "batch_size", "lr", "seed"} | {o.dest for o in family.options}
    unknown = sorted(set(options) - known)
    if unknown:
        raise FastADError(f"{', '.join(unknown)}: not an option of {family.name} training")
    out = Path(out)
    check_run_dir(out, resume, overwrite)
    par = Parallel.from_env(resolve_device(device))
    dev = par.device
    task: Task = family.task(options, resume=resume)
    task.parallel = par
    saved = saved_run_config(out) if resume else None
    if saved is not None and saved.get("model") != family.name:
        raise FastADError(f"cannot resume {out} as {family.name}: it is a {saved.get('model')} run")
    cfg = _resolve_config(family.name, task, config, saved, out)
    par.check_batch("training", getattr(cfg, "batch_size", par.world))
    samples = list_samples(data, "train", layout=layout)
    task.check_data(samples)

    par.start()
    with task.threads(dev):
        seed_everything(cfg.seed)
        backbone = task.backbone(cfg, saved)
        if saved is not None and saved["backbone"]["fingerprint"] != backbone.fingerprint():
            raise FastADError(f"cannot resume {out}: its backbone weights ({saved['backbone']['weights_source']}) "
                              f"differ from the ones loaded now ({backbone.weights_source})")
        try:
            net = par.prepare_model(family.build(cfg, backbone).to(dev))
        except ValueError as e:
            raise FastADError(f"invalid {family.name} config: {e}") from None
        meta = {"data": str(Path(data).resolve()), "layout": layout, "num_train_images": len(samples),
                "device": str(dev), "torch": torch.__version__, "python": platform.python_version()}
        if par.world > 1:
            meta["processes"] = par.world
        progress = progress and par.is_main
        meta |= task.prepare(net, samples, dev, progress)
        stages = task.stages(net, dev)
        for stage in stages:
            par.check_batch(stage.name, min(stage.batch_size, stage.num_samples))
        history, seconds = _run_stages(family.name, task, net, stages, cfg.seed, out, resume, meta, progress, par,
                                       on_epoch_end)
        net.eval()
        finish = task.finish()
        normal = score_stats(par.gather_scores(task.image_scores, min(NORMAL_SCORE_IMAGES, len(samples))))
        training = {**meta, **finish, **_epochs_record(stages, seconds), "history": history}
        if par.is_main:
            write_run(out, family.name, net, training, normal)
        par.barrier()  # every rank returns once the run is written
    return out


def _epochs_record(stages: list[Stage], seconds: dict[str, float]) -> dict:
    """The training record's epoch counts and times: one stage keeps the flat form."""
    if len(stages) == 1:
        return {"epochs_done": stages[0].epochs, "train_seconds": seconds[stages[0].name]}
    return {"stages": {s.name: {"epochs_done": s.epochs, "seconds": seconds[s.name]} for s in stages},
            "train_seconds": round(sum(seconds.values()), 2)}


NORMAL_SCORE_IMAGES = 64  # training images scored for a run's `normal_scores`


def score_stats(scores) -> dict:
    """Statistics of image scores on normal training images (the `normal_scores` of a run):
    in-sample, a scale for heatmap colours and a start for thresholds, never test statistics."""
    s = np.asarray(scores, dtype=np.float64)
    return {"num_images": int(s.size), "mean": float(s.mean()), "std": float(s.std()), "max": float(s.max()),
            "p99": float(np.percentile(s, 99))}


# --------------------------------------------------------------------------------------------
# Stages and epochs
# --------------------------------------------------------------------------------------------
def _run_stages(family: str, task: Task, model, stages: list[Stage], seed: int, out: Path, resume: bool,
                meta: dict, progress: bool, par: Parallel, on_epoch_end=None) -> tuple[list[dict], dict[str, float]]:
    """Every stage's epochs (continuing a checkpoint with `resume`), checkpointing after each
    epoch (rank 0). -> (history, seconds per stage)."""
    optimizers = [s.optimizer for s in stages] + [o for s in stages for o in s.extra_optimizers]
    done = {s.name: 0 for s in stages}
    seconds = {s.name: 0.0 for s in stages}
    history: list[dict] = []
    trained = False
    if resume:
        record = _upgrade_record(load_checkpoint(out, model, optimizers), stages)
        done, seconds, history = record["epochs_done"], record["seconds"], record["history"]
        for i, earlier in enumerate(stages[:-1]):
            if earlier.epochs != done[earlier.name] and any(done[s.name] for s in stages[i + 1:]):
                raise FastADError(f"cannot change {earlier.name} epochs of {out} after a later stage started "
                                  f"({done[earlier.name]} done); only the last started stage can be extended")
        task.resumed(record)

    for stage in stages:
        if stage.begin is not None:
            stage.begin()
        if stage.steps_itself and par.world > 1:
            raise FastADError(f"{stage.name}: this configuration steps the optimiser itself "
                              "(a per-level update schedule) and cannot train data-parallel")
        step = par.wrap_step(stage.optimizer, stage.step)
        for epoch in range(done[stage.name], stage.epochs):
            t0 = time.perf_counter()
            trained = True
            means = _run_epoch(stage, step, epoch, seed, progress, multi=len(stages) > 1, par=par)
            secs = time.perf_counter() - t0
            done[stage.name] = epoch + 1
            seconds[stage.name] = round(seconds[stage.name] + secs, 2)
            history.append({**({"stage": stage.name} if len(stages) > 1 else {}), "epoch": epoch + 1,
                            "seconds": round(secs, 2), **{k: round(v, 6) for k, v in means.items()}})
            if on_epoch_end is not None:
                history[-1] |= _epoch_callback(on_epoch_end, stage.name, epoch + 1, model)
            if not par.is_main:
                continue
            log.info("%s epoch %d/%d  %.1fs  %s", stage.name, epoch + 1, stage.epochs, secs,
                     "  ".join(f"{k}={v:.5f}" for k, v in means.items()))
            out.mkdir(parents=True, exist_ok=True)
            save_checkpoint(out, model, optimizers, {
                "epochs_done": done, "seconds": seconds, "history": history, **task.checkpoint_state(),
                "run": run_config(family, model, {"training": meta})})
        if stage.end is not None:
            stage.end()
    if not trained and par.is_main:
        log.info("nothing to train: %s", "0 epochs, writing the untrained starting point"
                 if not any(s.epochs for s in stages) else f"{out} already has every epoch")
    return history, seconds


def _epoch_callback(callback, stage_name: str, epoch: int, model) -> dict:
    """`callback(stage_name, epoch, model)` in eval mode without gradients; the mode is restored
    (and the RNG state, so that a callback never changes the training)."""
    was_training, rng = model.training, torch.get_rng_state()
    model.eval()
    try:
        with torch.no_grad():
            extra = callback(stage_name, epoch, model)
    finally:
        model.train(was_training)
        torch.set_rng_state(rng)
    return dict(extra or {})


def _run_epoch(stage: Stage, step_fn, epoch: int, seed: int, progress: bool, multi: bool,
               par: Parallel) -> dict[str, float]:
    """One shuffled pass; -> the mean of every loss value over the epoch's steps. `step_fn` is
    `stage.step` (in DDP with several processes); each rank takes its part of every batch."""
    from tqdm.auto import tqdm

    steps, bs = stage.steps_per_epoch, min(stage.batch_size, stage.num_samples)
    gen = torch.Generator().manual_seed(seed * 1000 + epoch + stage.seed_offset)  # resumable shuffling
    order = torch.randperm(stage.num_samples, generator=gen)
    if stage.epoch_begin is not None:
        stage.epoch_begin(gen)
    sums: dict[str, float] = {}
    desc = f"{stage.name + ' ' if multi else ''}epoch {epoch + 1}/{stage.epochs}"
    bar = tqdm(range(steps), desc=desc, unit="step", disable=None if progress else True, leave=False)
    for step in bar:
        if stage.lr_at is not None:
            for group in stage.optimizer.param_groups:
                group["lr"] = stage.lr_at(epoch * steps + step)
        loss, losses = step_fn(par.shard(order[step * bs:(step + 1) * bs]), gen, step)
        if not stage.steps_itself:
            loss.backward()
        losses = par.mean_values(losses)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v
        if not all(math.isfinite(v) for v in sums.values()):
            raise FastADError(f"{stage.name} diverged at epoch {epoch + 1} step {step + 1} (non-finite loss)")
        if not stage.steps_itself:
            stage.optimizer.step()
            stage.optimizer.zero_grad(set_to_none=True)
        first = next(iter(sums))
        bar.set_postfix({first: f"{sums[first] / (step + 1):.4f}"})
    bar.close()
    return {k: v / steps for k, v in sums.items()}


def _upgrade_record(record: dict, stages: list[Stage]) -> dict:
    """Checkpoint records written before the one loop: one stage ("epochs_done": n,
    "train_seconds") or two ("epochs1_done", "epochs2_done", "seconds" per stage)."""
    if isinstance(record.get("epochs_done"), dict):
        return record
    if "epochs1_done" in record:
        record["epochs_done"] = {stages[0].name: record.pop("epochs1_done"), stages[1].name: record.pop("epochs2_done")}
        return record
    record["epochs_done"] = {stages[0].name: record["epochs_done"]}
    record["seconds"] = {stages[0].name: record.pop("train_seconds")}
    return record


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
def _resolve_config(family: str, task: Task, config, saved: dict | None, out: Path):
    """`config` (or the task's defaults) with the options' overrides; with a saved run its
    config, where only the epoch fields may change."""
    overrides = {k: v for k, v in task.config_overrides().items() if v is not None}
    if saved is not None:
        cfg = task.config_class.from_dict(saved["config"])
        changed = {k: (getattr(cfg, k), v) for k, v in overrides.items()
                   if k not in task.epoch_fields and getattr(cfg, k) != v}
        if changed:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise FastADError(f"cannot resume {out} with a different config ({what}); only the epochs may change")
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if k in task.epoch_fields})
    else:
        cfg = replace(config or task.default_config(), **overrides)
    try:
        if hasattr(cfg, "validate"):
            cfg.validate()
    except ValueError as e:
        raise FastADError(f"invalid {family} config: {e}") from None
    task.check_config(cfg)
    return cfg
