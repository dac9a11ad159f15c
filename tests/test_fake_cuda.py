"""Device placement proven without a GPU (issue 14, item 2): every model family built on "cuda"
under torch's FakeTensorMode (fake tensors need no driver, and any CPU/CUDA mix raises
FakeTensorDeviceMismatchError) runs one step of every training stage, its normal-score pass,
inference with each torch impl, and the runtime's torch engine at fp32, fp16 and bf16.

Stubbed at the boundary, where a real run reads data: the numpy a score pass or the engine
returns, and, in training only, the loss floats a step returns to the loop (`.item()`, `float()`)
and the record's `.tolist()`. Inference runs with no scalar read stubbed, so a data-dependent read
inside the model's math (`aten._local_scalar_dense`) fails it. `backward()` is stubbed too: the
autograd engine asks the CUDA driver for a primary context ("hasPrimaryContext expects a valid
device index"), which a machine without a GPU cannot give, so backward passes and optimiser
steps' placement are proven only as far as the forward creates them. Training has no
AMP/autocast path to check.
"""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastad.backbones import FeatureExtractor
from fastad.export.onnx import InferenceGraph
from fastad.models.adtr import ADTR, ADTRConfig, ADTRTask
from fastad.models.fod import FOD, FODConfig, FODTask
from fastad.models.utad import UTAD, UTADConfig, UTADTask
from fastad.runtime import TorchEngine

CUDA = torch.device("cuda")
FOD_TINY = FODConfig(d_models=(16, 32), n_heads=2, n_layers=1, crop=32, resize=32, batch_size=2, loss_queries=4)
ADTR_TINY = ADTRConfig(d_model=32, n_heads=4, n_encoder_layers=1, n_decoder_layers=1, ffn_dim=64, resize=32,
                       crop=32, batch_size=2, topk=2)
UTAD_TINY = UTADConfig(resize=64, crop=64, size=32, ie_filters=(4, 4, 8, 8), ie_dec_filters=(8, 8, 4, 4),
                       info_hidden=8, latent_dim=8, critic_width=8, critic_scales=2, ex_dim=4, ex_res=1, mlp_dim=16,
                       w_self=1.0, w_gan_ex=1.0, batch_size=2, batch_size2=2)


@pytest.fixture
def fake_cuda(monkeypatch):
    """A context to enter after building a model on the CPU (construction reads weights, e.g. the
    backbone's fingerprint): a FakeTensorMode, the numpy boundary and `backward` stubbed."""

    @contextlib.contextmanager
    def enter():
        monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: None)
        monkeypatch.setattr(torch.Tensor, "numpy", lambda self, **k: np.zeros(self.shape, np.float32))
        # Real CPU modules become fake CUDA ones when moved (`.to("cuda")`); a CPU tensor that
        # reaches CUDA math is a fake CPU tensor there and raises the mismatch.
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
        monkeypatch.undo()

    return enter


@contextlib.contextmanager
def _loss_floats_stubbed():
    """What a training step hands the loop (loss floats) and the training record (lists)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "item", lambda self: 0.0)
        mp.setattr(torch.Tensor, "__float__", lambda self: 0.0)
        mp.setattr(torch.Tensor, "tolist", lambda self: [])
        yield


def _train_one_step_each(task, model) -> None:
    for stage in task.stages(model, CUDA):
        if stage.begin:
            stage.begin()
        gen = torch.Generator().manual_seed(0)
        if stage.epoch_begin:
            stage.epoch_begin(gen)
        loss, _ = stage.step(torch.arange(stage.batch_size), gen, 0)
        loss.backward()
        stage.optimizer.step()
        stage.optimizer.zero_grad(set_to_none=True)
        if stage.end:
            stage.end()


def _infer_every_impl(model, images) -> None:
    for impl in ("reference", "lean"):
        model.impl = impl
        amap, score = model(images)
        assert amap.device.type == score.device.type == "cuda"


# `Task.prepare` reads image files; these set the same cached inputs from fake CUDA images.
def _cache_fod(task, model, images):
    task.tokens = [t.cpu() for t in model.tokens(images)]  # `prepare` caches these on the CPU
    model.fit_reference([t.to(CUDA) for t in task.tokens])


def _cache_adtr(task, model, images):
    task.pool = None  # no anomalies: the anomaly-available step reads data (`bool(mask.any())`)
    task.tokens = model.tokens(images).float().cpu()
    model.fit_normalisation(task.tokens)


def _cache_utad(task, model, images):
    task.images = model.to_internal(images).cpu()


# family -> (model class, tiny config, backbone name, its strides, training task, cache)
FAMILIES = {
    "fod": (FOD, FOD_TINY, FOD_TINY.backbone, FOD_TINY.backbone_strides(), FODTask, _cache_fod),
    "adtr": (ADTR, ADTR_TINY, ADTR_TINY.backbone, ADTR_TINY.strides, ADTRTask, _cache_adtr),
    "utad": (UTAD, UTAD_TINY, UTAD_TINY.pm_backbone, UTAD_TINY.pm_strides, UTADTask, _cache_utad),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_on_fake_cuda(fake_cuda, family, monkeypatch):
    from fastad import ops

    # CUDA training picks the Triton kernels; the interpreter that runs them here reads real
    # storage, which a fake tensor has none of, so the training step runs the lean function (the
    # Triton training path's own parity is tests/test_i2corr_grad_triton.py).
    if ops.triton is not None:
        assert ops.training_impl(torch.device(CUDA)) == "triton"
    monkeypatch.setattr(ops, "training_impl", lambda device: "lean")
    model_class, cfg, backbone, strides, task_class, cache = FAMILIES[family]
    model = model_class(cfg, FeatureExtractor(backbone, strides, weights="none"))
    # The runtime's graphs at each precision, cast on the CPU: a fake tensor cannot be cast in
    # place (Module.to swaps tensors, which a fake tensor refuses), only moved from the CPU.
    graphs = [InferenceGraph(model, torch.float32)] + [InferenceGraph(copy.deepcopy(model), dtype)
                                                       for dtype in (torch.float16, torch.bfloat16)]
    with fake_cuda():
        model = graphs[0].to(CUDA).model
        images = torch.rand(4, 3, cfg.crop, cfg.crop, device=CUDA)
        task = task_class({})
        task.model, task.device = model, CUDA
        cache(task, model, images)
        with _loss_floats_stubbed():
            _train_one_step_each(task, model)
            task.finish()
        task.image_scores(list(range(4)))
        _infer_every_impl(model.eval(), images)
        engine = TorchEngine.__new__(TorchEngine)  # the engine's run() without a run directory
        engine.device = CUDA
        for graph in graphs:
            engine.graph = graph if graph is graphs[0] else graph.to(CUDA)
            engine.run(np.random.rand(2, 3, cfg.crop, cfg.crop).astype(np.float32))


def test_fake_cuda_catches_a_device_mix(fake_cuda):
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    with fake_cuda(), pytest.raises(FakeTensorDeviceMismatchError):
        torch.ones(3, device=CUDA) + torch.ones(3)
