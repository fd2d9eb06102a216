"""ONNX function bodies of QONNX's ``Quant`` and ``BipolarQuant`` (standard ops only), so stock onnxruntime
runs a QONNX model. FINN, hls4ml and qonnx's executor implement the ops themselves and never read the bodies.

``Quant(x, scale, zeropt, bitwidth; signed, narrow)``: with ``p = 2^(b−1)``, ``f = 2^b``, ``s = signed``,
``n = narrow``::

    lo = s · (−p + n)                         hi = s · (p − 1) + (1 − s) · (f − 1 − n)
    y  = (min(max(round(x / scale + zeropt), lo), hi) − zeropt) · scale

``round`` is ONNX ``Round`` (half to even), i.e. ``rounding_mode="ROUND"``, the only mode this exporter
writes. qonnx clips before rounding; with integer bounds the two orders give the same result.

``BipolarQuant(x, scale)``: ``y = where(x >= 0, 1, −1) · scale``.

This module describes the bodies; :mod:`qcompiler.ir.functions` builds them.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from qcompiler.ir.functions import FunctionBody, add_functions
from qcompiler.runtime_targets.qonnx import DOMAIN

#: the lowest default-domain opset the bodies are valid for (Round-11, GreaterOrEqual-12, Max/Min broadcast);
#: they are written with the model's own opset (onnxruntime wants the function's and the model's to agree)
MIN_BODY_OPSET = 13


def quant_function(opset: int = MIN_BODY_OPSET) -> gs.Function:
    """``Quant`` (attributes ``signed``, ``narrow`` default 1 as in QONNX, ``rounding_mode`` default ROUND)."""
    b = FunctionBody(opset, prefix="q")
    x, scale, zeropt, bits = (gs.Variable(n) for n in ("x", "scale", "zeropt", "bitwidth"))
    one, two = b.const("one", 1.0), b.const("two", 2.0)
    signed = b.cast_float(b.attr_const("signed", "value_int", int))
    narrow = b.cast_float(b.attr_const("narrow", "value_int", int))
    p = b.op("Pow", [two, b.op("Sub", [bits, one])])
    full = b.op("Pow", [two, bits])
    lo = b.op("Mul", [signed, b.op("Add", [b.op("Neg", [p]), narrow])])
    hi_signed = b.op("Sub", [p, one])
    hi_unsigned = b.op("Sub", [b.op("Sub", [full, one]), narrow])
    hi = b.op("Add", [b.op("Mul", [signed, hi_signed]), b.op("Mul", [b.op("Sub", [one, signed]), hi_unsigned])])
    q = b.op("Round", [b.op("Add", [b.op("Div", [x, scale]), zeropt])])
    q = b.op("Min", [b.op("Max", [q, lo]), hi])
    y = b.op("Mul", [b.op("Sub", [q, zeropt]), scale])
    return b.function("Quant", DOMAIN, [x, scale, zeropt, bits], [y],
                      attrs={"signed": 1, "narrow": 1, "rounding_mode": "ROUND"})


def bipolar_quant_function(opset: int = MIN_BODY_OPSET) -> gs.Function:
    """``BipolarQuant``: sign with sign(0) = +1, times the scale."""
    b = FunctionBody(opset, prefix="bq")
    x, scale = gs.Variable("x"), gs.Variable("scale")
    pm = b.op("Where", [b.op("GreaterOrEqual", [x, b.const("zero", 0.0)]), b.const("plus", 1.0),
                        b.const("minus", -1.0)])
    y = b.op("Mul", [pm, scale])
    return b.function("BipolarQuant", DOMAIN, [x, scale], [y])


BUILDERS = {"Quant": quant_function, "BipolarQuant": bipolar_quant_function}


def ensure_functions(graph: gs.Graph, ops: set[str]) -> int:
    """Add the bodies of ``ops`` to ``graph.functions`` unless already there; returns how many were added."""
    return add_functions(graph, DOMAIN, ops, lambda op, opset: BUILDERS[op](opset),
                         max(int(graph.opset), MIN_BODY_OPSET))
