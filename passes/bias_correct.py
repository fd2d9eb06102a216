"""bias-correct: remove the mean output error that weight quantization adds to each layer (Nagel et al. 2019).

Rounding a weight W to W̃ = W + ε changes a layer's output by ``ε·x``. Its expectation ``E[ε·x] = ε·E[x]`` is a
per-output-channel offset that does not average out and is passed on, layer after layer. For every
Conv / Gemm / MatMul whose weight the plan quantizes, this pass estimates that offset and subtracts it from the
layer's bias (creating a bias when there is none):

    b ← b − E[ W̃ ⊛ x̃ − W ⊛ x̃ ]        (per output channel)

* **empirical** (real calibration data; skipped with a warning without): the graph is quantized in a scratch
  copy exactly as ``insert-qdq`` will do it (same plan, calibrated ranges and ``gptq`` weight overrides); each
  corrected layer gets a float twin there reading the same (quantized) input x̃, and the mean difference of
  their outputs over all samples and positions is accumulated streaming, per channel.
* **analytic** (``--calib none``): ``E[x]`` comes from the BatchNormalization statistics ``fold-batchnorm``
  recorded for the layer's input (a normal N(β, γ²) per channel, through a ReLU:
  ``E[relu(x)] = β·Φ(β/γ) + γ·φ(β/γ)``), and the offset is ``Σ_taps ε·E[x]`` (Conv borders ignored).

It runs after ``calibrate`` (and after ``gptq``) and before ``insert-qdq``, which then quantizes the corrected
bias. Layers whose bias is shared or not per-channel are left alone. A layer is corrected once: a second run
skips the layers already corrected in this compile.

Stats: ``corrected``, ``skipped_bias_layout``, ``skipped_no_statistics``, ``samples``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler import ir, quant
from qcompiler.calib import bn_statistics
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.pass_base import Pass, PassResult
from qcompiler.ir.graph import GraphIndex, is_onnx_op

from ._layers import Layer, find_layer
from ._stream import progress_of, source_for, stream
from .insert_qdq import InsertQDQPass

log = logging.getLogger(__name__)

@dataclass
class Options:
    samples: int | None = None  # use at most N calibration samples

    def validate(self, pass_name: str = "bias-correct") -> None:
        if self.samples is not None and self.samples <= 0:
            raise UserError(f"pass '{pass_name}' option 'samples': must be a positive integer, got {self.samples}")


class BiasCorrectPass(Pass):
    """Shift each quantized layer's bias by minus the mean output error its weight quantization causes."""

    name = "bias-correct"
    Options = Options
    requires = frozenset({"plan-resolved", "calibrated"})
    produces = frozenset({"bias-corrected"})
    invalidates = frozenset({"qdq"})
    invalidates_why = "it corrects float biases"

    def run(self, ctx: CompileContext) -> PassResult:
        assert ctx.resolved is not None
        stats: Counter[str] = Counter()
        done = ctx.bias_corrected
        index = GraphIndex(ctx.graph)
        layers: list[Layer] = []
        for node in ctx.graph.nodes:
            np_ = ctx.resolved.nodes.get(node.name)
            if np_ is None or np_.weight is None or not is_onnx_op(node, "Conv", "Gemm", "MatMul"):
                continue
            if node.name in done:
                stats["already_corrected"] += 1
                continue
            lay = find_layer(node, index)
            if lay is None or not lay.bias_writable():
                stats["skipped_bias_layout"] += 1
                continue
            layers.append(lay)
        if not layers:
            return PassResult(False, stats)
        qweights, clone = self._quantized_copy(ctx, layers)
        if ctx.data_free:
            shifts = self._analytic(ctx, layers, qweights, stats)
        else:
            source = source_for(ctx, self.name, self.options.samples)
            if source is None:
                stats["skipped_no_data"] = len(layers)
                return PassResult(False, stats)
            shifts = self._empirical(source, layers, clone, stats, progress_of(ctx, "bias-correct"))
        modified = False
        total = 0.0
        for lay in layers:
            e = shifts.get(lay.node.name)
            if e is None:
                continue
            lay.set_bias(lay.bias_values() - e, self.name)
            done.add(lay.node.name)
            stats["corrected"] += 1
            total += float(np.abs(e).mean())
            modified = True
        ctx.report["bias_correct"] = {"mode": "analytic" if ctx.data_free else "empirical",
                                      "layers": stats["corrected"],
                                      "mean_abs_shift": round(total / max(stats["corrected"], 1), 6)}
        return PassResult(modified, stats)

    # ---------------------------------------------------------------------------------- scratch quantization
    def _quantized_copy(self, ctx: CompileContext, layers: list[Layer]) -> tuple[dict[str, np.ndarray], gs.Graph]:
        """Quantize a copy of the graph as insert-qdq will; returns (node -> dequantized weight W̃, the copy)."""
        clone = ir.copy_graph(ctx.graph)
        sub = CompileContext(graph=clone, meta=ctx.meta, plan=ctx.plan, target=ctx.target, calib=ctx.calib,
                  resolved=ctx.resolved, activation_specs=dict(ctx.activation_specs),
                  activation_all_consumers=set(ctx.activation_all_consumers), stats=ctx.stats,
                  properties=set(ctx.properties), weight_overrides=ctx.weight_overrides, options=dict(ctx.options),
                  data_free=ctx.data_free, seed=ctx.seed)
        InsertQDQPass().run(sub)
        by_name = {n.name: n for n in clone.nodes}
        qweights: dict[str, np.ndarray] = {}
        for lay in layers:
            node = by_name.get(lay.node.name)
            src = node.inputs[1].inputs[0] if node is not None and node.inputs[1].inputs else None
            if src is None or src.op != "DequantizeLinear":
                continue
            q, s = src.inputs[0], src.inputs[1]
            zp = src.inputs[2] if len(src.inputs) > 2 else None
            if not isinstance(q, gs.Constant) or not isinstance(s, gs.Constant):
                continue
            axis = src.attrs.get("axis")
            block = src.attrs.get("block_size")
            zpv = np.asarray(zp.values) if isinstance(zp, gs.Constant) else np.zeros(np.shape(s.values), np.int64)
            scale = np.asarray(s.values)
            ax = None if scale.size == 1 and block is None else int(axis if axis is not None else 1)
            qweights[lay.node.name] = quant.dequantize(np.asarray(q.values), scale, zpv, ax,
                                                      int(block) if block else None).astype(np.float64)
        return qweights, clone

    # ------------------------------------------------------------------------------------------ empirical
    def _empirical(self, source: Any, layers: list[Layer], clone: gs.Graph, stats: Counter[str],
                   progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
        by_name = {n.name: n for n in clone.nodes}
        pairs: dict[str, tuple[str, str, int]] = {}  # node -> (quantized output, float twin output, axis)
        taken = set(clone.tensors().keys())
        for lay in layers:
            node = by_name.get(lay.node.name)
            if node is None or not node.inputs[1].inputs:
                stats["skipped_not_quantized"] += 1
                continue
            twin_w = gs.Constant(_unique(f"{lay.weight.name}.bias_correct_float", taken), lay.w.astype(np.float32))
            y = node.outputs[0]
            twin_out = gs.Variable(_unique(f"{y.name}.bias_correct_ref", taken), dtype=np.float32)
            twin = gs.Node(node.op, _unique(f"{node.name}.bias_correct_ref", taken), attrs=dict(node.attrs),
                           inputs=[node.inputs[0], twin_w, *node.inputs[2:]], outputs=[twin_out])
            clone.nodes.append(twin)
            pairs[lay.node.name] = (y.name, twin_out.name, lay.act_axis)
        if not pairs:
            return {}
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}

        def consume(values: dict[str, np.ndarray]) -> None:
            for node_name, (yq, yf, axis) in pairs.items():
                d = np.moveaxis(values[yq].astype(np.float64) - values[yf], axis, 0)
                flat = d.reshape(d.shape[0], -1)
                sums[node_name] = sums.get(node_name, 0.0) + flat.sum(axis=1)
                counts[node_name] = counts.get(node_name, 0) + flat.shape[1]

        names = [n for yq, yf, _ in pairs.values() for n in (yq, yf)]
        stats["samples"] = stream(clone, names, source, consume, optimize=False,
                                  progress=progress)
        return {k: sums[k] / max(counts[k], 1) for k in sums}

    # ------------------------------------------------------------------------------------------- analytic
    def _analytic(self, ctx: CompileContext, layers: list[Layer], qweights: dict[str, np.ndarray],
                  stats: Counter[str]) -> dict[str, np.ndarray]:
        bn = bn_statistics(ctx)
        out: dict[str, np.ndarray] = {}
        for lay in layers:
            wq = qweights.get(lay.node.name)
            ex = input_mean(lay.node.inputs[0], bn)
            if wq is None or ex is None or ex.shape[0] != lay.n_in:
                stats["skipped_no_statistics"] += 1
                continue
            out[lay.node.name] = lay.in_sum(wq - lay.w.astype(np.float64), ex)
        return out


def _unique(base: str, taken: set[str]) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def _norm_cdf(z: np.ndarray) -> np.ndarray:
    return np.asarray([0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in z.reshape(-1)]).reshape(z.shape)


def relu_normal_mean(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """E[max(x, 0)] for x ~ N(mean, std²), per channel (std 0: max(mean, 0))."""
    safe = np.where(std > 0, std, 1.0)
    z = mean / safe
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    val = mean * _norm_cdf(z) + safe * pdf
    return np.where(std > 0, val, np.maximum(mean, 0.0))


def input_mean(t: gs.Tensor, bn: dict) -> np.ndarray | None:
    """E[t] per channel from recorded BN statistics of ``t`` or of the input of a ReLU producing ``t``."""
    st = bn.get(t.name)
    if st is not None:
        return np.asarray(st.mean, dtype=np.float64)
    prod = t.inputs[0] if t.inputs else None
    if prod is not None and is_onnx_op(prod, "Relu") and prod.inputs:
        st = bn.get(prod.inputs[0].name)
        if st is not None:
            return relu_normal_mean(np.asarray(st.mean, np.float64), np.asarray(st.std, np.float64))
    return None
