"""ort-fp8-relu-guard (ort target): keep ReLU/Clip semantics in front of fp8 QuantizeLinear.

onnxruntime's CPU graph optimizer fuses ``Relu -> QuantizeLinear`` (and ``Clip -> QuantizeLinear``) by dropping
the activation when the zero point sits at the bottom of the quantized range. With an fp8 zero point (0, the
middle of a signed range) the ReLU is dropped all the same, so negative values flow on (measured: a Conv
fixture's output SQNR fell from 23 dB to −6 dB). This pass re-applies the activation after the
DequantizeLinear: ``R = Relu(X) -> Q -> DQ -> Relu -> consumers``. For the unfused graph the extra ReLU is
exact (DQ of codes of non-negative values is non-negative); for the fused graph it restores the clamp.
"""

from __future__ import annotations

from collections import Counter

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core.pass_base import GraphPass, PassResult

_FP8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))


class OrtFp8ReluGuardPass(GraphPass):
    """Re-apply ReLU/Clip after fp8 DequantizeLinear (works around onnxruntime's Relu->Q fusion)."""

    name = "ort-fp8-relu-guard"
    requires = frozenset({"qdq"})

    def run_graph(self, graph: gs.Graph) -> PassResult:
        stats: Counter[str] = Counter()
        for q in list(graph.nodes):
            if q.op != "QuantizeLinear" or len(q.inputs) < 3 or not isinstance(q.inputs[2], gs.Constant):
                continue
            if q.inputs[2].values.dtype not in _FP8:
                continue
            src = q.inputs[0].inputs[0] if q.inputs[0].inputs else None
            if src is None or src.op not in ("Relu", "Clip"):
                continue
            for dq in list(q.outputs[0].outputs):
                if dq.op != "DequantizeLinear":
                    continue
                out = dq.outputs[0]
                if any(c.op == src.op and c.name.endswith("_fp8_guard") for c in out.outputs):
                    continue  # already guarded
                guarded = gs.Variable(out.name + "_guarded", dtype=out.dtype, shape=out.shape)
                for consumer in list(out.outputs):
                    for i, t in enumerate(consumer.inputs):
                        if t is out:
                            consumer.inputs[i] = guarded
                extra = list(src.inputs[1:]) if src.op == "Clip" else []
                graph.nodes.append(self.tag(gs.Node(src.op, f"{dq.name}_fp8_guard", attrs=dict(src.attrs),
                                                    inputs=[out, *extra], outputs=[guarded])))
                stats["guarded"] += 1
        return PassResult(modified=stats["guarded"] > 0, stats=stats)
