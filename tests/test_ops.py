"""fastad.ops: the one module that picks the kernels' implementation."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from fastad import ops
from fastad.backends import IMPL_OF_BACKEND
from fastad.errors import FastADError

PACKAGE = Path(ops.__file__).resolve().parent


def test_only_ops_imports_the_kernels():
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                names = [base if node.level == 0 else "." * node.level + base]
            if any(n.startswith("fastad.kernels") or n.lstrip(".").startswith("kernels") for n in names):
                importers.append(path.relative_to(PACKAGE).as_posix())
    assert set(importers) == {"ops.py"}, importers


def test_impl_names():
    assert ops.IMPLS == ("reference", "lean", "triton")
    assert {b: ops.impl_of_backend(b) for b in IMPL_OF_BACKEND} == IMPL_OF_BACKEND
    with pytest.raises(FastADError, match="impl"):
        ops.check_impl("torch")
    with pytest.raises(FastADError, match="backend"):
        ops.impl_of_backend("onnx")


def test_set_impl_refuses_triton_off_cuda(monkeypatch):
    model = torch.nn.Linear(2, 2)
    assert ops.set_impl(model, "lean").impl == "lean"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(FastADError, match="CUDA"):
            ops.set_impl(model, "triton")
        assert model.impl == "lean"


def test_fod_training_branch_impl_follows_the_device():
    """One switch: the Triton training kernels on CUDA tensors, the lean blocked path on the CPU
    (even under TRITON_INTERPRET, which only the kernel tests use)."""
    from fastad.kernels._impl import triton

    assert ops.training_impl(torch.device("cpu")) == "lean"
    assert ops.training_impl(torch.device("cuda")) == ("triton" if triton is not None else "lean")
