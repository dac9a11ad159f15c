"""Run directories: read a trained run's config and weights and rebuild its model.

Inference goes through `fastad.load` / `fastad.Predictor` (fastad/runtime.py), which uses
`load_model` for run directories.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from .backbones import FeatureExtractor
from .errors import FastADError
from .models.adtr import ADTR, ADTRConfig
from .models.fod import FOD, FODConfig
from .train import CONFIG_FILE, WEIGHTS_FILE, resolve_device

# "model" key of a run's config.json -> (config class, model class)
FAMILIES = {"fod": (FODConfig, FOD), "adtr": (ADTRConfig, ADTR)}


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


def load_state_checked(model, state: dict, run: Path, hint: str):
    """Strict `load_state_dict`; a mismatch is one FastADError line naming the first problem."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise FastADError(f"{run / WEIGHTS_FILE} does not match {CONFIG_FILE} ({hint}): {first}") from None
    return model


def load_model(run_dir: str | os.PathLike, device: str = "auto") -> tuple[FOD | ADTR, dict]:
    """Rebuild the model of a run directory (any family in FAMILIES), checking weights against
    config. -> (model, config)."""
    run = Path(run_dir)
    conf = read_run_config(run)
    if conf.get("model") == "utad":
        from .train_utad import load_utad

        return load_utad(run, conf, device), conf
    if conf.get("model") not in FAMILIES:
        raise FastADError(f"{run}: unsupported model {conf.get('model')!r} (known: {', '.join([*FAMILIES, 'utad'])})")
    config_cls, model_cls = FAMILIES[conf["model"]]
    try:
        cfg = config_cls.from_dict(conf["config"])
    except (TypeError, ValueError) as e:
        raise FastADError(f"{run / CONFIG_FILE}: invalid model config: {e}") from None
    state = read_weights(run)
    backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    backbone = FeatureExtractor.restore(conf["backbone"], backbone_state)
    try:
        model = model_cls(cfg, backbone)
    except ValueError as e:
        raise FastADError(f"{run / CONFIG_FILE}: invalid model config: {e}") from None
    model = load_state_checked(model, state, run, "other backbone or config?")
    return model.to(resolve_device(device)).eval(), conf
