"""smooth: SmoothQuant (Xiao et al. 2023) — move activation outliers into the weights of MatMul / Gemm.

A few input channels of a MatMul often carry values far larger than the rest (LayerNorm outputs in
transformers). With one scale per tensor those channels decide the step size and every other channel is
quantized coarsely. For ``Y = X·W`` and any per-input-channel s > 0,

    Y = (X · diag(s)⁻¹) · (diag(s) · W)

so dividing channel j of X by s_j and multiplying row j of W by s_j changes nothing in float. With
``s_j = max|X_j|^α / max|W_j|^(1−α)`` (α = ``alpha``, max|X_j| measured on the calibration data, max|W_j| over
the row j of every weight reading X) the activation ranges shrink towards the weights' and quantize far better;
α = 0.5 splits the difficulty evenly, larger α moves more of it into the weights.

``alpha=auto`` chooses per smoothed tensor, by measurement, between "off" (s = 1) and α ∈ {0.0, 0.1, … 1.0}: the
candidate whose fake-quantized products (X/s with the plan's activation spec, diag(s)·W with each reader's weight
spec) differ least from the float products on at most ``rows`` calibration rows (streaming, seeded; each
sample's rows quantized with the ranges of the other samples); smoothing must beat "off" by 10 % on that
measure. The chosen α are in the stats (``alpha_0.6``, ``alpha_off``), the log and the report
(``smooth.alphas``). See :mod:`passes._alpha_search`.

The ``1/s`` is folded into the op producing X, so no node is added (X and the tensors between the rewritten op
and X keep their names and are marked rescaled, :func:`qcompiler.core.tags.mark_rescaled`: per-layer validation
does not compare them with the float model's):

* ``LayerNormalization`` over the last axis: γ ← γ/s, β ← β/s;
* a MatMul / Gemm (with its per-channel bias Add, if any), optionally through a ReLU: output columns and bias
  divided by s;
* ``Mul(x, c)`` by a per-channel constant c: c ← c/s;
* with ``affine`` (on by default with ``alpha=auto``; off with a numeric alpha, whose compiles stay as they were):
  ``Add(Mul(z, g), b)`` with per-channel constants g, b — a LayerNorm exported as primitive ops (ViT, PP-OCR
  rec) — g ← g/s, b ← b/s.

Every reader of X must be a MatMul / Gemm (no transA) with a constant weight whose activation input the plan
quantizes; every rewritten constant (γ, β, weights, biases) must be read by nothing outside the match. Needs
real calibration data (skipped with a warning without it: no ``--calib``, ``none`` or ``random``); runs after
``resolve-plan`` and before ``calibrate`` so the ranges are measured on the smoothed graph. A second run
changes nothing (the measured s are all 1).

Stats: ``smoothed`` (tensors), ``weights_scaled``, ``skipped_*``; with ``alpha=auto`` ``alpha_<α|off>``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.pass_base import Pass, PassResult
from qcompiler.ir.graph import GraphIndex, exclusive_constant, is_onnx_op, known_rank, optional_input

from . import _alpha_search as search
from ._layers import Layer, find_layer
from ._stream import axis_max, one_blas_thread, progress_of, source_for, stream

log = logging.getLogger(__name__)

#: s is kept within [1/MAX_SCALE, MAX_SCALE]
MAX_SCALE = 1e4
#: alpha=auto: the rows kept at once for the measure (tensors beyond it are measured in a further pass)
AUTO_ROWS_BYTES = 256 << 20


@dataclass
class Options:
    #: migration strength: 0 = keep activations, 1 = move everything into the weights; ``auto``: chosen per
    #: tensor by measuring the quantized products' error (:mod:`passes._alpha_search`)
    alpha: float | str = 0.5
    samples: int | None = None  # use at most N calibration samples
    apply_threshold: float = 1e-3  # leave a tensor alone when every |log s| is below this
    rows: int = 2048  # alpha=auto: the error is measured on at most this many rows of each smoothed tensor
    #: also fold 1/s into an elementwise affine Add(Mul(z, g), b) with per-channel constants (a LayerNorm exported
    #: as primitive ops); None: on with alpha=auto, off with a numeric alpha (whose compiles stay as before)
    affine: bool | None = None

    def validate(self, pass_name: str = "smooth") -> None:
        if isinstance(self.alpha, str):
            if self.alpha != "auto":
                raise UserError(f"pass '{pass_name}' option 'alpha': must be a number in [0, 1] or 'auto', "
                                f"got '{self.alpha}'")
        elif isinstance(self.alpha, bool) or not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"pass '{pass_name}' option 'alpha': must be in [0, 1], got {self.alpha}")
        if isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows <= 0:
            raise UserError(f"pass '{pass_name}' option 'rows': must be a positive integer, got {self.rows}")
        if self.samples is not None and self.samples <= 0:
            raise UserError(f"pass '{pass_name}' option 'samples': must be a positive integer, got {self.samples}")
        if not self.apply_threshold > 0:
            raise UserError(f"pass '{pass_name}' option 'apply-threshold': must be > 0")


@dataclass
class _Site:
    x: gs.Tensor  # the activation to smooth (channels on the last axis)
    kind: str  # layernorm | layer | mul | affine
    producer: gs.Node
    layer: Layer | None  # kind == layer
    consumers: list[Layer]


class SmoothPass(Pass):
    """SmoothQuant: divide outlier activation channels by s, fold 1/s into the producer and s into the weights."""

    name = "smooth"
    Options = Options
    requires = frozenset({"plan-resolved"})
    produces = frozenset({"smoothed"})
    invalidates = frozenset({"calibrated"})
    invalidates_why = "it changes the activation ranges"

    def run(self, ctx: CompileContext) -> PassResult:
        opts: Options = self.options
        opts.validate(self.name)
        stats: Counter[str] = Counter()
        index = GraphIndex(ctx.graph)
        affine = opts.affine if opts.affine is not None else opts.alpha == "auto"
        sites = self._sites(ctx, index, stats, affine)
        if not sites:
            return PassResult(False, stats)
        if ctx.data_free:
            log.warning("smooth: --calib none: no activation statistics, nothing smoothed")
            stats["skipped_data_free"] = len(sites)
            return PassResult(False, stats)
        source = source_for(ctx, self.name, self.options.samples)
        if source is None:
            stats["skipped_no_data"] = len(sites)
            return PassResult(False, stats)
        chosen = self._measured_scales(ctx, sites, source, stats) if opts.alpha == "auto" else None
        amax = self._activation_ranges(ctx, sites, source) if chosen is None else {}
        modified = False
        for site in sites:
            if chosen is not None:
                s = chosen[site.x.name]
            else:
                a = amax[site.x.name]
                w = np.max(np.stack([c.in_range() for c in site.consumers]), axis=0)
                ok = (a > 0) & (w > 0)
                s = np.ones_like(a)
                alpha = float(opts.alpha)
                s[ok] = np.clip(a[ok] ** alpha / w[ok] ** (1.0 - alpha), 1.0 / MAX_SCALE, MAX_SCALE)
            if float(np.abs(np.log(s)).max(initial=0.0)) < opts.apply_threshold:
                stats["unchanged_balanced"] += 1
                continue
            self._fold_into_producer(site, 1.0 / s)
            self.mark_rescaled(*_rescaled_path(site))
            for c in site.consumers:
                c.set_weight(c.scale_in(c.w.astype(np.float64), s))
                stats["weights_scaled"] += 1
            stats["smoothed"] += 1
            modified = True
        return PassResult(modified, stats)

    # ------------------------------------------------------------------------------------------ matching
    def _sites(self, ctx: CompileContext, index: GraphIndex, stats: Counter[str], affine: bool) -> list[_Site]:
        resolved = ctx.resolved
        assert resolved is not None
        seen: set[str] = set()
        sites: list[_Site] = []
        for node in ctx.graph.nodes:
            if not is_onnx_op(node, "MatMul", "Gemm") or not node.inputs or int(node.attrs.get("transA", 0)):
                continue
            x = node.inputs[0]
            if x.name in seen or isinstance(x, gs.Constant):
                continue
            seen.add(x.name)
            consumers: list[Layer] = []
            for c in x.outputs:
                np_ = resolved.nodes.get(c.name)
                lay = find_layer(c, index) if is_onnx_op(c, "MatMul", "Gemm") and c.inputs[0] is x else None
                if lay is None or np_ is None or np_.activation is None or int(c.attrs.get("transA", 0)):
                    consumers = []
                    break
                consumers.append(lay)
            if not consumers:
                stats["skipped_readers"] += 1
                continue
            if index.is_graph_output(x) or not x.inputs:
                stats["skipped_no_producer"] += 1
                continue
            c_in = consumers[0].n_in
            if any(c.n_in != c_in for c in consumers):
                stats["skipped_channel_mismatch"] += 1
                continue
            site = self._producer_site(x, consumers, index, c_in, affine)
            if site is None:
                stats["skipped_producer"] += 1
                continue
            sites.append(site)
        return sites

    def _producer_site(self, x: gs.Tensor, consumers: list[Layer], index: GraphIndex, c: int,
                       affine: bool) -> _Site | None:
        prod = x.inputs[0]
        if is_onnx_op(prod, "LayerNormalization") and len(prod.outputs) >= 1:
            rank = known_rank(prod.inputs[0])
            axis = int(prod.attrs.get("axis", -1))
            if axis != -1 and (rank is None or axis != rank - 1):
                return None
            gamma, beta = optional_input(prod, 1), optional_input(prod, 2)
            if not isinstance(gamma, gs.Constant) or not exclusive_constant(gamma, prod, index):
                return None
            if np.asarray(gamma.values).size != c:
                return None
            if beta is not None and (not isinstance(beta, gs.Constant) or not exclusive_constant(beta, prod, index)
                                     or np.asarray(beta.values).size != c):
                return None
            if any(o.outputs for o in prod.outputs[1:] if o.name):
                return None
            return _Site(x, "layernorm", prod, None, consumers)
        if is_onnx_op(prod, "Relu"):
            inner = prod.inputs[0]
            if len(inner.outputs) != 1 or index.is_graph_output(inner) or not inner.inputs:
                return None
            base = inner.inputs[0]
        else:
            base = prod
        if is_onnx_op(base, "MatMul", "Gemm", "Add"):
            node = base
            if base.op == "Add":  # MatMul + bias Add
                src = [t.inputs[0] for t in base.inputs if t.inputs and is_onnx_op(t.inputs[0], "MatMul")]
                if len(src) != 1:
                    return self._affine_site(x, prod, consumers, index, c) if affine else None
                node = src[0]
            lay = find_layer(node, index)
            expected = prod.inputs[0] if prod is not base else x
            if lay is None or lay.output is not expected or lay.n_out != c or not lay.bias_writable():
                return None
            return _Site(x, "layer", prod, lay, consumers)
        return self._mul_site(x, prod, consumers, index, c)

    @staticmethod
    def _channel_constant(node: gs.Node, index: GraphIndex, c: int) -> gs.Constant | None:
        """The per-channel constant operand (``c`` values along the last axis) of a binary ``node``, read by it
        alone; None when there is none."""
        if len(node.inputs) != 2:
            return None
        const = node.inputs[1] if isinstance(node.inputs[1], gs.Constant) else node.inputs[0]
        if not isinstance(const, gs.Constant) or not exclusive_constant(const, node, index):
            return None
        shape = np.asarray(const.values).shape
        if not shape or shape[-1] != c or int(np.prod(shape)) != c:
            return None
        return const

    def _mul_site(self, x: gs.Tensor, prod: gs.Node, consumers: list[Layer], index: GraphIndex,
                  c: int) -> _Site | None:
        if not is_onnx_op(prod, "Mul") or self._channel_constant(prod, index, c) is None:
            return None
        return _Site(x, "mul", prod, None, consumers)

    def _affine_site(self, x: gs.Tensor, prod: gs.Node, consumers: list[Layer], index: GraphIndex,
                     c: int) -> _Site | None:
        """``x = Add(Mul(z, g), b)``, g and b per-channel constants, the Mul's output read by the Add alone."""
        if not is_onnx_op(prod, "Add") or self._channel_constant(prod, index, c) is None:
            return None
        mid = next(t for t in prod.inputs if not isinstance(t, gs.Constant)) if any(
            not isinstance(t, gs.Constant) for t in prod.inputs) else None
        if mid is None or len(mid.outputs) != 1 or index.is_graph_output(mid) or not mid.inputs:
            return None
        mul = mid.inputs[0]
        if not is_onnx_op(mul, "Mul") or self._channel_constant(mul, index, c) is None:
            return None
        return _Site(x, "affine", prod, None, consumers)

    # ------------------------------------------------------------------------------------------ rewriting
    @staticmethod
    def _fold_into_producer(site: _Site, inv: np.ndarray) -> None:
        prod = site.producer
        if site.kind == "layernorm":
            for i in (1, 2):
                t = optional_input(prod, i)
                if isinstance(t, gs.Constant):
                    v = np.asarray(t.values)
                    t.values = (v.astype(np.float64).reshape(-1) * inv).reshape(v.shape).astype(v.dtype)
        elif site.kind in ("mul", "affine"):
            nodes = [prod]
            if site.kind == "affine":  # Add(Mul(z, g), b): g and b both
                mid = next(t for t in prod.inputs if not isinstance(t, gs.Constant))
                nodes.append(mid.inputs[0])
            for n in nodes:
                t = n.inputs[1] if isinstance(n.inputs[1], gs.Constant) else n.inputs[0]
                assert isinstance(t, gs.Constant)
                v = np.asarray(t.values)
                t.values = (v.astype(np.float64).reshape(-1) * inv).reshape(v.shape).astype(v.dtype)
        else:
            lay = site.layer
            assert lay is not None
            lay.set_weight(lay.scale_out(lay.w.astype(np.float64), inv))
            if lay.bias is not None:
                lay.set_bias(lay.bias_values() * inv, "smooth")

    def _activation_ranges(self, ctx: CompileContext, sites: list[_Site], source: Any) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}

        def consume(values: dict[str, np.ndarray]) -> None:
            for n, v in values.items():
                m = axis_max(v, -1)
                out[n] = m if n not in out else np.maximum(out[n], m)

        stream(ctx.graph, [s.x.name for s in sites], source, consume, progress=progress_of(ctx, "smooth"))
        return out

    def _measured_scales(self, ctx: CompileContext, sites: list[_Site], source: Any,
                         stats: Counter[str]) -> dict[str, np.ndarray]:
        """``alpha=auto``: per tensor, the s of the candidate (off or a grid alpha) whose quantized products
        have the lowest error on the calibration rows (:func:`passes._alpha_search.choose`). The tensors are
        measured in groups whose kept rows fit :data:`AUTO_ROWS_BYTES` (one pass over the data per group; the
        rows and so the choice do not depend on the grouping)."""
        n = len(source)
        quota = search.quota(self.options.rows, n)
        groups: list[list[int]] = []
        used = 0
        for i, site in enumerate(sites):
            size = quota * n * site.consumers[0].n_in * 4
            if not groups or used + size > AUTO_ROWS_BYTES:
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += size
        out: dict[str, np.ndarray] = {}
        report: dict[str, Any] = {}
        for group in groups:
            rows = {sites[i].x.name: search.SiteRows((int(ctx.seed), i), quota) for i in group}

            def consume(values: dict[str, np.ndarray], rows: dict[str, search.SiteRows] = rows) -> None:
                for name, v in values.items():
                    rows[name].add(v)

            stream(ctx.graph, list(rows), source, consume, progress=progress_of(ctx, "smooth"))
            with one_blas_thread():
                for i in group:
                    self._choose(ctx, sites[i], rows[sites[i].x.name], out, report, stats)
        ctx.report.setdefault("smooth", {})["alphas"] = report
        return out

    @staticmethod
    def _choose(ctx: CompileContext, site: _Site, rows: search.SiteRows, out: dict[str, np.ndarray],
                report: dict[str, Any], stats: Counter[str]) -> None:
        resolved = ctx.resolved
        assert resolved is not None
        act = ctx.activation_specs.get(site.x.name) or resolved.nodes[site.consumers[0].node.name].activation
        assert act is not None
        weights = [resolved.nodes[c.node.name].weight for c in site.consumers]
        alpha, s, errors = search.choose(rows, site.consumers, act, weights, int(ctx.opset))
        rows.release()
        out[site.x.name] = s
        label = "off" if alpha is None else f"{alpha:.1f}"
        stats[f"alpha_{label}"] += 1
        report[site.x.name] = {"alpha": label, "error": errors[label], "error_off": errors["off"]}
        log.info("smooth: %s: alpha %s (relative error %.4g, off %.4g)", site.x.name, label, errors[label],
                 errors["off"])


def _rescaled_path(site: _Site) -> list[gs.Tensor]:
    """The tensors that hold other values once ``site`` is smoothed: X itself and, from the rewritten producer on,
    every tensor on the way to it (a layer's output before its bias Add and ReLU, the Mul's output of an affine
    LayerNorm)."""
    out = [site.x]
    if site.kind == "affine":
        out += [t for t in site.producer.inputs if not isinstance(t, gs.Constant)]
    elif site.kind == "layer" and site.layer is not None:
        out += [site.layer.node.outputs[0], site.layer.output]
    return list({id(t): t for t in out}.values())
