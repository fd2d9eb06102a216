"""Automatic mixed precision: the most accurate plan that fits a byte, weight-bit or BitOps budget.

``qcompiler plan MODEL --budget SIZE --calib DATA -o plan.yaml`` (and ``qcompiler compile --budget``):

1. **Layers.** The model is prepared as ``compile`` prepares it (the target's pipeline up to and including
   ``resolve-plan``: cleanup, BatchNorm folding, ...); every node the base plan (``--plan``, default W8A8)
   quantizes with a constant weight is a layer to decide. Each candidate (``--candidates``: ``fp32`` keeps the
   layer float, ``int8`` / ``int4`` / ... set the weight dtype, ``binary`` / ``ternary`` / ``shiftN`` the
   low-bit scheme of :mod:`qcompiler.quant.schemes`) is checked per layer against the target; a candidate the
   target supports on no layer is refused with its reason, one unsupported on some layers is dropped there.
2. **Sensitivity** of every (layer, candidate): :mod:`qcompiler.autoplan.sensitivity` (``--metric pd | hessian |
   act-stats | orthogonality``) on the first ``samples`` calibration samples. ``pd`` also gives each sample's
   share of every distortion; when they rest on fewer than :data:`MIN_ESS` effective samples (Kish's
   ``(Σd)²/Σd²``, median over the evaluations — a confident classifier, whose outputs only move on the few
   samples near a decision boundary), they are measured again, once, on :data:`SAMPLE_GROWTH` times the samples
   (at most ``max_samples``). Candidates may fix the weight granularity (``int4/tensor``, ``int8/channel``,
   ``int4/block64``): one scale per tensor costs a few bytes where per-channel scales cost 5 bytes per channel.
3. **Costs**, counted exactly as ``qcompiler inspect --cost`` counts them (:mod:`qcompiler.report.cost`): one probe
   compile per candidate (every layer at that candidate; calibration on one sample — sizes do not depend on the
   calibration values) gives each layer's stored bytes under each candidate; what is left (graph structure,
   activation scales, other ops' tensors) is the float probe's remainder plus, per layer, the candidate's
   extra structure (its probe's remainder minus the float one, shared evenly over the layers it quantized).
   BitOps per layer likewise (MACs at the calibration feed shape × weight bits × activation bits); average
   weight bits from the parameter counts.
4. **Allocation**: multiple-choice knapsack over the sensitivities (:mod:`qcompiler.autoplan.knapsack`: exact DP over
   the discretized budget, costs rounded up; or ``--solver lagrange``), minimizing the summed sensitivity;
   plus the whole Pareto front.
5. **Verification**: the plan is compiled the same way and measured with :func:`qcompiler.report.cost.model_cost`;
   if it does not fit (the additive model is a few bytes off for a mixed plan), the budget given to the
   solver is lowered by the excess and the plan re-solved, so the written plan never exceeds the budget.

Budgets (:class:`Budget`): bytes of the output files (``4000000``, ``4MB`` — KB/MB/GB are 1024-based, as in
``inspect``), a fraction of the float model's bytes (``25%``), average weight bits (``4.5bits``), or with
``--bitops`` BitOps (``1.5G`` — k/M/G/T decimal — or ``50%`` of the float model's BitOps).

The plan written is an ordinary plan file: the base plan's defaults and rules, then one rule per layer
matched by ``name``, each preceded by a comment with the layer's sensitivity and bytes for every candidate.

Modules, by job: :mod:`~qcompiler.autoplan.budget` (budget and candidates), :mod:`~qcompiler.autoplan.result`
(options and results), :mod:`~qcompiler.autoplan.prepare` (layers 1., feeds), :mod:`~qcompiler.autoplan.plans`
(plan text), :mod:`~qcompiler.autoplan.probes` (costs 3., probe and measuring compiles),
:mod:`~qcompiler.autoplan.search` (2., 4., 5.), :mod:`~qcompiler.autoplan.output` (plan, CSV and SVG files);
:mod:`~qcompiler.autoplan.baseline` (the measured presets, searches and guard around them) and
:mod:`~qcompiler.autoplan.activations` (16-bit activations where a layer runs float anyway).
"""


from __future__ import annotations

from qcompiler.autoplan import knapsack, sensitivity
from qcompiler.autoplan.baseline import HOLDOUT, Holdout, auto_plan, make_holdout, plan_for_compile
from qcompiler.autoplan.budget import BUDGET_KINDS, DEFAULT_CANDIDATES, Budget, Candidate, parse_candidates
from qcompiler.autoplan.output import front_csv, front_svg, measure_front, write_front, write_plan
from qcompiler.autoplan.plans import layer_rules, plan_text, text_for_choice
from qcompiler.autoplan.prepare import Prepared, calib_source, first_feeds, load_feeds, prepare
from qcompiler.autoplan.probes import measure_sqnr, output_quant, weight_owners
from qcompiler.autoplan.result import AutoPlanResult, FrontPoint, LayerInfo, PlanOptions, Progress
from qcompiler.autoplan.search import (
    MAX_ROUNDS,
    MIN_ESS,
    SAMPLE_GROWTH,
    SOLVERS,
    _solve,
    measure_sensitivity,
    search_plan,
)

__all__ = [
    "BUDGET_KINDS", "DEFAULT_CANDIDATES", "HOLDOUT", "MAX_ROUNDS", "MIN_ESS", "SAMPLE_GROWTH", "SOLVERS",
    "AutoPlanResult", "Budget", "Candidate", "FrontPoint", "Holdout", "LayerInfo", "PlanOptions", "Prepared",
    "Progress", "_solve", "auto_plan", "calib_source", "first_feeds", "front_csv", "front_svg", "knapsack",
    "layer_rules", "load_feeds", "make_holdout", "measure_front", "measure_sensitivity", "measure_sqnr",
    "output_quant", "parse_candidates", "plan_for_compile", "plan_text", "prepare", "search_plan", "sensitivity",
    "text_for_choice", "weight_owners", "write_front", "write_plan",
]
