"""The run directory: its format, and loading a model from it (training, runtime and export use it).

A run directory holds everything needed to use the model later, nothing pickled:
    config.json          "model" (the family's registry name), model config, backbone spec +
                         fingerprint, training record, normal_scores
    model.safetensors    all weights (backbone included, so a run is self-contained)
    checkpoint.safetensors / checkpoint.json   model + optimiser states after the last finished
                         epoch, for `--resume` (also to continue a finished run with more epochs)
Every file is written atomically (temp file + rename): an interrupted run leaves the previous
complete checkpoint, never a truncated one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import registry
from ._version import __version__
from .backbones import FeatureExtractor
from .backends import IMPL_OF_BACKEND, RUN_BACKENDS
from .errors import FastADError
from .ops import set_impl
from .utils import atomic_path, resolve_device, write_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CKPT_FILE = "checkpoint.safetensors"
CKPT_STATE_FILE = "checkpoint.json"
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, CKPT_FILE, CKPT_STATE_FILE)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run (unless `overwrite`) or to resume one that has no checkpoint."""
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if out.exists() and not out.is_dir():
        raise FastADError(f"--out {out} exists and is not a directory")
    if resume:
        if not (out / CKPT_STATE_FILE).exists():
            raise FastADError(f"cannot resume: {out} has no {CKPT_STATE_FILE} (start without --resume)")
    elif existing and not overwrite:
        raise FastADError(f"{out} already holds a run ({', '.join(existing)}); "
                          "use --resume to continue it, --overwrite to replace it, or another --out")


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Persistent weights as contiguous CPU tensors (safetensors refuses shared/strided ones)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def run_config(family: str, model, extra: dict) -> dict:
    """The config.json of a run: enough to rebuild the model and check the weights match."""
    bb = model.backbone
    return {
        "model": family,
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


def write_run(out: Path, family: str, model, training: dict, normal: dict) -> None:
    """The final run files: model.safetensors (backbone included) and config.json, atomically."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(model_state(model), str(tmp), metadata={"format": f"fastad-{family}", "version": __version__})
    write_json(out / CONFIG_FILE, run_config(family, model, {"training": training, "normal_scores": normal}))


# --------------------------------------------------------------------------------------------
# Checkpoints: safetensors for tensors, JSON for everything else (never pickle)
# --------------------------------------------------------------------------------------------
def _optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    state = opt.state_dict()
    tensors = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            tensors[f"{prefix}{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str, meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix):
            pid, key = name[len(prefix):].split(".", 1)
            state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(out: Path, model, optimizers: list[torch.optim.Optimizer], record: dict) -> None:
    """Model and optimiser states (tensors "model.*", "opt{i}.optim.*") plus the JSON `record`."""
    tensors = {f"model.{k}": v for k, v in model_state(model).items()}
    metas = []
    for i, opt in enumerate(optimizers):
        t, meta = _optimizer_tensors(opt, f"opt{i}.optim.")
        tensors |= t
        metas.append(meta)
    with atomic_path(out / CKPT_FILE) as tmp:
        save_file(tensors, str(tmp))
    write_json(out / CKPT_STATE_FILE, {**record, "optimizers": metas})


def load_checkpoint(out: Path, model, optimizers: list[torch.optim.Optimizer]) -> dict:
    """Restore model and optimisers in place; -> the checkpoint's JSON record."""
    try:
        record = json.loads((out / CKPT_STATE_FILE).read_text())
        tensors = load_file(str(out / CKPT_FILE))
    except (OSError, ValueError, SafetensorError) as e:
        raise FastADError(f"cannot read checkpoint in {out}: {e}") from None
    if "optimizer" in record:  # single-optimiser checkpoints written before the one loop
        record["optimizers"] = [record.pop("optimizer")]
        tensors = {("opt0." + k if k.startswith("optim.") else k): v for k, v in tensors.items()}
    try:
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        for i, opt in enumerate(optimizers):
            _load_optimizer(opt, tensors, f"opt{i}.optim.", record["optimizers"][i])
    except (RuntimeError, KeyError, ValueError, IndexError) as e:
        raise FastADError(f"checkpoint in {out} does not match this model: {str(e).splitlines()[0]}") from None
    return record


def saved_run_config(out: Path) -> dict:
    """The run config of a run being resumed: config.json if training finished, else the
    checkpoint's copy."""
    try:
        if (out / CONFIG_FILE).exists():
            return json.loads((out / CONFIG_FILE).read_text())
        return json.loads((out / CKPT_STATE_FILE).read_text())["run"]
    except (OSError, ValueError, KeyError) as e:
        raise FastADError(f"cannot read the run in {out}: {e}") from None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def read_run_config(run_dir: str | os.PathLike) -> dict:
    run = Path(run_dir)
    if not run.is_dir():
        raise FastADError(f"run directory {run} does not exist")
    path = run / CONFIG_FILE
    if not path.is_file():
        raise FastADError(f"{run} is not a trained fastad run (no {CONFIG_FILE}; did training finish?)")
    try:
        conf = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FastADError(f"cannot read {path}: {e}") from None
    if not isinstance(conf, dict) or "config" not in conf or "backbone" not in conf:
        raise FastADError(f"{path} is not a fastad run config (missing 'config' or 'backbone')")
    return conf


def read_weights(run: Path) -> dict:
    """model.safetensors of a run directory (never unpickled), or one FastADError line."""
    try:
        return load_file(str(run / WEIGHTS_FILE))
    except FileNotFoundError:
        raise FastADError(f"{run} has no {WEIGHTS_FILE}") from None
    except (OSError, SafetensorError) as e:
        raise FastADError(f"cannot read {run / WEIGHTS_FILE}: {e}") from None


def load_model(run_dir: str | os.PathLike, device: str = "auto", backend: str = "torch"):
    """Rebuild the model of a run directory (any registered family), checking the weights
    against the config, on `device`, in eval mode, its hot ops implemented as `backend` asks
    (torch | torch-lean | triton, see fastad.backends). -> (model, run config)."""
    if backend not in RUN_BACKENDS:
        raise FastADError(f"backend {backend!r} does not run a run directory (use {', '.join(RUN_BACKENDS)})")
    run = Path(run_dir)
    conf = read_run_config(run)
    family = registry.get(conf.get("model"), what=f"{run}: model")
    try:
        cfg = family.config.from_dict(conf["config"])
        if hasattr(cfg, "validate"):
            cfg.validate()
    except (TypeError, ValueError) as e:
        raise FastADError(f"{run / CONFIG_FILE}: invalid model config: {e}") from None
    state = read_weights(run)
    backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    backbone = FeatureExtractor.restore(conf["backbone"], backbone_state)
    try:
        model = family.build(cfg, backbone)
    except ValueError as e:
        raise FastADError(f"{run / CONFIG_FILE}: invalid model config: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise FastADError(f"{run / WEIGHTS_FILE} does not match {CONFIG_FILE} "
                          f"(other backbone or config?): {first}") from None
    model = model.to(resolve_device(device)).eval()
    return set_impl(model, IMPL_OF_BACKEND[backend]), conf  # on its device: Triton needs CUDA
