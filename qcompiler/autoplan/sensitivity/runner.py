"""The sensitivity runner: ONE onnxruntime session over the float graph in which the weights of every layer under
test are graph *inputs* (and the layers' activation fake-quantization is switched by gate inputs), so that a
candidate is evaluated by feeding its dequantized weights, never by rebuilding a session.

It batches the calibration samples (when the model is batch-safe, checked numerically), computes the float
outputs once (and the intermediate tensors asked for), measures the output distortion of an evaluation against
them (:class:`~qcompiler.autoplan.sensitivity.distortion.Distortion`), and runs independent evaluations
concurrently on the shared session. **Partial evaluation**: the topologically sorted graph is cut before up to
``cuts`` layers spread over the layer order; the float tensors crossing each cut are fetched with the reference
run, and one session per cut runs the nodes after it — an evaluation whose settings change nothing before a cut
starts there (exact: the nodes before it see the float inputs). :meth:`SensitivityRunner.capture` keeps the
activations at the cuts of any setting, so that settings that agree with it before a cut start there too.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler import ir
from qcompiler.autoplan.sensitivity.distortion import Distortion, output_kind
from qcompiler.autoplan.sensitivity.graph_cuts import frontier, tail_graph
from qcompiler.autoplan.sensitivity.layers import LayerUnderTest
from qcompiler.core.errors import UserError

log = logging.getLogger(__name__)

#: pd / hessian: evaluations start from the float activations at up to this many cuts (partial evaluation)
PARTIAL_CUTS = 8
#: ... unless the activations crossing the cuts take more than this many bytes over the samples
PARTIAL_MAX_BYTES = 1 << 30

Progress = Callable[[int, int], None]


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
        self._frontiers = {p: frontier(g, p) for p in cut_at}
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
        self.kinds = [output_kind(n, graph, self.reference[0][o]) for o, n in enumerate(self.output_names)]
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
        sub = tail_graph(g, p, {n: crossing[n].dtype for n in front}, outs)
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

    def capture(self, overrides: dict[str, np.ndarray]) -> tuple[Distortion, list[dict[str, np.ndarray]]]:
        """:meth:`distortion` of a whole-graph run that also returns, per batch, the activations crossing every
        cut under these settings (to start other evaluations that share the settings before a cut from)."""
        acc = Distortion(len(self.output_names))
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
                        crossing: list[dict[str, np.ndarray]]) -> Distortion:
        """:meth:`distortion` started at cut ``seg`` from the activations ``crossing`` (per batch, of a
        :meth:`capture` whose settings equal ``overrides`` on every input read before the cut)."""
        acc = Distortion(len(self.output_names))
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
    def distortion(self, overrides: dict[str, np.ndarray]) -> Distortion:
        """Output distortion with the weights in ``overrides`` (input name -> float array) replaced."""
        acc = Distortion(len(self.output_names))
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

    def _accumulate(self, acc: Distortion, o: int, q: np.ndarray, ref: np.ndarray, ref_entropy: np.ndarray,
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

    def score(self, acc: Distortion) -> float:
        """The scalar ``pd`` distortion of an evaluation: Σ over outputs (mean KL, or relative MSE)."""
        total = 0.0
        for o, (kind, _axis) in enumerate(self.kinds):
            if kind == "mse":
                total += float(acc.metric[o]) / max(float(self.signal[o]), 1e-300)
            else:
                total += float(acc.metric[o]) / max(float(acc.count[o]), 1.0)
        return total

    def sample_scores(self, acc: Distortion) -> np.ndarray:
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
