"""Data-parallel training (issue 17, item 5): 2 CPU processes (gloo) end with the weights of 1
process with the same global batch, and only rank 0 writes checkpoints and the run.

- fast (make test): FOD trained 1 epoch in 2 processes, then resumed to 2 epochs in 2 processes,
  against 1 process training 2 epochs. The 2 processes are started directly with torchrun's
  worker environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT), which spares torchrun's own process.
- slow: ADTR (its own AdamW) and UTAD stage 2 under torchrun (tests/ddp_worker.py), and
  `fastad train --nproc 2` through the CLI. UTAD stage 2 is compared with SGD in place of Adam
  (Expert-Net's instance-normalised convolutions have many near-zero gradients whose rounding Adam
  amplifies, docs/distributed.md). UTAD stage 1 is left at 0 epochs: its BatchNorm, MI shuffle and
  noise work on each process's part of the batch on a CPU.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import sys
import time
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
# query), so its gradient is zero up to rounding, and Adam normalises that noise into steps that
# depend on the summation order. Every other tensor must match to 1e-5 (relative for
# values larger than 1, such as UTAD's fitted PM scales).
GRADIENT_FREE = ("k_proj.bias",)
TOL = 1e-5
SGD = {"utad"}


def torchrun(nproc: int, script: Path, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    """`script args` in `nproc` processes on 127.0.0.1 under torchrun (rendezvous at a free port)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--max-restarts", "0", "--monitor-interval", "0.1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "127.0.0.1:0", "--local-addr", "127.0.0.1", str(script), *map(str, args)]
    return _run([cmd], [_env()], str(args[-1]), timeout)


def ranks(nproc: int, script: Path, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    """`script args` in `nproc` processes started directly with the environment torchrun gives its
    workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT: env:// initialisation), without
    torchrun's own process and rendezvous (the fast test; the slow ones go through torchrun)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    envs = [_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)) for r in range(nproc)]
    return _run([[sys.executable, str(script), *map(str, args)]] * nproc, envs, str(args[-1]), timeout)


def _env(**extra) -> dict:
    # offline: every process (and the 1-process run, see the tests) loads the same backbone weights
    return {**os.environ, "OMP_NUM_THREADS": "1", "FASTAD_COMPILE": "0", "FASTAD_OFFLINE": "1", **extra}


def _run(cmds: list[list[str]], envs: list[dict], marker: str, timeout: float) -> subprocess.CompletedProcess:
    """Run `cmds` at once; -> their joint exit status (0 if all succeeded) and output. When one
    fails the others are stopped (as torchrun stops its workers); past `timeout` they and every
    process whose command line holds `marker` are killed and the test fails."""
    logs = [tempfile.TemporaryFile("w+") for _ in cmds]
    procs = [subprocess.Popen(c, stdout=f, stderr=subprocess.STDOUT, text=True, env=e)
             for c, e, f in zip(cmds, envs, logs)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if None not in codes or any(codes):  # all done, or one failed: the others would wait for it
            break
        time.sleep(0.1)
    timed_out = time.monotonic() >= deadline
    for p in procs:
        if p.poll() is None:
            p.terminate()  # torchrun stops its workers on SIGTERM
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if timed_out or any(p.returncode for p in procs):  # (on success the tests check that none is left)
        for pid in processes_mentioning(marker):
            os.kill(pid, signal.SIGKILL)
    out = []
    for f in logs:
        f.seek(0)
        out.append(f.read())
        f.close()
    if timed_out:
        pytest.fail("data-parallel processes timed out:\n" + "\n".join(o[-2000:] for o in out))
    return subprocess.CompletedProcess(cmds, max(abs(p.returncode) for p in procs), "\n".join(out))


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


def _run_two_processes(jobs: list[dict], tmp_path: Path, launch=torchrun) -> list[list[str]]:
    """The jobs in one launch of 2 processes; -> the logged writes [rank, what, run]."""
    log, spec = tmp_path / "writes.log", tmp_path / "spec.json"
    spec.write_text(json.dumps({"log": str(log), "jobs": jobs}))
    result = launch(2, WORKER, spec, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:]
    assert processes_mentioning(str(spec)) == []  # (torchrun and) both workers are gone
    writes = [line.split() for line in log.read_text().splitlines()]
    assert {rank for rank, _, _ in writes} == {"0"}, writes  # rank 0 alone wrote
    return writes


def _compare_with_one_process(name: str, demo_data: Path, tmp_path: Path) -> None:
    with sgd_instead_of_adam() if name in SGD else contextlib.nullcontext():
        single = train(demo_data, tmp_path / f"{name}1", model=name, config=CONFIGS[name], device="cpu",
                       progress=False)
    _assert_same_run(single, tmp_path / f"{name}2")
    # training changed the model well beyond the tolerance (else the comparison proves nothing)
    history = json.loads((single / "config.json").read_text())["training"]["history"]
    first = next(k for k in history[0] if k not in ("stage", "epoch", "seconds"))
    assert abs(history[-1][first] - history[0][first]) > 100 * TOL * abs(history[0][first]), (name, history)


def test_two_processes_match_one_resume_and_write_once(demo_data, tmp_path, monkeypatch):
    """FOD: 2 processes train 1 epoch, then resume to 2; = 1 process training 2 epochs."""
    monkeypatch.setenv("FASTAD_COMPILE", "0")
    monkeypatch.setenv("FASTAD_OFFLINE", "1")  # the backbone weights the processes load
    one_epoch = {**CONFIGS["fod"].to_dict(), "epochs": 1}
    job = {"model": "fod", "data": str(demo_data), "out": str(tmp_path / "fod2"), "config": one_epoch}
    writes = _run_two_processes([job, {**job, "resume": True, "options": {"epochs": 2}}], tmp_path, launch=ranks)
    assert [w[1:] for w in writes] == [["save_checkpoint", "fod2"], ["write_run", "fod2"]] * 2, writes
    assert sorted(p.name for p in (tmp_path / "fod2").iterdir()) == sorted(
        ["model.safetensors", "config.json", "checkpoint.safetensors", "checkpoint.json"])  # no stray temp files
    _compare_with_one_process("fod", demo_data, tmp_path)


@pytest.mark.slow
def test_two_processes_match_one_every_family(demo_data, tmp_path, monkeypatch):
    """ADTR (AdamW) and UTAD stage 2 (SGD) in 2 processes = 1 process (FOD: the test above)."""
    monkeypatch.setenv("FASTAD_COMPILE", "0")
    monkeypatch.setenv("FASTAD_OFFLINE", "1")  # the backbone weights the processes load
    jobs = [{"model": name, "data": str(demo_data), "out": str(tmp_path / f"{name}2"),
             "config": CONFIGS[name].to_dict(), "sgd": name in SGD} for name in ("adtr", "utad")]
    writes = _run_two_processes(jobs, tmp_path)
    assert sorted(w[1:] for w in writes) == sorted([["save_checkpoint", "adtr2"]] * 2 + [["write_run", "adtr2"]] +
                                                   [["save_checkpoint", "utad2"]] * 2 + [["write_run", "utad2"]])
    for name in ("adtr", "utad"):
        _compare_with_one_process(name, demo_data, tmp_path)


@pytest.mark.slow
def test_cli_nproc(demo_data, tmp_path):
    """`fastad train --nproc 2` (torchrun launched by the CLI) writes one run, trained by 2 processes."""
    def fastad_train(out: Path, batch_size: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "fastad", "train", "--nproc", "2", "--device", "cpu", "--data", str(demo_data),
               "--out", str(out), "--epochs", "1", "--batch-size", str(batch_size), "--quiet"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTAD_COMPILE": "0", "FASTAD_OFFLINE": "1"}
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)

    out = tmp_path / "run"
    result = fastad_train(out, 2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("trained FOD") == 1 and "in 2 processes" in result.stdout, result.stdout
    conf = json.loads((out / "config.json").read_text())
    assert conf["training"]["processes"] == 2 and conf["normal_scores"]["num_images"] == 8
    assert processes_mentioning(str(out)) == []
    # a batch that does not split evenly: one error line from the workers, nothing written
    bad = fastad_train(tmp_path / "bad", 3)
    assert bad.returncode == 2 and "multiple of the number of processes" in bad.stderr, bad.stderr[-2000:]
    assert "data-parallel training failed" in bad.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "bad").exists()


def test_batch_must_split_evenly(monkeypatch):
    par = Parallel(rank=1, world=3)
    with pytest.raises(FastADError, match="multiple of the number of processes"):
        par.check_batch("train", 4)
    par.check_batch("train", 6)
    assert par.shard(np.arange(6)).tolist() == [2, 3]
