"""Ahead-of-time builds of every Triton kernel for the target GPUs, on this machine (no GPU needed).

    python bench/build_kernels_aot.py                       # sm_90, sm_89, sm_87, sm_80 × fp32/fp16/bf16
    python bench/build_kernels_aot.py --arch 90 --dtype fp16
    python bench/build_kernels_aot.py --rewrite             # problems + table again from the json
    python bench/build_kernels_aot.py --update              # build only configs the json lacks
    python bench/build_kernels_aot.py --train --arch 90 87  # FOD training's launches -> kernels-aot-train.txt

Each kernel × variant (constexprs) × dtype × arch — the launchers' default configs and every
config of the I2Correlation autotune grid (`fastad.kernels.aot`) — is compiled to a cubin; the
record holds registers per thread, spills (stack / local bytes per thread), shared memory per
block against the arch's limit, the build time, and whether the autotuner's prune predicate
(`spills_registers`) drops the config. Writes bench/results/kernels-aot.json and a Markdown table
beside it; exits 1 when a build the autotuner may launch spills or exceeds its shared-memory
limit. `--rewrite` re-derives the problems and the table from the json (after a change of the
predicate) without building. `--train` builds only FOD training's I2Correlation launches
(`TRAIN_LAUNCHES`: the forward with SAVE_STATS, dk/dv, dq) for head dims 32 and 64 and writes a
plain table to bench/results/kernels-aot-train.txt; it exits 1 when one spills.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# Kernels must be defined for a GPU build, not for Triton's interpreter; an empty cache makes the
# build times real (cached builds take ~0 s).
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default, stated
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastad-aot-cache-")

from fastad.kernels import aot  # noqa: E402
from fastad.utils import atomic_path, library_versions, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def variant(constexprs: dict) -> str:
    """The constexprs that vary between launches (the rest follow from them or never change)."""
    keys = ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "L2", "HAS_WEIGHT", "BLOCK_R", "BLOCK_C")
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items() if k in keys)


def markdown(result: dict) -> str:
    archs = result["archs"]
    lines = ["# Triton kernels built ahead of time", "", f"`{result['command']}` — triton "
             f"{result['versions'].get('triton')}, torch {result['versions']['torch']}", "",
             "Per cell: registers per thread / spill bytes per thread (stack + local) / shared memory "
             "per block in KB; \"pruned\": the autotuner's `spills_registers` drops the config (it "
             "never launches, so a spill there is no problem). Limits per block: "
             + ", ".join(f"sm_{a} {aot.SHARED_LIMIT_BYTES[a] // 1024} KB" for a in archs) + ".", "",
             "| kernel | variant | dtype | warps | pruned | " + " | ".join(f"sm_{a} ({aot.ARCHS[a]})" for a in archs)
             + " |", "|---|---|---|---|---|" + "---|" * len(archs)]
    rows: dict[tuple, dict] = {}
    for r in result["records"]:
        rows.setdefault((r["kernel"], variant(r["constexprs"]), r["dtype"], r["num_warps"], r["pruned"]),
                        {})[r["arch"]] = r
    for (kernel, var, dtype, warps, pruned), by_arch in rows.items():
        cells = [f"{r['registers']} / {r['spill_bytes'] + r['local_bytes']} / {r['shared_bytes'] / 1024:.1f}"
                 if (r := by_arch.get(a)) else "—" for a in archs]
        lines.append(f"| {kernel} | {var} | {dtype} | {warps} | {'yes' if pruned else ''} | " + " | ".join(cells) + " |")
    problems = result["problems"]
    lines += ["", "Problems: " + ("none" if not problems else ""), *[f"- {p}" for p in problems]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(aot.ARCHS), choices=list(aot.ARCHS))
    p.add_argument("--dtype", nargs="+", default=list(aot.DTYPES), choices=list(aot.DTYPES))
    p.add_argument("--json", type=Path, default=RESULTS / "kernels-aot.json")
    p.add_argument("--md", type=Path, default=RESULTS / "kernels-aot.md")
    p.add_argument("--rewrite", action="store_true", help="re-derive problems and the table from --json")
    p.add_argument("--update", action="store_true",
                   help="keep --json's records of configs still launched, build only the missing ones")
    p.add_argument("--train", action="store_true", help="FOD training's launches only -> kernels-aot-train.txt")
    args = p.parse_args(argv)

    if args.train:
        return train_table(args, argv)
    if args.rewrite:
        result = json.loads(args.json.read_text())
        for r in result["records"]:
            r["pruned"] = aot.pruned(as_build(r))
        return finish(result, args)
    old = json.loads(args.json.read_text()) if args.update else {"records": []}
    recorded = {record_key(r): r for r in old["records"]}
    records = []
    for arch in args.arch:
        for dtype in args.dtype:
            for config in aot.launch_configs(dtype, autotune=True):
                key = record_key({"kernel": config.kernel, "constexprs": config.constexprs, "dtype": dtype,
                                  "arch": arch, "num_warps": config.num_warps})
                if key in recorded:
                    records.append(recorded[key] | {"pruned": aot.pruned(as_build(recorded[key]))})
                    continue
                build = aot.build(config, dtype, arch)
                records.append(build._asdict() | {"gpus": aot.ARCHS[arch], "pruned": aot.pruned(build),
                                                  "shared_limit_bytes": aot.SHARED_LIMIT_BYTES[arch]})
                print(f"sm_{arch} {dtype} {build.kernel} {variant(build.constexprs)}: {build.registers} regs, "
                      f"{build.spill_bytes + build.local_bytes} B spilled, {build.shared_bytes} B shared, "
                      f"{build.build_s} s", flush=True)
    command = " ".join(["python", "bench/build_kernels_aot.py", *argv])
    result = {"versions": library_versions(), "command": command, "archs": args.arch, "dtypes": args.dtype,
              "records": records}
    if args.update:
        result["command"] = f"{old['command']}, then {command}"
    return finish(result, args)


def train_table(args, argv) -> int:
    """Build TRAIN_LAUNCHES for the asked archs × dtypes × head dims 32/64; write the table."""
    lines = [f"FOD training's I2Correlation kernels built ahead of time "
             f"(`python bench/build_kernels_aot.py {' '.join(argv)}`)",
             f"versions: {json.dumps(library_versions())}",
             "per build: registers per thread, spilled bytes per thread (stack + local), shared memory "
             "per block; tiles BLOCK_M x BLOCK_N (dkdv: BLOCK_N keys per program, BLOCK_M query rows "
             "per step; dq and the stats forward: BLOCK_M query rows per program)", "",
             f"{'arch':<6}{'dtype':<6}{'Dh':<4}{'kernel':<26}{'tile':<8}{'warps':<6}{'regs':<6}"
             f"{'spill B':<8}{'shared KB':<10}"]
    problems = []
    for arch in args.arch:
        for dtype in args.dtype:
            for config in aot.i2corr_train_configs(dtype):
                b = aot.build(config, dtype, arch)
                c = b.constexprs
                lines.append(f"sm_{arch:<3}{dtype:<6}{c['HEAD_DIM']:<4}{b.kernel:<26}"
                             f"{str(c['BLOCK_M']) + 'x' + str(c['BLOCK_N']):<8}{b.num_warps:<6}{b.registers:<6}"
                             f"{b.spill_bytes + b.local_bytes:<8}{b.shared_bytes / 1024:<10.1f}")
                print(lines[-1], flush=True)
                problems += aot.problems(b)
    lines += ["", "Problems: " + ("none" if not problems else ""), *[f"- {p}" for p in problems]]
    with atomic_path(RESULTS / "kernels-aot-train.txt") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return 1 if problems else 0


def record_key(r: dict) -> str:
    """One build's identity: kernel, constexprs, dtype, arch, warps."""
    return json.dumps([r["kernel"], r["constexprs"], r["dtype"], r["arch"], r["num_warps"]], sort_keys=True)


def as_build(record: dict) -> aot.Build:
    return aot.Build(**{k: record[k] for k in aot.Build._fields})


def finish(result: dict, args) -> int:
    """Problems of the builds the autotuner may launch; the json and the table."""
    problems = result["problems"] = [p for r in result["records"] for p in aot.problems(as_build(r))]
    write_json(args.json, result)
    with atomic_path(args.md) as tmp:
        tmp.write_text(markdown(result))
    print("\n".join(problems) or "no spills, shared memory within every limit")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
