"""Tests for fastad.data: image reading, layouts, the Dataset, prepare_images and the demo generator."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, ImageFile

from fastad.data import (
    LAYOUTS,
    AnomalyDataset,
    Sample,
    detect_layout,
    list_folder_samples,
    list_samples,
    make_demo_dataset,
)
from fastad.errors import FastADError
from fastad.preprocess import image_to_tensor, load_image, load_mask, mask_to_tensor, prepare_batch, prepare_images

BOTTLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_ad" / "bottle"


# ----------------------------------------------------------------------------- helpers


def _rgb(seed: int = 0, h: int = 20, w: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _png(path: Path, arr=None, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(_rgb(seed) if arr is None else arr)
    img.save(path)
    return path


def _mask(path: Path, h: int = 20, w: int = 24) -> Path:
    m = np.zeros((h, w), np.uint8)
    m[5:10, 6:12] = 255
    return _png(path, m)


def _one_line_error(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def _mvtec_tree(root: Path) -> Path:
    for i in (0, 1, 2, 10):
        _png(root / "train" / "good" / f"{i:d}.png", seed=i)
    _png(root / "test" / "good" / "000.png")
    for i in range(2):
        _png(root / "test" / "crack" / f"{i:03d}.png", seed=i)
        _mask(root / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    _png(root / "test" / "hole" / "000.png")
    _mask(root / "ground_truth" / "hole" / "000_mask.png")
    (root / "train" / "good" / "notes.txt").write_text("not an image")
    return root


# ----------------------------------------------------------------------------- layouts


def test_mvtec_layout(tmp_path):
    root = _mvtec_tree(tmp_path / "ds")
    assert detect_layout(root) == "mvtec"
    train = list_samples(root, "train")
    assert [Path(s.path).name for s in train] == ["0.png", "1.png", "2.png", "10.png"]  # natural order
    assert all(s.label == 0 and s.defect == "good" and s.mask_path is None for s in train)
    test = list_samples(root, "test", layout="mvtec")
    assert [(s.defect, s.label) for s in test] == [("crack", 1), ("crack", 1), ("good", 0), ("hole", 1)]
    for s in test:
        assert (s.mask_path is not None) == (s.label == 1)
        if s.mask_path:
            assert Path(s.mask_path).name == Path(s.path).stem + "_mask.png"
    assert isinstance(test[0], Sample)
    with pytest.raises(Exception):
        test[0].label = 0  # frozen


def test_mvtec_image_without_mask(tmp_path):
    root = _mvtec_tree(tmp_path / "ds")
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(FastADError) as e:
        list_samples(root, "test")
    _one_line_error(e, "image without mask", "001.png")
    relaxed = list_samples(root, "test", require_masks=False)
    assert [s.mask_path is None for s in relaxed if s.defect == "crack"] == [False, True]
    assert len(list_samples(root, "train")) == 4  # train is unaffected


def test_mvtec_mask_without_image(tmp_path):
    root = _mvtec_tree(tmp_path / "ds")
    _mask(root / "ground_truth" / "crack" / "007_mask.png")
    with pytest.raises(FastADError) as e:
        list_samples(root, "test")
    _one_line_error(e, "mask without image", "007_mask.png")

    root2 = _mvtec_tree(tmp_path / "ds2")
    _mask(root2 / "ground_truth" / "scratch" / "000_mask.png")  # defect folder with no test images
    with pytest.raises(FastADError) as e:
        list_samples(root2, "test")
    _one_line_error(e, "mask without image", "scratch")


def test_mvtec3d_layout(tmp_path):
    root = tmp_path / "m3d"
    for i in range(3):
        _png(root / "train" / "good" / "rgb" / f"{i:03d}.png", seed=i)
        (root / "train" / "good" / "xyz").mkdir(parents=True, exist_ok=True)
    _png(root / "test" / "good" / "rgb" / "000.png")
    _mask(root / "test" / "good" / "gt" / "000.png")  # MVTec 3D ships (empty) masks for good images
    for i in range(2):
        _png(root / "test" / "hole" / "rgb" / f"{i:03d}.png", seed=i)
        _mask(root / "test" / "hole" / "gt" / f"{i:03d}.png")
    assert detect_layout(root) == "mvtec3d"
    assert len(list_samples(root, "train")) == 3
    test = list_samples(root, "test")
    assert [(s.defect, s.label) for s in test] == [("good", 0), ("hole", 1), ("hole", 1)]
    assert test[0].mask_path is None
    assert test[1].mask_path.endswith("hole/gt/000.png")

    (root / "test" / "hole" / "gt" / "001.png").unlink()
    with pytest.raises(FastADError) as e:
        list_samples(root, "test")
    _one_line_error(e, "image without mask")
    _mask(root / "test" / "hole" / "gt" / "001.png")
    _mask(root / "test" / "hole" / "gt" / "009.png")
    with pytest.raises(FastADError) as e:
        list_samples(root, "test")
    _one_line_error(e, "mask without image", "009.png")


def test_btad_layout(tmp_path):
    root = tmp_path / "btad"
    for i in range(3):
        _png(root / "train" / "ok" / f"{i:04d}.bmp", seed=i)
    _png(root / "test" / "ok" / "0000.bmp")
    _png(root / "test" / "ko" / "0000.bmp")
    _png(root / "test" / "ko" / "0001.bmp")
    _mask(root / "ground_truth" / "ko" / "0000.png")
    _mask(root / "ground_truth" / "ko" / "0001.bmp")  # BTAD mask suffixes vary
    assert detect_layout(root) == "btad"
    assert len(list_samples(root, "train")) == 3
    test = list_samples(root, "test")
    assert [(s.defect, s.label) for s in test] == [("good", 0), ("ko", 1), ("ko", 1)]
    assert [Path(s.mask_path).name for s in test[1:]] == ["0000.png", "0001.bmp"]


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_visa_layout_csv_in_root(tmp_path):
    root = tmp_path / "visa_one"
    rows = []
    for i in range(3):
        _png(root / "Data" / "Images" / "Normal" / f"{i:04d}.JPG", seed=i)
        rows.append(dict(split="train", label="normal", image=f"Data/Images/Normal/{i:04d}.JPG", mask=""))
    _png(root / "Data" / "Images" / "Normal" / "0100.JPG")
    rows.append(dict(split="test", label="normal", image="Data/Images/Normal/0100.JPG", mask=""))
    for i in range(2):
        _png(root / "Data" / "Images" / "Anomaly" / f"{i:03d}.JPG", seed=i)
        _mask(root / "Data" / "Masks" / "Anomaly" / f"{i:03d}.png")
        rows.append(
            dict(split="test", label="anomaly", image=f"Data/Images/Anomaly/{i:03d}.JPG",
                 mask=f"Data/Masks/Anomaly/{i:03d}.png")
        )
    _write_csv(root / "split_csv" / "1cls.csv", rows)
    assert detect_layout(root) == "visa"
    assert len(list_samples(root, "train")) == 3
    test = list_samples(root, "test")
    assert sorted((s.defect, s.label) for s in test) == [("anomaly", 1), ("anomaly", 1), ("good", 0)]
    assert all(Path(s.path).is_file() for s in test)
    assert all((s.mask_path is not None) == (s.label == 1) for s in test)

    _mask(root / "Data" / "Masks" / "Anomaly" / "005.png")  # not listed in the CSV
    with pytest.raises(FastADError) as e:
        list_samples(root, "test")
    _one_line_error(e, "mask without image", "005.png")
    (root / "Data" / "Masks" / "Anomaly" / "005.png").unlink()

    rows[-1]["mask"] = ""
    _write_csv(root / "split_csv" / "1cls.csv", rows)
    with pytest.raises(FastADError) as e:
        list_samples(root, "test")
    _one_line_error(e, "image without mask", "001.JPG")


def test_visa_layout_class_folder_of_visa_root(tmp_path):
    visa = tmp_path / "VisA"
    rows = []
    for obj in ("candle", "pcb1"):
        for i in range(2):
            _png(visa / obj / "Data" / "Images" / "Normal" / f"{i:04d}.JPG", seed=i)
            image = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            rows.append(dict(object=obj, split="train", label="normal", image=image, mask=""))
        _png(visa / obj / "Data" / "Images" / "Anomaly" / "000.JPG")
        _mask(visa / obj / "Data" / "Masks" / "Anomaly" / "000.png")
        rows.append(
            dict(object=obj, split="test", label="anomaly", image=f"{obj}/Data/Images/Anomaly/000.JPG",
                 mask=f"{obj}/Data/Masks/Anomaly/000.png")
        )
    _write_csv(visa / "split_csv" / "1cls.csv", rows)
    _write_csv(visa / "split_csv" / "2cls_fewshot.csv", rows)  # 1cls.csv is preferred
    assert detect_layout(visa / "candle") == "visa"
    train = list_samples(visa / "candle", "train")
    assert len(train) == 2 and all("candle" in s.path for s in train)
    test = list_samples(visa / "pcb1", "test")
    assert len(test) == 1 and test[0].label == 1 and "pcb1" in test[0].mask_path
    with pytest.raises(FastADError) as e:  # the VisA root itself holds several objects
        list_samples(visa, "train", layout="visa")
    _one_line_error(e, "several objects", "candle")


def test_folder_layout(tmp_path):
    root = tmp_path / "plain"
    for i in range(10):
        _png(root / "normal" / f"n{i}.png", seed=i)
    for i in range(3):
        _png(root / "abnormal" / f"a{i}.png", seed=i)
    _mask(root / "mask" / "a0.png")
    _mask(root / "mask" / "a1_mask.png")
    _mask(root / "mask" / "a2.png")
    assert detect_layout(root) == "folder"
    train, test = list_samples(root, "train"), list_samples(root, "test")
    assert len(train) == 8
    assert [s.label for s in test] == [0, 0, 1, 1, 1]
    assert not {s.path for s in train} & {s.path for s in test}  # the 20% hold-out is disjoint
    assert list_samples(root, "train") == train  # deterministic
    assert [Path(s.mask_path).name for s in test if s.label] == ["a0.png", "a1_mask.png", "a2.png"]

    _png(root / "normal_test" / "t0.png")
    assert len(list_samples(root, "train")) == 10
    assert [s.label for s in list_samples(root, "test")] == [0, 1, 1, 1]

    (root / "mask" / "a2.png").unlink()
    with pytest.raises(FastADError) as e:
        list_samples(root, "test")
    _one_line_error(e, "image without mask", "a2.png")
    _mask(root / "mask" / "a2.png")
    _mask(root / "mask" / "zz.png")
    with pytest.raises(FastADError) as e:
        list_samples(root, "test")
    _one_line_error(e, "mask without image", "zz.png")


def test_list_folder_samples_api(tmp_path):
    for i in range(5):
        _png(tmp_path / "ok" / f"{i}.png", seed=i)
    _png(tmp_path / "bad" / "x.png")
    train = list_folder_samples(tmp_path / "ok", split="train")
    test = list_folder_samples(tmp_path / "ok", tmp_path / "bad", split="test")  # no mask dir: masks optional
    assert len(train) == 4 and len(test) == 2
    assert test[-1] == Sample(str(tmp_path / "bad" / "x.png"), 1, "abnormal", None)


def test_layout_errors(tmp_path):
    with pytest.raises(FastADError) as e:
        detect_layout(tmp_path / "missing")
    _one_line_error(e, "does not exist", "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FastADError) as e:
        list_samples(tmp_path / "file.txt", "train")
    _one_line_error(e, "not a directory")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FastADError) as e:
        list_samples(tmp_path / "empty", "train")
    _one_line_error(e, "cannot tell the dataset layout", "mvtec", "folder")
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(FastADError) as e:
        list_samples(tmp_path / "empty", "train")
    _one_line_error(e, "no train images", "good")
    root = _mvtec_tree(tmp_path / "ds")
    with pytest.raises(FastADError) as e:
        list_samples(root, "train", layout="kitti")
    _one_line_error(e, "unknown dataset layout", "kitti", ", ".join(LAYOUTS))
    with pytest.raises(FastADError) as e:
        list_samples(root, "val")
    _one_line_error(e, "unknown split")
    with pytest.raises(FastADError) as e:
        list_samples(root, "train", layout="btad")  # wrong explicit layout
    _one_line_error(e, "no train images")


# ----------------------------------------------------------------------------- image reading


def test_load_image_conversions(tmp_path):
    rgb = _rgb()
    img = load_image(_png(tmp_path / "rgb.png", rgb))
    assert img.mode == "RGB" and img.size == (24, 20)
    np.testing.assert_array_equal(np.asarray(img), rgb)

    gray = rgb[..., 0]
    out = np.asarray(load_image(_png(tmp_path / "gray.png", gray)))
    assert out.shape == (20, 24, 3) and (out == gray[..., None]).all()
    out = np.asarray(load_image(_png(tmp_path / "bw.png", Image.fromarray(gray > 128).convert("1"))))
    assert set(np.unique(out)) <= {0, 255}

    rgba = np.concatenate([rgb, np.full((20, 24, 1), 7, np.uint8)], axis=-1)  # alpha is dropped, not composited
    np.testing.assert_array_equal(np.asarray(load_image(_png(tmp_path / "rgba.png", rgba))), rgb)
    la = Image.fromarray(np.stack([gray, np.zeros_like(gray)], -1), mode="LA")
    assert (np.asarray(load_image(_png(tmp_path / "la.png", la))) == gray[..., None]).all()

    pal = Image.fromarray(rgb).quantize(16)
    expected = np.asarray(pal.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load_image(_png(tmp_path / "pal.png", pal))), expected)
    pal.info["transparency"] = 0
    np.testing.assert_array_equal(np.asarray(load_image(_png(tmp_path / "palt.png", pal))), expected)

    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "cmyk.jpg")
    assert load_image(tmp_path / "cmyk.jpg").mode == "RGB"


def test_load_image_high_bit_depth(tmp_path):
    full = np.linspace(0, 65535, 20 * 24).reshape(20, 24).astype(np.uint16)
    out = np.asarray(load_image(_png(tmp_path / "g16.png", Image.fromarray(full))))
    assert out.max() == 255 and out.min() == 0  # rescaled, not clipped
    np.testing.assert_allclose(out[..., 0], full / 257.0, atol=1)

    twelve = (full >> 4).astype(np.uint16)  # 12-bit camera data in a 16-bit file keeps its brightness
    out = np.asarray(load_image(_png(tmp_path / "g12.png", Image.fromarray(twelve))))
    assert out.max() == 255
    np.testing.assert_allclose(out[..., 0], twelve / 4095.0 * 255.0, atol=1)

    rgb16 = np.stack([full, full[::-1], full // 2], axis=-1)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16)  # PIL would keep only the high byte; tifffile is used
    out = np.asarray(load_image(tmp_path / "rgb16.tif"))
    np.testing.assert_allclose(out[..., 2], (full // 2) / 257.0, atol=1)

    flt = np.random.default_rng(0).random((20, 24, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f3.tif", flt)  # PIL cannot read float RGB TIFF
    np.testing.assert_allclose(np.asarray(load_image(tmp_path / "f3.tif")), flt * 255, atol=1)

    tifffile.imwrite(tmp_path / "g16.tif", full)
    assert np.asarray(load_image(tmp_path / "g16.tif")).max() == 255

    f_mode = Image.fromarray(np.linspace(0, 1, 20 * 24, dtype=np.float32).reshape(20, 24), mode="F")
    f_mode.save(tmp_path / "f.tif")
    assert np.asarray(load_image(tmp_path / "f.tif")).max() == 255

    i32 = Image.fromarray(full.astype(np.int32), mode="I")
    i32.save(tmp_path / "i32.tif")
    assert np.asarray(load_image(tmp_path / "i32.tif")).max() == 255


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the corrupt TIFF before failing
def test_load_image_bad_files(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    good = _png(tmp_path / "good.png", _rgb(h=64, w=64))
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    for name, reason in [
        ("trunc.png", ""),
        ("garbage.png", ""),
        ("empty.png", "empty"),
        ("missing.png", "does not exist"),
        ("folder.png", "directory"),
    ]:
        with pytest.raises(FastADError) as e:
            load_image(tmp_path / name)
        _one_line_error(e, "cannot read image", str(tmp_path / name), reason)
    (tmp_path / "garbage.tif").write_bytes(b"II*\x00" + b"\x01" * 50)  # PIL and tifffile both fail
    with pytest.raises(FastADError) as e:
        load_image(tmp_path / "garbage.tif")
    _one_line_error(e, "cannot read image", "garbage.tif")
    with pytest.raises(FastADError) as e:
        load_mask(tmp_path / "trunc.png")
    _one_line_error(e, "cannot read mask", "trunc.png")


def test_load_mask_modes(tmp_path):
    m = np.zeros((20, 24), bool)
    m[3:7, 4:9] = True
    np.testing.assert_array_equal(load_mask(_png(tmp_path / "l.png", m.astype(np.uint8) * 255)), m)
    np.testing.assert_array_equal(load_mask(_png(tmp_path / "one.png", m.astype(np.uint8))), m)  # 0/1 masks
    np.testing.assert_array_equal(load_mask(_png(tmp_path / "b.png", Image.fromarray(m))), m)
    np.testing.assert_array_equal(load_mask(_png(tmp_path / "w.png", Image.fromarray(m.astype(np.uint16) * 65535))), m)
    rgb = np.zeros((20, 24, 3), np.uint8)
    rgb[m, 1] = 200
    np.testing.assert_array_equal(load_mask(_png(tmp_path / "rgb.png", rgb)), m)
    pal = Image.fromarray(m.astype(np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0])
    np.testing.assert_array_equal(load_mask(_png(tmp_path / "p.png", pal)), m)
    assert load_mask(tmp_path / "l.png").dtype == np.bool_


# ----------------------------------------------------------------------------- tensors


def test_image_and_mask_to_tensor(tmp_path):
    img = Image.fromarray(_rgb(h=40, w=60))
    x = image_to_tensor(img, resize=32, crop=28)
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    m = np.zeros((40, 60), bool)
    m[10:30, 20:40] = True
    t = mask_to_tensor(m, resize=32, crop=28)
    assert t.shape == (1, 28, 28) and t.dtype == torch.float32
    assert set(torch.unique(t).tolist()) == {0.0, 1.0}
    with pytest.raises(FastADError):
        image_to_tensor(img, resize=16, crop=32)


def test_preprocessing_matches_torchvision():
    transforms = pytest.importorskip("torchvision.transforms")
    img = Image.fromarray(_rgb(h=50, w=70))
    ref = transforms.Compose([transforms.Resize((33, 33)), transforms.CenterCrop(28), transforms.ToTensor()])(img)
    torch.testing.assert_close(image_to_tensor(img, resize=33, crop=28), ref, atol=0, rtol=0)
    mask = Image.fromarray((_rgb(h=50, w=70)[..., 0] > 128).astype(np.uint8) * 255)
    ref_m = transforms.Compose(
        [transforms.Resize((33, 33), interpolation=transforms.InterpolationMode.NEAREST), transforms.CenterCrop(28),
         transforms.ToTensor()]
    )(mask)
    torch.testing.assert_close(mask_to_tensor(np.asarray(mask) > 0, resize=33, crop=28), ref_m, atol=0, rtol=0)


def test_prepare_images_inputs(tmp_path):
    rgb = _rgb(h=40, w=30)
    path = _png(tmp_path / "a.png", rgb)
    ref = image_to_tensor(Image.fromarray(rgb), 32, 32)
    for item in (path, str(path), Image.fromarray(rgb), rgb):
        out = prepare_images(item, resize=32, crop=32)
        assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
        torch.testing.assert_close(out[0], ref)
    assert prepare_images([path, rgb[..., 0], np.dstack([rgb, rgb[..., :1]])], 32, 32).shape == (3, 3, 32, 32)
    assert prepare_images(np.stack([rgb, rgb]), 32, 32).shape == (2, 3, 32, 32)  # uint8 B x H x W x 3
    torch.testing.assert_close(prepare_images(np.dstack([rgb, rgb[..., :1]]), 32, 32)[0], ref)  # alpha dropped
    batch = torch.rand(2, 3, 32, 32)
    assert prepare_images(batch, 32, 32) is not None
    torch.testing.assert_close(prepare_images(batch, 32, 32), batch)
    torch.testing.assert_close(prepare_images(batch.numpy(), 32, 32), batch)
    torch.testing.assert_close(prepare_images(batch.double(), 32, 32), batch)
    assert prepare_images(batch[0], 32, 32).shape == (1, 3, 32, 32)
    assert prepare_images([batch[0], path], 32, 32).shape == (2, 3, 32, 32)
    assert prepare_images((path,), 32, 32).shape == (1, 3, 32, 32)


def test_prepare_batch_any_size_and_sizes(tmp_path):
    """Floats of another size are resized and centre-cropped like images (one input contract);
    every input reports its own (H, W), a float batch one per image."""
    rgb = _rgb(h=40, w=30)
    path = _png(tmp_path / "a.png", rgb)
    small = torch.rand(2, 3, 30, 20)
    batch, sizes = prepare_batch([path, rgb[..., 0], small, torch.rand(3, 32, 32)], resize=36, crop=32)
    assert batch.shape == (5, 3, 32, 32) and sizes == [(40, 30), (40, 30), (30, 20), (30, 20), (32, 32)]
    resized = torch.nn.functional.interpolate(small, size=(36, 36), mode="bilinear", align_corners=False,
                                              antialias=True)[:, :, 2:34, 2:34].clamp(0, 1)
    torch.testing.assert_close(batch[2:4], resized, atol=0, rtol=0)


@pytest.mark.parametrize(
    "bad, needle",
    [
        ([], "empty"),
        (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
        (torch.rand(1, 3, 32, 32) * 255, "[0, 1]"),
        (torch.rand(1, 3, 32, 32) - 0.5, "[0, 1]"),
        (np.random.rand(1, 4, 32, 32).astype(np.float32), "(B, 3, H, W)"),
        (np.random.rand(32, 32, 3).astype(np.float32), "(B, 3, H, W)"),
        (torch.rand(1, 3, 0, 32), "(B, 3, H, W)"),
        (torch.zeros(0, 3, 32, 32), "empty"),
        (np.zeros((8, 8, 3), np.int64), "unsupported dtype"),
        (np.zeros((8, 8, 5), np.uint8), "uint8 array of shape"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "uint8"),
        (42, "unsupported type"),
        ([Image.new("RGB", (8, 8)), {"a": 1}], "image 1"),
        ("/no/such/file.png", "does not exist"),
    ],
)
def test_prepare_images_errors(bad, needle):
    with pytest.raises(FastADError) as e:
        prepare_images(bad, resize=32, crop=32)
    _one_line_error(e, needle)


# ----------------------------------------------------------------------------- dataset


def test_anomaly_dataset(tmp_path):
    root = _mvtec_tree(tmp_path / "ds")
    ds = AnomalyDataset(list_samples(root, "test"), resize=32, crop=28)
    assert len(ds) == 4
    item = ds[0]
    assert item["image"].shape == (3, 28, 28) and item["mask"].shape == (1, 28, 28)
    assert item["label"] == 1 and item["defect"] == "crack" and item["mask"].sum() > 0
    good = ds[2]
    assert good["label"] == 0 and good["mask"].sum() == 0
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))  # default collate
    assert batch["image"].shape == (4, 3, 28, 28) and batch["label"].tolist() == [1, 1, 0, 1]
    assert batch["defect"] == ["crack", "crack", "good", "hole"]
    assert batch["mask"].shape == (4, 1, 28, 28) and batch["label"].dtype == torch.int64
    assert len(batch["path"]) == 4

    _mask(root / "ground_truth" / "crack" / "000_mask.png", h=10, w=10)
    with pytest.raises(FastADError) as e:
        ds[0]
    _one_line_error(e, "000_mask.png", "10x10", "24x20")


# ----------------------------------------------------------------------------- demo dataset


def test_demo_dataset(tmp_path):
    kwargs = dict(n_train=4, n_test_good=2, n_test_defect=2, size=64, seed=3)
    a = make_demo_dataset(tmp_path / "a", **kwargs)
    b = make_demo_dataset(tmp_path / "b", **kwargs)
    c = make_demo_dataset(tmp_path / "c", **{**kwargs, "seed": 4, "texture": "gravel"})
    assert detect_layout(a) == "mvtec"
    train, test = list_samples(a, "train"), list_samples(a, "test")
    assert len(train) == 4 and len(test) == 2 + 4 * 2
    assert sorted({s.defect for s in test}) == ["color", "cutpaste", "good", "scratch", "spot"]
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)  # deterministic
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files_a)
    for s in test:
        img = np.asarray(load_image(s.path))
        assert img.shape == (64, 64, 3)
        if s.label:
            mask = load_mask(s.mask_path)
            assert 0 < mask.mean() < 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp folders left behind

    with pytest.raises(FastADError) as e:
        make_demo_dataset(a, **kwargs)
    _one_line_error(e, "already exists")
    make_demo_dataset(a, **{**kwargs, "n_train": 2}, overwrite=True)
    assert len(list_samples(a, "train")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]
    with pytest.raises(FastADError):
        make_demo_dataset(tmp_path / "d", texture="marble")


def test_demo_defects_change_exactly_the_mask(tmp_path):
    from fastad.data import demo
    from fastad.data.synthetic import DEMO_DEFECTS

    tex = demo._texture("brick")
    for name, fn in DEMO_DEFECTS.items():
        rng = np.random.default_rng(1)
        clean = demo._normal_image(tex, 96, rng)
        out, mask = fn(clean.copy(), rng)
        out = np.clip(np.round(out), 0, 255).astype(np.uint8)
        changed = (out != clean).any(axis=-1)
        assert mask.any(), name
        assert not (changed & ~mask).any(), name  # nothing changes outside the mask
        assert changed[mask].mean() > 0.5, name  # and the mask marks changed pixels


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not BOTTLE.is_dir(), reason="MVTec AD bottle not available")
def test_real_mvtec_bottle():
    assert detect_layout(BOTTLE) == "mvtec"
    train, test = list_samples(BOTTLE, "train"), list_samples(BOTTLE, "test")
    assert len(train) == 209 and len(test) == 83
    anomalous = [s for s in test if s.label == 1]
    assert anomalous and all(s.mask_path and Path(s.mask_path).is_file() for s in anomalous)
    item = AnomalyDataset(anomalous[:1])[0]
    assert item["image"].shape == (3, 256, 256) and item["mask"].sum() > 0
