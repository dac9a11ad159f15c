"""Run Triton kernels through the interpreter on machines without a GPU. Must happen before
any kernel module is imported (triton.jit reads TRITON_INTERPRET at decoration time)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
