"""Probe plans and probe compiles: what the target quantizes downstream of each layer (:func:`output_quant`),
every layer's stored bytes under every candidate from one compile per candidate (:func:`cost_tables`, counted
as ``qcompiler inspect --cost`` counts them), and a plan compiled for real and measured (:func:`measure_sqnr`).
Compiles go through :func:`qcompiler.compile.compile_plan`, below the public API.

The searches of one planner run (:func:`qcompiler.autoplan.baseline.auto_plan`: up to 8, one per candidate list
and trust region) prepare the same model with the same base plan and probe the same candidates: a
:class:`ProbeMemo` shared by them keeps what does not depend on the search — each probe compile's cost report
(by plan text, calibration sample, shapes and layers), the target's downstream quantization per probe plan and
the float model's cost — so each is computed once per run, not once per search.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from qcompiler import ir
from qcompiler.autoplan.budget import Candidate
from qcompiler.autoplan.plans import plan_text, probe_text
from qcompiler.autoplan.prepare import Prepared
from qcompiler.autoplan.result import Progress
from qcompiler.compile import CompileOptions, compile_plan
from qcompiler.core.context import CompileContext
from qcompiler.plan import Plan, QuantSpec
from qcompiler.report import cost
from qcompiler.report import validate as qv
from qcompiler.report.validate.compare import validation_workers
from qcompiler.report.validate.reference import (
    Reference,
    compare_outputs,
    feed_digest,
    float_reference,
    validate_against,
)
from qcompiler.report.validate.resample import SampleEnergies, sample_energies


@dataclass
class ProbeMemo:
    """What the probes of one planner run found, by everything that determines it (see the module docstring).
    Entries are never changed once stored: callers read them only."""

    #: (model, target, plan text, calibration sample, shapes, want shapes, layers) -> (cost report, weight
    #: owners, the compile report's ``plan`` section)
    compiles: dict[tuple[Any, ...], tuple[cost.CostReport, dict[str, str], dict[str, Any]]] = field(
        default_factory=dict)
    #: (model, target, probe plan text) -> ``Target.output_tensors`` on the prepared graph
    outputs: dict[tuple[Any, ...], dict[str, QuantSpec]] = field(default_factory=dict)
    #: (model, shapes, want shapes) -> the float model's cost report
    float_costs: dict[tuple[Any, ...], cost.CostReport] = field(default_factory=dict)
    hits: int = 0


def _shapes_key(shapes: dict[str, list[int]] | None) -> tuple[Any, ...] | None:
    return None if shapes is None else tuple(sorted((k, tuple(v)) for k, v in shapes.items()))


_ACTIVATION_OPS = ("Relu", "Clip", "LeakyRelu", "HardSigmoid", "Sigmoid", "Tanh", "HardSwish", "PRelu")


def output_quant(prep: Prepared, cands: Sequence[Candidate], rules: list[list[dict[str, Any] | None]],
                 memo: ProbeMemo | None = None) -> list[dict[str, tuple[str, QuantSpec]]]:
    """Per layer: candidate -> (tensor, spec) the target quantizes downstream of the layer when it takes that
    candidate (``Target.output_tensors`` on the probe plan; e.g. ``ort``'s QLinearConv output for int8 Conv).
    ``memo``: the target's answer per probe plan, shared by the searches of one run (same model and base plan:
    the same prepared graph)."""
    out: list[dict[str, tuple[str, QuantSpec]]] = [{} for _ in prep.layers]
    by_name = {n.name: n for n in prep.graph.nodes}
    for ci, cand in enumerate(cands):
        if cand.is_float:
            continue
        text = probe_text(prep, rules, ci)
        key = (str(prep.model_path), prep.target.name, text)
        outs = memo.outputs.get(key) if memo is not None else None
        if outs is None:
            plan = Plan.from_text(text, source="<probe>")
            ctx = CompileContext(graph=prep.graph, meta=prep.meta, plan=plan, target=prep.target,
                                 resolved=plan.resolve(prep.graph))
            outs = prep.target.output_tensors(ctx)
            if memo is not None:
                memo.outputs[key] = outs
        elif memo is not None:
            memo.hits += 1
        if not outs:
            continue
        for li, la in enumerate(prep.layers):
            node = by_name.get(la.name)
            if rules[li][ci] is None or node is None or not node.outputs:
                continue
            t: Any = node.outputs[0]
            chain = [t]
            while len(t.outputs) == 1 and t.outputs[0].op in _ACTIVATION_OPS and t.outputs[0].outputs:
                t = t.outputs[0].outputs[0]
                chain.append(t)
            hit = next((x.name for x in chain if x.name in outs), None)
            if hit is not None:
                out[li][cand.name] = (hit, outs[hit])
    return out


#: ops a weight's dequantization chain never passes through (the layer itself, or another layer)
_LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN", "QLinearConv",
                        "QLinearMatMul", "MatMulNBits", "MatMulInteger", "ConvInteger"})


def weight_owners(graph: Any, layers: set[str]) -> dict[str, str]:
    """Nodes of a compiled graph whose outputs reach exactly one node, through single-reader chains of non-layer
    ops, and that node is one of ``layers`` -> that layer. A target may dequantize a weight with ops of its own
    (``Cast`` + ``Mul`` at load time, say); ``inspect --cost`` gives their stored tensors to the first reader,
    the planner gives them to the layer the chain feeds."""
    out: dict[str, str] = {}
    for node in graph.nodes:
        if node.name in layers or node.op in _LAYER_OPS or (node.domain or "") not in ("", "ai.onnx"):
            continue
        cur = node
        for _ in range(16):
            readers = [r for t in cur.outputs for r in t.outputs]
            if len(readers) != 1:
                break
            cur = readers[0]
            if cur.name in layers:
                out[node.name] = cur.name
                break
            if cur.op in _LAYER_OPS or (cur.domain or "") not in ("", "ai.onnx"):
                break
    return out


def _cost_from_json(cj: dict[str, Any]) -> cost.CostReport:
    """A compile report's ``cost`` section (``CostReport.to_json()``) back as a :class:`~qcompiler.report.cost.CostReport`."""
    keys = ("name", "op_type", "bytes", "params", "macs", "weight_bits", "act_bits", "weight_format")
    layers = [cost.LayerCost(**{k: lc[k] for k in keys if k in lc}) for lc in cj.get("layers", [])]
    return cost.CostReport(layers=layers, total_bytes=int(cj["total_bytes"]), tensor_bytes=int(cj["tensor_bytes"]),
                           unattributed_bytes=int(cj.get("unattributed_bytes", 0)),
                           peak_activation_bytes=cj.get("peak_activation_bytes"), peak_at=cj.get("peak_at"),
                           feed_shapes={k: list(v) for k, v in cj.get("feed_shapes", {}).items()},
                           shapes_from=str(cj.get("shapes_from", "none")), files=list(cj.get("files", [])),
                           notes=list(cj.get("notes", [])))


def compiled_cost(res: Any, out: Path, shapes: dict[str, list[int]] | None, want_shapes: bool) -> cost.CostReport:
    """The cost report of a compile's output ``out`` (``res``: its :class:`~qcompiler.compile.CompileResult`): the
    compile's own when it counted what is asked, else counted again."""
    files = [f for f in res.files if f.suffix in (".onnx", ".data") or f.name.endswith(".onnx.data")]
    cj = res.report.get("cost")
    if cj is not None and (not want_shapes or (cj.get("shapes_from") != "none" and cj.get("macs")
                                               and cj.get("feed_shapes") == shapes)):
        return _cost_from_json(cj)  # the compile counted it already (at the calibration sample's shapes)
    return cost.model_cost(out, files=files, feed_shapes=shapes, shapes=want_shapes)


class ProbeWorkdir:
    """A temporary folder with the one-sample calibration file the probe compiles use."""

    def __init__(self, feed: dict[str, np.ndarray], memo: ProbeMemo | None = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="qcompiler-autoplan-"))
        self.calib = self.path / "calib1.npz"
        arrays: dict[str, Any] = {k: np.asarray(v)[None] for k, v in feed.items()}
        np.savez(self.calib, **arrays)
        self.n = 0
        #: after :meth:`compile` with ``layers``: cost-report entry -> the layer whose weight it only feeds
        self.owners: dict[str, str] = {}
        #: :meth:`compile_text`'s results, shared with other work folders of the same run
        self.memo = memo
        self.feed_key = feed_digest(arrays) if memo is not None else ""

    def compile_text(self, model: Path, text: str, target: str, *, shapes: dict[str, list[int]] | None,
                     want_shapes: bool, layers: set[str] | None = None, plan: Plan | None = None
                     ) -> tuple[cost.CostReport, dict[str, Any]]:
        """:meth:`compile` of the plan ``text`` (``plan`` when given, else the text parsed as ``<probe>``), or what
        a compile of the same text, model, target, calibration sample, shapes and layers gave earlier in this run
        (the same, the compile being deterministic)."""
        key = (str(model), target, text, self.feed_key, _shapes_key(shapes), want_shapes,
               frozenset(layers) if layers else None)
        hit = self.memo.compiles.get(key) if self.memo is not None else None
        if hit is not None:
            assert self.memo is not None
            self.memo.hits += 1
            self.owners = dict(hit[1])
            return hit[0], hit[2]
        rep, plan_rep = self.compile(model, plan if plan is not None else Plan.from_text(text, source="<probe>"),
                                     target, shapes=shapes, want_shapes=want_shapes, layers=layers)
        if self.memo is not None:
            self.memo.compiles[key] = (rep, dict(self.owners), plan_rep)
        return rep, plan_rep

    def compile(self, model: Path, plan: Plan, target: str, *, shapes: dict[str, list[int]] | None,
                want_shapes: bool, layers: set[str] | None = None) -> tuple[cost.CostReport, dict[str, Any]]:
        self.n += 1
        out = self.path / f"probe{self.n}.onnx"
        res = compile_plan(model, out, CompileOptions(plan=plan, target=target, calib=str(self.calib),
                                                      calib_samples=1, validate=False))
        rep = compiled_cost(res, out, shapes, want_shapes)
        self.owners = weight_owners(ir.import_graph(ir.load_model(out))[0], layers) if layers else {}
        plan_rep = res.report.get("plan", {})
        for f in res.files:
            f.unlink(missing_ok=True)
        return rep, plan_rep

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def cost_tables(prep: Prepared, cands: Sequence[Candidate], rules: list[list[dict[str, Any] | None]],
                 work: ProbeWorkdir, shapes: dict[str, list[int]], want_bitops: bool, progress: Progress | None
                 ) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float]]:
    """Per (layer, candidate) bytes / BitOps / parameter-bits, and the plan-independent base of each.

    Bytes are measured on probe compiles (see the module docstring). BitOps of a layer are its MACs (from the
    float probe, at the calibration feed shape) × the candidate's weight bits × its activation bits (the base
    plan's activation spec; 32 when the layer stays float) — what ``inspect --cost`` counts for it, except that
    a float layer reading an activation another layer quantized is counted at 32 bits here (an upper bound).
    """
    n_l, n_c = len(prep.layers), len(cands)
    tbytes = np.full((n_l, n_c), np.nan)
    tbitops = np.full((n_l, n_c), np.nan)
    tbits = np.full((n_l, n_c), np.nan)
    float_rules = [{"match": {"name": la.name}, "skip": True} for la in prep.layers]
    probes: list[tuple[int | None, str]] = [(None, plan_text(prep, float_rules, []))]
    probes += [(ci, probe_text(prep, rules, ci)) for ci, c in enumerate(cands) if not c.is_float]
    remainder: dict[int | None, tuple[float, int]] = {}
    float_report: cost.CostReport | None = None
    for k, (ci, text) in enumerate(probes):
        if progress:
            progress("costs (probe compiles)", k, len(probes))
        rep, _ = work.compile_text(prep.model_path, text, prep.target.name, shapes=shapes, want_shapes=ci is None,
                                   layers={la.name for la in prep.layers})
        by = rep.by_name()
        fed: dict[str, float] = {}
        for name, owner in work.owners.items():
            if name in by:
                fed[owner] = fed.get(owner, 0.0) + float(by[name].bytes)
        planned = 0.0
        n = 0
        for li, la in enumerate(prep.layers):
            lc = by.get(la.name)
            b = (float(lc.bytes) if lc is not None else 0.0) + fed.get(la.name, 0.0)
            planned += b
            if ci is None:
                la.macs = int(lc.macs) if lc is not None else 0
                for cj, c in enumerate(cands):
                    if c.is_float:
                        tbytes[li, cj] = b
            elif rules[li][ci] is not None:
                tbytes[li, ci] = b
                n += 1
        remainder[ci] = (float(rep.total_bytes) - planned, n)
        if ci is None:
            float_report = rep
    if progress:
        progress("costs (probe compiles)", len(probes), len(probes))
    assert float_report is not None
    base_bytes, _ = remainder[None]
    for ci, cand in enumerate(cands):
        if cand.is_float:
            continue
        rb, n = remainder[ci]
        ok = np.isfinite(tbytes[:, ci])
        tbytes[ok, ci] = np.maximum(tbytes[ok, ci] + (rb - base_bytes) / max(n, 1), 0.0)
    for li, la in enumerate(prep.layers):
        a_bits = cost.spec_bits(la.activation)
        for ci, cand in enumerate(cands):
            if rules[li][ci] is None:
                continue
            spec = prep.specs[li][cand.name]
            w_bits = cost.spec_bits(spec)
            tbits[li, ci] = la.params * w_bits
            tbitops[li, ci] = la.macs * w_bits * (cost.FLOAT_BITS if spec is None else a_bits)
    planned_names = {la.name for la in prep.layers}
    base_ops = float(float_report.bitops) - float(sum(la.macs for la in prep.layers)) * cost.FLOAT_BITS ** 2
    # weights of MAC ops outside the plan count towards the average bits at their stored width
    others = [lc for lc in float_report.layers if lc.params and lc.name not in planned_names]
    other_bits = float(sum(lc.params * (lc.weight_bits or cost.FLOAT_BITS) for lc in others))
    params = float(sum(la.params for la in prep.layers) + sum(lc.params for lc in others))
    src_rep = _float_cost(prep.model_path, shapes, want_bitops, work.memo)
    float_totals = {"bytes": float(src_rep.total_bytes), "bitops": float(src_rep.bitops), "params": params}
    base = {"bytes": base_bytes, "bitops": base_ops, "bits": other_bits, "params": params}
    return {"bytes": tbytes, "bitops": tbitops, "bits": tbits}, base, float_totals


def _float_cost(model: Path, shapes: dict[str, list[int]], want_bitops: bool, memo: ProbeMemo | None
                ) -> cost.CostReport:
    key = (str(model), _shapes_key(shapes), want_bitops)
    rep = memo.float_costs.get(key) if memo is not None else None
    if rep is None:
        rep = cost.model_cost(model, feed_shapes=shapes, shapes=want_bitops)
        if memo is not None:
            memo.float_costs[key] = rep
    return rep


class HeldScores(NamedTuple):
    """:func:`held_scores`' result: the worst output slice's SQNR on all the feeds, on each half of them (``()``
    below 4 feeds), and the quantized outputs' per-sample energies (what a paired bootstrap against another plan
    needs: :func:`~qcompiler.report.validate.resample.sample_energies`; None in the sequential case)."""

    whole: float
    halves: tuple[float, ...]
    energies: SampleEnergies | None = None


def held_scores(model_path: Path, out: Path, feeds: list[dict[str, np.ndarray]], refs: dict[str, Reference]
                ) -> HeldScores:
    """The worst output slice's SQNR (``ValidationReport.worst_slice_sqnr``) of the compiled model ``out`` against
    the float ``model_path`` on ``feeds`` and, with 4 feeds or more, on each half of them (even / odd positions):
    ``qv.validate(model_path, out, part, per_layer=False)``'s numbers for each part, with the float model run once
    per ``refs`` (the caller's, for these feeds; by model) and the quantized model once (the halves scored from
    its outputs on all the feeds), and the per-sample energies of those outputs. With fewer feeds than validation
    runs side by side (where the sessions' threads would differ from validate's), each part is validated as before
    (no energies)."""
    halves = len(feeds) >= 4
    if len(feeds) < validation_workers():
        parts = [feeds, *((feeds[0::2], feeds[1::2]) if halves else ())]
        got = [float(qv.validate(model_path, out, part, per_layer=False).worst_slice_sqnr()) for part in parts]
        return HeldScores(got[0], tuple(got[1:]))
    ref = refs.get(str(model_path))
    if ref is None:
        ref = refs[str(model_path)] = float_reference(model_path, feeds)
    kept: list[dict[str, Any]] = []
    whole = float(validate_against(ref, out, keep=kept).worst_slice_sqnr())
    energies = sample_energies(ref, kept)
    if not halves:
        return HeldScores(whole, (), energies)
    return HeldScores(whole, tuple(float(compare_outputs(
        dataclasses.replace(ref, feeds=ref.feeds[k::2], outputs=ref.outputs[k::2], indices=(),
                            feed_digests=ref.feed_digests[k::2]), kept[k::2], label=str(out)).worst_slice_sqnr())
        for k in (0, 1)), energies)


def measure_sqnr(model_path: str | Path, plan: Plan, calib: str | Path, *, target: str = "ort",
                 validate_data: str | Path | None = None, calib_samples: int | None = None) -> float:
    """Compile ``plan`` for real (calibration data ``calib``) and return the worst output SQNR in dB, measured in
    onnxruntime on ``validate_data`` (default: the calibration data), graph outputs only."""
    tmp = Path(tempfile.mkdtemp(prefix="qcompiler-measure-"))
    try:
        out = tmp / "m.onnx"
        compile_plan(model_path, out, CompileOptions(plan=plan, target=target, calib=str(calib),
                                                     calib_samples=calib_samples, validate=False))
        float_model = ir.load_model(model_path)
        feeds = qv.load_feeds(validate_data if validate_data is not None else calib, float_model)
        report = qv.validate(float_model, ir.load_model(out), feeds, per_layer=False)
        return float(report.worst_output_sqnr())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
