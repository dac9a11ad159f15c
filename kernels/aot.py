"""Ahead-of-time builds of every Triton kernel for the target GPUs, on any machine (no GPU needed).

The interpreter proves a kernel's math, not that a GPU build accepts it; `triton.compile` with a
`GPUTarget` runs the whole NVIDIA pipeline here (Triton IR → PTX → cubin with the bundled ptxas),
and the bundled `cuobjdump --dump-resource-usage` reads registers per thread, spill stack / local
memory and static shared memory from the cubin. Triton's own shared memory is dynamic and comes
from the compiled kernel's metadata.

Read top-down: target archs and their limits → the launch configs (what the launchers in
`i2corr.py` / `feature_distance.py` pass by default, I2Correlation's autotune grid, and FOD
training's three launches from `i2corr_grad.TRAIN_LAUNCHES`) → one build → all builds. Used by `bench/build_kernels_aot.py` (the table in bench/results/) and
`tests/test_kernels_compile.py` (no spills, shared memory within the arch's limit).

Kernels must be defined with TRITON_INTERPRET unset: import this module in a process without it.
"""
from __future__ import annotations

import inspect
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from ._impl import interpreting, triton

# Compute capability -> GPUs it stands for.
ARCHS = {90: "H100/H200", 89: "L4/RTX 40", 87: "Jetson AGX/NX Orin", 80: "A100"}

# Maximum shared memory per thread block (opt-in, dynamic; Triton opts in), per compute capability:
# CUDA C++ Programming Guide, "Technical Specifications per Compute Capability" — 8.0: 163 KB,
# 8.6/8.9: 99 KB, 8.7: 163 KB, 9.0: 227 KB.
SHARED_LIMIT_BYTES = {90: 227 * 1024, 89: 99 * 1024, 87: 163 * 1024, 80: 163 * 1024}

DTYPES = ("fp32", "fp16", "bf16")

# Head dims of the default FOD config (d = 256 / 512, 8 heads); BLOCK_D as the launcher rounds it.
HEAD_DIMS = (32, 64)


class KernelConfig(NamedTuple):
    kernel: str
    fn: object                 # the @triton.jit function
    signature: dict            # argument name -> Triton type ("*fp16", "i32", "fp32")
    constexprs: dict           # constexpr name -> value (the variant)
    num_warps: int


class Build(NamedTuple):
    kernel: str
    constexprs: dict
    dtype: str
    arch: int
    num_warps: int
    registers: int             # per thread
    spill_bytes: int           # per-thread stack frame (STACK) — nonzero means registers spilled
    local_bytes: int           # per-thread local memory (LOCAL)
    shared_bytes: int          # per block: Triton's dynamic shared memory + static shared
    build_s: float


def _ints(names):
    return {name: "i32" for name in names}


def _launcher_defaults(launcher) -> dict:
    """Keyword defaults of a launcher (block sizes, num_warps): the configs it actually uses."""
    return {name: p.default for name, p in inspect.signature(launcher).parameters.items()
            if p.default is not inspect.Parameter.empty}


def i2corr_configs(dtype: str, head_dims=HEAD_DIMS, autotune: bool = False) -> list[KernelConfig]:
    """`i2corr_forward_triton`'s launches for one dtype: its fixed default (`gpu_launch`), or with
    `autotune` every entry of AUTOTUNE_CONFIGS — including the ones `spills_registers` prunes, so
    that the records show the predicate is right. IEEE dots for fp32 only (GPU builds never
    upcast; that is an interpreter workaround)."""
    import torch

    from .i2corr import AUTOTUNE_CONFIGS, _i2corr_fwd_kernel, block_d, gpu_launch

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    tensor = "*" + dtype
    strides = [f"s{t}{a}" for t in "qkv" for a in "bhnd"] + ["ssb", "ssh", "ssn", "ssc"] \
        + [f"so{a}" for a in "bhnd"]
    signature = {"Q": tensor, "K": tensor, "V": tensor, "Sigma": "*fp32", "Out": tensor, "KL": "*fp32",
                 "Ent": "*fp32", "Stats": "*fp32", "stat_stride": "i32"} \
        | _ints(strides + ["H", "N", "GRID_H", "GRID_W"]) | {"qk_scale": "fp32"}
    return [KernelConfig("_i2corr_fwd_kernel", _i2corr_fwd_kernel, signature,
                         {"HEAD_DIM": dh, "BLOCK_D": block_d(dh),
                          "BLOCK_M": launch.block_m, "BLOCK_N": launch.block_n,
                          "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "UPCAST": False,
                          "SAVE_STATS": False},
                         num_warps=launch.num_warps)
            for dh in head_dims for launch in (AUTOTUNE_CONFIGS if autotune else (gpu_launch(torch_dtype, dh),))]


def i2corr_train_configs(dtype: str, head_dims=HEAD_DIMS) -> list[KernelConfig]:
    """One training step's launches for one dtype (`fastad.kernels.i2corr_grad.TRAIN_LAUNCHES`):
    the forward with SAVE_STATS, the dk/dv kernel and the dq kernel."""
    import torch

    from .i2corr import block_d
    from .i2corr_grad import _i2corr_bwd_dkdv_kernel, _i2corr_bwd_dq_kernel, train_launch

    stats_fwd, = i2corr_configs(dtype, head_dims=(32,))  # the forward's signature
    tensor = "*" + dtype
    strides = [f"s{t}{a}" for t in "qkv" for a in "bhnd"] + ["ssb", "ssh", "ssn", "ssc"] \
        + [f"sd{a}" for a in "bhnd"]
    tail = _ints(strides + ["H", "N", "GRID_W"]) | {"qk_scale": "fp32", "scale": "fp32"}
    inputs = {"Q": tensor, "K": tensor, "V": tensor, "Sigma": "*fp32", "DO": tensor, "Rows": "*fp32"}
    dkdv_sig = inputs | {"DK": "*fp32", "DV": "*fp32", "row_stride": "i32"} | tail
    dq_sig = inputs | {"DQ": "*fp32", "row_stride": "i32"} | tail
    configs = []
    for dh in head_dims:
        launch = train_launch({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype], dh)
        common = {"HEAD_DIM": dh, "BLOCK_D": block_d(dh),
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "UPCAST": False}
        configs += [
            KernelConfig("_i2corr_fwd_kernel", stats_fwd.fn, stats_fwd.signature,
                         common | {"BLOCK_M": launch.stats.block_m, "BLOCK_N": launch.stats.block_n,
                                   "SAVE_STATS": True}, num_warps=launch.stats.num_warps),
            KernelConfig("_i2corr_bwd_dkdv_kernel", _i2corr_bwd_dkdv_kernel, dkdv_sig,
                         common | {"BLOCK_M": launch.dkdv.block_m, "BLOCK_N": launch.dkdv.block_n},
                         num_warps=launch.dkdv.num_warps),
            KernelConfig("_i2corr_bwd_dq_kernel", _i2corr_bwd_dq_kernel, dq_sig,
                         common | {"BLOCK_M": launch.dq.block_m, "BLOCK_N": launch.dq.block_n},
                         num_warps=launch.dq.num_warps),
        ]
    return configs


def pruned(b: Build) -> bool:
    """Whether the I2Correlation autotuner's prune predicate (`spills_registers`) drops this
    build's config: such configs never launch, so their spills are no problem. Training launches
    are fixed (never autotuned, never pruned)."""
    from .i2corr import LaunchConfig, spills_registers

    if b.kernel != "_i2corr_fwd_kernel" or b.constexprs.get("SAVE_STATS"):
        return False
    c = b.constexprs
    return spills_registers(LaunchConfig(c["BLOCK_M"], c["BLOCK_N"], b.num_warps), c["DOT_PRECISION"] == "ieee",
                            c["HEAD_DIM"])


def feature_distance_configs(dtype: str) -> list[KernelConfig]:
    """`feature_distance_triton`'s launch: its default rows per program and warps; BLOCK_C =
    min(128, next_pow2(C)) = 128 for every model's channel count (≥ 128)."""
    from .feature_distance import _feature_distance_fwd_kernel, feature_distance_triton

    launch = _launcher_defaults(feature_distance_triton)

    signature = {"X": "*" + dtype, "Xh": "*" + dtype, "W": "*fp32", "Out": "*fp32"} \
        | _ints(["R", "C", "sxr", "sxc", "shr", "shc"])
    return [KernelConfig("_feature_distance_fwd_kernel", _feature_distance_fwd_kernel, signature,
                         {"HAS_WEIGHT": weight, "L2": l2, "BLOCK_R": launch["block_r"], "BLOCK_C": 128},
                         num_warps=launch["num_warps"])
            for l2 in (False, True) for weight in (False, True)]


def launch_configs(dtype: str, head_dims=HEAD_DIMS, autotune: bool = False, train: bool = False) -> list[KernelConfig]:
    """Every kernel × variant the launchers use by default for one input dtype; with `autotune`
    also every config of the I2Correlation autotune grid; with `train` also FOD training's three
    I2Correlation launches."""
    return i2corr_configs(dtype, head_dims, autotune) + feature_distance_configs(dtype) \
        + (i2corr_train_configs(dtype, head_dims) if train else [])


def cuobjdump_path() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the (single) function in a cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(cuobjdump_path()), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if "REG" not in found:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return {key: int(found.get(key, 0)) for key in ("REG", "STACK", "SHARED", "LOCAL")}


def build(config: KernelConfig, dtype: str, arch: int) -> Build:
    """Compile one launch config for `sm_<arch>` and read its resource usage."""
    if interpreting():
        raise RuntimeError("AOT builds need the kernels defined without TRITON_INTERPRET=1")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = config.signature | {name: "constexpr" for name in config.constexprs}
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(config.fn, signature, config.constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": config.num_warps})
    seconds = time.perf_counter() - start
    usage = resource_usage(compiled.asm["cubin"])
    return Build(config.kernel, dict(config.constexprs), dtype, arch, config.num_warps, usage["REG"],
                 usage["STACK"], usage["LOCAL"], int(compiled.metadata.shared) + usage["SHARED"], round(seconds, 2))


def build_all(archs=tuple(ARCHS), dtypes=DTYPES, head_dims=HEAD_DIMS, autotune: bool = False,
              train: bool = False) -> list[Build]:
    return [build(config, dtype, arch) for arch in archs for dtype in dtypes
            for config in launch_configs(dtype, head_dims, autotune, train)]


def problems(b: Build) -> list[str]:
    """What would break or slow a launch on the target: spills, shared memory over the limit
    (none for configs the autotuner prunes: they never launch)."""
    where = f"{b.kernel} {b.constexprs} {b.dtype} sm_{b.arch}"
    found = []
    if pruned(b):
        return found
    if b.spill_bytes or b.local_bytes:
        found.append(f"{where}: spills ({b.spill_bytes} B stack, {b.local_bytes} B local per thread)")
    if b.shared_bytes > SHARED_LIMIT_BYTES[b.arch]:
        found.append(f"{where}: {b.shared_bytes} B shared memory > {SHARED_LIMIT_BYTES[b.arch]} B per block")
    return found
