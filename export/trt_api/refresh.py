"""Refresh the TensorRT Python API name lists the engine-export tests check the fake against.

    python export/trt_api/refresh.py            # downloads the pinned bindings wheels with pip
    python export/trt_api/refresh.py --wheel tensorrt_cu12_bindings-10.3.0-....whl ...

TensorRT cannot be imported here (its native libraries need a GPU machine), but PyPI's bindings
wheels hold the real compiled module, and every Python-visible name is a string in it: class
names (`IBuilderConfig`), methods and properties (`set_memory_pool_limit`, `num_errors`), enum
members (`FP16`, `STRONGLY_TYPED`) and keyword-argument names (`ignore_mismatch`). The module's
docstring symbols (`tensorrt::IBuilderConfigDoc::set_memory_pool_limit`) also tie documented
methods to their class. Written per major version: tensorrt-<major>.<minor>.json with
  names    every identifier-like string of the module, and its word-boundary tails: the linker
           stores "Runtime" only inside "IPluginV3OneRuntime", "Logger" inside "ILogger" and "num_errors" inside
           "get_num_errors" (a superset of the API: a name absent from it is absent from
           TensorRT's compiled Python API; `__version__` & co. come from its Python __init__)
  members  class -> documented methods, from the docstring symbols (partial: properties and
           enum members have no such symbol)
Kept in export/trt_api/ next to the code it checks; not part of the installed package.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# JetPack 6's TensorRT, and the strongly typed 11.x line.
PINNED = ("tensorrt-cu12-bindings==10.3.0", "tensorrt-cu13-bindings==11.4.0.106")

IDENTIFIER = re.compile(rb"[A-Za-z_][A-Za-z0-9_]{1,63}")
DOC_SYMBOL = re.compile(rb"_ZN8tensorrt(\d+)([A-Za-z0-9_]+?)DocL(\d+)([A-Za-z0-9_]+)E")


def printable_runs(data: bytes, min_len: int = 2) -> list[bytes]:
    """NUL-separated printable strings of a binary, as `strings` sees them."""
    return re.findall(rb"[\x20-\x7e]{%d,}" % min_len, data)


def word_tails(name: str) -> list[str]:
    """`name` and its tails that start a word: after "_", at a lower-to-upper case step, or at the
    last capital of a run of capitals ("ILogger" -> "Logger")."""
    def starts_word(i: int) -> bool:
        prev, cur, nxt = name[i - 1], name[i], name[i + 1: i + 2]
        return (prev == "_" and cur != "_") or (cur.isupper() and (prev.islower() or prev.isdigit())) \
            or (cur.isupper() and prev.isupper() and nxt.islower())
    return [name] + [name[i:] for i in range(1, len(name)) if starts_word(i)]


def extract(module: bytes) -> dict:
    """Names and documented class members of one compiled `tensorrt` module."""
    runs = printable_runs(module)
    names = set()
    for run in runs:
        if IDENTIFIER.fullmatch(run) and not run.startswith(b"_Z"):  # whole strings, not C++ symbols
            names.update(word_tails(run.decode()))
    members: dict[str, set[str]] = {}
    for run in runs:
        for m in DOC_SYMBOL.finditer(run):
            # Itanium mangling: <len><name>; the class part is "<Class>Doc", the member part "<member>".
            cls, member = m.group(2).decode(), m.group(4)[: int(m.group(3))].decode()
            if len(cls) + 3 == int(m.group(1)) and member != "descr":
                members.setdefault(cls, set()).add(member)
    return {"names": sorted(names), "members": {c: sorted(ms) for c, ms in sorted(members.items())}}


def read_wheel(wheel: Path) -> tuple[str, bytes]:
    """(version, bytes of the compiled tensorrt module) from a bindings wheel."""
    version = wheel.name.split("-")[1]
    with zipfile.ZipFile(wheel) as z:
        (so,) = [n for n in z.namelist() if n.endswith(".so") and "tensorrt" in n.rsplit("/", 1)[-1]]
        return version, z.read(so)


def refresh(wheel: Path, out_dir: Path = HERE) -> Path:
    version, module = read_wheel(wheel)
    major_minor = ".".join(version.split(".")[:2])
    api = {"tensorrt": version, "source": wheel.name, "command": "python export/trt_api/refresh.py"} | extract(module)
    out = out_dir / f"tensorrt-{major_minor}.json"
    out.write_text(json.dumps(api, indent=0) + "\n")
    return out


def download(requirements, dest: Path) -> list[Path]:
    for req in requirements:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), req], check=True)
    return sorted(dest.glob("*.whl"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", type=Path, nargs="*", help="bindings wheels (default: download the pinned ones)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = args.wheel or download(PINNED, Path(tmp))
        for wheel in wheels:
            out = refresh(wheel)
            api = json.loads(out.read_text())
            print(f"{out.name}: {len(api['names'])} names, {len(api['members'])} classes with documented methods")


if __name__ == "__main__":
    main()
