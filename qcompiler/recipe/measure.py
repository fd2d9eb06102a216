"""Measuring one candidate plan: compile it (calibrated on the N - h "fit" calibration samples), then run the
compiled model in onnxruntime on the h held-back samples (``min(16, N / 4)`` of them, spread over the data:
every k-th, :func:`held_back`) for its score
(:func:`score`, against the float model's outputs computed once per bench: :attr:`Bench.reference`), its
latency against the float model's, its bytes and, when given, the task metric.

What a candidate costs, besides its passes: no cost report (the bytes are the files'), no validation inside
the compile, one load of the file written (no second checker / trial session), one session for the score and
one for the latency; calibration statistics shared with an earlier candidate come from the process's
statistics cache (:mod:`qcompiler.calib.statcache`). ``compile --profile`` shows the candidates' steps under
``measured recipe``."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qcompiler import ir
from qcompiler.calib import held_back_indices
from qcompiler.compile import CompileOptions, compile_plan
from qcompiler.core import profile
from qcompiler.core.errors import UserError
from qcompiler.plan import Plan
from qcompiler.report import validate as qv
from qcompiler.report.latency import LATENCY_REPEATS, run_timed  # the one timing, shared with the planner
from qcompiler.report.validate.resample import RESAMPLES, draws

log = logging.getLogger("qcompiler.recipe")


Metric = Callable[[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]], float]


#: probabilities are clipped to [PROB_EPS, 1 - PROB_EPS] before their logit is taken (float32 saturates there)
PROB_EPS = 1e-7
#: a candidate's outputs on the held-back samples are kept (:attr:`Bench.keep_outputs`) up to this many bytes
KEEP_OUTPUT_BYTES = 64 << 20


def score(report: Any, logit_db: dict[str, float] | None = None) -> float:
    """The accuracy score of a candidate (higher is better): the worst slice's SQNR when the validation report
    has :meth:`worst_slice_sqnr`, else the worst graph output's SQNR (dB); a binary probability output
    (:func:`probability_outputs`) counts by its SQNR in logit space (``logit_db``: output -> dB) instead. One
    function, so the merger can switch."""
    if logit_db:
        values = [logit_db[m.name] if m.name in logit_db else m.worst_sqnr() for m in report.outputs]
        value = math.nan if any(math.isnan(v) for v in values) else min(values, default=math.inf)
    else:
        worst_slice = getattr(report, "worst_slice_sqnr", None)
        value = worst_slice() if callable(worst_slice) else report.worst_output_sqnr()
    return -math.inf if value is None or math.isnan(value) else float(value)


def probability_outputs(outputs: Sequence[dict[str, np.ndarray]]) -> list[str]:
    """The graph outputs that are binary probabilities on every sample: floating point, every value in [0, 1],
    1-D or at most 2 values along axis 1 (a Sigmoid, a two-way Softmax; not a 0-d value such as a loss). Their SQNR in probability space is
    decided by the few inputs near 0.5: a confident input (p = 0.996) hides an error the next uncertain input
    shows, so the score takes them in logit space (:func:`logit_sqnr`), where every input's error counts."""
    if not outputs:
        return []
    out = []
    for name in outputs[0]:
        arrays = [np.asarray(o[name]) for o in outputs]
        if all(a.dtype.kind == "f" and a.size and a.ndim >= 1 and (a.ndim == 1 or a.shape[1] <= 2)
               and float(a.min()) >= 0.0
               and float(a.max()) <= 1.0 for a in arrays):
            out.append(name)
    return out


def logit_sqnr(reference: Sequence[dict[str, np.ndarray]], quantized: Sequence[dict[str, np.ndarray]],
               name: str) -> float:
    """Whole-output SQNR (dB) of output ``name`` in logit space (``log p - log(1 - p)``, ``p`` clipped to
    [:data:`PROB_EPS`, 1 - :data:`PROB_EPS`]) over the samples; ``inf`` when identical."""
    sig = err = 0.0
    for f, q in zip(reference, quantized, strict=True):
        lf, lq = (_logit(np.asarray(x[name], np.float64)) for x in (f, q))
        sig += float(np.sum(lf * lf))
        err += float(np.sum((lf - lq) ** 2))
    if err == 0.0:
        return math.inf
    return 10.0 * math.log10(sig / err) if sig > 0 else -math.inf


def _logit(p: np.ndarray) -> np.ndarray:
    c = np.clip(p, PROB_EPS, 1.0 - PROB_EPS)
    return np.log(c) - np.log1p(-c)


def call_metric(fn: Metric, quantized: list[dict[str, np.ndarray]], reference: list[dict[str, np.ndarray]],
                feeds: list[dict[str, np.ndarray]]) -> float:
    """The user's task metric on one candidate's outputs, as a float; a metric that raises or returns no number is
    the user's mistake, named in one line (``UserError``), not a crash of the compiler."""
    name = getattr(fn, "__name__", repr(fn))
    try:
        value = float(fn(quantized, reference, feeds))
    except Exception as e:  # the user's code: any exception is reported, in one line
        raise UserError(f"--metric: {name} raised {type(e).__name__}: {e}") from None
    if math.isnan(value):
        raise UserError(f"--metric: {name} returned NaN")
    return value


def load_metric(spec: str | Metric | None) -> Metric | None:
    """``--metric module:function`` (or ``path/to/file.py:function``) -> the callable; a callable passes through."""
    if spec is None or callable(spec):
        return spec
    text = str(spec)
    mod_name, sep, func_name = text.rpartition(":")
    if not sep or not mod_name or not func_name:
        raise UserError(f"--metric: '{text}' is not module:function")
    try:
        if mod_name.endswith(".py") or Path(mod_name).is_file():
            where = importlib.util.spec_from_file_location(f"qcompiler_metric_{Path(mod_name).stem}", mod_name)
            if where is None or where.loader is None:
                raise UserError(f"--metric: cannot load '{mod_name}'")
            module = importlib.util.module_from_spec(where)
            where.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except (ImportError, OSError, SyntaxError) as e:
        raise UserError(f"--metric: cannot import '{mod_name}': {e}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise UserError(f"--metric: '{mod_name}' has no function '{func_name}'")
    return fn  # type: ignore[no-any-return]


@dataclass
class Measured:
    """One candidate's measurements on the held-back samples (``error``: why it could not be measured)."""

    name: str
    change: str
    plan: Plan
    sqnr_db: float = -math.inf
    latency_ratio: float = math.inf
    bytes: int = 0
    metric: float | None = None
    seconds: float = 0.0
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    structural: bool = False  # see Candidate.structural
    #: activation tensors its compile calibrated statically (the calibrate pass's ``tensors``; None: unknown)
    calibrated: int | None = None
    #: its outputs on the held-back samples, in their order (kept where :attr:`Bench.keep_outputs`: the guard; not
    #: above :data:`KEEP_OUTPUT_BYTES`)
    outputs: list[dict[str, np.ndarray]] | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "change": self.change, "sqnr_db": _num(self.sqnr_db),
                "latency_ratio": _num(self.latency_ratio), "bytes": self.bytes, "metric": self.metric,
                "seconds": round(self.seconds, 3), **({"error": self.error} if self.error else {}),
                **({"notes": self.notes} if self.notes else {})}


def _num(x: float) -> float | str:
    return round(x, 3) if math.isfinite(x) else str(x)


@dataclass
class Bench:
    """What every candidate is measured against: the float model on the held-back samples."""

    model: Path
    options: CompileOptions
    calib: str
    #: the samples the candidates calibrate on (indices into the first ``options.calib_samples`` of the data)
    fit: tuple[int, ...]
    held: list[dict[str, np.ndarray]]
    float_outputs: list[dict[str, np.ndarray]]
    float_seconds: float
    workdir: Path
    metric: Metric | None = None
    float_metric: float | None = None
    latency: bool = True
    #: ``--stream``: candidates are scored on their own streamed runs over the whole data (:class:`qv.StreamSpec`)
    stream: qv.StreamSpec | None = None
    #: keep each candidate's outputs on the held-back samples (:attr:`Measured.outputs`, for :meth:`win_rate`)
    keep_outputs: bool = False
    #: the float model's outputs on the held-back samples as validation computes them (made once, on first use)
    _reference: qv.Reference | None = field(default=None, init=False, repr=False)
    _probabilities: list[str] | None = field(default=None, init=False, repr=False)

    @property
    def probabilities(self) -> list[str]:
        """The graph outputs scored in logit space (:func:`probability_outputs` of the float model's outputs on the
        held-back samples)."""
        if self._probabilities is None:
            self._probabilities = probability_outputs(self.reference.outputs)
        return self._probabilities

    @property
    def held_indices(self) -> tuple[int, ...]:
        """The places of the held-back samples among the first ``len(fit) + len(held)`` calibration samples."""
        fit = set(self.fit)
        return tuple(i for i in range(len(self.fit) + len(self.held)) if i not in fit)

    def scored_reference(self) -> qv.Reference | None:
        """:attr:`reference` when a candidate was scored against it (``None``: never computed)."""
        return self._reference

    @property
    def reference(self) -> qv.Reference:
        """The float model run once on the held-back samples, as :func:`qcompiler.report.validate.validate` runs
        it: every candidate is scored against these outputs (the float model is not run again per candidate)."""
        if self._reference is None:
            with profile.step("float reference"):
                self._reference = qv.float_reference(self.model, self.held, stream=self.stream)
        return self._reference

    def run(self, plan: Plan, name: str, *, samples: int | None = None, collect_for_auto: bool = False,
            exact_weights: bool = False) -> tuple[Path, dict[str, Any]]:
        """Compile ``plan`` into the work folder, calibrated on the fit samples, or on the first ``samples``
        samples of the data when given (the confirmation: all of them); ``collect_for_auto``: its calibration also
        keeps what a later ``calibration: auto`` candidate reads (:attr:`CompileOptions.collect_for_auto`). Its
        calibration's float outputs are kept for the final compile's validation (``share_float_outputs``);
        ``exact_weights``: activations quantized as planned, weights float (``CompileOptions.exact_weights``)."""
        out = self.workdir / f"{_file_name(name)}.onnx"
        opts = dataclasses.replace(
            self.options, plan=plan, preset=None, calib=self.calib,
            calib_samples=samples or self.options.calib_samples, calib_indices=None if samples else self.fit,
            validate=False, validate_data=None, min_sqnr_db=None, report=None, budget=None, calib_select=None,
            dump_after=set(), compact_names=False, recipe_out=None, verify_each=False, cost_report=False,
            collect_for_auto=collect_for_auto, share_float_outputs=True, exact_weights=exact_weights)
        outer = profile.current()
        with _quiet():
            result = compile_plan(self.model, out, opts)
        if outer is not None and result.profile is not None:  # the candidate's steps, under the recipe's step
            _graft(outer, "candidate compiles", result.profile)
        return out, result.report

    def measure(self, plan: Plan, name: str, change: str, *, samples: int | None = None,
                collect_for_auto: bool = False, exact_weights: bool = False) -> Measured:
        m = Measured(name, change, plan)
        t0 = time.perf_counter()
        try:
            out, report = self.run(plan, name, samples=samples, collect_for_auto=collect_for_auto,
                                   exact_weights=exact_weights)
            m.bytes = int(report.get("cost", {}).get("total_bytes") or written_bytes(out)
                          or report["sizes"]["quantized_parameter_bytes"])
            m.calibrated = next((int(r["stats"].get("tensors", 0)) for r in report.get("passes", [])
                                 if r.get("pass") == "calibrate"), None)
            # checked by the compile (the ONNX checker on the file written): loaded once, without the load-time
            # checks, for the score's session and the latency's
            qmodel = ir.load_model(out, check=False)
            with profile.step("candidate scores"):
                qouts: list[dict[str, np.ndarray]] = []
                rep = self.validate(qmodel, out, keep=qouts)
                logit_db = None
                if self.probabilities:  # binary probability outputs: their error in logit space
                    logit_db = {n: logit_sqnr(self.reference.outputs, qouts, n) for n in self.probabilities}
                m.sqnr_db = score(rep, logit_db)
                if self.keep_outputs and sum(np.asarray(v).nbytes for d in qouts for v in d.values()) <= \
                        KEEP_OUTPUT_BYTES:
                    m.outputs = qouts
            # a confirmation (calibrated on other samples than the candidates) is compared by accuracy only
            timed = self.latency and samples is None
            if timed or self.metric is not None:
                with profile.step("candidate latency" if timed else "candidate outputs"):
                    outputs, secs = run_timed(qmodel, self.held, repeats=LATENCY_REPEATS if timed else 0)
                if timed:
                    m.latency_ratio = secs / self.float_seconds if self.float_seconds > 0 else math.inf
                if self.metric is not None:  # streamed: the outputs of the scored stream
                    m.metric = call_metric(self.metric, qouts if self.stream else outputs, self.float_outputs,
                                           self.held)
        except UserError as e:
            m.error = str(e)
            log.info("recipe: candidate %s not measured: %s", name, e)
        m.seconds = time.perf_counter() - t0
        return m

    def score_on(self, m: Measured, idx: Sequence[int] | np.ndarray) -> float:
        """:func:`score` of ``m`` on the held-back samples ``idx`` (repeats allowed: a resample), from its kept
        outputs (:attr:`Measured.outputs`) against :attr:`reference`; nothing is run."""
        assert m.outputs is not None, f"{m.name}: outputs not kept (Bench.keep_outputs)"
        ref = self.reference
        sub = dataclasses.replace(ref, feeds=[], outputs=[ref.outputs[i] for i in idx])
        qouts = [m.outputs[i] for i in idx]
        logit_db = {n: logit_sqnr(sub.outputs, qouts, n) for n in self.probabilities} or None
        return score(qv.compare_outputs(sub, qouts), logit_db)

    def win_rate(self, a: Measured, b: Measured, resamples: int = RESAMPLES) -> float:
        """The share of paired bootstrap resamples of the held-back samples (``resamples`` draws of h samples
        with replacement, seeded: :func:`~qcompiler.report.validate.resample.draws`) on which ``a`` scores
        strictly above ``b``: how much of a lead on h samples is the samples' doing. Both must have their outputs
        kept. (The planner's rule scores from per-sample energies instead, :mod:`~qcompiler.report.validate.resample`;
        this one keeps the outputs because a binary probability output counts in logit space.)"""
        wins = 0
        with profile.step("resampled scores"):
            for idx in draws(len(self.reference.outputs), resamples):
                wins += self.score_on(a, idx) > self.score_on(b, idx)
        return wins / resamples

    def validate(self, qmodel: Any, out: Path,
                 keep: list[dict[str, np.ndarray]] | None = None) -> qv.ValidationReport:
        """``qv.validate(self.model, out, self.held, per_layer=False)``, number for number, against
        :attr:`reference` (the float model not run again). A model onnxruntime refuses is reported as the
        load-time check reports it (``UserError``)."""
        try:
            return qv.validate_against(self.reference, qmodel, label=str(out), keep=keep)
        except UserError:
            raise
        except Exception:
            ir.load_model(out)  # the load-time checks name what onnxruntime refuses (UserError)
            raise

    def sensitive_nodes(self, plan: Plan, name: str, n: int) -> list[str]:
        """The ``n`` quantized layers of ``plan``'s compile whose outputs are furthest from the float model's."""
        out, _ = self.run(plan, name)
        rep = qv.validate(self.model, out, self.held[:4], per_layer=True)
        nodes: list[str] = []
        for layer in rep.layers:
            info = rep.layer_info.get(layer.name)
            if info is None or not info.node or info.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                continue
            if not math.isfinite(layer.sqnr_db) or info.node in nodes:
                continue
            nodes.append(info.node)
            if len(nodes) == n:
                break
        return nodes


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The candidates' own compiles log errors only (their warnings — a rule matching no node — are the final
    compile's to give, once)."""
    names = [n for n in logging.Logger.manager.loggerDict if n.startswith("qcompiler") and n != "qcompiler.recipe"]
    loggers = [logging.getLogger(n) for n in ["qcompiler", *names]]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _graft(outer: profile.Profile, name: str, inner: profile.Profile) -> None:
    """Add ``inner``'s steps (a candidate's own compile profile) under step ``name`` of ``outer``'s open step,
    summed by name, so that ``compile --profile`` shows where the candidates' seconds went."""
    def merge(into: profile.Step, steps: list[profile.Step]) -> None:
        for st in steps:
            c = into.child(st.name)
            c.seconds += st.seconds
            c.calls += max(1, st.calls)
            merge(c, st.children)

    merge(outer.add(name, inner.finish()), inner.root.children)


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def written_bytes(out: Path) -> int:
    """The bytes of a compiled model as the cost report counts them (``total_bytes``): the file and its external
    data file, when there is one."""
    return sum(f.stat().st_size for f in (out, out.with_name(out.name + ".data")) if f.exists())


def held_back(calib: str, model: Path, limit: int | None) -> tuple[tuple[int, ...], list[dict[str, np.ndarray]]]:
    """:func:`held_back_from`'s (fit, held) of ``calib``."""
    fit, held, _ = held_back_from(calib, model, limit)
    return fit, held


def held_back_from(calib: str, model: Path, limit: int | None) -> tuple[tuple[int, ...], list[dict[str, np.ndarray]],
                                                                        Any]:
    """(the samples to calibrate candidates on, the held-back feeds, the first N samples as one source) of the
    first ``limit`` (all: None) of the N
    calibration samples: ``h = min(16, N / 4)`` samples held back, spread over the data — every k-th with
    ``k = N // h``, the last of each run of k (indices k-1, 2k-1, ...) — and the other N - h to calibrate on.
    Spread, not the last h: data stored in order (a folder sorted by class, a recording in time order) would
    otherwise hold back one kind of input only, and the score would say nothing about the others."""
    source = qv.load_feeds(calib, model)
    n = len(source) if limit is None else min(len(source), limit)
    held_idx = held_indices(n)
    if not held_idx:
        raise UserError(f"{calib}: {n} calibration sample(s); measuring recipes needs at least 4 (a quarter "
                        "is held back to measure on)")
    held = set(held_idx)
    return tuple(i for i in range(n) if i not in held), list(source.subset(held_idx)), source.subset(range(n))


def held_indices(n: int) -> list[int]:
    """The indices of the samples :func:`held_back` holds back of ``n``: every ``n // h``-th (``h = min(16,
    n / 4)``), the last of each run; none below 4 samples."""
    return held_back_indices(n)
