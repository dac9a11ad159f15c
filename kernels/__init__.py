"""Fused Triton kernels for inference (installed as ``fastad.kernels``)."""
