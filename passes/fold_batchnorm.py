"""Fold inference-mode BatchNormalization into the producer before it, or lower it to Mul + Add.

Patterns folded (the producer's output must feed only the BN, and every weight/bias rewritten must be a
constant read by nothing else):

- BatchNormalization ∘ Conv                 -> Conv
- BatchNormalization ∘ ConvTranspose        -> ConvTranspose (grouped included)
- BatchNormalization ∘ Gemm                 -> Gemm
- BatchNormalization ∘ [Add(·, b) ∘] MatMul -> Add(MatMul(·, W'), b')   (2-D MatMul with constant [K, N] W)
- BatchNormalization ∘ Add(·, b) ∘ Conv / ConvTranspose -> Add(Conv(·, W'), b')   (a per-channel bias b of
  shape [C, 1, ...] or [1, C, 1, ...] kept as a separate Add, as Paddle exports do)

Approach:
    BN computes, per channel c of axis 1,
        Y_bn = γ · (Y − μ) / √(σ² + ε) + β  =  s · Y + t,   s = γ / √(σ² + ε),  t = β − μ · s.
    When the producer is affine in its weight, Y = W ⊛ X + B, scaling the weights of output channel c by
    s[c] scales that channel of the output, so
        W' = W · s   (per output channel)        B' = (B − μ) · s + β  =  B · s + t.
    Where the output channel lives in the weight:
        Conv           W [Cout, Cin/g, k...]      channel c = W[c]
        ConvTranspose  W [Cin, Cout/g, k...]      channel c = g·(Cout/g) + j  ->  W[g·Cin/g:(g+1)·Cin/g, j]
        Gemm           Y = α·A'·B' + β_g·C        transB=1: B [N, K] row c; transB=0: B [K, N] column c;
                       C' = β_g·C·s + t (C absent: C' = t), and the Gemm's beta becomes 1 (alpha kept)
        MatMul         W [K, N]                   column c; bias b' = b·s + t (b absent: an Add is created)
    With a separate bias Add after a Conv, the Conv's own bias (if any) becomes B·s and the Add's b·s + t.
    The folded producer (or the bias Add) takes over the BN's output tensor, so downstream names and graph
    outputs are unchanged. The math runs in float64 and is cast back to the weight's dtype. Where a bias Add
    follows, the producer's own output keeps its name but now holds s · Y: it is marked rescaled
    (:func:`qcompiler.core.tags.mark_rescaled`), so per-layer validation does not compare it with the float
    model's Y.

Everything else — no foldable producer, a producer whose output has other readers, a shared or
non-constant weight — becomes
    Y_bn = X · s_c + t_c      (Mul + Add, s_c and t_c of shape [C, 1, ..., 1] broadcasting over axis 1),
provided the rank of X is known (else the BN is left alone and counted as ``skipped_unknown_rank``).
A BN whose parameters are not constants, that runs in training mode or whose extra outputs are read is
left alone. A BN whose constant parameters hold NaN / Inf, or whose σ² + ε is not positive, is refused
(``UserError`` naming the node): folded, it would make a model that outputs NaN.

Before a BN disappears, the per-channel mean β and standard deviation |γ|·σ/√(σ² + ε) of its output are
recorded under its output name (``qcompiler.calib.bn_statistics``) for data-free calibration and the
bias absorption of ``equalize``.

Stats: ``folded_conv``, ``folded_convtranspose``, ``folded_gemm``, ``folded_matmul``, ``bn_to_muladd``,
``refused_shared_weight``, ``refused_dynamic_weight``, ``refused_multi_consumer``,
``refused_dynamic_bn_params``, ``skipped_*`` for shapes the rewrite does not cover.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.calib import ChannelStats, bn_statistics
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.pass_base import Pass, PassResult
from qcompiler.ir.graph import (
    GraphIndex,
    const_values,
    exclusive_constant,
    infer_rank,
    is_onnx_op,
    known_rank,
    optional_input,
    producer,
    sole_consumer,
)

log = logging.getLogger(__name__)

_FOLDABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")


@dataclass
class _BnParams:
    node: gs.Node
    x: gs.Tensor
    y: gs.Tensor
    scale: np.ndarray  # s = γ / √(σ² + ε), float64 [C]
    shift: np.ndarray  # t = β − μ·s, float64 [C]
    dtype: np.dtype

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])


class FoldBatchNormPass(Pass):
    """Fold BatchNormalization into Conv / ConvTranspose / Gemm / MatMul weights; lower the rest to Mul + Add."""

    name = "fold-batchnorm"
    keeps_function = True  # outputs unchanged up to float rounding (calibration after it runs the float model)
    graph_only = True  # the graph and its options only: done once per model in a measured compile (core.prepared)
    produces = frozenset({"bn-folded"})

    def run(self, ctx: CompileContext) -> PassResult:
        graph = ctx.graph
        run = _Folding(self, graph)  # everything this run computes; dropped with it (no graph kept alive)
        # BN node id -> nodes that take its place in graph.nodes (empty when folded into its producer)
        replaced: dict[int, list[gs.Node]] = {}
        for bn in [n for n in graph.nodes if is_onnx_op(n, "BatchNormalization")]:
            p = run._params(bn)
            if p is None:
                continue
            run._record_statistics(ctx, p)
            if run._fold(p, replaced):
                continue
            run._to_muladd(p, replaced)
        if replaced:
            nodes: list[gs.Node] = []
            for n in graph.nodes:
                if id(n) in replaced:
                    nodes.extend(replaced[id(n)])
                else:
                    nodes.append(n)
            graph.nodes = nodes
        return PassResult(modified=bool(replaced), stats=run._stats)


class _Folding:
    """One run of :class:`FoldBatchNormPass`: the graph index and the statistics, the folding steps."""

    def __init__(self, owner: Pass, graph: gs.Graph) -> None:
        self._owner = owner
        self._index = GraphIndex(graph)
        self._stats: Counter[str] = Counter()

    def tag(self, node: gs.Node) -> gs.Node:
        return self._owner.tag(node)

    # ------------------------------------------------------------------------------------------ params
    def _params(self, bn: gs.Node) -> _BnParams | None:
        where = bn.name or (bn.outputs[0].name if bn.outputs else "BatchNormalization")
        if len(bn.inputs) < 5 or not bn.outputs:
            self._stats["skipped_bad_params"] += 1
            return None
        if int(bn.attrs.get("training_mode", 0)) != 0:
            self._stats["skipped_training_mode"] += 1
            log.debug("%s: training_mode=1, left alone", where)
            return None
        if int(bn.attrs.get("spatial", 1)) != 1:  # opset < 9: per-activation statistics
            self._stats["skipped_non_spatial"] += 1
            return None
        if any(o.outputs or self._index.is_graph_output(o) for o in bn.outputs[1:] if o.name):
            self._stats["skipped_training_outputs"] += 1
            return None
        vals = [const_values(t) for t in bn.inputs[1:5]]
        if any(v is None for v in vals):
            self._stats["refused_dynamic_bn_params"] += 1
            log.debug("%s: BN parameters are not constants, left alone", where)
            return None
        arrays = [np.asarray(v) for v in vals]
        c = arrays[0].size
        if c == 0 or any(a.size != c or a.ndim != 1 or not np.issubdtype(a.dtype, np.floating) for a in arrays):
            self._stats["skipped_bad_params"] += 1
            return None
        for t, a in zip(bn.inputs[1:5], arrays):
            if not np.isfinite(a).all():
                raise UserError(f"node '{where}' (BatchNormalization): parameter '{t.name}' contains NaN or Inf; "
                                "folding it would give a model that outputs NaN")
        gamma, beta, mean, var = (a.astype(np.float64) for a in arrays)
        eps = float(bn.attrs.get("epsilon", 1e-5))
        with np.errstate(all="ignore"):
            scale = gamma / np.sqrt(var + eps)
            shift = beta - mean * scale
        if not (np.isfinite(scale).all() and np.isfinite(shift).all()):
            raise UserError(f"node '{where}' (BatchNormalization): variance + epsilon is not positive for some "
                            f"channel (variance '{bn.inputs[4].name}', epsilon {eps:g}); the folded scale would be "
                            "NaN or Inf")
        x, y = bn.inputs[0], bn.outputs[0]
        dtype = _float_dtype(x.dtype, arrays[0].dtype)
        return _BnParams(bn, x, y, scale, shift, dtype)

    @staticmethod
    def _record_statistics(ctx: CompileContext, p: _BnParams) -> None:
        """Remember the BN output's per-channel mean β and std |γ|·σ/√(σ²+ε) (data-free calibration, bias
        absorption); keyed by the output name, which the folded producer keeps."""
        gamma, beta, _mean, var = (np.asarray(const_values(t), dtype=np.float64).reshape(-1)
                                   for t in p.node.inputs[1:5])
        eps = float(p.node.attrs.get("epsilon", 1e-5))
        bn_statistics(ctx)[p.y.name] = ChannelStats(mean=beta, std=np.abs(gamma) * np.sqrt(var / (var + eps)))

    # -------------------------------------------------------------------------------------------- fold
    def _fold(self, p: _BnParams, replaced: dict[int, list[gs.Node]]) -> bool:
        prod = producer(p.x)
        if prod is None or not is_onnx_op(prod, *_FOLDABLE):
            return False
        add: gs.Node | None = None
        if prod.op == "Add":
            add, prod = prod, self._base_of_add(prod)
            if prod is None:
                return False
        if len(prod.outputs) != 1 or not sole_consumer(p.x, p.node, self._index) or (
                add is not None and not sole_consumer(prod.outputs[0], add, self._index)):
            self._stats["refused_multi_consumer"] += 1
            log.debug("%s: output %s of %s has other readers; not folded", p.node.name, p.x.name, prod.name)
            return False
        if prod.op == "Conv":
            last = self._fold_conv(prod, add, p)
        elif prod.op == "ConvTranspose":
            last = self._fold_convtranspose(prod, add, p)
        elif prod.op == "Gemm":
            last = self._fold_gemm(prod, p)
        else:
            last = self._fold_matmul(prod, add, p, replaced)
        if last is None:
            return False
        self._take_output(last, p)
        if last is not prod:  # a bias Add follows: the producer's own output keeps its name, scaled by s
            self._owner.mark_rescaled(*prod.outputs)
        replaced.setdefault(id(p.node), [])
        key = "folded_" + prod.op.lower()
        self._stats[key] += 1
        log.debug("folded %s into %s %s", p.node.name, prod.op, prod.name)
        return True

    def _weight_ok(self, t: gs.Tensor | None, node: gs.Node) -> bool:
        """A constant float tensor that only ``node`` reads (counts the refusal otherwise)."""
        if t is None:
            return False
        if not isinstance(t, gs.Constant):
            self._stats["refused_dynamic_weight"] += 1
            log.debug("%s: input %s is not a constant; not folded", node.name, t.name)
            return False
        if not exclusive_constant(t, node, self._index):
            self._stats["refused_shared_weight"] += 1
            log.debug("%s: constant %s is shared with other nodes; not folded", node.name, t.name)
            return False
        if not np.issubdtype(np.asarray(t.values).dtype, np.floating):
            self._stats["refused_non_float_weight"] += 1
            return False
        return True

    def _bias_values(self, b_t: gs.Tensor | None, node: gs.Node, c: int) -> tuple[bool, np.ndarray | None]:
        """(ok, current bias as float64 [C] or None when absent)."""
        if b_t is None:
            return True, None
        if not self._weight_ok(b_t, node):
            return False, None
        b = np.asarray(b_t.values)
        if b.size != c:
            self._stats["skipped_shape_mismatch"] += 1
            return False, None
        return True, b.reshape(c).astype(np.float64)

    def _set_bias(self, node: gs.Node, slot: int, b_t: gs.Tensor | None, values: np.ndarray,
                  dtype: np.dtype, hint: str) -> None:
        if b_t is not None:
            assert isinstance(b_t, gs.Constant)
            b_t.values = values.astype(dtype)
            return
        const = gs.Constant(self._index.unique_name(hint), values.astype(dtype))
        while len(node.inputs) < slot:
            node.inputs.append(gs.Variable.empty())
        if len(node.inputs) == slot:
            node.inputs.append(const)
        else:
            node.inputs[slot] = const

    def _fold_conv(self, conv: gs.Node, add: gs.Node | None, p: _BnParams) -> gs.Node | None:
        w_t, b_t = optional_input(conv, 1), optional_input(conv, 2)
        if not self._weight_ok(w_t, conv):
            return None
        assert isinstance(w_t, gs.Constant)
        w = np.asarray(w_t.values)
        if w.ndim < 3 or w.shape[0] != p.channels:
            self._stats["skipped_shape_mismatch"] += 1
            return None
        ok, b = self._bias_values(b_t, conv, p.channels)
        if not ok or not self._channel_add_ok(add, conv, p, w.ndim):
            return None
        s = p.scale.reshape((p.channels,) + (1,) * (w.ndim - 1))
        w_t.values = (w.astype(np.float64) * s).astype(w.dtype)
        return self._finish_bias(conv, add, b_t, b, p, w.dtype, f"{conv.name or w_t.name}.bias")

    def _channel_add_ok(self, add: gs.Node | None, base: gs.Node, p: _BnParams, rank: int) -> bool:
        """``add`` (if any) adds a constant of C values broadcasting over axis 1 of a rank-``rank`` tensor."""
        if add is None:
            return True
        c_t = add.inputs[1] if add.inputs[0] is base.outputs[0] else add.inputs[0]
        if not self._weight_ok(c_t, add):
            return False
        shape = tuple(np.asarray(c_t.values).shape)
        per_channel = (p.channels,) + (1,) * (rank - 2)
        if shape not in (per_channel, (1, *per_channel)):
            self._stats["skipped_shape_mismatch"] += 1
            return False
        return True

    def _finish_bias(self, base: gs.Node, add: gs.Node | None, b_t: gs.Tensor | None, b: np.ndarray | None,
                     p: _BnParams, dtype: np.dtype, hint: str) -> gs.Node:
        """Write the folded biases: into the Add's constant when there is one, else into input 2 of ``base``."""
        if add is None:
            new_b = p.shift if b is None else b * p.scale + p.shift
            self._set_bias(base, 2, b_t, new_b, dtype, hint)
            return base
        if b is not None:  # the producer's own bias is only scaled; the shift goes to the Add
            self._set_bias(base, 2, b_t, b * p.scale, dtype, hint)
        c_t = add.inputs[1] if add.inputs[0] is base.outputs[0] else add.inputs[0]
        assert isinstance(c_t, gs.Constant)
        c = np.asarray(c_t.values)
        c_t.values = (c.reshape(p.channels).astype(np.float64) * p.scale + p.shift).reshape(c.shape).astype(dtype)
        return add

    def _fold_convtranspose(self, ct: gs.Node, add: gs.Node | None, p: _BnParams) -> gs.Node | None:
        w_t, b_t = optional_input(ct, 1), optional_input(ct, 2)
        if not self._weight_ok(w_t, ct):
            return None
        assert isinstance(w_t, gs.Constant)
        w = np.asarray(w_t.values)
        group = int(ct.attrs.get("group", 1))
        if w.ndim < 3 or group < 1 or w.shape[0] % group or group * w.shape[1] != p.channels:
            self._stats["skipped_shape_mismatch"] += 1
            return None
        ok, b = self._bias_values(b_t, ct, p.channels)
        if not ok or not self._channel_add_ok(add, ct, p, w.ndim):
            return None
        cin_g, cout_g, k = w.shape[0] // group, w.shape[1], w.shape[2:]
        # output channel g·cout_g + j  <->  weight[g·cin_g:(g+1)·cin_g, j]
        wg = w.astype(np.float64).reshape((group, cin_g, cout_g, *k))
        s = p.scale.reshape((group, 1, cout_g) + (1,) * len(k))
        w_t.values = (wg * s).reshape(w.shape).astype(w.dtype)
        return self._finish_bias(ct, add, b_t, b, p, w.dtype, f"{ct.name or w_t.name}.bias")

    def _fold_gemm(self, gemm: gs.Node, p: _BnParams) -> gs.Node | None:
        b_t, c_t = optional_input(gemm, 1), optional_input(gemm, 2)
        if not self._weight_ok(b_t, gemm):
            return None
        assert isinstance(b_t, gs.Constant)
        w = np.asarray(b_t.values)
        trans_b = int(gemm.attrs.get("transB", 0))
        if w.ndim != 2 or w.shape[0 if trans_b else 1] != p.channels:
            self._stats["skipped_shape_mismatch"] += 1
            return None
        c_vals: np.ndarray | None = None
        if c_t is not None:
            if not self._weight_ok(c_t, gemm):
                return None
            c_vals = np.asarray(c_t.values).astype(np.float64)
            try:
                bshape = np.broadcast_shapes(c_vals.shape, (p.channels,))
            except ValueError:
                bshape = ()
            if c_vals.ndim > 2 or len(bshape) == 0 or bshape[-1] != p.channels:
                self._stats["skipped_shape_mismatch"] += 1
                return None
        beta = float(gemm.attrs.get("beta", 1.0))
        s = p.scale[:, None] if trans_b else p.scale[None, :]
        b_t.values = (w.astype(np.float64) * s).astype(w.dtype)
        new_c = p.shift if c_vals is None else beta * c_vals * p.scale + p.shift
        self._set_bias(gemm, 2, c_t, new_c, w.dtype, f"{gemm.name or b_t.name}.bias")
        gemm.attrs["beta"] = 1.0
        return gemm

    def _base_of_add(self, add: gs.Node) -> gs.Node | None:
        """The Conv / ConvTranspose / MatMul feeding ``add`` when ``add`` is ``base(...) + constant``."""
        if len(add.inputs) != 2:
            return None
        for i in (0, 1):
            a, b = add.inputs[i], add.inputs[1 - i]
            base = producer(a)
            if isinstance(b, gs.Constant) and base is not None and is_onnx_op(base, "Conv", "ConvTranspose", "MatMul"):
                return base
        return None

    def _fold_matmul(self, mm: gs.Node, add: gs.Node | None, p: _BnParams,
                     replaced: dict[int, list[gs.Node]]) -> gs.Node | None:
        if len(mm.inputs) != 2 or len(mm.outputs) != 1:
            return None
        a_t, w_t = mm.inputs
        mm_out = mm.outputs[0]
        if add is not None and not sole_consumer(mm_out, add, self._index):
            self._stats["refused_multi_consumer"] += 1
            return None
        # BN normalizes axis 1: only a 2-D [M, N] MatMul output has its channels on the last axis.
        ranks = {r for r in (known_rank(p.x), known_rank(p.y), infer_rank(a_t)) if r is not None}
        if ranks != {2}:
            self._stats["skipped_matmul_rank"] += 1
            return None
        if not self._weight_ok(w_t, mm):
            return None
        assert isinstance(w_t, gs.Constant)
        w = np.asarray(w_t.values)
        if w.ndim != 2 or w.shape[1] != p.channels:
            self._stats["skipped_shape_mismatch"] += 1
            return None
        bias_t: gs.Tensor | None = None
        bias: np.ndarray | None = None
        if add is not None:
            bias_t = add.inputs[1] if add.inputs[0] is mm_out else add.inputs[0]
            if not self._weight_ok(bias_t, add):
                return None
            bias = np.asarray(bias_t.values).astype(np.float64)
            try:
                bshape = np.broadcast_shapes(bias.shape, (p.channels,))
            except ValueError:
                bshape = ()
            if bias.ndim > 2 or len(bshape) == 0 or bshape[-1] != p.channels:
                self._stats["skipped_shape_mismatch"] += 1
                return None
        w_t.values = (w.astype(np.float64) * p.scale[None, :]).astype(w.dtype)
        new_b = p.shift if bias is None else bias * p.scale + p.shift
        if add is not None:
            assert isinstance(bias_t, gs.Constant)
            bias_t.values = new_b.astype(w.dtype)
            return add
        const = gs.Constant(self._index.unique_name(f"{mm.name or w_t.name}.bias"), new_b.astype(w.dtype))
        new_add = gs.Node("Add", name=self._index.unique_name(f"{mm.name or 'MatMul'}.bias_add"),
                          inputs=[mm_out, const], outputs=[])
        self.tag(new_add)
        replaced[id(p.node)] = [new_add]
        return new_add

    def _take_output(self, last: gs.Node, p: _BnParams) -> None:
        """Detach the BN and make ``last`` produce the BN's output tensor (its name survives)."""
        p.node.inputs.clear()
        p.node.outputs.clear()
        old = last.outputs[0] if last.outputs else None
        if last.outputs:
            last.outputs[0] = p.y
        else:
            last.outputs.append(p.y)
        if old is not None:
            if p.y.dtype is None:
                p.y.dtype = old.dtype
            if p.y.shape is None:
                p.y.shape = old.shape

    # ----------------------------------------------------------------------------------------- mul+add
    def _bn_rank(self, p: _BnParams) -> int | None:
        r = known_rank(p.y)
        if r is not None:
            return r
        prod = producer(p.x)
        if prod is not None and is_onnx_op(prod, "Conv", "ConvTranspose") and len(prod.inputs) > 1:
            r = known_rank(prod.inputs[1])  # the weight's rank is the output's
            if r is not None:
                return r
        return infer_rank(p.x)

    def _to_muladd(self, p: _BnParams, replaced: dict[int, list[gs.Node]]) -> None:
        rank = self._bn_rank(p)
        if rank is None or rank < 2:
            self._stats["skipped_unknown_rank"] += 1
            log.debug("%s: rank of the input unknown; BatchNormalization left as is", p.node.name)
            return
        shape = (p.channels,) + (1,) * (rank - 2)
        base = p.node.name or p.y.name
        idx = self._index
        scale_c = gs.Constant(idx.unique_name(f"{base}.scale"), p.scale.reshape(shape).astype(p.dtype))
        shift_c = gs.Constant(idx.unique_name(f"{base}.shift"), p.shift.reshape(shape).astype(p.dtype))
        mid = gs.Variable(idx.unique_name(f"{p.y.name}.scaled"), dtype=p.x.dtype, shape=p.x.shape)
        p.node.inputs.clear()
        p.node.outputs.clear()
        mul = gs.Node("Mul", name=idx.unique_name(f"{base}.mul"), inputs=[p.x, scale_c], outputs=[mid])
        add = gs.Node("Add", name=idx.unique_name(f"{base}.add"), inputs=[mid, shift_c], outputs=[p.y])
        replaced[id(p.node)] = [self.tag(mul), self.tag(add)]
        self._stats["bn_to_muladd"] += 1
        log.debug("%s: lowered to Mul + Add", base)


def _float_dtype(tensor_dtype: object, fallback: np.dtype) -> np.dtype:
    if tensor_dtype is None:
        return np.dtype(fallback)
    try:
        dt = np.dtype(tensor_dtype)  # type: ignore[call-overload]
    except TypeError:
        return np.dtype(fallback)
    return dt if np.issubdtype(dt, np.floating) else np.dtype(fallback)
