"""TensorRT compatibility check of an ONNX graph, before anyone tries to build an engine.

    fastad check model.onnx [--batch 32]

Reports, without needing TensorRT:
- operators outside the set TensorRT's ONNX parser supports (onnx-tensorrt docs/operators.md;
  conservative: the TensorRT 8.6 list plus the normalisation ops of opset 17/18 that 8.6+ parse);
- opset outside 17..20 (TensorRT 10.0 parses opset 9..20; 17 is the first with LayerNormalization);
- tensors with 2³¹ or more elements at the given batch (TensorRT indexes with int32: builds fail or
  give wrong outputs) — from ONNX shape inference with the batch axis fixed;
- float64 tensors (TensorRT casts them down) and int64 values outside int32 range in constants
  (TensorRT casts int64 to int32, clamping) — except Slice bounds, where ±INT64_MAX means "to
  the end" and clamping is harmless;
- Resize modes TensorRT does not implement, non-constant Conv weights, and a missing dynamic
  batch axis on the input.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

# ONNX operators marked supported ("Y") in onnx-tensorrt's operators.md for TensorRT 8.6,
# plus LayerNormalization (opset 17) and GroupNormalization (opset 18).
TENSORRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
GridSample GroupNormalization GRU HardSigmoid HardSwish Identity If ImageScaler
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean Min Mish Mul Neg NonMaxSuppression
NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape
Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu
Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# Ops that TensorRT parses but that restrict shapes or run as slow control flow: warnings.
TENSORRT_CAUTION_OPS = frozenset({"If", "Loop", "Scan", "NonZero", "NonMaxSuppression"})
RESIZE_MODES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
MAX_VOLUME = 2 ** 31 - 1
OPSET_RANGE = (17, 20)


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    opset: int | None = None
    batch: int = 1
    ops: dict[str, int] = field(default_factory=dict)
    largest_tensor: tuple[int, str] | None = None  # (elements, name) at `batch`
    unknown_shapes: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> dict:
        return {"ok": self.ok, "errors": self.errors, "warnings": self.warnings, "opset": self.opset,
                "batch": self.batch, "largest_tensor_elements": self.largest_tensor[0] if self.largest_tensor else None,
                "largest_tensor": self.largest_tensor[1] if self.largest_tensor else None,
                "unknown_shapes": self.unknown_shapes, "ops": self.ops}

    @classmethod
    def from_summary(cls, d: dict) -> "CheckReport":
        """Rebuild a report from `summary()` (as stored in an export's sidecar)."""
        largest = (d["largest_tensor_elements"], d["largest_tensor"]) if d.get("largest_tensor") else None
        return cls(errors=list(d["errors"]), warnings=list(d["warnings"]), opset=d["opset"], batch=d["batch"],
                   ops=dict(d["ops"]), largest_tensor=largest, unknown_shapes=d["unknown_shapes"])

    def lines(self) -> list[str]:
        out = [f"opset {self.opset}, {sum(self.ops.values())} nodes, {len(self.ops)} op types"]
        if self.largest_tensor:
            n, name = self.largest_tensor
            out.append(f"largest tensor at batch {self.batch}: {n:,} elements ({name}); limit {MAX_VOLUME + 1:,}")
        out += [f"warning: {w}" for w in self.warnings]
        out += [f"ERROR: {e}" for e in self.errors]
        out.append("TensorRT check: " + ("OK" if self.ok else f"{len(self.errors)} problem(s)"))
        return out


def _load(model):
    import onnx

    if isinstance(model, (str, os.PathLike)):
        try:
            return onnx.load(str(model))
        except Exception as e:  # noqa: BLE001 - protobuf raises several types for a bad file
            from fastad.errors import FastADError

            raise FastADError(f"cannot read ONNX model {model}: {type(e).__name__}: {e}") from None
    return model


def _opset(proto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _fixed_batch_shapes(proto, batch: int):
    """Shape-infer a copy of the model with every symbolic input dim 0 set to `batch`."""
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    for inp in fixed.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].ClearField("dim_param")
            dims[0].dim_value = batch
    return onnx.shape_inference.infer_shapes(fixed, data_prop=True)


def check_onnx(model, batch: int = 32) -> CheckReport:
    """Check an ONNX model (path or ModelProto) for TensorRT at the given (maximum) batch size."""
    import onnx
    from onnx import numpy_helper

    proto = _load(model)
    rep = CheckReport(opset=_opset(proto), batch=batch)
    graph = proto.graph
    for node in graph.node:
        rep.ops[node.op_type] = rep.ops.get(node.op_type, 0) + 1

    if rep.opset is None or not OPSET_RANGE[0] <= rep.opset <= OPSET_RANGE[1]:
        rep.errors.append(f"opset {rep.opset}: export with opset {OPSET_RANGE[0]}..{OPSET_RANGE[1]}")
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            rep.errors.append(f"node {node.name or node.op_type}: custom domain {node.domain!r} ({node.op_type}) needs a plugin")
    unsupported = sorted(op for op in rep.ops if op not in TENSORRT_OPS)
    for op in unsupported:
        rep.errors.append(f"operator {op} ({rep.ops[op]}x) is not supported by TensorRT's ONNX parser")
    for op in sorted(set(rep.ops) & TENSORRT_CAUTION_OPS):
        rep.warnings.append(f"operator {op} ({rep.ops[op]}x): supported with restrictions (control flow / data-dependent shapes)")

    initializers = {t.name for t in graph.initializer}
    constants = {o for n in graph.node if n.op_type == "Constant" for o in n.output} | initializers
    for node in graph.node:
        if node.op_type == "Resize":
            attrs = {a.name: a for a in node.attribute}
            mode = attrs["coordinate_transformation_mode"].s.decode() if "coordinate_transformation_mode" in attrs else "half_pixel"
            if mode not in RESIZE_MODES:
                rep.errors.append(f"{node.name}: Resize coordinate_transformation_mode {mode!r} is not supported")
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1 and node.input[1] not in constants:
            rep.errors.append(f"{node.name}: {node.op_type} weights must be constants")
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to == onnx.TensorProto.DOUBLE:
                rep.warnings.append(f"{node.name}: Cast to float64 (TensorRT casts it down to float32)")

    # Slice starts/ends of ±INT64_MAX mean "to the end": clamping them to int32 is harmless.
    users: dict[str, set] = {}
    for node in graph.node:
        for pos, name in enumerate(node.input):
            users.setdefault(name, set()).add((node.op_type, pos))
    slice_bounds = {name for name, u in users.items() if u <= {("Slice", 1), ("Slice", 2)}}
    tensors = [(t.name, t) for t in graph.initializer] + [
        (n.output[0], n.attribute[0].t) for n in graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"]
    for name, t in tensors:
        if t.data_type == onnx.TensorProto.INT64 and name not in slice_bounds:
            arr = numpy_helper.to_array(t)
            if arr.size and (arr.max() > np.iinfo(np.int32).max or arr.min() < np.iinfo(np.int32).min):
                rep.errors.append(f"int64 constant {name} has values outside int32 range "
                                  f"(TensorRT clamps them): [{arr.min()}, {arr.max()}]")
        if t.data_type == onnx.TensorProto.DOUBLE:
            rep.warnings.append(f"float64 constant {name} (TensorRT casts it down)")

    if graph.input:
        dims = graph.input[0].type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            rep.warnings.append(f"input {graph.input[0].name} has a fixed batch size (no dynamic axis 0)")

    try:
        inferred = _fixed_batch_shapes(proto, batch).graph
    except Exception as e:  # noqa: BLE001 - onnx raises InferenceError / ValidationError subtypes
        rep.warnings.append(f"shape inference failed ({str(e).splitlines()[0]}): tensor volumes unchecked")
        return rep
    for vi in list(inferred.value_info) + list(inferred.output):
        ttype = vi.type.tensor_type
        dims = ttype.shape.dim
        if not ttype.HasField("shape") or any(not d.HasField("dim_value") for d in dims):
            rep.unknown_shapes += 1
            continue
        volume = int(np.prod([d.dim_value for d in dims], dtype=np.int64))
        if rep.largest_tensor is None or volume > rep.largest_tensor[0]:
            rep.largest_tensor = (volume, vi.name)
        if volume > MAX_VOLUME:
            rep.errors.append(f"tensor {vi.name} has {volume:,} elements at batch {batch} (>= 2^31): "
                              "TensorRT cannot index it; lower the maximum batch")
        if ttype.elem_type == onnx.TensorProto.DOUBLE:
            rep.warnings.append(f"tensor {vi.name} is float64")
    if rep.unknown_shapes:
        rep.warnings.append(f"{rep.unknown_shapes} tensors have shapes shape inference could not resolve; "
                            "their volume is unchecked")
    return rep
