"""The metrics measured on the model's outputs, by evaluations with changed weights on the runner (partial
evaluation applies): ``pd`` (PD-Quant's prediction difference: each (layer, candidate) quantized alone, or
switched alone around a plan) and ``hessian`` (HAWQ-V2's Hessian trace, estimated Hutchinson-style from forward
passes with Rademacher-perturbed weights). Both also give the output noise power each (layer, candidate) adds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from qcompiler.autoplan.sensitivity.base import Metric, Scores
from qcompiler.autoplan.sensitivity.distortion import Distortion, effective_samples
from qcompiler.autoplan.sensitivity.layers import LayerUnderTest
from qcompiler.autoplan.sensitivity.runner import Progress, SensitivityRunner

#: Hutchinson perturbation size, relative to the rms of the weight
HESSIAN_EPS = 0.02


def _delta2(w: list[np.ndarray], q: list[np.ndarray]) -> float:
    return sum(float(((a.astype(np.float64) - b) ** 2).sum()) for a, b in zip(w, q))


class PredictionDifference(Metric):
    """``pd``: the output distortion of each (layer, candidate) quantized alone — its weights, and its input
    activation (and the outputs the target quantizes with it) as the plan would. Around a plan (``context``):
    every layer as the plan says, and the change of the distortion when that one layer switches."""

    name = "pd"
    partial = True
    quantizes_activations = True
    takes_context = True
    keeps_runner = True

    def measure(self, runner: SensitivityRunner, progress: Progress | None,
                context: Sequence[int] | None) -> Scores:
        layers, candidates = self.layers, self.candidates
        values = self.empty_values()
        noise = self.empty_noise(runner)
        details: dict[str, Any] = {}

        def setting(layer: LayerUnderTest, cand: str) -> dict[str, np.ndarray]:
            if layer.specs[cand] is None:
                return {}
            over = dict(zip(runner.inputs_of[layer.name], self.quantized(layer, cand)))
            over.update(runner.gates(layer, cand))
            return over

        around: dict[str, np.ndarray] = {}
        around_crossing: list[dict[str, np.ndarray]] = []
        base_score = 0.0
        base_noise: np.ndarray | None = None
        if context is not None:
            for li, layer in enumerate(layers):
                around.update(setting(layer, candidates[context[li]]))
            # the context plan's own activations at the cuts: a change of one layer starts at the cut before it
            acc0, around_crossing = runner.capture(around)
            base_score, base_noise = runner.score(acc0), acc0.noise.copy()
        jobs: list[Callable[[], Any]] = []
        slots: list[tuple[int, int]] = []
        for li, layer in enumerate(layers):
            for ci, cand in enumerate(candidates):
                if cand not in layer.specs:
                    continue
                if context is not None and ci == context[li]:
                    values[li, ci] = 0.0
                    noise[li, ci] = 0.0
                    continue
                if context is None and layer.specs[cand] is None:
                    values[li, ci] = 0.0
                    noise[li, ci] = 0.0
                    continue

                def pd_job(layer: LayerUnderTest = layer, cand: str = cand) -> Distortion:
                    over = dict(around)
                    for name in runner.names_of(layer):
                        over.pop(name, None)  # this layer back to float, then to the candidate
                    over.update(setting(layer, cand))
                    seg = runner.segment_at(runner.layer_start(layer)) if context is not None else None
                    if seg is not None:
                        return runner.distortion_from(over, seg, around_crossing)
                    return runner.distortion(over)

                jobs.append(pd_job)
                slots.append((li, ci))
        ess: list[float] = []
        for (li, ci), acc in zip(slots, runner.run_jobs(jobs, progress)):
            values[li, ci] = runner.score(acc) - base_score
            noise[li, ci] = acc.noise - (base_noise if base_noise is not None else 0.0)
            if context is None:
                ess.append(effective_samples(runner.sample_scores(acc)))
        if ess:
            details["ess"] = float(np.median(ess))
        return Scores(values, noise, base_noise, details)


class HessianTrace(Metric):
    """``hessian``: the average Hessian trace of the output distortion with respect to each layer's weights
    (``draws`` Rademacher draws per layer), times the candidate's ‖Q(W) − W‖²; its cost does not grow with the
    number of candidates."""

    name = "hessian"
    partial = True

    def measure(self, runner: SensitivityRunner, progress: Progress | None,
                context: Sequence[int] | None) -> Scores:
        layers, draws, seed = self.layers, self.draws, self.seed
        values = self.empty_values()
        noise = self.empty_noise(runner)
        jobs: list[Callable[[], Any]] = []
        for li, layer in enumerate(layers):
            ws = layer.weights()
            for d in range(draws):
                def h_job(li: int = li, layer: LayerUnderTest = layer, ws: list[np.ndarray] = ws, d: int = d) -> Any:
                    rng = np.random.default_rng([seed, li, d])
                    pert = []
                    h2n = 0.0
                    for w in ws:
                        h = HESSIAN_EPS * float(np.sqrt(np.mean(w.astype(np.float64) ** 2)) or 1e-8)
                        v = rng.integers(0, 2, size=w.shape).astype(np.float32) * 2.0 - 1.0
                        pert.append((w + np.float32(h) * v).astype(np.float32))
                        h2n += h * h * w.size
                    acc = runner.distortion(dict(zip(runner.inputs_of[layer.name], pert)))
                    return runner.score(acc), acc.noise, h2n

                jobs.append(h_job)
        results = runner.run_jobs(jobs, progress)
        trace: list[float] = []
        for li, layer in enumerate(layers):
            draws_out = results[li * draws:(li + 1) * draws]
            d_mean = float(np.mean([r[0] for r in draws_out]))
            n_mean = np.mean([r[1] for r in draws_out], axis=0)
            h2n = draws_out[0][2]
            trace.append(2.0 * d_mean / max(h2n, 1e-300))
            ws = layer.weights()
            for ci, cand in self.quantizing(layer, values[li], noise[li]):
                dw2 = _delta2(ws, self.quantized(layer, cand))
                values[li, ci] = d_mean * dw2 / max(h2n, 1e-300)
                noise[li, ci] = n_mean * dw2 / max(h2n, 1e-300)
        return Scores(values, noise, details={"trace_per_param": dict(zip([la.name for la in layers], trace))})
