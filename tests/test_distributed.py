"""Data-parallel training (issue 17, item 5): 2 CPU processes (torchrun, gloo) end with the weights
of 1 process with the same global batch, and only rank 0 writes checkpoints and the run.

Every family on the tiny demo data, in one torchrun launch (tests/ddp_worker.py): FOD trained 1
epoch then resumed to 2 (resume across processes) and ADTR 2 epochs, with their own Adam/AdamW;
UTAD stage 2 with SGD in place of Adam (Expert-Net's instance-normalised convolutions have many
near-zero gradients whose rounding Adam amplifies: with Adam its loss history matches but weights
differ by up to ~1e-3, docs/distributed.md). UTAD stage 1 is left at 0 epochs: its BatchNorm, MI
shuffle and noise work on each process's part of the batch on a CPU.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from fastad import train
from fastad.errors import FastADError
from fastad.models.adtr import ADTRConfig
from fastad.models.fod import FODConfig
from fastad.models.utad import UTADConfig
from fastad.training.distributed import Parallel
from tests.ddp_worker import sgd_instead_of_adam

WORKER = Path(__file__).with_name("ddp_worker.py")
CONFIGS = {
    "fod": FODConfig(d_models=(32, 64), n_heads=4, n_layers=1, resize=64, crop=64, epochs=2, batch_size=4),
    "adtr": ADTRConfig(d_model=32, n_heads=4, n_encoder_layers=1, n_decoder_layers=1, ffn_dim=64, resize=64,
                       crop=64, epochs=2, batch_size=4, topk=2),
    "utad": UTADConfig(resize=64, crop=64, size=32, ie_filters=(4, 4, 8, 8), ex_dim=4, ex_res=1, mlp_dim=16,
                       epochs1=0, epochs2=2, batch_size=4, lr2=0.1),  # lr for SGD
}
# Attention is invariant to the key projection's bias (it adds one constant to every logit of a
# query), so its gradient is rounding noise (~1e-9 against Adam's eps 1e-8): Adam turns noise of
# different rounding into different lr-sized steps. Every other tensor must match to 1e-5 (relative
# for fitted statistics larger than 1, e.g. UTAD's pm_scale ~70).
GRADIENT_FREE = ("k_proj.bias",)
TOL = 1e-5
SGD = {"utad"}


def torchrun(nproc: int, script: Path, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    """`script args` in `nproc` processes on 127.0.0.1 (rendezvous at a free port); the whole
    process group is killed if it outlives `timeout`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--max-restarts", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
           "--local-addr", "127.0.0.1", str(script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTAD_COMPILE": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers on SIGTERM
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        for pid in processes_mentioning(str(args[-1])):  # workers run in sessions of their own
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"torchrun timed out:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (Linux /proc)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _assert_same_run(single: Path, multi: Path) -> None:
    a, b = load_file(str(single / "model.safetensors")), load_file(str(multi / "model.safetensors"))
    assert a.keys() == b.keys()
    compared = [k for k in a if not k.endswith(GRADIENT_FREE)]
    def err(k):
        return ((a[k].double() - b[k].double()).abs() / a[k].double().abs().clamp_min(1)).max().item()

    worst = max(compared, key=err)
    assert err(worst) <= TOL, (multi.name, worst, err(worst))
    ca, cb = (json.loads((r / "config.json").read_text()) for r in (single, multi))
    assert cb["training"]["processes"] == 2 and "processes" not in ca["training"]
    assert [h["epoch"] for h in ca["training"]["history"]] == [h["epoch"] for h in cb["training"]["history"]]
    for ha, hb in zip(ca["training"]["history"], cb["training"]["history"]):  # losses averaged over ranks
        for k, v in ha.items():
            if k not in ("seconds", "epoch", "stage"):
                assert hb[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (multi.name, k)
    scale = ca["normal_scores"]["max"]
    for k in ("num_images", "mean", "std", "max", "p99"):  # normal scores gathered from both ranks, to 1e-5 of max
        assert cb["normal_scores"][k] == pytest.approx(ca["normal_scores"][k], rel=0, abs=TOL * scale), (multi.name, k)


def test_two_processes_match_one_and_write_once(demo_data, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTAD_COMPILE", "0")
    log = tmp_path / "writes.log"
    fod_one_epoch = {**CONFIGS["fod"].to_dict(), "epochs": 1}
    jobs = [
        {"model": "fod", "data": str(demo_data), "out": str(tmp_path / "fod2"), "config": fod_one_epoch},
        {"model": "fod", "data": str(demo_data), "out": str(tmp_path / "fod2"), "config": fod_one_epoch,
         "resume": True, "options": {"epochs": 2}},
        {"model": "adtr", "data": str(demo_data), "out": str(tmp_path / "adtr2"), "config": CONFIGS["adtr"].to_dict()},
        {"model": "utad", "data": str(demo_data), "out": str(tmp_path / "utad2"), "config": CONFIGS["utad"].to_dict(),
         "sgd": True},
    ]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"log": str(log), "jobs": jobs}))
    result = torchrun(2, WORKER, spec, timeout=300)
    assert result.returncode == 0, result.stdout[-6000:]
    assert processes_mentioning(str(spec)) == []  # torchrun and both workers are gone

    # rank 0 alone wrote: FOD 1 checkpoint + run, resumed: 1 checkpoint + run; ADTR 2 + run; UTAD 2 + run
    writes = [line.split() for line in log.read_text().splitlines()]
    assert {rank for rank, _, _ in writes} == {"0"}, writes
    count = {(name, run): sum(1 for w in writes if w[1:] == [name, run]) for _, name, run in writes}
    assert count == {("save_checkpoint", "fod2"): 2, ("write_run", "fod2"): 2, ("save_checkpoint", "adtr2"): 2,
                     ("write_run", "adtr2"): 1, ("save_checkpoint", "utad2"): 2, ("write_run", "utad2"): 1}, count
    assert sorted(p.name for p in (tmp_path / "fod2").iterdir()) == sorted(
        ["model.safetensors", "config.json", "checkpoint.safetensors", "checkpoint.json"])  # no stray temp files

    for name, cfg in CONFIGS.items():
        with sgd_instead_of_adam() if name in SGD else contextlib.nullcontext():
            single = train(demo_data, tmp_path / f"{name}1", model=name, config=cfg, device="cpu", progress=False)
        _assert_same_run(single, tmp_path / f"{name}2")
        # training changed the model well beyond the tolerance (else the comparison proves nothing)
        history = json.loads((single / "config.json").read_text())["training"]["history"]
        first = next(k for k in history[0] if k not in ("stage", "epoch", "seconds"))
        assert abs(history[-1][first] - history[0][first]) > 100 * TOL * abs(history[0][first]), (name, history)


def test_batch_must_split_evenly(monkeypatch):
    par = Parallel(rank=1, world=3)
    with pytest.raises(FastADError, match="multiple of the number of processes"):
        par.check_batch("train", 4)
    par.check_batch("train", 6)
    assert par.shard(np.arange(6)).tolist() == [2, 3]
