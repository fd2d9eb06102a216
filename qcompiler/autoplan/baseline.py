"""The uniform plan the planner starts from and must beat, measured (:func:`auto_plan`).

The mixed-precision search (:func:`~qcompiler.autoplan.search.search_plan`) predicts from round-to-nearest
sensitivities; a preset that turns on GPTQ, bias correction or MSE ranges compiles better than any such
prediction. So, when calibration data is given:

1. **Held-back samples** (:func:`make_holdout`): ``holdout`` (16) calibration samples spread over them
   (:func:`qcompiler.calib.spread_indices`: every 4th of 64), at most a quarter (or ``validate_data``). Every plan below is compiled for
   real with the other samples and measured in onnxruntime on those: the worst output slice's SQNR (each
   output's worst slice along its channel / feature axis, or the whole tensor when lower:
   ``ValidationReport.worst_slice_sqnr``, what ``qcompiler validate`` and the measured default gate on).
2. **The starting preset** (without ``base_plan``, :func:`best_preset`): every shipped preset
   (``qcompiler plan show``) is compiled on one sample to count its cost in the budget's unit; those within
   :data:`PROBE_MARGIN` of the budget are compiled for real and measured, and the best of them — and the best of
   those that fit, when that is another one — also with each of its algorithms off (:func:`without`: the
   ablations of its guard), and, when two or more of those measured better than as written, with all of them
   off together (what its guard then measures too). The best that fits by its real compile's
   bytes is the base plan of the search, which thus builds on its calibration method, ranges and algorithms.
   No preset fits: the default plan, as before.
3. **The searches** (:func:`_searches`): with the default candidates, the knapsack with the default list, with
   each of :data:`EXTRA_CANDIDATES` (per-tensor int4, per-channel int4, symmetric block-wise int4: cheaper
   granularities that pay for int8 layers), with their union and with the union in the trust regions
   :data:`STAYS`; each distinct plan compiled for real and measured; the best that fits is the mixed plan.
4. **The guard**: when the base plan alone fits the budget and the mixed plan does not measure at least
   :data:`MIX_MARGIN_DB` better on the held-back samples and on each half of them *and* above it on
   :data:`MIX_CONFIDENCE` of their paired bootstrap draws (:meth:`Measured.beats`), the base plan itself is
   returned (``AutoPlanResult.uniform``). With ``base_plan`` given, that plan is the base and the guard (no
   preset search).
5. **Activations** (:func:`_activation_step`, :mod:`qcompiler.autoplan.activations`): the chosen plan with
   16-bit activations on the tensors read only by layers that run float anyway (int4 weights: no integer
   kernel in onnxruntime), compiled and measured; kept when it fits and beats the chosen plan by the same rule
   (when the uniform base was chosen, and has no byte left for the zero points, the best mix widened is tried
   against it too). Recorded in ``AutoPlanResult.baseline["activations"]``.
6. **Float16 scales** (:mod:`qcompiler.autoplan.scales`): the plan step 5 returns with one layer at a finer block
   grid with float16 scales, a few such moves measured; kept by the same rule (``baseline["scales"]``).

With ``max_latency_ratio`` (``plan --max-latency-ratio R``, :mod:`qcompiler.autoplan.latency`) every plan measured
above is also timed against the float model, and one over ``R`` is neither a base nor returned.

The SQNR written in the plan's header and printed is this measured one; the additive model's prediction is
shown beside it, labelled as predicted. Without calibration data (or ``holdout=0``) nothing is measured: the
search runs on the base plan (default: W8A8) as before.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcompiler import __version__
from qcompiler.autoplan.activations import Widening, wide_activations, widened, widened_text
from qcompiler.autoplan.budget import DEFAULT_CANDIDATES, Budget, Candidate, fmt_unit, parse_candidates
from qcompiler.autoplan.holdout import (  # noqa: F401  (HOLDOUT, MIX_MARGIN_DB, Holdout: re-exported)
    HOLDOUT,
    MIX_CONFIDENCE,
    MIX_MARGIN_DB,
    Holdout,
    Measured,
    _amount,
    _db,
    _quiet,
    make_holdout,
    measure,
)
from qcompiler.autoplan.latency import LatencyLimit, check_ratio
from qcompiler.autoplan.plans import plan_yaml
from qcompiler.autoplan.prepare import first_feeds
from qcompiler.autoplan.probes import ProbeMemo, ProbeWorkdir
from qcompiler.autoplan.result import AutoPlanResult, PlanOptions, Progress
from qcompiler.autoplan.scales import scale_step
from qcompiler.autoplan.search import _absolute_budget, search_plan
from qcompiler.autoplan.sensitivity import SensitivityResult
from qcompiler.core.errors import UserError
from qcompiler.plan import Plan, load_plan, presets
from qcompiler.plan.ablations import guarded_algorithms, without
from qcompiler.report import cost
from qcompiler.report import validate as qv

log = logging.getLogger("qcompiler.autoplan")

#: a preset whose one-sample size probe is at most this fraction over the budget is compiled for real anyway: the
#: bytes of a compile depend a little on its algorithms (bias correction adds biases) and on the guard's choices
PROBE_MARGIN = 0.05
#: extra candidate lists searched, besides the default one, when the user gave none (each plan measured for real):
#: a cheaper granularity pays for the int8 layers at the bytes of a uniform int4 preset
EXTRA_CANDIDATES = ("int8,int4,int4/tensor", "int8,int4,int4/channel", "int8,int4,int4/block32/sym,int4/block64/sym")
#: trust regions (``PlanOptions.stay``) searched with every candidate of those lists: plans a few clear steps
#: from the base, measured beside the full knapsack's
STAYS = (0.5, 0.8)
#: try 16-bit activations where the chosen plan's layers run float anyway (:mod:`qcompiler.autoplan.activations`)
WIDEN_ACTIVATIONS = True


def _better(m: Measured, best: Measured | None) -> bool:
    return best is None or (_db(m.sqnr_db), -m.cost.total_bytes) > (_db(best.sqnr_db), -best.cost.total_bytes)


def best_preset(model_path: Path, opts: PlanOptions, hold: Holdout, work: ProbeWorkdir, tmp: Path,
                budget_value: float, unit: str, shapes: dict[str, list[int]],
                progress: Progress | None = None) -> tuple[list[dict[str, Any]], tuple[str, Plan, Measured] | None]:
    """Every shipped preset's cost (a one-sample probe compile) and, for those within :data:`PROBE_MARGIN` of the
    budget, the preset as written compiled for real and measured; then, for the one that measures best and for
    the best of those that fit (when it is another), each variant with one of its algorithms off (what its guard chooses among; one that adds bytes may be what
    keeps the preset over the budget), and the variant with every algorithm off whose removal measured better
    than as written, when there are two or more (the guard measures that set too). The best that fits by the bytes of its real compile (highest SQNR, then
    fewest bytes) is returned with its name, or ``None`` when none fits."""
    rows: list[dict[str, Any]] = []
    best: tuple[str, Plan, Measured] | None = None
    top: tuple[str, Plan, Measured] | None = None
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
        row: dict[str, Any] = {"name": name, "bytes": rep.total_bytes,
                               "fits": _amount(rep, unit) <= budget_value}
        if _amount(rep, unit) <= budget_value * (1.0 + PROBE_MARGIN):
            written = without(plan, [], name)
            with _quiet():
                m = measure(model_path, written, opts.target, hold, tmp, f"preset-{name}", shapes,
                            unit == "bitops", name)
            row.update(bytes=m.cost.total_bytes, fits=m.amount(unit) <= budget_value, sqnr_db=m.sqnr_db,
                       **_latency_row(m))
            if row["fits"] and m.eligible and _better(m, best[2] if best else None):
                best = (name, written, m)
            if m.eligible and _better(m, top[2] if top else None):
                top = (name, plan, m)
        rows.append(row)
    # the ablations of the best as written, and of the best that fits as written when that is another preset
    # (MiniLM at w4a8's bytes: w4a16-gptq measured best and does not fit; w4a8 without percentile, what its
    # guard compiles, measured 2.5 dB above w4a8 as written and was never tried)
    ablate = [top] if top is not None else []
    if best is not None and (top is None or best[0] != top[0]):
        ablate.append((best[0], load_plan(best[0]), best[2]))
    def ablation(name: str, plan: Plan, off: list[str], step: int, steps: int) -> Measured | None:
        """``plan`` with the algorithms ``off`` turned off, measured and tabled (``best`` updated); ``None``: the
        target runs no such plan."""
        nonlocal best
        if progress:
            progress(f"preset {name}: algorithms off", step, steps)
        algo = "+".join(off)
        label = f"{name} without {algo}"
        var = without(plan, off, label)
        try:
            with _quiet():
                m = measure(model_path, var, opts.target, hold, tmp, f"preset-{name}-no-{algo}", shapes,
                            unit == "bitops", label)
        except UserError as e:
            log.info("plan: %s left out: %s", label, e)
            return None
        fits = m.amount(unit) <= budget_value
        rows.append({"name": label, "bytes": m.cost.total_bytes, "fits": fits, "sqnr_db": m.sqnr_db,
                     **_latency_row(m)})
        if fits and m.eligible and _better(m, best[2] if best else None):
            best = (label, var, m)
        return m

    for name, plan, as_written in ablate:
        algos = guarded_algorithms(plan)
        worse = []  # the algorithms whose removal measured better than the preset as written
        for k, algo in enumerate(algos):
            got = ablation(name, plan, [algo], k, len(algos) + 1)
            if got is not None and got.sqnr_db > as_written.sqnr_db:
                worse.append(algo)
        if len(worse) >= 2:  # all of those off together, as the preset's guard measures them (module doc, 2.)
            ablation(name, plan, worse, len(algos), len(algos) + 1)
    if progress:
        progress("presets (probe and measure)", len(names), len(names))
    return rows, best


def _latency_row(m: Measured) -> dict[str, Any]:
    """A table row's latency fields (none when nothing is timed: the rows of a plain run stay as they were)."""
    if m.latency_ratio is None:
        return {}
    return {"latency_ratio": m.latency_ratio, **({} if m.eligible else {"over_latency": True})}


def _preferred(m: Measured, other: Measured, base: Measured | None) -> bool:
    """Whether mixed plan ``m`` is preferred to ``other``: one that beats the base (:meth:`Measured.beats`) first,
    then the better measured."""
    if base is not None:
        wins, other_wins = m.beats(base), other.beats(base)
        if wins != other_wins:
            return wins
    return _better(m, other)


def _distinct(result: AutoPlanResult) -> str:
    """What makes two searches' plans the same plan: their rules (the header's comments differ)."""
    return json.dumps(result.plan.to_dict().get("rules", []), sort_keys=True, default=str)


def _searches(src: Path, opts: PlanOptions, base: Plan, hold: Holdout, tmp: Path,
              shapes: dict[str, list[int]], unit: str, budget_value: float, progress: Progress | None,
              sensitivity: SensitivityResult | None, base_m: Measured | None = None
              ) -> tuple[AutoPlanResult, Measured, list[dict[str, Any]]]:
    """The search on ``base`` with the user's candidates, or — with the default ones — with the default list and
    with each of :data:`EXTRA_CANDIDATES` (sensitivities measured once, over their union); every distinct plan
    compiled for real and measured on the held-back samples; the best that fits by its real bytes (else the
    first) with its measurement, and one row per search."""
    lists = [opts.candidates]
    if opts.default_candidates:
        lists += [parse_candidates(t) for t in EXTRA_CANDIDATES]
    union: list[Candidate] = []
    for cl in lists:
        union += [c for c in cl if c.name not in {u.name for u in union}]
    sens = sensitivity
    memo = ProbeMemo()  # the searches share their probe compiles (same model, base plan and data)
    if sens is None and len(lists) > 1:
        # one sensitivity pass over every candidate of every list (the searches below reuse its columns)
        first = search_plan(src, hold.calib,
                            PlanOptions(**{**opts.__dict__, "base_plan": base, "candidates": union}),
                            progress=progress, calib_samples=hold.fit, memo=memo)
        sens = first.sensitivity
    rows: list[dict[str, Any]] = []
    seen: dict[str, Measured] = {}
    best: tuple[AutoPlanResult, Measured] | None = None
    fallback: tuple[AutoPlanResult, Measured] | None = None
    runs: list[tuple[list[Candidate], float]] = [(cl, opts.stay) for cl in lists]
    if len(lists) > 1:
        if len(union) > max(len(cl) for cl in lists):
            runs.append((union, 0.0))
        runs += [(union, stay) for stay in STAYS]
    for k, (cl, stay) in enumerate(runs):
        label = ",".join(c.name for c in cl) + (f" (stay {stay:g})" if stay else "")
        sopts = PlanOptions(**{**opts.__dict__, "base_plan": base, "candidates": cl, "stay": stay,
                               **({"select": 0} if stay else {})})
        try:
            r = search_plan(src, hold.calib, sopts, progress=progress, sensitivity=sens, calib_samples=hold.fit,
                            memo=memo)
        except UserError as e:
            if k == 0:
                raise
            log.info("plan: candidates %s: %s", label, e)
            rows.append({"candidates": label, "error": str(e)})
            continue
        key = _distinct(r)
        m = seen.get(key)
        if m is None:
            m = measure(src, r.plan, opts.target, hold, tmp, f"mixed{k}", shapes, unit == "bitops",
                        f"mixed plan ({label})")
            seen[key] = m
        fits = m.amount(unit) <= budget_value
        rows.append({"candidates": label, "counts": {n: c for n, c in r.counts().items() if c},
                     "bytes": m.cost.total_bytes, "fits": fits, "sqnr_db": m.sqnr_db, "halves_db": list(m.halves),
                     "predicted_sqnr_db": r.predicted.get("sqnr_db"), **_latency_row(m),
                     **({"win_rate": m.win_rate(base_m)} if base_m is not None else {})})
        log.info("plan: candidates %s: measured %.2f dB, %d bytes%s", label, m.sqnr_db, m.cost.total_bytes,
                 "" if fits else " (over the budget)")
        if fallback is None:
            fallback = (r, m)
        if fits and m.eligible and (best is None or _preferred(m, best[1], base_m)):
            best = (r, m)
    chosen = best or fallback
    assert chosen is not None
    chosen[0].union_sensitivity = sens
    return chosen[0], chosen[1], rows


def auto_plan(model_path: str | Path, calib: str | Path | None, options: PlanOptions, *,
              progress: Progress | None = None, sensitivity: SensitivityResult | None = None) -> AutoPlanResult:
    """Plan ``model_path`` under ``options.budget``: the search (:func:`~qcompiler.autoplan.search.search_plan`)
    on the best uniform preset that fits (or ``options.base_plan``), never worse than that plan alone, measured
    (see the module docstring). ``sensitivity``: reuse the sensitivities of an earlier run on the same model
    and base plan (a superset of the candidates) instead of measuring."""
    src = Path(model_path)
    opts = options
    check_ratio(opts.max_latency_ratio)
    tmp = Path(tempfile.mkdtemp(prefix="qcompiler-autoplan-measure-"))
    try:
        hold = make_holdout(src, calib, opts, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if hold is None:
        shutil.rmtree(tmp, ignore_errors=True)
        if opts.max_latency_ratio is not None:
            raise UserError("--max-latency-ratio: the plans are timed on held-back calibration samples; give real "
                            "calibration data (--calib DATA) and --holdout above 0")
        return search_plan(src, calib, opts, progress=progress, sensitivity=sensitivity)
    t0 = time.perf_counter()
    unit = opts.budget.unit
    first = first_feeds(qv.load_feeds(hold.calib, src), 1)[0]
    shapes = {k: list(v.shape) for k, v in first.items()}
    src_rep = cost.model_cost(src, feed_shapes=shapes, shapes=unit == "bitops")
    budget_value = _absolute_budget(opts.budget, {"bytes": float(src_rep.total_bytes),
                                                  "bitops": float(src_rep.bitops)})
    work = ProbeWorkdir(first)
    try:
        if opts.max_latency_ratio is not None:
            hold.latency = LatencyLimit.start(src, hold.feeds, opts.max_latency_ratio)
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
            base_m = (measure(src, base, opts.target, hold, tmp, "base", shapes, unit == "bitops", f"the {name}")
                      if _amount(rep, unit) <= budget_value else Measured(math.nan, rep))
        base_fits = base_m.amount(unit) <= budget_value
        base_ok = base_fits and base_m.eligible  # may be returned: fits the budget and the latency limit
        t_base = time.perf_counter() - t0
        t = time.perf_counter()
        result, mixed, searches = _searches(src, opts, base, hold, tmp, shapes, unit, budget_value, progress,
                                            sensitivity, base_m if base_ok else None)
        result.timings["searches"] = time.perf_counter() - t
        mixed_fits = mixed.amount(unit) <= budget_value and mixed.eligible
        if hold.latency is not None and not base_ok and not mixed.eligible:
            raise hold.latency.nothing_eligible()
        uniform = base_ok and (not mixed_fits or not mixed.beats(base_m))
        t = time.perf_counter()
        starts = [(base, base_m)] if uniform else [(result.plan, mixed)]
        if uniform and mixed_fits and (mixed.sqnr_db, mixed.cost.total_bytes) != (base_m.sqnr_db,
                                                                                   base_m.cost.total_bytes):
            starts.append((result.plan, mixed))  # the mix, widened, may beat the base where the mix alone did not
        act = _activation_step(src, starts, opts, hold, tmp, shapes, unit, budget_value, progress)
        if act.kept and act.start == 1:
            uniform = False
        chosen = (widened(starts[act.start][0], act.widening, "wide activations"), act.measured) if act.kept else starts[0]
        scale = scale_step(chosen, result, uniform, opts, budget_value, unit, progress, lambda p, tag, label: measure(
            src, p, opts.target, hold, tmp, tag, shapes, unit == "bitops", label))  # float16 scales (scales.py)
        result.timings["activations"] = time.perf_counter() - t
        result.timings["baseline"] = t_base
        result.timings["total"] = time.perf_counter() - t0
    finally:
        work.close()
        shutil.rmtree(tmp, ignore_errors=True)
    result.baseline = {"name": name, "bytes": base_m.cost.total_bytes, "fits": base_fits,
                       "sqnr_db": base_m.sqnr_db if base_fits else None, "halves_db": list(base_m.halves),
                       "presets": rows, "searches": searches,
                       "text": plan_yaml(base, [], [f"the uniform {name}, as the planner measured it"]),
                       **_latency_row(base_m)}
    if hold.latency is not None:
        result.baseline["latency"] = hold.latency.to_json()
    if best is not None:  # a shipped preset (as written, or with one algorithm off: "w4a8 without gptq")
        preset, _, off = name.partition(" without ")
        result.baseline.update(preset=preset, off=[off] if off else [])
    mixed_info = {"sqnr_db": mixed.sqnr_db, "halves_db": list(mixed.halves), **hold.to_json(), **_latency_row(mixed),
                  **({"win_rate": mixed.win_rate(base_m)} if base_fits else {})}
    if uniform:
        log.info("plan: the uniform %s (%.2f dB measured) is not beaten by the best mixed plan (%.2f dB); "
                 "returning it", name, base_m.sqnr_db, mixed.sqnr_db)
        result.search_text = result.text
        result.uniform = True
        result.measured = {"sqnr_db": base_m.sqnr_db, "bytes": base_m.cost.total_bytes, **hold.to_json(),
                           **_latency_row(base_m), "mixed": mixed_info}
        result.text = _uniform_text(src, opts, budget_value, unit, name, base, base_m, mixed, result, hold)
    else:
        result.measured = {**mixed_info, "bytes": mixed.cost.total_bytes}
        result.text = _with_measured(result.text, mixed, name, base_m if base_fits else None, hold)
    result.baseline["activations"] = act.info
    if act.kept:
        assert act.measured is not None
        result.measured = {**result.measured, "sqnr_db": act.measured.sqnr_db, "halves_db": list(act.measured.halves),
                           "win_rate": act.measured.win_rate(starts[0][1]),
                           "bytes": act.measured.cost.total_bytes, **_latency_row(act.measured),
                           "without_activations": {
                               "sqnr_db": result.measured["sqnr_db"], "bytes": result.measured["bytes"]}}
        result.text = widened_text(result.text, act.widening, act.comment(hold))
    scale.apply(result, hold.data)
    result.plan = Plan.from_text(result.text, source="<auto plan>")
    return result


@dataclass
class ActivationStep:
    """What :func:`_activation_step` tried and whether a widened plan was kept (``start``: which of the plans it
    started from)."""

    widening: Widening
    measured: Measured | None
    kept: bool
    info: dict[str, Any]
    start: int = 0

    def comment(self, hold: Holdout) -> str:
        assert self.measured is not None
        return (f"activations of {len(self.widening.tensors)} tensor(s) read only by layers that run float "
                f"anyway (no integer kernel for their weights) at 16 bits: "
                + _measured_line(self.measured.sqnr_db, hold) + f", {self.measured.cost.total_bytes} bytes"
                + _latency_text(self.measured)
                + _draws_text(self.info.get("win_rate"), "the plan it replaces", needed=False))


def _activation_step(src: Path, starts: list[tuple[Plan, Measured]], opts: PlanOptions, hold: Holdout, tmp: Path,
                     shapes: dict[str, list[int]], unit: str, budget_value: float,
                     progress: Progress | None) -> ActivationStep:
    """16-bit activations where the plan's layers run float anyway (:mod:`qcompiler.autoplan.activations`): the
    chosen plan (``starts[0]``) widened, compiled and measured, kept when it fits and beats the chosen plan by the
    guard's rule (:meth:`Measured.beats`); else the same with ``starts[1]`` when given (the best mix, when the
    uniform base was chosen: a uniform plan at the budget has no byte for the zero points), against the chosen
    plan still."""
    chosen = starts[0][1]
    info: dict[str, Any] = {"tried": False}
    last = ActivationStep(Widening([], []), None, False, info)
    if not WIDEN_ACTIVATIONS or not math.isfinite(chosen.sqnr_db):
        return last
    for k, (plan, _) in enumerate(starts):
        with _quiet():
            widening = wide_activations(src, plan, opts.target)
        if not widening:
            continue
        if progress:
            progress("activations (16-bit where the layer runs float)", k, len(starts))
        try:
            with _quiet():
                m = measure(src, widened(plan, widening, "wide activations"), opts.target, hold, tmp, f"wide{k}",
                            shapes, unit == "bitops",
                            f"16-bit activations on the {'chosen' if k == 0 else 'mixed'} plan")
        except UserError as e:  # the target refuses 16-bit activations: nothing to try
            log.info("plan: 16-bit activations left out: %s", e)
            return ActivationStep(widening, None, False, {"tried": False, "error": str(e)})
        fits = m.amount(unit) <= budget_value
        kept = fits and m.eligible and m.beats(chosen)
        log.info("plan: 16-bit activations on %d tensor(s) of the %s plan: measured %.2f dB (chosen plan %.2f dB), "
                 "%d bytes%s", len(widening.tensors), "chosen" if k == 0 else "mixed", m.sqnr_db, chosen.sqnr_db,
                 m.cost.total_bytes, "; kept" if kept else "")
        tried = {"plan": "chosen" if k == 0 else "mixed", "tensors": len(widening.tensors),
                 "nodes": len(widening.rules), "sqnr_db": m.sqnr_db, "halves_db": list(m.halves),
                 "win_rate": m.win_rate(chosen), "bytes": m.cost.total_bytes, "fits": fits, "kept": kept,
                 **_latency_row(m)}
        info = {"tried": True, **tried, "tries": [*info.get("tries", []), tried]}
        last = ActivationStep(widening, m, kept, info, k)
        if kept:
            break
    if progress:
        progress("activations (16-bit where the layer runs float)", len(starts), len(starts))
    return last


def _measured_line(sqnr: float, hold: Holdout) -> str:
    return f"measured: output SQNR {sqnr:.2f} dB (compiled, onnxruntime on {hold.data})"


def _latency_text(m: Measured) -> str:
    """``, latency 1.23x float`` when the plan was timed (``--max-latency-ratio``), else nothing."""
    return "" if m.latency_ratio is None else f", latency {m.latency_ratio:.2f}x float"


def _draws_text(rate: float | None, against: str = "the uniform plan", needed: bool = True) -> str:
    """``; above the uniform plan on 64 % of the held-back samples' bootstrap draws (80 % needed)`` where measured
    (``rate``: :meth:`Measured.win_rate`), else nothing."""
    if rate is None:
        return ""
    return (f"; above {against} on {100 * rate:.0f} % of the held-back samples' bootstrap draws"
            + (f" ({100 * MIX_CONFIDENCE:.0f} % needed)" if needed else ""))


def _with_measured(text: str, mixed: Measured, name: str, base: Measured | None, hold: Holdout) -> str:
    """The search's plan text with the measured SQNR (and the uniform base's) after the predicted line."""
    extra = _measured_line(mixed.sqnr_db, hold) + _latency_text(mixed) + (
        f"; uniform {name} alone: {base.sqnr_db:.2f} dB, {base.cost.total_bytes} bytes{_latency_text(base)}"
        + _draws_text(mixed.win_rate(base)) if base is not None else "")
    lines = text.splitlines()
    at = next((i + 1 for i, line in enumerate(lines) if line.startswith("# predicted")), 0)
    limit = [f"# {hold.latency.header()}"] if hold.latency is not None else []
    return "\n".join([*lines[:at], f"# {extra}", *limit, *lines[at:]]) + "\n"


def _uniform_text(src: Path, opts: PlanOptions, budget_value: float, unit: str, name: str, base: Plan,
                  base_m: Measured, mixed: Measured, result: AutoPlanResult, hold: Holdout) -> str:
    counts = ", ".join(f"{k} x{n}" for k, n in result.counts().items() if n)
    sq = result.predicted.get("sqnr_db")
    header = [
        f"Plan written by `qcompiler plan` (qcompiler {__version__}): the uniform {name}, which no mixed plan beat.",
        f"model: {src.name}   target: {opts.target}   budget: {opts.budget.text} = {fmt_unit(budget_value, unit)}",
        f"uniform {name}: {base_m.cost.total_bytes} bytes; " + _measured_line(base_m.sqnr_db, hold)
        + _latency_text(base_m),
        f"best mixed plan found ({counts}): measured {mixed.sqnr_db:.2f} dB, {mixed.cost.total_bytes} bytes"
        + _latency_text(mixed)
        + (f" (predicted by the additive model: {sq:.2f} dB)" if sq is not None and math.isfinite(sq) else "")
        + _draws_text(mixed.win_rate(base_m)),
        *([hold.latency.header()] if hold.latency is not None else []),
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
                        base_plan=base if given else None, seed=copts.seed, validate_data=copts.validate_data,
                        max_latency_ratio=copts.max_latency_ratio)
    calib = None if copts.calib is None or str(copts.calib) in ("none", "random") else copts.calib
    return auto_plan(model_path, calib, popts, progress=progress)
