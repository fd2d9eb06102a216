"""The metrics by name (:data:`METRICS`) and :func:`compute`: build the runner the metric asks for, let it score
every (layer, candidate), and gather the result."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.autoplan.sensitivity.activation_metrics import ActStats, Orthogonality
from qcompiler.autoplan.sensitivity.base import Metric
from qcompiler.autoplan.sensitivity.layers import LayerUnderTest, activation_qparams
from qcompiler.autoplan.sensitivity.output_metrics import HessianTrace, PredictionDifference
from qcompiler.autoplan.sensitivity.result import SensitivityResult
from qcompiler.autoplan.sensitivity.runner import PARTIAL_CUTS, Progress, SensitivityRunner
from qcompiler.core.errors import UserError

#: ``--metric`` name -> metric (in the order the help lists them; ``pd`` the default)
METRICS: dict[str, type[Metric]] = {m.name: m for m in (PredictionDifference, HessianTrace, ActStats, Orthogonality)}


def compute(metric: str, graph: gs.Graph, layers: Sequence[LayerUnderTest], candidates: Sequence[str],
            feeds: Sequence[dict[str, np.ndarray]], *, progress: Progress | None = None, batch_size: int = 8,
            workers: int | None = None, draws: int = 2, seed: int = 0, opset: int = 21,
            activations: bool = True, context: Sequence[int] | None = None,
            range_source: Any = None) -> SensitivityResult:
    """Sensitivity of every (layer, candidate) with ``metric`` (one of :data:`METRICS`). With ``activations``,
    ``pd`` quantizes the layer's input activation as the plan would (``LayerUnderTest.activation``) along with
    its weights, for every candidate but the float one.

    ``context`` (``pd`` only): a plan (candidate index per layer) to measure around instead of the float model —
    every layer quantized as the plan says, and each (layer, candidate) scored by how much switching that one
    layer changes the distortion (negative: better). Used to refine a plan where many coarse layers compound.

    ``range_source``: the data the activation ranges are calibrated on (a CalibrationSource, streamed), as the
    compile will calibrate them — default: ``feeds``.
    """
    kind = METRICS.get(metric)
    if kind is None:
        raise UserError(f"--metric: unknown metric '{metric}' (one of: {', '.join(METRICS)})")
    t0 = time.perf_counter()
    m = kind(layers, candidates, opset=opset, draws=draws, seed=seed)
    extra = m.extra_outputs()
    qparams = (activation_qparams(graph, layers, feeds, opset, range_source)
               if kind.quantizes_activations and activations else None)
    runner = SensitivityRunner(graph, layers, feeds, batch_size=batch_size, workers=workers,
                               extra_outputs=[n for n in extra if n not in {t.name for t in graph.inputs}],
                               activation_qparams=qparams, cuts=PARTIAL_CUTS if kind.partial else 0)
    details: dict[str, Any] = {"batched": runner.batched, "workers": runner.workers,
                               "session_seconds": round(runner.session_seconds, 3)}
    if context is not None and not kind.takes_context:
        raise ValueError("a context plan is only measured with pd")
    scores = m.measure(runner, progress, context)
    details.update(scores.details)
    if runner.segments:
        details["cuts"] = len(runner.segments)
        details["partial_evaluations"] = runner.partial
    return SensitivityResult(metric=metric, layers=[la.name for la in layers], candidates=list(candidates),
                             values=scores.values, noise=scores.noise, signal=runner.signal.copy(),
                             outputs=runner.output_names, output_kinds=[k for k, _ in runner.kinds],
                             samples=runner.samples, batches=len(runner.batches), evaluations=runner.evaluations,
                             seconds=time.perf_counter() - t0, details=details, base_noise=scores.base_noise,
                             runner=runner if kind.keeps_runner else None)
