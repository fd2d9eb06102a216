"""lower-packed (packed target): binary / ternary / shift layers -> bit-packed ``ai.qcompiler`` ops.

Matches every Conv / Gemm / MatMul the resolved plan gives a low-bit weight scheme, whose weight ``insert-qdq``
turned into ``DequantizeLinear(codes, scale, axis)`` (integer codes, zero point 0)::

    X --> Conv(X, DQ(codes, α, axis=0), B)           becomes   BinaryConv(X, packed, α[C,1,…], B)
    A --> MatMul(A, DQ(codes [K, N], α, axis=1))     becomes   TernaryMatMul(A, packed, α[N])
    A --> Gemm(A, DQ(codes, α), C)                   becomes   ShiftGemm(A, packed, α[N], C)

The codes are re-encoded and bit-packed (:mod:`.packing`: 8 binary, 4 ternary or 2 shift weights per byte;
3-bit shift weights 8 per 3 bytes and 2-bit ones 4 per byte, as ``Shift3*`` / ``Shift2*`` ops with a ``bits``
attribute; uniform 3- / 2-bit weights likewise as ``Int3*`` / ``Int2*`` ops);
α and a zero bias (when the layer has none) are the only other tensors. The exact integer codes are kept, so
``packed`` and ``ort`` compute with the same weights. When the input is a binary activation
(``Where(x >= 0, β, −β)`` from ``insert-qdq``) the op reads ``x`` itself with ``input_scale = β`` (the XNOR
form); the ``Where`` stays for any other reader. Each op type used gets its model-local function body
(:mod:`.functions`) unless ``ctx.strip_function_bodies`` is set (``--strip-function-bodies``: for a
runtime with native kernels). Bytes per layer go to ``ctx.report["packed"]``. A second run finds no
DequantizeLinear-fed low-bit layer and changes nothing.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler import ir
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.pass_base import Pass, PassResult
from qcompiler.ir.axes import per_channel_axis as output_axis
from qcompiler.ir.graph import GraphIndex, is_onnx_op, producer
from qcompiler.quant.schemes import LOWBIT_SCHEMES
from qcompiler.runtime_targets.packed.functions import (
    DOMAIN,
    DOMAIN_VERSION,
    MIN_OPSET,
    build_function,
    op_type,
)
from qcompiler.runtime_targets.packed.packing import FIELD_BITS, pack, scheme_format

log = logging.getLogger(__name__)

_CONV_ATTRS = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


def binarized_source(t: gs.Tensor) -> tuple[gs.Tensor, float] | None:
    """(x, β) when ``t`` is ``insert-qdq``'s binary activation ``Where(x >= 0, β, −β)``, else None."""
    where = producer(t)
    if where is None or where.op != "Where" or ir.tag_of(where) != "insert-qdq" or len(where.inputs) != 3:
        return None
    cond, pos, neg = where.inputs
    if not (isinstance(pos, gs.Constant) and isinstance(neg, gs.Constant)):
        return None
    beta, mbeta = np.asarray(pos.values), np.asarray(neg.values)
    if beta.size != 1 or mbeta.size != 1 or float(beta) <= 0 or float(mbeta) != -float(beta):
        return None
    test = producer(cond)
    if test is None:
        return None
    if test.op == "Not":
        test = producer(test.inputs[0])
        if test is None or test.op != "Less":
            return None
    elif test.op != "GreaterOrEqual":
        return None
    x, zero = test.inputs
    if not (isinstance(zero, gs.Constant) and np.asarray(zero.values).size == 1 and float(zero.values) == 0.0):
        return None
    return x, float(beta)


class LowerPackedPass(Pass):
    """Lower binary/ternary/shift Conv, Gemm and MatMul to bit-packed ai.qcompiler ops with function bodies."""

    name = "lower-packed"
    requires = frozenset({"qdq"})

    def run(self, ctx: CompileContext) -> PassResult:
        stats: Counter[str] = Counter()
        graph = ctx.graph
        resolved = ctx.resolved
        if resolved is None:
            return PassResult(False, stats)
        planned = {n.node: scheme_format(n.weight.scheme, n.weight.bits)
                   for n in resolved.nodes.values() if n.weight is not None and n.weight.scheme in LOWBIT_SCHEMES}
        todo = [n for n in graph.nodes if n.name in planned and is_onnx_op(n, "Conv", "Gemm", "MatMul")]
        if not todo:
            return PassResult(False, stats)
        if ctx.opset < MIN_OPSET:
            raise UserError(f"target 'packed': the model's opset {ctx.opset} is below {MIN_OPSET}, which the "
                            "ai.qcompiler function bodies need (per-channel weights upgrade it to 13)")
        index = GraphIndex(graph)
        report = ctx.report.setdefault("packed", {"domain": DOMAIN, "version": DOMAIN_VERSION, "layers": {}})
        packed_cache: dict[int, gs.Constant] = {}
        used: set[str] = set()
        for node in todo:
            done = self._lower(node, planned[node.name], graph, index, packed_cache, report["layers"], stats)
            if done is not None:
                used.add(done)
        if not used:
            return PassResult(False, stats)
        strip = ctx.strip_function_bodies
        report["function_bodies"] = "stripped" if strip else "embedded"
        if strip:
            ctx.function_bodies_stripped = True  # the driver skips validation in onnxruntime
        if not strip:
            have = {(f.domain, f.name) for f in graph.functions}
            for op in sorted(used):
                if (DOMAIN, op) not in have:
                    graph.functions.append(build_function(op, ctx.opset))
                    stats["function_bodies"] += 1
        layers = report["layers"].values()
        report["totals"] = {"float_bytes": sum(v["float_bytes"] for v in layers),
                            "packed_bytes": sum(v["packed_bytes"] for v in layers)}
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(True, stats)

    # --------------------------------------------------------------------------------------------------
    def _lower(self, node: gs.Node, scheme: str, graph: gs.Graph, index: GraphIndex,
               cache: dict[int, gs.Constant], layers: dict[str, Any], stats: Counter[str]) -> str | None:
        w = node.inputs[1]
        dq = producer(w)
        if dq is None or dq.op != "DequantizeLinear" or not isinstance(dq.inputs[0], gs.Constant) \
                or not isinstance(dq.inputs[1], gs.Constant):
            stats["skipped_not_dequantized"] += 1
            return None
        codes = np.asarray(dq.inputs[0].values).astype(np.int64)
        scale = np.asarray(dq.inputs[1].values, dtype=np.float32)
        zp = dq.inputs[2] if len(dq.inputs) > 2 else None
        if isinstance(zp, gs.Constant) and np.any(np.asarray(zp.values).astype(np.int64)):
            stats["skipped_zero_point"] += 1
            return None
        axis = int(dq.attrs.get("axis", 1)) % max(codes.ndim, 1)
        out_axis = output_axis(node, codes.ndim)
        if scale.size > 1 and axis != out_axis:
            raise UserError(f"target 'packed': node '{node.name}' ({node.op}): its weight scale runs along axis "
                            f"{axis}, but packed ops scale the output channels (axis {out_axis})")
        key = id(dq)
        if key not in cache:
            cache[key] = gs.Constant(index.unique_name(f"{node.name}.weight_packed"), pack(scheme, codes))
        packed = cache[key]
        rank = codes.ndim
        n_out = codes.shape[out_axis]
        if node.op == "Conv":
            alpha_shape = [scale.size] + [1] * (rank - 2)
        else:
            alpha_shape = [scale.size]
        alpha = gs.Constant(index.unique_name(f"{node.name}.scale"), scale.reshape(alpha_shape))
        x = node.inputs[0]
        s_in = 0.0
        src = binarized_source(x)
        if src is not None:
            x, s_in = src
            stats["binary_inputs"] += 1
        attrs: dict[str, Any] = {"shape": [int(d) for d in codes.shape], "input_scale": float(s_in)}
        if scheme in ("shift3", "shift2"):
            attrs["bits"] = FIELD_BITS[scheme]  # what `inspect --cost` reads for a Shift op's weight bits
        inputs: list[gs.Tensor] = [x, packed, alpha]
        if node.op == "Conv":
            attrs.update({k: v for k, v in node.attrs.items() if k in _CONV_ATTRS})
            bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            inputs.append(bias if bias is not None else
                          gs.Constant(index.unique_name(f"{node.name}.bias"), np.zeros(n_out, dtype=np.float32)))
        elif node.op == "Gemm":
            attrs.update({"alpha": float(node.attrs.get("alpha", 1.0)), "beta": float(node.attrs.get("beta", 1.0)),
                          "transA": int(node.attrs.get("transA", 0)), "transB": int(node.attrs.get("transB", 0))})
            c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            inputs.append(c if c is not None else
                          gs.Constant(index.unique_name(f"{node.name}.bias"), np.zeros(n_out, dtype=np.float32)))
        op = op_type(scheme, node.op)
        new = gs.Node(op, node.name, domain=DOMAIN, attrs=attrs, inputs=inputs, outputs=list(node.outputs))
        node.outputs.clear()
        node.inputs.clear()
        graph.nodes.append(self.tag(new))
        float_bytes = int(codes.size) * 4
        packed_bytes = int(packed.values.nbytes) + int(scale.nbytes)
        layers[new.name] = {"op": op, "scheme": scheme, "weight_shape": attrs["shape"],
                            "bits_per_weight": FIELD_BITS[scheme], "float_bytes": float_bytes,
                            "packed_bytes": packed_bytes, "ratio": round(float_bytes / packed_bytes, 2)}
        stats[f"lowered_{op}"] += 1
        return op
