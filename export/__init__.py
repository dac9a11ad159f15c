"""ONNX and TensorRT export (installed as ``fastad.export``)."""
