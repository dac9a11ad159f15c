"""Run Triton kernels through the interpreter on machines without a GPU. Must happen before
any kernel module is imported (triton.jit reads TRITON_INTERPRET at decoration time)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A tiny offline demo dataset (8 train, 3 good + 2 per defect test images, 64 px), shared
    by every test module that trains a tiny run."""
    from fastad.data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", n_train=8, n_test_good=3,
                             n_test_defect=2, size=64)


@pytest.fixture(scope="session")
def tiny_run_128(demo_data, tmp_path_factory):
    """A tiny FOD run at 128 px (d 32/64, one layer, one epoch), shared by the deployment and
    serving tests."""
    from fastad.models.fod import FODConfig
    from fastad.training.loop import train

    os.environ["FASTAD_COMPILE"] = "0"
    config = FODConfig(d_models=(32, 64), n_heads=4, n_layers=1, epochs=1, batch_size=4, resize=128, crop=128)
    return train(demo_data, tmp_path_factory.mktemp("runs") / "tiny", model="fod", config=config, progress=False,
                 compile_stats=False)
