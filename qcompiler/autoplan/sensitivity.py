"""Per-layer, per-candidate quantization sensitivity from forward passes only (no gradients, no labels).

The planner (:mod:`qcompiler.autoplan`) asks, for every quantizable layer *l* and candidate *c* (int8, int4,
ternary, ...): how much does the model's output suffer when only *l* is quantized with *c*? Four metrics:

``pd`` (PD-Quant's prediction difference; the default)
    Quantize that one layer's weights with the candidate (exactly as ``insert-qdq`` would: :func:`fake_quantize`),
    run the model on the calibration batch, measure the change of the final outputs against the float
    outputs: KL(p_float ‖ p_quant) for outputs that are probabilities (values in [0, 1] summing to 1 along an
    axis: categorical KL along it; a Sigmoid output: Bernoulli KL), ``Σ(y − ŷ)² / Σ y²`` (relative MSE)
    otherwise, summed over the graph outputs.
``hessian`` (HAWQ-V2 without gradients)
    The average Hessian trace of that same output distortion D with respect to the layer's weights, estimated
    Hutchinson-style from forward passes: for Rademacher draws v (entries ±1), D(W + h·v) ≈ ½h²·vᵀHv and
    E[vᵀHv] = Tr(H), so Tr(H)/n ≈ 2·mean D / (h²·n), with h = 0.02·rms(W). The sensitivity of a candidate is
    ½·Tr(H)/n · ‖Q(W) − W‖² (same units as ``pd``); its cost does not grow with the number of candidates.
``act-stats`` (myQASR: label-free, from float activation statistics only)
    One float pass. Layer statistic: the median |y| of the layer's output (normalized by its mean over the
    layers), times the candidate's relative error of the layer output under the diagonal input second
    moments ``E[x_i²]``: ``Σ ΔW² · E[x²] / Σ W² · E[x²]`` (ΔW = Q(W) − W, summed over each weight's input-channel
    axis).
``orthogonality`` (OMPQ: network orthogonality)
    One float pass on a small batch. Each layer's output features per sample (flattened — a fixed subset of at
    most 4096 coordinates — when every sample has the same shape, else averaged over all but the channel axis)
    give a Gram matrix G_l = X_l·X_lᵀ; ORM(i, j) = ‖X_jᵀX_i‖²_F / (‖X_iᵀX_i‖_F·‖X_jᵀX_j‖_F) = tr(G_iG_j) /
    (‖G_i‖_F‖G_j‖_F). A layer little correlated with the others carries information nothing else does: its
    importance θ_l = exp(−mean_{j≠l} ORM(l, j)) (OMPQ's monotonically decreasing function); the sensitivity of a
    candidate is θ_l · ‖Q(W) − W‖² / ‖W‖².

Speed: ONE onnxruntime session for everything — the float graph in which the weights of every layer under
test are graph *inputs* (built with graphsurgeon), so a candidate is evaluated by feeding its dequantized
weights, never by rebuilding a session. The float outputs are computed once and reused; samples of the same
shape are stacked into batches when the model is batch-safe (checked numerically); independent evaluations run
concurrently on the shared session (one onnxruntime thread each). **Partial evaluation** (``pd`` / ``hessian``,
:data:`PARTIAL_CUTS`): the topologically sorted graph is cut before up to that many layers spread over the
layer order; the float tensors crossing each cut are fetched with the reference run, and one session per cut
runs the nodes after it — an evaluation whose settings change nothing before a cut starts there (exact: the
nodes before it see the float inputs). Around a plan (``context``) and between whole plans
(:func:`measure_plans`) the same holds with a plan's own activations at the cut, for settings that agree with
that plan on every input read before the cut. ``pd`` and ``hessian`` also give the output
noise power each (layer, candidate) adds, from which the planner predicts the output SQNR of a whole plan.
``pd`` keeps each sample's share of every distortion and reports the median Kish effective sample size
``(Σd)²/Σd²`` over its evaluations (``details["ess"]``): how many samples the measurement really rests on.
Progress goes to a callback; nothing is printed.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler import ir, quant
from qcompiler.core.errors import UserError
from qcompiler.plan import QuantSpec

log = logging.getLogger(__name__)

METRICS = ("pd", "hessian", "act-stats", "orthogonality")
#: Hutchinson perturbation size, relative to the rms of the weight
HESSIAN_EPS = 0.02
#: orthogonality: at most this many coordinates per sample and layer
ORM_FEATURES = 4096
#: act-stats: at most this many values per batch and layer for the median
MEDIAN_SAMPLES = 8192
#: pd / hessian: evaluations start from the float activations at up to this many cuts (partial evaluation)
PARTIAL_CUTS = 8
#: ... unless the activations crossing the cuts take more than this many bytes over the samples
PARTIAL_MAX_BYTES = 1 << 30
_SHAPE_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Identity", "Cast"})

Progress = Callable[[int, int], None]


# ------------------------------------------------------------------------------------------ fake quant
def _axes(node: gs.Node, ndim: int, spec: QuantSpec) -> tuple[int | None, int | None]:
    from qcompiler.ir.axes import block_axis, per_channel_axis

    axis: int | None = None
    block: int | None = None
    if spec.granularity == "per_channel":
        axis = spec.axis if spec.axis is not None else per_channel_axis(node, ndim)
    elif spec.granularity == "block":
        axis = spec.axis if spec.axis is not None else block_axis(node, ndim)
        block = spec.block_size
    if axis is not None and axis < 0:
        axis += ndim
    return axis, block


def fake_quantize(node: gs.Node, values: np.ndarray, spec: QuantSpec, opset: int = 21) -> np.ndarray:
    """The float weight ``insert-qdq`` would give ``node`` for ``spec`` (dequantized codes), as float32."""
    w = np.asarray(values, dtype=np.float32)
    axis, block = _axes(node, w.ndim, spec)
    if spec.scheme != "int" or spec.scale == "pow2":
        try:
            from qcompiler.quant import schemes
        except ImportError:  # pragma: no cover - schemes ship with qcompiler
            raise UserError(f"weight scheme '{spec.scheme}' needs qcompiler.quant.schemes, not available") from None
        return schemes.quantize_for_spec(w, spec, axis, block, opset).qt.dequantize().astype(np.float32)
    return quant.quantize_weight(w, spec.dtype, spec.symmetric, axis, block, spec.range).dequantize()


# ----------------------------------------------------------------------------------------------- model
@dataclass
class LayerUnderTest:
    """A quantizable layer: its node in the float graph, the weight inputs, and the spec of each candidate
    allowed for it (``None`` = keep float)."""

    name: str
    node: gs.Node
    weight_inputs: tuple[int, ...]
    specs: dict[str, QuantSpec | None]
    activation: QuantSpec | None = None  # how the plan quantizes the layer's input (pd quantizes it too)
    #: candidate -> (tensor, spec): an output the target quantizes as well when the layer takes that candidate
    #: (e.g. the ort target's QLinearConv output for int8 Conv), with all its readers
    output_quant: dict[str, tuple[str, QuantSpec]] = field(default_factory=dict)

    @property
    def op_type(self) -> str:
        return str(self.node.op)

    def weights(self) -> list[np.ndarray]:
        return [np.asarray(self.node.inputs[i].values, dtype=np.float32) for i in self.weight_inputs]

    @property
    def params(self) -> int:
        return int(sum(np.prod(self.node.inputs[i].shape) for i in self.weight_inputs))


@dataclass
class SensitivityResult:
    """``values[l, c]``: sensitivity of layer l under candidate c (NaN: candidate not allowed for the layer);
    ``noise[l, c, o]``: predicted output noise power Σ(y − ŷ)² added on output o (``pd`` / ``hessian`` only);
    ``signal[o]``: Σ y² of output o over the same samples."""

    metric: str
    layers: list[str]
    candidates: list[str]
    values: np.ndarray
    noise: np.ndarray | None
    signal: np.ndarray | None
    outputs: list[str]
    output_kinds: list[str]
    samples: int
    batches: int
    evaluations: int
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    #: ``pd`` measured around a plan (``context``): that plan's own noise per output; ``values`` / ``noise``
    #: are then the changes from it (the context's own choice 0)
    base_noise: np.ndarray | None = None
    #: the session the values were measured with (``pd``), kept for :func:`measure_plans`
    runner: SensitivityRunner | None = field(default=None, repr=False, compare=False)

    def predicted_sqnr_db(self, choice: Sequence[int]) -> float | None:
        """Worst-output SQNR predicted for a plan (candidate index per layer) by adding the noise powers."""
        if self.noise is None or self.signal is None:
            return None
        total = np.zeros(len(self.outputs)) if self.base_noise is None else self.base_noise.astype(np.float64).copy()
        picked = self.noise[np.arange(len(choice)), np.asarray(choice, dtype=np.int64)]
        for n in picked[np.all(np.isfinite(picked), axis=1)]:
            total += n
        worst = math.inf
        for o in range(len(self.outputs)):
            if total[o] <= 0:
                continue
            worst = min(worst, 10.0 * math.log10(max(float(self.signal[o]), 1e-300) / float(total[o])))
        return worst

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric, "samples": self.samples, "batches": self.batches,
            "evaluations": self.evaluations, "seconds": round(self.seconds, 3),
            "outputs": [{"name": n, "kind": k} for n, k in zip(self.outputs, self.output_kinds)],
            "layers": {name: {c: (None if not np.isfinite(self.values[li, ci]) else float(self.values[li, ci]))
                              for ci, c in enumerate(self.candidates)} for li, name in enumerate(self.layers)},
        }


def _tail_graph(g: gs.Graph, p: int, front: dict[str, Any], outputs: Sequence[str]) -> gs.Graph:
    """The nodes of ``g`` from position ``p`` on as a graph whose inputs are the tensors ``front`` (name -> dtype)
    crossing the cut, and the graph inputs those nodes read; outputs ``outputs``. Constants share their values."""
    if any(isinstance(v, gs.Graph) for n in g.nodes[p:] for v in n.attrs.values()):
        sub = g.copy()  # subgraph attributes may read outer tensors: copy the whole graph, then cut it
        st = sub.tensors()
        for name, dtype in front.items():
            st[name].inputs.clear()
            st[name].dtype, st[name].shape = dtype, None
        sub.inputs = [st[n] for n in front] + list(sub.inputs)
        sub.outputs = [st[n] for n in outputs]
        # not into the bodies: a Loop body's unused iteration-count input is part of its signature
        return sub.cleanup(remove_unused_graph_inputs=True, recurse_subgraphs=False)
    tmap: dict[str, gs.Tensor] = {}

    def T(t: gs.Tensor) -> gs.Tensor:
        if not t.name:
            return gs.Variable.empty()
        got = tmap.get(t.name)
        if got is None:
            got = tmap[t.name] = t.copy()
            if t.name in front:
                got.dtype, got.shape = front[t.name], None
        return got

    nodes = [gs.Node(n.op, n.name, attrs=dict(n.attrs), inputs=[T(t) for t in n.inputs],
                     outputs=[T(t) for t in n.outputs], domain=n.domain) for n in g.nodes[p:]]
    ins = [tmap[n] for n in front if n in tmap] + [tmap[t.name] for t in g.inputs if t.name in tmap]
    return gs.Graph(nodes=nodes, inputs=ins, outputs=[tmap[n] for n in outputs], opset=g.opset,
                    import_domains=g.import_domains, functions=list(g.functions))


def _frontier(g: gs.Graph, p: int) -> list[str]:
    """Tensors produced by the nodes before position ``p`` of ``g.nodes`` and read by a node at or after it."""
    pos = {id(n): i for i, n in enumerate(g.nodes)}
    out: dict[str, None] = {}
    for n in g.nodes[:p]:
        for t in n.outputs:
            if any(pos.get(id(c), -1) >= p for c in t.outputs):
                out[t.name] = None
    return list(out)


# --------------------------------------------------------------------------------------------- batches
def _signature(feed: dict[str, np.ndarray]) -> tuple[Any, ...]:
    return tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(feed.items()))


def _batch_dims_dynamic(graph: gs.Graph) -> bool:
    ins = [t for t in graph.inputs if not isinstance(t, gs.Constant)]
    if not ins:
        return False
    for t in ins:
        shape = t.shape
        if not shape:
            return False
        d0 = shape[0]
        if isinstance(d0, int) and d0 >= 0:
            return False
    return True


def _stack(feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]}


def _output_kind(name: str, graph: gs.Graph, ref: np.ndarray) -> tuple[str, int | None]:
    """("prob", axis) | ("bernoulli", None) | ("mse", None) for a graph output, from its reference values."""
    x = np.asarray(ref, dtype=np.float64)
    if x.size == 0 or not np.all(np.isfinite(x)):
        return "mse", None
    if x.min() >= -1e-6 and x.max() <= 1.0 + 1e-6:
        axes = list(range(x.ndim))[::-1]
        for ax in axes:
            if x.shape[ax] < 2:
                continue
            s = x.sum(axis=ax)
            if np.all(np.abs(s - 1.0) < 1e-3):
                return "prob", ax
        t = next((o for o in graph.outputs if o.name == name), None)
        seen = 0
        while t is not None and t.inputs and seen < 16:
            prod = t.inputs[0]
            if prod.op == "Sigmoid":
                return "bernoulli", None
            if prod.op not in _SHAPE_OPS:
                break
            t = prod.inputs[0] if prod.inputs else None
            seen += 1
    return "mse", None


class _Acc:
    """Distortion of the outputs of one evaluation against the float outputs, summed over batches."""

    __slots__ = ("count", "metric", "noise", "rows")

    def __init__(self, n_out: int) -> None:
        self.metric = np.zeros(n_out)
        self.count = np.zeros(n_out)
        self.noise = np.zeros(n_out)
        #: per output: the metric's contribution of each sample, in sample order (sums to ``metric``)
        self.rows: list[list[np.ndarray]] = [[] for _ in range(n_out)]


# ---------------------------------------------------------------------------------------------- runner
class SensitivityRunner:
    """One onnxruntime session over the float graph with the layers' weights as inputs (see module doc).

    ``graph``: the float graph the plan will be resolved on (cleaned, BatchNorm folded) — not modified.
    ``feeds``: calibration samples (dicts of arrays), used in that order.
    ``extra_outputs``: intermediate tensors to expose as well (``act-stats`` / ``orthogonality``).
    """

    def __init__(self, graph: gs.Graph, layers: Sequence[LayerUnderTest], feeds: Sequence[dict[str, np.ndarray]],
                 *, batch_size: int = 8, workers: int | None = None, extra_outputs: Sequence[str] = (),
                 activation_qparams: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                 cuts: int = 0) -> None:
        if not feeds:
            raise UserError("sensitivity: no calibration samples")
        self.layers = list(layers)
        g = graph.copy()
        nodes = {n.name: n for n in g.nodes}
        tensors = g.tensors()
        self.float_weights: dict[str, np.ndarray] = {}
        self.inputs_of: dict[str, list[str]] = {}
        self.gate_of: dict[str, str] = {}  # layer -> gate of its input activation
        self.out_gate_of: dict[str, str] = {}  # tensor -> gate of its (target-added) quantization
        qps = activation_qparams or {}
        self.activation_qparams = dict(qps)
        # Activation fake-quantization switched by a scalar gate input (0 = float, exactly):
        # x' = x + gate · (DequantizeLinear(QuantizeLinear(x)) − x). A layer's input is gated on that edge only;
        # an output the target quantizes is gated for all its readers.
        for layer in self.layers:
            node = nodes[layer.name]
            x = node.inputs[0] if node.inputs else None
            if x is None or isinstance(x, gs.Constant) or x.name not in qps:
                continue
            out = self._fake_quant(g, x, qps[x.name], f"{layer.name}::act")
            node.inputs[0] = out
            self.gate_of[layer.name] = f"{layer.name}::act_gate"
        for t_name in sorted({t for layer in self.layers for t, _ in layer.output_quant.values()}):
            t = tensors.get(t_name)
            if t is None or isinstance(t, gs.Constant) or t_name not in qps:
                continue
            readers = [(c, i) for c in list(t.outputs) for i, inp in enumerate(c.inputs) if inp is t]
            out = self._fake_quant(g, t, qps[t_name], f"{t_name}::out")
            for c, i in readers:
                c.inputs[i] = out
            self.out_gate_of[t_name] = f"{t_name}::out_gate"
        g.toposort()
        taken = set(g.tensors().keys())
        for layer in self.layers:
            node = nodes[layer.name]
            names = []
            for wi in layer.weight_inputs:
                w = node.inputs[wi]
                if not isinstance(w, gs.Constant):
                    raise ValueError(f"layer '{layer.name}': weight input {wi} is not a constant")
                base = f"{layer.name}::weight{wi}"
                name, k = base, 1
                while name in taken:
                    name, k = f"{base}_{k}", k + 1
                taken.add(name)
                v = gs.Variable(name, dtype=np.float32, shape=list(w.shape))
                node.inputs[wi] = v
                g.inputs.append(v)
                self.float_weights[name] = np.ascontiguousarray(np.asarray(w.values, dtype=np.float32))
                names.append(name)
            self.inputs_of[layer.name] = names
        g.cleanup(remove_unused_graph_inputs=False)
        self.output_names = [t.name for t in graph.outputs]
        self.extra = [n for n in dict.fromkeys(extra_outputs) if n not in self.output_names]
        cpus = os.cpu_count() or 1
        self.workers = max(1, min(workers if workers is not None else cpus, 8))
        t0 = time.perf_counter()
        threads = 1 if self.workers > 1 else 0
        # partial evaluation: where an evaluation changes nothing before a cut, it starts there from the float
        # activations crossing the cut (computed once, with the reference)
        self._first_use, cut_at = self._plan_cuts(g, cuts)
        self._frontiers = {p: _frontier(g, p) for p in cut_at}
        exposed = list(dict.fromkeys(n for p in cut_at for n in self._frontiers[p]))
        fetch = list(dict.fromkeys(n for n in [*self.extra, *exposed] if n not in self.output_names))
        self._exposed = [n for n in exposed if n not in self.output_names]
        self.sess = ir.graph_session(g, extra_outputs=fetch, threads=threads)
        self.session_seconds = time.perf_counter() - t0
        self.data_inputs = [i.name for i in self.sess.get_inputs() if i.name not in self.float_weights]
        self.graph = graph
        self._lock = threading.Lock()
        self.evaluations = 0
        self.partial = 0  # evaluations that started at a cut
        self.feeds = [self._conform(f) for f in feeds]
        self.batches = self._make_batches(graph, self.feeds, batch_size)
        crossing = [{n: np.asarray(got[n]) for n in exposed if n in got} for got in self._reference_runs(fetch)]
        #: cut position -> (session, its inputs, its outputs); ascending positions
        self.segments: list[tuple[int, Any, list[str], list[str]]] = []
        if sum(v.nbytes for c in crossing for v in c.values()) > PARTIAL_MAX_BYTES:
            cut_at, crossing = [], [{} for _ in crossing]  # too much to hold: whole-graph runs only
            self._exposed = []
        self._crossing = crossing
        t0 = time.perf_counter()
        for p in cut_at:
            seg = self._segment(g, p, crossing[0], threads)
            if seg is not None:
                self.segments.append(seg)
        self.session_seconds += time.perf_counter() - t0
        self.batch_size = batch_size
        self._reference_terms()

    def rebound(self, feeds: Sequence[dict[str, np.ndarray]]) -> SensitivityRunner:
        """A runner on other samples sharing this one's session (graph, weights as inputs, activation ranges):
        whole-graph evaluations only (no partial evaluation)."""
        if not feeds:
            raise UserError("sensitivity: no calibration samples")
        new = copy.copy(self)
        new._lock = threading.Lock()
        new.evaluations = new.partial = 0
        new._crossing = []  # the float activations at the cuts are not known for these samples
        new.feeds = [self._conform(f) for f in feeds]
        new.batches = new._make_batches(self.graph, new.feeds, self.batch_size)
        new._reference_runs(self.extra)
        new._reference_terms()
        return new

    def _reference_runs(self, fetch: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """Run the float graph on every batch: ``self.reference`` (the outputs) and ``self.extra_values`` (the
        extra outputs) from it; returns per batch the values of the tensors ``fetch`` (the extras among them)."""
        names = self.output_names + list(fetch)
        self.reference: list[list[np.ndarray]] = []
        self.extra_values: list[dict[str, np.ndarray]] = []
        fetched: list[dict[str, np.ndarray]] = []
        for b in self.batches:
            vals = self.sess.run(names, {**b, **self.float_weights})
            self.reference.append([np.asarray(v) for v in vals[: len(self.output_names)]])
            got = dict(zip(fetch, vals[len(self.output_names):]))
            if self.extra:
                self.extra_values.append({n: got[n] for n in self.extra})
            fetched.append(got)
        return fetched

    def _reference_terms(self) -> None:
        """Output kinds, the float side of the KL terms and the signal power, from ``self.reference``."""
        graph = self.graph
        self.kinds = [_output_kind(n, graph, self.reference[0][o]) for o, n in enumerate(self.output_names)]
        # the float side of the KL terms, once: Σ p·log p per batch and output (probability outputs)
        # (per sample of the batch, so that each sample's share of a distortion is known: see ``ess``)
        self.ref_entropy: list[list[np.ndarray]] = []
        for bi, ref in enumerate(self.reference):
            row = []
            for o, r in enumerate(ref):
                kind, _ = self.kinds[o]
                r64 = self._rows(bi, r.astype(np.float64, copy=False))
                if kind == "prob":
                    row.append((r64 * np.log(np.clip(r64, 1e-12, 1.0))).sum(axis=1))
                elif kind == "bernoulli":
                    p = np.clip(r64, 1e-7, 1 - 1e-7)
                    row.append((p * np.log(p) + (1 - p) * np.log1p(-p)).sum(axis=1))
                else:
                    row.append(np.zeros(r64.shape[0]))
            self.ref_entropy.append(row)
        self.signal = np.zeros(len(self.output_names))
        for ref in self.reference:
            for o, r in enumerate(ref):
                r64 = r.astype(np.float64, copy=False).ravel()
                self.signal[o] += float(r64 @ r64)

    # ------------------------------------------------------------------------------ partial evaluation
    def _plan_cuts(self, g: gs.Graph, cuts: int) -> tuple[dict[str, int], list[int]]:
        """Position (in ``g.nodes``, topologically sorted) of the first node reading each weight / gate input,
        and up to ``cuts`` cut positions: the first positions of layers spread evenly over the layers' order."""
        pos = {id(n): i for i, n in enumerate(g.nodes)}
        tensors = g.tensors()
        first_use: dict[str, int] = {}
        for name in self.float_weights:
            t = tensors.get(name)
            users = [pos[id(c)] for c in (t.outputs if t is not None else []) if id(c) in pos]
            first_use[name] = min(users) if users else len(g.nodes)
        if cuts <= 0:
            return first_use, []
        starts = sorted({min((first_use.get(n, 0) for n in self.names_of(layer)), default=0)
                         for layer in self.layers} - {0})
        if len(starts) > cuts:
            starts = sorted({starts[(i * len(starts)) // (cuts + 1)] for i in range(1, cuts + 1)})
        return first_use, starts

    def _segment(self, g: gs.Graph, p: int, crossing: dict[str, np.ndarray], threads: int
                 ) -> tuple[int, Any, list[str], list[str]] | None:
        """A session computing the graph outputs from the nodes at positions >= ``p``, fed the float tensors
        that cross the cut (``crossing``: their values on one batch, for the dtypes)."""
        produced = {t.name: i for i, n in enumerate(g.nodes) for t in n.outputs}
        front = self._frontiers[p]
        if any(n not in crossing for n in front):
            return None
        outs = [n for n in self.output_names if produced.get(n, -1) >= p]
        if not outs:
            return None
        sub = _tail_graph(g, p, {n: crossing[n].dtype for n in front}, outs)
        sess = ir.graph_session(sub, threads=threads)
        return p, sess, [i.name for i in sess.get_inputs()], [t.name for t in sub.outputs]

    def _segment_for(self, overrides: dict[str, np.ndarray]) -> tuple[int, Any, list[str], list[str]] | None:
        """The latest cut before every node that reads an overridden input (None: run the whole graph)."""
        if not self.segments or not self._crossing:
            return None
        return self.segment_at(min((self._first_use.get(n, 0) for n in overrides), default=1 << 62))

    def layer_start(self, layer: LayerUnderTest) -> int:
        """Position of the first node any setting of ``layer`` changes."""
        return min((self._first_use.get(n, 0) for n in self.names_of(layer)), default=0)

    def segment_at(self, start: int) -> tuple[int, Any, list[str], list[str]] | None:
        """The latest cut at or before node position ``start`` (None: none)."""
        best = None
        for seg in self.segments:
            if seg[0] <= start:
                best = seg
        return best

    def capture(self, overrides: dict[str, np.ndarray]) -> tuple[_Acc, list[dict[str, np.ndarray]]]:
        """:meth:`distortion` of a whole-graph run that also returns, per batch, the activations crossing every
        cut under these settings (to start other evaluations that share the settings before a cut from)."""
        acc = _Acc(len(self.output_names))
        weights = {**self.float_weights, **overrides}
        names = self.output_names + self._exposed
        crossing = []
        for bi, b in enumerate(self.batches):
            vals = self.sess.run(names, {**b, **weights})
            n_o = len(self.output_names)
            # the graph outputs too: an evaluation started at a cut takes those computed before it from here
            crossing.append({**dict(zip(self._exposed, vals[n_o:])), **dict(zip(self.output_names, vals[:n_o]))})
            for o, (q, ref) in enumerate(zip(vals[:n_o], self.reference[bi])):
                self._accumulate(acc, o, np.asarray(q), ref, self.ref_entropy[bi][o], bi)
        with self._lock:
            self.evaluations += 1
        return acc, crossing

    def distortion_from(self, overrides: dict[str, np.ndarray], seg: tuple[int, Any, list[str], list[str]],
                        crossing: list[dict[str, np.ndarray]]) -> _Acc:
        """:meth:`distortion` started at cut ``seg`` from the activations ``crossing`` (per batch, of a
        :meth:`capture` whose settings equal ``overrides`` on every input read before the cut)."""
        acc = _Acc(len(self.output_names))
        weights = {**self.float_weights, **overrides}
        for bi in range(len(self.batches)):
            outs = self._run(bi, weights, seg, crossing[bi])
            for o, (q, ref) in enumerate(zip(outs, self.reference[bi])):
                self._accumulate(acc, o, np.asarray(q), ref, self.ref_entropy[bi][o], bi)
        with self._lock:
            self.evaluations += 1
            self.partial += 1
        return acc

    def _run(self, bi: int, weights: dict[str, np.ndarray], seg: tuple[int, Any, list[str], list[str]] | None,
             cross: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
        b = self.batches[bi]
        if seg is None:
            return list(self.sess.run(self.output_names, {**b, **weights}))
        _, sess, ins, outs = seg
        cross = self._crossing[bi] if cross is None else cross
        feed = {n: cross[n] if n in cross else (b[n] if n in b else weights[n]) for n in ins}
        got = dict(zip(outs, sess.run(outs, feed)))
        # outputs computed before the cut: those of the run the activations come from (float: the reference)
        return [got[n] if n in got else np.asarray(cross[n]) if n in cross else self.reference[bi][o]
                for o, n in enumerate(self.output_names)]

    def _rows(self, bi: int, x: np.ndarray) -> np.ndarray:
        """An output of batch ``bi`` as [samples, -1] (stacked samples lie along axis 0)."""
        n = self.sample_rows[bi] if self.batched else 1
        return x.reshape(n, -1)

    # -------------------------------------------------------------------------------------- feeds
    def _conform(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        types = {i.name: i.type for i in self.sess.get_inputs()}
        out = {}
        for name in self.data_inputs:
            if name not in feed:
                raise UserError(f"sensitivity: a calibration sample lacks model input '{name}'")
            arr = np.asarray(feed[name])
            want = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                    "tensor(double)": np.float64}.get(types.get(name, ""))
            if want is not None and arr.dtype.kind == "f" and arr.dtype != want:
                arr = arr.astype(want)
            out[name] = arr
        return out

    def _make_batches(self, graph: gs.Graph, feeds: list[dict[str, np.ndarray]], batch_size: int
                      ) -> list[dict[str, np.ndarray]]:
        self.batched = False
        groups: dict[tuple[Any, ...], list[dict[str, np.ndarray]]] = {}
        for f in feeds:
            groups.setdefault(_signature(f), []).append(f)
        self.uniform_shapes = len(groups) == 1
        ok = (batch_size > 1 and _batch_dims_dynamic(graph)
              and all(v.ndim >= 1 and v.shape[0] == 1 for f in feeds for v in f.values()))
        if ok:
            pair = next((g[:2] for g in groups.values() if len(g) >= 2), None)
            ok = pair is not None and self._batch_safe(pair)
        if not ok:
            self.sample_rows = [1] * len(feeds)
            return list(feeds)
        self.batched = True
        out = []
        rows = []
        for members in groups.values():
            for i in range(0, len(members), batch_size):
                chunk = members[i:i + batch_size]
                out.append(_stack(chunk))
                rows.append(len(chunk))
        self.sample_rows = rows
        return out

    def _batch_safe(self, pair: list[dict[str, np.ndarray]]) -> bool:
        """Stacking two samples gives the two single-sample results (no cross-sample op, batch on axis 0)."""
        try:
            single = [self.sess.run(self.output_names, {**f, **self.float_weights}) for f in pair]
            both = self.sess.run(self.output_names, {**_stack(pair), **self.float_weights})
        except Exception as e:  # onnxruntime refuses the stacked shapes
            log.info("sensitivity: no batching (%s)", str(e).splitlines()[0] if str(e) else type(e).__name__)
            return False
        for o, b in enumerate(both):
            b = np.asarray(b)
            if b.ndim == 0 or b.shape[0] != 2:
                return False
            for k in range(2):
                s = np.asarray(single[k][o])
                if s.shape[0] != 1 or b[k:k + 1].shape != s.shape:
                    return False
                tol = 1e-4 * max(float(np.abs(s).max(initial=0.0)), 1e-6)
                if not np.allclose(b[k:k + 1], s, rtol=1e-3, atol=tol):
                    return False
        return True

    def _fake_quant(self, g: gs.Graph, x: Any, qp: tuple[np.ndarray, np.ndarray], base: str) -> gs.Variable:
        scale, zp = qp
        s_c = gs.Constant(base + "_scale", np.asarray(scale, dtype=np.float32).reshape(()))
        z_c = gs.Constant(base + "_zero_point", np.asarray(zp).reshape(()))
        gate = gs.Variable(base + "_gate", dtype=np.float32, shape=[])
        q = gs.Variable(base + "_q", dtype=z_c.values.dtype)
        dq = gs.Variable(base + "_dq", dtype=np.float32)
        diff = gs.Variable(base + "_diff", dtype=np.float32)
        gated = gs.Variable(base + "_gated", dtype=np.float32)
        out = gs.Variable(base + "_x", dtype=np.float32)
        g.nodes += [gs.Node("QuantizeLinear", base + "_Q", inputs=[x, s_c, z_c], outputs=[q]),
                    gs.Node("DequantizeLinear", base + "_DQ", inputs=[q, s_c, z_c], outputs=[dq]),
                    gs.Node("Sub", base + "_Sub", inputs=[dq, x], outputs=[diff]),
                    gs.Node("Mul", base + "_Mul", inputs=[diff, gate], outputs=[gated]),
                    gs.Node("Add", base + "_Add", inputs=[x, gated], outputs=[out])]
        g.inputs.append(gate)
        self.float_weights[gate.name] = np.zeros((), dtype=np.float32)
        return out

    def gates(self, layer: LayerUnderTest, cand: str) -> dict[str, np.ndarray]:
        """The gate inputs that quantize ``layer``'s activations the way the plan and target would for ``cand``."""
        on = np.ones((), dtype=np.float32)
        out: dict[str, np.ndarray] = {}
        if layer.specs.get(cand) is None:
            return out
        if layer.name in self.gate_of:
            out[self.gate_of[layer.name]] = on
        oq = layer.output_quant.get(cand)
        if oq is not None and oq[0] in self.out_gate_of:
            out[self.out_gate_of[oq[0]]] = on
        return out

    def names_of(self, layer: LayerUnderTest) -> list[str]:
        """Every input this layer's settings may use (weights, input gate, output gates)."""
        names = [*self.inputs_of[layer.name], self.gate_of.get(layer.name, "")]
        names += [self.out_gate_of.get(t, "") for t, _ in layer.output_quant.values()]
        return [n for n in names if n]

    @property
    def samples(self) -> int:
        return len(self.feeds)

    def float_value(self, bi: int, name: str) -> np.ndarray | None:
        """The float value of tensor ``name`` in batch ``bi``: a graph input, output or exposed tensor."""
        if self.extra_values and name in self.extra_values[bi]:
            return np.asarray(self.extra_values[bi][name])
        if name in self.output_names:
            return self.reference[bi][self.output_names.index(name)]
        v = self.batches[bi].get(name)
        return None if v is None else np.asarray(v)

    # --------------------------------------------------------------------------------- evaluation
    def distortion(self, overrides: dict[str, np.ndarray]) -> _Acc:
        """Output distortion with the weights in ``overrides`` (input name -> float array) replaced."""
        acc = _Acc(len(self.output_names))
        weights = {**self.float_weights, **overrides}
        seg = self._segment_for(overrides)
        for bi in range(len(self.batches)):
            outs = self._run(bi, weights, seg)
            for o, (q, ref) in enumerate(zip(outs, self.reference[bi])):
                self._accumulate(acc, o, np.asarray(q), ref, self.ref_entropy[bi][o], bi)
        with self._lock:
            self.evaluations += 1
            self.partial += seg is not None
        return acc

    def _accumulate(self, acc: _Acc, o: int, q: np.ndarray, ref: np.ndarray, ref_entropy: np.ndarray,
                    bi: int) -> None:
        kind, axis = self.kinds[o]
        if ref.shape != q.shape:
            raise RuntimeError(f"output '{self.output_names[o]}' changed shape under quantization")
        r64 = self._rows(bi, ref.astype(np.float64, copy=False))
        d = r64 - self._rows(bi, q)
        per = np.einsum("ij,ij->i", d, d)
        noise = float(per.sum())
        acc.noise[o] += noise
        if kind == "prob" and axis is not None:
            # KL(p || q) summed over positions = Σ p·log p − Σ p·log q (per sample)
            logq = np.log(np.clip(self._rows(bi, q).astype(np.float64), 1e-12, 1.0))
            per = ref_entropy - np.einsum("ij,ij->i", r64, logq)
            acc.count[o] += ref.size // max(ref.shape[axis], 1)
        elif kind == "bernoulli":
            p = np.clip(r64, 1e-7, 1 - 1e-7)
            qq = np.clip(self._rows(bi, q).astype(np.float64), 1e-7, 1 - 1e-7)
            per = ref_entropy - (p * np.log(qq) + (1 - p) * np.log1p(-qq)).sum(axis=1)
            acc.count[o] += ref.size
        else:
            acc.count[o] = 1.0
        acc.metric[o] += float(per.sum())
        acc.rows[o].append(per)

    def score(self, acc: _Acc) -> float:
        """The scalar ``pd`` distortion of an evaluation: Σ over outputs (mean KL, or relative MSE)."""
        total = 0.0
        for o, (kind, _axis) in enumerate(self.kinds):
            if kind == "mse":
                total += float(acc.metric[o]) / max(float(self.signal[o]), 1e-300)
            else:
                total += float(acc.metric[o]) / max(float(acc.count[o]), 1.0)
        return total

    def sample_scores(self, acc: _Acc) -> np.ndarray:
        """Each sample's share of :meth:`score` (they sum to it)."""
        total: np.ndarray | float = 0.0
        for o, (kind, _axis) in enumerate(self.kinds):
            per = np.concatenate(acc.rows[o]) if acc.rows[o] else np.zeros(0)
            norm = max(float(self.signal[o]), 1e-300) if kind == "mse" else max(float(acc.count[o]), 1.0)
            total = total + per / norm
        return np.asarray(total, dtype=np.float64)

    def run_jobs(self, jobs: Sequence[Callable[[], Any]], progress: Progress | None = None,
                 done0: int = 0, total: int | None = None) -> list[Any]:
        """Run independent evaluations (callables) concurrently on the shared session; results in order."""
        total = total if total is not None else len(jobs)
        results: list[Any] = [None] * len(jobs)
        if self.workers <= 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                results[i] = job()
                if progress is not None:
                    progress(done0 + i + 1, total)
            return results
        done = done0
        with ThreadPoolExecutor(self.workers) as ex:
            futures = {ex.submit(job): i for i, job in enumerate(jobs)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                done += 1
                if progress is not None:
                    progress(done, total)
        return results


# ------------------------------------------------------------------------------------------------ metrics
def _rel_err(w: list[np.ndarray], q: list[np.ndarray]) -> float:
    num = sum(float(((a.astype(np.float64) - b) ** 2).sum()) for a, b in zip(w, q))
    den = sum(float((a.astype(np.float64) ** 2).sum()) for a in w)
    return num / max(den, 1e-300)


def _delta2(w: list[np.ndarray], q: list[np.ndarray]) -> float:
    return sum(float(((a.astype(np.float64) - b) ** 2).sum()) for a, b in zip(w, q))


def effective_samples(contrib: np.ndarray) -> float:
    """Kish's effective sample size ``(Σ d)² / Σ d²`` of per-sample distortions ``d`` (n when they are all equal,
    1 when one sample carries everything): how many samples a distortion measurement really rests on."""
    d = np.abs(np.asarray(contrib, dtype=np.float64))
    s2 = float(d @ d)
    return float(d.sum()) ** 2 / s2 if s2 > 0 else float(d.size)


def _quantizing(layer: Any, candidates: Sequence[str], values_row: np.ndarray,
                noise_row: np.ndarray | None = None) -> Iterator[tuple[int, str]]:
    """(index, candidate) of each candidate that quantizes ``layer``. A candidate that keeps it float scores 0 (in
    ``values_row`` and ``noise_row``); one the layer does not take is skipped (its entries stay NaN)."""
    for ci, cand in enumerate(candidates):
        if cand not in layer.specs:
            continue
        if layer.specs[cand] is None:
            values_row[ci] = 0.0
            if noise_row is not None:
                noise_row[ci] = 0.0
            continue
        yield ci, cand


def compute(metric: str, graph: gs.Graph, layers: Sequence[LayerUnderTest], candidates: Sequence[str],
            feeds: Sequence[dict[str, np.ndarray]], *, progress: Progress | None = None, batch_size: int = 8,
            workers: int | None = None, draws: int = 2, seed: int = 0, opset: int = 21,
            activations: bool = True, context: Sequence[int] | None = None,
            range_source: Any = None) -> SensitivityResult:
    """Sensitivity of every (layer, candidate) with ``metric`` (one of :data:`METRICS`). With ``activations``,
    ``pd`` quantizes the layer's input activation as the plan would (``LayerUnderTest.activation``) along with
    its weights, for every candidate but the float one.

    ``context`` (``pd`` only): a plan (candidate index per layer) to measure around instead of the float model —
    every layer quantized as the plan says, and each (layer, candidate) scored by how much switching that one
    layer changes the distortion (negative: better). Used to refine a plan where many coarse layers compound.

    ``range_source``: the data the activation ranges are calibrated on (a CalibrationSource, streamed), as the
    compile will calibrate them — default: ``feeds``.
    """
    if metric not in METRICS:
        raise UserError(f"--metric: unknown metric '{metric}' (one of: {', '.join(METRICS)})")
    t0 = time.perf_counter()
    extra: list[str] = []
    if metric in ("act-stats", "orthogonality"):
        for layer in layers:
            extra.append(layer.node.outputs[0].name)
            if metric == "act-stats":
                extra.append(layer.node.inputs[0].name)
    qparams = (_activation_qparams(graph, layers, feeds, opset, range_source) if metric == "pd" and activations
               else None)
    runner = SensitivityRunner(graph, layers, feeds, batch_size=batch_size, workers=workers,
                               extra_outputs=[n for n in extra if n not in {t.name for t in graph.inputs}],
                               activation_qparams=qparams, cuts=PARTIAL_CUTS if metric in ("pd", "hessian") else 0)
    n_l, n_c, n_o = len(layers), len(candidates), len(runner.output_names)
    values = np.full((n_l, n_c), np.nan)
    noise: np.ndarray | None = None
    details: dict[str, Any] = {"batched": runner.batched, "workers": runner.workers,
                               "session_seconds": round(runner.session_seconds, 3)}

    def quantized(layer: LayerUnderTest, cand: str) -> list[np.ndarray]:
        spec = layer.specs[cand]
        assert spec is not None
        return [fake_quantize(layer.node, w, spec, opset) for w in layer.weights()]

    base_noise: np.ndarray | None = None
    if context is not None and metric != "pd":
        raise ValueError("a context plan is only measured with pd")
    if metric == "pd":
        noise = np.full((n_l, n_c, n_o), np.nan)

        def setting(layer: LayerUnderTest, cand: str) -> dict[str, np.ndarray]:
            if layer.specs[cand] is None:
                return {}
            over = dict(zip(runner.inputs_of[layer.name], quantized(layer, cand)))
            over.update(runner.gates(layer, cand))
            return over

        around: dict[str, np.ndarray] = {}
        around_crossing: list[dict[str, np.ndarray]] = []
        base_score = 0.0
        if context is not None:
            for li, layer in enumerate(layers):
                around.update(setting(layer, candidates[context[li]]))
            # the context plan's own activations at the cuts: a change of one layer starts at the cut before it
            acc0, around_crossing = runner.capture(around)
            base_score, base_noise = runner.score(acc0), acc0.noise.copy()
        jobs: list[Callable[[], Any]] = []
        slots: list[tuple[int, int]] = []
        for li, layer in enumerate(layers):
            for ci, cand in enumerate(candidates):
                if cand not in layer.specs:
                    continue
                if context is not None and ci == context[li]:
                    values[li, ci] = 0.0
                    noise[li, ci] = 0.0
                    continue
                if context is None and layer.specs[cand] is None:
                    values[li, ci] = 0.0
                    noise[li, ci] = 0.0
                    continue

                def pd_job(layer: LayerUnderTest = layer, cand: str = cand) -> _Acc:
                    over = dict(around)
                    for name in runner.names_of(layer):
                        over.pop(name, None)  # this layer back to float, then to the candidate
                    over.update(setting(layer, cand))
                    seg = runner.segment_at(runner.layer_start(layer)) if context is not None else None
                    if seg is not None:
                        return runner.distortion_from(over, seg, around_crossing)
                    return runner.distortion(over)

                jobs.append(pd_job)
                slots.append((li, ci))
        ess: list[float] = []
        for (li, ci), acc in zip(slots, runner.run_jobs(jobs, progress)):
            values[li, ci] = runner.score(acc) - base_score
            noise[li, ci] = acc.noise - (base_noise if base_noise is not None else 0.0)
            if context is None:
                ess.append(effective_samples(runner.sample_scores(acc)))
        if ess:
            details["ess"] = float(np.median(ess))
    elif metric == "hessian":
        noise = np.full((n_l, n_c, n_o), np.nan)
        jobs = []
        for li, layer in enumerate(layers):
            ws = layer.weights()
            for d in range(draws):
                def h_job(li: int = li, layer: LayerUnderTest = layer, ws: list[np.ndarray] = ws, d: int = d) -> Any:
                    rng = np.random.default_rng([seed, li, d])
                    pert = []
                    h2n = 0.0
                    for w in ws:
                        h = HESSIAN_EPS * float(np.sqrt(np.mean(w.astype(np.float64) ** 2)) or 1e-8)
                        v = rng.integers(0, 2, size=w.shape).astype(np.float32) * 2.0 - 1.0
                        pert.append((w + np.float32(h) * v).astype(np.float32))
                        h2n += h * h * w.size
                    acc = runner.distortion(dict(zip(runner.inputs_of[layer.name], pert)))
                    return runner.score(acc), acc.noise, h2n

                jobs.append(h_job)
        results = runner.run_jobs(jobs, progress)
        trace: list[float] = []
        for li, layer in enumerate(layers):
            draws_out = results[li * draws:(li + 1) * draws]
            d_mean = float(np.mean([r[0] for r in draws_out]))
            n_mean = np.mean([r[1] for r in draws_out], axis=0)
            h2n = draws_out[0][2]
            trace.append(2.0 * d_mean / max(h2n, 1e-300))
            ws = layer.weights()
            for ci, cand in _quantizing(layer, candidates, values[li], noise[li]):
                dw2 = _delta2(ws, quantized(layer, cand))
                values[li, ci] = d_mean * dw2 / max(h2n, 1e-300)
                noise[li, ci] = n_mean * dw2 / max(h2n, 1e-300)
        details["trace_per_param"] = dict(zip([la.name for la in layers], trace))
    elif metric == "act-stats":
        medians, moments = _activation_stats(runner, layers)
        norm = float(np.mean([m for m in medians if m > 0]) or 1.0)
        for li, layer in enumerate(layers):
            ws = layer.weights()
            weights = [_moment_weights(layer, i, w, moments[li]) for i, w in enumerate(ws)]
            den = sum(float((w.astype(np.float64) ** 2 * m).sum()) for w, m in zip(ws, weights))
            for ci, cand in _quantizing(layer, candidates, values[li]):
                q = quantized(layer, cand)
                num = sum(float(((w.astype(np.float64) - qq) ** 2 * m).sum()) for w, qq, m in zip(ws, q, weights))
                values[li, ci] = (medians[li] / norm) * num / max(den, 1e-300)
            if progress is not None:
                progress(li + 1, n_l)
        details["median_abs_output"] = dict(zip([la.name for la in layers], medians))
    else:  # orthogonality
        theta, orm = _orthogonality(runner, layers)
        for li, layer in enumerate(layers):
            ws = layer.weights()
            for ci, cand in _quantizing(layer, candidates, values[li]):
                values[li, ci] = theta[li] * _rel_err(ws, quantized(layer, cand))
            if progress is not None:
                progress(li + 1, n_l)
        details["importance"] = dict(zip([la.name for la in layers], [float(t) for t in theta]))
        details["orm_mean"] = float(np.mean(orm)) if orm.size else 0.0
    if runner.segments:
        details["cuts"] = len(runner.segments)
        details["partial_evaluations"] = runner.partial
    return SensitivityResult(metric=metric, layers=[la.name for la in layers], candidates=list(candidates),
                             values=values, noise=noise, signal=runner.signal.copy(), outputs=runner.output_names,
                             output_kinds=[k for k, _ in runner.kinds], samples=runner.samples,
                             batches=len(runner.batches), evaluations=runner.evaluations,
                             seconds=time.perf_counter() - t0, details=details, base_noise=base_noise,
                             runner=runner if metric == "pd" else None)


def measure_plans(graph: gs.Graph, layers: Sequence[LayerUnderTest], candidates: Sequence[str],
                  feeds: Sequence[dict[str, np.ndarray]], plans: Sequence[Sequence[int]], *,
                  runner: SensitivityRunner | None = None, workers: int | None = None, batch_size: int = 8,
                  opset: int = 21, progress: Progress | None = None, range_source: Any = None,
                  qparams: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                  base: SensitivityRunner | None = None
                  ) -> tuple[list[tuple[float, np.ndarray]], SensitivityRunner]:
    """The ``pd`` distortion and output noise of whole plans (candidate index per layer), every layer quantized
    at once as planned — what one-layer-at-a-time sensitivities only add up — and the session used. Reuses
    ``runner`` (e.g. the session of a ``pd`` run) when given; else builds one on ``feeds`` with the activation
    ranges ``qparams`` (default: calibrated on ``range_source`` or ``feeds``) — or, given ``base`` (a runner of the
    same graph and layers), on ``feeds`` with ``base``'s session (:meth:`SensitivityRunner.rebound`)."""
    if runner is None and base is not None:
        runner = base.rebound(feeds)
    if runner is None:
        if qparams is None:
            qparams = _activation_qparams(graph, layers, feeds, opset, range_source)
        runner = SensitivityRunner(graph, layers, feeds, batch_size=batch_size, workers=workers,
                                   activation_qparams=qparams, cuts=PARTIAL_CUTS if len(plans) > 1 else 0)
    cache: dict[tuple[str, str], list[np.ndarray]] = {}

    def setting(plan: Sequence[int]) -> dict[str, np.ndarray]:
        over: dict[str, np.ndarray] = {}
        for layer, ci in zip(layers, plan):
            cand = candidates[ci]
            spec = layer.specs.get(cand)
            if spec is None:
                continue
            key = (layer.name, cand)
            if key not in cache:
                cache[key] = [fake_quantize(layer.node, w, spec, opset) for w in layer.weights()]
            over.update(zip(runner.inputs_of[layer.name], cache[key]))
            over.update(runner.gates(layer, cand))
        return over

    def job(plan: Sequence[int]) -> Callable[[], tuple[float, np.ndarray]]:
        def run() -> tuple[float, np.ndarray]:
            acc = runner.distortion(setting(plan))
            return runner.score(acc), acc.noise.copy()
        return run

    if not runner.segments or len(plans) < 2:
        return runner.run_jobs([job(p) for p in plans], progress), runner
    # Plans that agree on the layers before a cut share the activations there: some plans (roots) run whole and
    # keep those activations; every other plan starts from its root's at the latest cut before its first
    # layer that differs (layers taken in the order of the first node their settings change).
    order = sorted(range(len(layers)), key=lambda i: runner.layer_start(layers[i]))
    starts = [runner.layer_start(layers[i]) for i in order]
    keys = [tuple(p[i] for i in order) for p in plans]
    roots: list[int] = []
    parent: dict[int, tuple[int, Any]] = {}
    for k in sorted(range(len(plans)), key=lambda k: keys[k]):
        best: tuple[int, Any] | None = None
        for r in roots:
            m = next((i for i, (a, b) in enumerate(zip(keys[k], keys[r])) if a != b), len(order))
            seg = runner.segment_at(starts[m]) if m < len(order) else runner.segments[-1]
            if seg is not None and (best is None or seg[0] > best[1][0]):
                best = (r, seg)
        if best is None:
            roots.append(k)
        else:
            parent[k] = best
    results: list[Any] = [None] * len(plans)
    crossing: dict[int, list[dict[str, np.ndarray]]] = {}

    def root_job(k: int) -> Callable[[], tuple[float, np.ndarray]]:
        def run() -> tuple[float, np.ndarray]:
            acc, crossing[k] = runner.capture(setting(plans[k]))
            return runner.score(acc), acc.noise.copy()
        return run

    def child_job(k: int) -> Callable[[], tuple[float, np.ndarray]]:
        def run() -> tuple[float, np.ndarray]:
            r, seg = parent[k]
            acc = runner.distortion_from(setting(plans[k]), seg, crossing[r])
            return runner.score(acc), acc.noise.copy()
        return run

    children = [k for k in range(len(plans)) if k in parent]
    done = runner.run_jobs([root_job(k) for k in roots], progress, total=len(plans))
    for k, res in zip(roots, done):
        results[k] = res
    done = runner.run_jobs([child_job(k) for k in children], progress, done0=len(roots), total=len(plans))
    for k, res in zip(children, done):
        results[k] = res
    return results, runner


def _activation_qparams(graph: gs.Graph, layers: Sequence[LayerUnderTest], feeds: Sequence[dict[str, np.ndarray]],
                        opset: int, source: Any = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Scale and zero point (tensor name -> (s, z)) of each layer's input activation and of the outputs the
    target quantizes, calibrated on ``feeds`` as ``calibrate`` would. Only activation dtypes QuantizeLinear takes
    at the graph's opset; others stay float here."""
    from qcompiler.calib import CalibrationSource, collect, input_signatures

    def usable(a: QuantSpec | None) -> bool:
        if a is None or a.is_float or a.scheme != "int":
            return False
        if a.dtype.startswith("fp8"):
            return int(graph.opset) >= 19
        return a.dtype in ("int8", "uint8") or int(graph.opset) >= 21

    specs: dict[str, QuantSpec] = {}
    inputs = {t.name for t in graph.inputs}
    for layer in layers:
        x = layer.node.inputs[0] if layer.node.inputs else None
        if usable(layer.activation) and x is not None and not isinstance(x, gs.Constant):
            assert layer.activation is not None
            specs.setdefault(x.name, layer.activation)
        for t_name, spec in layer.output_quant.values():
            if usable(spec) and t_name not in inputs:
                specs.setdefault(t_name, spec)
    if not specs:
        return {}
    if source is None:
        source = CalibrationSource.from_feeds(list(feeds), input_signatures(graph), "sensitivity samples")
    stats = collect(graph, specs, source)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, spec in specs.items():
        if name in stats:
            lo, hi = stats[name].range(spec)
            out[name] = quant.qparams(lo, hi, spec.dtype, spec.symmetric)
    return out


# ------------------------------------------------------------------------------------------- act-stats
def _channel_axis_of_input(layer: LayerUnderTest, ndim: int) -> int:
    op = layer.op_type
    if op in ("Conv", "ConvTranspose"):
        return 1
    if op == "Gemm" and int(layer.node.attrs.get("transA", 0)):
        return 0
    return ndim - 1


def _activation_stats(runner: SensitivityRunner, layers: Sequence[LayerUnderTest]
                      ) -> tuple[list[float], list[dict[str, np.ndarray]]]:
    medians: list[float] = []
    moments: list[dict[str, np.ndarray]] = []
    for layer in layers:
        out_name = layer.node.outputs[0].name
        in_name = layer.node.inputs[0].name
        picks = []
        sums: np.ndarray | None = None
        count = 0
        out_sums: np.ndarray | None = None
        out_count = 0
        for bi in range(len(runner.batches)):
            y = runner.float_value(bi, out_name)
            x = runner.float_value(bi, in_name)
            if y is not None:
                flat = np.abs(np.asarray(y, dtype=np.float32)).ravel()
                step = max(1, flat.size // MEDIAN_SAMPLES)
                picks.append(flat[::step])
                ya = np.asarray(y, dtype=np.float64)
                if ya.ndim >= 1:
                    ax = ya.ndim - 1
                    s = (ya ** 2).sum(axis=tuple(i for i in range(ya.ndim) if i != ax))
                    out_sums = s if out_sums is None or out_sums.shape != s.shape else out_sums + s
                    out_count += ya.size // max(ya.shape[ax], 1)
            if x is not None:
                xa = np.asarray(x, dtype=np.float64)
                if xa.ndim >= 1:
                    ax = _channel_axis_of_input(layer, xa.ndim)
                    s = (xa ** 2).sum(axis=tuple(i for i in range(xa.ndim) if i != ax))
                    sums = s if sums is None or sums.shape != s.shape else sums + s
                    count += xa.size // max(xa.shape[ax], 1)
        medians.append(float(np.median(np.concatenate(picks))) if picks else 0.0)
        m: dict[str, np.ndarray] = {}
        if sums is not None and count:
            m["input"] = sums / count
        if out_sums is not None and out_count:
            m["output"] = out_sums / out_count
        moments.append(m)
    return medians, moments


def _moment_weights(layer: LayerUnderTest, k: int, w: np.ndarray, m: dict[str, np.ndarray]) -> np.ndarray:
    """E[x²] of the input channel each weight element multiplies, broadcast to the weight's shape."""
    op = layer.op_type
    ones = np.ones(w.shape, dtype=np.float64)
    x2 = m.get("input")
    if op in ("LSTM", "GRU", "RNN"):
        x2 = m.get("input") if k == 0 else m.get("output")  # W reads X, R reads the hidden state
        if x2 is None or w.ndim != 3 or x2.shape[0] != w.shape[2]:
            return ones
        return ones * x2.reshape(1, 1, -1)
    if x2 is None:
        return ones
    try:
        if op == "Conv":
            group = int(layer.node.attrs.get("group", 1))
            cout, cin_g = w.shape[0], w.shape[1]
            if x2.shape[0] != cin_g * group:
                return ones
            g_of = np.arange(cout) // max(cout // group, 1)
            idx = g_of[:, None] * cin_g + np.arange(cin_g)[None, :]
            return ones * x2[idx].reshape(cout, cin_g, *([1] * (w.ndim - 2)))
        if op == "ConvTranspose":
            if x2.shape[0] != w.shape[0]:
                return ones
            return ones * x2.reshape(-1, *([1] * (w.ndim - 1)))
        if op == "Gemm":
            trans_b = int(layer.node.attrs.get("transB", 0))
            k_axis = 1 if trans_b else 0
            if x2.shape[0] != w.shape[k_axis]:
                return ones
            return ones * (x2.reshape(1, -1) if trans_b else x2.reshape(-1, 1))
        if op == "MatMul":
            if w.ndim < 2 or x2.shape[0] != w.shape[-2]:
                return ones
            return ones * x2.reshape(-1, 1)
    except (IndexError, ValueError):
        return ones
    return ones


# -------------------------------------------------------------------------------------- orthogonality
def _features(runner: SensitivityRunner, layer: LayerUnderTest) -> np.ndarray:
    """Rows = samples; columns = a fixed coordinate subset (uniform shapes) or channel means."""
    name = layer.node.outputs[0].name
    rows: list[np.ndarray] = []
    channel_axis = 1 if layer.op_type in ("Conv", "ConvTranspose") else -1
    for bi in range(len(runner.batches)):
        value = runner.float_value(bi, name)
        if value is None:
            raise RuntimeError(f"orthogonality: no float value of '{name}'")
        y = np.asarray(value, dtype=np.float64)
        per = runner.sample_rows[bi]
        parts = np.split(y, per, axis=0) if runner.batched and y.ndim >= 1 and y.shape[0] == per else [y]
        for part in parts:
            if runner.uniform_shapes:
                flat = part.ravel()
                step = max(1, flat.size // ORM_FEATURES)
                rows.append(flat[::step][:ORM_FEATURES])
            else:
                ax = channel_axis % part.ndim if part.ndim else 0
                rows.append(part.mean(axis=tuple(i for i in range(part.ndim) if i != ax)).ravel()
                            if part.ndim else part.ravel())
    width = min(r.size for r in rows)
    return np.stack([r[:width] for r in rows])


def _orthogonality(runner: SensitivityRunner, layers: Sequence[LayerUnderTest]) -> tuple[np.ndarray, np.ndarray]:
    grams = []
    for layer in layers:
        x = _features(runner, layer)
        g = x @ x.T
        norm = float(np.linalg.norm(g))
        grams.append(g / norm if norm > 0 else g)
    n = len(grams)
    orm = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            v = float(np.sum(grams[i] * grams[j]))  # tr(G_i G_j) for symmetric G
            orm[i, j] = orm[j, i] = v
    if n > 1:
        mean_other = (orm.sum(axis=1) - np.diag(orm)) / (n - 1)
    else:
        mean_other = np.zeros(n)
    theta = np.exp(-mean_other)
    return theta, orm
