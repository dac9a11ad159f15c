"""bench/knn_baseline.py: the training-free nearest-neighbour baseline every family must beat."""
import os

import torch
import torch.nn.functional as F

from bench.knn_baseline import VIEWS, feature_view, knn_scores, nearest_distance
from fastad import registry
from fastad.models.fod import FOD, FODConfig


class PoolingBackbone(torch.nn.Module):
    """Average-pooled image channels at strides 4/8/16: features that follow the image."""
    strides, channels = (4, 8, 16), [3, 3, 3]

    def forward(self, x):
        return [F.avg_pool2d(x, s) for s in self.strides]


def test_every_family_has_a_view():
    assert set(registry.FAMILIES) <= set(VIEWS)


def test_nearest_distance_is_brute_force():
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(50, 7, generator=g), torch.randn(300, 7, generator=g)
    assert torch.allclose(nearest_distance(q, bank, chunk=16), torch.cdist(q, bank).amin(1), atol=1e-6)


def test_memorised_images_score_zero_and_a_defect_is_found():
    model = FOD(FODConfig(d_models=(32, 64), n_layers=1, crop=64, resize=64), PoolingBackbone()).eval()
    train = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    defect = train[:1].clone()
    defect[:, :, 8:24, 8:24] = 1.0
    maps, scores = knn_scores(feature_view(model), train, torch.cat([train[:1], defect]))
    assert maps.shape == (2, 64, 64)
    assert scores[0] < 1e-2 * scores[1]  # cdist via a matrix product: ~1e-4 rounding at distance 0
    ys, xs = divmod(int(maps[1].argmax()), 64)
    assert 4 <= ys < 28 and 4 <= xs < 28


def test_training_folder_holds_out_exactly_the_validation_images(demo_data, tmp_path):
    from bench.knn_baseline import held_out, write_training_folder
    from fastad.data.layouts import list_samples

    train = [s.path for s in list_samples(demo_data, "train")]
    write_training_folder(demo_data, None, str(tmp_path / "val"))
    kept = [os.path.realpath(s.path) for s in list_samples(tmp_path / "val", "train", layout="folder")]
    held = held_out(len(train))
    assert kept == [os.path.realpath(p) for p, h in zip(train, held.tolist()) if not h]
    assert 0 < held.sum() < len(train)
