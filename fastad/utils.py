"""Small helpers shared across the package: atomic file writes, seeding."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import FastADError


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
    except Exception as e:  # noqa: BLE001 - libraries wrap the OSError in their own types
        if is_write_failure(e) and not isinstance(e, FastADError):
            raise write_error(path, e) from None
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


TEMP_SUFFIX = ".tmp"
# Errors of a file system that cannot take the write: the user's to fix, reported in one line.
WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _write_failure_reason(err: BaseException) -> str | None:
    """The strerror of a refused write inside `err` (an OSError, or a library's exception that
    wraps one in its message, as safetensors does), else None."""
    if isinstance(err, OSError):
        return (err.strerror or str(err)) if err.errno in WRITE_ERRNOS else None
    text = str(err)
    return next((os.strerror(code) for code in WRITE_ERRNOS if os.strerror(code) in text), None)


def is_write_failure(err: BaseException) -> bool:
    return _write_failure_reason(err) is not None


def write_error(path: Path, err: BaseException):
    """The FastADError for a write the file system refused."""
    reason = _write_failure_reason(err) or str(err)
    return FastADError(f"cannot write {path}: {reason} (nothing was written there)")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def confined_file(directory: Path, name, what: str) -> Path:
    """`directory / name` for a plain file name recorded in a config or sidecar; one FastADError
    line for anything naming a file elsewhere (absolute paths, `..`, sub-folders, NUL bytes)."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or os.path.isabs(name)):
        raise FastADError(f"{what} names {name!r}: only a file name inside {directory} is allowed "
                          "(no paths, no '..')")
    return directory / name


def read_verified(path: Path, expected_sha256: str | None, what: str) -> bytes:
    """The bytes of `path`, read once, checked against `expected_sha256` (when given) before
    anything parses them."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FastADError(f"{path.parent} has no {path.name}") from None
    except OSError as e:
        raise FastADError(f"cannot read {path}: {e.strerror or e}") from None
    if expected_sha256 is not None:
        if not isinstance(expected_sha256, str):
            raise FastADError(f"{what}: the recorded sha256 of {path.name} is not a string")
        actual = sha256_bytes(data)
        if actual != expected_sha256.lower():
            raise FastADError(f"{path} does not match the sha256 recorded in {what} "
                              f"({actual[:12]}… != {expected_sha256[:12]}…): modified or corrupted file")
    return data


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
        """The config from a JSON object; unknown keys and values of another JSON type than the
        field's default (a list for a number, a string for a flag, ...) are a ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__} must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {unknown}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        for name, value in values.items():
            _check_json_type(cls.__name__, name, value, cls.__dataclass_fields__[name].default)
        return cls(**values)


def _json_kind(value) -> str:
    """bool / number / string / list / object / null: the JSON type a value stands for."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    return "object" if isinstance(value, dict) else type(value).__name__


def _check_json_type(cls_name: str, name: str, value, default) -> None:
    """`value` must have the JSON type of the field's `default` (None and missing defaults
    accept anything; a list's items the type of the default's items; integers where the
    default is an integer)."""
    from dataclasses import MISSING

    if default is MISSING or default is None or value is None:
        return
    want, got = _json_kind(default), _json_kind(value)
    bad = want != got or (isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, int))
    if not bad and want == "list" and len(default):
        item = default[0]
        bad = any(_json_kind(v) != _json_kind(item) or (isinstance(item, int) and not isinstance(item, bool)
                                                          and not isinstance(v, int)) for v in value)
    if bad:
        raise ValueError(f"{cls_name}.{name} must be like {default!r}, got {value!r}")


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
