"""A torch Dataset over `Sample`s: image and mask tensors, label, defect name and path."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from torch.utils.data import Dataset

from fastad.data.layouts import Sample
from fastad.errors import FastADError
from fastad.preprocess import image_to_tensor, load_image, load_mask, mask_to_tensor


class AnomalyDataset(Dataset):
    """Items are dicts:

    image  float32 (3, crop, crop) in [0, 1]  (resize to (resize, resize) bilinear, centre crop)
    mask   float32 (1, crop, crop) in {0, 1}  (zeros for normal images and images without mask)
    label  int (0 normal, 1 anomalous)
    defect str ("good" for normal images)
    path   str

    The default DataLoader collate batches them (strings become lists).
    """

    def __init__(self, samples: Sequence[Sample], resize: int = 256, crop: int = 256):
        self.samples = list(samples)
        self.resize = int(resize)
        self.crop = int(crop)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        img = load_image(sample.path)
        if sample.mask_path is not None:
            mask = load_mask(sample.mask_path)
            if mask.shape != (img.height, img.width):
                raise FastADError(
                    f"mask {sample.mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {sample.path} "
                    f"is {img.width}x{img.height}"
                )
        else:
            mask = np.zeros((img.height, img.width), dtype=bool)
        return {
            "image": image_to_tensor(img, self.resize, self.crop),
            "mask": mask_to_tensor(mask, self.resize, self.crop),
            "label": int(sample.label),
            "defect": sample.defect,
            "path": sample.path,
        }
