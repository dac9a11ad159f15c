"""Every Triton kernel builds ahead of time for real GPUs (PTX and cubin for sm_90 and sm_87),
without a GPU, in the launchers' default configs — with no register spill and shared memory
within the arch's limit; and the I2Correlation autotuner's prune predicate names exactly the
configs that spilled in the recorded builds of its whole grid (bench/results/kernels-aot.json). The interpreter proves the math, not that a GPU build accepts the kernel
(e.g. plain-float globals, which only the interpreter reads). The builds run in a child process:
the kernels must be defined with TRITON_INTERPRET unset. All archs and dtypes:
`bench/build_kernels_aot.py`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_autotune_prune_predicate_matches_the_recorded_builds():
    """`spills_registers` prunes a (config, dot kind, head dim) — IEEE dots for fp32, tensor cores
    for fp16/bf16 — exactly when one of its recorded builds spilled (any arch, either dtype of
    the kind), and the record covers every config of the current grid: after changing the kernel
    or the grid, regenerate it with `python bench/build_kernels_aot.py` (or `--update`)."""
    from fastad.kernels.i2corr import AUTOTUNE_CONFIGS, LaunchConfig, gpu_launch, spills_registers

    result = json.loads((Path(__file__).resolve().parents[1] / "bench/results/kernels-aot.json").read_text())
    spilled: dict[tuple, bool] = {}
    builds = set()
    for r in result["records"]:
        if r["kernel"] != "_i2corr_fwd_kernel":
            continue
        c = r["constexprs"]
        config = LaunchConfig(c["BLOCK_M"], c["BLOCK_N"], r["num_warps"])
        builds.add((config, r["dtype"], c["HEAD_DIM"], r["arch"]))
        key = (config, c["DOT_PRECISION"] == "ieee", c["HEAD_DIM"])
        spilled[key] = spilled.get(key, False) or bool(r["spill_bytes"] or r["local_bytes"])
    expected = {(c, d, dh, a) for c in AUTOTUNE_CONFIGS for d in ("fp32", "fp16", "bf16") for dh in (32, 64)
                for a in (90, 89, 87, 80)}
    assert builds == expected, "the recorded builds do not match the autotune grid"
    wrong = {key: did for key, did in spilled.items() if spills_registers(*key) != did}
    assert wrong == {}, f"predicate vs recorded spills (config, ieee, head dim) -> spilled: {wrong}"
    assert any(spilled.values()) and not all(spilled.values())  # it does prune, and keeps some
    for dtype in (torch.float32, torch.float16):
        for dh in (32, 64):
            assert not spills_registers(gpu_launch(dtype, dh), dtype == torch.float32, dh)
    assert result["problems"] == []
