"""ONNX function bodies of the ``ai.qcompiler`` ops, built as graphsurgeon :class:`gs.Function` objects.

Each custom op is written into the model with a model-local FunctionProto (``graph.functions``; exported by
``qcompiler.ir.export_model`` through graphsurgeon), so stock onnxruntime runs a packed model unchanged — it
inlines the body. This module describes the bodies; :mod:`qcompiler.ir.functions` builds them. A body, for opset ``opset`` (the model's; at least 12)::

    fields = Slice(Reshape(BitShift(Reshape(W, [-1, 1]), [0, w, 2w, …], RIGHT) & (2^w − 1), [-1]), 0, numel)
    codes  = binary: 2·Cast(fields) − 1 | ternary: Cast(fields) − 1 | shift: (1 − 2·(fields >> 3))·(1 << (fields & 7))
             shift3 / shift2 (E = 2 / 1 exponent bits): (1 − 2·⌊f / 2^E⌋)·2^(f − 2^E·⌊f / 2^E⌋), in float32
             int3 / int2 (uniform, w = 3 / 2): 2·f − (2^w − 1), in float32

3-bit fields (``shift3``) cross byte boundaries; each group of 3 bytes is read as one integer
``v = b0 + 256·b1 + 65536·b2`` (a float32 MatMul, exact below 2^24) and field k is
``⌊v / 8^k⌋ − 8·⌊v / 8^(k+1)⌋`` (exact float32 arithmetic on integers below 2^24).
    Wq     = Reshape(codes, shape)                               # the integer codes, as float
    X'     = input_scale > 0 ? (X < 0 ? −1 : +1) : X             # XNOR layers: binary input, sign(0) = +1
    Y      = Op(X', Wq) · scale · (input_scale > 0 ? input_scale : 1) [+ bias]

``& m`` is ``BitwiseAnd`` from opset 18 and ``Mod(·, m + 1)`` before (same result on uint8). The float op
``Op`` is Conv (attributes auto_pad, dilations, group, kernel_shape, pads, strides forwarded by reference),
Gemm (alpha, transA, transB; the bias is added as ``beta · C`` after the scaling) or MatMul. ``shape``
(ints) and ``input_scale`` (float) are attributes of every op. With both operands ±1 (binary weights,
``input_scale`` > 0) the Conv/MatMul sums are exact integers, so the result equals the XNOR/popcount
reference of :mod:`.ops` bit for bit when onnxruntime's graph optimizations are off.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.ir.functions import FLOAT, INTS, FunctionBody, attribute_ref
from qcompiler.runtime_targets.packed.packing import FIELD_BITS

DOMAIN = "ai.qcompiler"
DOMAIN_VERSION = 1
#: the lowest opset the bodies are written for (Constant value_ints / value_float)
MIN_OPSET = 12

#: op type -> (weight scheme, float op)
OPS: dict[str, tuple[str, str]] = {
    f"{scheme.capitalize()}{op}": (scheme, op)
    for scheme in ("binary", "ternary", "shift", "shift3", "shift2", "int3", "int2")
    for op in ("Conv", "Gemm", "MatMul")
}
_CONV_ATTRS: dict[str, Any] = {"auto_pad": str, "dilations": INTS, "group": int, "kernel_shape": INTS, "pads": INTS,
                               "strides": INTS}
_GEMM_ATTRS: dict[str, Any] = {"alpha": float, "transA": int, "transB": int}

#: formal inputs of each float op's packed form
INPUTS = {"Conv": ("X", "W", "scale", "B"), "Gemm": ("A", "W", "scale", "C"), "MatMul": ("A", "W", "scale")}


def op_type(scheme: str, float_op: str) -> str:
    return f"{scheme.capitalize()}{float_op}"


class _Body(FunctionBody):
    """A function body (counted names) with the uint8 mask the decoders need."""

    def mask(self, x: gs.Tensor, bits: int) -> gs.Variable:
        """``x & (2^bits − 1)`` on uint8."""
        m = (1 << bits) - 1
        if self.opset >= 18:
            return self.op("BitwiseAnd", [x, self.const("mask", np.uint8(m))])
        return self.op("Mod", [x, self.const("modulus", np.uint8(m + 1))])


def _fields_3bit(b: _Body, packed: gs.Tensor) -> gs.Variable:
    """3-bit fields (float32) of a packed stream of whole 3-byte groups."""
    f32 = FLOAT
    groups = b.op("Cast", [b.op("Reshape", [packed, b.const("groups", np.array([-1, 3], dtype=np.int64))])],
                  {"to": f32})
    v = b.op("MatMul", [groups, b.const("radix", np.array([[1.0], [256.0], [65536.0]], dtype=np.float32))])
    lo = b.op("Floor", [b.op("Div", [v, b.const("p", (8.0 ** np.arange(8)).astype(np.float32))])])
    hi = b.op("Floor", [b.op("Div", [v, b.const("p1", (8.0 ** np.arange(1, 9)).astype(np.float32))])])
    fields = b.op("Sub", [lo, b.op("Mul", [hi, b.const("eight", np.float32(8))])])
    return b.op("Reshape", [fields, b.const("flat", np.array([-1], dtype=np.int64))])


def _decode(b: _Body, scheme: str, packed: gs.Tensor, shape: gs.Tensor) -> gs.Variable:
    width = FIELD_BITS[scheme]
    f32 = FLOAT
    numel = b.op("ReduceProd", [shape], {"keepdims": 1})
    if 8 % width:
        fields = b.op("Slice", [_fields_3bit(b, packed), b.const("start", np.array([0], dtype=np.int64)), numel])
    else:
        per = 8 // width
        col = b.op("Reshape", [packed, b.const("col_shape", np.array([-1, 1], dtype=np.int64))])
        shifted = b.op("BitShift", [col, b.const("shifts", (np.arange(per) * width).astype(np.uint8))],
                       {"direction": "RIGHT"})
        fields = b.op("Reshape", [b.mask(shifted, width), b.const("flat", np.array([-1], dtype=np.int64))])
        fields = b.op("Slice", [fields, b.const("start", np.array([0], dtype=np.int64)), numel])
    if scheme in ("shift3", "shift2"):
        top = float(1 << (width - 1))  # 2^E: the sign bit's weight
        f = fields if 8 % width else b.op("Cast", [fields], {"to": f32})
        neg = b.op("Floor", [b.op("Div", [f, b.const("top", np.float32(top))])])
        exp = b.op("Sub", [f, b.op("Mul", [neg, b.const("top", np.float32(top))])])
        mag = b.op("Pow", [b.const("two", np.float32(2)), exp])
        sign = b.op("Sub", [b.const("one", np.float32(1)), b.op("Mul", [neg, b.const("two", np.float32(2))])])
        codes = b.op("Mul", [mag, sign])
    elif scheme in ("int3", "int2"):  # uniform: odd codes 2f − (2^w − 1)
        f = fields if 8 % width else b.op("Cast", [fields], {"to": f32})
        codes = b.op("Sub", [b.op("Mul", [f, b.const("two", np.float32(2))]),
                             b.const("top", np.float32((1 << width) - 1))])
    elif scheme == "binary":
        v = b.op("Cast", [fields], {"to": f32})
        codes = b.op("Sub", [b.op("Mul", [v, b.const("two", np.float32(2))]), b.const("one", np.float32(1))])
    elif scheme == "ternary":
        codes = b.op("Sub", [b.op("Cast", [fields], {"to": f32}), b.const("one", np.float32(1))])
    else:
        exp = b.mask(fields, 3)
        neg = b.op("BitShift", [fields, b.const("three", np.uint8(3))], {"direction": "RIGHT"})
        mag = b.op("BitShift", [b.const("unit", np.array([1], dtype=np.uint8)), exp], {"direction": "LEFT"})
        sign = b.op("Sub", [b.const("one", np.float32(1)),
                            b.op("Mul", [b.op("Cast", [neg], {"to": f32}), b.const("two", np.float32(2))])])
        codes = b.op("Mul", [b.op("Cast", [mag], {"to": f32}), sign])
    return b.op("Reshape", [codes, shape])


def build_function(op: str, opset: int) -> gs.Function:
    """The function body of custom op ``op`` (e.g. ``BinaryConv``) for a model of ``opset``."""
    if op not in OPS:
        raise KeyError(f"unknown packed op {op!r}")
    if opset < MIN_OPSET:
        raise ValueError(f"packed function bodies need opset >= {MIN_OPSET}, got {opset}")
    scheme, float_op = OPS[op]
    b = _Body(opset)
    formal = [gs.Variable(n) for n in INPUTS[float_op]]
    x, packed, scale = formal[:3]
    shape = b.attr_const("shape", "value_ints", INTS)
    wq = _decode(b, scheme, packed, shape)

    s_in = b.attr_const("input_scale", "value_float", float)
    binary_in = b.op("Greater", [s_in, b.const("zero", np.float32(0))])
    sign = b.op("Where", [b.op("Less", [x, b.const("zero", np.float32(0))]), b.const("minus_one", np.float32(-1)),
                          b.const("one", np.float32(1))])
    x_in = b.op("Where", [binary_in, sign, x])
    s_eff = b.op("Where", [binary_in, s_in, b.const("one", np.float32(1))])

    attrs: dict[str, Any] = {"shape": None, "input_scale": None}
    if scheme in ("shift3", "shift2"):
        attrs["bits"] = None  # informative (the weight bits `inspect --cost` reads); the body does not use it
    if float_op == "Conv":
        y = b.op("Conv", [x_in, wq], {k: attribute_ref(k, t) for k, t in _CONV_ATTRS.items()})
        attrs.update(dict.fromkeys(_CONV_ATTRS))
    elif float_op == "Gemm":
        y = b.op("Gemm", [x_in, wq], {k: attribute_ref(k, t) for k, t in _GEMM_ATTRS.items()})
        attrs.update(dict.fromkeys(_GEMM_ATTRS))
        attrs["beta"] = None
    else:
        y = b.op("MatMul", [x_in, wq])
    out = gs.Variable("Y")
    y = b.op("Mul", [y, scale])
    if float_op == "Conv":
        y = b.op("Mul", [y, s_eff])
        bias = b.op("Reshape", [formal[3], b.op("Shape", [scale])])
        b.op("Add", [y, bias], out=out)
    elif float_op == "Gemm":
        y = b.op("Mul", [y, s_eff])
        beta = b.attr_const("beta", "value_float", float)
        b.op("Add", [y, b.op("Mul", [formal[3], beta])], out=out)
    else:
        b.op("Mul", [y, s_eff], out=out)
    return b.function(op, DOMAIN, formal, [out], attrs=attrs,
                      doc_string=f"qcompiler packed {scheme} {float_op}: see runtime_targets/packed/functions.py")
