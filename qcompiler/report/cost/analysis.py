"""Graph analysis of the cost model: which op owns each stored tensor (through Q / DQ chains and the ort
target's load-time dequantization), the shapes, bits, MACs and parameters of each op, and the liveness peak of
activation memory.

Part of the cost model (:mod:`qcompiler.report.cost`, whose docstring defines the numbers).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.quant import is_code_dtype
from qcompiler.report.cost.bits import code_bits, dtype_bits, stored_bytes

log = logging.getLogger(__name__)

#: ops whose output is the same value in another representation: initializers are attributed through them
PASS_THROUGH = frozenset({"DequantizeLinear", "QuantizeLinear", "Identity"})
#: ops that do multiply-accumulate work (the rows of the cost table, with every op that owns stored bytes)
MAC_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulNBits", "MatMulInteger",
                     "MatMulIntegerToFloat", "QLinearMatMul", "QLinearConv", "ConvInteger", "QGemm",
                     "LSTM", "GRU", "RNN"})
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
#: the packed target's custom ops (domain ai.qcompiler): weight bits by op-name prefix
_PACKED_PREFIX_BITS = {"Binary": 1, "Ternary": 2, "Int3": 3, "Int2": 2}


# --------------------------------------------------------------------------------------------- analysis
def _const_values(t: Any) -> gs.Constant | None:
    """The constant behind tensor ``t``: itself, or the value of the Constant node producing it."""
    if isinstance(t, gs.Constant):
        return t
    if t is not None and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        if isinstance(v, gs.Constant):
            return v
    return None


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class _Analysis:
    def __init__(self, graph: gs.Graph, shapes: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        self.graph = graph
        self.shapes = shapes
        self.order = {id(n): i for i, n in enumerate(graph.nodes)}

    # ------------------------------------------------------------------------------ shapes of tensors
    def shape(self, t: Any) -> tuple[int, ...] | None:
        if t is None:
            return None
        c = _const_values(t)
        if c is not None:
            return tuple(int(d) for d in c.shape)
        s = self.shapes.get(t.name)
        if s is not None:
            return s[0]
        if t.shape is not None and all(isinstance(d, int) and d >= 0 for d in t.shape):
            return tuple(int(d) for d in t.shape)
        return None

    def dtype(self, t: Any) -> np.dtype | None:
        c = _const_values(t)
        if c is not None:
            return np.dtype(c.dtype)
        s = self.shapes.get(t.name)
        if s is not None:
            return s[1]
        try:  # a sequence / map value (a ZipMap's output) has no numpy dtype
            return np.dtype(t.dtype) if getattr(t, "dtype", None) is not None else None
        except TypeError:
            return None

    # ----------------------------------------------------------------------------------- bits of inputs
    def tensor_bits(self, t: Any, *, weight: bool) -> tuple[int | None, str]:
        """(bits, format) of a value read by an op: float width, DQ codes width / scheme, Q output width."""
        if t is None:
            return None, ""
        c = _const_values(t)
        if c is not None:
            dt = np.dtype(c.dtype)
            return dtype_bits(dt), dt.name
        prod = t.inputs[0] if t.inputs else None
        lt = _load_time_codes(t)
        if lt is not None:  # Cast -> [Sub] -> Mul of stored codes: the ort target's load-time dequantization
            codes_c, zp_v = lt
            width = dtype_bits(codes_c.dtype)
            if weight and np.dtype(codes_c.dtype).kind in "iu":
                bits, scheme = code_bits(np.asarray(codes_c.values), zp_v, width)
                return bits, (np.dtype(codes_c.dtype).name if scheme == "int" else scheme)
            return width, np.dtype(codes_c.dtype).name
        if prod is not None and prod.op == "DequantizeLinear":
            src = prod.inputs[0]
            codes = _const_values(src)
            if codes is not None:
                width = dtype_bits(codes.dtype)
                zp = _const_values(prod.inputs[2]) if len(prod.inputs) > 2 else None
                if weight and np.dtype(codes.dtype).kind in "iu":
                    bits, scheme = code_bits(np.asarray(codes.values), None if zp is None else
                                             np.asarray(zp.values), width)
                    return bits, (np.dtype(codes.dtype).name if scheme == "int" else scheme)
                return width, np.dtype(codes.dtype).name
            dt = self.dtype(src)
            if dt is not None:
                return dtype_bits(dt), dt.name
        dt = self.dtype(t)
        if dt is None:
            return None, ""
        return dtype_bits(dt), dt.name

    # ------------------------------------------------------------------------------------------- MACs
    def macs(self, node: gs.Node) -> int | None:
        op = node.op
        ins, outs = node.inputs, node.outputs
        y = self.shape(outs[0]) if outs else None
        try:
            if op in ("Conv", "ConvInteger", "QLinearConv"):
                w = self.shape(ins[3] if op == "QLinearConv" else ins[1])
                if y is None or w is None:
                    return None
                return _numel(y) * _numel(w[1:])
            if op == "ConvTranspose":
                x, w = self.shape(ins[0]), self.shape(ins[1])
                if x is None or w is None:
                    return None
                return _numel(x) * _numel(w[1:])
            if op in ("Gemm", "QGemm"):
                a = self.shape(ins[0])
                if y is None or a is None:
                    return None
                k = a[0] if int(node.attrs.get("transA", 0)) else a[-1]
                return _numel(y) * int(k)
            if op in ("MatMul", "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul"):
                a = self.shape(ins[0])
                if y is None or a is None:
                    return None
                return _numel(y) * int(a[-1])
            if op == "MatMulNBits":
                return None if y is None else _numel(y) * int(node.attrs.get("K", 0))
            if op in _GATES:
                x, w, r = self.shape(ins[0]), self.shape(ins[1]), self.shape(ins[2])
                if x is None or w is None or r is None:
                    return None
                layout = int(node.attrs.get("layout", 0))
                steps, batch = (x[1], x[0]) if layout else (x[0], x[1])
                dirs, gh, i_size = w
                h = r[2]
                return int(dirs) * int(steps) * int(batch) * int(gh) * (int(i_size) + int(h))
            if node.domain == "ai.qcompiler" and op.endswith(("Conv", "MatMul", "Gemm")):
                return self._packed_macs(node, y)
        except (IndexError, TypeError, ValueError):
            return None
        return 0 if op not in MAC_OPS else None

    def _packed_macs(self, node: gs.Node, y: tuple[int, ...] | None) -> int | None:
        """Custom packed ops: the reduction size from the attribute the op carries (or the weight shape)."""
        if y is None:
            return None
        attrs = node.attrs
        for key in ("weight_shape", "shape", "kernel"):
            ws = attrs.get(key)
            if isinstance(ws, (list, tuple)) and ws:
                ws = [int(v) for v in ws]
                if node.op.endswith("Conv"):
                    return _numel(y) * _numel(ws[1:])
                k = ws[1] if node.op.endswith("Gemm") and int(attrs.get("transB", 0)) else ws[0]
                return _numel(y) * int(k)
        if "K" in attrs:
            return _numel(y) * int(attrs["K"])
        return None

    # ------------------------------------------------------------------------------------------- params
    def params(self, node: gs.Node) -> int:
        if node.op in _GATES:
            return sum(_numel(s) for s in (self.shape(t) for t in node.inputs[1:3]) if s is not None)
        if node.op in MAC_OPS and node.op != "MatMulNBits" and len(node.inputs) > 1:
            w = node.inputs[3] if node.op == "QLinearConv" else node.inputs[1]
            if self._is_weight(w):
                s = self.shape(w)
                return _numel(s) if s is not None else 0
        if node.op == "MatMulNBits":
            return int(node.attrs.get("K", 0)) * int(node.attrs.get("N", 0))
        if node.domain == "ai.qcompiler":
            for key in ("weight_shape", "shape"):
                ws = node.attrs.get(key)
                if isinstance(ws, (list, tuple)) and ws:
                    return _numel([int(v) for v in ws])
        return 0

    @staticmethod
    def _is_weight(t: Any) -> bool:
        """A constant, or a DequantizeLinear of a constant (a stored, quantized weight)."""
        if _const_values(t) is not None:
            return True
        prod = t.inputs[0] if t is not None and t.inputs else None
        if prod is not None and prod.op == "DequantizeLinear" and _const_values(prod.inputs[0]) is not None:
            return True
        return _load_time_codes(t) is not None


def _codes_cast(node: gs.Node | None) -> gs.Constant | None:
    """The stored codes of ``Cast(codes -> float)`` when ``codes`` is a constant of a quantized code type."""
    if node is None or node.op != "Cast" or not node.inputs:
        return None
    c = _const_values(node.inputs[0])
    return c if c is not None and is_code_dtype(c.dtype) else None


def _scale_cast(node: gs.Node) -> bool:
    """``Cast(to float)`` of a stored float16 constant (a ``scale: float16`` weight scale): its bytes belong, like
    the scale they stand for, to the op the DequantizeLinear (or the load-time ``Mul``) feeds."""
    return (node.op == "Cast" and len(node.inputs) == 1 and int(node.attrs.get("to", 0)) == 1
            and _stored_scale(node.inputs[0]) is not None and bool(node.outputs))


def _stored_scale(t: Any) -> gs.Constant | None:
    """A float16 constant (a stored ``scale: float16``)."""
    c = _const_values(t)
    return c if c is not None and np.dtype(c.dtype) == np.float16 else None


def _scale_value(t: Any) -> bool:
    """A stored constant, or the Cast of a stored float16 scale."""
    if _const_values(t) is not None:
        return True
    p = t.inputs[0] if t is not None and getattr(t, "inputs", None) else None
    return p is not None and _scale_cast(p)


def _load_time_step(node: gs.Node) -> bool:
    """A node of the ort target's load-time dequantization ``Mul(Cast(codes) [− z'], s')`` (see
    ``runtime_targets/ort/load_time_dequant.py``): attributed, like a DequantizeLinear, to the op it feeds."""
    if _codes_cast(node) is not None:
        return True
    if node.op not in ("Sub", "Mul") or len(node.inputs) != 2 or not _scale_value(node.inputs[1]):
        return False
    src = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    return src is not None and (_codes_cast(src) is not None or (node.op == "Mul" and src.op == "Sub"
                                                                  and _load_time_step(src)))


def _scale_product(node: gs.Node) -> bool:
    """``Mul`` of two stored constants read only by DequantizeLinear nodes: an int32 bias scale ``s_w · s_x``
    computed in the graph (insert-qdq); its inputs belong, like the bias, to the op reading the dequantized bias."""
    return (node.op == "Mul" and len(node.inputs) == 2 and all(_scale_value(i) for i in node.inputs)
            and bool(node.outputs) and bool(node.outputs[0].outputs)
            and all(c.op == "DequantizeLinear" for c in node.outputs[0].outputs))


def _load_time_codes(t: Any) -> tuple[gs.Constant, np.ndarray | None] | None:
    """(codes, zero point) of a weight the load-time dequantization produces, else None."""
    mul = t.inputs[0] if t is not None and getattr(t, "inputs", None) else None
    if mul is None or mul.op != "Mul" or not _load_time_step(mul):
        return None
    src = mul.inputs[0].inputs[0]
    zp = None
    if src.op == "Sub":
        z = _const_values(src.inputs[1])
        zp = None if z is None else np.asarray(z.values)
        src = src.inputs[0].inputs[0]
    codes = _codes_cast(src)
    return None if codes is None else (codes, zp)


def _owners(graph: gs.Graph, order: dict[int, int]) -> tuple[dict[str, int], int]:
    """Stored bytes per owning node name, and bytes of stored tensors no op reads."""
    owned: dict[str, int] = defaultdict(int)
    unattributed = 0
    stored: list[tuple[Any, int]] = []  # (tensor as read by ops, bytes)
    seen: set[int] = set()
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and id(t) not in seen:
            seen.add(id(t))
            stored.append((t, stored_bytes(t.shape, t.dtype)))
    for node in graph.nodes:
        if node.op == "Constant" and node.outputs:
            v = node.attrs.get("value")
            if isinstance(v, gs.Constant):
                stored.append((node.outputs[0], stored_bytes(v.shape, v.dtype)))
            else:  # value_float(s) / value_int(s): a few bytes, kept with the graph structure
                continue
    for t, nbytes in stored:
        owner = _first_reader(t, order)
        if owner is None:
            unattributed += nbytes
        else:
            owned[owner.name] += nbytes
    return owned, unattributed


def _first_reader(t: Any, order: dict[int, int]) -> gs.Node | None:
    """The first op (topological order) reading ``t`` through Q / DQ / Identity chains."""
    best: gs.Node | None = None
    stack = [t]
    visited: set[int] = set()
    while stack:
        cur = stack.pop()
        if id(cur) in visited:
            continue
        visited.add(id(cur))
        for consumer in cur.outputs:
            if (consumer.op in PASS_THROUGH or _load_time_step(consumer) or _scale_product(consumer)
                    or _scale_cast(consumer)) and consumer.outputs:
                stack.extend(consumer.outputs)
                continue
            if best is None or order.get(id(consumer), 1 << 60) < order.get(id(best), 1 << 60):
                best = consumer
    return best


def _peak(graph: gs.Graph, ana: _Analysis) -> tuple[int | None, str | None]:
    """Liveness peak of activation bytes over the node order (see module docstring)."""
    nodes = graph.nodes
    alias: dict[str, str] = {}
    size: dict[str, int] = {}
    weightlike: set[str] = set()

    def nbytes(t: Any) -> int | None:
        s, dt = ana.shape(t), ana.dtype(t)
        if s is None or dt is None:
            return None
        return stored_bytes(s, dt)

    for node in nodes:
        if node.op == "Constant" or all(_const_values(i) is not None or i.name in weightlike
                                        for i in node.inputs if i is not None):
            weightlike.update(o.name for o in node.outputs)
            continue
        if node.op == "DequantizeLinear" and node.inputs and _const_values(node.inputs[0]) is None:
            src = node.inputs[0].name
            alias[node.outputs[0].name] = alias.get(src, src)
    graph_in = [t for t in graph.inputs if not isinstance(t, gs.Constant)]
    graph_out = {t.name for t in graph.outputs}
    tensors: dict[str, Any] = {}
    for t in graph_in:
        tensors[t.name] = t
    for node in nodes:
        for o in node.outputs:
            if o.name and o.name not in weightlike:
                tensors[o.name] = o
    unknown = 0
    for name, t in tensors.items():
        if name in alias:
            continue
        b = nbytes(t)
        if b is None:
            unknown += 1
            continue
        readers = list(t.outputs)
        if readers and t.inputs and all(c.op == "QuantizeLinear" for c in readers):  # produced, not given
            qdt = ana.dtype(readers[0].outputs[0])
            if qdt is not None:
                s = ana.shape(t)
                b = stored_bytes(s or (), qdt)
        size[name] = b
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    end = len(nodes)
    for t in graph_in:
        first[t.name] = -1
        last[t.name] = -1
    for i, node in enumerate(nodes):
        for o in node.outputs:
            name = alias.get(o.name, o.name)
            if name in size:
                first.setdefault(name, i)
                last[name] = max(last.get(name, i), i)
        for inp in node.inputs:
            if inp is None or not inp.name:
                continue
            name = alias.get(inp.name, inp.name)
            if name in size:
                last[name] = max(last.get(name, i), i)
    for name in graph_out:
        if alias.get(name, name) in size:
            last[alias.get(name, name)] = end
    delta = np.zeros(end + 3, dtype=np.int64)
    for name, b in size.items():
        if name not in first:
            continue
        start = first[name] + 1  # shift by one: graph inputs live from slot 0
        stop = max(last.get(name, first[name]), first[name]) + 1
        delta[start] += b
        delta[stop + 1] -= b
    live = np.cumsum(delta)
    if unknown:
        log.info("cost: %d activation tensor(s) of unknown size left out of the peak", unknown)
    if not size:
        return 0, None
    i = int(np.argmax(live))
    at = "graph inputs" if i == 0 else (nodes[i - 1].name if 0 < i <= len(nodes) else "graph outputs")
    return int(live[i]), at


def _node_bits(node: gs.Node, ana: _Analysis) -> tuple[int | None, str, int | None]:
    """(weight bits, weight format, activation bits) of a MAC op."""
    ins = node.inputs
    if node.op == "MatMulNBits":
        a_bits, _ = ana.tensor_bits(ins[0], weight=False)
        return int(node.attrs.get("bits", 4)), f"int{int(node.attrs.get('bits', 4))}-block", a_bits
    if node.domain == "ai.qcompiler":
        prefix = next((p for p in _PACKED_PREFIX_BITS if node.op.startswith(p)), None)
        w_bits: int | None
        if prefix is not None:
            w_bits = _PACKED_PREFIX_BITS[prefix]
        elif node.op.startswith("Shift"):
            w_bits = int(node.attrs.get("bits", 4))
        else:
            w_bits, _ = ana.tensor_bits(ins[1] if len(ins) > 1 else None, weight=True)
        a_bits, _ = ana.tensor_bits(ins[0], weight=False)
        if float(node.attrs.get("input_scale", 0.0) or 0.0) > 0.0:
            a_bits = 1  # XNOR layer: the op binarizes its input
        return w_bits, f"packed-{(prefix or node.op[:5]).lower()}", a_bits
    if node.op == "QLinearConv" or node.op == "QLinearMatMul":
        w_bits, fmt = ana.tensor_bits(ins[3], weight=True)
        a_bits, _ = ana.tensor_bits(ins[0], weight=False)
        return w_bits, fmt, a_bits
    w = ins[1] if len(ins) > 1 else None
    is_weight = w is not None and _Analysis._is_weight(w)
    w_bits, fmt = ana.tensor_bits(w, weight=is_weight)
    a_bits, _ = ana.tensor_bits(ins[0] if ins else None, weight=False)
    if not is_weight:
        fmt = "activation"
    return w_bits, fmt, a_bits
