"""ONNX and TensorRT export (installed as ``fastad.export``).

    export_onnx(run_dir, "model.onnx", fp16=False)     # + model.onnx.json sidecar
    check_onnx("model.onnx", batch=32)                 # TensorRT compatibility report
    export_engine(run_dir, "model.engine", fp16=True)  # needs TensorRT (+ model.engine.json)
    export_openvino(run_dir, "model.xml", int8=False)  # needs OpenVINO (+ model.bin, model.xml.json)
"""
from fastad.sidecar import read_sidecar, sidecar_path

from .check import CheckReport, check_onnx
from .onnx import export_onnx
from .openvino import export_openvino
from .tensorrt import export_engine

__all__ = ["export_onnx", "export_engine", "export_openvino", "check_onnx", "CheckReport", "read_sidecar", "sidecar_path"]
