"""Small helpers shared across the package: atomic file writes, seeding."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    Readers never see a half-written file, and a failure leaves no partial output behind. A
    file system that refuses the write (full, file too large, read-only, no permission) is a
    FastADError naming `path`; a process killed mid-write leaves only a `.NAME.*.tmp` file,
    which `remove_stale_temporaries` clears.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in WRITE_ERRNOS:
            raise write_error(path, e) from None
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


TEMP_SUFFIX = ".tmp"
# Errors of a file system that cannot take the write: the user's to fix, reported in one line.
WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def write_error(path: Path, err: OSError):
    """The FastADError for a write the file system refused."""
    from .errors import FastADError

    return FastADError(f"cannot write {path}: {err.strerror or err} (nothing was written there)")


def is_write_failure(err: BaseException) -> bool:
    """Whether `err` (a library's own exception type too) says the file system refused a write:
    safetensors and the ONNX exporter wrap ENOSPC/EFBIG in their own exceptions."""
    if isinstance(err, OSError):
        return err.errno in WRITE_ERRNOS
    text = str(err)
    return any(os.strerror(code) in text for code in WRITE_ERRNOS) or "os error 27" in text or "os error 28" in text


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temp files (`.NAME.*.tmp`) that atomic writes of a killed process left in
    `directory`; call only while holding the directory's lock. -> the removed paths."""
    removed = []
    for p in directory.glob(f".*{TEMP_SUFFIX}"):
        if p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def resolve_device(name: str = "auto"):
    """"auto" -> cuda when available, else cpu. Unknown or unavailable devices are a FastADError."""
    import torch

    from .errors import FastADError

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


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class JSONConfig:
    """Mixin for dataclass configs stored in a run's config.json: tuples <-> JSON lists, and
    unknown keys are an error (a config from another version or family must not load silently)."""

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def library_versions() -> dict:
    """Versions of fastad and the libraries that decide numerics/speed (absent ones left out)."""
    import platform

    import torch

    from ._version import __version__

    out = {"fastad": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "numpy": np.__version__}
    for mod in ("onnx", "onnxruntime", "triton", "tensorrt"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken optional dependency
            pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out
