"""The measured default (``qcompiler compile MODEL --calib DATA`` with no plan, or ``--plan auto``) and the algorithm
guard of the presets (``algorithms: {guard: measure}``).

**Measured default.** ``h = min(16, N / 4)`` of the N calibration samples are held back, every ``N // h``-th
(:func:`qcompiler.recipe.measure.held_back`: spread over the data, so that data stored in order is measured on
every kind of its inputs); every candidate
(:mod:`qcompiler.recipe.candidates`: the plain default plan — always first, the baseline —, the w8a8 preset as
written, calibration auto, dynamic MatMul / Gemm inputs — and their per-token form (one run-time scale per row)
when dynamic inputs measured above the default plan, which wins only by more than :data:`GUARD_MARGIN_DB` over
per-tensor scales (:func:`_per_token_follow_up`); at ``--effort normal`` / ``high`` also GPTQ, SmoothQuant
(alpha by measurement), per-token dynamic MatMul / Gemm inputs, bias correction, percentile ranges; with a latency / size constraint or at ``--effort high`` also the candidates
that keep activations float: w8a8-dynamic, weights only; then the better single changes together, and at
``--effort high`` the best so far with its most sensitive layers float) is compiled calibrated on the other N - h
samples and run in onnxruntime on the h held-back ones: score (:func:`qcompiler.recipe.measure.score`: worst slice
SQNR, binary probability outputs in logit space), bytes (as
``inspect --cost`` counts them), the task metric when given, and latency against the float model (one thread, best
of 3) only when a latency constraint asks for it (``--optimize latency``, ``--max-latency-ratio``). With
``--stream IN=OUT`` (``CompileOptions.stream``) a candidate runs the whole calibration data as one stream, fed its
own previous state, and is scored at the held-back places (:class:`qcompiler.report.validate.StreamSpec`). The winner is
the best under ``--optimize`` among the candidates that meet the constraints and are not below the default plan
(by the task metric when given, else by the score). A candidate running GPTQ is first measured with its weights
exact (``CompileOptions.exact_weights``) and not compiled when that ceiling is more than :data:`CEILING_MARGIN_DB`
below the default plan — below the best candidate so far when nothing but accuracy decides: the candidates without
GPTQ are measured first (``_measure_with_ceiling``, ``_ceiling_ref``; not with a task metric). Without a latency constraint nothing timed decides: the same
inputs give the same file. Confirmation: the winner and the default plan compiled on all N samples are compared
once more on the held-back samples, and the default plan is kept if the winner lost there — unless the winner leads
the default plan by :data:`CONFIRM_MARGIN_DB` or more on :data:`CONFIRM_MIN_HELD` (16) or more held-back samples
(N >= 64) and no task metric decides: then the final compile is the winner's only compile on all N. Either way
the winner is never below the default plan on the held-back samples as the candidates were measured (calibrated
on the other N - h samples). ``--effort`` caps the
candidates (low — the default — 4, one more on a model with MatMul / Gemm and one more when weights-only is
offered; normal 8; high all).

**Guard.** A plan with ``algorithms: {guard: measure}`` (the shipped presets) is measured as written, and once
without each algorithm it turns on (percentile clipping counting as one: without it, minmax ranges; per-token
run-time scales too: without them, one per tensor). A plan of the w8a8-dynamic kind (float activations, MatMul /
Gemm inputs quantized at run time per tensor) is also measured with per-token scales, and with per-token scales
and SmoothQuant (alpha by measurement): the best of those replaces the plan when it measures better than as
written (by the same margin; :func:`~qcompiler.recipe.candidates.dynamic_upgrades`). Percentile clipping
is not measured when the plan as written calibrates no activation statically (nothing for it to clip). An algorithm
whose removal measures strictly better on the held-back samples is dropped (a warning, and ``recipe.dropped`` in
the report). When several are, the plan without all of them is measured too, and one of them alone left on stays
only where it beats that on at least :data:`KEEP_CONFIDENCE` of paired resamples of the held-back samples (a
lead the samples' noise does not explain). When nothing is dropped the plan compiled is the plan as written (same bytes as without the guard).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qcompiler import ir
from qcompiler.autoplan.budget import Budget
from qcompiler.calib.sources import HELD_BACK_MAX
from qcompiler.compile import CompileOptions
from qcompiler.core.errors import UserError
from qcompiler.plan import Plan
from qcompiler.plan.ablations import guarded_algorithms
from qcompiler.recipe.candidates import (
    MATMUL_OPS,
    Candidate,
    combined,
    dynamic_upgrades,
    effort_cap,
    keep_float,
    recipe_candidates,
    same_precision_as_default,
    unguarded,
    without,
)
from qcompiler.recipe.choose import (
    EFFORTS,
    OPTIMIZE,
    Constraints,
    RecipeResult,
    fmt_db,
    pick,
    plan_text,
    why_not,
)
from qcompiler.recipe.measure import (
    Bench,
    Measured,
    call_metric,
    held_back_from,
    load_metric,
    run_timed,
    score,
)
from qcompiler.report import validate as qv

__all__ = ["EFFORTS", "OPTIMIZE", "Measured", "RecipeResult", "guard_plan", "plan_for_compile", "score"]

log = logging.getLogger("qcompiler.recipe")

#: the guard drops an algorithm only when the plan measures this much better without it (held-back noise)
GUARD_MARGIN_DB = 0.05
#: the confirmation on all N samples (winner and default plan compiled once more) is skipped when the winner leads
#: the default plan by at least this much on the held-back samples (by the score; a task metric always confirms):
#: the largest drop of that lead seen on the zoo once both calibrate on all N is 5.8 dB (PP-OCR cls, 13.9 -> 8.1)
CONFIRM_MARGIN_DB = 8.0
#: ... and only when at least this many samples were held back (N >= 64): on fewer the held-back score is too noisy
#: (models/conv_bn_relu.npz, 4 samples, 1 held back: dynamic-matmul led by 19.0 dB there and lost to the default
#: plan by 4.2 dB once both calibrated on all 4)
CONFIRM_MIN_HELD = HELD_BACK_MAX
#: a candidate running GPTQ is not compiled when, with its weights exact, it measures more than this below the
#: default plan (``_measure_with_ceiling``). Exact weights are no strict ceiling: rounded weights scored above their
#: exact-weights variant by up to 5.0 dB on the held-out magika's default plan (1.6 dB on PP-OCR cls / rec, 1.5
#: on nudenet, 0.3 on silero-vad); the w8a8 candidate scored 0.03-4.2 dB below its own on all eight models
#: (benchmarks/RESULTS.md, session 15). On the ViT the w8a8 ceiling is 12.3 dB below the default plan.
CEILING_MARGIN_DB = 6.0
#: when the guard drops several algorithms (each measured worse than the plan as written) and one of them alone
#: left on measures better than all of them off, it stays only where it leads on at least this share of paired
#: resamples of the held-back samples (:meth:`~qcompiler.recipe.measure.Bench.win_rate`): two algorithms that
#: each measured harmful leave little evidence for either, and a lead inside the held-back samples' noise did not
#: survive on other data (all-MiniLM-L6-v2's w8a8: GPTQ on minmax ranges 0.23 dB above neither on 16 held-back
#: sentences, in 40 % of resamples; 0.68 dB below on 48 other sentences; benchmarks/RESULTS.md, session 17).
#: Outputs above ``measure.KEEP_OUTPUT_BYTES`` per candidate are not kept: then the pooled scores decide.
KEEP_CONFIDENCE = 0.8
#: a preset of the default plan's precision (8-bit weights and activations) stays within this of the default plan
PRESET_FLOOR_DB = 0.5
#: the float outputs on the held-back samples are handed to the compile's validation (which then does not run the
#: float model on those samples again) when they take at most this many bytes (PP-OCR rec: 13 MB; the feeds are
#: not kept, their digests are)
REFERENCE_KEEP_BYTES = 64 << 20

Progress = Callable[[str, int, int], None]


def plan_for_compile(model: Path, opts: CompileOptions, base: Plan, progress: Progress | None = None) -> RecipeResult:
    """The compile's hook: the measured default for ``plan="auto"`` (what the compile resolves no plan to, on real
    calibration data), else the guard of ``base``."""
    with tempfile.TemporaryDirectory(prefix="qcompiler-recipe-") as tmp:
        bench = _bench(model, opts, Path(tmp))
        result = _choose(bench, opts, base, progress) if opts.plan == "auto" else _guard(bench, base, progress)
        ref = bench.scored_reference()
        if ref is not None and sum(np.asarray(v).nbytes for d in ref.outputs for v in d.values()) <= \
                REFERENCE_KEEP_BYTES:
            result.reference = ref.handed(bench.held_indices)
        return result


def guard_plan(model: Path, opts: CompileOptions, base: Plan) -> RecipeResult:
    """The guard alone (for tools): ``base`` with the algorithms that measured worse dropped."""
    with tempfile.TemporaryDirectory(prefix="qcompiler-recipe-") as tmp:
        return _guard(_bench(model, opts, Path(tmp)), base, None)


def _bench(model: Path, opts: CompileOptions, tmp: Path) -> Bench:
    calib = str(opts.calib)
    fit, held, data = held_back_from(calib, model, opts.calib_samples)
    metric = load_metric(opts.task_metric)
    # latency only where a constraint asks for it: timing must not decide what a plain compile writes
    latency = opts.optimize == "latency" or opts.max_latency_ratio is not None
    # the task metric reads the float outputs the candidates are scored against (streamed: the reference's)
    plain_outputs = metric is not None and not opts.stream
    float_outputs, float_seconds = run_timed(model, held) if latency or plain_outputs else ([], 0.0)
    # the candidates' compiles are not validated: the compile's --check thresholds are for the model written
    bench = Bench(model=model, options=dataclasses.replace(opts, checks=[]), calib=calib, fit=fit, held=held,
                  float_outputs=float_outputs, float_seconds=float_seconds, workdir=tmp, metric=metric,
                  latency=latency)
    if opts.stream:  # the whole data as one stream, scored at the held-back places
        bench.stream = qv.StreamSpec(dict(opts.stream), data, bench.held_indices)
    if bench.stream is not None and metric is not None:
        bench.float_outputs = bench.reference.outputs
    if metric is not None:
        bench.float_metric = call_metric(metric, bench.float_outputs, bench.float_outputs, held)
    return bench


def _constraints(opts: CompileOptions, model: Path) -> Constraints:
    if opts.optimize not in OPTIMIZE:
        raise UserError(f"--optimize: '{opts.optimize}' (one of {', '.join(OPTIMIZE)})")
    budget = Budget.parse(opts.budget) if opts.budget is not None else None
    float_bytes = 0 if budget is None else int(ir.model_summary(ir.load_model(model, check=False))["parameter_bytes"])
    # --min-sqnr shapes the choice under --optimize latency / size (the fastest / smallest that meets it); under
    # accuracy the most accurate candidate is kept anyway, and --min-sqnr stays the compile's validation gate
    # (exit 2, the rejected model's report written), as for any plan
    min_sqnr = opts.min_sqnr_db if opts.optimize != "accuracy" else None
    return Constraints(optimize=opts.optimize, max_latency_ratio=opts.max_latency_ratio, budget=budget,
                       float_bytes=float_bytes, min_sqnr_db=min_sqnr, max_drop=opts.max_drop)


def _choose(bench: Bench, opts: CompileOptions, base: Plan, progress: Progress | None) -> RecipeResult:
    if opts.effort is not None and opts.effort not in EFFORTS:
        raise UserError(f"--effort: '{opts.effort}' (one of {', '.join(EFFORTS)})")
    if opts.max_drop is not None and bench.metric is None:
        raise UserError("--max-drop needs a task metric (--metric module:function)")
    effort = opts.effort or "low"
    cons = _constraints(opts, bench.model)
    # the model's load-time checks ran in the bench's held_back (qv.load_feeds); not again (0.4 s on the ViT)
    op_types = set(ir.model_summary(ir.load_model(bench.model, check=False))["ops"])
    # activations kept float (weights only, w8a8-dynamic) would win on accuracy almost everywhere by giving up the
    # integer kernels: offered only when the user weighs speed / size, or asks for every candidate
    float_acts = effort == "high" or cons.timed or cons.optimize == "size" or cons.budget is not None
    cap = effort_cap(effort, bool(op_types & set(MATMUL_OPS)), float_acts)
    todo = recipe_candidates(base, op_types, float_activations=float_acts)
    singles = todo if cap is None else todo[:max(1, cap - 1)]  # a place left for the combination
    measured: list[Measured] = []
    total = len(singles) + 1
    # the default plan's statistics collected with histograms, in the parts calibration auto collects: a later
    # candidate with `calibration: auto` (or percentile ranges) over the same tensors finds them in the cache
    auto_later = any(c.plan.activation_defaults.get("calibration") == "auto" for c in singles[1:])
    # the candidates without GPTQ first (the default plan first of all), then the per-token follow-up, then those
    # running GPTQ, each skipped when its ceiling cannot reach the best so far (_ceiling_ref); the table keeps
    # the candidates' order
    done: dict[str, Measured] = {}

    def measure_single(cand: Candidate, step: int) -> None:
        if progress:
            progress(f"recipe:{cand.name}", step, total)
        ref = _ceiling_ref(list(done.values()), cons) if done else None
        m = _measure_with_ceiling(bench, cand.plan, cand.name, cand.change, ref,
                                  collect_for_auto=cand is singles[0] and auto_later)
        m.structural = cand.structural
        done[cand.name] = m
        log.info("recipe: %s %s dB, %d bytes%s", cand.name, fmt_db(m.sqnr_db), m.bytes,
                 f", {m.latency_ratio:.2f}x float" if bench.latency else "")

    light = [c for c in singles if "gptq" not in c.plan.algorithms]
    for step, cand in enumerate(light):
        measure_single(cand, step)
    follow = _per_token_follow_up(todo, list(done.values()))
    if follow is not None:
        _measure_follow_up(bench, follow, done, progress, len(light), total)
    for step, cand in enumerate((c for c in singles if c not in light), len(light)):
        measure_single(cand, step)
    by_name = {c.name: c for c in [*singles, *todo] if c.name in done}
    names = {c.name for c in singles}
    measured = [done[c.name] for c in singles] + [m for n, m in done.items() if n not in names]
    better = [by_name[m.name] for m in measured[1:] if not m.error and m.sqnr_db > measured[0].sqnr_db]
    extra = combined(base, better)
    if extra is not None and (cap is None or len(measured) < cap):
        measured.append(_measure_with_ceiling(bench, extra.plan, extra.name, extra.change,
                                              _ceiling_ref(measured, cons)))
        by_name[extra.name] = extra
    if cap is None:  # effort high: the best so far with its most sensitive layers float
        top = max((m for m in measured if not m.error), key=lambda m: m.sqnr_db)
        nodes = bench.sensitive_nodes(top.plan, top.name + "-layers", 2)
        if nodes:
            kf = keep_float(by_name[top.name], nodes)
            measured.append(bench.measure(kf.plan, kf.name, kf.change))
            measured[-1].structural = True
            by_name[kf.name] = kf
    if not bench.latency:  # run for a task metric's outputs only: its timing is no measurement anything uses
        for m in measured:
            m.latency_ratio = math.inf
    winner, reason = pick(measured, cons, bench.float_metric)
    for m in measured:
        if m is not winner and not m.error:
            m.notes.append(why_not(m, measured[0], cons, bench.float_metric) or "eligible, not the best")
    notes: list[str] = []
    lead = winner.sqnr_db - measured[0].sqnr_db
    if winner is not measured[0] and bench.metric is None and lead >= CONFIRM_MARGIN_DB and \
            len(bench.held) >= CONFIRM_MIN_HELD:
        notes.append(f"not re-measured on all samples: {winner.name} leads the default plan by {lead:.2f} dB on the "
                     f"{len(bench.held)} held-back samples (>= {CONFIRM_MARGIN_DB:g} dB)")
    elif winner is not measured[0]:  # confirm on all N samples, as the compile will calibrate
        full_w = bench.measure(winner.plan, winner.name + "-all", "winner on all samples",
                               samples=opts.calib_samples or 10**9)
        full_d = bench.measure(measured[0].plan, "default-all", "default on all samples",
                               samples=opts.calib_samples or 10**9)
        acc_w = full_w.metric if full_w.metric is not None else full_w.sqnr_db
        acc_d = full_d.metric if full_d.metric is not None else full_d.sqnr_db
        notes.append(f"calibrated on all samples: {winner.name} {acc_w:.4g}, default {acc_d:.4g}")
        if acc_w < acc_d and why_not(measured[0], measured[0], cons, bench.float_metric) is None:
            notes.append("the default plan kept: the winner lost to it once calibrated on all samples")
            reason = f"{winner.name} lost to the default plan when calibrated on all samples ({acc_w:.4g} < {acc_d:.4g})"
            winner = measured[0]
    # only measured values that do not depend on timing: same inputs, same file
    header = (f"qcompiler: the measured default's winner '{winner.name}' ({winner.change})\n"
              f"held-back SQNR {fmt_db(winner.sqnr_db)} dB (the default plan: {fmt_db(measured[0].sqnr_db)} dB)\n"
              "reproduce: qcompiler compile MODEL --plan THIS_FILE --calib DATA")
    plan = Plan.from_text(plan_text(winner.plan, header), source=f"<recipe {winner.name}>")
    return RecipeResult(plan=plan, text=plan_text(winner.plan, header), mode="auto", candidates=measured,
                        winner=winner.name, reason=reason, held_samples=len(bench.held), constraints=cons,
                        notes=notes)


def _measure_follow_up(bench: Bench, follow: Candidate, done: dict[str, Measured], progress: Progress | None,
                       step: int, total: int) -> None:
    """Measure the per-token follow-up into ``done``; it is not eligible unless it beats ``dynamic-matmul`` by
    more than :data:`GUARD_MARGIN_DB` (with one row per input the two are the same arithmetic)."""
    if progress:
        progress(f"recipe:{follow.name}", step, total)
    dyn = done["dynamic-matmul"]
    m = bench.measure(follow.plan, follow.name, follow.change)
    m.structural = follow.structural
    if not m.error and m.sqnr_db <= dyn.sqnr_db + GUARD_MARGIN_DB:
        m.error = (f"not above dynamic-matmul by {GUARD_MARGIN_DB:g} dB: its per-tensor scales kept "
                   "(one row per input, or rows of like ranges)")
    done[follow.name] = m
    log.info("recipe: %s %s dB, %d bytes", follow.name, fmt_db(m.sqnr_db), m.bytes)


def _ceiling_ref(measured: list[Measured], cons: Constraints) -> tuple[Measured, str]:
    """What a GPTQ candidate's ceiling is held to (:func:`_measure_with_ceiling`): the best candidate measured so far when
    nothing but accuracy decides (the winner must beat it), else the default plan (``measured[0]``: under a size /
    latency / SQNR constraint a less accurate candidate may win)."""
    unconstrained = cons.optimize == "accuracy" and not cons.timed and cons.budget is None and \
        cons.min_sqnr_db is None
    ok = [m for m in measured if not m.error]
    if not unconstrained or not ok or measured[0].error:
        return measured[0], "the default plan"
    best = max(ok, key=lambda m: m.sqnr_db)  # max keeps the first of equals: the default plan
    return best, "the default plan" if best is measured[0] else f"{best.name}, the best so far"


def _per_token_follow_up(todo: list[Candidate], measured: list[Measured]) -> Candidate | None:
    """The per-token form of ``dynamic-matmul`` (one run-time scale per row instead of per tensor), when the effort
    left it out and ``dynamic-matmul`` measured above the default plan: a model whose MatMul inputs are better
    quantized at run time than calibrated (a transformer with activation outliers) has rows of very different
    ranges. Where per-tensor run-time scales lose to calibration (the ViT, PP-OCR cls) it is not compiled."""
    done = {m.name for m in measured}
    dyn = next((m for m in measured if m.name == "dynamic-matmul"), None)
    if dyn is None or dyn.error or measured[0].error or "per-token-matmul" in done or \
            not dyn.sqnr_db > measured[0].sqnr_db:
        return None
    return next((c for c in todo if c.name == "per-token-matmul"), None)


def _measure_with_ceiling(bench: Bench, plan: Plan, name: str, change: str, ref: tuple[Measured, str] | None,
                          **measure: Any) -> Measured:
    """The candidate measured (``Bench.measure(plan, name, change, **measure)``) — unless its plan runs a
    weight-rounding algorithm that costs seconds per layer (GPTQ): then it is first measured with its weights exact
    (``CompileOptions.exact_weights``: activations rounded and lowered as the candidate's, weights float; no GPTQ),
    and when that ceiling measures more than :data:`CEILING_MARGIN_DB` below ``ref`` — the default plan, or the
    best candidate so far (its name in ``ref[1]``; :func:`_ceiling_ref`) — the candidate cannot reach it whatever
    its weights: it is not compiled, and is returned unmeasured, its error naming the ceiling. A candidate compiled
    after its ceiling counts the ceiling's seconds too. No ceiling with a task metric (decided by the user's
    function, not the score) or without ``ref``."""
    default, what = ref if ref is not None else (None, "")
    ceiling = None
    if default is not None and "gptq" in plan.algorithms and bench.metric is None and not default.error:
        ceiling = bench.measure(plan, name + "-exact-weights", "its activations alone (weights exact)",
                                exact_weights=True)
        if not ceiling.error and ceiling.sqnr_db + CEILING_MARGIN_DB < default.sqnr_db:
            m = Measured(name, change, plan, seconds=ceiling.seconds)
            m.error = (f"not compiled: with its weights exact it measures {fmt_db(ceiling.sqnr_db)} dB, "
                       f"{default.sqnr_db - ceiling.sqnr_db:.2f} dB below {what} (its weight rounding never "
                       f"made up more than {CEILING_MARGIN_DB:g} dB)")
            log.info("recipe: %s %s", name, m.error)
            return m
    m = bench.measure(plan, name, change, **measure)
    if ceiling is not None:
        m.seconds += ceiling.seconds
    return m


def _guard(bench: Bench, base: Plan, progress: Progress | None) -> RecipeResult:
    names = guarded_algorithms(base)
    ups = dynamic_upgrades(base)
    if ups and not set(ir.model_summary(ir.load_model(bench.model, check=False))["ops"]) & set(MATMUL_OPS):
        ups = []  # no MatMul / Gemm: per-token scales and SmoothQuant would change nothing
    bench.latency = False
    bench.keep_outputs = True  # for win_rate
    if not names and not ups:
        return RecipeResult(plan=base, text="", mode="guard", reason="nothing to guard")
    written = bench.measure(unguarded(base), "as-written", "the plan as written")
    measured = [written]
    if ups:  # w8a8-dynamic's kind: per-token scales and SmoothQuant, each kept only where it measures better
        tried = [bench.measure(u.plan, u.name, u.change) for u in ups]
        measured += tried
        best = max((m for m in tried if not m.error), key=lambda m: m.sqnr_db, default=None)
        if best is not None and not written.error and best.sqnr_db > written.sqnr_db + GUARD_MARGIN_DB:
            up = next(u for u in ups if u.name == best.name)
            log.info("%s: algorithm guard: %s measured better than as written on %d held-back sample(s) (%s dB vs "
                     "%s dB)", base.source, up.name, len(bench.held), fmt_db(best.sqnr_db), fmt_db(written.sqnr_db))
            return RecipeResult(plan=Plan.from_dict(up.plan.to_dict(), source=base.source), text="", mode="guard",
                                candidates=measured, winner=best.name, reason=f"{up.change}: measured better",
                                held_samples=len(bench.held),
                                notes=[f"{best.name.removeprefix('with-')} added: {fmt_db(best.sqnr_db)} dB vs "
                                       f"{fmt_db(written.sqnr_db)} dB as written"])
        if not names:
            return RecipeResult(plan=base, text="", mode="guard", candidates=measured, winner=written.name,
                                reason="as written measured at least as good as per-token scales and SmoothQuant",
                                held_samples=len(bench.held))
    dropped: list[str] = []
    for i, name in enumerate(names):
        if progress:
            progress(f"guard:{name}", i, len(names))
        if name == "percentile" and written.calibrated == 0:  # no static range for percentile to change
            m = Measured(f"without-{name}", f"{name} off", base)
            m.error = "not measured: the plan as written calibrates no activation statically (percentile changes nothing)"
            measured.append(m)
            continue
        m = bench.measure(without(base, [name], f"without {name}"), f"without-{name}", f"{name} off")
        measured.append(m)
        if not m.error and not written.error and m.sqnr_db > written.sqnr_db + GUARD_MARGIN_DB:
            dropped.append(name)
    final = written
    notes: list[str] = []
    if len(dropped) == 1:
        final = measured[1 + names.index(dropped[0])]
    elif dropped:  # measured together too: keep the single best drop if the set is not better
        both = bench.measure(without(base, dropped, "without " + "+".join(dropped)), "without-" + "+".join(dropped),
                             "every algorithm that measured worse, off")
        measured.append(both)
        best = max((measured[1 + names.index(n)] for n in dropped), key=lambda m: m.sqnr_db)
        final = both
        if best.sqnr_db > both.sqnr_db:  # an algorithm that measured worse stays on evidence
            # outputs not kept (the set failed, or above measure.KEEP_OUTPUT_BYTES): the pooled scores decide
            rate = bench.win_rate(best, both) if best.outputs is not None and both.outputs is not None else 1.0
            single = best.name.removeprefix("without-")
            kept = [n for n in dropped if n != single]
            if rate >= KEEP_CONFIDENCE:
                dropped, final = [single], best
            else:
                notes.append(f"{', '.join(kept)} dropped too: {best.name} (with {', '.join(kept)}) measured "
                             f"{best.sqnr_db - both.sqnr_db:.2f} dB above {both.name}, but above it on only "
                             f"{rate:.0%} of resampled held-back sets (< {KEEP_CONFIDENCE:.0%})")
                log.info("%s: algorithm guard: %s", base.source, notes[-1])
    if same_precision_as_default(base):  # a w8a8 preset never measures 0.5 dB below the plain default plan
        default = bench.measure(Plan.default(), "default-plan", "the plain default plan")
        measured.append(default)
        if not default.error and final.sqnr_db < default.sqnr_db - PRESET_FLOOR_DB and set(dropped) != set(names):
            all_off = bench.measure(without(base, names, "without all"), "without-all", "every guarded algorithm off")
            measured.append(all_off)
            if all_off.sqnr_db > final.sqnr_db:
                dropped, final = list(names), all_off
        if not default.error and final.sqnr_db < default.sqnr_db - PRESET_FLOOR_DB:
            notes.append(f"still {default.sqnr_db - final.sqnr_db:.2f} dB below the plain default plan with every "
                         "guarded algorithm measured; not an algorithm's doing")
            log.warning("%s: %s", base.source, notes[-1])
    plan = base
    if dropped:
        plan = without(base, dropped, base.source)
        for name in dropped:
            alone = next(m for m in measured if m.name == f"without-{name}")
            log.warning("%s: algorithm guard dropped %s: it measured worse than without it on %d held-back "
                        "sample(s) (%s dB with, %s dB without)", base.source, name, len(bench.held),
                        fmt_db(written.sqnr_db), fmt_db(alone.sqnr_db))
    reason = ("dropped " + ", ".join(dropped)) if dropped else "every algorithm measured at least as good as without"
    return RecipeResult(plan=plan, text="", mode="guard", candidates=measured, winner=final.name, reason=reason,
                        held_samples=len(bench.held), dropped=dropped, notes=notes)
