"""trt-check-rules (tensorrt target): the explicit-quantization rules a TensorRT graph must satisfy.

:func:`violations` walks a graph and returns one line per broken rule (empty: the graph is TensorRT-ready):

1. ``zero-point``: every QuantizeLinear / DequantizeLinear zero point is 0 (TensorRT is symmetric-only).
2. ``activation-type``: every QuantizeLinear produces int8 or float8e4m3fn, per tensor (scalar scale).
3. ``weight-type``: every DequantizeLinear of a constant reads int8, float8e4m3fn or int4 codes (no int32
   bias DequantizeLinear, no uint8 / int16).
4. ``no-weight-quantize``: no QuantizeLinear reads a constant (weights are stored quantized).
5. ``weight-axis``: a per-channel weight DequantizeLinear feeding input 1 of Conv / ConvTranspose / Gemm /
   MatMul uses the output-channel axis (Conv 0, ConvTranspose 1, Gemm 0 with ``transB=1`` else 1, MatMul the
   last); a block-wise one is int4, 2-D, feeds MatMul / Gemm, runs along the reduction axis, and the op's
   activation is not quantized (weight-only).
6. ``pairing``: Conv / ConvTranspose / Gemm / MatMul with an int8 (fp8) weight reads an int8 (fp8) activation,
   or — Gemm / MatMul only — a float one (weight-only).
7. ``residual-add``: an Add fed directly by a quantized weighted op reads that input unquantized.

The pass raises (a bug, not a user error: the target's ``check`` refuses plans that would break a rule) when
the lowered graph breaks any rule, and reports ``rules_checked`` otherwise — a user error instead when the input
model brought Q / DQ nodes of its own (untagged: quantized for another runtime, uint8 or per-axis activations).
"""

from __future__ import annotations

from collections import Counter

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core.errors import UserError
from qcompiler.core.pass_base import GraphPass, PassResult
from qcompiler.core.tags import tag_of
from qcompiler.ir.axes import per_channel_axis as output_axis
from qcompiler.ir.graph import is_onnx_op, producer
from qcompiler.runtime_targets.tensorrt.residual_add import quantized_weighted_op, through_qdq

_FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
_INT4 = np.dtype(ml_dtypes.int4)
_ACT_TYPES = {np.dtype(np.int8), _FP8}
_WEIGHT_TYPES = {np.dtype(np.int8), _FP8, _INT4}


def reduction_axis(node: gs.Node, ndim: int) -> int:
    if node.op == "Gemm":
        return 1 if int(node.attrs.get("transB", 0)) else 0
    return ndim - 2


def _zp(node: gs.Node) -> np.ndarray | None:
    z = node.inputs[2] if len(node.inputs) > 2 else None
    return np.asarray(z.values) if isinstance(z, gs.Constant) else None


def _code_type(dq: gs.Node) -> np.dtype | None:
    """Type of the codes a DequantizeLinear reads (from its constant input, zero point or Q producer)."""
    x = dq.inputs[0]
    if isinstance(x, gs.Constant):
        return np.asarray(x.values).dtype
    z = _zp(dq)
    if z is not None:
        return z.dtype
    q = producer(x)
    if q is not None and is_onnx_op(q, "QuantizeLinear"):
        qz = _zp(q)
        return qz.dtype if qz is not None else np.dtype(np.uint8)
    return None


def violations(graph: gs.Graph) -> list[str]:
    """One line per broken rule (see the module docstring); empty when the graph is TensorRT-ready."""
    out: list[str] = []
    for node in graph.nodes:
        if is_onnx_op(node, "QuantizeLinear", "DequantizeLinear"):
            z = _zp(node)
            if z is not None and z.dtype != _FP8 and np.any(z.astype(np.int64) != 0):
                out.append(f"zero-point: {node.op} '{node.name}' has a non-zero zero point")
            if z is not None and z.dtype == _FP8 and np.any(z.astype(np.float32) != 0):
                out.append(f"zero-point: {node.op} '{node.name}' has a non-zero fp8 zero point")
        if is_onnx_op(node, "QuantizeLinear"):
            if isinstance(node.inputs[0], gs.Constant):
                out.append(f"no-weight-quantize: QuantizeLinear '{node.name}' quantizes a constant")
            z = _zp(node)
            t = z.dtype if z is not None else np.dtype(np.uint8)
            if t not in _ACT_TYPES:
                out.append(f"activation-type: QuantizeLinear '{node.name}' produces {t}")
            s = node.inputs[1]
            if not isinstance(s, gs.Constant) or np.asarray(s.values).size != 1:
                out.append(f"activation-type: QuantizeLinear '{node.name}' is not per tensor")
        elif is_onnx_op(node, "DequantizeLinear") and isinstance(node.inputs[0], gs.Constant):
            t = np.asarray(node.inputs[0].values).dtype
            if t not in _WEIGHT_TYPES:
                out.append(f"weight-type: DequantizeLinear '{node.name}' reads {t} codes")
    for node in graph.nodes:
        if is_onnx_op(node, "Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.inputs) >= 2:
            out.extend(_weighted(node))
    out.extend(_residual(graph))
    return out


def _weighted(node: gs.Node) -> list[str]:
    out: list[str] = []
    wdq = producer(node.inputs[1])
    if wdq is None or not is_onnx_op(wdq, "DequantizeLinear") or not isinstance(wdq.inputs[0], gs.Constant):
        return out
    codes = np.asarray(wdq.inputs[0].values)
    scale = np.asarray(wdq.inputs[1].values)
    block = int(wdq.attrs.get("block_size", 0) or 0)
    axis = int(wdq.attrs.get("axis", 1))
    axis = axis + codes.ndim if axis < 0 else axis
    xdq = producer(node.inputs[0])
    x_type = _code_type(xdq) if xdq is not None and is_onnx_op(xdq, "DequantizeLinear") else None
    where = f"{node.op} '{node.name}'"
    if block:
        if codes.dtype != _INT4 or codes.ndim != 2 or node.op not in ("MatMul", "Gemm"):
            out.append(f"weight-axis: {where}: block-wise weights must be 2-D int4 of MatMul/Gemm")
        elif axis != reduction_axis(node, 2):
            out.append(f"weight-axis: {where}: block axis {axis} is not the reduction axis")
        if x_type is not None:
            out.append(f"weight-axis: {where}: int4 block weights must be weight-only")
        return out
    if scale.size > 1 and axis != output_axis(node, codes.ndim):
        out.append(f"weight-axis: {where}: per-channel axis {axis} is not the output-channel axis "
                   f"{output_axis(node, codes.ndim)}")
    if codes.dtype == _INT4:
        out.append(f"weight-type: {where}: int4 weights must be block-wise")
    elif x_type is None:
        if node.op in ("Conv", "ConvTranspose") or codes.dtype != np.dtype(np.int8):
            out.append(f"pairing: {where}: {codes.dtype} weight with a float activation")
    elif (codes.dtype == _FP8) != (x_type == _FP8):
        out.append(f"pairing: {where}: weight {codes.dtype} with activation {x_type}")
    return out


def _residual(graph: gs.Graph) -> list[str]:
    out: list[str] = []
    for add in graph.nodes:
        if not is_onnx_op(add, "Add") or len(add.inputs) != 2 or any(isinstance(t, gs.Constant) for t in add.inputs):
            continue
        plain = [t for t in add.inputs if quantized_weighted_op(producer(t))]
        if plain:
            continue  # the main input is read unquantized: fusable
        for t in add.inputs:
            pair = through_qdq(t)
            src = producer(pair[0].inputs[0]) if pair else None
            if pair and quantized_weighted_op(src) and len(pair[0].inputs[0].outputs) == 1:
                out.append(f"residual-add: Add '{add.name}' reads the output of '{src.name if src else '?'}' "
                           "through Q/DQ")
                break
    return out


class TrtCheckRulesPass(GraphPass):
    """Verify the lowered graph against TensorRT's explicit-quantization rules (raises on a violation)."""

    name = "trt-check-rules"
    requires = frozenset({"qdq"})

    def run_graph(self, graph: gs.Graph) -> PassResult:
        bad = violations(graph)
        theirs = [n.name for n in graph.nodes if is_onnx_op(n, "QuantizeLinear", "DequantizeLinear") and not tag_of(n)]
        if bad and theirs:  # Q / DQ the input model brought (quantized for another runtime): the input's fault
            raise UserError(f"the model already holds {len(theirs)} QuantizeLinear / DequantizeLinear node(s) (first: "
                            f"'{theirs[0]}') and breaks TensorRT's explicit-quantization rules: {bad[0]}; the tensorrt "
                            "target compiles float models")
        if bad:
            raise RuntimeError(f"{len(bad)} TensorRT rule violation(s): {'; '.join(bad[:5])}")
        stats: Counter[str] = Counter()
        stats["rules_checked"] = 1
        stats["quantize_nodes"] = sum(1 for n in graph.nodes if is_onnx_op(n, "QuantizeLinear"))
        stats["dequantize_nodes"] = sum(1 for n in graph.nodes if is_onnx_op(n, "DequantizeLinear"))
        return PassResult(modified=False, stats=stats)
