"""equalize: cross-layer equalization with bias absorption (Nagel et al. 2019, "Data-Free Quantization").

Matches pairs of weight layers ``L1 -> [Relu | LeakyRelu] -> L2`` (Conv / Gemm / MatMul, grouped and depthwise
Conv included, a per-channel bias Add after L1 allowed) where L1's output feeds only L2 (through the
activation), and channel i of L1's output is input channel i of L2. ReLU is positively homogeneous,
``relu(x / s) = relu(x) / s`` for s > 0, so for any s > 0 per channel

    W1[i] ← W1[i] / s_i,  b1[i] ← b1[i] / s_i,   W2[:, i] ← W2[:, i] · s_i

leaves the float function unchanged. Choosing ``s_i = √(r1_i / r2_i)`` — r1_i the range (max |W|) of L1's output
channel i, r2_i that of L2's input channel i — makes both ``√(r1_i·r2_i)``: channels whose weights (and so
activations) were tiny next to their neighbours' stop losing all their precision to a per-tensor activation
scale and to L2's per-output-channel weight scale. Chains ``A -> B -> C`` (e.g. MobileNet's expand ->
depthwise -> project) share B; the pairs are swept until no scale moves by more than ``tolerance`` (at most
``iterations`` sweeps).

``ranges=activations`` (needs real calibration data; else the weight ranges are used) replaces r1_i by the
measured range of the joining activation's channel i: with per-channel weight scales L1's own rows are free to
rescale, and what matters is balancing that activation (quantized per tensor) against L2's input weights.

**Bias absorption** (``absorb_bias``): when ``fold-batchnorm`` recorded the statistics of L1's output (a folded
BN: per channel mean β and std γ, see ``qcompiler.calib.bn_statistics``) and L1 is followed by a ReLU,
the part ``c_i = max(0, β_i − k·γ_i)`` (k = ``absorb_k``) that the ReLU input almost never goes below is moved
to L2: ``b1 ← b1 − c`` and ``b2 ← b2 + W2·c`` (summed over L2's kernel taps). This is exact whenever
L1's output stays ≥ c (``relu(x − c) = relu(x) − c``), shrinks the activation range by c and is applied only
when L2 is a Gemm / MatMul or a Conv without padding (padded borders would see 0 instead of −c).

Pairs are left alone when a weight or bias is read outside the pair, L1's output (or the activation's) has
other readers or is a graph output, channel counts disagree, or — after ``resolve-plan`` — when the plan keeps
either weight float. Recorded BN statistics of L1's output are rescaled with it; the tensors from L1 to L2 keep
their names and are marked rescaled (:func:`qcompiler.core.tags.mark_rescaled`: per-layer validation does not
compare them with the float model's). A second run changes nothing
(its scales are all within ``apply_threshold`` of 1 and no bias is left to absorb).

Stats: ``pairs``, ``pairs_scaled``, ``sweeps``, ``absorbed_channels``, ``skipped_*``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.calib import bn_statistics
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.pass_base import Pass, PassResult
from qcompiler.ir.graph import GraphIndex, is_onnx_op

from ._layers import Layer, find_layer
from ._stream import axis_max, progress_of, source_for, stream

log = logging.getLogger(__name__)

#: positively homogeneous activations allowed between the two layers
_HOMOGENEOUS = ("Relu", "LeakyRelu")
#: scales are kept within [1/MAX_SCALE, MAX_SCALE] (dead channels would otherwise blow up)
MAX_SCALE = 1e4


@dataclass
class Options:
    iterations: int = 50  # sweeps over the pairs at most
    tolerance: float = 1e-6  # stop when every |log s| of a sweep is below this
    apply_threshold: float = 1e-3  # do nothing when the first sweep's |log s| are all below this
    absorb_bias: bool = True  # move the always-positive part of L1's output into L2's bias (needs BN stats)
    absorb_k: float = 3.0  # c = max(0, mean - k * std)
    ranges: str = "weights"  # weights (data-free, DFQ) | activations (measured channel ranges, needs data)
    samples: int | None = None  # ranges=activations: use at most N calibration samples

    def validate(self, pass_name: str = "equalize") -> None:
        if self.iterations < 1:
            raise UserError(f"pass '{pass_name}' option 'iterations': must be >= 1, got {self.iterations}")
        if not self.tolerance > 0 or not self.apply_threshold > 0:
            raise UserError(f"pass '{pass_name}' options 'tolerance' / 'apply-threshold' must be > 0")
        if self.ranges not in ("weights", "activations"):
            raise UserError(f"pass '{pass_name}' option 'ranges': bad value '{self.ranges}' "
                            "(one of: weights, activations)")
        if not self.absorb_k > 0:
            raise UserError(f"pass '{pass_name}' option 'absorb-k': must be > 0, got {self.absorb_k}")


@dataclass
class _Pair:
    l1: Layer
    act: gs.Node | None
    l2: Layer


class EqualizePass(Pass):
    """Cross-layer equalization of Conv/Gemm/MatMul pairs joined by ReLU/identity (depthwise included)."""

    name = "equalize"
    Options = Options
    requires = frozenset({"bn-folded"})
    produces = frozenset({"equalized"})

    def run(self, ctx: CompileContext) -> PassResult:
        opts: Options = self.options
        opts.validate(self.name)
        stats: Counter[str] = Counter()
        index = GraphIndex(ctx.graph)
        pairs = self._pairs(ctx, index, stats)
        stats["pairs"] = len(pairs)
        if not pairs:
            return PassResult(False, stats)
        # working float64 copies, shared by the pairs a layer belongs to
        work: dict[int, np.ndarray] = {}
        bias: dict[int, np.ndarray] = {}
        layers: dict[int, Layer] = {}
        for p in pairs:
            for lay in (p.l1, p.l2):
                layers.setdefault(id(lay.weight), lay)
                work.setdefault(id(lay.weight), lay.w.astype(np.float64))
                bias.setdefault(id(lay.weight), lay.bias_values())
        total = [np.ones(p.l1.n_out) for p in pairs]
        acts = self._activation_ranges(ctx, pairs) if opts.ranges == "activations" else None
        first_max = 0.0
        for sweep in range(opts.iterations):
            worst = 0.0
            for k, p in enumerate(pairs):
                w1, w2 = work[id(p.l1.weight)], work[id(p.l2.weight)]
                r1, r2 = p.l1.out_range(w1), p.l2.in_range(w2)
                if acts is not None:  # balance L2's input weight ranges against the measured activation ranges
                    r1 = acts[k] / total[k]
                ok = (r1 > 0) & (r2 > 0)
                s = np.ones_like(r1)
                s[ok] = np.clip(np.sqrt(r1[ok] / r2[ok]), 1.0 / MAX_SCALE, MAX_SCALE)
                worst = max(worst, float(np.abs(np.log(s)).max(initial=0.0)))
                work[id(p.l1.weight)] = p.l1.scale_out(w1, 1.0 / s)
                bias[id(p.l1.weight)] = bias[id(p.l1.weight)] / s
                work[id(p.l2.weight)] = p.l2.scale_in(w2, s)
                total[k] *= s
            stats["sweeps"] = sweep + 1
            if sweep == 0:
                first_max = worst
                if worst < opts.apply_threshold:
                    break
            if worst < opts.tolerance:
                break
        modified = False
        bn_stats = bn_statistics(ctx)
        if first_max >= opts.apply_threshold:
            modified = True
            for key, lay in layers.items():
                lay.set_weight(work[key])
            for p, s in zip(pairs, total):
                if np.any(s != 1.0):
                    self.mark_rescaled(*_joining(p))
                if np.abs(np.log(s)).max(initial=0.0) < opts.apply_threshold:
                    continue
                stats["pairs_scaled"] += 1
                st = bn_stats.get(p.l1.output.name)
                if st is not None:
                    st.mean = st.mean / s
                    st.std = st.std / s
            for key, lay in layers.items():
                if any(p.l1.weight is lay.weight for p in pairs) and (lay.bias is not None or np.any(bias[key])):
                    lay.set_bias(bias[key], self.name)
        if opts.absorb_bias:
            modified |= self._absorb(pairs, bn_stats, stats)
        return PassResult(modified, stats)

    def _activation_ranges(self, ctx: CompileContext, pairs: list[_Pair]) -> list[np.ndarray] | None:
        """max |x| per channel of each pair's joining tensor (L2's input) over the calibration data (None without
        real data: the weight ranges are used)."""
        source = source_for(ctx, self.name, self.options.samples)
        if source is None:
            return None

        names = [p.l2.node.inputs[0].name for p in pairs]
        axes = {n: p.l2.act_axis for n, p in zip(names, pairs)}
        ranges: dict[str, np.ndarray] = {}

        def consume(values: dict[str, np.ndarray]) -> None:
            for n, v in values.items():
                m = axis_max(v, axes[n])
                ranges[n] = m if n not in ranges else np.maximum(ranges[n], m)

        stream(ctx.graph, names, source, consume, progress=progress_of(ctx, "equalize"))
        return [ranges[n] for n in names]

    # ------------------------------------------------------------------------------------------ matching
    def _pairs(self, ctx: CompileContext, index: GraphIndex, stats: Counter[str]) -> list[_Pair]:
        resolved = ctx.resolved
        pairs: list[_Pair] = []
        for node in ctx.graph.nodes:
            if not is_onnx_op(node, "Conv", "Gemm", "MatMul"):
                continue
            l1 = find_layer(node, index)
            if l1 is None:
                continue
            t = l1.output
            act: gs.Node | None = None
            if index.is_graph_output(t) or len(t.outputs) != 1:
                continue
            nxt = t.outputs[0]
            if is_onnx_op(nxt, *_HOMOGENEOUS) and len(nxt.inputs) == 1:
                act, t = nxt, nxt.outputs[0]
                if index.is_graph_output(t) or len(t.outputs) != 1:
                    continue
                nxt = t.outputs[0]
            if not is_onnx_op(nxt, "Conv", "Gemm", "MatMul") or nxt.inputs[0] is not t:
                continue
            l2 = find_layer(nxt, index)
            if l2 is None:
                stats["skipped_shared_or_dynamic"] += 1
                continue
            if l1.n_out != l2.n_in:
                stats["skipped_channel_mismatch"] += 1
                continue
            if not l1.bias_writable():
                stats["skipped_bias_layout"] += 1
                continue
            if resolved is not None:
                n1, n2 = resolved.nodes.get(l1.node.name), resolved.nodes.get(l2.node.name)
                if n1 is None or n2 is None or n1.weight is None or n2.weight is None:
                    stats["skipped_float"] += 1
                    continue
            pairs.append(_Pair(l1, act, l2))
        return pairs

    # ------------------------------------------------------------------------------------ bias absorption
    def _absorb(self, pairs: list[_Pair], bn_stats: dict, stats: Counter[str]) -> bool:
        opts: Options = self.options
        changed = False
        for p in pairs:
            if p.act is None or p.act.op != "Relu":
                continue
            st = bn_stats.get(p.l1.output.name)
            if st is None or st.mean.shape[0] != p.l1.n_out:
                continue
            if not _no_padding(p.l2) or not p.l2.bias_writable():
                stats["skipped_absorb_padding"] += 1
                continue
            c = np.maximum(st.mean - opts.absorb_k * st.std, 0.0)
            # only worth it (and only stable across runs) when it moves the range noticeably
            c = np.where(c > 1e-3 * np.maximum(np.abs(st.mean) + st.std, 1e-12), c, 0.0)
            if not np.any(c > 0):
                continue
            p.l1.set_bias(p.l1.bias_values() - c, self.name)
            delta = p.l2.in_sum(p.l2.w.astype(np.float64), c)
            p.l2.set_bias(p.l2.bias_values() + delta, self.name)
            st.mean = st.mean - c
            self.mark_rescaled(*_joining(p))
            stats["absorbed_channels"] += int(np.count_nonzero(c))
            changed = True
        return changed


def _joining(p: _Pair) -> list[gs.Tensor]:
    """The tensors from L1 to L2 (L1's output before and after its bias Add, the activation's): equalization
    scales (and bias absorption shifts) them, so they are marked rescaled."""
    out = [p.l1.node.outputs[0], p.l1.output] + ([p.act.outputs[0]] if p.act is not None else [])
    return list({id(t): t for t in out}.values())


def _no_padding(layer: Layer) -> bool:
    if layer.op != "Conv":
        return True
    pads = layer.node.attrs.get("pads")
    auto = str(layer.node.attrs.get("auto_pad", "NOTSET"))
    if isinstance(auto, bytes):
        auto = auto.decode()
    return auto in ("NOTSET", "VALID") and (not pads or not any(int(v) for v in pads))
