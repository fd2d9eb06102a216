"""calibrate: measure the range of every activation tensor to quantize (an analysis; the graph is unchanged).

Runs the float graph in onnxruntime over the calibration samples (``ctx.calib``: a folder of .npz feeds, one
.npz with a leading sample axis, or random data) with the tensors of ``ctx.activation_specs`` exposed as extra
outputs, one sample at a time, and stores a :class:`~qcompiler.calib.TensorStats` per tensor in
``ctx.stats``. The quantizer later asks each for ``stats.range(spec)`` (minmax, percentile, entropy or mse).

Without calibration data (``ctx.calib is None``) it uses seeded random inputs and says so: the report's
``calibration.synthetic`` is true and a warning is logged, because such ranges are only a placeholder. The compile
sets ``ctx.require_calibration_data`` when no ``--calib`` was given: then static activation ranges without data are
refused (a :class:`UserError` saying what to give) instead; ``--calib random`` is the explicit way to random ranges.

Data-free mode (``--calib none``, ``ctx.data_free``): a tensor computed from a BatchNormalization output by
elementwise ops only (ReLU, Clip, hard-swish, ..., see ``qcompiler.calib.bn_ranges``) gets its range from
the BN statistics ``fold-batchnorm`` recorded: per channel ``β ± k·γ`` (k = ``BN_SIGMAS``, 6) pushed through those
ops, so a ReLU clips it at 0. The other tensors (the graph inputs, for one) fall back to random inputs.

``calibration: auto`` (plan) or ``method=auto`` (pipeline) chooses the method per model, measured: the last
``h = min(auto_samples, N/4)`` of the N calibration samples are held out. The statistics (histograms, which every
method reads) of the first N − h samples give each method of ``AUTO_CALIBRATIONS`` (minmax, percentile,
entropy, mse) its ranges; the model is quantized once per method (the same ``insert-qdq`` as the compile, on a
copy of the graph, every ``auto`` tensor with that method), each copy runs in onnxruntime on the h held-out
samples (at the optimization level the target validates at: ``ort`` fuses its integer kernels), and the method
whose outputs are closest to the float model's (mean output SQNR in dB over the float outputs) replaces ``auto``
in those tensors' specs. The held-out statistics are then merged in (exact), so the compile's ranges come from
all N samples, as with that method given by hand; every sample still runs once. The float reference on the
held-out samples comes from calibration's own runs of them (their graph outputs fetched in the same runs, or kept
by the statistics cache with the statistics that served them), taken once the trials' float session gives the
first held-out sample's outputs bit for bit as kept (else the float graph runs every held-out sample again).
The report's ``calibration.auto`` lists each method's held-out SQNR and the choice. Holding out matters: measured on the
calibration samples themselves, clipping methods look best on PP-OCR cls, whose held-back evaluation lines
prefer minmax by 10 dB (benchmarks/RESULTS.md, "Calibration: auto"). The measurement leaves out what later
passes (``gptq``, ``bias-correct``) change; with synthetic data (``--calib random``) or fewer than 4 samples
there is nothing to measure on and ``auto`` becomes ``minmax`` with a warning.

Options: ``method`` overrides every activation spec's calibration method (written back into
``ctx.activation_specs`` so the quantizer uses the same one), ``percentile`` overrides the percentile,
``samples`` uses at most N samples, ``auto_samples`` the most samples ``auto`` holds out (default 16).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from qcompiler import ir
from qcompiler.calib import (
    AUTO_HELD_SAMPLES,
    BN_SIGMAS,
    OUTPUTS_MAX_BYTES,
    CalibrationSource,
    FloatOutputs,
    TensorStats,
    bn_ranges,
    bn_statistics,
    collect,
    first_digest,
    input_signatures,
    outputs_from_cache,
    session_feed,
)
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.numbers import energies
from qcompiler.core.pass_base import Pass, PassResult
from qcompiler.plan import AUTO_CALIBRATIONS, CALIBRATIONS

from ._stream import activation_cache_for
from .insert_qdq import InsertQDQPass

log = logging.getLogger(__name__)

#: passes after calibrate whose effect ``calibration: auto`` does not measure
_UNMEASURED = ("gptq", "bias-correct")

#: Random samples used when no calibration data is given (and ``samples`` is not set).
DEFAULT_RANDOM_SAMPLES = 16


@dataclass
class Options:
    method: str | None = None  # override every activation spec's calibration: minmax|percentile|entropy|mse
    percentile: float | None = None  # override the percentile (50, 100]
    samples: int | None = None  # use at most N samples
    #: calibration: auto holds out the last min(N, samples / 4) samples and measures each method on them
    auto_samples: int = AUTO_HELD_SAMPLES

    def validate(self, pass_name: str = "calibrate") -> None:
        if self.method == "dynamic":
            raise UserError(f"pass '{pass_name}' option 'method': 'dynamic' is set in the plan "
                            "(activation: {calibration: dynamic}), where the target checks that it can run it")
        if self.method is not None and self.method not in CALIBRATIONS:
            raise UserError(f"pass '{pass_name}' option 'method': bad value '{self.method}' "
                            f"(one of: {', '.join(CALIBRATIONS)})")
        if self.percentile is not None and not (50.0 < float(self.percentile) <= 100.0):
            raise UserError(f"pass '{pass_name}' option 'percentile': must be in (50, 100], got {self.percentile}")
        if self.samples is not None and self.samples <= 0:
            raise UserError(f"pass '{pass_name}' option 'samples': must be a positive integer, got {self.samples}")
        if self.auto_samples <= 0:
            raise UserError(f"pass '{pass_name}' option 'auto-samples': must be a positive integer, "
                            f"got {self.auto_samples}")


class CalibratePass(Pass):
    """Collect activation statistics over the calibration data (seeded random inputs only where allowed)."""

    name = "calibrate"
    Options = Options
    requires = frozenset({"plan-resolved"})
    produces = frozenset({"calibrated"})

    #: Set by the CLI: called with the number of sample runs, returns a ``progress(done, total)`` callback.
    progress_factory: Callable[[int], Callable[[int, int], None]] | None = None

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.options.validate(self.name)

    def _progress(self, ctx: CompileContext, total: int) -> Callable[[int, int], None] | None:
        if self.progress_factory is not None:
            return self.progress_factory(total)
        report_cb = ctx.progress
        if report_cb is not None:
            return lambda done, n: report_cb("calibrate", done, n)
        return None

    def run(self, ctx: CompileContext) -> PassResult:
        opts: Options = self.options
        stats: Counter[str] = Counter()
        specs = dict(ctx.activation_specs)
        overrides: dict[str, Any] = {}
        if opts.method is not None:
            overrides["calibration"] = opts.method
        if opts.percentile is not None:
            overrides["percentile"] = float(opts.percentile)
        if overrides:
            specs = {name: dataclasses.replace(spec, **overrides) for name, spec in specs.items()}
            ctx.activation_specs = dict(specs)  # the quantizer must ask for the range we calibrated for
        # calibration: dynamic — DynamicQuantizeLinear measures the range of each run: nothing to collect
        n_dynamic = sum(1 for spec in specs.values() if spec.calibration == "dynamic")
        if n_dynamic:
            stats["dynamic"] = n_dynamic
        static = [name for name, spec in specs.items() if spec.calibration != "dynamic"]
        if not static:  # nothing to calibrate
            ctx.stats = {}
            if ctx.float_outputs is not None and ctx.calib is not None:  # validation's reference, where kept
                outputs_from_cache(ctx.graph, ctx.calib.take(opts.samples), ctx.float_outputs)
            ctx.report["calibration"] = {"source": None, "synthetic": False, "samples": 0, "tensors": 0,
                                         "methods": {"dynamic": n_dynamic} if n_dynamic else {}}
            if n_dynamic:
                ctx.report["calibration"]["dynamic"] = n_dynamic
            stats["tensors"] = 0
            stats["samples"] = 0
            return PassResult(modified=False, stats=stats)

        fixed: dict[str, tuple[float, float]] = {}
        if ctx.data_free:  # --calib none: ranges from the recorded BatchNormalization statistics where possible
            fixed = bn_ranges(ctx.graph, static, bn_statistics(ctx), BN_SIGMAS)
            for name in fixed:
                specs[name] = dataclasses.replace(specs[name], calibration="minmax")
                ctx.activation_specs[name] = specs[name]
        rest = {name: specs[name] for name in static if name not in fixed}

        source: CalibrationSource
        if ctx.calib is None and rest and ctx.require_calibration_data:
            raise UserError(_no_data_message(ctx, rest))
        if ctx.calib is None:
            n = opts.samples or DEFAULT_RANDOM_SAMPLES
            source = CalibrationSource.from_arg("random", input_signatures(ctx.graph), seed=ctx.seed,
                                                num_random=n)
            if rest:
                log.warning("no calibration data: using %s for %d tensor(s); their activation ranges are "
                            "synthetic (give --calib DATA)", source.description, len(rest))
        else:
            source = ctx.calib.take(opts.samples)
        n_samples = len(source) if rest else 0
        progress = self._progress(ctx, n_samples)
        shapes: dict[str, Any] = {}
        auto = [name for name, spec in rest.items() if spec.calibration == "auto"]
        chosen: dict[str, Any] | None = None
        held = min(opts.auto_samples, n_samples // 4) if auto and not source.synthetic else 0
        if held:  # calibration: auto — the last samples held out to measure each method on
            fit = source.subset(range(n_samples - held))
            held_out = source.subset(range(n_samples - held, n_samples))
            # the fit samples are the first ones: their graph outputs go to validation at their own places
            ctx.stats = collect(ctx.graph, rest, fit, progress=progress, shapes=shapes, for_auto=ctx.collect_for_auto,
                                outputs=ctx.float_outputs)
            later = (lambda done, total: progress(n_samples - held + done, n_samples)) if progress else None
            # the held-out samples' graph outputs from the same runs (or kept by the collection that served them):
            # the trials' float reference, once the first sample checks
            # (at most the statistics cache's bound on kept outputs: above it the float graph runs on them once more)
            kept = FloatOutputs(held, OUTPUTS_MAX_BYTES)
            held_stats = collect(ctx.graph, rest, held_out, progress=later, for_auto=ctx.collect_for_auto,
                                 outputs=kept)
            chosen = _choose_method(ctx, auto, ctx.stats, held_out, kept.values)
            later_algos = [q for q in ctx.passes_after if q in _UNMEASURED]
            if later_algos:
                log.warning("calibration auto: chose %s measured without %s, which run(s) after calibrate and "
                            "change the quantized model; the choice may not be the best for the final model "
                            "(measured on PP-OCR rec with gptq: 9 dB below percentile) — prefer choosing the "
                            "method by hand there", chosen["method"], ", ".join(later_algos))
                chosen["measured_without"] = later_algos
            for name, st in held_stats.items():
                ctx.stats[name].merge(st)  # exact: the same statistics as one pass over every sample
        else:
            ctx.stats = collect(ctx.graph, rest, source, progress=progress, shapes=shapes,
                                cache=activation_cache_for(ctx), outputs=ctx.float_outputs,
                                for_auto=ctx.collect_for_auto) if rest else {}
        if shapes:  # first-sample shapes: the compile's cost report infers the rest instead of running the model
            ctx.calib_shapes = shapes
        for name, (lo, hi) in fixed.items():
            st = TensorStats()
            st.update(np.asarray([lo, hi], dtype=np.float64))
            ctx.stats[name] = st
        if ctx.data_free:
            ctx.report["data_free"] = {"bn_ranges": len(fixed), "synthetic_ranges": len(rest),
                                       "bn_sigmas": BN_SIGMAS}
            stats["bn_ranges"] = len(fixed)
        if auto:
            if chosen is None:
                why = "synthetic ranges" if source.synthetic else f"{n_samples} sample(s): too few to hold any out"
                log.warning("calibration auto: no calibration data to measure the methods on (%s); using minmax "
                            "for %d tensor(s)", why, len(auto))
                chosen = {"method": "minmax", "output_sqnr_db": {}, "samples": 0, "tensors": len(auto)}
            for name in auto:
                specs[name] = dataclasses.replace(specs[name], calibration=chosen["method"])
                ctx.activation_specs[name] = specs[name]
            stats[f"auto_{chosen['method']}"] = len(auto)
        methods = Counter(spec.calibration for spec in specs.values())
        ctx.report["calibration"] = {
            "source": source.description,
            "synthetic": bool(source.synthetic) and bool(rest),
            "samples": n_samples,
            "tensors": len(ctx.stats),
            "methods": dict(sorted(methods.items())),
        }
        if chosen is not None:
            ctx.report["calibration"]["auto"] = chosen
        if n_dynamic:
            ctx.report["calibration"]["dynamic"] = n_dynamic
        stats["tensors"] = len(ctx.stats)
        stats["samples"] = n_samples
        if source.synthetic and rest:
            stats["synthetic"] = 1
        return PassResult(modified=False, stats=stats)


def _choose_method(ctx: CompileContext, names: list[str], fit: dict[str, TensorStats],
                   held: CalibrationSource, kept: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """``calibration: auto``: quantize a copy of the graph with each method of :data:`AUTO_CALIBRATIONS` for the
    tensors ``names`` (ranges from the statistics ``fit``; ``insert-qdq`` as the compile runs it), run it on the
    held-out samples ``held`` and return the method with the highest mean output SQNR against the float graph
    (ties: the earlier method). ``kept``: the float graph's outputs on the held-out samples as the calibration's
    own runs gave them (sample index -> {output: array}); taken as the float reference for samples 1 .. h - 1
    only when they hold every sample and this function's own float session gives sample 0's outputs bit for bit
    as kept (else every sample runs here, as without)."""
    feeds = list(held)
    sigs = input_signatures(ctx.graph)
    outputs = [t.name for t in ctx.graph.outputs]
    optimize: Any = True if ctx.target.validation_optimization == "all" else "basic"

    def run(graph: Any, check: dict[int, dict[str, Any]] | None = None) -> list[list[np.ndarray]]:
        """``graph``'s outputs on every held-out sample; with ``check``, those after the first from ``check``
        when the first sample's outputs are ``check``'s bit for bit."""
        sess = ir.graph_session(graph, optimize=optimize)
        want = {i.name: i.type for i in sess.get_inputs()}
        got: list[list[np.ndarray]] = []
        for i, f in enumerate(feeds):
            got.append(sess.run(outputs, session_feed(f, sigs, want)))
            if i == 0 and check is not None and all(first_digest(np.asarray(v)) == first_digest(
                    np.asarray(check[0][o])) for o, v in zip(outputs, got[0], strict=True)):
                log.debug("calibration auto: the float reference of %d held-out sample(s) from calibration's runs",
                          len(feeds) - 1)
                return got + [[check[j][o] for o in outputs] for j in range(1, len(feeds))]
        return got

    ref = run(ctx.graph, kept if _holds(kept, len(feeds), outputs) else None)
    floats = [j for j, v in enumerate(ref[0]) if np.asarray(v).dtype.kind == "f"]
    scores: dict[str, float] = {}
    for method in AUTO_CALIBRATIONS:
        specs = dict(ctx.activation_specs)
        for name in names:
            specs[name] = dataclasses.replace(specs[name], calibration=method)
        trial = dataclasses.replace(ctx, graph=ctx.graph.copy(), activation_specs=specs, stats=fit, report={},
                                    side_outputs={}, properties=set(ctx.properties))
        InsertQDQPass().run(trial)
        got = run(trial.graph)
        per_output = []
        for j in floats:
            # over the finite values (a masked log-softmax's -inf in both: left out; in one only: infinite error)
            pairs = [energies(np.asarray(r[j], np.float64), np.asarray(g[j], np.float64)) for r, g in zip(ref, got)]
            sig, err = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
            if sig > 0.0:
                per_output.append(min(10.0 * np.log10(sig / err), 200.0) if err > 0.0 else 200.0)
        scores[method] = round(float(np.mean(per_output)), 3) if per_output else 0.0
        del trial, got
    best = max(AUTO_CALIBRATIONS, key=lambda m: (scores[m], -AUTO_CALIBRATIONS.index(m)))
    log.info("calibration auto: %s (mean output SQNR on %d sample(s): %s)", best, len(feeds),
             ", ".join(f"{m} {v:.2f} dB" for m, v in scores.items()))
    return {"method": best, "output_sqnr_db": scores, "samples": len(feeds), "tensors": len(names)}


def _holds(kept: dict[int, dict[str, Any]] | None, n: int, outputs: list[str]) -> bool:
    """``kept`` has every output of samples ``0 .. n - 1`` (and there are samples after the first)."""
    return kept is not None and n > 1 and all(i in kept and all(o in kept[i] for o in outputs) for i in range(n))


def _no_data_message(ctx: CompileContext, rest: dict[str, Any]) -> str:
    """The one-line refusal of static activation quantization without calibration data."""
    first = next(iter(rest))
    reader = next((n for n in ctx.graph.nodes if any(t.name == first for t in n.inputs)), None)
    where = f"'{first}'" + (f" (input of {reader.op} '{reader.name}')" if reader is not None else "")
    return (f"calibration: plan {ctx.plan.source} quantizes {len(rest)} activation tensor(s) statically (first: {where}) and no "
            "calibration data was given: pass --calib DATA (a folder of .npz or one .npz), or --calib random to "
            "accept synthetic ranges, or use a weight-only / dynamic plan (e.g. --preset w4a16 or w8a8-dynamic), "
            "which needs no data")
