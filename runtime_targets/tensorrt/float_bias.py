"""trt-float-bias (tensorrt target): int32 bias ``DequantizeLinear`` -> float32 bias initializer.

``insert-qdq`` stores the bias of an int8 Conv / ConvTranspose / Gemm as int32 codes ``c`` read through
``DequantizeLinear(c, s_x·s_w, axis=0)`` (what onnxruntime's integer kernels fuse). TensorRT has no int32
DequantizeLinear and adds the bias in float in the fused kernel's epilogue, so the bias becomes the float32
constant ``b̂ = c · s_b`` — exactly the value the DequantizeLinear produced, so the numerics do not change.

Only a DequantizeLinear of constant int32 codes whose output is read solely as input 2 of Conv /
ConvTranspose / Gemm is folded. A second run finds no int32 DequantizeLinear and changes nothing.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core.pass_base import GraphPass, PassResult
from qcompiler.ir.graph import GraphIndex, is_onnx_op, remove_nodes, replace_input, scale_values


class TrtFloatBiasPass(GraphPass):
    """Fold int32 bias DequantizeLinear back to a float32 initializer (TensorRT adds biases in float)."""

    name = "trt-float-bias"
    requires = frozenset({"qdq"})

    def run_graph(self, graph: gs.Graph) -> PassResult:
        index = GraphIndex(graph)
        stats: Counter[str] = Counter()
        doomed: list[gs.Node] = []
        for dq in graph.nodes:
            if not is_onnx_op(dq, "DequantizeLinear") or len(dq.inputs) < 2:
                continue
            codes, sv = dq.inputs[0], scale_values(dq.inputs[1])  # a constant, or insert-qdq's Mul(s_w, s_x)
            if not isinstance(codes, gs.Constant) or sv is None:
                continue
            if np.asarray(codes.values).dtype != np.int32:
                continue
            out = dq.outputs[0]
            readers = list(out.outputs)
            if index.is_graph_output(out) or not readers or not all(
                    is_onnx_op(r, "Conv", "ConvTranspose", "Gemm") and len(r.inputs) > 2 and r.inputs[2] is out
                    and all(t is not out for t in r.inputs[:2]) for r in readers):
                stats["int32_dequantize_kept"] += 1
                continue
            zp = dq.inputs[2] if len(dq.inputs) > 2 and isinstance(dq.inputs[2], gs.Constant) else None
            z = np.asarray(zp.values, dtype=np.int64) if zp is not None else np.zeros((), np.int64)
            s = np.asarray(sv, dtype=np.float32)
            c = np.asarray(codes.values, dtype=np.int64)
            # DequantizeLinear: (c − z) · s in float32 (per-axis parameters run along axis 0 of a 1-D bias)
            b = ((c - z).astype(np.float32) * s).astype(np.float32)
            base = codes.name.removesuffix(":q")  # insert-qdq names codes <base>:q
            bias = gs.Constant(index.unique_name(f"{base}_float"), b)
            for r in readers:
                replace_input(r, out, bias)
            doomed.append(dq)
            stats["biases_float"] += 1
        remove_nodes(graph, doomed)
        return PassResult(modified=bool(doomed), stats=stats)
