"""The one set of backend names, used by the runtime, the benchmarks and the CLI help.

A run directory runs through PyTorch with one of three implementations of the model's hot ops,
chosen once when the model is built (see `fastad.ops`):

    torch       the reference ops, the formulas as written (the parity reference)
    torch-lean  memory-lean blocked torch paths (CPU, or GPUs without Triton)
    triton      fused Triton kernels (CUDA)

A run directory also runs at a `precision` (PRECISIONS): the model's weights and activations in
that dtype, the correlation statistics in fp32 (as in the fp16 ONNX export).

An exported file runs through its engine: onnx (onnxruntime), openvino (an IR on the CPU, fp32
or bf16, from an fp32 or int8 file) or tensorrt (a serialized engine).

`fastad bench` names a backend at a precision as "backend[:precision]" (BENCH_PRECISIONS): a run
directory's precision is applied when the model is built; an .onnx / engine runs at the precision
it was exported with (fp16, int8); an OpenVINO fp32 IR runs at fp32 or bf16 (a runtime hint), an
int8 IR at fp32 or bf16 ("int8+bf16") around its int8 products.
"""
from __future__ import annotations

RUN_BACKENDS = ("torch", "torch-lean", "triton")
FILE_BACKENDS = ("onnx", "openvino", "tensorrt")
BACKENDS = RUN_BACKENDS + FILE_BACKENDS

# Run-directory backend -> implementation of the hot ops (fastad.ops.IMPLS).
IMPL_OF_BACKEND = {"torch": "reference", "torch-lean": "lean", "triton": "triton"}

# Run-directory precision -> torch dtype name (fastad.runtime maps it onto torch).
PRECISIONS = ("fp32", "fp16", "bf16")

# backend -> the precisions `fastad bench` accepts for it (the first is the default).
BENCH_PRECISIONS = {**{b: PRECISIONS for b in RUN_BACKENDS}, "onnx": ("fp32", "fp16", "int8"),
                    "openvino": ("fp32", "bf16", "int8", "int8+bf16"), "tensorrt": ("fp32", "fp16")}
