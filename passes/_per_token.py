"""Per-token dynamic activations in standard ONNX (``granularity: per_token``, ``calibration: dynamic``).

One scale (and zero point) per row of the tensor — every axis but the last, the rows a MatMul multiplies —
computed at run time from the row's own range, with the float32 operations of
:func:`qcompiler.quant.per_token_qparams` (so the codes equal the numpy oracle bit for bit)::

    uint8, asymmetric (DynamicQuantizeLinear's convention, per row):
      lo = Min(ReduceMin(x, -1, keepdims), 0)     hi = Max(ReduceMax(x, -1, keepdims), 0)
      s  = Max((hi − lo) / 255, 1e-12)            z  = Clip(Round(0 − lo / s), 0, 255)
      q  = Cast<uint8>(Clip(Round(x / s) + z, 0, 255))        x̂ = (Cast<float>(q) − z) · s
    int8, symmetric:
      s  = Max(ReduceMax(Abs(x), -1, keepdims) / 127, 1e-12)
      q  = Cast<int8>(Clip(Round(x / s), −128, 127))          x̂ = Cast<float>(q) · s

``per_row=False`` reduces over every axis (one run-time scale for the tensor). Names: ``<x>:pt_*`` (``:pt_q``
the codes, ``:pt_s`` the scale, ``:pt_zp`` the zero point, ``:dq`` the dequantized tensor); the ort target's
``ort-per-token-matmul`` recognizes the form by them (:data:`qcompiler.quant.PER_TOKEN_SUFFIXES`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler import quant

SUFFIX_Q, SUFFIX_S, SUFFIX_Z = quant.PER_TOKEN_SUFFIXES


def emit_per_token(graph: gs.Graph, names: Callable[[str], str], tag: Callable[[gs.Node], gs.Node], t: gs.Tensor,
                   dtype: str, symmetric: bool, opset: int, per_row: bool = True) -> gs.Variable:
    """Append the run-time quantize / dequantize of ``t`` to ``graph``; returns the dequantized tensor."""
    dt = quant.qdtype(dtype)
    base = t.name
    nodes: list[gs.Node] = []

    def const(role: str, value: float) -> gs.Constant:
        return gs.Constant(names(f"{base}:pt_{role}"), np.asarray(value, dtype=np.float32))

    def op(kind: str, role: str, inputs: list[gs.Tensor], out: str | None = None, dtype_: object = np.float32,
           **attrs: object) -> gs.Variable:
        y = gs.Variable(out or names(f"{base}:pt_{role}"), dtype=dtype_)
        nodes.append(gs.Node(kind, names(f"{base}:pt_{role}_{kind}"), attrs=dict(attrs), inputs=inputs, outputs=[y]))
        return y

    def reduce(kind: str, x: gs.Tensor, role: str) -> gs.Variable:
        if not per_row:
            return op(kind, role, [x], keepdims=1)
        if opset >= 18:
            axes = gs.Constant(names(f"{base}:pt_axes"), np.asarray([-1], dtype=np.int64))
            return op(kind, role, [x, axes], keepdims=1)
        return op(kind, role, [x], keepdims=1, axes=[-1])

    zero = const("zero", 0.0)
    tiny = const("tiny", float(quant.PER_TOKEN_MIN_SCALE))
    if symmetric:
        absmax = reduce("ReduceMax", op("Abs", "abs", [t]), "absmax")
        s = op("Max", "s", [op("Div", "range", [absmax, const("qmax", dt.qmax)]), tiny],
               out=names(f"{base}{SUFFIX_S}"))
        z = None
        r = op("Round", "round", [op("Div", "div", [t, s])])
    else:
        lo = op("Min", "lo", [reduce("ReduceMin", t, "min"), zero])
        hi = op("Max", "hi", [reduce("ReduceMax", t, "max"), zero])
        s = op("Max", "s", [op("Div", "range", [op("Sub", "span", [hi, lo]), const("levels", dt.qmax - dt.qmin)]),
                            tiny], out=names(f"{base}{SUFFIX_S}"))
        zr = op("Round", "zround", [op("Sub", "zshift", [const("qmin", dt.qmin), op("Div", "lo_s", [lo, s])])])
        z = op("Clip", "z", [zr, const("zmin", dt.qmin), const("zmax", dt.qmax)], out=names(f"{base}{SUFFIX_Z}"))
        r = op("Add", "shifted", [op("Round", "round", [op("Div", "div", [t, s])]), z])
    clipped = op("Clip", "clip", [r, const("qlo", dt.qmin), const("qhi", dt.qmax)])
    onnx_type = 2 if dtype == "uint8" else 3  # TensorProto.UINT8 / INT8
    q = op("Cast", "q", [clipped], out=names(f"{base}{SUFFIX_Q}"), dtype_=dt.np_dtype, to=onnx_type)
    qf = op("Cast", "qf", [q], to=1)
    centered = qf if z is None else op("Sub", "centered", [qf, z])
    dq = op("Mul", "dq", [centered, s], out=names(f"{base}:dq"))
    dq.shape = t.shape
    graph.nodes.extend(tag(n) for n in nodes)
    return dq
