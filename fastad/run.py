"""The run directory: its format, and loading a model from it (training, runtime and export use it).

A run directory holds everything needed to use the model later, nothing pickled:
    config.json          "model" (the family's registry name), model config, backbone spec +
                         fingerprint, training record, normal_scores, and "files": the sha256 of
                         every weight file (model.safetensors), checked before it is loaded
    model.safetensors    all weights (backbone included, so a run is self-contained)
    checkpoint.safetensors   model + optimiser states after the last finished epoch, for
                         `--resume` (also to continue a finished run with more epochs); its
                         metadata holds the JSON record (epochs done, history, run config) and
                         the sha256 of its tensors, so tensors and record change in one rename
    checkpoint.json      a readable copy of that record (older checkpoints: the record itself)
    .fastad-train.lock   present while a training process writes here (fcntl lock, its pid);
                         left behind when that process was killed: the run is then incomplete
Every file is written atomically (temp file + rename), config.json last: an interrupted run
leaves the previous complete checkpoint, never a truncated one, and has no config.json (or a
stale lock), which `fastad eval`/`predict` report as an incomplete run in one line.

Runs written before the weights hash existed (no "files" in config.json) still load, with a
warning that their weights are unchecked (docs/reliability.md).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from . import registry
from ._version import __version__
from .backbones import FeatureExtractor
from .backends import IMPL_OF_BACKEND, RUN_BACKENDS
from .errors import FastADError
from .ops import set_impl
from .utils import (atomic_path, confined_file, read_verified, remove_stale_temporaries, resolve_device,
                    sha256_bytes, write_json)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CKPT_FILE = "checkpoint.safetensors"
CKPT_STATE_FILE = "checkpoint.json"
LOCK_FILE = ".fastad-train.lock"
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, CKPT_FILE, CKPT_STATE_FILE)


# --------------------------------------------------------------------------------------------
# Integrity: the sha256 of weight files (helpers in fastad.utils)
# --------------------------------------------------------------------------------------------
def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of named tensors (names, dtypes, shapes, bytes) in name order: what a checkpoint
    records about itself in its own metadata."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _safetensors_from_bytes(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, ValueError, TypeError, OverflowError, RuntimeError, KeyError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise FastADError(f"cannot read {path}: not a valid safetensors file ({reason})") from None


# --------------------------------------------------------------------------------------------
# The training lock: one writer per run directory
# --------------------------------------------------------------------------------------------
def _lock_owner(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
    except (OSError, ValueError, AttributeError):
        return "unknown process"


def lock_state(run: Path) -> str | None:
    """None (no lock file), "held" (a live process trains into `run`) or "stale" (the process
    that trained here died without finishing)."""
    path = run / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return "held"
    finally:
        os.close(fd)  # closing releases a lock we took
    return "stale"


@contextlib.contextmanager
def training_lock(out: Path):
    """Hold an exclusive fcntl lock on `out/.fastad-train.lock` while training writes `out`.

    A second process refuses with one FastADError line. A lock file left by a killed process
    (nobody holds its lock) is taken over with a warning, and the temp files its atomic writes
    left behind are removed. The lock file is deleted when the block ends (success or a handled
    error); a directory this created and left empty is removed too, so bad input leaves nothing.
    """
    created = not out.exists()
    if out.exists() and not out.is_dir():
        raise FastADError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastADError(f"cannot create run directory {out}: {e.strerror or e}") from None
    path = out / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise FastADError(f"cannot create the lock file {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise FastADError(f"{out} is being trained by another process ({_lock_owner(path)}); "
                              "wait for it to finish or use another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder deleted the file between our open and flock: lock the new one
            break
        os.close(fd)
    try:
        if os.fstat(fd).st_size > 0:
            log.warning("%s: the previous training (%s) was interrupted; taking over its stale lock",
                        out, _lock_owner(path))
        remove_stale_temporaries(out)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty: a run that wrote nothing leaves nothing


def exclusive_run_dir(train_fn):
    """Decorator for `train(data, out, ...)`: the body runs under `training_lock(out)`. Only the
    process of data-parallel rank 0 (env RANK, default 0) locks: the other ranks never write."""
    @functools.wraps(train_fn)
    def locked(data, out, *args, **kwargs):
        if os.environ.get("RANK", "0") != "0":
            return train_fn(data, out, *args, **kwargs)
        with training_lock(Path(out)):
            return train_fn(data, out, *args, **kwargs)
    return locked


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run (unless `overwrite`) or to resume one that has no checkpoint."""
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if out.exists() and not out.is_dir():
        raise FastADError(f"--out {out} exists and is not a directory")
    if resume:
        if not (out / CKPT_FILE).exists():
            raise FastADError(f"cannot resume: {out} has no {CKPT_FILE} (start without --resume)")
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
    """The final run files: model.safetensors (backbone included), then config.json with its
    sha256, each atomically. A config.json from an earlier finish is removed first, so a run
    interrupted in between never pairs an old config with new weights."""
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).unlink(missing_ok=True)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(model_state(model), str(tmp), metadata={"format": f"fastad-{family}", "version": __version__})
        digest = sha256_bytes(tmp.read_bytes())
    write_json(out / CONFIG_FILE, run_config(family, model, {"training": training, "normal_scores": normal,
                                                            "files": {WEIGHTS_FILE: digest}}))


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
    record = {**record, "optimizers": metas}
    with atomic_path(out / CKPT_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"record": json.dumps(record),
                                               "tensors_sha256": tensors_sha256(tensors)})
    write_json(out / CKPT_STATE_FILE, record)  # a readable copy; the metadata is what resume reads


def _checkpoint_record(out: Path) -> tuple[dict, str | None]:
    """(the JSON record, the recorded tensors sha256) of the checkpoint in `out`: from
    checkpoint.safetensors' metadata (one file, so it always matches the tensors), else (older
    checkpoints, no sha256) checkpoint.json."""
    path = out / CKPT_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "record" in meta:
            record = json.loads(meta["record"])
        else:
            record = json.loads((out / CKPT_STATE_FILE).read_text())
    except (OSError, ValueError, SafetensorError) as e:
        raise FastADError(f"cannot read checkpoint in {out}: {' '.join(str(e).split())}") from None
    if not isinstance(record, dict):
        raise FastADError(f"cannot read checkpoint in {out}: its record is not a JSON object")
    return record, meta.get("tensors_sha256")


def load_checkpoint(out: Path, model, optimizers: list[torch.optim.Optimizer]) -> dict:
    """Restore model and optimisers in place; -> the checkpoint's JSON record."""
    record, recorded = _checkpoint_record(out)
    path = out / CKPT_FILE
    tensors = _safetensors_from_bytes(read_verified(path, None, ""), path)
    if recorded is not None and recorded != tensors_sha256(tensors):
        raise FastADError(f"{path} does not match the sha256 in its own metadata: modified or corrupted checkpoint")
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
        return _checkpoint_record(out)[0]["run"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FastADError(f"cannot read the run in {out}: {e}") from None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _resume_hint(run: Path) -> str:
    return f"continue it with `fastad train --resume --out {run} ...` (same --data and options)"


def read_run_config(run_dir: str | os.PathLike) -> dict:
    """config.json of a finished run, or one FastADError line: no run, an incomplete run
    (training in progress, interrupted, or stopped before its final files), a bad config."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FastADError(f"run directory {run} does not exist")
    state = lock_state(run)
    if state == "held":
        raise FastADError(f"{run} is incomplete: a training process is writing it right now "
                          f"({_lock_owner(run / LOCK_FILE)}); wait for it to finish")
    if state == "stale":
        raise FastADError(f"{run} is incomplete: its training ({_lock_owner(run / LOCK_FILE)}) was interrupted; "
                          + _resume_hint(run))
    path = run / CONFIG_FILE
    if not path.is_file():
        if (run / CKPT_FILE).exists():
            raise FastADError(f"{run} is incomplete: training stopped before writing {CONFIG_FILE}; "
                              + _resume_hint(run))
        raise FastADError(f"{run} is not a trained fastad run (no {CONFIG_FILE}; did training finish?)")
    try:
        conf = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise FastADError(f"cannot read {path}: {' '.join(str(e).split())}") from None
    if not isinstance(conf, dict) or not isinstance(conf.get("config"), dict) \
            or not isinstance(conf.get("backbone"), dict):
        raise FastADError(f"{path} is not a fastad run config (missing 'config' or 'backbone')")
    files = conf.get("files")
    if files is not None:
        if not isinstance(files, dict):
            raise FastADError(f"{path}: 'files' must map file names to sha256 digests")
        for name in files:
            confined_file(run, name, str(path))
    return conf


def read_weights(run: Path, conf: dict | None = None) -> dict:
    """model.safetensors of a run directory (never unpickled), checked against the sha256 that
    config.json records; one FastADError line for missing, modified or malformed weights.
    A config without the hash (runs written before it) loads with a warning."""
    files = conf.get("files") if conf is not None else None
    expected = files.get(WEIGHTS_FILE) if isinstance(files, dict) else None
    if conf is not None and expected is None:
        log.warning("%s records no sha256 of %s (written by an older fastad): its weights are not "
                    "integrity-checked", run / CONFIG_FILE, WEIGHTS_FILE)
    path = run / WEIGHTS_FILE
    data = read_verified(path, expected, str(run / CONFIG_FILE))
    return _safetensors_from_bytes(data, path)


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
    except (TypeError, ValueError, OverflowError) as e:
        raise FastADError(f"{run / CONFIG_FILE}: invalid model config: {e}") from None
    state = read_weights(run, conf)
    backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    backbone = FeatureExtractor.restore(conf["backbone"], backbone_state)
    try:
        model = family.build(cfg, backbone)
    except (ValueError, TypeError, OverflowError) as e:  # values of the right type that cannot build
        raise FastADError(f"{run / CONFIG_FILE}: invalid model config: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise FastADError(f"{run / WEIGHTS_FILE} does not match {CONFIG_FILE} "
                          f"(other backbone or config?): {first}") from None
    model = model.to(resolve_device(device)).eval()
    return set_impl(model, IMPL_OF_BACKEND[backend]), conf  # on its device: Triton needs CUDA
