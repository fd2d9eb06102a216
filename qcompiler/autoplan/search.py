"""The search: sensitivities (:func:`measure_sensitivity`), the knapsack over them within the budget, whole
plans measured around its answer (``--select``, ``--exchange``), verification by compiling, and the Pareto
front (:func:`auto_plan`; :func:`plan_for_compile` for ``compile --budget``)."""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qcompiler.autoplan import knapsack
from qcompiler.autoplan.budget import Budget, fmt_unit
from qcompiler.autoplan.plans import layer_rules, plan_header, plan_text, rule_comments
from qcompiler.autoplan.prepare import Prepared, calib_source, first_feeds, prepare
from qcompiler.autoplan.probes import ProbeMemo, ProbeWorkdir, cost_tables, output_quant
from qcompiler.autoplan.result import AutoPlanResult, FrontPoint, LayerInfo, PlanOptions, Progress
from qcompiler.autoplan.sensitivity import METRICS, LayerUnderTest, SensitivityResult, compute, measure_plans
from qcompiler.core.errors import UserError
from qcompiler.plan import Plan

log = logging.getLogger("qcompiler.autoplan")


SOLVERS = ("dp", "lagrange")
#: verification rounds before giving up
MAX_ROUNDS = 12
#: pd: fewest effective samples (Kish, over the per-sample distortions) a sensitivity may rest on before the
#: planner measures again on SAMPLE_GROWTH times the samples (at most ``PlanOptions.max_samples``)
MIN_ESS = 2.0
SAMPLE_GROWTH = 4


def measure_sensitivity(graph: Any, lut: Sequence[LayerUnderTest], names: Sequence[str], ranges: Any,
                        opts: PlanOptions, progress: Progress | None = None
                        ) -> tuple[SensitivityResult, list[dict[str, np.ndarray]]]:
    """``opts.metric`` over the first ``opts.samples`` samples of ``ranges`` (activation ranges calibrated over all
    of it), and the feeds used. ``pd``: when the distortions rest on fewer than :data:`MIN_ESS` effective
    samples, measured again, once, on :data:`SAMPLE_GROWTH` times the samples (at most ``opts.max_samples``)."""
    feeds = first_feeds(ranges, opts.samples)

    def run(fs: list[dict[str, np.ndarray]]) -> SensitivityResult:
        return compute(opts.metric, graph, lut, names, fs, batch_size=opts.batch_size,
                       workers=opts.workers, draws=opts.draws, seed=opts.seed, range_source=ranges,
                       progress=(lambda d, n: progress(f"sensitivity ({opts.metric})", d, n)) if progress else None)

    sens = run(feeds)
    ess = sens.details.get("ess")
    if ess is not None and ess < MIN_ESS and opts.max_samples > len(feeds):
        # the distortions rest on one or two samples (a confident classifier: only the samples near its
        # decision boundary move its probabilities): measure again on more samples
        grown = first_feeds(ranges, min(opts.max_samples, len(feeds) * SAMPLE_GROWTH))
        if len(grown) > len(feeds):
            log.info("plan: the sensitivities rest on %.1f effective samples of %d; measuring again on %d",
                     ess, len(feeds), len(grown))
            first = {"samples": len(feeds), "ess": ess, "seconds": sens.seconds, "evaluations": sens.evaluations}
            feeds = grown
            sens = run(feeds)
            sens.details["first_pass"] = first
    return sens, feeds


def _reuse(sens: SensitivityResult, layers: Sequence[LayerInfo], names: Sequence[str]) -> SensitivityResult:
    """The columns of an earlier sensitivity result for these layers and candidates (NaN where not allowed)."""
    if [la.name for la in layers] != list(sens.layers) or any(n not in sens.candidates for n in names):
        raise ValueError("the given sensitivity result does not cover these layers and candidates")
    cols = [sens.candidates.index(n) for n in names]
    values = sens.values[:, cols].copy()
    noise = None if sens.noise is None else sens.noise[:, cols].copy()
    for li, la in enumerate(layers):
        for ci, n in enumerate(names):
            if n not in la.allowed:
                values[li, ci] = np.nan
                if noise is not None:
                    noise[li, ci] = np.nan
    return SensitivityResult(sens.metric, list(sens.layers), list(names), values, noise, sens.signal, sens.outputs,
                             sens.output_kinds, sens.samples, sens.batches, 0, 0.0, dict(sens.details))


def search_plan(model_path: str | Path, calib: str | Path | None, options: PlanOptions, *,
                progress: Progress | None = None, sensitivity: SensitivityResult | None = None,
                calib_samples: int | None = None, memo: ProbeMemo | None = None) -> AutoPlanResult:
    """The search on top of ``options.base_plan`` (see the package docstring; :func:`~qcompiler.autoplan.baseline
    .auto_plan` adds the uniform presets and the measured guard around it). ``sensitivity``: reuse the
    sensitivities of an earlier run on the same model (a superset of the candidates) instead of measuring.
    ``calib_samples``: use only the first that many calibration samples (the rest are held back). ``memo``: probe
    results shared with the other searches of the same run (same model, base plan and calibration data)."""
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    opts = options
    if opts.metric not in METRICS:
        raise UserError(f"--metric: unknown metric '{opts.metric}' (one of: {', '.join(METRICS)})")
    if opts.solver not in SOLVERS:
        raise UserError(f"--solver: unknown solver '{opts.solver}' (one of: {', '.join(SOLVERS)})")
    if opts.samples <= 0:
        raise UserError(f"--samples: must be positive, got {opts.samples}")
    src = Path(model_path)
    cands = list(opts.candidates)
    names = [c.name for c in cands]

    t = time.perf_counter()
    prep = prepare(src, cands, target=opts.target, base_plan=opts.base_plan,
                   drop_unsupported=opts.default_candidates)
    if prep.dropped:
        cands = [c for c in cands if c.name not in prep.dropped]
        names = [c.name for c in cands]
    rules = layer_rules(prep, cands)
    # sensitivities on the first samples; activation ranges as the compile will calibrate them: over the whole
    # calibration data (one streaming pass)
    ranges = calib_source(prep.graph, calib, opts.samples, opts.seed)
    if calib_samples is not None:
        ranges = ranges.take(calib_samples)
    feeds = first_feeds(ranges, opts.samples)
    timings["prepare"] = time.perf_counter() - t

    # ---- sensitivity ------------------------------------------------------------------------------------
    t = time.perf_counter()
    by_name = {n.name: n for n in prep.graph.nodes}
    oq = output_quant(prep, cands, rules, memo)
    lut = [LayerUnderTest(la.name, by_name[la.name], prep.nodes[la.name].weight_inputs, prep.specs[li],
                          prep.nodes[la.name].activation if 0 in prep.nodes[la.name].activation_inputs else None,
                          oq[li])
           for li, la in enumerate(prep.layers)]
    if sensitivity is not None:
        sens = _reuse(sensitivity, prep.layers, names)
        if sens.samples != len(feeds):
            feeds = first_feeds(ranges, sens.samples)
    else:
        sens, feeds = measure_sensitivity(prep.graph, lut, names, ranges, opts, progress)
    timings["sensitivity"] = time.perf_counter() - t
    # whole plans are compared on fresh samples (the knapsack fitted the first ones): the next 2 x samples
    n_sens = len(feeds)
    more = first_feeds(ranges, 3 * n_sens)[n_sens:] if opts.select else []
    select_feeds = more or feeds
    if opts.refine and opts.metric != "pd":
        raise UserError("--refine re-measures sensitivities around a plan with pd; use --metric pd")
    if opts.exchange and opts.metric != "pd":
        raise UserError("--exchange re-measures sensitivities around a plan with pd; use --metric pd")

    # ---- costs, allocation, verification ----------------------------------------------------------------
    unit = opts.budget.unit
    shapes = {k: list(v.shape) for k, v in feeds[0].items()}
    work = ProbeWorkdir(feeds[0], memo)
    try:
        t = time.perf_counter()
        table, base, float_totals = cost_tables(prep, cands, rules, work, shapes, unit == "bitops", progress)
        timings["costs"] = time.perf_counter() - t
        budget_value = _absolute_budget(opts.budget, float_totals)
        cap = _capacity(unit, budget_value, base)
        t = time.perf_counter()
        refined = 0
        if opts.refine:
            # Sensitivities measured one layer at a time add up well for small errors; where many layers are
            # coarse they compound. Re-measure every (layer, candidate) as a change from the plan found, re-solve.
            current = _solve(sens.values, table[unit], cap, opts)
            for _ in range(opts.refine):
                if current is None:
                    break
                ctx_sens = compute("pd", prep.graph, lut, names, feeds, batch_size=opts.batch_size,
                                   workers=opts.workers, seed=opts.seed, context=current, range_source=ranges,
                                   progress=(lambda d, n: progress("refine (pd around the plan)", d, n))
                                   if progress else None)
                nxt = _solve(ctx_sens.values, table[unit], cap, opts)
                refined += 1
                sens = ctx_sens
                if nxt is None or nxt == current:
                    break
                current = nxt
        timings["refine"] = time.perf_counter() - t
        values = sens.values
        t = time.perf_counter()
        verified: dict[str, Any] = {}
        choice: list[int] | None = None
        text = ""
        rounds = 0
        joint: dict[tuple[int, ...], tuple[float, np.ndarray]] = {}
        select_state: dict[str, Any] = {}
        raw_front = _front_points(values, table, base, sens, unit, opts)
        pool_front = sorted(raw_front, key=_unit_key(unit)) if opts.select else []
        solve_values = values + stay_penalty(values, prep.layers, names, opts.stay) if opts.stay > 0 else values
        while True:
            rounds += 1
            choice = _solve(solve_values, table[unit], cap, opts)
            if choice is None:
                cheapest = _cheapest(unit, table, base)
                raise UserError(f"--budget: {opts.budget.describe()} = {fmt_unit(budget_value, unit)} is below "
                                f"the smallest plan this model allows ({fmt_unit(cheapest, unit)} with every "
                                f"layer at its cheapest candidate of {', '.join(names)})")
            if opts.select:
                choice = _select(choice, cap, pool_front, table[unit], values, opts, joint, prep, lut, names,
                                 select_feeds, sens, progress, ranges, select_feeds is not feeds, select_state)
            if opts.exchange:
                choice = _exchange(choice, cap, table[unit], opts, joint, prep, lut, names, feeds, select_feeds, sens,
                                   progress, ranges, select_state)
            predicted = _predict(choice, table, base, values, sens)
            if tuple(choice) in joint and "signal" in select_state:
                predicted["joint_sqnr_db"] = _sqnr(select_state["signal"], joint[tuple(choice)][1])
            header = plan_header(src, opts, budget_value, unit, predicted, names, choice)
            text = plan_text(prep, [rules[li][ci] for li, ci in enumerate(choice)],  # type: ignore[misc]
                             header, rule_comments(prep, names, choice, sens, table))
            plan = Plan.from_text(text, source="<auto plan>")
            if progress:
                progress("verify", rounds - 1, MAX_ROUNDS)
            rep, plan_rep = work.compile_text(src, text, opts.target, shapes=shapes, want_shapes=unit == "bitops",
                                              plan=plan)
            # the base plan's rules come first (those matching no node were left out by prepare); one of the
            # planner's own rules (one per layer, by name) that matches nothing is a bug
            own = [d for d in plan_rep.get("unmatched_rules", [])
                   if int(re.match(r"rules\[(\d+)\]", d).group(1)) >= len(prep.base.rules)]  # type: ignore[union-attr]
            if own:
                raise RuntimeError("auto plan: rules match no node after compile preparation: "
                                   f"{own[:3]} (node names changed)")
            verified = {"bytes": rep.total_bytes, "bitops": rep.bitops if unit == "bitops" else None,
                        "avg_bits": predicted["avg_bits"], "rounds": rounds}
            got = {"bytes": float(rep.total_bytes), "bitops": float(rep.bitops), "bits": predicted["avg_bits"]}[unit]
            if got <= budget_value:
                break
            if rounds >= MAX_ROUNDS:
                raise RuntimeError(f"auto plan: could not fit {opts.budget.describe()} in {MAX_ROUNDS} rounds")
            excess = got - budget_value
            log.info("plan: round %d is %s over the budget; tightening", rounds, fmt_unit(excess, unit))
            used = float(sum(table[unit][li, ci] for li, ci in enumerate(choice)))
            cap = min(cap, used) - excess - (1.0 if unit == "bytes" else abs(used) * 1e-6)
        timings["allocate"] = time.perf_counter() - t
        t = time.perf_counter()
        front = _front(values, table, base, sens, unit, choice, opts, raw_front)
        timings["front"] = time.perf_counter() - t
    finally:
        work.close()
    timings["total"] = time.perf_counter() - t_all
    if progress:
        progress("verify", MAX_ROUNDS, MAX_ROUNDS)
    return AutoPlanResult(text=text, plan=plan, budget=opts.budget, budget_value=budget_value, unit=unit,
                          layers=prep.layers, candidates=names, choice=list(choice), cost_table=table, base=base,
                          sensitivity=sens, predicted=predicted,
                          verified=verified, front=front, timings=timings, float_totals=float_totals,
                          model=str(src), target=opts.target, rules=rules, rounds=rounds)


def stay_penalty(values: np.ndarray, layers: Sequence[LayerInfo], names: Sequence[str], stay: float) -> np.ndarray:
    """What leaving the base plan costs each (layer, candidate) in the knapsack (``PlanOptions.stay``): 0 at the
    candidate that is the layer's base weight dtype as the base plan writes it (``int4`` on a W4A8 preset), else
    the ``stay`` quantile of the layers' upgrade gains (base sensitivity minus the lowest). Upgrades gaining less,
    and the downgrades paying for them, are then not worth it: a plan a few clear steps from the base, measured
    apart from the full knapsack's (the sensitivities are round-to-nearest; the base's GPTQ / bias correction
    are not in them, so small predicted gains are the least trustworthy)."""
    pen = np.zeros_like(values)
    gains = []
    for li, la in enumerate(layers):
        own = str(la.base_weight.get("dtype"))
        if own not in names or not np.isfinite(values[li, names.index(own)]):
            continue
        ci = names.index(own)
        row = values[li][np.isfinite(values[li])]
        gains.append(max(0.0, float(values[li, ci] - row.min())))
        pen[li] = 1.0
        pen[li, ci] = 0.0
    lam = float(np.quantile(gains, stay)) if gains else 0.0
    return pen * lam


def _sqnr(signal: np.ndarray, noise: np.ndarray) -> float:
    worst = math.inf
    for o in range(len(noise)):
        if noise[o] > 0:
            worst = min(worst, 10.0 * math.log10(max(float(signal[o]), 1e-300) / float(noise[o])))
    return worst


def _select(choice: list[int], cap: float, front: Sequence[FrontPoint], costs: np.ndarray, values: np.ndarray,
            opts: PlanOptions, joint: dict[tuple[int, ...], tuple[float, np.ndarray]], prep: Prepared,
            lut: Sequence[LayerUnderTest], names: Sequence[str], feeds: Sequence[dict[str, np.ndarray]],
            sens: SensitivityResult, progress: Progress | None, ranges: Any, fresh: bool,
            state: dict[str, Any]) -> list[int]:
    """Among the knapsack's plan, the ``opts.select`` Pareto points nearest the budget that fit, and every uniform
    plan that fits, the one with the least distortion *measured with all its layers quantized together* (the
    sensitivities are measured one layer at a time and only added; where coarse layers compound, the sum
    misleads). Measured results are cached in ``joint``."""
    def used(ch: Sequence[int]) -> float:
        return float(sum(costs[li, ci] for li, ci in enumerate(ch)))

    pool: list[list[int]] = [list(choice)]
    fits = [list(p.choice) for p in front if used(p.choice) <= cap + 1e-9]
    pool += fits[-opts.select:]
    for ci in range(costs.shape[1]):
        uniform = [ci] * costs.shape[0]
        if all(np.isfinite(costs[li, ci]) and np.isfinite(values[li, ci]) for li in range(costs.shape[0])) \
                and used(uniform) <= cap + 1e-9:
            pool.append(uniform)
    unique: list[tuple[int, ...]] = list(dict.fromkeys(tuple(p) for p in pool))
    _measure_whole(unique, opts, joint, prep, lut, names, feeds, sens, progress, ranges, fresh, state,
                   "select (whole plans measured)")
    best = min(unique, key=lambda p: (joint[p][0], used(p)))
    if list(best) != list(choice):
        log.info("plan: measured together, a neighbouring plan beats the knapsack's (%.4g vs %.4g)",
                 joint[best][0], joint[tuple(choice)][0])
    return list(best)


def _measure_whole(plans: Sequence[tuple[int, ...]], opts: PlanOptions,
                   joint: dict[tuple[int, ...], tuple[float, np.ndarray]], prep: Prepared,
                   lut: Sequence[LayerUnderTest], names: Sequence[str], feeds: Sequence[dict[str, np.ndarray]],
                   sens: SensitivityResult, progress: Progress | None, ranges: Any, fresh: bool,
                   state: dict[str, Any], label: str) -> None:
    """Measure the ``plans`` not in ``joint`` whole on ``feeds`` (the session of ``state`` / of the sensitivity
    pass, rebound to them when ``fresh``), into ``joint``."""
    todo = [p for p in dict.fromkeys(plans) if p not in joint]
    if not todo:
        return
    runner = state.get("runner") or (None if fresh else sens.runner)
    res, runner = measure_plans(prep.graph, lut, names, feeds, todo, runner=runner, workers=opts.workers,
                                batch_size=opts.batch_size, range_source=ranges,
                                qparams=sens.runner.activation_qparams if sens.runner is not None else None,
                                base=sens.runner if fresh else None,
                                progress=(lambda d, n: progress(label, d, n)) if progress else None)
    state["runner"] = runner
    state["signal"] = runner.signal
    joint.update(zip(todo, res))


def _exchange(choice: list[int], cap: float, costs: np.ndarray, opts: PlanOptions,
              joint: dict[tuple[int, ...], tuple[float, np.ndarray]], prep: Prepared, lut: Sequence[LayerUnderTest],
              names: Sequence[str], sens_feeds: Sequence[dict[str, np.ndarray]],
              feeds: Sequence[dict[str, np.ndarray]], sens: SensitivityResult, progress: Progress | None,
              ranges: Any, state: dict[str, Any]) -> list[int]:
    """Measured exchanges around ``choice`` (``opts.exchange`` rounds at most): the sensitivities are measured again
    around the plan (pd with the plan as context: the change of the distortion when one layer alone switches);
    each exchange upgrades one layer and pays for it, where the budget needs it, with the downgrades that cost
    the least distortion per unit saved (one per layer); the ``opts.select`` (at least 4) exchanges predicted
    best are measured whole on ``feeds`` with the plan, and the best of them replaces the plan if it is less
    distorted than the plan, measured. A first-order step kept small (a few layers), and checked, where
    re-solving the whole knapsack from first-order changes (``refine``) moves many layers at once."""
    current = [int(c) for c in choice]
    n_l, n_c = costs.shape
    fresh = feeds is not sens_feeds
    for _ in range(opts.exchange):
        ctx = compute("pd", prep.graph, lut, names, sens_feeds, batch_size=opts.batch_size, workers=opts.workers,
                      seed=opts.seed, context=current, range_source=ranges,
                      progress=(lambda d, n: progress("exchange (pd around the plan)", d, n)) if progress else None)
        dv = ctx.values
        slack = cap - float(sum(costs[li, ci] for li, ci in enumerate(current)))

        def ok(li: int, ci: int, current: list[int] = current, dv: np.ndarray = dv) -> bool:
            return ci != current[li] and bool(np.isfinite(dv[li, ci]) and np.isfinite(costs[li, ci]))

        def saved(li: int, ci: int, current: list[int] = current) -> float:
            return float(costs[li, current[li]] - costs[li, ci])

        downs = sorted((float(dv[li, ci]) / saved(li, ci), li, ci) for li in range(n_l) for ci in range(n_c)
                       if ok(li, ci) and saved(li, ci) > 0)
        moves: dict[tuple[int, ...], float] = {}
        for li in range(n_l):
            for ci in range(n_c):
                if not ok(li, ci) or dv[li, ci] >= 0:
                    continue
                plan, gain, need, taken = list(current), float(dv[li, ci]), -saved(li, ci) - slack, {li}
                plan[li] = ci
                for _, l2, c2 in downs:
                    if need <= 0:
                        break
                    if l2 not in taken:
                        plan[l2], gain, need = c2, gain + float(dv[l2, c2]), need - saved(l2, c2)
                        taken.add(l2)
                if need <= 1e-9 and gain < 0:
                    moves[tuple(plan)] = min(gain, moves.get(tuple(plan), 0.0))
        best_moves = sorted(moves, key=lambda p: moves[p])[: max(opts.select, 4)]
        if not best_moves:
            break
        pool = [tuple(current), *best_moves]
        _measure_whole(pool, opts, joint, prep, lut, names, feeds, sens, progress, ranges, fresh, state,
                       "exchange (whole plans measured)")
        best = min(pool, key=lambda p: joint[p][0])
        if best == tuple(current):
            break
        log.info("plan: a measured exchange lowers the distortion (%.4g -> %.4g)", joint[tuple(current)][0],
                 joint[best][0])
        current = list(best)
    return current


def _absolute_budget(b: Budget, float_totals: dict[str, float]) -> float:
    if b.kind == "fraction":
        return float(math.floor(b.value * float_totals["bytes"]))
    if b.kind == "bitops-fraction":
        return b.value * float_totals["bitops"]
    return float(b.value)


def _capacity(unit: str, budget_value: float, base: dict[str, float]) -> float:
    """What the layers' costs may add up to: budget minus the fixed part (average bits: times parameters)."""
    if unit == "bits":
        return budget_value * base["params"] - base["bits"]
    return budget_value - base[unit]


def _cheapest(unit: str, table: dict[str, np.ndarray], base: dict[str, float]) -> float:
    total = float(np.nansum(np.nanmin(table[unit], axis=1)))
    if unit == "bits":
        return (base["bits"] + total) / max(base["params"], 1.0)
    return base[unit] + total


def _groups(values: np.ndarray, costs: np.ndarray) -> tuple[list[list[float]], list[list[float]], list[list[int]]]:
    groups_c, groups_v, index = [], [], []
    for li in range(values.shape[0]):
        ok = [ci for ci in range(values.shape[1]) if np.isfinite(costs[li, ci]) and np.isfinite(values[li, ci])]
        index.append(ok)
        groups_c.append([float(costs[li, ci]) for ci in ok])
        groups_v.append([float(values[li, ci]) for ci in ok])
    return groups_c, groups_v, index


def _solve(values: np.ndarray, costs: np.ndarray, cap: float, opts: PlanOptions) -> list[int] | None:
    groups_c, groups_v, index = _groups(values, costs)
    if opts.solver == "lagrange":
        sol = knapsack.lagrangian(groups_c, groups_v, cap)
    else:
        sol = knapsack.solve(groups_c, groups_v, cap, resolution=opts.resolution)
    if sol is None:
        return None
    return [index[li][o] for li, o in enumerate(sol.choice)]


def _predict(choice: Sequence[int], table: dict[str, np.ndarray], base: dict[str, float], values: np.ndarray,
             sens: SensitivityResult) -> dict[str, Any]:
    rows, cols = np.arange(len(choice)), np.asarray(choice, dtype=np.int64)
    # gathered with numpy, summed in layer order as before (same floating-point result)
    b = base["bytes"] + sum(table["bytes"][rows, cols].tolist())
    ops = base["bitops"] + sum(x for x in table["bitops"][rows, cols].tolist() if math.isfinite(x))
    bits = (base["bits"] + sum(table["bits"][rows, cols].tolist())) / max(base["params"], 1)
    s = float(sum(values[rows, cols].tolist()))
    return {"bytes": b, "bitops": ops, "avg_bits": bits, "sensitivity": s, "sqnr_db": sens.predicted_sqnr_db(choice)}


def _front_points(values: np.ndarray, table: dict[str, np.ndarray], base: dict[str, float],
                  sens: SensitivityResult, unit: str, opts: PlanOptions) -> list[FrontPoint]:
    """The Pareto-optimal plans of the additive model (none marked chosen), in the knapsack's order."""
    groups_c, groups_v, index = _groups(values, table[unit])
    sols = knapsack.pareto_front(groups_c, groups_v, resolution=min(opts.resolution, 4096))
    points: list[FrontPoint] = []
    seen: set[tuple[int, ...]] = set()
    for s in sols:
        ch = [index[li][o] for li, o in enumerate(s.choice)]
        if tuple(ch) in seen:
            continue
        seen.add(tuple(ch))
        p = _predict(ch, table, base, values, sens)
        points.append(FrontPoint(ch, p["bytes"], p["bitops"], p["avg_bits"], p["sensitivity"], p["sqnr_db"]))
    return points


def _front(values: np.ndarray, table: dict[str, np.ndarray], base: dict[str, float], sens: SensitivityResult,
           unit: str, chosen: Sequence[int], opts: PlanOptions, points: Sequence[FrontPoint] | None = None
           ) -> list[FrontPoint]:
    """The Pareto front sorted by the budget's unit, ``chosen`` marked (added when it is not on it); ``points``:
    the :func:`_front_points` of the same tables, when already computed."""
    raw = _front_points(values, table, base, sens, unit, opts) if points is None else points
    points = [FrontPoint(list(p.choice), p.bytes, p.bitops, p.avg_bits, p.sensitivity, p.predicted_sqnr_db,
                         p.measured_sqnr_db, chosen=list(p.choice) == list(chosen)) for p in raw]
    if chosen and not any(p.chosen for p in points):
        p = _predict(chosen, table, base, values, sens)
        points.append(FrontPoint(list(chosen), p["bytes"], p["bitops"], p["avg_bits"], p["sensitivity"],
                                 p["sqnr_db"], chosen=True))
    points.sort(key=_unit_key(unit))
    return points


def _unit_key(unit: str) -> Callable[[FrontPoint], float]:
    return {"bytes": lambda q: q.bytes, "bitops": lambda q: q.bitops, "bits": lambda q: q.avg_bits}[unit]
