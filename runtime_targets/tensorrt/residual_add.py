"""trt-residual-add (tensorrt target): Q/DQ placement at residual Adds, as TensorRT fuses them.

TensorRT fuses ``Conv -> Add(residual) [-> ReLU]`` into one kernel whose epilogue adds the residual — when the
Conv's output reaches the Add *unquantized* and the residual (skip-branch) input is read through a
DequantizeLinear ("quantize the residual input", TensorRT's Q/DQ placement recommendations; a Q/DQ pair
between the Conv and the Add splits the fusion and costs an extra int8 round trip). The target asks for Q/DQ on
the skip input when the plan is resolved (``TensorRTTarget.output_tensors``); this pass handles the rest, for
each residual Add whose main input comes from a quantized Conv / ConvTranspose / Gemm / MatMul:

* a Q/DQ pair on the main input (present when a plan rule quantizes the Add's inputs) is bypassed: the Add
  reads the Conv output directly (the pair is dropped when nothing else reads it) — ``main_qdq_removed``;
* ``residual_quantized`` counts Adds whose skip input is read through a DequantizeLinear, ``residual_float``
  those where it is not (no calibration range for it).

A second run finds no Q/DQ on a main input and changes nothing.
"""

from __future__ import annotations

from collections import Counter

import onnx_graphsurgeon as gs

from qcompiler.core.pass_base import GraphPass, PassResult
from qcompiler.ir.graph import GraphIndex, is_onnx_op, producer, remove_nodes, replace_input
from qcompiler.runtime_targets.tensorrt import FUSING_OPS, depths


def quantized_weighted_op(node: gs.Node | None) -> bool:
    """A Conv / ConvTranspose / Gemm / MatMul whose activation and weight are both read through DQ."""
    if node is None or not is_onnx_op(node, *FUSING_OPS) or len(node.inputs) < 2:
        return False
    return all(is_onnx_op(producer(t) or gs.Node("?"), "DequantizeLinear") for t in node.inputs[:2])


def through_qdq(t: gs.Tensor) -> tuple[gs.Node, gs.Node] | None:
    """(Q, DQ) when ``t`` is ``DequantizeLinear(QuantizeLinear(x))``."""
    dq = producer(t)
    if dq is None or not is_onnx_op(dq, "DequantizeLinear"):
        return None
    q = producer(dq.inputs[0])
    if q is None or not is_onnx_op(q, "QuantizeLinear"):
        return None
    return q, dq


class TrtResidualAddPass(GraphPass):
    """Keep the Conv side of residual Adds unquantized (TensorRT fuses the Add into the Conv epilogue)."""

    name = "trt-residual-add"
    requires = frozenset({"qdq"})

    def run_graph(self, graph: gs.Graph) -> PassResult:
        index = GraphIndex(graph)
        stats: Counter[str] = Counter()
        bypassed: list[tuple[gs.Node, gs.Node]] = []
        depth: dict[int, int] | None = None
        for add in graph.nodes:
            if not is_onnx_op(add, "Add") or len(add.inputs) != 2 or any(isinstance(t, gs.Constant)
                                                                          for t in add.inputs):
                continue
            sides = []
            for i, t in enumerate(add.inputs):
                pair = through_qdq(t)
                src = producer(pair[0].inputs[0]) if pair else producer(t)
                sides.append((i, t, pair, src))
            mains = [s for s in sides if quantized_weighted_op(s[3])]
            if not mains:
                continue
            if len(mains) == 2:
                # both sides are Conv outputs: one already unquantized is the main branch, else the deeper one
                plain = [s for s in mains if s[2] is None]
                if plain:
                    mains = plain[:1]
                else:
                    depth = depth if depth is not None else depths(graph)
                    mains.sort(key=lambda s: -depth[id(s[3])])
            i, t, pair, src = mains[0]
            other = sides[1 - i]
            if pair is not None:
                q, dq = pair
                conv_out = q.inputs[0]
                if len(conv_out.outputs) != 1 or index.is_graph_output(conv_out):
                    continue  # the Conv output is read elsewhere too: not a fusable residual Add
                replace_input(add, t, conv_out)
                bypassed.append((q, dq))
                stats["main_qdq_removed"] += 1
            other_dq = producer(other[1])
            stats["residual_quantized" if other_dq is not None and is_onnx_op(other_dq, "DequantizeLinear")
                  else "residual_float"] += 1
        doomed: list[gs.Node] = []
        for q, dq in bypassed:
            if dq.outputs[0].outputs or index.is_graph_output(dq.outputs[0]):
                continue
            doomed.append(dq)
            if all(c is dq for c in q.outputs[0].outputs) and not index.is_graph_output(q.outputs[0]):
                doomed.append(q)
        remove_nodes(graph, doomed)
        return PassResult(modified=stats["main_qdq_removed"] > 0, stats=stats)
