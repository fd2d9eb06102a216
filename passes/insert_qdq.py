"""insert-qdq: rewrite the planned nodes into QuantizeLinear/DequantizeLinear form.

For every node the resolved plan quantizes:

* **weights** become quantized initializers read through a ``DequantizeLinear``::

      W (float const)  ->  Wq (int8/int4/fp8 const) --DequantizeLinear(s_w, z_w[, axis][, block_size])--> W'

  so the file really shrinks. Per-channel axes follow the op: Conv 0, ConvTranspose 1 (weight
  ``[C_in, C_out/g, k…]``), Gemm 0 with ``transB=1`` else 1, MatMul the last axis, LSTM/GRU/RNN W and R 1. Block-wise scales run along
  the reduction axis (Conv 1, ConvTranspose 0, Gemm 1 with ``transB=1`` else 0, MatMul the second-to-last).
* **activations** (the tensors in ``ctx.activation_specs``, ranges from calibration) get one
  ``QuantizeLinear -> DequantizeLinear`` pair each, shared by all the consumers that should read it
  (``x̂ = (clip(round(x/s)+z) − z)·s``; asymmetric ranges are widened to include 0, so s > 0 always);
* an activation with ``calibration: dynamic`` is quantized at run time instead:
  ``DynamicQuantizeLinear(x) -> (xq, s, z) -> DequantizeLinear(xq, s, z)`` (uint8, ``s = (max(x, 0) −
  min(x, 0)) / 255``, ``z = round(−min(x, 0) / s)``, per run); onnxruntime fuses it with a MatMul's int8 weight
  into ``DynamicQuantizeMatMul``. Its Conv / Gemm bias stays float (there is no fixed ``s_x`` for int32 codes);
* ``granularity: per_token`` with ``calibration: dynamic``: one run-time scale (and zero point) per row of a
  MatMul / Gemm input, in standard ONNX ops (``ReduceMin`` / ``ReduceMax`` → scale, zero point → ``Div`` /
  ``Round`` / ``Clip`` / ``Cast`` codes → ``(q − z)·s``; :mod:`passes._per_token`). A tensor some reader does
  not read as its row operand (attention's K, V) gets one run-time scale per tensor instead
  (``DynamicQuantizeLinear`` for uint8). The ort target lowers a MatMul on it to ``MatMulInteger``
  (``ort-per-token-matmul``);
* ``scale: float16`` (weights, scheme int): the scales are rounded up to float16 before the codes are computed
  (:func:`qcompiler.quant.float16_scale`) and stored as a float16 initializer read through
  ``Cast(to float)``: ``Wq --DequantizeLinear(Cast(s16), z_w)--> W'``; half the bytes of float32 block scales,
  the same product ``(q − z) · s`` (the cast is exact). A scale above 65504 is refused, naming the node;
* weights with a low-bit ``scheme`` (binary / ternary / shift) or ``scale: pow2`` are quantized by
  :mod:`qcompiler.quant.schemes`: integer codes (int4/int8/int16/int32, zero point 0) times a per-channel scale, read
  through the same ``DequantizeLinear``; **binary activations** (``activation: {scheme: binary}``) become
  ``x̂ = Where(x >= 0, β, −β)`` with β = mean|x| from calibration;
* **bias** of Conv / ConvTranspose / Gemm (int8 weights and activations) becomes int32 codes with
  ``s_b = s_x · s_w`` and ``z_b = 0``; when a bias would overflow int32 (tiny scales) the weight scale of that
  channel is raised first (``qcompiler.quant.quantize_bias``). ``s_b`` is not stored: it is
  ``Mul(s_w, s_x)`` of the two scale constants already in the file (float32, the same bits; onnxruntime
  folds it at session start and still fuses ``QLinearConv`` / ``QGemm``).

A weight ``DequantizeLinear`` leaves out an all-zero zero point when its codes are a signed integer or fp8 type
(a missing ``x_zero_point`` is 0 of the type of ``x``, so the result is the same bit for bit), except for a
weight a Gemm reads (onnxruntime fuses ``QGemm`` only with an explicit zero point). Activation Q/DQ pairs keep
theirs (it sets QuantizeLinear's output type).

Names: every tensor and node the pass creates is named after the tensor it stands for, ``<base>:<role>`` —
``:q`` quantized codes / tensor, ``:s`` scale, ``:zp`` zero point, ``:dq`` dequantized tensor, ``:Q`` / ``:DQ``
the QuantizeLinear / DequantizeLinear nodes (binary activations: ``:bin`` and friends) — made unique with
``GraphIndex.unique_name`` (``<base>:q_1``, ...), so they are deterministic. Original names are kept.

* **tables** of Gather (an embedding lookup, weight-only: the indices stay integers) are weights like the
  others, ``Gather(DequantizeLinear(Eq, s; axis 0 | axis 1, block_size), ids)``: one scale per row
  (``per_channel``) or per block of a row (``block``). A table another weight op also reads (a tied output
  projection: ``Gemm(h, E, transB=1)``, ``MatMul(x, E)``) is quantized once, the Gather's way, and every reader
  reads the same ``DequantizeLinear`` (stat ``weights_table_shared``); such a MatMul keeps float activations
  (per-row scales run along its K axis, which no integer MatMul kernel takes; ``table_readers_weight_only``).

Option ``exact-weights`` (``insert-qdq{exact-weights=true}``; ``CompileOptions.exact_weights``): everything as
without it, and each quantized weight's float values recorded (``ctx.exact_weights``) for the ``exact-weights``
pass, which puts them back after the target's lowering: a diagnostic of what the activations alone cost.

Weights shared by several quantized nodes with the same spec are quantized once. Re-running the pass
changes nothing: a weight already read through DequantizeLinear and an activation already dequantized are
left alone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from qcompiler import ir, quant
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.pass_base import Pass, PassResult
from qcompiler.ir.axes import block_axis, per_channel_axis
from qcompiler.ir.graph import GraphIndex, stored_scale
from qcompiler.plan import TABLE_OPS, NodePlan, QuantSpec, required_opset
from qcompiler.quant import schemes

from ._per_token import emit_per_token

log = logging.getLogger(__name__)


#: a name factory: ``base`` if unused, else ``base_1``, ``base_2``, ... (deterministic; reserved once handed out)
_Names = Callable[[str], str]


@dataclasses.dataclass
class Options:
    #: record each quantized weight's float values for the ``exact-weights`` pass (run after lowering)
    exact_weights: bool = False


class InsertQDQPass(Pass):
    """Quantize planned weights (int initializers + DequantizeLinear), activations (Q->DQ) and biases (int32)."""

    name = "insert-qdq"
    Options = Options
    requires = frozenset({"plan-resolved", "calibrated"})
    produces = frozenset({"qdq"})

    def run(self, ctx: CompileContext) -> PassResult:
        assert ctx.resolved is not None
        graph = ctx.graph
        stats: Counter[str] = Counter()
        names: _Names = GraphIndex(graph).unique_name
        tensors = graph.tensors()
        nodes = {n.name: n for n in graph.nodes}
        specs_used = [s for np_ in ctx.resolved.nodes.values() for s in (np_.weight, np_.activation) if s]
        need, why = required_opset(specs_used)
        if ctx.opset < need:
            raise RuntimeError(f"graph opset {ctx.opset} < {need} needed for {why} (the driver upgrades first)")

        # a Gather table another weight op also reads (a tied output projection) is quantized once, the
        # Gather's way (per row / row-block), and every reader reads that one DequantizeLinear. A MatMul reading
        # it keeps float activations: its scales run along K, which no integer MatMul kernel takes
        # (onnxruntime's MatMulIntegerToFloat fusion fails on them)
        tables: dict[str, tuple[QuantSpec, gs.Node]] = {}
        for np_ in ctx.resolved.nodes.values():
            node = nodes.get(np_.node)
            if np_.op_type in TABLE_OPS and np_.weight is not None and np_.weight_inputs and node is not None:
                t = node.inputs[np_.weight_inputs[0]]
                if isinstance(t, gs.Constant):
                    tables.setdefault(t.name, (np_.weight, node))
        weight_only = {c.name for name in tables for c in tensors[name].outputs
                       if c.op == "MatMul" and len(c.inputs) > 1 and c.inputs[1].name == name}

        # ---- activations ------------------------------------------------------------------------------
        order: dict[str, int] = {}
        for n in graph.nodes:
            for t in [*n.inputs, *n.outputs]:
                order.setdefault(t.name, len(order))
        readers: dict[str, set[tuple[str, int]]] = {}
        for np_ in ctx.resolved.nodes.values():
            if np_.node in weight_only and np_.activation_inputs:
                stats["table_readers_weight_only"] += 1
                continue
            for i in np_.activation_inputs:
                node = nodes.get(np_.node)
                if node is not None and i < len(node.inputs):
                    readers.setdefault(node.inputs[i].name, set()).add((np_.node, i))
        for name in sorted(ctx.activation_specs, key=lambda k: (order.get(k, 1 << 30), k)):
            spec = ctx.activation_specs[name]
            t = tensors.get(name)
            if t is None or isinstance(t, gs.Constant):
                continue
            dynamic = spec.calibration == "dynamic" and not spec.is_float
            st = ctx.stats.get(name)
            if st is None and not dynamic:
                raise RuntimeError(f"no calibration statistics for tensor '{name}'")
            everyone = name in ctx.activation_all_consumers
            targets = []
            for consumer in list(t.outputs):
                if consumer.op in ("QuantizeLinear", "DequantizeLinear") or ir.tag_of(consumer) == self.name:
                    continue
                for i, inp in enumerate(consumer.inputs):
                    if inp is t and (everyone or (consumer.name, i) in readers.get(name, set())):
                        targets.append((consumer, i))
            if not targets:
                stats["activation_already_quantized"] += 1
                continue
            if spec.scheme == "binary":
                # only the planned (XNOR) readers; a reader the target added keeps the float tensor
                targets = [(c, i) for c, i in targets if (c.name, i) in readers.get(name, set())]
                if targets:
                    assert st is not None  # binary activations are calibrated (a dynamic spec is uint8)
                    self._emit_binarize(graph, names, t, schemes.binary_activation_scale(st), targets)
                    stats["activations_binary"] += 1
                continue
            if dynamic and spec.granularity == "per_token":
                # one run-time scale per row where every reader multiplies rows (a MatMul's / Gemm's A); else one
                # per tensor (a row of attention's K or V runs along the reduction axis: its scale would not
                # factor out of the product) — DynamicQuantizeLinear for uint8, the same ops over every axis for int8
                per_row = all(_row_reader(c, i) for c, i in targets)
                if per_row or spec.symmetric:
                    dq_pt = emit_per_token(graph, names, self.tag, t, spec.dtype, spec.symmetric, ctx.opset,
                                           per_row)
                    for consumer, i in targets:
                        consumer.inputs[i] = dq_pt
                    stats[f"activations_{spec.dtype}_per_token{'' if per_row else '_as_per_tensor'}"] += 1
                    continue
                stats[f"activations_{spec.dtype}_per_token_as_per_tensor"] += 1
            dq_out = gs.Variable(names(f"{name}:dq"), dtype=np.float32, shape=t.shape)
            s_t: gs.Tensor
            z_t: gs.Tensor
            if dynamic:  # the range of each run, measured by DynamicQuantizeLinear (uint8, asymmetric, with 0)
                q_out = gs.Variable(names(f"{name}:q"), dtype=np.uint8, shape=t.shape)
                s_t = gs.Variable(names(f"{name}:s"), dtype=np.float32, shape=[])
                z_t = gs.Variable(names(f"{name}:zp"), dtype=np.uint8, shape=[])
                graph.nodes.append(self.tag(gs.Node("DynamicQuantizeLinear", names(f"{name}:DynQ"),
                                                    inputs=[t], outputs=[q_out, s_t, z_t])))
            else:
                assert st is not None
                lo, hi = st.range(spec)
                scale, zp = quant.qparams(lo, hi, spec.dtype, spec.symmetric)
                s_t = gs.Constant(names(f"{name}:s"), np.asarray(scale, dtype=np.float32).reshape(()))
                z_t = gs.Constant(names(f"{name}:zp"), np.asarray(zp).reshape(()))  # Q's output type: always given
                q_out = gs.Variable(names(f"{name}:q"), dtype=z_t.values.dtype, shape=t.shape)
                graph.nodes.append(self.tag(gs.Node("QuantizeLinear", names(f"{name}:Q"),
                                                    inputs=[t, s_t, z_t], outputs=[q_out])))
            graph.nodes.append(self.tag(gs.Node("DequantizeLinear", names(f"{name}:DQ"),
                                                inputs=[q_out, s_t, z_t], outputs=[dq_out])))
            for consumer, i in targets:
                consumer.inputs[i] = dq_out
            stats[f"activations_{spec.dtype}{'_dynamic' if dynamic else ''}"] += 1

        # ---- weights and biases ------------------------------------------------------------------------
        weight_cache: dict[tuple[Any, ...], gs.Variable] = {}
        consumers_of: dict[str, int] = {}
        for n in graph.nodes:
            for t in n.inputs:
                if isinstance(t, gs.Constant):
                    consumers_of[t.name] = consumers_of.get(t.name, 0) + 1
        for np_ in ctx.resolved.nodes.values():
            if np_.weight is None or not np_.weight_inputs:
                continue
            node = nodes.get(np_.node)
            if node is None:
                continue
            for wi in np_.weight_inputs:
                w = node.inputs[wi]
                if not isinstance(w, gs.Constant):
                    stats["weight_already_quantized"] += 1
                    continue
                before = list(node.inputs)
                self._quantize_weight(ctx, node, np_, wi, w, weight_cache, consumers_of, names, graph, stats,
                                      tables.get(w.name))
                # Release each float weight (and bias) once its quantized form replaced it and nothing else reads
                # it: a large model never holds its float and quantized weights at the same time.
                outs = {id(t) for t in graph.outputs}
                for t in before:
                    if isinstance(t, gs.Constant) and not t.outputs and id(t) not in outs:
                        ir.release_values(t)
        return PassResult(modified=sum(v for k, v in stats.items() if k.startswith(("activations_", "weights_"))) > 0,
                          stats=stats)

    # --------------------------------------------------------------------------------------------------
    def _quantize_weight(self, ctx: CompileContext, node: gs.Node, np_: NodePlan, wi: int, w: gs.Constant,
                         cache: dict[tuple[Any, ...], gs.Variable], consumers_of: dict[str, int],
                         names: _Names, graph: gs.Graph, stats: Counter[str],
                         table: tuple[QuantSpec, gs.Node] | None = None) -> None:
        spec = np_.weight
        assert spec is not None
        axis_node = node
        if table is not None and node.op not in TABLE_OPS:
            spec, axis_node = table  # the table's quantization, shared with its Gather
            stats["weights_table_shared"] += 1
        values = np.asarray(w.values, dtype=np.float32)
        axis: int | None = None
        block: int | None = None
        if spec.granularity == "per_channel":
            axis = spec.axis if spec.axis is not None else per_channel_axis(axis_node, values.ndim)
        elif spec.granularity == "block":
            axis = spec.axis if spec.axis is not None else block_axis(axis_node, values.ndim)
            block = spec.block_size
        if axis is not None and axis < 0:
            axis += values.ndim
        key = (w.name, spec, axis, block)
        shared = consumers_of.get(w.name, 0) > 1
        if key in cache and shared:
            node.inputs[wi] = cache[key]
            stats["weights_shared_reused"] += 1
            return
        if not np.isfinite(values).all():
            raise UserError(f"node '{node.name}' ({node.op}): weight '{w.name}' contains NaN or Inf; "
                            "cannot quantize it")
        override = ctx.weight_overrides.get((node.name, wi))
        # blocks are built at most one element longer than the reduction axis: a block_size beyond it is one
        # block (zero padding included, the same scales), never an allocation of block_size rows
        work_block = _bounded_block(block, values.shape[axis] if block and axis is not None else 0)
        if override is not None:
            qt = override
            axis, block = qt.axis, qt.block_size
            stats["weights_from_override"] += 1
        elif schemes.uses_scheme_quantizer(spec):
            # binary / ternary / shift codes, or int with power-of-two scales (qcompiler.quant.schemes)
            res = schemes.quantize_for_spec(values, spec, axis, work_block, int(graph.opset))
            qt = _with_block(res.qt, block)
            ctx.report.setdefault("lowbit", {}).setdefault("layers", {})[node.name] = res.info
            if spec.scheme == "ternary":
                stats["ternary_zero_codes"] += res.zeros
                stats["ternary_codes"] += int(values.size)
        else:
            try:
                qt = _with_block(quant.quantize_weight(values, spec.dtype, spec.symmetric, axis, work_block,
                                                       spec.range, spec.scale == "pow2",
                                                       f16=spec.scale == "float16"), block)
            except quant.Float16ScaleError as e:
                raise UserError(f"node '{node.name}' ({node.op}, {_rule_of(np_)}): weight '{w.name}': scale "
                                f"float16: {e}; use scale float for this layer") from None

        # bias: int32 with s_x * s_w (and the overflow guard raising s_w where needed)
        bias_codes = None
        x_in = node.inputs[0] if node.inputs else None
        x_name = getattr(x_in, "name", "")
        src = x_in.inputs[0] if x_in is not None and x_in.inputs else None
        x_scale = None
        x_scale_c: gs.Constant | None = None
        if src is not None and src.op == "DequantizeLinear" and isinstance(src.inputs[1], gs.Constant):
            x_scale_c = src.inputs[1]
            x_scale = float(np.asarray(x_scale_c.values).reshape(()))
        bias_ok = (
            x_scale is not None
            and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant)
            and wi == 1 and node.op in ("Conv", "ConvTranspose", "Gemm")
            and consumers_of.get(node.inputs[2].name, 0) == 1 and not shared
            and spec.dtype in ("int8", "uint8") and spec.symmetric and block is None and spec.scheme == "int"
            and np_.activation is not None and np_.activation.dtype in ("int8", "uint8")
            and self._bias_layout_ok(node, node.inputs[2], values, axis)
        )
        if bias_ok:
            assert x_scale is not None
            b = np.asarray(node.inputs[2].values, dtype=np.float32).reshape(-1)
            codes, bscale, ws = quant.quantize_bias(b, x_scale, qt.scale)
            if not np.array_equal(np.asarray(ws).reshape(np.shape(qt.scale)), qt.scale):
                stats["bias_overflow_guard"] += 1
                if spec.scale == "pow2":
                    ws = schemes.ceil_pow2(ws)  # raised scales stay powers of two
                elif spec.scale == "float16":
                    ws = quant.float16_scale(ws)  # rounded up: still enough for the bias
                qt = quant.QuantizedTensor(quant.quantize(values, ws, qt.zero_point, spec.dtype, axis, block),
                                           np.asarray(ws, dtype=np.float32).reshape(np.shape(qt.scale)),
                                           qt.zero_point, axis, block, spec.dtype)
                codes, bscale, _ = quant.quantize_bias(b, x_scale, qt.scale)
            bias_codes = (codes, bscale)
        elif x_name:
            stats["bias_kept_float"] += int(len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant))

        # onnxruntime fuses DQ -> Gemm into QGemm only when the weight DequantizeLinear has an explicit zero
        # point, so a weight any Gemm reads keeps its zero point even when it is 0 (Conv / MatMul fuse without)
        dq_out = self._emit_dq(graph, names, w.name, qt, explicit_zp=any(c.op == "Gemm" for c in w.outputs),
                               f16=spec.scale == "float16")
        cache[key] = dq_out
        node.inputs[wi] = dq_out
        if self.options.exact_weights:  # the float values W' stands for, put back after lowering (exact-weights)
            ctx.exact_weights[dq_out.name] = values
        stats[f"weights_{spec.dtype if spec.scheme == 'int' else spec.scheme}_{spec.granularity}"] += 1
        stats["weight_bytes_float"] += values.nbytes
        stats["weight_bytes_quantized"] += (qt.q.size * schemes.storage_bits(qt.dtype) + 7) // 8
        if spec.scale == "float16":
            stats["weight_scales_float16"] += int(np.size(qt.scale))
        if bias_codes is not None:
            codes, bscale = bias_codes
            bias_c = node.inputs[2]
            bq = quant.QuantizedTensor(codes, np.asarray(bscale, dtype=np.float32),
                                       np.zeros(np.shape(bscale), dtype=np.int32),
                                       0 if np.size(bscale) > 1 else None, None, "int32")
            w_scale_c = dq_out.inputs[0].inputs[1]  # the weight DequantizeLinear's scale
            assert x_scale_c is not None
            node.inputs[2] = self._emit_dq(graph, names, bias_c.name, bq, scale_product=(w_scale_c, x_scale_c))
            stats["biases_int32"] += 1

    @staticmethod
    def _bias_layout_ok(node: gs.Node, bias: gs.Constant, w: np.ndarray, axis: int | None) -> bool:
        b = np.asarray(bias.values)
        if node.op == "Conv":
            return b.ndim == 1 and b.shape[0] == w.shape[0]
        if node.op == "ConvTranspose":
            return int(node.attrs.get("group", 1)) == 1 and b.ndim == 1 and b.shape[0] == w.shape[1]
        if node.op == "Gemm":
            n_out = w.shape[0] if int(node.attrs.get("transB", 0)) else w.shape[1]
            return (b.ndim == 1 and b.shape[0] == n_out and float(node.attrs.get("alpha", 1.0)) == 1.0
                    and float(node.attrs.get("beta", 1.0)) == 1.0 and not int(node.attrs.get("transA", 0)))
        return False

    def _emit_binarize(self, graph: gs.Graph, names: _Names, t: gs.Tensor, beta: float,
                       targets: list[tuple[gs.Node, int]]) -> None:
        """Binary activation x̂ = β·sign(x), sign(0) = +1: ``Where(x >= 0, β, −β)`` (``Not(Less)`` before opset 12)."""
        zero = gs.Constant(names(f"{t.name}:zero"), np.zeros((), dtype=np.float32))
        cond = gs.Variable(names(f"{t.name}:nonneg"), dtype=np.bool_, shape=t.shape)
        if int(graph.opset) >= 12:
            graph.nodes.append(self.tag(gs.Node("GreaterOrEqual", names(f"{t.name}:GreaterOrEqual"),
                                                inputs=[t, zero], outputs=[cond])))
        else:
            neg = gs.Variable(names(f"{t.name}:neg"), dtype=np.bool_, shape=t.shape)
            graph.nodes.append(self.tag(gs.Node("Less", names(f"{t.name}:Less"), inputs=[t, zero], outputs=[neg])))
            graph.nodes.append(self.tag(gs.Node("Not", names(f"{t.name}:Not"), inputs=[neg], outputs=[cond])))
        pos = gs.Constant(names(f"{t.name}:beta"), np.asarray(beta, dtype=np.float32).reshape(()))
        neg_beta = gs.Constant(names(f"{t.name}:-beta"), np.asarray(-beta, dtype=np.float32).reshape(()))
        out = gs.Variable(names(f"{t.name}:bin"), dtype=np.float32, shape=t.shape)
        graph.nodes.append(self.tag(gs.Node("Where", names(f"{t.name}:Where"), inputs=[cond, pos, neg_beta],
                                            outputs=[out])))
        for consumer, i in targets:
            consumer.inputs[i] = out

    def _emit_dq(self, graph: gs.Graph, names: _Names, base: str, qt: quant.QuantizedTensor,
                 explicit_zp: bool = False,
                 scale_product: tuple[gs.Tensor, gs.Tensor] | None = None, f16: bool = False) -> gs.Variable:
        """``DequantizeLinear`` of constant codes. ``scale_product`` (an int32 bias: the weight and input scale
        constants): the scale is computed in the graph as their float32 ``Mul`` when that gives ``qt.scale`` bit
        for bit, instead of being stored a second time. ``f16`` (``scale: float16``; ``qt.scale`` holds
        float16 values): the scale is stored as float16 (``<base>:s16``) and ``Cast`` to float in the graph
        (``<base>:s``), so the DequantizeLinear computes ``(q − z) · float32(s16)`` as before."""
        q_c = gs.Constant(names(f"{base}:q"), qt.q)
        scale = np.asarray(qt.scale, dtype=np.float32)
        zp = np.asarray(qt.zero_point)
        if qt.axis is None:
            scale, zp = scale.reshape(()), zp.reshape(())
        elif qt.block_size is None:
            scale, zp = scale.reshape(-1), zp.reshape(-1)
        s_c: gs.Tensor | None = None
        if scale_product is not None and _same_product(scale, *scale_product):
            s_c = gs.Variable(names(f"{base}:s"), dtype=np.float32, shape=list(scale.shape))
            graph.nodes.append(self.tag(gs.Node("Mul", names(f"{base}:Mul"), inputs=list(scale_product),
                                                outputs=[s_c])))
        if s_c is None and f16:
            if not np.array_equal(scale.astype(np.float16).astype(np.float32), scale):
                raise RuntimeError(f"weight '{base}': scale float16 asked for, but its scales are not float16 values")
            s16 = gs.Constant(names(f"{base}:s16"), scale.astype(np.float16))
            s_c = gs.Variable(names(f"{base}:s"), dtype=np.float32, shape=list(scale.shape))
            graph.nodes.append(self.tag(gs.Node("Cast", names(f"{base}:Cast"), attrs={"to": _FLOAT},
                                                inputs=[s16], outputs=[s_c])))
        if s_c is None:
            s_c = gs.Constant(names(f"{base}:s"), scale)
        inputs: list[Any] = [q_c, s_c]
        if explicit_zp or not zero_point_optional(qt.q.dtype, zp):
            inputs.append(gs.Constant(names(f"{base}:zp"), zp))
        attrs: dict[str, Any] = {}
        if qt.axis is not None:
            attrs["axis"] = int(qt.axis)
        if qt.block_size:
            attrs["block_size"] = int(qt.block_size)
        out = gs.Variable(names(f"{base}:dq"), dtype=np.float32, shape=list(qt.q.shape))
        graph.nodes.append(self.tag(gs.Node("DequantizeLinear", names(f"{base}:DQ"), attrs=attrs,
                                            inputs=inputs, outputs=[out])))
        return out


#: onnx.TensorProto.FLOAT, Cast's ``to``
_FLOAT = 1


def _rule_of(np_: NodePlan) -> str:
    return np_.rules[-1] if np_.rules else "plan defaults"


def _row_reader(node: gs.Node, i: int) -> bool:
    """Input ``i`` of ``node`` is the left operand whose rows the op multiplies (MatMul A, Gemm A without transA)."""
    return i == 0 and (node.op == "MatMul" or (node.op == "Gemm" and not int(node.attrs.get("transA", 0))))


def _same_product(scale: np.ndarray, a: gs.Tensor, b: gs.Tensor) -> bool:
    """True when the float32 scales ``a · b`` (broadcast; constants, or a float16 constant cast to float) equal
    ``scale`` bit for bit, shape included."""
    va, vb = stored_scale(a), stored_scale(b)
    if va is None or vb is None or va.dtype != np.float32 or vb.dtype != np.float32:
        return False
    prod = np.asarray(va * vb, dtype=np.float32)
    return prod.shape == scale.shape and np.array_equal(prod.view(np.uint32), scale.view(np.uint32))


#: code types whose DequantizeLinear may drop an all-zero zero point: a missing ``x_zero_point`` is 0 of the
#: type of ``x`` (the spec: "x_zero_point and x must have the same type", "Zero point is 0 when it's not
#: specified"); signed integers and fp8 (whose zero point is +0.0) only
#: block sizes up to this are always computed as given (what real plans use: 16 ... 256)
_EXACT_BLOCK = 256


def _bounded_block(block: int | None, n: int) -> int | None:
    """The block size to compute with for a reduction axis of length ``n``: ``block`` itself, except that a
    block beyond ``max(2 n, 256)`` becomes ``n + 1`` — still one block holding the whole axis plus zero padding,
    so the same ranges and codes, without padding ``block - n`` rows (a 2^31 block_size would allocate
    hundreds of GiB)."""
    if not block or n <= 0 or block <= max(2 * n, _EXACT_BLOCK):
        return block
    return n + 1


def _with_block(qt: quant.QuantizedTensor, block: int | None) -> quant.QuantizedTensor:
    """``qt`` carrying the plan's ``block_size`` (what DequantizeLinear's attribute says) when it was computed
    with a bounded one."""
    if qt.block_size == block or not block:
        return qt
    return dataclasses.replace(qt, block_size=block)


_ZP_OPTIONAL = frozenset(np.dtype(t) for t in (np.int8, np.int16, np.int32, ml_dtypes.int4,
                                                ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2))


def zero_point_optional(code_dtype: Any, zp: np.ndarray) -> bool:
    """True when a weight DequantizeLinear of ``code_dtype`` codes computes the same without zero point ``zp``:
    a signed integer or fp8 type and every zero point bit 0 (so an fp8 −0.0 stays explicit)."""
    dt = np.dtype(code_dtype)
    if dt not in _ZP_OPTIONAL or np.asarray(zp).dtype != dt:
        return False
    return not np.any(np.ascontiguousarray(zp).view(np.uint8))


def spec_summary(spec: QuantSpec | None) -> str:
    if spec is None:
        return "float"
    return f"{spec.dtype}/{spec.granularity}"
