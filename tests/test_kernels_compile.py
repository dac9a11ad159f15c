"""Every Triton kernel builds ahead of time for real GPUs (PTX and cubin for sm_90 and sm_87),
without a GPU, in the launchers' default configs and FOD training's launches — with no register
spill and shared memory within the arch's limit; and the I2Correlation autotuner's prune predicate names exactly the
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

# Inference: head dim 64 (FOD's second level) holds the most registers; fp16 covers bf16's
# tensor-core path (their recorded builds match). Training (TRAIN_LAUNCHES): both head dims, whose
# launches differ.
SCRIPT = r'''
import json
from fastad.kernels import aot

builds = aot.build_all(archs=(90, 87), dtypes=("fp16", "fp32"), head_dims=(64,))
builds += [aot.build(config, dtype, arch) for arch in (90, 87) for dtype in ("fp16", "fp32")
           for config in aot.i2corr_train_configs(dtype, head_dims=(32, 64))]
print(json.dumps({"builds": [b._asdict() for b in builds],
                  "problems": [p for b in builds for p in aot.problems(b)]}))
'''


@pytest.fixture(scope="module")
def aot_builds():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_kernels_build_for_sm90_and_sm87_without_spills(aot_builds):
    inference = [b for b in aot_builds["builds"] if not b["constexprs"].get("SAVE_STATS")
                 and "_bwd_" not in b["kernel"]]
    kernels = {(b["kernel"], b["arch"], b["dtype"]) for b in inference}
    assert {k for k, _, _ in kernels} == {"_i2corr_fwd_kernel", "_feature_distance_fwd_kernel"}
    assert len(kernels) == 2 * 2 * 2 and all(b["registers"] > 0 for b in inference)
    assert aot_builds["problems"] == []


def test_training_kernels_build_for_sm90_and_sm87_without_spills(aot_builds):
    """The forward with SAVE_STATS, the dk/dv and the dq kernels at TRAIN_LAUNCHES' tiles, fp16
    and fp32, head dims 32 and 64: every one built, none spilled (`problems` covers them)."""
    train = {(b["kernel"], b["arch"], b["dtype"], b["constexprs"]["HEAD_DIM"]) for b in aot_builds["builds"]
             if b["constexprs"].get("SAVE_STATS") or "_bwd_" in b["kernel"]}
    assert len(train) == 3 * 2 * 2 * 2
    assert {k for k, *_ in train} == {"_i2corr_fwd_kernel", "_i2corr_bwd_dkdv_kernel", "_i2corr_bwd_dq_kernel"}
    assert not any(p for p in aot_builds["problems"] if "SAVE_STATS': True" in p or "_bwd_" in p)


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
