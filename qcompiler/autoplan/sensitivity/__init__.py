"""Per-layer, per-candidate quantization sensitivity from forward passes only (no gradients, no labels).

The planner (:mod:`qcompiler.autoplan`) asks, for every quantizable layer *l* and candidate *c* (int8, int4,
ternary, ...): how much does the model's output suffer when only *l* is quantized with *c*? Four metrics:

``pd`` (PD-Quant's prediction difference; the default)
    Quantize that one layer's weights with the candidate (exactly as ``insert-qdq`` would: :func:`fake_quantize`),
    run the model on the calibration batch, measure the change of the final outputs against the float
    outputs: KL(p_float ‖ p_quant) for outputs that are probabilities (values in [0, 1] summing to 1 along an
    axis: categorical KL along it; a Sigmoid output: Bernoulli KL), ``Σ(y − ŷ)² / Σ y²`` (relative MSE)
    otherwise, summed over the graph outputs.
``hessian`` (HAWQ-V2 without gradients)
    The average Hessian trace of that same output distortion D with respect to the layer's weights, estimated
    Hutchinson-style from forward passes: for Rademacher draws v (entries ±1), D(W + h·v) ≈ ½h²·vᵀHv and
    E[vᵀHv] = Tr(H), so Tr(H)/n ≈ 2·mean D / (h²·n), with h = 0.02·rms(W). The sensitivity of a candidate is
    ½·Tr(H)/n · ‖Q(W) − W‖² (same units as ``pd``); its cost does not grow with the number of candidates.
``act-stats`` (myQASR: label-free, from float activation statistics only)
    One float pass. Layer statistic: the median |y| of the layer's output (normalized by its mean over the
    layers), times the candidate's relative error of the layer output under the diagonal input second
    moments ``E[x_i²]``: ``Σ ΔW² · E[x²] / Σ W² · E[x²]`` (ΔW = Q(W) − W, summed over each weight's input-channel
    axis).
``orthogonality`` (OMPQ: network orthogonality)
    One float pass on a small batch. Each layer's output features per sample (flattened — a fixed subset of at
    most 4096 coordinates — when every sample has the same shape, else averaged over all but the channel axis)
    give a Gram matrix G_l = X_l·X_lᵀ; ORM(i, j) = ‖X_jᵀX_i‖²_F / (‖X_iᵀX_i‖_F·‖X_jᵀX_j‖_F) = tr(G_iG_j) /
    (‖G_i‖_F‖G_j‖_F). A layer little correlated with the others carries information nothing else does: its
    importance θ_l = exp(−mean_{j≠l} ORM(l, j)) (OMPQ's monotonically decreasing function); the sensitivity of a
    candidate is θ_l · ‖Q(W) − W‖² / ‖W‖².

Speed: ONE onnxruntime session for everything — the float graph in which the weights of every layer under
test are graph *inputs* (built with graphsurgeon), so a candidate is evaluated by feeding its dequantized
weights, never by rebuilding a session. The float outputs are computed once and reused; samples of the same
shape are stacked into batches when the model is batch-safe (checked numerically); independent evaluations run
concurrently on the shared session (one onnxruntime thread each). **Partial evaluation** (``pd`` / ``hessian``,
:data:`PARTIAL_CUTS`): the topologically sorted graph is cut before up to that many layers spread over the
layer order; the float tensors crossing each cut are fetched with the reference run, and one session per cut
runs the nodes after it — an evaluation whose settings change nothing before a cut starts there (exact: the
nodes before it see the float inputs). Around a plan (``context``) and between whole plans
(:func:`measure_plans`) the same holds with a plan's own activations at the cut, for settings that agree with
that plan on every input read before the cut. ``pd`` and ``hessian`` also give the output
noise power each (layer, candidate) adds, from which the planner predicts the output SQNR of a whole plan.
``pd`` keeps each sample's share of every distortion and reports the median Kish effective sample size
``(Σd)²/Σd²`` over its evaluations (``details["ess"]``): how many samples the measurement really rests on.
Progress goes to a callback; nothing is printed.

Layout: :mod:`.runner` (the session, batches, float reference, partial evaluation; :mod:`.graph_cuts`,
:mod:`.distortion`), :mod:`.layers` (the layers under test, fake quantization, activation ranges), the metrics
(:mod:`.base` their interface, :mod:`.output_metrics` ``pd`` / ``hessian``, :mod:`.activation_metrics`
``act-stats`` / ``orthogonality``, :mod:`.metrics` the table and :func:`compute`), :mod:`.plans` (whole plans,
:func:`measure_plans`) and :mod:`.result`. This module re-exports their public names.
"""

from __future__ import annotations

from qcompiler.autoplan.sensitivity.activation_metrics import (
    MEDIAN_SAMPLES,
    ORM_FEATURES,
    ActStats,
    Orthogonality,
)
from qcompiler.autoplan.sensitivity.base import Metric, Scores
from qcompiler.autoplan.sensitivity.distortion import Distortion, effective_samples, output_kind
from qcompiler.autoplan.sensitivity.layers import LayerUnderTest, activation_qparams, fake_quantize
from qcompiler.autoplan.sensitivity.metrics import METRICS, compute
from qcompiler.autoplan.sensitivity.output_metrics import HESSIAN_EPS, HessianTrace, PredictionDifference
from qcompiler.autoplan.sensitivity.plans import measure_plans
from qcompiler.autoplan.sensitivity.result import SensitivityResult
from qcompiler.autoplan.sensitivity.runner import PARTIAL_CUTS, PARTIAL_MAX_BYTES, Progress, SensitivityRunner

__all__ = [
    "HESSIAN_EPS", "MEDIAN_SAMPLES", "METRICS", "ORM_FEATURES", "PARTIAL_CUTS", "PARTIAL_MAX_BYTES", "ActStats",
    "Distortion", "HessianTrace", "LayerUnderTest", "Metric", "Orthogonality", "PredictionDifference", "Progress",
    "Scores", "SensitivityResult", "SensitivityRunner", "activation_qparams", "compute", "effective_samples",
    "fake_quantize", "measure_plans", "output_kind",
]
