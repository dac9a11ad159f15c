"""Data: dataset layouts, the torch Dataset, and the offline demo dataset. (Reading and resizing
images and masks is fastad.preprocess.)"""
from fastad.data.dataset import AnomalyDataset
from fastad.data.demo import make_demo_dataset
from fastad.data.layouts import LAYOUTS, Sample, detect_layout, list_folder_samples, list_samples

__all__ = [
    "AnomalyDataset",
    "make_demo_dataset",
    "LAYOUTS",
    "Sample",
    "detect_layout",
    "list_folder_samples",
    "list_samples",
]
