"""Data: reading images and masks, dataset layouts, the torch Dataset, and the offline demo dataset."""
from fastad.data.dataset import AnomalyDataset, collate
from fastad.data.demo import make_demo_dataset
from fastad.data.images import image_to_tensor, load_image, load_mask, mask_to_tensor, prepare_images
from fastad.data.layouts import LAYOUTS, Sample, detect_layout, list_folder_samples, list_samples

__all__ = [
    "AnomalyDataset",
    "collate",
    "make_demo_dataset",
    "image_to_tensor",
    "load_image",
    "load_mask",
    "mask_to_tensor",
    "prepare_images",
    "LAYOUTS",
    "Sample",
    "detect_layout",
    "list_folder_samples",
    "list_samples",
]
