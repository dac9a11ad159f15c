"""Deployment: ONNX export + TensorRT check, engine export (without TensorRT, and against a fake
TensorRT module for the build logic), the runtime Predictor on every available backend, and
`fastad bench`. Parity is always against the torch Predictor on the same inputs.

Tolerances: fp32 ONNX vs torch — max |Δ map| ≤ 1e-4 of the map's range (the issue allows 1e-3);
fp16 ONNX — ≤ 3e-2 of the range and the same image-score ranking.
"""
from __future__ import annotations

import json
import sys
import threading
import types
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image


from .test_cli import assert_user_error, run_cli
from fastad.errors import FastADError
from fastad.export import check_onnx, export_engine, export_onnx, read_sidecar
from fastad.postprocess import default_thresholds, map_to_original
from fastad.runtime import Predictor
from fastad.training.loop import train

train_adtr = partial(train, model="adtr")



@pytest.fixture(scope="module")
def run_dir(tiny_run_128) -> Path:
    return tiny_run_128  # trained once per session (conftest)


@pytest.fixture(scope="module")
def onnx_path(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(run_dir, out)
    return out


def _images(demo_data: Path) -> list[str]:
    return sorted(str(p) for p in (demo_data / "test").rglob("*.png"))


# --------------------------------------------------------------------------------------------
# ONNX export and the TensorRT check
# --------------------------------------------------------------------------------------------
def test_onnx_graph_interface(onnx_path):
    model = onnx.load(str(onnx_path))
    (inp,) = model.graph.input
    assert inp.name == "images" and inp.type.tensor_type.elem_type == TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 128, 128]
    assert [o.name for o in model.graph.output] == ["anomaly_map", "score"]
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in model.graph.output)
    assert model.opset_import[0].version >= 17
    report = check_onnx(model, batch=32)
    assert report.ok, report.errors
    assert "If" not in report.ops and "Loop" not in report.ops


def test_sidecar(onnx_path, run_dir):
    side = read_sidecar(onnx_path)
    conf = json.loads((run_dir / "config.json").read_text())
    assert side["input"]["crop"] == 128 and side["input"]["range"] == [0.0, 1.0]
    assert side["normalization"]["inside_graph"] is True
    assert side["thresholds"] == default_thresholds(conf)
    assert side["model_config"] == conf["config"]
    assert {"torch", "onnx", "fastad"} <= set(side["versions"])
    assert side["trt_check"]["ok"] is True
    import hashlib

    assert side["sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()


@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_matches_torch_dynamic_batch(run_dir, onnx_path, batch):
    x = np.random.default_rng(batch).random((batch, 3, 128, 128), dtype=np.float32)
    ref_maps, ref_scores = Predictor(run_dir, backend="torch", device="cpu").scores_and_maps(x)
    maps, scores = Predictor(onnx_path, device="cpu").scores_and_maps(x)
    assert maps.shape == (batch, 128, 128) and scores.shape == (batch,)
    span = ref_maps.max() - ref_maps.min()
    assert np.abs(maps - ref_maps).max() <= 1e-4 * span
    assert np.abs(scores - ref_scores).max() <= 1e-4 * span
    assert (np.argsort(scores) == np.argsort(ref_scores)).all()


def test_fp16_onnx(run_dir, tmp_path):
    out = tmp_path / "tiny16.onnx"
    side = export_onnx(run_dir, out, fp16=True)
    assert side["precision"] == "fp16"
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # float32 interface
    assert any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
    x = np.random.default_rng(0).random((4, 3, 128, 128), dtype=np.float32)
    ref_maps, ref_scores = Predictor(run_dir, backend="torch", device="cpu").scores_and_maps(x)
    maps, scores = Predictor(out, device="cpu").scores_and_maps(x)
    span = ref_maps.max() - ref_maps.min()
    assert np.abs(maps - ref_maps).max() <= 3e-2 * span


def _tiny_model(op: str, domain: str = "", shape=("batch", 4), int64_const=None) -> onnx.ModelProto:
    nodes = [helper.make_node(op, ["x"], ["y"], domain=domain)]
    inits = []
    if int64_const is not None:
        inits.append(helper.make_tensor("big", TensorProto.INT64, [1], [int64_const]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_check_flags_problems():
    assert check_onnx(_tiny_model("Relu")).ok
    rep = check_onnx(_tiny_model("Hardmax"))
    assert not rep.ok and "Hardmax" in rep.errors[0]
    assert not check_onnx(_tiny_model("MyPlugin", domain="custom")).ok
    assert not check_onnx(_tiny_model("Relu", int64_const=2 ** 40)).ok
    large = _tiny_model("Relu", shape=("batch", 1 << 15, 1 << 15))  # 2^30 elements per batch item
    fits = check_onnx(large, batch=1)
    assert fits.ok and fits.largest_tensor[0] == 2 ** 30
    too_big = check_onnx(large, batch=2)
    assert not too_big.ok and "2^31" in too_big.errors[0]
    old = _tiny_model("Relu")
    old.opset_import[0].version = 13
    assert not check_onnx(old).ok


def test_cli_export_and_check(run_dir, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code, stdout, err = run_cli(capsys, "export", "--run", run_dir, "--format", "onnx", "--out", out)
    assert code == 0, err
    assert out.is_file() and (tmp_path / "m.onnx.json").is_file() and "TensorRT check: OK" in stdout
    code, stdout, _ = run_cli(capsys, "check", out)
    assert code == 0 and "TensorRT check: OK" in stdout
    bad = tmp_path / "bad.onnx"
    onnx.save(_tiny_model("Hardmax"), str(bad))
    code, stdout, _ = run_cli(capsys, "check", bad)
    assert code == 1 and "ERROR: operator Hardmax" in stdout


def test_cli_export_bad_input(run_dir, tmp_path, capsys):
    assert_user_error(*run_cli(capsys, "export", "--run", tmp_path / "nope", "--format", "onnx", "--out",
                               tmp_path / "a.onnx")[::2], "does not exist")
    assert_user_error(*run_cli(capsys, "export", "--run", run_dir, "--format", "onnx", "--out",
                               tmp_path / "a.txt")[::2], "must end in .onnx")
    assert_user_error(*run_cli(capsys, "export", "--run", run_dir, "--format", "onnx", "--opset", "12",
                               "--out", tmp_path / "a.onnx")[::2], "opset")
    code, _, err = run_cli(capsys, "check", tmp_path / "missing.onnx")
    assert_user_error(code, err, "no such file")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model")
    assert_user_error(*run_cli(capsys, "check", garbage)[::2], "cannot read onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.onnx"]


@pytest.mark.skipif("tensorrt" in sys.modules or __import__("importlib").util.find_spec("tensorrt"),
                    reason="TensorRT is installed")
def test_engine_export_without_tensorrt(run_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", "--run", run_dir, "--format", "engine", "--out", tmp_path / "m.engine")
    assert_user_error(code, err, "TensorRT is not installed")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Engine build logic against a fake `tensorrt` module (records the calls; no GPU involved),
# checked against the names of the real TensorRT bindings of the simulated version
# --------------------------------------------------------------------------------------------
TRT_API = Path(__file__).resolve().parents[1] / "export" / "trt_api"


def real_tensorrt_names(version: str) -> set[str]:
    """Every name of the real TensorRT Python bindings of `version`'s major release (extracted
    from PyPI's bindings wheels by export/trt_api/refresh.py: 10.3 and 11.4)."""
    (path,) = TRT_API.glob(f"tensorrt-{version.split('.')[0]}.*.json")
    return set(json.loads(path.read_text())["names"])


class RealNamesOnly:
    """Wraps the fake module and everything it hands out (classes, methods, enums, objects): each
    attribute and keyword argument the code under test touches must be a name of the real
    bindings; misses go to `missing` as "Owner.name". Dunders (`__version__`) are Python-side."""

    def __init__(self, target, owner: str, names: set[str], missing: list):
        vars(self).update(_target=target, _owner=owner, _names=names, _missing=missing)

    def _wrap(self, value, owner: str):
        if isinstance(value, (int, float, str, bytes, tuple, type(None))):
            return value
        return RealNamesOnly(value, owner, self._names, self._missing)

    def __getattr__(self, name):
        if not name.startswith("__") and name not in self._names:
            self._missing.append(f"{self._owner}.{name}")
        return self._wrap(getattr(self._target, name), name)

    def __call__(self, *args, **kwargs):
        self._missing.extend(f"{self._owner}({k}=)" for k in kwargs if k not in self._names)
        result = self._target(*args, **kwargs)
        return self._wrap(result, type(result).__name__)


def fake_tensorrt(version: str, calls: list) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=None: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(FP16="fp16")

    class IOptimizationProfile:
        def set_shape(self, name, lo, opt, hi):
            calls.append(("profile", name, lo, opt, hi))

    class ITimingCache:
        def serialize(self):
            return b"timing-cache"

    class IBuilderConfig:
        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", size))

        def set_flag(self, flag):
            calls.append(("flag", flag))

        def add_optimization_profile(self, profile):
            pass

        def create_timing_cache(self, data):
            calls.append(("cache_in", data))
            return ITimingCache()

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def get_timing_cache(self):
            return ITimingCache()

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("network_flags", flags))
            return object()

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            return b"serialized-engine"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.append(("onnx", onnx.load(path).graph.initializer[0].data_type))
            return True

    class IExecutionContext:
        def set_input_shape(self, name, shape):
            calls.append(("input_shape", name, shape))

        def set_tensor_address(self, name, address):
            calls.append(("address", name))

        def execute_async_v3(self, stream_handle):
            calls.append(("execute", stream_handle))
            return True

    class ICudaEngine:
        def create_execution_context(self):
            return IExecutionContext()

        def get_tensor_profile_shape(self, name, profile_index):
            return (1, 3, 128, 128), (4, 3, 128, 128), (16, 3, 128, 128)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            calls.append(("deserialize", data))
            return ICudaEngine()

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


@pytest.mark.parametrize("version,strong", [("10.3.0", False), ("11.4.0", True)])
def test_engine_build_logic(run_dir, tmp_path, monkeypatch, version, strong):
    calls: list = []
    missing: list = []
    trt = RealNamesOnly(fake_tensorrt(version, calls), "tensorrt", real_tensorrt_names(version), missing)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    out = tmp_path / "m.engine"
    cache = tmp_path / "trt.cache"
    side = export_engine(run_dir, out, fp16=True, min_batch=1, opt_batch=4, max_batch=16, timing_cache=cache)
    assert out.read_bytes() == b"serialized-engine" and cache.read_bytes() == b"timing-cache"
    assert read_sidecar(out)["tensorrt"]["profile"] == {"min": 1, "opt": 4, "max": 16}
    assert side["precision"] == "fp16" and side["tensorrt"]["strongly_typed"] is strong
    assert ("profile", "images", (1, 3, 128, 128), (4, 3, 128, 128), (16, 3, 128, 128)) in calls
    assert ("network_flags", (1 << 5) if strong else 0) in calls
    assert (("flag", "fp16") in calls) is (not strong)  # 10.x: builder flag; 11.x: fp16 ONNX
    parsed_dtypes = [c[1] for c in calls if c[0] == "onnx"]  # first initializer of the parsed ONNX
    assert parsed_dtypes == [TensorProto.FLOAT16 if strong else TensorProto.FLOAT]
    assert ("--stronglyTyped" in side["tensorrt"]["trtexec"]) is strong
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.engine.json", "trt.cache"]
    assert missing == [], f"not in the TensorRT {version} bindings: {missing}"


@pytest.mark.parametrize("version", ["10.3.0", "11.4.0"])
def test_engine_parse_failure_names_the_parser_error(run_dir, tmp_path, monkeypatch, version):
    class ParserError:
        def desc(self):
            return "unsupported operator Foo"

    fake = fake_tensorrt(version, [])
    fake.OnnxParser.num_errors = 1
    fake.OnnxParser.parse_from_file = lambda self, path: False
    fake.OnnxParser.get_error = lambda self, index: ParserError()
    missing: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", RealNamesOnly(fake, "tensorrt", real_tensorrt_names(version), missing))
    with pytest.raises(FastADError, match="unsupported operator Foo"):
        export_engine(run_dir, tmp_path / "m.engine")
    assert missing == [], f"not in the TensorRT {version} bindings: {missing}"


@pytest.mark.parametrize("version", ["10.3.0", "11.4.0"])
def test_engine_runner_calls(run_dir, tmp_path, monkeypatch, version):
    """The runtime's TensorRTEngine against the same checked fake; CUDA streams stubbed, buffers on
    the CPU (only the calls and names are under test here)."""
    import contextlib

    import torch

    from fastad.runtime import TensorRTEngine

    calls: list = []
    missing: list = []
    trt = RealNamesOnly(fake_tensorrt(version, calls), "tensorrt", real_tensorrt_names(version), missing)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    export_engine(run_dir, tmp_path / "m.engine", min_batch=1, opt_batch=4, max_batch=16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: types.SimpleNamespace(cuda_stream=7, synchronize=lambda: None))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    engine = TensorRTEngine(tmp_path / "m.engine")
    assert engine.max_batch == 16 and ("deserialize", b"serialized-engine") in calls
    engine.device = torch.device("cpu")
    amap, score = engine.run(np.zeros((2, 3, 128, 128), np.float32))
    assert amap.shape == (2, 128, 128) and score.shape == (2,)
    assert ("input_shape", "images", (2, 3, 128, 128)) in calls and ("execute", 7) in calls
    assert {c[1] for c in calls if c[0] == "address"} == {"images", "anomaly_map", "score"}
    assert missing == [], f"not in the TensorRT {version} bindings: {missing}"


def test_real_names_check_catches_a_name_tensorrt_lacks(run_dir, tmp_path, monkeypatch):
    """The 10.x path sets BuilderFlag.FP16, which TensorRT 11 removed: run against 11.4's names,
    the check reports it."""
    missing: list = []
    trt = RealNamesOnly(fake_tensorrt("10.3.0", []), "tensorrt", real_tensorrt_names("11.4.0"), missing)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    export_engine(run_dir, tmp_path / "m.engine", fp16=True)
    assert missing == ["BuilderFlag.FP16"]
    assert "FP16" in real_tensorrt_names("10.3.0")


# --------------------------------------------------------------------------------------------
# The runtime
# --------------------------------------------------------------------------------------------
def test_predictor_any_size_masks_and_regions(run_dir, onnx_path, demo_data):
    paths = _images(demo_data)
    big = np.asarray(Image.open(paths[-1]).convert("RGB").resize((150, 90)))  # W 150, H 90
    gray_float = np.random.default_rng(0).random((3, 70, 70), dtype=np.float32)
    for source in (run_dir, onnx_path):
        p = Predictor(source, device="cpu", threshold=0.0)
        res = p.predict(paths[:2] + [big, gray_float])
        assert res.scores.shape == (4,) and res.anomaly_maps.shape == (4, 128, 128)
        assert res.masks[0].shape == (64, 64) and res.masks[2].shape == (90, 150) and res.masks[3].shape == (70, 70)
        assert res.is_anomalous.all()  # threshold 0: every map is positive somewhere
        for mask, regions in zip(res.masks, res.regions):
            assert sum(r.area for r in regions) == int(mask.sum()) > 0
            x0, y0, x1, y1 = regions[0].bbox
            assert 0 <= x0 < x1 <= mask.shape[1] and 0 <= y0 < y1 <= mask.shape[0]
    none = Predictor(run_dir, device="cpu", threshold=1e9).predict(paths[:1])
    assert not none.is_anomalous.any() and none.regions == [[]] and not none.masks[0].any()


def test_calibrate_sets_threshold_from_normal_images(run_dir, demo_data):
    p = Predictor(run_dir, device="cpu")
    good = sorted(str(x) for x in (demo_data / "test" / "good").glob("*.png"))
    info = p.calibrate(good)
    scores = p.predict(good).scores
    assert info["image"] == pytest.approx(scores.max()) and p.pixel_threshold == info["pixel"]
    assert not p.predict(good).is_anomalous.any()
    with pytest.raises(FastADError):
        p.calibrate(good, quantile=0.0)


def test_predictor_thread_safe(onnx_path, demo_data):
    p = Predictor(onnx_path, device="cpu", threshold=0.0)
    paths = _images(demo_data)[:3]
    expected = p.predict(paths)
    results, errors = [None] * 4, []

    def work(i):
        try:
            results[i] = p.predict(paths)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in results:
        np.testing.assert_array_equal(r.scores, expected.scores)
        assert [len(x) for x in r.regions] == [len(x) for x in expected.regions]


def test_predictor_bad_input(run_dir, onnx_path, tmp_path):
    p = Predictor(onnx_path, device="cpu")
    for bad, needle in ((np.zeros((10, 10, 3), np.int32), "unsupported dtype"),
                        (np.zeros((2, 5, 5), np.float32), "shape"),
                        (np.full((3, 9, 9), 7.0, np.float32), "[0, 1]"),
                        ([], "empty")):
        with pytest.raises(FastADError, match=None) as e:
            p.predict(bad)
        assert needle in str(e.value), str(e.value)
    with pytest.raises(FastADError, match="run directory"):
        Predictor(run_dir, backend="onnx")
    with pytest.raises(FastADError, match="unknown backend"):
        Predictor(run_dir, backend="coreml")
    with pytest.raises(FastADError, match="does not exist"):
        Predictor(tmp_path / "x.onnx")
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(onnx_path.read_bytes())
    with pytest.raises(FastADError, match="sidecar"):
        Predictor(lonely)
    with pytest.raises(FastADError, match="threshold"):
        Predictor(run_dir, threshold=float("nan"))


def test_cli_predict_with_onnx(onnx_path, demo_data, tmp_path, capsys):
    out = tmp_path / "pred"
    code, stdout, err = run_cli(capsys, "predict", "--run", onnx_path, demo_data / "test" / "good",
                                "--out", out, "--save-masks", "--threshold", "0")
    assert code == 0, err
    data = json.loads((out / "scores.json").read_text())
    assert data["backend"] == "onnx" and all(img["anomalous"] for img in data["images"])
    assert all(img["regions"] and {"bbox", "area", "peak_score"} <= set(img["regions"][0]) for img in data["images"])
    assert len(list((out / "masks").glob("*.png"))) == len(data["images"])


# --------------------------------------------------------------------------------------------
# fastad bench
# --------------------------------------------------------------------------------------------
def test_cli_bench_outputs(run_dir, onnx_path, tmp_path, capsys):
    j, md, png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    code, stdout, err = run_cli(capsys, "bench", "--run", run_dir, "--backend", "torch,torch-lean,onnx",
                                "--batch", "1,2", "--rounds", "2", "--onnx", onnx_path, "--device", "cpu",
                                "--json", j, "--md", md, "--png", png)
    assert code == 0, err
    result = json.loads(j.read_text())
    assert {"device", "versions", "command", "records"} <= set(result)
    assert [(r["backend"], r["batch"]) for r in result["records"]] == [
        (b, n) for n in (1, 2) for b in ("torch", "torch-lean", "onnx")]
    for r in result["records"]:
        assert set(r["latency_ms"]) >= {"p50", "p90", "p99"} and r["latency_ms"]["p50"] > 0
        assert r["throughput_img_s"] > 0 and r["peak_mem_mb"] >= 0 and r["iterations"] == 2
        assert r["max_abs_diff_map"] <= 1e-4 and r["max_abs_diff_score"] <= 1e-4
    assert md.read_text().count("\n| ") == 1 + 6 and png.read_bytes()[:4] == b"\x89PNG"
    assert_user_error(*run_cli(capsys, "bench", "--run", run_dir, "--backend", "openvx")[::2], "unknown backend")


# --------------------------------------------------------------------------------------------
# The same export and runtime path for ADTR runs
# --------------------------------------------------------------------------------------------
def test_adtr_run_exports_and_runs_everywhere(demo_data, tmp_path):
    from fastad.models.adtr import ADTRConfig

    cfg = ADTRConfig(d_model=32, n_heads=4, n_encoder_layers=1, n_decoder_layers=1, ffn_dim=64, epochs=1,
                     batch_size=4, resize=128, crop=128)
    run = train_adtr(demo_data, tmp_path / "adtr", config=cfg, progress=False)
    out = tmp_path / "adtr.onnx"
    side = export_onnx(run, out)
    assert side["model"] == "adtr" and side["trt_check"]["ok"]
    x = np.random.default_rng(3).random((3, 3, 128, 128), dtype=np.float32)
    ref_maps, ref_scores = Predictor(run, backend="torch", device="cpu").scores_and_maps(x)
    for p in (Predictor(out, device="cpu"), Predictor(run, backend="torch-lean", device="cpu")):
        maps, scores = p.scores_and_maps(x)
        span = ref_maps.max() - ref_maps.min()
        assert np.abs(maps - ref_maps).max() <= 1e-4 * span, p.backend
        assert np.abs(scores - ref_scores).max() <= 1e-4 * span, p.backend


def test_cli_eval_onnx_equals_run(run_dir, onnx_path, demo_data, tmp_path, capsys):
    reports = []
    for i, model in enumerate((run_dir, onnx_path)):
        rep = tmp_path / f"r{i}.json"
        code, _, err = run_cli(capsys, "eval", "--run", model, "--data", demo_data, "--report", rep, "--device", "cpu")
        assert code == 0, err
        reports.append(json.loads(rep.read_text()))
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert reports[1][key] == pytest.approx(reports[0][key], abs=1e-4), key  # map diffs ~1e-6 reorder near-ties


def test_onnx_predictor_shared_by_8_threads(onnx_path, demo_data):
    """The onnx backend under 8 threads equals serial calls (torch backends: test_reliability)."""
    from .test_reliability import check_shared_predictor, mixed_images

    check_shared_predictor(Predictor(onnx_path, batch_size=2), mixed_images(demo_data))
