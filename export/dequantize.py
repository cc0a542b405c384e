"""The float weights an ONNX graph stores, whatever their precision, and how far each may lie
from the float value it was made from.

`stored_weights(model)` yields every weight matrix and vector as float32, one at a time, under the
name of the float initializer it replaced (`layers.0.mlp.up_proj.weight.T`), from its layout:

- float32 initializers: exact;
- float16 initializers: fp16 rounding (half a unit in the last place; onnxruntime's converter
  also moves magnitudes below 1e-7 to 1e-7);
- int8 of `quantize_dynamic` (MatMulInteger on `{w}_quantized`, scale `{w}_scale`, zero point
  `{w}_zero_point`, per tensor or per column) and QDQ graphs (DequantizeLinear of an
  initializer: per tensor, per axis or blocked), both `(q - zero_point) * scale`;
- MatMulNBits (2, 4 or 8 bits packed low bits first, per-block scales, optional zero points,
  default 2^(bits-1)).

A quantized value lies within half a step (|scale|) of the value it was made from, except where
the quantizer saturated it at the end of the integer range; it may then lie up to one step past
the range (symmetric quantizers map the largest magnitude of a block to the most negative code,
so the opposite end can be one code short). `tolerance` states exactly that.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

# fp16 keeps 11 significant bits: rounding moves a value by at most 2^-11 of it; below 6e-5 the
# spacing is 2^-24, and the converter lifts magnitudes under 1e-7 to 1e-7 (2^-23 after rounding).
FP16_RELATIVE, FP16_ABSOLUTE = 2.0**-11, 2.0**-23
# Slack for float arithmetic: a quantizer multiplies by the reciprocal of the scale, which can
# round a value that sits exactly half-way the other way; the dequantized value is then rounded
# to float32 here.
STEP_SLACK, FLOAT32_ROUNDING = 1e-5, 2.0**-24

_INT_RANGES = {
    onnx.TensorProto.INT8: (-128, 127),
    onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT16: (-32768, 32767),
    onnx.TensorProto.UINT16: (0, 65535),
    onnx.TensorProto.INT4: (-8, 7),
    onnx.TensorProto.UINT4: (0, 15),
}


@dataclass
class Stored:
    """One stored weight as float32, in the orientation of the float initializer it replaced."""

    values: np.ndarray
    kind: str  # "float32", "float16", "int8", "int4 (MatMulNBits, block 32)", ...
    step: np.ndarray | None = None  # |scale| per element (broadcastable), quantized only
    low: np.ndarray | None = None  # the range the integers can represent, per element
    high: np.ndarray | None = None

    def tolerance(self, want: np.ndarray) -> np.ndarray:
        """How far each stored value may lie from `want`, the value it was made from."""
        if self.kind == "float32":
            return np.zeros_like(want)
        if self.kind == "float16":
            return FP16_RELATIVE * np.abs(want) + FP16_ABSOLUTE
        beyond = np.maximum(self.low - want, want - self.high).clip(min=0)
        rounding = self.step * (0.5 + STEP_SLACK) + FLOAT32_ROUNDING * np.abs(want)
        # saturated by more than a step: no faithful quantizer does that, so nothing is allowed
        return np.where(beyond <= self.step, rounding + beyond, 0.0)


def stored_weights(model: onnx.ModelProto) -> Iterator[tuple[str, Stored]]:
    """(float name, stored weight) for every float initializer and every quantized weight; one
    at a time, so that a large model is never held twice.

    Raises:
        ValueError: a quantized weight in a layout this module does not know.
    """
    inits = {t.name: t for t in model.graph.initializer}
    for name, t in inits.items():
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            kind = "float32" if t.data_type == onnx.TensorProto.FLOAT else "float16"
            yield name, Stored(numpy_helper.to_array(t).astype(np.float32), kind)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.input[1] in inits:
            yield _float_name(node.input[1]), _matmul_nbits(node, inits)
        elif node.op_type == "MatMulInteger" and node.input[1] in inits:
            yield _float_name(node.input[1]), _matmul_integer(node.input[1], inits)
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            yield _float_name(node.input[0]), _dequantize_linear(node, inits)


def _float_name(quantized: str) -> str:
    """`w_quantized` (quantize_dynamic, QDQ) or `w_Q4` / `w_Q8` (MatMulNBits) → `w`."""
    for suffix in ("_quantized", "_Q2", "_Q4", "_Q8"):
        if quantized.endswith(suffix):
            return quantized[: -len(suffix)]
    return quantized


def _array(inits: dict, name: str) -> np.ndarray | None:
    return numpy_helper.to_array(inits[name]) if name and name in inits else None


def _linear(q, scale, zero_point, q_range: tuple[int, int], kind: str) -> Stored:
    """(q - zero_point) * scale, with the step and the representable range per element."""
    scale = scale.astype(np.float64)
    zero = np.zeros(1) if zero_point is None else zero_point.astype(np.float64)
    ends = (q_range[0] - zero) * scale, (q_range[1] - zero) * scale  # swapped where scale < 0
    low, high = np.minimum(*ends), np.maximum(*ends)
    values = (q.astype(np.float64) - zero) * scale
    step, low, high = (a.astype(np.float32) for a in (np.abs(scale), low, high))
    return Stored(values.astype(np.float32), kind, step, low, high)


def _matmul_integer(name: str, inits: dict) -> Stored:
    """quantize_dynamic's int8: the MatMul weight (K, N), scale per tensor or per column."""
    base = _float_name(name)
    scale = _array(inits, f"{base}_scale")
    if scale is None:
        raise ValueError(f"{name}: no initializer {base}_scale (not quantize_dynamic's layout)")
    data_type = inits[name].data_type
    kind = onnx.TensorProto.DataType.Name(data_type).lower()
    q = numpy_helper.to_array(inits[name])
    return _linear(q, scale, _array(inits, f"{base}_zero_point"), _INT_RANGES[data_type], kind)


def _dequantize_linear(node: onnx.NodeProto, inits: dict) -> Stored:
    """DequantizeLinear(x, scale, zero_point): per tensor, per axis or blocked (`block_size`)."""
    x = numpy_helper.to_array(inits[node.input[0]])
    scale = _array(inits, node.input[1])
    zero = _array(inits, node.input[2] if len(node.input) > 2 else "")
    if scale is None:
        raise ValueError(f"{node.name}: its scale is not an initializer")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    axis, block = attrs.get("axis", 1) % max(x.ndim, 1), attrs.get("block_size", 0)

    def spread(a):  # a scale or zero point broadcast to x's shape
        if a is None or a.ndim == 0:
            return a
        if block:
            return np.repeat(a, block, axis=axis).take(range(x.shape[axis]), axis=axis)
        return a.reshape([-1 if d == axis else 1 for d in range(x.ndim)])

    data_type = inits[node.input[0]].data_type
    if data_type not in _INT_RANGES:
        raise ValueError(f"{node.name}: {x.dtype} weights are not supported")
    kind = onnx.TensorProto.DataType.Name(data_type).lower()
    return _linear(x, spread(scale), spread(zero), _INT_RANGES[data_type], kind)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes → the `bits`-wide codes they hold, lowest bits first, along the last axis."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)


def _matmul_nbits(node: onnx.NodeProto, inits: dict) -> Stored:
    """MatMulNBits' B (N, blocks, bytes) with scales (N * blocks) → the weight (K, N)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    K, N, bits, block = attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"]
    if len(node.input) > 4 and node.input[4] or 8 % bits:
        raise ValueError(f"{node.name}: {bits}-bit or g_idx (reordered) blocks are not supported")
    blocks = -(-K // block)
    codes = _unpack(numpy_helper.to_array(inits[node.input[1]]), bits).reshape(N, blocks, block)
    scale = numpy_helper.to_array(inits[node.input[2]]).reshape(N, blocks, 1)
    zero = _array(inits, node.input[3] if len(node.input) > 3 else "")
    if zero is None:
        zero = np.full((N, blocks, 1), 1 << (bits - 1))
    elif zero.dtype == np.uint8:  # packed like the weights, each column padded to whole bytes
        zero = _unpack(zero.reshape(N, -1), bits)[:, :blocks, None]
    else:
        zero = zero.reshape(N, blocks, 1)
    w = _linear(codes, scale, zero, (0, (1 << bits) - 1), f"int{bits} (MatMulNBits, block {block})")
    # (N, blocks, block) → (N, K) without the padding → (K, N), the MatMul weight layout
    values, step, low, high = (
        np.broadcast_to(a, codes.shape).reshape(N, -1)[:, :K].T
        for a in (w.values, w.step, w.low, w.high)
    )
    return Stored(np.ascontiguousarray(values), w.kind, step, low, high)
