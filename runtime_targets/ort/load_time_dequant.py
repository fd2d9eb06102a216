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

**MatMul weights no integer kernel takes.** A MatMul whose data input is dequantized (a static 8-bit activation)
and whose weight has 4-bit codes or block-wise scales (``w4a8``'s int4 blocks of 32) has no onnxruntime kernel
for the pair (its QDQ MatMul fusions take 8-bit weights with one scale per tensor or per column): the weight's DQ
ran at every inference — all-MiniLM-L6-v2 under ``w4a8`` at 6× the float model's latency. Such a weight is
dequantized at load too; block-wise scales (block ``B`` along ``axis``, a 2-D weight whose axis is a multiple of
``B``) through a reshape to blocks::

    DequantizeLinear(q, s, z; axis=0, block_size=B)   [K, N], s / z [K/B, N]
      →  Reshape(Mul(Sub(Reshape(Cast(q), [K/B, B, N]), Cast(z')), s'), [K, N])   s' / z' reshaped [K/B, 1, N]

(``axis=1``: ``[K, N/B, B]``, ``[K, N/B, 1]``), the zero points kept as their integer codes (cast at load), so the
file grows by a few nodes only. The same values bit for bit; the float MatMul then runs with a constant
(pre-packed) weight. onnxruntime's ``WeightBiasQuantization`` (which re-quantizes a constant float weight next
to a dequantized input with its own scales) handles Gemm / Conv / ConvTranspose, not MatMul. The session holds
those weights as float, as the float model's would: at most :data:`MATMUL_LOAD_BYTES` of them (beyond, the DQs
stay: ``skipped_memory``).

Not rewritten: DQs read by a Conv / ConvTranspose / Gemm whose data input is dequantized (QLinearConv / QGemm
fuse them; and where no integer kernel exists, onnxruntime's own ``WeightBiasQuantization`` would re-quantize a
constant float weight next to a dequantized input with its own scales — the DQ keeps ours), block-wise scales of
other readers, DQs whose scale is computed in the graph, weights of a MatMul with an 8-bit weight quantized per
tensor / per column next to a dequantized input (onnxruntime's integer kernels), and weight-only MatMul weights
(left to ``lower-matmulnbits`` and onnxruntime's MatMul kernels, which keep large language-model weights small in
memory). A second run finds nothing.

Stats: ``weights`` (DQs rewritten; ``matmul_weights`` of them MatMul weights), ``skipped_integer_kernel``,
``skipped_layout``, ``skipped_memory``.
"""

from __future__ import annotations

from collections import Counter

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core.pass_base import GraphPass, PassResult
from qcompiler.ir import NO_PREPACK_BYTES
from qcompiler.ir.graph import GraphIndex, float16_scale_source, producer, remove_nodes

_FLOAT = 1  # onnx.TensorProto.FLOAT, Cast's ``to``
_FOUR_BIT = {np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4)}
#: float32 bytes of MatMul weights this pass dequantizes at load, at most (the session holds them as float)
MATMUL_LOAD_BYTES = NO_PREPACK_BYTES

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


def _matmul_on_dequantized(node: gs.Node, t: gs.Tensor) -> bool:
    """``node`` is a MatMul reading ``t`` as its weight (B) only, its data input (A) dequantized."""
    if node.op != "MatMul" or (node.domain or "") not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    a, b = node.inputs
    if b is not t or a is t:
        return False
    p = producer(a)
    return p is not None and p.op == "DequantizeLinear"


def _dtype(c: gs.Constant) -> np.dtype | None:
    """The numpy dtype of a constant's codes without reading them (an external tensor stays on disk)."""
    try:
        return np.dtype(c.dtype)
    except TypeError:
        return None


def _block_shapes(q: np.ndarray, axis: int, block: int) -> tuple[list[int], list[int]] | None:
    """(the codes' shape in blocks, the scales' broadcast shape) of a 2-D weight with ``block``-wide blocks along
    ``axis``; ``None`` when the axis is not a multiple of the block."""
    if q.ndim != 2 or block <= 0 or q.shape[axis] % block:
        return None
    k, n = (int(d) for d in q.shape)
    if axis == 0:
        return [k // block, block, n], [k // block, 1, n]
    return [k, n // block, block], [k, n // block, 1]


class OrtLoadTimeDequantPass(GraphPass):
    """Weight DequantizeLinear of float-kernel layers -> Cast/Mul that onnxruntime folds at load."""

    name = "ort-load-time-dequant"
    requires = frozenset({"qdq"})

    def run_graph(self, graph: gs.Graph) -> PassResult:
        index = GraphIndex(graph)
        stats: Counter[str] = Counter()
        doomed: list[gs.Node] = []
        added: dict[int, list[gs.Node]] = {}
        loaded = 0  # float32 bytes of MatMul weights dequantized at load so far
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
            block = int(dq.attrs.get("block_size", 0))
            # 4-bit or block-wise next to a dequantized activation: no integer kernel takes it (module docstring)
            matmul = (block > 0 or _dtype(q_c) in _FOUR_BIT) and all(_matmul_on_dequantized(n, out) for n in readers)
            if not matmul and not all(_float_kernel_reader(n, out) for n in readers):
                if any(n.op in _WEIGHT_INPUTS for n in readers):
                    stats["skipped_integer_kernel"] += 1
                continue
            s16 = float16_scale_source(s_c)
            if ((not isinstance(s_c, gs.Constant) and s16 is None)
                    or (z_c is not None and not isinstance(z_c, gs.Constant)) or (block and not matmul)):
                stats["skipped_layout"] += 1
                continue
            q = np.asarray(q_c.values)
            if matmul:
                if loaded + 4 * q.size > MATMUL_LOAD_BYTES:
                    stats["skipped_memory"] += 1
                    continue
                blocked = self._blocked(dq, q, s_c, s16, z_c, block, index) if block else None
                if block and blocked is None:
                    stats["skipped_layout"] += 1
                    continue
                loaded += 4 * q.size
                stats["matmul_weights"] += 1
                if blocked is not None:
                    added[id(dq)] = blocked
                    doomed.append(dq)
                    stats["weights"] += 1
                    continue
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

    def _blocked(self, dq: gs.Node, q: np.ndarray, s_c: gs.Tensor, s16: gs.Constant | None, z_c: gs.Tensor | None,
                 block: int, index: GraphIndex) -> list[gs.Node] | None:
        """The load-time form of a block-wise weight DQ (module docstring), its output the DQ's; ``None`` when its
        layout has no such form."""
        shapes = _block_shapes(q, int(dq.attrs.get("axis", 1)) % max(q.ndim, 1), block)
        if shapes is None:
            return None
        blocks, bcast = shapes
        q_c, out = dq.inputs[0], dq.outputs[0]
        base = q_c.name.removesuffix(":q")

        def var(role: str, shape: list[int]) -> gs.Variable:
            return gs.Variable(index.unique_name(f"{base}:{role}"), dtype=np.float32, shape=shape)

        def node(op: str, role: str, inputs: list[gs.Tensor], output: gs.Tensor, **attrs: int) -> gs.Node:
            return self.tag(gs.Node(op, index.unique_name(f"{base}:{role}"), attrs=attrs, inputs=inputs,
                                    outputs=[output]))

        qf, qb = var("f", list(q.shape)), var("fb", blocks)
        new = [node("Cast", "Cast", [q_c], qf, to=_FLOAT),
               node("Reshape", "Reshape", [qf, gs.Constant(index.unique_name(f"{base}:bshape"),
                                                          np.asarray(blocks, np.int64))], qb)]
        x: gs.Tensor = qb
        z = None if z_c is None else np.asarray(z_c.values)
        if z is not None and np.any(z.astype(np.float32)):  # the zero points stay integer codes, cast at load
            zc, zf, centered = (gs.Constant(index.unique_name(f"{base}:zpb"), z.reshape(bcast)), var("zpf", bcast),
                                var("c", blocks))
            new += [node("Cast", "CastZ", [zc], zf, to=_FLOAT), node("Sub", "Sub", [x, zf], centered)]
            x = centered
        if s16 is not None:  # scale: float16 — kept float16 in the file, cast (exactly) when the session loads
            s_b: gs.Tensor = var("sbf", bcast)
            new.append(node("Cast", "CastS", [gs.Constant(index.unique_name(f"{base}:sb"),
                                                          np.asarray(s16.values).reshape(bcast))], s_b, to=_FLOAT))
        else:
            s_b = gs.Constant(index.unique_name(f"{base}:sb"), np.asarray(s_c.values, np.float32).reshape(bcast))
        scaled = var("m", blocks)
        new.append(node("Mul", "Mul", [x, s_b], scaled))
        dq.outputs.clear()
        new.append(node("Reshape", "Unblock", [scaled, gs.Constant(index.unique_name(f"{base}:wshape"),
                                                                 np.asarray(q.shape, np.int64))], out))
        return new
