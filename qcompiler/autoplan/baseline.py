"""The uniform plan the planner starts from and must beat, measured (:func:`auto_plan`).

The mixed-precision search (:func:`~qcompiler.autoplan.search.search_plan`) predicts from round-to-nearest
sensitivities; a preset that turns on GPTQ, bias correction or MSE ranges compiles better than any such
prediction. So, when calibration data is given:

1. **Held-back samples** (:func:`make_holdout`): the last ``holdout`` (16) calibration samples, at most a quarter
   of them (or ``validate_data``). Every plan below is compiled for real with the other samples and measured in
   onnxruntime on those (worst output SQNR, :func:`qcompiler.report.validate.validate`).
2. **The starting preset** (without ``base_plan``): every shipped preset (``qcompiler plan show``) is compiled on
   one sample to count its cost in the budget's unit (cheap: sizes do not depend on the calibration values);
   those that fit are compiled for real and measured; the best by output SQNR is the base plan of the search,
   which thus builds on its calibration method, ranges, GPTQ and bias correction. No preset fits: the default
   plan, as before.
3. **The guard**: the search's plan is compiled and measured the same way; when the base plan alone fits the
   budget and measures at least as well, the base plan itself is returned (``AutoPlanResult.uniform``). With
   ``base_plan`` given, that plan is the base and the guard (no preset search).

The SQNR written in the plan's header and printed is this measured one; the additive model's prediction is
shown beside it, labelled as predicted. Without calibration data (or ``holdout=0``) nothing is measured: the
search runs on the base plan (default: W8A8) as before.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcompiler import __version__
from qcompiler.autoplan.budget import DEFAULT_CANDIDATES, Budget, fmt_unit, parse_candidates
from qcompiler.autoplan.plans import plan_yaml
from qcompiler.autoplan.prepare import first_feeds
from qcompiler.autoplan.probes import ProbeWorkdir, compiled_cost
from qcompiler.autoplan.result import AutoPlanResult, PlanOptions, Progress
from qcompiler.autoplan.search import _absolute_budget, search_plan
from qcompiler.autoplan.sensitivity import SensitivityResult
from qcompiler.compile import CompileOptions, compile_plan
from qcompiler.core.errors import UserError
from qcompiler.plan import Plan, load_plan, presets
from qcompiler.report import cost
from qcompiler.report import validate as qv

log = logging.getLogger("qcompiler.autoplan")

#: default number of calibration samples held back to measure plans on (at most a quarter of them)
HOLDOUT = 16


@dataclass
class Holdout:
    """Where plans are measured: compiled with ``calib`` (its first ``fit`` samples; ``None``: all), run on
    ``feeds``, described by ``data``."""

    calib: str
    fit: int | None
    feeds: list[dict[str, np.ndarray]]
    data: str

    def to_json(self) -> dict[str, Any]:
        return {"samples": len(self.feeds), "calib_samples": self.fit, "data": self.data}


@dataclass
class Measured:
    """A plan compiled for real and run on the held-back samples."""

    sqnr_db: float
    cost: cost.CostReport

    def amount(self, unit: str) -> float:
        return _amount(self.cost, unit)


def _amount(rep: cost.CostReport, unit: str) -> float:
    if unit == "bytes":
        return float(rep.total_bytes)
    if unit == "bitops":
        return float(rep.bitops)
    bits = rep.average_weight_bits()
    return float(cost.FLOAT_BITS if bits is None else bits)


def _db(x: float) -> float:
    return -math.inf if math.isnan(x) else x


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Warnings of one-sample size probes (a preset's rule for ops the model lacks, calibration methods that
    want more samples) say nothing about the plan the user gets: kept out of the user's log."""
    root = logging.getLogger("qcompiler")
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def make_holdout(model_path: str | Path, calib: str | Path | None, opts: PlanOptions) -> Holdout | None:
    """The samples plans are measured on (see the module docstring); ``None`` when nothing can be measured."""
    if opts.holdout <= 0 or calib is None or str(calib) in ("none", "random"):
        return None
    src = qv.load_feeds(calib, model_path)
    n = len(src)
    if opts.validate_data is not None:
        val = qv.load_feeds(opts.validate_data, model_path)
        return Holdout(str(calib), None, [dict(f) for f in val], f"the {len(val)} samples of {opts.validate_data}")
    h = min(opts.holdout, n // 4)
    if h == 0:
        return Holdout(str(calib), None, [dict(f) for f in src],
                       f"the {n} calibration sample(s) (too few to hold any back)")
    return Holdout(str(calib), n - h, [dict(f) for f in src.subset(range(n - h, n))],
                   f"the last {h} of the {n} calibration samples, held back (compiled with the first {n - h})")


def measure(model_path: Path, plan: Plan, target: str, hold: Holdout, tmp: Path, tag: str,
            shapes: dict[str, list[int]], want_bitops: bool) -> Measured:
    """Compile ``plan`` for real (calibration: ``hold``'s first samples) and measure its worst output SQNR in
    onnxruntime on the held-back samples (:func:`qcompiler.report.validate.validate`, graph outputs only)."""
    out = tmp / f"{tag}.onnx"
    res = compile_plan(model_path, out, CompileOptions(plan=plan, target=target, calib=hold.calib,
                                                       calib_samples=hold.fit, validate=False))
    try:
        rep = compiled_cost(res, out, shapes, want_bitops)
        report = qv.validate(model_path, out, hold.feeds, per_layer=False)
        return Measured(float(report.worst_output_sqnr()), rep)
    finally:
        for f in res.files:
            f.unlink(missing_ok=True)


def best_preset(model_path: Path, opts: PlanOptions, hold: Holdout, work: ProbeWorkdir, tmp: Path,
                budget_value: float, unit: str, shapes: dict[str, list[int]],
                progress: Progress | None = None) -> tuple[list[dict[str, Any]], tuple[str, Plan, Measured] | None]:
    """Every shipped preset's cost (a one-sample probe compile) and, for those that fit, its measured SQNR; and
    the best of those (highest SQNR, then fewest bytes), or ``None`` when none fits."""
    rows: list[dict[str, Any]] = []
    best: tuple[str, Plan, Measured] | None = None
    names = presets.names()
    for k, name in enumerate(names):
        if progress:
            progress("presets (probe and measure)", k, len(names))
        plan = load_plan(name)
        try:
            with _quiet():
                rep, _ = work.compile(model_path, plan, opts.target, shapes=shapes, want_shapes=unit == "bitops")
        except UserError as e:  # the target runs no such plan (fp8 on tensorrt, ...)
            log.info("plan: preset %s left out: %s", name, e)
            rows.append({"name": name, "error": str(e)})
            continue
        row: dict[str, Any] = {"name": name, "bytes": rep.total_bytes, "fits": _amount(rep, unit) <= budget_value}
        if row["fits"]:
            with _quiet():
                m = measure(model_path, plan, opts.target, hold, tmp, f"preset-{name}", shapes, unit == "bitops")
            row["sqnr_db"] = m.sqnr_db
            key = (_db(m.sqnr_db), -m.cost.total_bytes)
            if best is None or key > (_db(best[2].sqnr_db), -best[2].cost.total_bytes):
                best = (name, plan, m)
        rows.append(row)
    if progress:
        progress("presets (probe and measure)", len(names), len(names))
    return rows, best


def auto_plan(model_path: str | Path, calib: str | Path | None, options: PlanOptions, *,
              progress: Progress | None = None, sensitivity: SensitivityResult | None = None) -> AutoPlanResult:
    """Plan ``model_path`` under ``options.budget``: the search (:func:`~qcompiler.autoplan.search.search_plan`)
    on the best uniform preset that fits (or ``options.base_plan``), never worse than that plan alone, measured
    (see the module docstring). ``sensitivity``: reuse the sensitivities of an earlier run on the same model
    and base plan (a superset of the candidates) instead of measuring."""
    src = Path(model_path)
    opts = options
    hold = make_holdout(src, calib, opts)
    if hold is None:
        return search_plan(src, calib, opts, progress=progress, sensitivity=sensitivity)
    t0 = time.perf_counter()
    unit = opts.budget.unit
    first = first_feeds(qv.load_feeds(hold.calib, src), 1)[0]
    shapes = {k: list(v.shape) for k, v in first.items()}
    src_rep = cost.model_cost(src, feed_shapes=shapes, shapes=unit == "bitops")
    budget_value = _absolute_budget(opts.budget, {"bytes": float(src_rep.total_bytes),
                                                  "bitops": float(src_rep.bitops)})
    tmp = Path(tempfile.mkdtemp(prefix="qcompiler-autoplan-measure-"))
    work = ProbeWorkdir(first)
    try:
        rows: list[dict[str, Any]] = []
        base: Plan
        if opts.base_plan is None and opts.presets:
            rows, best = best_preset(src, opts, hold, work, tmp, budget_value, unit, shapes, progress)
            if best is not None:
                name, base, base_m = best
                log.info("plan: starting from preset %s (%.2f dB measured, %s)", name, base_m.sqnr_db,
                         fmt_unit(base_m.amount(unit), unit))
            else:
                log.info("plan: no shipped preset fits %s; searching on the default plan", opts.budget.describe())
        else:
            best = None
        if best is None:
            name = "base plan" if opts.base_plan is not None else "default plan"
            base = opts.base_plan if isinstance(opts.base_plan, Plan) else load_plan(opts.base_plan)
            with _quiet():
                rep, _ = work.compile(src, base, opts.target, shapes=shapes, want_shapes=unit == "bitops")
            base_m = (measure(src, base, opts.target, hold, tmp, "base", shapes, unit == "bitops")
                      if _amount(rep, unit) <= budget_value else Measured(math.nan, rep))
        base_fits = base_m.amount(unit) <= budget_value
        t_base = time.perf_counter() - t0
        sopts = PlanOptions(**{**opts.__dict__, "base_plan": base})
        result = search_plan(src, calib, sopts, progress=progress, sensitivity=sensitivity, calib_samples=hold.fit)
        t = time.perf_counter()
        mixed = measure(src, result.plan, opts.target, hold, tmp, "mixed", shapes, unit == "bitops")
        result.timings["baseline"] = t_base
        result.timings["measure"] = time.perf_counter() - t
        result.timings["total"] = time.perf_counter() - t0
    finally:
        work.close()
        shutil.rmtree(tmp, ignore_errors=True)
    result.baseline = {"name": name, "bytes": base_m.cost.total_bytes, "fits": base_fits,
                       "sqnr_db": base_m.sqnr_db if base_fits else None, "presets": rows}
    mixed_info = {"sqnr_db": mixed.sqnr_db, **hold.to_json()}
    if base_fits and _db(base_m.sqnr_db) >= _db(mixed.sqnr_db):
        log.info("plan: the uniform %s (%.2f dB measured) is not beaten by the best mixed plan (%.2f dB); "
                 "returning it", name, base_m.sqnr_db, mixed.sqnr_db)
        result.search_text = result.text
        result.uniform = True
        result.measured = {"sqnr_db": base_m.sqnr_db, "bytes": base_m.cost.total_bytes, **hold.to_json(),
                           "mixed": mixed_info}
        result.text = _uniform_text(src, opts, budget_value, unit, name, base, base_m, mixed, result, hold)
    else:
        result.measured = {**mixed_info, "bytes": mixed.cost.total_bytes}
        result.text = _with_measured(result.text, mixed, name, base_m if base_fits else None, hold)
    result.plan = Plan.from_text(result.text, source="<auto plan>")
    return result


def _measured_line(sqnr: float, hold: Holdout) -> str:
    return f"measured: output SQNR {sqnr:.2f} dB (compiled, onnxruntime on {hold.data})"


def _with_measured(text: str, mixed: Measured, name: str, base: Measured | None, hold: Holdout) -> str:
    """The search's plan text with the measured SQNR (and the uniform base's) after the predicted line."""
    extra = _measured_line(mixed.sqnr_db, hold) + (
        f"; uniform {name} alone: {base.sqnr_db:.2f} dB, {base.cost.total_bytes} bytes" if base is not None else "")
    lines = text.splitlines()
    at = next((i + 1 for i, line in enumerate(lines) if line.startswith("# predicted")), 0)
    return "\n".join([*lines[:at], f"# {extra}", *lines[at:]]) + "\n"


def _uniform_text(src: Path, opts: PlanOptions, budget_value: float, unit: str, name: str, base: Plan,
                  base_m: Measured, mixed: Measured, result: AutoPlanResult, hold: Holdout) -> str:
    counts = ", ".join(f"{k} x{n}" for k, n in result.counts().items() if n)
    sq = result.predicted.get("sqnr_db")
    header = [
        f"Plan written by `qcompiler plan` (qcompiler {__version__}): the uniform {name}, which no mixed plan beat.",
        f"model: {src.name}   target: {opts.target}   budget: {opts.budget.text} = {fmt_unit(budget_value, unit)}",
        f"uniform {name}: {base_m.cost.total_bytes} bytes; " + _measured_line(base_m.sqnr_db, hold),
        f"best mixed plan found ({counts}): measured {mixed.sqnr_db:.2f} dB, {mixed.cost.total_bytes} bytes"
        + (f" (predicted by the additive model: {sq:.2f} dB)" if sq is not None and math.isfinite(sq) else ""),
        "",
    ]
    return plan_yaml(base, [], header)


def plan_for_compile(model_path: str | Path, copts: Any, base: Plan, progress: Progress | None = None
                     ) -> AutoPlanResult:
    """``qcompiler compile --budget``: the auto plan for a :class:`~qcompiler.api.CompileOptions` (the shipped
    presets are searched when neither ``plan`` nor ``preset`` was given)."""
    budget = Budget.parse(str(copts.budget), bitops=bool(copts.budget_bitops))
    given = copts.plan is not None or copts.preset is not None
    popts = PlanOptions(budget=budget, candidates=parse_candidates(copts.budget_candidates or DEFAULT_CANDIDATES),
                        default_candidates=not copts.budget_candidates,
                        metric=copts.budget_metric or "pd", target=copts.target,
                        base_plan=base if given else None, seed=copts.seed, validate_data=copts.validate_data)
    calib = None if copts.calib is None or str(copts.calib) in ("none", "random") else copts.calib
    return auto_plan(model_path, calib, popts, progress=progress)
