"""Reliability: tampered and hostile files, crashes at arbitrary instants, full disks, out of
memory, concurrent use (issue 18; the figures are in docs/reliability.md).

Crashes and full disks are real: a forked child (no interpreter start-up to pay) is killed with
SIGKILL at a chosen instant, or runs under RLIMIT_FSIZE; the parent then checks what the child
left on disk. The slow variants (random kill instants, the CLI in fresh processes) are marked
`slow`.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import fastad
from fastad.cli import main
from fastad.errors import FastADError
from fastad.models.fod import FODConfig
from fastad.preprocess import load_image, load_mask
from fastad.run import LOCK_FILE, training_lock
from fastad.runtime import Predictor
from fastad.training.loop import train

TINY2 = FODConfig(d_models=(32, 64), n_heads=4, n_layers=1, epochs=2, batch_size=4, resize=64, crop=64)
train_fod = partial(train, model="fod", progress=False, compile_stats=False)


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("FASTAD_COMPILE", "0")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every computation of this module on one thread: the forked children must (libgomp's team
    does not survive fork), and bit-identical comparisons with the parent's runs need the same
    summation order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_error_line(err: str, needle: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("WARNING", "INFO"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def clone(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def in_child(fn, *, fsize: int | None = None, timeout: float = 300.0) -> tuple[int, str]:
    """Run `fn()` in a forked child; -> (exit status, or -signal when killed; its stderr).
    `fsize`: RLIMIT_FSIZE in bytes (SIGXFSZ ignored, so writes past it fail with EFBIG, as on a
    full disk). Stderr comes back through a pipe, which the limit does not touch."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            # libgomp's thread team does not survive fork(): a parallel op in the child waits
            # forever for the parent's workers, so the child computes on one thread.
            torch.set_num_threads(1)
            os.close(r)
            sys.stderr = os.fdopen(w, "w", buffering=1)
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            if fsize is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            code = int(fn() or 0)
        except BaseException:  # noqa: BLE001 - reported to the parent through stderr
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os._exit(code)
    os.close(w)
    os.set_blocking(r, False)
    chunks, deadline = [], time.monotonic() + timeout
    while True:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(r, 1 << 16):
                chunks.append(chunk)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("child timed out")
        time.sleep(0.05)
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)
    os.close(r)
    err = b"".join(chunks).decode(errors="replace")
    return (-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)), err


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def full_run(demo_data, tmp_path_factory) -> Path:
    """A two-epoch tiny run trained without interruption: the reference for resumed runs."""
    return train_fod(demo_data, tmp_path_factory.mktemp("rel") / "full", config=TINY2)


# ---- integrity: tampered weights, pickles, paths outside the run ----------------------------------
def test_flipped_byte_in_weights_is_refused(capsys, full_run, demo_data, tmp_path):
    run = clone(full_run, tmp_path / "run")
    data = bytearray((run / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the tensor data, the header intact
    (run / "model.safetensors").write_bytes(bytes(data))
    code, err = cli(capsys, "predict", "--run", run, demo_data / "test" / "good", "--out", tmp_path / "p", "--quiet")
    assert code == 2
    one_error_line(err, "does not match the sha256")
    assert not (tmp_path / "p").exists()


def test_pickle_posing_as_weights_is_refused(capsys, full_run, tmp_path):
    import hashlib

    run = clone(full_run, tmp_path / "run")
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)  # a pickle (zip) with the weights' name
    (run / "model.safetensors").write_bytes(buf.getvalue())
    with pytest.raises(FastADError, match="sha256"):
        fastad.load(run, warmup=False)
    conf = json.loads((run / "config.json").read_text())  # even with a matching hash: never unpickled
    conf["files"]["model.safetensors"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (run / "config.json").write_text(json.dumps(conf))
    with pytest.raises(FastADError, match="not a valid safetensors file"):
        fastad.load(run, warmup=False)


def test_old_run_without_hash_loads_with_a_warning(full_run, tmp_path, caplog):
    run = clone(full_run, tmp_path / "run")
    conf = json.loads((run / "config.json").read_text())
    del conf["files"]
    (run / "config.json").write_text(json.dumps(conf))
    with caplog.at_level("WARNING"):
        fastad.load(run, warmup=False)
    assert "not integrity-checked" in caplog.text


@pytest.mark.parametrize("name", ["../model.safetensors", "/etc/passwd", "sub/x", "..", ""])
def test_config_and_sidecar_naming_files_outside_are_refused(full_run, tmp_path, name):
    from fastad.sidecar import read_sidecar

    run = clone(full_run, tmp_path / "run")
    conf = json.loads((run / "config.json").read_text())
    conf["files"] = {name: "0" * 64}
    (run / "config.json").write_text(json.dumps(conf))
    with pytest.raises(FastADError, match="only a file name inside"):
        fastad.load(run, warmup=False)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    (tmp_path / "m.onnx.json").write_text(json.dumps(
        {"format": "fastad-onnx/1", "file": name, "input": {"resize": 64, "crop": 64}}))
    with pytest.raises(FastADError, match="only a file name inside"):
        read_sidecar(model)


def test_visa_csv_paths_outside_the_dataset_are_refused(tmp_path):
    from fastad.data.layouts import list_samples

    root = tmp_path / "visa"
    (root / "candle").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "candle" / "a.png")
    (root / "split.csv").write_text("object,split,label,image,mask\ncandle,train,normal,../../etc/x.png,\n")
    with pytest.raises(FastADError, match="outside"):
        list_samples(root, "train", layout="visa")


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _bmp_header(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 54) + info + b"\0" * 16


def _tiff_header(width: int, height: int) -> bytes:
    """A little-endian grayscale TIFF whose one strip promises width x height bytes (16 present)."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0),
            (278, 4, height), (279, 4, width * height)]
    ifd_at, n = 8, len(tags)
    data_at = ifd_at + 2 + 12 * n + 4
    ifd = struct.pack("<H", n) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<I", data_at if tag == 273 else value) if kind == 4
                                             else struct.pack("<HH", value, 0))
        for tag, kind, value in tags) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", ifd_at) + ifd + b"\0" * 16


@pytest.mark.parametrize("kind", ["png", "png_under_pils_error", "bmp", "tif", "tif_found_by_fuzzing",
                                  "tif_samples_found_by_fuzzing"])
def test_decompression_bombs_are_refused_before_allocation(tmp_path, kind):
    found = {  # 132 bytes that PIL decoded as 10 x 4,194,438 pixels in 5 s; 132 bytes declaring
        # 10 x 33,793 pixels of 65,535 samples, 22 GB for tifffile to allocate
        "tif_found_by_fuzzing": "found-slow-tiff-10x4194438-in-132-bytes",
        "tif_samples_found_by_fuzzing": "found-oom-tiff-10x33793x65535-samples-in-132-bytes"}
    if kind in found:
        found = Path(__file__).parent / "fuzz_corpus" / "image" / found[kind]
        path, data = tmp_path / "found.tif", found.read_bytes()[1:]  # first byte: the target's suffix choice
    elif kind == "png":
        path, data = tmp_path / "bomb.png", _png_header(50_000, 50_000)
    elif kind == "png_under_pils_error":  # between PIL's warning and error limits: PIL only warns
        path, data = tmp_path / "bomb.png", _png_header(12_000, 12_000)
    elif kind == "bmp":
        path, data = tmp_path / "bomb.bmp", _bmp_header(40_000, 40_000)
    else:
        path, data = tmp_path / "bomb.tif", _tiff_header(60_000, 60_000)
    path.write_bytes(data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for reader in (load_image, load_mask):
        with pytest.raises(FastADError, match="decompression bomb"):
            reader(path)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, f"peak memory grew by {grown_mb:.0f} MB reading a bomb header"


@pytest.mark.parametrize("damage", ["truncated", "bogus", "empty"])
def test_truncated_and_bogus_images_end_in_one_line(capsys, full_run, demo_data, tmp_path, damage):
    src = next((demo_data / "test" / "good").iterdir())
    bad = tmp_path / f"bad{src.suffix}"
    data = src.read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 2], "bogus": b"\x89PNG\r\n\x1a\n" + os.urandom(200),
                     "empty": b""}[damage])
    code, err = cli(capsys, "predict", "--run", full_run, src, bad, "--out", tmp_path / "p", "--quiet")
    assert code == 2
    one_error_line(err, bad.name)
    assert not (tmp_path / "p").exists()


# ---- one writer per run directory ----------------------------------------------------------------
def test_second_training_into_the_same_directory_refuses(demo_data, tmp_path):
    out = tmp_path / "run"
    with training_lock(out):  # another process holds it: a second open file description refuses
        with pytest.raises(FastADError, match="being trained by another process"):
            train_fod(demo_data, out, config=TINY2)
    assert not out.exists()  # the lock's directory, left empty, went with it


def test_stale_lock_of_a_killed_process_is_recognised(capsys, demo_data, full_run, tmp_path):
    run = clone(full_run, tmp_path / "run")
    def lock_and_die():
        with training_lock(run):
            kill_self()

    code, _ = in_child(lock_and_die)  # killed while holding the lock
    assert code == -signal.SIGKILL and (run / LOCK_FILE).exists()
    code, err = cli(capsys, "eval", "--run", run, "--data", demo_data, "--quiet")
    assert code == 2
    one_error_line(err, "incomplete: its training")
    with training_lock(run):  # taken over, not refused
        pass
    assert not (run / LOCK_FILE).exists()


# ---- crash consistency ------------------------------------------------------------------------------
def _train_killed_inside_second_checkpoint_write(data: Path, out: Path) -> None:
    """Child: train TINY2, SIGKILLed half-way through writing the epoch-2 checkpoint."""
    import fastad.run as run_mod

    real, calls = run_mod.save_file, []

    def save_then_die(tensors, path, metadata=None):
        calls.append(path)
        real(tensors, path, metadata=metadata)
        if len(calls) == 2:  # epoch 1's checkpoint is complete; die inside epoch 2's
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            kill_self()

    run_mod.save_file = save_then_die
    train_fod(data, out, config=TINY2)


def test_kill_inside_a_checkpoint_write_then_resume_is_bit_identical(capsys, demo_data, full_run, tmp_path):
    out = tmp_path / "run"
    code, err = in_child(lambda: _train_killed_inside_second_checkpoint_write(demo_data, out))
    assert code == -signal.SIGKILL, err
    assert list(out.glob(".checkpoint.safetensors.*.tmp"))  # the half-written temp file, not the checkpoint
    code, err = cli(capsys, "predict", "--run", out, demo_data / "test" / "good", "--out", tmp_path / "p", "--quiet")
    assert code == 2
    one_error_line(err, "incomplete")
    train_fod(demo_data, out, resume=True)
    a, b = load_file(str(full_run / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.json", "checkpoint.safetensors", "config.json",
                                                    "model.safetensors"]


# ---- full disks ---------------------------------------------------------------------------------------
def test_disk_full_during_predict_leaves_nothing_partial(demo_data, full_run, tmp_path):
    out = tmp_path / "pred"
    code, err = in_child(lambda: main(["predict", "--run", str(full_run), str(demo_data / "test" / "good"),
                                       "--out", str(out), "--quiet"]), fsize=300)
    assert code == 2, err
    one_error_line(err, "cannot write")
    assert not [p for p in out.rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    for p in (out.rglob("*.png") if out.exists() else []):  # whatever was written is whole
        Image.open(p).load()


def test_disk_full_during_training_keeps_the_existing_run(demo_data, full_run, tmp_path):
    run = clone(full_run, tmp_path / "run")
    before = files_of(run)
    code, err = in_child(lambda: main(["train", "--data", str(demo_data), "--out", str(run), "--resume",
                                       "--epochs", "3", "--quiet"]), fsize=4096)
    assert code == 2, err
    one_error_line(err, "cannot write")
    assert files_of(run) == before  # the finished run and its checkpoint are untouched, no temp files
    fastad.load(run, warmup=False)


# ---- out of memory ------------------------------------------------------------------------------------
class _LimitedEngine:
    """Wraps an engine: batches above `fits` raise the error torch raises on a full GPU."""

    def __init__(self, engine, fits: int):
        self.engine, self.fits, self.calls = engine, fits, []
        self.meta, self.name, self.device, self.model, self.max_batch = (
            engine.meta, engine.name, engine.device, engine.model, None)

    def run(self, batch):
        self.calls.append(len(batch))
        if len(batch) > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.engine.run(batch)


def test_out_of_memory_splits_the_batch(full_run, demo_data, caplog):
    images = sorted(str(p) for p in (demo_data / "test").rglob("*.png"))[:7]
    p = Predictor(full_run, backend="torch", device="cpu", batch_size=8, warmup=False)
    expected = p.predict(images).scores
    p.engine = _LimitedEngine(p.engine, fits=3)
    with caplog.at_level("WARNING"):
        got = p.predict(images).scores
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert p.engine.calls == [7, 3, 3, 1] and p.batch_size == 3 and "out of memory" in caplog.text
    p.predict(images)  # the smaller batch is kept: no second failure
    assert p.engine.calls[4:] == [3, 3, 1]
    p.engine = _LimitedEngine(p.engine.engine, fits=0)
    with pytest.raises(FastADError, match="out of memory running one"):
        p.predict(images[:1])


# ---- concurrency -------------------------------------------------------------------------------------
def mixed_images(demo_data: Path) -> list[np.ndarray]:
    paths = sorted((demo_data / "test").rglob("*.png"))
    rng = np.random.default_rng(0)
    out = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    out += [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8) for h, w in rng.integers(40, 90, (4, 2))]
    return out


def check_shared_predictor(p: Predictor, images: list[np.ndarray], threads: int = 8) -> None:
    """8 threads share `p` on mixed batches; every result equals the serial call's, bit for bit."""
    jobs = [images[i:i + 1 + i % 3] for i in range(len(images))]  # batches of 1-3, mixed sizes
    serial = [p.predict(j) for j in jobs]
    with ThreadPoolExecutor(threads) as pool:
        shared = list(pool.map(p.predict, jobs))
    for a, b in zip(serial, shared):
        assert np.array_equal(a.scores, b.scores) and np.array_equal(a.anomaly_maps, b.anomaly_maps)
        assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))


@pytest.mark.parametrize("backend", ["torch", "torch-lean"])
def test_one_predictor_shared_by_8_threads(full_run, demo_data, backend):
    check_shared_predictor(Predictor(full_run, backend=backend, device="cpu", batch_size=2), mixed_images(demo_data))


def test_predictors_created_and_calibrated_from_threads(full_run, demo_data):
    images = mixed_images(demo_data)
    with ThreadPoolExecutor(4) as pool:
        made = list(pool.map(lambda b: Predictor(full_run, backend=b, device="cpu", warmup=False),
                             ["torch", "torch-lean", "torch", "torch-lean"]))
    ref = made[0].predict(images[:3]).scores
    for p in made:
        np.testing.assert_allclose(p.predict(images[:3]).scores, ref, rtol=1e-5, atol=1e-6)
    p = made[0]
    before = p.predict(images[:1]).image_threshold  # the run's default, until a calibration lands
    normal = sorted(str(x) for x in (demo_data / "test" / "good").iterdir())
    with ThreadPoolExecutor(8) as pool:  # calibrations racing predictions: each sees one pair
        futures = [pool.submit(p.calibrate, normal, quantile=q) for q in (0.5, 1.0, 0.5, 1.0)]
        results = [pool.submit(p.predict, images[:2]) for _ in range(8)]
        thresholds = {f.result()["image"] for f in futures}
        for r in results:
            res = r.result()
            assert res.image_threshold == res.pixel_threshold and res.image_threshold in thresholds | {before}


# ---- slow: random kill instants, the CLI in fresh processes ------------------------------------------
def _fastad(*args, fsize: int | None = None, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))

    env = {**os.environ, "FASTAD_COMPILE": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fastad.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, preexec_fn=limit if fsize else None, **kw)


_TRAIN_TINY2 = """
import sys
from pathlib import Path
from fastad.models.fod import FODConfig
from fastad.training.loop import train
cfg = FODConfig(d_models=(32, 64), n_heads=4, n_layers=1, epochs=3, batch_size=4, resize=64, crop=64)
out = Path(sys.argv[2])
resume = (out / "checkpoint.safetensors").exists()
train(sys.argv[1], out, model="fod", config=None if resume else cfg, epochs=3 if resume else None,
      resume=resume, progress=False, compile_stats=False)
"""


@pytest.mark.slow
def test_sigkill_at_random_instants_then_resume_is_bit_identical(demo_data, tmp_path):
    """A 3-epoch tiny FOD run in a fresh process, SIGKILLed at seeded random instants (spread
    over start-up, the reference-feature pass, the epochs and the checkpoint writes) until it
    finishes; each restart resumes from the checkpoint (or starts afresh while there is none).
    The final weights equal an uninterrupted run's bit for bit."""
    env = {**os.environ, "FASTAD_COMPILE": "0", "OMP_NUM_THREADS": "1"}

    def start(out: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _TRAIN_TINY2, str(demo_data), str(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    full = tmp_path / "full"
    t0 = time.monotonic()
    proc = start(full)
    assert proc.wait() == 0, proc.stderr.read()
    duration = time.monotonic() - t0
    out, rng, kills, instants = tmp_path / "run", random.Random(18), 0, []
    while True:
        proc = start(out)
        if kills < 6:
            delay = rng.uniform(0.3, 1.0) * duration
            time.sleep(delay)
            if proc.poll() is None:
                proc.kill()
                kills += 1
                instants.append(round(delay, 1))
        proc.wait()
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert kills >= 5, instants
    a, b = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), instants


def test_kill_during_the_reference_pass_of_a_resume(demo_data, full_run, tmp_path):
    """Killed while a resumed run recomputes its reference features: the checkpoint is intact
    and the next resume still ends bit-identical."""
    out = tmp_path / "run"
    code, err = in_child(lambda: _train_killed_inside_second_checkpoint_write(demo_data, out))
    assert code == -signal.SIGKILL, err

    def resume_killed_in_reference_pass():
        import fastad.models.fod as fod

        fod.FOD.fit_reference = lambda self, tokens: kill_self()
        train_fod(demo_data, out, resume=True)

    code, err = in_child(resume_killed_in_reference_pass)
    assert code == -signal.SIGKILL, err
    train_fod(demo_data, out, resume=True)
    a, b = load_file(str(full_run / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigkill_during_export_and_predict_leaves_no_partial_file(demo_data, full_run, tmp_path):
    for cmd, out in (("export", tmp_path / "e" / "m.onnx"), ("predict", tmp_path / "p")):
        argv = (["export", "--run", full_run, "--format", "onnx", "--out", out] if cmd == "export" else
                ["predict", "--run", full_run, demo_data / "test" / "good", "--out", out, "--quiet"])
        env = {**os.environ, "FASTAD_COMPILE": "0", "OMP_NUM_THREADS": "1"}
        for delay in (2.0, 4.0, 6.0, 8.0):
            proc = subprocess.Popen([sys.executable, "-m", "fastad.cli", *map(str, argv)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(delay)
            proc.kill()
            proc.wait()
            folder = out.parent if cmd == "export" else out
            for p in (folder.rglob("*") if folder.exists() else []):
                if p.is_file() and not p.name.endswith(".tmp"):  # temp files are never read
                    if p.suffix == ".png":
                        Image.open(p).load()
                    elif p.suffix == ".json":
                        json.loads(p.read_text())
                    elif p.suffix == ".onnx":
                        import onnx

                        onnx.load(str(p))
            sidecar = out.parent / (out.name + ".json")
            if cmd == "export" and sidecar.exists():  # renamed after the model: never without it
                fastad.load(out, warmup=False)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "export", "predict"])
def test_disk_full_through_the_cli(demo_data, full_run, tmp_path, command):
    before = files_of(full_run)
    if command == "train":
        argv = ["train", "--data", demo_data, "--out", tmp_path / "r", "--epochs", "1", "--quiet"]
    elif command == "export":
        argv = ["export", "--run", full_run, "--format", "onnx", "--out", tmp_path / "m.onnx"]
    else:
        argv = ["predict", "--run", full_run, demo_data / "test" / "good", "--out", tmp_path / "p", "--quiet"]
    # RLIMIT_FSIZE bounds each file: predict's files (64 px masks, a CSV) are all under 20 KB
    proc = _fastad(*argv, fsize=300 if command == "predict" else 20_000)
    assert proc.returncode == 2, proc.stderr
    one_error_line(proc.stderr, "cannot write")
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and (p.suffix in (".onnx", ".safetensors", ".tmp")
                                                                   or p.name == "config.json")]
    assert not leftovers
    assert files_of(full_run) == before


@pytest.mark.slow
def test_soak_1000_predictions(full_run):
    """bench/soak.py for 1,000 images per backend: RSS after warm-up grows < 5 %, the probe
    batch stays bit-identical, p99 latency does not drift (the 10,000 version: docs/reliability.md)."""
    from bench.soak import run_soak

    result = run_soak(str(full_run), ["torch", "torch-lean", "onnx"], 1000, progress=False)
    for r in result["results"]:
        info = {k: v for k, v in r.items() if k != "curve"}
        assert r["probe_checks"] >= 1 and r["passed"]["rss_growth_under_5pct"] and r["passed"]["probe_bit_identical"], info
        # ~27 calls per quarter: their p99 is their slowest call, so on a shared machine only a
        # gross slowdown is a failure here; the 1.5 bound is judged on 10,000 (docs/reliability.md)
        assert r["p99_drift"] < 3.0, info
