"""ort-load-time-dequant (ort target): weights of float kernels dequantized once, when the session loads.

A weight-only layer (int weight codes, float activations: a Conv / ConvTranspose / Gemm whose data input is not
dequantized, or the W / R inputs of LSTM / GRU / RNN) reads its weight through ``DequantizeLinear``. onnxruntime
keeps every DequantizeLinear out of constant folding (its QDQ fusions need them), so such a DQ runs at every
inference and the float kernel sees a non-constant weight: no weight pre-packing (the NCHWc convolution, the
packed GEMM), measured 1.8× slower than the float model on PP-OCR's depthwise convolutions.

This pass writes the same dequantization with ops onnxruntime does fold at session start:

    DequantizeLinear(q, s, z; axis)  =  (q − z) · s           (float32, s broadcast along ``axis``)
      →  Mul(Cast(q, float), s')                              when z is absent or all zero
      →  Mul(Sub(Cast(q, float), z'), s')                     otherwise

with ``s'`` / ``z'`` the scale / zero point as float32 constants shaped to broadcast along ``axis`` (``[C, 1, …]``);
a ``scale: float16`` weight (``DequantizeLinear(q, Cast(s16))``) keeps its float16 scale, reshaped, as
``Cast(s16', to float)`` (folded at load too: the same float32 values).
Exact: every int8 / int16 / int4 / fp8 code converts to float32 exactly, ``q − z`` too, and one float32 multiply
rounds as DequantizeLinear's does — bit-identical weights. The file keeps the integer codes (same bytes, plus
a few nodes); the session holds the float weights, as it would for the float model.

Not rewritten: DQs read by a Conv / ConvTranspose / Gemm whose data input is dequantized (QLinearConv / QGemm
fuse them; and where no integer kernel exists, onnxruntime's own ``WeightBiasQuantization`` would re-quantize a
constant float weight next to a dequantized input with its own scales — the DQ keeps ours), block-wise scales, DQs whose scale is computed in the graph, and weights of
MatMul (left to ``lower-matmulnbits`` and onnxruntime's MatMul kernels, which keep large language-model weights
small in memory). A second run finds nothing.

Stats: ``weights`` (DQs rewritten), ``skipped_integer_kernel``, ``skipped_layout``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core.pass_base import GraphPass, PassResult
from qcompiler.ir.graph import GraphIndex, float16_scale_source, producer, remove_nodes

_FLOAT = 1  # onnx.TensorProto.FLOAT, Cast's ``to``

#: op -> input indices read as weights by a float kernel
_WEIGHT_INPUTS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (1,), "LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2)}


def _float_kernel_reader(node: gs.Node, t: gs.Tensor) -> bool:
    """``node`` reads ``t`` only as a weight, and its data input is not dequantized (a weight-only layer), or
    it is a recurrent op (weight-only on this target)."""
    idx = _WEIGHT_INPUTS.get(node.op)
    if idx is None or (node.domain or "") not in ("", "ai.onnx"):
        return False
    if any(x is t for i, x in enumerate(node.inputs) if i not in idx):
        return False
    if node.op in ("LSTM", "GRU", "RNN"):
        return True
    x = node.inputs[0] if node.inputs else None
    p = producer(x) if x is not None else None
    return p is None or p.op != "DequantizeLinear"


class OrtLoadTimeDequantPass(GraphPass):
    """Weight DequantizeLinear of float-kernel layers -> Cast/Mul that onnxruntime folds at load."""

    name = "ort-load-time-dequant"
    requires = frozenset({"qdq"})

    def run_graph(self, graph: gs.Graph) -> PassResult:
        index = GraphIndex(graph)
        stats: Counter[str] = Counter()
        doomed: list[gs.Node] = []
        added: dict[int, list[gs.Node]] = {}
        for dq in graph.nodes:
            if dq.op != "DequantizeLinear" or len(dq.outputs) != 1:
                continue
            q_c, s_c = dq.inputs[0], dq.inputs[1]
            z_c = dq.inputs[2] if len(dq.inputs) > 2 and dq.inputs[2].name else None
            if not isinstance(q_c, gs.Constant):
                continue  # an activation
            out = dq.outputs[0]
            readers = list(out.outputs)
            if not readers or index.is_graph_output(out):
                continue
            if not all(_float_kernel_reader(n, out) for n in readers):
                if any(n.op in _WEIGHT_INPUTS for n in readers):
                    stats["skipped_integer_kernel"] += 1
                continue
            s16 = float16_scale_source(s_c)
            if ((not isinstance(s_c, gs.Constant) and s16 is None)
                    or (z_c is not None and not isinstance(z_c, gs.Constant)) or int(dq.attrs.get("block_size", 0))):
                stats["skipped_layout"] += 1
                continue
            q = np.asarray(q_c.values)
            s = np.asarray(s16.values if s16 is not None else s_c.values, dtype=np.float16 if s16 is not None
                           else np.float32)
            z = None if z_c is None else np.asarray(z_c.values)
            shape = [1] * q.ndim
            if s.ndim == 1 and s.size > 1:
                axis = int(dq.attrs.get("axis", 1))
                shape[axis % q.ndim] = s.size
            base = q_c.name.removesuffix(":q")
            new: list[gs.Node] = []
            qf = gs.Variable(index.unique_name(f"{base}:f"), dtype=np.float32, shape=list(q.shape))
            new.append(gs.Node("Cast", index.unique_name(f"{base}:Cast"), attrs={"to": _FLOAT},
                               inputs=[q_c], outputs=[qf]))
            if z is not None and np.any(z.astype(np.float32)):
                zf = gs.Constant(index.unique_name(f"{base}:zpf"), z.astype(np.float32).reshape(shape if z.ndim else ()))
                centered = gs.Variable(index.unique_name(f"{base}:c"), dtype=np.float32, shape=list(q.shape))
                new.append(gs.Node("Sub", index.unique_name(f"{base}:Sub"), inputs=[qf, zf], outputs=[centered]))
                qf = centered
            s_b: gs.Tensor = gs.Constant(index.unique_name(f"{base}:sb"), s.reshape(shape if s.ndim else ()))
            if s16 is not None:  # scale: float16 — kept float16 in the file, cast (exactly) when the session loads
                s16_b, s_b = s_b, gs.Variable(index.unique_name(f"{base}:sbf"), dtype=np.float32,
                                              shape=list(s.reshape(shape if s.ndim else ()).shape))
                new.append(gs.Node("Cast", index.unique_name(f"{base}:CastS"), attrs={"to": _FLOAT},
                                   inputs=[s16_b], outputs=[s_b]))
            dq.outputs.clear()
            new.append(gs.Node("Mul", index.unique_name(f"{base}:Mul"), inputs=[qf, s_b], outputs=[out]))
            for n in new:
                self.tag(n)
            added[id(dq)] = new
            doomed.append(dq)
            stats["weights"] += 1
        if not doomed:
            return PassResult(False, stats)
        nodes: list[gs.Node] = []
        for n in graph.nodes:
            nodes += added.get(id(n), [])
            nodes.append(n)
        graph.nodes = nodes
        remove_nodes(graph, doomed)
        graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(True, stats)
