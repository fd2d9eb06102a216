"""The planner's scale step: a layer moved, alone, to finer int4 blocks with float16 scales, measured.

``scale: float16`` halves the bytes of block-wise scales, so a layer may take 32-wide blocks at about the bytes of
its per-channel int4 codes (``int4/block32/sym/f16``: the ``/f16`` twin of the searches' ``int4/block32/sym``). The
searches choose from round-to-nearest sensitivities, which can rate such a move far below what it measures: on
silero-vad the LSTM at ``int4/block32/sym/f16`` (rest uniform w4a8) predicts 0.0694 against 0.0718 at the
preset's per-channel int4 — nothing — and measures 7.18 dB on the held-back samples against 2.83, 268 bytes under
the budget; the knapsack's plans (with float16-scale candidates in its lists: tried, session 10) change several
layers at once and measured worse (0.32 dB), and on PP-OCR cls the union knapsack with them measured 42.7 dB held
back where session 9's lists gave 47.2. So the searches keep their float32-scale block candidates and the float16
ones are tried here, one layer at a time.

So, after the searches, :func:`scale_step` tries each of the first :data:`MAX_TRIES` single moves of
:func:`moves` on the chosen plan (the largest layers first: where finer blocks cost the most bytes and float16
scales save the most; a move only where its sensitivity does not predict it worse than the layer's current
precision), each compiled for real and measured on the held-back samples; the best that fits the budget and beats
the chosen plan by the guard's rule (:meth:`~qcompiler.autoplan.holdout.Measured.beats`) replaces it. It runs
after the 16-bit activation step, on the plan that step returns (widened or not): run before it, a kept move
raised the bar a widened mix had to clear (PP-OCR cls: a move on w4a8, 42.67 dB held back, kept the mix widened,
48.05, out by 0.17 dB on one half — 23.87 dB on eval instead of 39.74).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qcompiler.autoplan.activations import Widening, widened_text
from qcompiler.autoplan.budget import parse_candidates
from qcompiler.autoplan.result import AutoPlanResult, PlanOptions, Progress
from qcompiler.core.errors import UserError
from qcompiler.plan import Plan

log = logging.getLogger("qcompiler.autoplan")

#: single-layer moves compiled and measured at most (each one real compile and two validations)
MAX_TRIES = 3
#: what the step tries: the candidates whose scales are float16 (``/f16``)
SUFFIX = "/f16"


@dataclass
class Move:
    layer: str
    candidate: str
    rule: dict[str, Any]


@dataclass
class ScaleStep:
    """What :func:`scale_step` tried; ``plan`` / ``measured`` the move kept (``kept``)."""

    info: dict[str, Any] = field(default_factory=lambda: {"tried": 0})
    kept: bool = False
    plan: Plan | None = None
    measured: Any = None
    move: Move | None = None

    def apply(self, result: AutoPlanResult, data: str) -> None:
        """The kept move written into ``result``: its rule appended to the text, the measurement recorded. A move
        on the uniform base leaves ``result.uniform`` as it is: the plan is still the base (with one layer's
        scales changed), and ``result.choice`` / ``verified`` still describe the mixed plan it beat."""
        result.baseline["scales"] = self.info
        if not self.kept or self.move is None:
            return
        m = self.measured
        comment = (f"{self.move.layer} at {self.move.candidate} (float16 scales, finer blocks): measured: output "
                   f"SQNR {m.sqnr_db:.2f} dB (compiled, onnxruntime on {data}), {m.cost.total_bytes} bytes")
        result.text = widened_text(result.text, Widening([], [self.move.rule]), comment)
        result.measured = {**result.measured, "sqnr_db": m.sqnr_db, "halves_db": list(m.halves),
                           "bytes": m.cost.total_bytes,
                           "without_scales": {"sqnr_db": result.measured.get("sqnr_db"),
                                              "bytes": result.measured.get("bytes")}}


def f16_columns(names: list[str]) -> list[tuple[str, int]]:
    """The ``/f16`` block candidates the step may try, each with the sensitivity column that predicts it: a
    ``/f16`` candidate's own, or for a block-wise float32-scale candidate (``int4/block32/sym``) its ``/f16`` twin
    with the float32 one's column (the same grid but for the float16 rounding of its scales: at most 2^-10)."""
    out: list[tuple[str, int]] = []
    for i, c in enumerate(names):
        if c.endswith(SUFFIX):
            out.append((c, i))
        elif "/block" in c and c + SUFFIX not in names:
            out.append((c + SUFFIX, i))
    return out


def moves(result: AutoPlanResult, uniform: bool) -> list[Move]:
    """The single-layer moves to a ``/f16`` block candidate the step tries, in order (see the module doc): from the
    base plan's own weight dtype (``uniform``) or the mixed plan's choice; none where the sensitivity has no value
    for the candidate (not allowed there), where it predicts the move worse than the layer's current precision, or
    where the layer already has that grid."""
    sens = result.union_sensitivity or result.sensitivity
    names = list(sens.candidates)
    f16 = f16_columns(names)
    if not f16:
        return []
    order = sorted(range(len(result.layers)), key=lambda i: (-result.layers[i].params, i))
    out: list[Move] = []
    for li in order:
        la = result.layers[li]
        if la.name not in sens.layers:
            continue
        si = sens.layers.index(la.name)
        cur = str(la.base_weight.get("dtype")) if uniform else result.candidates[result.choice[li]]
        if uniform and la.base_weight.get("scale") == "float16":
            continue
        cur_v = sens.values[si, names.index(cur)] if cur in names else math.nan
        row = sorted(f16, key=lambda t: float(sens.values[si, t[1]]) if np.isfinite(sens.values[si, t[1]])
                     else math.inf)
        for c, col in row:
            v = sens.values[si, col]
            if c == cur or names[col] == cur or not np.isfinite(v) or (np.isfinite(cur_v) and v > cur_v):
                continue
            out.append(Move(la.name, c, {"match": {"name": la.name}, "weight": parse_candidates(c)[0].keys()}))
    return out


def with_rule(plan: Plan, rule: dict[str, Any]) -> Plan:
    d = plan.to_dict()
    return Plan.from_dict({**d, "rules": [*d.get("rules", []), rule]}, source=plan.source)


def scale_step(start: tuple[Plan, Any], result: AutoPlanResult, uniform: bool, opts: PlanOptions,
               budget_value: float, unit: str, progress: Progress | None,
               measure: Callable[[Plan, str, str], Any]) -> ScaleStep:
    """Try :func:`moves` on ``start`` (the chosen plan and its measurement), ``measure(plan, tag, label)``
    compiling and measuring each; the best that fits and beats ``start`` is kept."""
    plan, start_m = start
    step = ScaleStep()
    if not opts.default_candidates or not math.isfinite(start_m.sqnr_db):
        return step
    todo = moves(result, uniform)[:MAX_TRIES]
    tries: list[dict[str, Any]] = []
    for k, mv in enumerate(todo):
        if progress:
            progress("float16 scales (one layer, finer blocks)", k, len(todo))
        try:
            cand = with_rule(plan, mv.rule)
            m = measure(cand, f"scale{k}", f"{mv.layer} at {mv.candidate}")
        except UserError as e:  # the target refuses it: nothing to try there
            log.info("plan: %s at %s left out: %s", mv.layer, mv.candidate, e)
            continue
        fits = m.amount(unit) <= budget_value
        kept = fits and m.eligible and m.beats(start_m)
        log.info("plan: %s at %s: measured %.2f dB (chosen plan %.2f dB), %d bytes%s", mv.layer, mv.candidate,
                 m.sqnr_db, start_m.sqnr_db, m.cost.total_bytes, " (over the budget)" if not fits else "")
        tries.append({"layer": mv.layer, "candidate": mv.candidate, "sqnr_db": m.sqnr_db, "halves_db": list(m.halves),
                      "win_rate": m.win_rate(start_m), "bytes": m.cost.total_bytes, "fits": fits, "beats": kept})
        if kept and (step.measured is None or m.sqnr_db > step.measured.sqnr_db):
            step.kept, step.plan, step.measured, step.move = True, cand, m, mv
    if progress and todo:
        progress("float16 scales (one layer, finer blocks)", len(todo), len(todo))
    step.info = {"tried": len(tries), "tries": tries, "kept": step.move.layer + " " + step.move.candidate
                 if step.move else None}
    return step
