"""ort-dynamic-matmul (ort target): MatMul / Gemm on a run-time quantized input -> ``com.microsoft.DynamicQuantizeMatMul``.

``calibration: dynamic`` makes insert-qdq write ``DynamicQuantizeLinear(x) -> DequantizeLinear`` before the
layer (standard ONNX, the reference semantics). onnxruntime fuses that with a MatMul's int8 weight into its
``DynamicQuantizeMatMul`` kernel — but only when nothing rewrites the MatMul first: its own MatMul + Add fusion
turns a 2-D MatMul followed by a bias Add into a float Gemm, and it fuses no Gemm. So this pass writes the kernel
itself, for both:

    MatMul(DQ(DynQ(x)), DQ(Bq; s, z)) [-> Add(·, c)]           ->  DynamicQuantizeMatMul(x, Bq, s, z[, c])
    Gemm(DQ(DynQ(x)), DQ(Bq; s, z), c; transB)                 ->  DynamicQuantizeMatMul(x, Bq', s, z[, c])

``y = (q_x − z_x)·s_x · (Bq − z)·s + c`` with ``(q_x, s_x, z_x) = DynamicQuantizeLinear(x)``, what the
replaced nodes compute (int32 products instead of float ones). ``Bq'`` is the int8 codes transposed once when
``transB = 1`` (a new constant; scale and zero point unchanged: per output column either way).

Matched when: the weight is an int8 / uint8 constant, per tensor or per output column (MatMul: last axis; Gemm:
the N axis), not block-wise, 2-D; Gemm has ``alpha = 1``, ``transA = 0`` and, with C, ``beta = 1`` and a constant
C of N values (or one); a MatMul's Add is its output's only reader, adds a constant of N values and its output is
the layer's. Else the QDQ form stays (onnxruntime runs it, in float where it does not fuse it), counted under
``skipped``. A second run finds nothing.

Stats: ``dynamic_quantize_matmul``, ``bias``, ``skipped.<why>``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core.pass_base import GraphPass, PassResult
from qcompiler.ir.graph import GraphIndex, is_onnx_op, optional_input, producer
from qcompiler.runtime_targets.ort.matmulnbits import DOMAIN


def dynamic_source(t: gs.Tensor) -> gs.Tensor | None:
    """The float tensor ``x`` when ``t = DequantizeLinear(DynamicQuantizeLinear(x))`` (its three outputs as the
    DequantizeLinear's inputs), else None."""
    dq = producer(t)
    if dq is None or not is_onnx_op(dq, "DequantizeLinear") or len(dq.inputs) < 3:
        return None
    dyn = producer(dq.inputs[0])
    if dyn is None or not is_onnx_op(dyn, "DynamicQuantizeLinear") or list(dyn.outputs) != list(dq.inputs[:3]):
        return None
    return dyn.inputs[0]


def _bias_values(c: gs.Tensor | None, n: int) -> np.ndarray | None:
    if not isinstance(c, gs.Constant):
        return None
    v = np.asarray(c.values)
    if v.dtype != np.float32 or v.size not in (1, n) or (v.ndim > 1 and v.shape[:-1] != (1,) * (v.ndim - 1)):
        return None
    return np.broadcast_to(v.reshape(-1), (n,)).astype(np.float32)


class OrtDynamicMatMulPass(GraphPass):
    """MatMul / Gemm with a run-time quantized input -> com.microsoft.DynamicQuantizeMatMul."""

    name = "ort-dynamic-matmul"
    requires = frozenset({"qdq"})

    def run_graph(self, graph: gs.Graph) -> PassResult:
        index = GraphIndex(graph)
        stats: Counter[str] = Counter()
        transposed: dict[int, gs.Constant] = {}  # codes tensor -> its transpose (shared weights: one copy)
        for node in list(graph.nodes):
            if not is_onnx_op(node, "MatMul", "Gemm") or len(node.inputs) < 2 or not node.outputs:
                continue
            x = dynamic_source(node.inputs[0])
            if x is None:
                continue
            why = self._lower(node, x, graph, index, transposed, stats)
            if why is not None:
                stats[f"skipped.{why}"] += 1
        if stats["dynamic_quantize_matmul"]:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(stats["dynamic_quantize_matmul"] > 0, stats)

    def _lower(self, node: gs.Node, x: gs.Tensor, graph: gs.Graph, index: GraphIndex,
               transposed: dict[int, gs.Constant], stats: Counter[str]) -> str | None:
        wdq = producer(node.inputs[1])
        if wdq is None or not is_onnx_op(wdq, "DequantizeLinear") or not isinstance(wdq.inputs[0], gs.Constant):
            return "weight"
        codes, scale, zp = wdq.inputs[0], wdq.inputs[1], optional_input(wdq, 2)
        q = np.asarray(codes.values)
        if (q.ndim != 2 or q.dtype not in (np.int8, np.uint8) or int(wdq.attrs.get("block_size", 0))
                or not isinstance(scale, gs.Constant) or (zp is not None and not isinstance(zp, gs.Constant))):
            return "weight"
        trans_b = node.op == "Gemm" and bool(int(node.attrs.get("transB", 0)))
        n_axis = 0 if trans_b else 1
        if np.asarray(scale.values).size > 1 and int(wdq.attrs.get("axis", 1)) % 2 != n_axis:
            return "weight"
        n = q.shape[n_axis]
        out = node.outputs[0]
        absorbed: list[gs.Node] = []
        bias: np.ndarray | None = None
        if node.op == "Gemm":
            a = node.attrs
            c = optional_input(node, 2)
            if float(a.get("alpha", 1.0)) != 1.0 or int(a.get("transA", 0)):
                return "gemm_attributes"
            if c is not None:
                bias = _bias_values(c, n)
                if bias is None or float(a.get("beta", 1.0)) != 1.0:
                    return "gemm_attributes"
        elif len(out.outputs) == 1 and not index.is_graph_output(out) and is_onnx_op(out.outputs[0], "Add"):
            add = out.outputs[0]
            other = next((t for t in add.inputs if t is not out), None)
            bias = _bias_values(other, n) if len(add.inputs) == 2 else None
            if bias is not None:
                absorbed, out = [add], add.outputs[0]
        if trans_b:  # the codes transposed once (a new constant, one per weight: the DQ may have other readers)
            key = id(codes)
            if key not in transposed:
                transposed[key] = gs.Constant(index.unique_name(codes.name.removesuffix(":q") + ":qT"),
                                                    np.ascontiguousarray(q.T))
            codes = transposed[key]
        inputs: list[gs.Tensor] = [x, codes, scale, zp if zp is not None else gs.Variable.empty()]
        if bias is not None:
            inputs.append(gs.Constant(index.unique_name(f"{node.name}:bias"), bias))
            stats["bias"] += 1
        while not inputs[-1].name:
            inputs.pop()
        new = gs.Node("DynamicQuantizeMatMul", node.name, domain=DOMAIN, inputs=inputs, outputs=[out])
        for old in (node, *absorbed):
            old.inputs.clear()
            old.outputs.clear()
        graph.nodes.append(self.tag(new))
        stats["dynamic_quantize_matmul"] += 1
        return None
