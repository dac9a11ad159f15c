"""Serving through Triton Inference Server: the model repository (every config.pbtxt parsed with
Triton's own ModelConfig schema; the TensorRT one built against the fake TensorRT of
test_deploy), the pipeline without a server, and a real `tritonserver` (nvidia-pytriton's, CPU,
Python backend) on 127.0.0.1 serving a repository exported from a tiny run.

The ONNX Runtime and TensorRT backends are not in that wheel: the network models' configs are
schema-checked here and not served. Parity: the server's results against the in-process
Predictor on the repository's own model.onnx — max |Δ map| ≤ 1e-5 of the map range, equal
scores, flags, masks and regions.
"""
from __future__ import annotations

import io
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2

import fastad
from fastad.errors import FastADError
from fastad.export.triton import export_triton
from fastad.runtime import Predictor
from fastad.serving import TritonServer, read_config
from fastad.triton_pipeline import Pipeline

from .test_cli import assert_user_error, run_cli
from .test_deploy import RealNamesOnly, fake_tensorrt, real_tensorrt_names

MAP_TOLERANCE = 1e-5  # of the map range (the bound)


def _images(demo_data: Path) -> list[str]:
    return sorted(str(p) for p in (demo_data / "test").rglob("*.png"))


def _jpeg_of_another_size(path: str) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").resize((100, 72)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def repo(tiny_run_128, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    export_triton(tiny_run_128, out, engine="onnx", max_batch=4, instance_kind="cpu", name="tiny")
    return out


@pytest.fixture(scope="module")
def thresholds(repo, demo_data) -> float:
    """A threshold inside the tiny model's score range (its own one flags nothing), written into
    the pipeline's config: masks, flags and regions then have something to show."""
    scores = Predictor(repo / "tiny" / "1" / "model.onnx").predict(_images(demo_data)).scores
    thr = float(np.median(scores))
    path = repo / "tiny_pipeline" / "config.pbtxt"
    config = read_config(path)
    for key in ("image_threshold", "pixel_threshold"):
        config.parameters[key].string_value = repr(thr)
    path.write_text(text_format.MessageToString(config))
    return thr


# --------------------------------------------------------------------------------------------
# The repository
# --------------------------------------------------------------------------------------------
def _parse(path: Path):
    """Strict parse with Triton's schema: unknown fields, wrong types or bad enums raise."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_schema_parse_is_strict():
    with pytest.raises(text_format.ParseError):
        text_format.Parse('name: "x"\nmax_batch: 4\n', model_config_pb2.ModelConfig())
    with pytest.raises(text_format.ParseError):
        text_format.Parse('instance_group { kind: KIND_TPU }\n', model_config_pb2.ModelConfig())


def _check_network(config, platform: str, crop: int, max_batch: int, kind) -> None:
    assert config.platform == platform and config.max_batch_size == max_batch
    (images,) = config.input
    assert (images.name, images.data_type, list(images.dims)) == ("images", model_config_pb2.TYPE_FP32, [3, crop, crop])
    outputs = {o.name: o for o in config.output}
    assert list(outputs["anomaly_map"].dims) == [crop, crop] and list(outputs["score"].dims) == [1]
    assert outputs["score"].HasField("reshape") and list(outputs["score"].reshape.shape) == []
    assert all(o.data_type == model_config_pb2.TYPE_FP32 for o in outputs.values())
    batching = config.dynamic_batching
    assert batching.max_queue_delay_microseconds == 2000
    assert list(batching.preferred_batch_size) and max(batching.preferred_batch_size) <= max_batch
    assert [g.kind for g in config.instance_group] == [kind]


def test_repository_layout_and_schema(tiny_run_128, tmp_path, capsys):
    out = tmp_path / "repo"
    (out / "other_model").mkdir(parents=True)  # models already there stay
    code, printed, err = run_cli(capsys, "export", "--run", tiny_run_128, "--format", "triton", "--out", out,
                                 "--max-batch", "6")  # defaults: onnx, GPU instances, the run's name
    assert code == 0, err
    name = tiny_run_128.name
    assert f"{name}_pipeline" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted([name, f"{name}_pipeline", "other_model"])
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted([
        f"{name}/config.pbtxt", f"{name}/1/model.onnx", f"{name}/1/model.onnx.json",
        f"{name}_pipeline/config.pbtxt", f"{name}_pipeline/1/model.py"])
    network = _parse(out / name / "config.pbtxt")
    _check_network(network, "onnxruntime_onnx", 128, 6, model_config_pb2.ModelInstanceGroup.KIND_GPU)
    assert network.name == name and network.default_model_filename == "model.onnx"
    pipeline = _parse(out / f"{name}_pipeline" / "config.pbtxt")
    assert pipeline.backend == "python" and pipeline.max_batch_size == 6
    assert [(i.name, i.data_type, list(i.dims)) for i in pipeline.input] == [("image", model_config_pb2.TYPE_STRING, [1])]
    assert {o.name: list(o.dims) for o in pipeline.output} == {
        "score": [1], "is_anomalous": [1], "anomaly_map": [128, 128], "mask": [1], "regions": [1]}
    params = {k: v.string_value for k, v in pipeline.parameters.items()}
    assert (out / params["network_file"]).is_file() and params["fastad_role"] == "pipeline"
    side = fastad.export.read_sidecar(out / params["network_file"])
    assert float(params["image_threshold"]) == side["thresholds"]["image"]
    # re-export replaces the two models, leaves nothing else behind
    info = export_triton(tiny_run_128, out, max_batch=2, instance_kind="cpu")
    assert (info["network"], info["pipeline"]) == (name, f"{name}_pipeline")
    assert _parse(out / name / "config.pbtxt").max_batch_size == 2
    assert [g.kind for g in _parse(out / f"{name}_pipeline" / "config.pbtxt").instance_group] == [
        model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert sorted(p.name for p in out.iterdir()) == sorted([name, f"{name}_pipeline", "other_model"])


def test_tensorrt_repository(tiny_run_128, tmp_path, monkeypatch):
    """The plan is built by the engine export's code path (fake TensorRT 11, checked against the
    real bindings' names; test_deploy covers both majors), its profile's maximum at max_batch_size."""
    version = "11.4.0"
    calls: list = []
    missing: list = []
    monkeypatch.setitem(sys.modules, "tensorrt",
                        RealNamesOnly(fake_tensorrt(version, calls), "tensorrt", real_tensorrt_names(version), missing))
    export_triton(tiny_run_128, tmp_path, engine="tensorrt", max_batch=16, name="m", fp16=True)
    assert (tmp_path / "m" / "1" / "model.plan").read_bytes() == b"serialized-engine"
    _check_network(_parse(tmp_path / "m" / "config.pbtxt"), "tensorrt_plan", 128, 16,
                   model_config_pb2.ModelInstanceGroup.KIND_GPU)
    assert ("profile", "images", (1, 3, 128, 128), (8, 3, 128, 128), (16, 3, 128, 128)) in calls
    params = _parse(tmp_path / "m_pipeline" / "config.pbtxt").parameters
    assert params["network_file"].string_value == "m/1/model.plan"
    assert fastad.export.read_sidecar(tmp_path / "m" / "1" / "model.plan")["precision"] == "fp16"
    assert missing == []


def test_cli_export_triton_bad_input(tiny_run_128, tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", "--run", tiny_run_128, "--format", "triton", "--out", tmp_path / "r",
                           "--name", "bad name")
    assert_user_error(code, err, "model name")
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(capsys, "export", "--run", tiny_run_128, "--format", "triton", "--out", tmp_path / "file")
    assert_user_error(code, err, "not a directory")
    if "tensorrt" not in sys.modules:
        code, _, err = run_cli(capsys, "export", "--run", tiny_run_128, "--format", "triton", "--out",
                               tmp_path / "r3", "--engine", "tensorrt")
        assert_user_error(code, err, "TensorRT is not installed")
        assert not (tmp_path / "r3").exists()  # nothing half-written


# --------------------------------------------------------------------------------------------
# The pipeline without a server
# --------------------------------------------------------------------------------------------
def test_pipeline_answers_each_request(repo, demo_data):
    paths = _images(demo_data)[:3]
    pipeline = Pipeline(repo / "tiny" / "1" / "model.onnx", max_batch=4, image_threshold=0.0, pixel_threshold=0.0)
    rows = lambda items: np.array([[b] for b in items], dtype=np.object_)  # noqa: E731
    files = [Path(p).read_bytes() for p in paths]
    answers = pipeline.run([rows(files[:2]), rows([b"not an image"]), rows(files[2:])])
    assert isinstance(answers[1], str) and "cannot read image 0 of the request" in answers[1]
    ref = Predictor(repo / "tiny" / "1" / "model.onnx", threshold=0.0, pixel_threshold=0.0).predict(paths)
    got = np.concatenate([answers[0]["anomaly_map"], answers[2]["anomaly_map"]])
    assert np.array_equal(got, ref.anomaly_maps)
    assert answers[0]["score"].shape == (2, 1) and answers[0]["mask"].shape == (2, 1)
    assert all(answers[0]["is_anomalous"].ravel())  # threshold 0


# --------------------------------------------------------------------------------------------
# A real tritonserver
# --------------------------------------------------------------------------------------------
def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def server(repo, thresholds):
    """The server on free ports of 127.0.0.1; afterwards its whole process group is gone."""
    srv = TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0)
    try:
        srv.start(timeout=240)
        pgid = srv.process.pid
        yield srv
    finally:
        srv.stop()
    assert not _group_alive(pgid), "a tritonserver process outlived its test"


def _assert_same(got, ref) -> None:
    map_range = float(ref.anomaly_maps.max() - ref.anomaly_maps.min())
    assert np.abs(got.anomaly_maps - ref.anomaly_maps).max() <= MAP_TOLERANCE * map_range
    assert np.array_equal(got.scores, ref.scores)
    assert np.array_equal(got.is_anomalous, ref.is_anomalous)
    assert len(got.masks) == len(ref.masks) and all(np.array_equal(a, b) for a, b in zip(got.masks, ref.masks))
    assert got.regions == ref.regions
    assert (got.image_threshold, got.pixel_threshold) == (ref.image_threshold, ref.pixel_threshold)


def test_server_http_grpc_and_bad_requests(server, repo, thresholds, demo_data):
    """Listens on loopback only; HTTP and gRPC give the in-process result for paths, JPEG bytes
    of another size and uint8 arrays; bad requests get errors and the server keeps serving."""
    import tritonclient.http as httpclient

    assert server.models == ["tiny_pipeline"] and "onnxruntime" in server.skipped["tiny"]
    paths = _images(demo_data)[:2]
    inputs = [paths[0], _jpeg_of_another_size(paths[1]), np.asarray(Image.open(paths[1]).convert("RGB"))]
    ref = Predictor(repo / "tiny" / "1" / "model.onnx", threshold=thresholds).predict(
        [paths[0], Image.open(io.BytesIO(inputs[1])), inputs[2]])
    assert any(len(r) for r in ref.regions) and ref.is_anomalous.any()
    for url in (server.http_url, server.grpc_url):
        client = fastad.Client(url)
        assert client.model == "tiny_pipeline" and client.image_threshold == thresholds
        _assert_same(client.predict(inputs), ref)
    client = fastad.Client(server.http_url, model="tiny_pipeline")
    with pytest.raises(FastADError, match="cannot read image 0 of the request"):
        client.infer([b"\x89PNG\r\n\x1a\n truncated"])
    raw = httpclient.InferenceServerClient(server.http_url.split("//")[1])
    wrong_dtype = httpclient.InferInput("image", [1, 1], "FP32")
    wrong_dtype.set_data_from_numpy(np.zeros((1, 1), np.float32))
    wrong_shape = httpclient.InferInput("image", [1, 2], "BYTES")
    wrong_shape.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=np.object_))
    from tritonclient.utils import InferenceServerException

    for bad, needle in ((wrong_dtype, "data-type"), (wrong_shape, "shape")):
        with pytest.raises(InferenceServerException, match=needle):
            raw.infer("tiny_pipeline", [bad])
    _assert_same(client.predict(inputs[:1]), Predictor(repo / "tiny" / "1" / "model.onnx", threshold=thresholds)
                 .predict(paths[:1]))  # still serving
    for address in (server.http_url, server.grpc_url, server.metrics_url):
        assert "127.0.0.1" in address


@pytest.mark.slow
def test_server_concurrent_clients_are_batched(server, repo, thresholds, demo_data):
    """Several client threads over HTTP and gRPC at once: every answer equals the in-process
    Predictor's for the same image, and the server's statistics show executions of more than one
    image (the dynamic batcher gathered requests of different clients)."""
    paths = _images(demo_data)
    ref = Predictor(repo / "tiny" / "1" / "model.onnx", threshold=thresholds).predict(paths)
    clients = {url: fastad.Client(url) for url in (server.http_url, server.grpc_url)}
    before = clients[server.http_url].statistics()
    jobs = [(url, i) for url in clients for i in range(len(paths))] * 2
    results: dict = {}
    errors: list = []

    def worker(k: int) -> None:
        try:
            for url, i in jobs[k::8]:
                results.setdefault((url, i), []).append(clients[url].predict(paths[i]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sum(len(v) for v in results.values()) == len(jobs)
    for (url, i), answers in results.items():
        for got in answers:
            one = ref._replace(scores=ref.scores[i:i + 1], is_anomalous=ref.is_anomalous[i:i + 1],
                               anomaly_maps=ref.anomaly_maps[i:i + 1], masks=ref.masks[i:i + 1],
                               regions=ref.regions[i:i + 1])
            _assert_same(got, one)
    after = clients[server.grpc_url].statistics()
    assert after["inference_count"] - before["inference_count"] == len(jobs)
    batched = {size: n - before["batches"].get(size, 0) for size, n in after["batches"].items() if size > 1}
    assert any(n > 0 for n in batched.values()), after
    assert after["execution_count"] - before["execution_count"] < len(jobs)


def test_cli_bench_server(server, repo, tmp_path, capsys):
    """`fastad bench --server`: server and in-process rows per concurrency, JSON/Markdown/PNG."""
    import json

    out = tmp_path / "b"
    code, printed, err = run_cli(capsys, "bench", "--server", server.grpc_url, "--run", repo / "tiny" / "1" / "model.onnx",
                                 "--concurrency", "1,2", "--rounds", "1", "--device", "cpu",
                                 "--json", f"{out}.json", "--md", f"{out}.md", "--png", f"{out}.png")
    assert code == 0, err
    result = json.loads(Path(f"{out}.json").read_text())
    rows = [(r["backend"], r["concurrency"], r["iterations"]) for r in result["records"]]
    assert rows == [("server (grpc)", 1, 1), ("in-process (onnx)", 1, 1), ("server (grpc)", 2, 2),
                    ("in-process (onnx)", 2, 2)]
    assert all(r["throughput_img_s"] > 0 and r["latency_ms"]["p99"] >= r["latency_ms"]["p50"] for r in result["records"])
    assert "| server (grpc) | 2 | 2 |" in printed and Path(f"{out}.md").read_text() == printed
    assert Path(f"{out}.png").read_bytes()[:4] == b"\x89PNG"


def test_serve_and_client_bad_input(repo, tmp_path, capsys):
    from fastad.serving import free_port

    code, _, err = run_cli(capsys, "serve")
    assert_user_error(code, err, "give one of --repo")
    code, _, err = run_cli(capsys, "serve", "--repo", tmp_path / "missing")
    assert_user_error(code, err, "no such model repository")
    code, _, err = run_cli(capsys, "serve", "--repo", repo, "--models", "nope")
    assert_user_error(code, err, "has no model nope")
    code, _, err = run_cli(capsys, "serve", "--repo", repo, "--models", "tiny")
    assert_user_error(code, err, "no onnxruntime backend")
    with pytest.raises(FastADError, match="expected http://HOST:PORT"):
        fastad.Client("ftp://127.0.0.1:1")
    for scheme in ("http", "grpc"):
        with pytest.raises(FastADError, match="at " + scheme):
            fastad.Client(f"{scheme}://127.0.0.1:{free_port()}", model="tiny_pipeline", timeout=5)


@pytest.mark.slow
def test_cli_serve_prints_addresses_and_stops_on_sigterm(repo, demo_data):
    """`fastad serve` as line software starts it: the addresses it prints answer, SIGTERM stops
    it with status 0 and no process of its group is left."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([sys.executable, "-m", "fastad.cli", "serve", "--repo", str(repo), "--http-port", "0",
                             "--grpc-port", "0", "--metrics-port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any("Ctrl-C" in ln for ln in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        printed = "".join(lines)
        assert "Ctrl-C stops it." in printed, printed
        urls = {ln.split()[0]: ln.split()[1] for ln in lines if ln.startswith("  ") and "://" in ln}
        server_pgid = int(next(ln.split()[1] for ln in lines if ln.startswith("  pid ")))
        assert set(urls) == {"HTTP", "gRPC", "metrics"} and all("//127.0.0.1:" in u for u in urls.values())
        assert "not loaded: tiny (this tritonserver has no onnxruntime backend)" in printed
        assert fastad.Client(urls["gRPC"]).predict(_images(demo_data)[0]).scores.shape == (1,)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(0.5)
    assert not _group_alive(proc.pid) and not _group_alive(server_pgid)


def test_decode_image_reads_bytes_as_load_image_reads_files(tmp_path):
    """The pipeline decodes request bytes with the rules `load_image` applies to files (here a
    16-bit TIFF with 12-bit content, a palette PNG and a JPEG); garbage is one error line."""
    import tifffile

    from fastad.preprocess import decode_image, load_image

    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / "deep.tif", rng.integers(0, 4096, (20, 30, 3), dtype=np.uint16))
    Image.fromarray(rng.integers(0, 255, (12, 9), dtype=np.uint8)).convert("P").save(tmp_path / "pal.png")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    for name in ("deep.tif", "pal.png", "a.jpg"):
        from_file = np.asarray(load_image(tmp_path / name))
        assert np.array_equal(np.asarray(decode_image((tmp_path / name).read_bytes())), from_file), name
    with pytest.raises(FastADError, match="cannot read image 3 of the request"):
        decode_image(b"GIF89a-not-really", "image 3 of the request")
    with pytest.raises(FastADError, match="no bytes"):
        decode_image(b"")
