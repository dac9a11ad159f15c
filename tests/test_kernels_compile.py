"""Every Triton kernel builds ahead of time for a real GPU (sm_90 PTX and cubin), without a GPU:
the interpreter proves the math, not that a GPU build accepts the kernel (e.g. plain-float
globals, which only the interpreter reads). Runs in a child process: the kernels must be
defined with TRITON_INTERPRET unset."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

fd = importlib.import_module("fastad.kernels.feature_distance")
i2 = importlib.import_module("fastad.kernels.i2corr")
target = GPUTarget("cuda", 90, 32)


def build(fn, args, constexprs):
    sig = dict(args) | {name: "constexpr" for name in constexprs}
    return triton.compile(ASTSource(fn, sig, constexprs), target=target).asm["cubin"]


ints = lambda names: [(n, "i32") for n in names]  # noqa: E731
for l2 in (False, True):
    build(fd._feature_distance_fwd_kernel,
          [("X", "*fp16"), ("Xh", "*fp16"), ("W", "*fp32"), ("Out", "*fp32")]
          + ints(["R", "C", "sxr", "sxc", "shr", "shc"]),
          {"HAS_WEIGHT": True, "L2": l2, "BLOCK_R": 32, "BLOCK_C": 64})
strides = [f"s{t}{a}" for t in "qkvo" for a in "bhnd"]
for dtype, ieee in (("fp16", False), ("fp32", True)):
    build(i2._i2corr_fwd_kernel,
          [(n, "*" + dtype) for n in "QKV"] + [("InvTwoSigmaSq", "*fp32"), ("LogNorm", "*fp32"),
           ("Out", "*" + dtype), ("KL", "*fp32"), ("Ent", "*fp32")]
          + ints(strides + ["H", "N", "M", "GRID_W"]) + [("scale", "fp32")],
          {"HEAD_DIM": 32, "BLOCK_D": 32, "BLOCK_M": 64, "BLOCK_N": 64, "WITH_STATS": True,
           "IEEE_DOT": ieee, "UPCAST": False})
print("built")
'''


def test_kernels_build_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "built" in out.stdout, out.stderr[-3000:]
