"""lower-qoperator (ort-qop target): QDQ groups rewritten as onnxruntime's integer operators (QOperator format).

insert-qdq places QuantizeLinear / DequantizeLinear the way onnxruntime's CPU provider fuses them (target ``ort``).
This pass does that fusion ahead of time and writes the integer operators into the file:

====================================================================  =========================================
matched (``xq`` integer activation, ``W``/``b`` integer constants)     written
====================================================================  =========================================
``DQ(xq), DQ(W)[, DQ(b)] -> Conv [-> Relu|Clip] -> Q -> yq``           ``QLinearConv(xq, W, b) -> yq``
``DQ(xq), DQ(W) -> MatMul [-> Relu|Clip] -> Q -> yq``                  ``QLinearMatMul(xq, W) -> yq``
``DQ(xq), DQ(W) -> MatMul -> y`` (float readers)                       ``com.microsoft.MatMulIntegerToFloat -> y``
``DQ(aq), DQ(bq) -> MatMul ...`` (two activations a plan quantizes)    the same two, ``b`` per tensor
``DynQ(a) -> DQ, DynQ(b) -> DQ -> MatMul`` (``calibration: dynamic``)  ``MatMulIntegerToFloat`` (run-time scales)
``DQ(xq), DQ(W)[, DQ(b)] -> Gemm [-> Relu|Clip -> Q -> yq]``           ``com.microsoft.QGemm -> yq`` (or float y)
====================================================================  =========================================

with the scales and zero points of the DequantizeLinear / QuantizeLinear nodes passed on unchanged. The math
each op computes is the QDQ group's: ``y = (Σ (xq − zx)(Wq − zw) + bq) · sx·sw``, then ``yq = sat(round(y/sy) +
zy)`` — in 32-bit integer accumulation where the QDQ reference sums dequantized floats; onnxruntime computes
the QDQ graph with exactly these kernels once it has fused it, so the outputs equal those of the ``ort`` target
run with onnxruntime's optimizations (tested code for code).

Conditions (else the group stays QDQ, which onnxruntime still runs, counted in the stats): the activation is
int8 / uint8 per tensor with a constant scale and zero point; the weight is an int8 / uint8 constant per tensor
or per output channel (Conv: axis 0; MatMul: the last axis; Gemm: the axis of N) with one zero point for all
channels (onnxruntime's kernels take one), and not uint8 under int8 activations (no kernel for that pair); a requantized output has the input's integer type; a bias is an int32 constant whose DequantizeLinear scale is exactly
``sx · sw`` with zero point 0 (insert-qdq writes it so), or a float32 constant, which is quantized to int32 at
that scale (``rint(b / (sx·sw))``, as onnxruntime quantizes such a bias when it fuses the group itself: a layer
the plan keeps with float activations but whose neighbours quantize its input and output); every intermediate tensor has the group as its only
reader and is no graph output. A ``Relu`` / ``Clip`` between the op and Q is dropped only where it is exact to
drop: quantizing saturates at the bottom of the integer range, so ``Relu`` disappears when the output zero
point is that bottom (``q(relu(y)) = max(q(y), zy) = q(y)``) and ``Clip(lo, hi)`` when ``[lo, hi]`` covers the
representable range ``[(qmin − zy)·sy, (qmax − zy)·sy]``; otherwise a Conv stays QDQ and a MatMul / Gemm writes
its float output (the activation and Q stay). Gemm needs
``alpha = 1`` and, with a bias, ``beta = 1``.

Weight zero points the DequantizeLinear omits (all zero) become one shared scalar zero of the weight's type.
Names: each integer op keeps the name of the Conv / MatMul / Gemm it replaces and writes the Q's output
tensor; the float tensor the group no longer computes hands its name to the DequantizeLinear that now reads
``yq`` (the same value: the dequantized layer output), so per-layer validation still finds the layer. A second
run finds nothing.

(A run-time quantized input times an int8 weight became ``com.microsoft.DynamicQuantizeMatMul`` in
``ort-dynamic-matmul`` before this pass.)

Stats: ``qlinear_conv``, ``qlinear_matmul``, ``matmul_integer_to_float``, ``qgemm``, ``bias_quantized``;
``kept_qdq.<why>`` for a
Conv / MatMul / Gemm with a quantized input that stays in QDQ form (``float_output``: no QuantizeLinear reads
its output alone; ``activation_not_exact``; ``weight_zero_points``; ``bias_scale``; ...).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core.pass_base import GraphPass, PassResult
from qcompiler.ir.graph import GraphIndex, is_onnx_op, optional_input, producer, scale_values
from qcompiler.runtime_targets.ort.dynamic_matmul import dynamic_source
from qcompiler.runtime_targets.ort.matmulnbits import DOMAIN as MS_DOMAIN

_INT8 = (np.dtype(np.int8), np.dtype(np.uint8))


@dataclass
class _Act:
    """An integer activation read through a per-tensor DequantizeLinear: constant scale and zero point, or
    (``dynamic``) the outputs of the DynamicQuantizeLinear that quantized ``source`` at run time."""

    q: gs.Tensor
    scale: gs.Tensor
    zero_point: gs.Tensor
    source: gs.Tensor | None = None  # the float tensor a DynamicQuantizeLinear quantizes

    @property
    def dynamic(self) -> bool:
        return self.source is not None

    @property
    def dtype(self) -> np.dtype:
        if isinstance(self.zero_point, gs.Constant):
            return np.dtype(np.asarray(self.zero_point.values).dtype)
        return np.dtype(np.uint8)  # DynamicQuantizeLinear writes uint8


@dataclass
class _Weight:
    """The second operand: an integer constant (the weight), or for an activation × activation MatMul another
    activation read through a per-tensor DequantizeLinear."""

    q: gs.Tensor
    scale: gs.Tensor  # a constant, or a DynamicQuantizeLinear output (a run-time quantized second operand)
    zero_point: gs.Tensor | None  # a constant whose values are all equal, or None (zero)

    @property
    def dtype(self) -> np.dtype:
        src = self.q if isinstance(self.q, gs.Constant) else self.zero_point
        if not isinstance(src, gs.Constant):
            return np.dtype(np.uint8)  # a DynamicQuantizeLinear output
        return np.dtype(np.asarray(src.values).dtype)

    @property
    def dynamic(self) -> bool:
        return not isinstance(self.scale, gs.Constant)


def _per_tensor(t: gs.Tensor | None) -> bool:
    return isinstance(t, gs.Constant) and np.asarray(t.values).size == 1


def _activation(t: gs.Tensor) -> _Act | str:
    dq = producer(t)
    if dq is None or not is_onnx_op(dq, "DequantizeLinear") or isinstance(dq.inputs[0], gs.Constant):
        return "float_input"
    s, z = dq.inputs[1], optional_input(dq, 2)
    source = dynamic_source(t)
    if source is not None:
        assert z is not None
        return _Act(dq.inputs[0], s, z, source=source)
    if not (_per_tensor(s) and _per_tensor(z)) or np.asarray(s.values).dtype != np.float32:
        return "activation_layout"
    assert isinstance(s, gs.Constant) and isinstance(z, gs.Constant)
    if np.asarray(z.values).dtype not in _INT8:
        return "activation_dtype"
    return _Act(dq.inputs[0], s, z)


def _weight(t: gs.Tensor, axis: int) -> _Weight | str:
    """The int8 / uint8 constant behind ``t`` (per tensor, or per channel along ``axis``)."""
    dq = producer(t)
    if dq is None or not is_onnx_op(dq, "DequantizeLinear") or not isinstance(dq.inputs[0], gs.Constant):
        return "float_weight"
    q, s, z = dq.inputs[0], dq.inputs[1], optional_input(dq, 2)
    qv = np.asarray(q.values)
    if qv.dtype not in _INT8 or not isinstance(s, gs.Constant) or np.asarray(s.values).dtype != np.float32:
        return "weight_dtype"
    sv = np.asarray(s.values)
    if int(dq.attrs.get("block_size", 0)) or sv.ndim > 1:
        return "weight_layout"
    if sv.size > 1 and int(dq.attrs.get("axis", 1)) % qv.ndim != axis % qv.ndim:
        return "weight_layout"
    if z is not None:
        if not isinstance(z, gs.Constant):
            return "weight_layout"
        zv = np.asarray(z.values)
        if zv.size and np.any(zv != zv.reshape(-1)[0]):
            return "weight_zero_points"  # onnxruntime's integer kernels take one zero point per weight
    return _Weight(q, s, z)


def _kernel_types(act: _Act, w: _Weight) -> str | None:
    """onnxruntime's integer kernels take uint8 activations with uint8 or int8 weights, and int8 activations with
    int8 weights; int8 activations with uint8 weights have no kernel (the group stays QDQ)."""
    if act.dtype == np.int8 and w.dtype == np.uint8:
        return "kernel_types"
    return None


def _operands(node: gs.Node, axis: int, dynamic: bool = False) -> tuple[_Act, _Weight] | str:
    """The integer activation (input 0) and weight (input 1, per channel along ``axis``) of ``node``, when an
    onnxruntime integer kernel takes the pair; else why not. ``dynamic`` (MatMul): input 1 may also be a
    quantized activation (a MatMul of two activations), and either may be quantized at run time
    (DynamicQuantizeLinear); otherwise a dynamically quantized input stays QDQ."""
    a = _activation(node.inputs[0])
    if isinstance(a, str):
        return a
    if a.dynamic and not dynamic:
        return "dynamic_input"
    w = _weight(node.inputs[1], axis)
    if w == "float_weight" and dynamic:
        b = _activation(node.inputs[1])
        if isinstance(b, str):
            return "float_weight" if b == "float_input" else b
        w = _Weight(b.q, b.scale, b.zero_point)
    if isinstance(w, str):
        return w
    return _kernel_types(a, w) or (a, w)


def _bias_scale(act: _Act, w: _Weight) -> np.ndarray:
    """sx·sw in float32, per output channel (or one value)."""
    return np.float32(np.asarray(act.scale.values).reshape(())) * np.asarray(w.scale.values, dtype=np.float32)


def _bias(t: gs.Tensor, act: _Act, w: _Weight) -> gs.Constant | np.ndarray | str:
    """The int32 constant of a bias dequantized with scale sx·sw and zero point 0; or, for a float constant
    bias, its int32 codes at that scale (an array: what onnxruntime's own bias quantization computes,
    ``QuantizeLinear(b, sx·sw)`` into int32, when it fuses such a group)."""
    if isinstance(t, gs.Constant):
        b = np.asarray(t.values)
        scale = _bias_scale(act, w)
        if b.dtype != np.float32 or b.ndim != 1 or scale.size not in (1, b.size) or not np.all(scale > 0):
            return "float_bias"
        codes = np.rint(b / np.broadcast_to(scale.reshape(-1), b.shape))
        if np.any(np.abs(codes) > np.iinfo(np.int32).max):
            return "bias_overflow"
        return codes.astype(np.int32)
    dq = producer(t)
    if dq is None or not is_onnx_op(dq, "DequantizeLinear") or not isinstance(dq.inputs[0], gs.Constant):
        return "float_bias"
    b = dq.inputs[0]
    if np.asarray(b.values).dtype != np.int32:
        return "float_bias"
    z = optional_input(dq, 2)
    if z is not None and (not isinstance(z, gs.Constant) or np.any(np.asarray(z.values))):
        return "bias_zero_point"
    have = scale_values(dq.inputs[1])
    want = _bias_scale(act, w)
    if have is None or have.size not in (1, want.size):
        return "bias_scale"
    if not np.array_equal(np.broadcast_to(have.reshape(-1), want.reshape(-1).shape), want.reshape(-1)):
        return "bias_scale"
    return b


def _int_range(dtype: np.dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _requantizing_q(t: gs.Tensor, index: GraphIndex) -> gs.Node | None:
    """The per-tensor QuantizeLinear that is ``t``'s only reader (int8 / uint8), else None."""
    if len(t.outputs) != 1 or index.is_graph_output(t):
        return None
    q = t.outputs[0]
    if not is_onnx_op(q, "QuantizeLinear") or q.inputs[0] is not t:
        return None
    s, z = q.inputs[1], optional_input(q, 2)
    if not (_per_tensor(s) and _per_tensor(z)):
        return None
    assert isinstance(z, gs.Constant)
    return q if np.asarray(z.values).dtype in _INT8 else None


def _absorbed(act: gs.Node, q: gs.Node) -> bool:
    """Whether ``Q(act(y)) == Q(y)`` for a Relu / Clip ``act`` (the saturation of Q does its work)."""
    s = float(np.asarray(q.inputs[1].values).reshape(()))
    zv = np.asarray(q.inputs[2].values)
    z = int(zv.reshape(()))
    lo_q, hi_q = _int_range(zv.dtype)
    if act.op == "Relu":
        return z == lo_q
    lo_t, hi_t = optional_input(act, 1), optional_input(act, 2)
    if "min" in act.attrs or "max" in act.attrs:  # opset < 11 Clip
        lo, hi = float(act.attrs.get("min", -np.inf)), float(act.attrs.get("max", np.inf))
    else:
        if (lo_t is not None and not _per_tensor(lo_t)) or (hi_t is not None and not _per_tensor(hi_t)):
            return False
        lo = -np.inf if lo_t is None else float(np.asarray(lo_t.values).reshape(()))
        hi = np.inf if hi_t is None else float(np.asarray(hi_t.values).reshape(()))
    return lo <= (lo_q - z) * s and hi >= (hi_q - z) * s


def _requantized_output(node: gs.Node, x: _Act, index: GraphIndex
                        ) -> tuple[list[gs.Node], gs.Tensor, gs.Node | None] | str:
    """(absorbed Relu / Clip, the float tensor the group ends in, the QuantizeLinear reading it alone or None)
    for ``node``'s output; a reason string when a Relu / Clip follows that the output quantization does not make
    redundant, or when the output's integer type is not the input's (``x``; the kernels write their input's)."""
    y = node.outputs[0]
    absorbed: list[gs.Node] = []
    t, q = y, _requantizing_q(y, index)
    if len(y.outputs) == 1 and not index.is_graph_output(y) and is_onnx_op(y.outputs[0], "Relu", "Clip"):
        act = y.outputs[0]
        q = _requantizing_q(act.outputs[0], index) if act.outputs else None
        if q is None:
            return [], y, None  # a float activation follows: the integer op writes float
        if not _absorbed(act, q):
            return "activation_not_exact"
        absorbed, t = [act], act.outputs[0]
    if q is not None and np.asarray(q.inputs[2].values).dtype != x.dtype:
        return "output_type"
    return absorbed, t, q


class LowerQOperatorPass(GraphPass):
    """QDQ groups -> onnxruntime's integer ops: QLinearConv, QLinearMatMul, MatMulIntegerToFloat, QGemm."""

    name = "lower-qoperator"
    requires = frozenset({"qdq"})

    def run_graph(self, graph: gs.Graph) -> PassResult:
        stats: Counter[str] = Counter()
        run = _Lowering(self, GraphIndex(graph))  # this run's index and shared zero points
        changed = False
        for node in list(graph.nodes):
            if not is_onnx_op(node, "Conv", "MatMul", "Gemm") or not node.outputs:
                continue
            rewrite = {"Conv": run._conv, "MatMul": run._matmul, "Gemm": run._gemm}[node.op]
            done = rewrite(node, graph, stats)
            if done is not None:
                stats[f"kept_qdq.{done}"] += 1
            else:
                changed = True
        if changed:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        stats.pop("kept_qdq.float_input", None)  # float layers: no QDQ group to keep
        return PassResult(changed, stats)


class _Lowering:
    """One run of :class:`LowerQOperatorPass`: the graph index, the zero points shared by the new nodes, the
    rewrites."""

    def __init__(self, owner: GraphPass, index: GraphIndex) -> None:
        self._owner = owner
        self._index = index
        self._zeros: dict[str, gs.Constant] = {}

    def tag(self, node: gs.Node) -> gs.Node:
        return self._owner.tag(node)

    # ------------------------------------------------------------------------------------------- helpers
    def _zero(self, dtype: np.dtype) -> gs.Constant:
        """One shared scalar zero point per integer type (weights whose DequantizeLinear omits it)."""
        key = np.dtype(dtype).name
        if key not in self._zeros:
            self._zeros[key] = gs.Constant(self._index.unique_name(f"qop:zero_{key}"), np.zeros((), dtype=dtype))
        return self._zeros[key]

    def _wzp(self, w: _Weight, *, like_scale: bool = False) -> gs.Tensor:
        """The weight's zero point for an integer kernel: a scalar (one for all channels), or shaped like the
        scale when ``like_scale`` (QGemm wants them alike)."""
        dtype = w.dtype
        if w.zero_point is not None and not isinstance(w.zero_point, gs.Constant):
            return w.zero_point  # a DynamicQuantizeLinear output (a scalar)
        shape = np.asarray(w.scale.values).shape
        if like_scale and shape:
            if w.zero_point is not None and np.asarray(w.zero_point.values).shape == shape:
                return w.zero_point
            z0 = 0 if w.zero_point is None else np.asarray(w.zero_point.values).reshape(-1)[0]
            return gs.Constant(self._index.unique_name(w.q.name.removesuffix(":q") + ":zp"), np.full(shape, z0, dtype))
        if w.zero_point is None:
            return self._zero(dtype)
        zv = np.asarray(w.zero_point.values)
        if zv.size > 1:  # all equal (checked): one scalar
            return gs.Constant(self._index.unique_name(w.zero_point.name + ":1"), zv.reshape(-1)[:1].reshape(()))
        return w.zero_point

    def _bias_input(self, bias: gs.Tensor, b: gs.Constant | np.ndarray, stats: Counter[str]) -> gs.Constant:
        if isinstance(b, gs.Constant):
            return b
        stats["bias_quantized"] += 1
        return gs.Constant(self._index.unique_name(bias.name + ":q"), b)

    def _replace(self, graph: gs.Graph, old: list[gs.Node], new: gs.Node, float_out: gs.Tensor | None,
                 q_out: gs.Tensor | None) -> None:
        """Swap ``old`` (the matched float op and what it absorbed) for ``new``; the float tensor the group no
        longer computes passes its name to a DequantizeLinear of ``q_out``."""
        for n in old:
            n.inputs.clear()
            n.outputs.clear()
        graph.nodes.append(self.tag(new))
        if float_out is not None and q_out is not None:
            dq = next((n for n in q_out.outputs if is_onnx_op(n, "DequantizeLinear") and n.outputs), None)
            if dq is not None and not self._index.is_graph_output(dq.outputs[0]):
                dq.outputs[0].name = float_out.name

    # ------------------------------------------------------------------------------------------ matchers
    def _conv(self, node: gs.Node, graph: gs.Graph, stats: Counter[str]) -> str | None:
        ops = _operands(node, 0)
        if isinstance(ops, str):
            return ops
        a, w = ops
        bias = optional_input(node, 2)
        b = None
        if bias is not None:
            b = _bias(bias, a, w)
            if isinstance(b, str):
                return b
        out = _requantized_output(node, a, self._index)
        if isinstance(out, str):
            return out
        absorbed, t, q = out
        if q is None:
            return "float_output"  # QLinearConv writes codes only
        inputs = [a.q, a.scale, a.zero_point, w.q, w.scale, self._wzp(w), q.inputs[1], q.inputs[2]]
        if b is not None:
            assert bias is not None
            inputs.append(self._bias_input(bias, b, stats))
        new = gs.Node("QLinearConv", node.name, attrs=dict(node.attrs), inputs=inputs, outputs=list(q.outputs))
        q_out = q.outputs[0]
        self._replace(graph, [node, *absorbed, q], new, t, q_out)
        stats["qlinear_conv"] += 1
        return None

    def _matmul(self, node: gs.Node, graph: gs.Graph, stats: Counter[str]) -> str | None:
        ops = _operands(node, 1, dynamic=True)
        if isinstance(ops, str):
            return ops
        a, w = ops
        if isinstance(w.q, gs.Constant) and np.asarray(w.q.values).ndim != 2:
            return "weight_layout"
        out = _requantized_output(node, a, self._index)
        absorbed, t, q = ([], node.outputs[0], None) if isinstance(out, str) else out  # str: float output
        if a.dynamic or w.dynamic:
            absorbed, t, q = [], node.outputs[0], None  # run-time scales: the float-output kernel
        if q is not None:
            inputs = [a.q, a.scale, a.zero_point, w.q, w.scale, self._wzp(w), q.inputs[1], q.inputs[2]]
            new = gs.Node("QLinearMatMul", node.name, inputs=inputs, outputs=list(q.outputs))
            self._replace(graph, [node, *absorbed, q], new, t, q.outputs[0])
            stats["qlinear_matmul"] += 1
            return None
        inputs = [a.q, w.q, a.scale, w.scale, a.zero_point]
        if w.zero_point is not None:
            inputs.append(self._wzp(w))
        new = gs.Node("MatMulIntegerToFloat", node.name, domain=MS_DOMAIN, inputs=inputs, outputs=list(node.outputs))
        self._replace(graph, [node], new, None, None)
        stats["matmul_integer_to_float"] += 1
        return None

    def _gemm(self, node: gs.Node, graph: gs.Graph, stats: Counter[str]) -> str | None:
        trans_b = int(node.attrs.get("transB", 0))
        ops = _operands(node, 0 if trans_b else 1)
        if isinstance(ops, str):
            return ops
        a, w = ops
        if float(node.attrs.get("alpha", 1.0)) != 1.0:
            return "gemm_alpha"
        if int(node.attrs.get("transA", 0)):
            return "gemm_trans_a"  # a per-tensor activation would allow it; onnxruntime's QDQ fusion does not
        c = optional_input(node, 2)
        b = None
        if c is not None:
            if float(node.attrs.get("beta", 1.0)) != 1.0:
                return "gemm_beta"
            b = _bias(c, a, w)
            if isinstance(b, str):
                return b
            if np.asarray(b.values if isinstance(b, gs.Constant) else b).ndim != 1:
                return "bias_scale"
        out = _requantized_output(node, a, self._index)
        absorbed, t, q = ([], node.outputs[0], None) if isinstance(out, str) else out  # str: float output
        if q is None:
            absorbed = []
        inputs: list[gs.Tensor] = [a.q, a.scale, a.zero_point, w.q, w.scale, self._wzp(w, like_scale=True)]
        inputs.append(self._bias_input(c, b, stats) if c is not None and b is not None else gs.Variable.empty())
        if q is not None:
            inputs += [q.inputs[1], q.inputs[2]]
        while not inputs[-1].name:  # a trailing omitted input is left out
            inputs.pop()
        attrs = {"transA": 0, "transB": trans_b, "alpha": 1.0}
        new = gs.Node("QGemm", node.name, domain=MS_DOMAIN, attrs=attrs, inputs=inputs,
                      outputs=list(q.outputs if q is not None else node.outputs))
        self._replace(graph, [node, *absorbed, *([q] if q is not None else [])], new,
                      t if q is not None else None, q.outputs[0] if q is not None else None)
        stats["qgemm"] += 1
        return None
