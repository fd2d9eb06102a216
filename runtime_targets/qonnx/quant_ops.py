"""lower-qonnx-quant (qonnx target): QuantizeLinear/DequantizeLinear → QONNX ``Quant`` / ``BipolarQuant``.

Two rewrites, both exact (the lowered graph computes what the QDQ graph computes):

* **activation pair** ``x -> QuantizeLinear(s, z) -> DequantizeLinear(s, z) -> x̂`` becomes
  ``Quant(x, s, z, b; signed, narrow=0, rounding_mode=ROUND) -> x̂``. QuantizeLinear rounds half to even and
  saturates to the code type's full range; ``Quant`` with ``b`` = the code type's bits, ``signed`` = its
  signedness and ``narrow=0`` does the same, then dequantizes with the same ``s``, ``z``.
* **constant codes** ``DequantizeLinear(q, s, z[, axis]) -> Ŵ`` (weights; int32 biases likewise, as 32-bit
  ``Quant`` — Brevitas' Int32Bias convention) becomes
  ``Quant(Ŵ_f, s', z', b; signed, narrow)`` with ``Ŵ_f = (q − z)·s`` stored as float32, ``s'``/``z'``
  reshaped to broadcast along ``axis`` (``[C, 1, 1, 1]`` for a Conv weight), and ``b`` the tightest width
  holding the codes: signed codes in [lo, hi] get the smallest ``b`` with ``−2^(b−1) ≤ lo`` and
  ``hi ≤ 2^(b−1) − 1``, ``narrow = 1`` when ``lo > −2^(b−1)`` (int8 symmetric → 8 bits narrow; ternary
  codes {−1, 0, +1} → 2 bits narrow; shift codes ±2^p → the width of the largest). ``Ŵ_f / s'`` is within
  float32 rounding of an integer (|q − z| ≤ 2^16 here), so ``Quant`` returns ``(q − z)·s`` exactly.
  Codes all ±1 with zero point 0 (binary weights) become ``BipolarQuant(Ŵ_f, s')``: sign(±α) · α = ±α.
  A zero scale (an all-zero channel) is written as 1 — its float weights are 0 and stay 0.

* **binary activation** ``Where(GreaterOrEqual(x, 0), β, −β)`` (``Where(Not(Less(x, 0)), β, −β)`` before
  opset 12), as ``insert-qdq`` writes it, becomes ``BipolarQuant(x, β)``: the same sign with sign(0) = +1.

Not rewritten (counted): block-wise DequantizeLinear (no broadcastable ``Quant`` scale; the target refuses
block plans), fp8 codes, non-constant scales, Q/DQ pairs whose scales or zero points differ. A second run finds
no QuantizeLinear/DequantizeLinear left and changes nothing. Function bodies (``functions.py``) are added for
the ops used unless ``ctx.strip_function_bodies``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from qcompiler import ir
from qcompiler.core.context import CompileContext
from qcompiler.core.pass_base import Pass, PassResult
from qcompiler.ir.graph import (
    GraphIndex,
    infer_rank,
    is_onnx_op,
    remove_nodes,
    replace_input,
    scale_values,
)
from qcompiler.runtime_targets.qonnx import DOMAIN
from qcompiler.runtime_targets.qonnx.functions import ensure_functions

#: integer code types -> (bits, signed)
_INT_CODES: dict[Any, tuple[int, bool]] = {
    np.dtype(np.int8): (8, True), np.dtype(np.uint8): (8, False),
    np.dtype(np.int16): (16, True), np.dtype(np.uint16): (16, False),
    np.dtype(np.int32): (32, True),
    np.dtype(ml_dtypes.int4): (4, True), np.dtype(ml_dtypes.uint4): (4, False),
}


def tightest_bits(lo: int, hi: int, signed: bool, max_bits: int) -> tuple[int, bool]:
    """Smallest bit width (and narrow flag) whose range holds the integer codes [lo, hi]."""
    if signed:
        for b in range(2, max_bits + 1):
            half = 1 << (b - 1)
            if -half <= lo and hi <= half - 1:
                return b, lo > -half
        return max_bits, lo > -(1 << (max_bits - 1))
    for b in range(1, max_bits + 1):
        if hi <= (1 << b) - 1:
            return b, False
    return max_bits, False


def _broadcast(v: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """A per-tensor (0-d) or per-axis (1-d) parameter as a tensor broadcastable against rank ``ndim``."""
    v = np.asarray(v)
    if v.size == 1 and (axis is None or v.ndim == 0):
        return v.reshape(())
    assert axis is not None
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


class LowerQonnxQuantPass(Pass):
    """Rewrite Q->DQ pairs and DQ(codes) into QONNX Quant / BipolarQuant (exact), with ONNX function bodies."""

    name = "lower-qonnx-quant"
    requires = frozenset({"qdq"})

    def run(self, ctx: CompileContext) -> PassResult:
        graph = ctx.graph
        index = GraphIndex(graph)
        stats: Counter[str] = Counter()
        doomed: list[gs.Node] = []
        new_nodes: list[gs.Node] = []
        for node in list(graph.nodes):
            if is_onnx_op(node, "QuantizeLinear"):
                self._activation(node, index, doomed, new_nodes, stats)
        for node in list(graph.nodes):
            if is_onnx_op(node, "DequantizeLinear") and node.inputs and isinstance(node.inputs[0], gs.Constant):
                self._codes(node, index, doomed, new_nodes, stats)
            elif is_onnx_op(node, "Where") and ir.tag_of(node) == "insert-qdq":
                self._binary_activation(node, index, doomed, new_nodes, stats)
        remove_nodes(graph, doomed)
        graph.nodes.extend(new_nodes)
        used = {n.op for n in graph.nodes if n.domain == DOMAIN}
        if used and not ctx.strip_function_bodies:
            stats["function_bodies"] += ensure_functions(graph, used)
        if new_nodes:
            graph.toposort()
        left = sum(1 for n in graph.nodes if is_onnx_op(n, "QuantizeLinear", "DequantizeLinear"))
        if left:
            stats["standard_qdq_left"] = left
        return PassResult(modified=bool(new_nodes) or stats["function_bodies"] > 0, stats=stats)

    # ------------------------------------------------------------------------------------------------
    @staticmethod
    def _params(node: gs.Node) -> tuple[np.ndarray, np.ndarray | None, int | None] | None:
        """(scale, zero point or None, axis or None) when they are constants and not block-wise."""
        if int(node.attrs.get("block_size", 0) or 0):
            return None
        s = node.inputs[1] if len(node.inputs) > 1 else None
        z = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        s_values = scale_values(s)  # a constant, or insert-qdq's Mul(s_w, s_x) of an int32 bias
        if s_values is None or (z is not None and not isinstance(z, gs.Constant)):
            return None
        sv = np.asarray(s_values, dtype=np.float32)
        zv = np.asarray(z.values) if z is not None else None
        axis = int(node.attrs.get("axis", 1)) if sv.size > 1 or sv.ndim == 1 else None
        return sv, zv, axis

    def _quant(self, index: GraphIndex, base: str, x: gs.Tensor, out: gs.Tensor, scale: np.ndarray,
               zp: np.ndarray, bits: int, signed: bool, narrow: bool) -> gs.Node:
        c = [gs.Constant(index.unique_name(f"{base}_qonnx_{k}"), np.asarray(v, dtype=np.float32))
             for k, v in (("scale", scale), ("zeropt", zp), ("bitwidth", float(bits)))]
        return self.tag(gs.Node("Quant", index.unique_name(f"{base}_Quant"), domain=DOMAIN,
                                attrs={"signed": int(signed), "narrow": int(narrow), "rounding_mode": "ROUND"},
                                inputs=[x, *c], outputs=[out]))

    def _activation(self, q: gs.Node, index: GraphIndex, doomed: list[gs.Node], new: list[gs.Node],
                    stats: Counter[str]) -> None:
        params = self._params(q)
        q_out = q.outputs[0]
        if params is None or params[1] is None or index.is_graph_output(q_out):
            stats["skipped_activation_q"] += 1
            return
        scale, zp, axis = params
        assert zp is not None
        code = _INT_CODES.get(zp.dtype)
        dqs = list(q_out.outputs)
        if code is None or code[0] > 16 or not dqs:
            stats["skipped_activation_q"] += 1
            return
        for dq in dqs:
            p = self._params(dq) if is_onnx_op(dq, "DequantizeLinear") else None
            if p is None or p[1] is None or p[2] != axis or not np.array_equal(p[0], scale) \
                    or not np.array_equal(p[1], zp):
                stats["skipped_activation_q"] += 1
                return
        x = q.inputs[0]
        rank = infer_rank(x) if axis is not None else 0
        if axis is not None and rank is None:
            stats["skipped_activation_q"] += 1
            return
        ndim = int(rank or 0)
        ax = None if axis is None else (axis + ndim if axis < 0 else axis)
        outs = [dq.outputs[0] for dq in dqs]
        keep = next((o for o in outs if index.is_graph_output(o)), outs[0])
        if sum(index.is_graph_output(o) for o in outs) > 1:
            stats["skipped_activation_q"] += 1
            return
        for o in outs:
            if o is not keep:
                for consumer in list(o.outputs):
                    replace_input(consumer, o, keep)
        for dq in dqs:
            dq.outputs.clear()
        bits, signed = code
        new.append(self._quant(index, x.name, x, keep, _broadcast(scale, ndim, ax),
                               _broadcast(zp.astype(np.float32), ndim, ax), bits, signed, False))
        doomed.extend([q, *dqs])
        stats[f"quant_activation_{bits}bit"] += 1

    def _codes(self, dq: gs.Node, index: GraphIndex, doomed: list[gs.Node], new: list[gs.Node],
               stats: Counter[str]) -> None:
        codes = dq.inputs[0]
        assert isinstance(codes, gs.Constant)
        q = np.asarray(codes.values)
        code = _INT_CODES.get(q.dtype)
        params = self._params(dq)
        if code is None or params is None:
            stats["skipped_dequantize"] += 1
            return
        scale, zp, axis = params
        if axis is not None and axis < 0:
            axis += q.ndim
        z = np.zeros((), dtype=np.int64) if zp is None else zp.astype(np.int64)
        qi = q.astype(np.int64)
        zb = _broadcast(z, q.ndim, axis)
        sb = _broadcast(scale, q.ndim, axis).astype(np.float32)
        w = ((qi - zb).astype(np.float32) * sb).astype(np.float32)  # DequantizeLinear, bit for bit
        safe = np.where(sb > 0, sb, np.float32(1.0)).astype(np.float32)
        out = dq.outputs[0]
        base = codes.name.removesuffix(":q")  # insert-qdq names codes <base>:q
        w_c = gs.Constant(index.unique_name(f"{base}_float"), w)
        dq.outputs.clear()
        doomed.append(dq)
        if not np.any(z) and np.all(np.abs(qi) == 1):
            s_c = gs.Constant(index.unique_name(f"{base}_qonnx_scale"), safe)
            new.append(self.tag(gs.Node("BipolarQuant", index.unique_name(f"{base}_BipolarQuant"), domain=DOMAIN,
                                        inputs=[w_c, s_c], outputs=[out])))
            stats["bipolar_weights"] += 1
            return
        max_bits, signed = code
        if q.dtype == np.int32 and out.outputs and all(_reads_as_bias(r, out) for r in out.outputs):
            # a bias: the int32 accumulator type (Brevitas' Int32Bias convention)
            bits, narrow = 32, False
        else:
            bits, narrow = tightest_bits(int(qi.min(initial=0)), int(qi.max(initial=0)), signed, max_bits)
        new.append(self._quant(index, base, w_c, out, safe, zb.astype(np.float32), bits, signed, narrow))
        stats[f"quant_{'bias' if bits == 32 and not narrow else 'weight'}_{bits}bit"] += 1

    def _binary_activation(self, where: gs.Node, index: GraphIndex, doomed: list[gs.Node], new: list[gs.Node],
                           stats: Counter[str]) -> None:
        cond, pos, neg = where.inputs
        x = _nonnegative_test(cond)
        if x is None or not (isinstance(pos, gs.Constant) and isinstance(neg, gs.Constant)):
            stats["skipped_where"] += 1
            return
        beta, minus = np.asarray(pos.values, np.float32), np.asarray(neg.values, np.float32)
        if beta.size != 1 or minus.size != 1 or not float(beta) > 0 or float(minus) != -float(beta):
            stats["skipped_where"] += 1
            return
        out = where.outputs[0]
        where.outputs.clear()
        doomed.append(where)
        # the sign test goes too when only this Where read it
        test, t = cond.inputs[0], cond
        while len(t.outputs) == 1 and not index.is_graph_output(t):
            doomed.append(test)
            if not is_onnx_op(test, "Not"):
                break
            t = test.inputs[0]
            test = t.inputs[0]
        s_c = gs.Constant(index.unique_name(f"{x.name}_qonnx_beta"), beta.reshape(()))
        new.append(self.tag(gs.Node("BipolarQuant", index.unique_name(f"{x.name}_BipolarQuant"), domain=DOMAIN,
                                    inputs=[x, s_c], outputs=[out])))
        stats["bipolar_activations"] += 1


def _reads_as_bias(node: gs.Node, t: gs.Tensor) -> bool:
    return is_onnx_op(node, "Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is t \
        and all(u is not t for u in node.inputs[:2])


def _nonnegative_test(cond: gs.Tensor) -> gs.Tensor | None:
    """``x`` when ``cond`` is ``GreaterOrEqual(x, 0)`` or ``Not(Less(x, 0))`` (0 a scalar constant)."""
    node = cond.inputs[0] if cond.inputs else None
    if node is None:
        return None
    if is_onnx_op(node, "Not"):
        inner = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        if inner is None or not is_onnx_op(inner, "Less"):
            return None
        node = inner
    elif not is_onnx_op(node, "GreaterOrEqual"):
        return None
    x, zero = node.inputs
    if not isinstance(zero, gs.Constant) or np.asarray(zero.values).size != 1 or float(np.asarray(zero.values)) != 0:
        return None
    return x
