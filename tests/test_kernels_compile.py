"""Every Triton kernel builds ahead of time for real GPUs (PTX and cubin for sm_90 and sm_87),
without a GPU, in the launchers' default configs — with no register spill and shared memory
within the arch's limit. The interpreter proves the math, not that a GPU build accepts the kernel
(e.g. plain-float globals, which only the interpreter reads). The builds run in a child process:
the kernels must be defined with TRITON_INTERPRET unset. All archs and dtypes:
`bench/build_kernels_aot.py`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# Head dim 64 (FOD's second level) holds the most registers; fp16 covers bf16's tensor-core path.
SCRIPT = r'''
import json
from fastad.kernels import aot

builds = aot.build_all(archs=(90, 87), dtypes=("fp16", "fp32"), head_dims=(64,))
print(json.dumps({"builds": [b._asdict() for b in builds],
                  "problems": [p for b in builds for p in aot.problems(b)]}))
'''


def test_kernels_build_for_sm90_and_sm87_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    kernels = {(b["kernel"], b["arch"], b["dtype"]) for b in result["builds"]}
    assert {k for k, _, _ in kernels} == {"_i2corr_fwd_kernel", "_feature_distance_fwd_kernel"}
    assert len(kernels) == 2 * 2 * 2 and all(b["registers"] > 0 for b in result["builds"])
    assert result["problems"] == []


def test_problems_names_spills_and_shared_memory_over_the_limit():
    # Imported here only for its bookkeeping: no kernel is built in this process.
    from fastad.kernels.aot import SHARED_LIMIT_BYTES, Build, problems

    ok = Build("k", {}, "fp16", 87, 4, 128, 0, 0, SHARED_LIMIT_BYTES[87], 0.1)
    assert problems(ok) == []
    assert "spills" in problems(ok._replace(spill_bytes=8))[0]
    assert "shared memory" in problems(ok._replace(shared_bytes=SHARED_LIMIT_BYTES[87] + 1))[0]
