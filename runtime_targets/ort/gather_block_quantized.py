"""ort-gather-block-quantized (ort target): quantized embedding lookups, as onnxruntime runs them fastest.

Matches ``Gather(DequantizeLinear(Eq, s[, z]), ids)`` (gather axis 0) where the DequantizeLinear reads constant
codes of a 2-D table ``[V, D]`` and only Gathers read it (``insert-qdq`` writes this for a quantized table):

* int8 codes, one scale per row (``axis=0``, ``s`` ``[V]``);
* int4 codes, one scale per block of ``B`` along the row (``axis=1``, ``block_size=B``, ``s`` ``[V, D/B]``,
  ``B`` a power of two >= 16, ``D`` a multiple of ``B``);
* int4 / uint4 codes, one scale per row (``axis=0``, ``s`` ``[V]``: ``w4a8``'s per-channel default on a table),
  dequantized at load only (as GatherBlockQuantized they are left to the DequantizeLinear: ``skipped_layout``).
  Before, that DequantizeLinear ran on the whole table at every inference: all-MiniLM-L6-v2's 30522 x 384 word
  embeddings under ``w4a8``, most of its 6x the float model's latency.

What it writes depends on the plan option ``targets: {ort: {gather_block_quantized: ...}}``:

* ``false`` (the default): the table is dequantized once, when the session loads — ``Mul(Cast(Eq, float), s')``
  (int8 per row, ``s'`` ``[V, 1]``; a zero point ``z`` adds ``Sub(·, z')``) or ``Reshape(Mul(Reshape(Cast(Eq),
  [V, D/B, B]), s'[V, D/B, 1]), [V, D])`` (int4 blocks): ops onnxruntime folds into a float constant at session
  start, where it runs every DequantizeLinear at every inference (it keeps DQs out of constant folding). The
  lookup then runs at the float Gather's speed; the file keeps the integer codes, the session the float table.
* ``true``: ``com.microsoft.GatherBlockQuantized`` (onnxruntime >= 1.22 for 8-bit codes), which keeps the table
  quantized in memory: uint8 codes ``u = q + 128`` with ``bits=8`` (default zero point 128) and one block per
  row (``block_size`` = D rounded up to a power of two >= 16, scales ``[V, 1]``), or for int4 ``u = q + 8``
  packed two per byte, low nibble first (``bits=4``, default zero point 8; explicit zero points packed the
  same way), scales ``[V, D/B]``. Output = ``(u − z_u) · s`` = ``(q − z) · s``, bit for bit the
  DequantizeLinear → Gather result.

Measured (``benchmarks/gather_quantized.py``, onnxruntime 1.32 CPU, 1 thread, median ms): a 4000 x 128 table,
128 ids: float Gather 0.006–0.008, GatherBlockQuantized int8 0.011–0.016, packed int4 0.031, DequantizeLinear
→ Gather int8 0.06–0.08, int4 0.88; 30522 x 384 (BERT), 8 x 512 ids: float 0.38–0.45, GatherBlockQuantized
int8 1.4–2.1, packed int4 8.7, DequantizeLinear → Gather int8 10.8, int4 44. GatherBlockQuantized is never as
fast as the float Gather, so the default dequantizes at load (float speed); ``true`` trades 2–20x lookup time
(microseconds per token) for a table 4–8x smaller in memory.

``scale: float16`` (the DequantizeLinear reads ``Cast(s16)``): dequantized at load, the scale stays float16 in the
file (``Cast(s16')``, folded at load); as GatherBlockQuantized, whose scales have the output's type, the scales are
written as float32 (the same values: the cast is exact) — 2 bytes more per scale than the QDQ form.

Not rewritten: a table another op reads too (a tied output projection reads the same DequantizeLinear: it stays
standard QDQ, stat ``skipped_shared``), other layouts (``skipped_layout``). A second run finds nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core.context import CompileContext
from qcompiler.core.pass_base import Pass, PassResult
from qcompiler.ir.graph import GraphIndex, float16_scale_source, remove_nodes

DOMAIN = "com.microsoft"
_FLOAT = 1  # onnx.TensorProto.FLOAT, Cast's ``to``
_INT4 = (np.dtype(ml_dtypes.int4),)
_FOUR_BIT = (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4))


@dataclass
class _Table:
    dq: gs.Node
    q: np.ndarray
    s: np.ndarray
    z: np.ndarray | None
    block: int  # 0: one scale per row
    f16: bool = False  # scale: float16 (the DQ reads Cast(s16)): s holds its float32 values


def _pack(u: np.ndarray) -> np.ndarray:
    """uint values 0..15 along the last axis (even length) -> two per byte, low nibble first."""
    u = u.astype(np.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def gbq_int8(q: np.ndarray, s: np.ndarray, z: np.ndarray | None) -> tuple[np.ndarray, np.ndarray,
                                                                            np.ndarray | None, int]:
    """GatherBlockQuantized data (uint8 ``q + 128``), scales ``[V, 1]``, zero points (None when all 0) and the
    block size (one block per row) of an int8 table with one scale per row."""
    v, d = q.shape
    u = (q.astype(np.int16) + 128).astype(np.uint8)
    zu = None if z is None or not np.any(z) else (np.asarray(z).astype(np.int16) + 128).astype(np.uint8).reshape(v, 1)
    return u, np.asarray(s, np.float32).reshape(v, 1), zu, max(16, 1 << (int(d) - 1).bit_length())


def gbq_int4(q: np.ndarray, s: np.ndarray, z: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GatherBlockQuantized data (uint8, ``q + 8`` two per byte), scales ``[V, D/B]`` and packed zero points
    (None when all 0) of an int4 table with block-wise scales along the row."""
    v, _ = q.shape
    u = _pack(q.astype(np.int16) + 8)
    s2 = np.asarray(s, np.float32)
    if z is None or not np.any(np.asarray(z).astype(np.int16)):
        return u, s2, None
    zu = np.asarray(z).astype(np.int16) + 8
    if zu.shape[1] % 2:
        zu = np.concatenate([zu, np.full((v, 1), 8, np.int16)], axis=1)
    return u, s2, _pack(zu)


class OrtGatherBlockQuantizedPass(Pass):
    """Quantized Gather tables: dequantized at session load (default) or com.microsoft.GatherBlockQuantized."""

    name = "ort-gather-block-quantized"
    requires = frozenset({"qdq"})

    def run(self, ctx: CompileContext) -> PassResult:
        use_gbq = bool(ctx.resolved.target_options.get("gather_block_quantized", False)) if ctx.resolved else False
        graph = ctx.graph
        index = GraphIndex(graph)
        stats: Counter[str] = Counter()
        doomed: list[gs.Node] = []
        for dq in list(graph.nodes):
            table = self._match(dq, index, stats, use_gbq)
            if table is None:
                continue
            readers = list(dq.outputs[0].outputs)
            if use_gbq:
                self._to_gbq(graph, index, table, readers)
                stats["gather_block_quantized"] += len(readers)
            else:
                self._to_load_time(graph, index, table)
                stats["dequantized_at_load"] += 1
            doomed.append(dq)
        if not doomed:
            return PassResult(False, stats)
        remove_nodes(graph, doomed)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(True, stats)

    @staticmethod
    def _match(dq: gs.Node, index: GraphIndex, stats: Counter[str], use_gbq: bool) -> _Table | None:
        if dq.op != "DequantizeLinear" or len(dq.outputs) != 1 or (dq.domain or "") not in ("", "ai.onnx"):
            return None
        out = dq.outputs[0]
        readers = list(out.outputs)
        q_c, s_c = dq.inputs[0], dq.inputs[1]
        z_c = dq.inputs[2] if len(dq.inputs) > 2 and dq.inputs[2].name else None
        if not readers or not isinstance(q_c, gs.Constant) or not any(n.op == "Gather" for n in readers):
            return None
        if index.is_graph_output(out) or not all(
                n.op == "Gather" and n.inputs[0] is out and int(n.attrs.get("axis", 0)) == 0
                and not any(t is out for t in n.inputs[1:]) for n in readers):
            stats["skipped_shared"] += 1
            return None
        q = np.asarray(q_c.values)
        s16 = float16_scale_source(s_c)
        if ((not isinstance(s_c, gs.Constant) and s16 is None)
                or (z_c is not None and not isinstance(z_c, gs.Constant)) or q.ndim != 2):
            stats["skipped_layout"] += 1
            return None
        s = np.asarray((s16 if s16 is not None else s_c).values, np.float32)
        z = None if z_c is None else np.asarray(z_c.values)
        v, d = q.shape
        axis = int(dq.attrs.get("axis", 1)) % 2
        block = int(dq.attrs.get("block_size", 0))
        if (q.dtype == np.int8 or (q.dtype in _FOUR_BIT and not use_gbq)) and not block and axis == 0 \
                and s.shape == (v,):
            return _Table(dq, q, s, z, 0, s16 is not None)
        if (q.dtype in _INT4 and axis == 1 and block >= 16 and not block & (block - 1) and d % block == 0
                and s.shape == (v, d // block)):
            return _Table(dq, q, s, z, block, s16 is not None)
        stats["skipped_layout"] += 1
        return None

    def _to_gbq(self, graph: gs.Graph, index: GraphIndex, t: _Table, readers: list[gs.Node]) -> None:
        base = t.dq.inputs[0].name.removesuffix(":q")
        if t.block:
            data, scales, zp = gbq_int4(t.q, t.s, t.z)
            bits, block = 4, t.block
        else:
            data, scales, zp, block = gbq_int8(t.q, t.s, t.z)
            bits = 8
        d_c = gs.Constant(index.unique_name(f"{base}:gbq"), data)
        s_c = gs.Constant(index.unique_name(f"{base}:gbq_s"), scales)
        z_c = None if zp is None else gs.Constant(index.unique_name(f"{base}:gbq_zp"), zp)
        for g in readers:
            inputs = [d_c, g.inputs[1], s_c, *([z_c] if z_c is not None else [])]
            new = gs.Node("GatherBlockQuantized", g.name, domain=DOMAIN,
                          attrs={"gather_axis": 0, "quantize_axis": 1, "block_size": int(block), "bits": bits},
                          inputs=inputs, outputs=list(g.outputs))
            g.outputs.clear()
            g.inputs.clear()
            graph.nodes.append(self.tag(new))

    def _to_load_time(self, graph: gs.Graph, index: GraphIndex, t: _Table) -> None:
        q_c = t.dq.inputs[0]
        out = t.dq.outputs[0]
        base = q_c.name.removesuffix(":q")
        v, d = t.q.shape
        new: list[gs.Node] = []

        def var(role: str, shape: list[int]) -> gs.Variable:
            return gs.Variable(index.unique_name(f"{base}:{role}"), dtype=np.float32, shape=shape)

        x: gs.Tensor = var("f", [v, d])
        new.append(gs.Node("Cast", index.unique_name(f"{base}:Cast"), attrs={"to": _FLOAT}, inputs=[q_c], outputs=[x]))
        shape = [v, 1] if not t.block else [v, d // t.block, 1]
        if t.block:
            blocks = var("blocks", [v, d // t.block, t.block])
            new.append(gs.Node("Reshape", index.unique_name(f"{base}:Reshape"),
                               inputs=[x, gs.Constant(index.unique_name(f"{base}:bshape"),
                                                      np.asarray([v, d // t.block, t.block], np.int64))],
                               outputs=[blocks]))
            x = blocks
        if t.z is not None and np.any(t.z.astype(np.float32)):
            centered = var("c", list(x.shape or []))
            z_f: gs.Tensor = gs.Constant(index.unique_name(f"{base}:zpf"), t.z.astype(np.float32).reshape(shape))
            if t.z.dtype in _FOUR_BIT:  # 4-bit zero points stay codes in the file, cast when the session loads
                z_c, z_f = gs.Constant(index.unique_name(f"{base}:zpb"), t.z.reshape(shape)), var("zpf", shape)
                new.append(gs.Node("Cast", index.unique_name(f"{base}:CastZ"), attrs={"to": _FLOAT}, inputs=[z_c],
                                   outputs=[z_f]))
            new.append(gs.Node("Sub", index.unique_name(f"{base}:Sub"), inputs=[x, z_f], outputs=[centered]))
            x = centered
        s_b: gs.Tensor = gs.Constant(index.unique_name(f"{base}:sb"), t.s.reshape(shape))
        if t.f16:  # kept float16 in the file, cast (exactly) when the session loads
            s16_b = gs.Constant(index.unique_name(f"{base}:sb16"), t.s.astype(np.float16).reshape(shape))
            s_b = var("sbf", shape)
            new.append(gs.Node("Cast", index.unique_name(f"{base}:CastS"), attrs={"to": _FLOAT}, inputs=[s16_b],
                               outputs=[s_b]))
        t.dq.outputs.clear()
        if t.block:
            scaled = var("scaled", list(x.shape or []))
            new.append(gs.Node("Mul", index.unique_name(f"{base}:Mul"), inputs=[x, s_b], outputs=[scaled]))
            new.append(gs.Node("Reshape", index.unique_name(f"{base}:Reshape"),
                               inputs=[scaled, gs.Constant(index.unique_name(f"{base}:shape"),
                                                           np.asarray([v, d], np.int64))], outputs=[out]))
        else:
            new.append(gs.Node("Mul", index.unique_name(f"{base}:Mul"), inputs=[x, s_b], outputs=[out]))
        for n in new:
            graph.nodes.append(self.tag(n))
