"""ort-per-token-matmul (ort target): a MatMul on a per-token quantized input and an int8 weight -> integer kernel.

insert-qdq writes ``granularity: per_token`` (``calibration: dynamic``) activations as standard ONNX ops: the
row scale ``s``, the zero point ``z`` and the codes ``q`` computed at run time, then ``(Cast(q) − z)·s``
(:mod:`passes._per_token`). onnxruntime runs that form in float (it fuses no per-row scale). This pass writes
the layer as integer arithmetic instead::

    MatMul((Cast(q) − z)·s, DQ(Wq; s_w))  ->  Mul(Mul(Cast<float>(MatMulInteger(q, Wq) − Cast<int32>(z)·Σ_k Wq[k, :]), s), s_w)

``Σ_k (q_k − z)·Wq[k, n] = (q·Wq)[n] − z·Σ_k Wq[k, n]``: ``MatMulInteger`` takes no per-row zero point in
onnxruntime, so it multiplies the raw codes and the zero point's share is taken off in int32 (a constant column
sum of the codes times each row's ``z``); the products are exact in int32 and scaled once per row and column —
what the replaced nodes compute, up to float rounding.

Only uint8 (asymmetric) codes: onnxruntime has a fast u8 x s8 kernel, but its s8 x s8 ``MatMulInteger`` ran the
ViT 3.2x slower than float (1 thread), slower than the reference form, so int8 per-token codes keep that form.

Matched when the codes are uint8 and the weight is a 2-D int8 constant read through ``DequantizeLinear`` with a zero point that is absent
or all zero, per tensor or per output column (axis 1), not block-wise. Else the reference form stays, counted
under ``skipped``. The per-token nodes stay when another op also reads the dequantized tensor. A second run finds
nothing (no MatMul reads the form any more).

Stats: ``per_token_matmul``, ``skipped.<why>``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core.pass_base import GraphPass, PassResult
from qcompiler.ir import tag_of
from qcompiler.ir.graph import GraphIndex, is_onnx_op, optional_input, producer
from qcompiler.quant import PER_TOKEN_SUFFIXES

_Q, _S, _Z = PER_TOKEN_SUFFIXES
_INT32, _FLOAT = 6, 1  # TensorProto element types


@dataclass
class PerTokenParts:
    """The pieces of insert-qdq's per-token form, read back from its dequantized output."""

    codes: gs.Tensor  # uint8 / int8 [..., K]
    scale: gs.Tensor  # float [..., 1]
    zero_point: gs.Tensor | None  # float [..., 1] (asymmetric)


def per_token_parts(dq: gs.Tensor) -> PerTokenParts | None:
    """The per-token form whose dequantized output is ``dq`` (``Mul(Cast(q) [− z], s)`` written by insert-qdq),
    or None."""
    mul = producer(dq)
    if mul is None or not is_onnx_op(mul, "Mul") or tag_of(mul) != "insert-qdq" or len(mul.inputs) != 2:
        return None
    centered, s = mul.inputs
    node = producer(centered)
    if not s.name.endswith(_S) or node is None:
        return None
    z = None
    if is_onnx_op(node, "Sub") and tag_of(node) == "insert-qdq":
        z = node.inputs[1]
        node = producer(node.inputs[0])
        if not z.name.endswith(_Z) or node is None:
            return None
    if not is_onnx_op(node, "Cast") or tag_of(node) != "insert-qdq":
        return None
    q = node.inputs[0]
    if not q.name.endswith(_Q):
        return None
    return PerTokenParts(q, s, z)


class OrtPerTokenMatMulPass(GraphPass):
    """MatMul on a per-token quantized input and an int8 weight -> MatMulInteger with row and column scales."""

    name = "ort-per-token-matmul"
    requires = frozenset({"qdq"})

    def run_graph(self, graph: gs.Graph) -> PassResult:
        index = GraphIndex(graph)
        stats: Counter[str] = Counter()
        colsums: dict[int, gs.Constant] = {}  # codes tensor -> its column sums (shared weights: one copy)
        for node in list(graph.nodes):
            if not is_onnx_op(node, "MatMul") or len(node.inputs) != 2 or not node.outputs:
                continue
            parts = per_token_parts(node.inputs[0])
            if parts is None:
                continue
            if parts.zero_point is None:  # int8 codes: onnxruntime's s8 x s8 MatMulInteger is 4x slower than float
                stats["skipped.int8_codes"] += 1
                continue
            why = self._lower(node, parts, graph, index, colsums, stats)
            if why is not None:
                stats[f"skipped.{why}"] += 1
        if stats["per_token_matmul"]:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(stats["per_token_matmul"] > 0, stats)

    def _lower(self, node: gs.Node, parts: PerTokenParts, graph: gs.Graph, index: GraphIndex,
               colsums: dict[int, gs.Constant], stats: Counter[str]) -> str | None:
        wdq = producer(node.inputs[1])
        if wdq is None or not is_onnx_op(wdq, "DequantizeLinear") or not isinstance(wdq.inputs[0], gs.Constant):
            return "weight"
        codes, w_scale, w_zp = wdq.inputs[0], wdq.inputs[1], optional_input(wdq, 2)
        q = np.asarray(codes.values)
        if (q.ndim != 2 or q.dtype != np.int8 or int(wdq.attrs.get("block_size", 0))
                or not isinstance(w_scale, gs.Constant)):
            return "weight"
        if w_zp is not None and (not isinstance(w_zp, gs.Constant) or np.any(np.asarray(w_zp.values) != 0)):
            return "weight_zero_point"
        if np.asarray(w_scale.values).size > 1 and int(wdq.attrs.get("axis", 1)) % 2 != 1:
            return "weight"
        base = node.name
        new: list[gs.Node] = []

        def var(role: str, dtype: object) -> gs.Variable:
            return gs.Variable(index.unique_name(f"{base}:{role}"), dtype=dtype)

        acc = var("acc", np.int32)
        new.append(gs.Node("MatMulInteger", index.unique_name(f"{base}:MatMulInteger"),
                           inputs=[parts.codes, codes], outputs=[acc]))
        if parts.zero_point is not None:
            key = id(codes)
            if key not in colsums:
                colsums[key] = gs.Constant(index.unique_name(f"{codes.name}:colsum"),
                                           q.astype(np.int32).sum(axis=0, dtype=np.int32))
            z32, corr, exact = var("zp_i32", np.int32), var("zp_term", np.int32), var("acc_centered", np.int32)
            new += [gs.Node("Cast", index.unique_name(f"{base}:zp_Cast"), attrs={"to": _INT32},
                            inputs=[parts.zero_point], outputs=[z32]),
                    gs.Node("Mul", index.unique_name(f"{base}:zp_Mul"), inputs=[z32, colsums[key]], outputs=[corr]),
                    gs.Node("Sub", index.unique_name(f"{base}:zp_Sub"), inputs=[acc, corr], outputs=[exact])]
            acc = exact
        accf, rows = var("acc_f", np.float32), var("row_scaled", np.float32)
        new += [gs.Node("Cast", index.unique_name(f"{base}:acc_Cast"), attrs={"to": _FLOAT}, inputs=[acc],
                        outputs=[accf]),
                gs.Node("Mul", index.unique_name(f"{base}:row_Mul"), inputs=[accf, parts.scale], outputs=[rows]),
                gs.Node("Mul", index.unique_name(f"{base}:col_Mul"), inputs=[rows, w_scale],
                        outputs=[node.outputs[0]])]
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes.extend(self.tag(n) for n in new)
        stats["per_token_matmul"] += 1
        return None
