"""ort-float-bias (ort and ort-qop targets): the constant Add after a float-kernel Conv / ConvTranspose folded into
its bias.

``fold-bias`` folds ``Conv(X, W) + c`` into the Conv's bias before the plan is known. A plan that turns it off
(``algorithms: {fold_bias: false}``: the ``w8a8`` preset, where folding ``c`` into the int32 bias of a
QLinearConv only rounds it) leaves every such Add — also after the Convs that do not run as integer kernels on
this target: those whose data input is not dequantized (weight-only layers, with ``requantize_conv_outputs:
false`` every Conv whose output only float ops read, and layers kept float). Their bias is float, so

    Conv(X, W, b) + c  =  Conv(X, W, b + c)          (c one value per output channel, or one for all)

holds up to float rounding, with nothing rounded to integers: one elementwise kernel per layer fewer (PP-OCRv4's
recognizer under ``w8a8``: its 28 learnable affine blocks' scalar Adds). The Conv takes over the Add's output
tensor (names downstream unchanged). Integer kernels (a dequantized data input) are left alone, as are Adds
whose constant is not per channel, shared, or not float, a Conv output read elsewhere or a graph output, and a
bias that is not a float constant only the Conv reads. Runs before ``ort-load-time-dequant`` (the weight's shape
is read from its DequantizeLinear codes). A second run finds nothing.

Stats: ``folded``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core.pass_base import GraphPass, PassResult
from qcompiler.ir.graph import (
    GraphIndex,
    absorb_bias_add,
    along_axis,
    constant_operand_reader,
    exclusive_constant,
    is_onnx_op,
    optional_input,
    out_channels,
    producer,
    remove_nodes,
)


class OrtFloatBiasPass(GraphPass):
    """The constant Add after a float-kernel Conv / ConvTranspose folded into its float bias."""

    name = "ort-float-bias"
    requires = frozenset({"qdq"})

    def run_graph(self, graph: gs.Graph) -> PassResult:
        index = GraphIndex(graph)
        stats: Counter[str] = Counter()
        doomed: list[gs.Node] = []
        for node in graph.nodes:
            if not is_onnx_op(node, "Conv", "ConvTranspose") or len(node.outputs) != 1 or len(node.inputs) < 2:
                continue
            x = producer(node.inputs[0])
            if x is not None and x.op == "DequantizeLinear":
                continue  # an integer kernel (QLinearConv): its bias is int32
            shape = _weight_shape(node.inputs[1])
            if shape is None or len(shape) < 3:
                continue
            n = out_channels(node, shape)
            found = constant_operand_reader(node.outputs[0], "Add", index)
            if found is None:
                continue
            add, c_t = found
            c = np.asarray(c_t.values)
            if not np.issubdtype(c.dtype, np.floating) or not along_axis(c.shape, n, len(shape), 1):
                continue
            b_t = optional_input(node, 2)
            if b_t is not None and not (isinstance(b_t, gs.Constant) and exclusive_constant(b_t, node, index)
                                        and np.issubdtype(np.asarray(b_t.values).dtype, np.floating)):
                continue
            b = np.zeros(n) if b_t is None else np.asarray(b_t.values, dtype=np.float64).reshape(n)
            absorb_bias_add(node, add, b, c, np.dtype(np.float32), index)
            doomed.append(add)
            stats["folded"] += 1
        remove_nodes(graph, doomed)
        return PassResult(bool(doomed), stats)


def _weight_shape(w: gs.Tensor) -> tuple[int, ...] | None:
    """The weight's shape: a float constant's, or the constant codes' of the DequantizeLinear producing it."""
    if isinstance(w, gs.Constant):
        return tuple(int(d) for d in np.asarray(w.values).shape)
    dq = producer(w)
    if dq is None or dq.op != "DequantizeLinear" or not isinstance(dq.inputs[0], gs.Constant):
        return None
    return tuple(int(d) for d in dq.inputs[0].shape)
