"""Whole plans measured at once: the ``pd`` distortion and output noise of plans (candidate index per layer) with
every layer quantized as planned — what one-layer-at-a-time sensitivities only add up. Plans that agree on the
layers before a cut share the activations there (prefix sharing over the runner's partial evaluation)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.autoplan.sensitivity.layers import LayerUnderTest, activation_qparams, fake_quantize
from qcompiler.autoplan.sensitivity.runner import PARTIAL_CUTS, Progress, SensitivityRunner


def measure_plans(graph: gs.Graph, layers: Sequence[LayerUnderTest], candidates: Sequence[str],
                  feeds: Sequence[dict[str, np.ndarray]], plans: Sequence[Sequence[int]], *,
                  runner: SensitivityRunner | None = None, workers: int | None = None, batch_size: int = 8,
                  opset: int = 21, progress: Progress | None = None, range_source: Any = None,
                  qparams: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                  base: SensitivityRunner | None = None
                  ) -> tuple[list[tuple[float, np.ndarray]], SensitivityRunner]:
    """The ``pd`` distortion and output noise of whole plans (candidate index per layer), every layer quantized
    at once as planned — what one-layer-at-a-time sensitivities only add up — and the session used. Reuses
    ``runner`` (e.g. the session of a ``pd`` run) when given; else builds one on ``feeds`` with the activation
    ranges ``qparams`` (default: calibrated on ``range_source`` or ``feeds``) — or, given ``base`` (a runner of the
    same graph and layers), on ``feeds`` with ``base``'s session (:meth:`SensitivityRunner.rebound`)."""
    if runner is None and base is not None:
        runner = base.rebound(feeds)
    if runner is None:
        if qparams is None:
            qparams = activation_qparams(graph, layers, feeds, opset, range_source)
        runner = SensitivityRunner(graph, layers, feeds, batch_size=batch_size, workers=workers,
                                   activation_qparams=qparams, cuts=PARTIAL_CUTS if len(plans) > 1 else 0)
    cache: dict[tuple[str, str], list[np.ndarray]] = {}

    def setting(plan: Sequence[int]) -> dict[str, np.ndarray]:
        over: dict[str, np.ndarray] = {}
        for layer, ci in zip(layers, plan):
            cand = candidates[ci]
            spec = layer.specs.get(cand)
            if spec is None:
                continue
            key = (layer.name, cand)
            if key not in cache:
                cache[key] = [fake_quantize(layer.node, w, spec, opset) for w in layer.weights()]
            over.update(zip(runner.inputs_of[layer.name], cache[key]))
            over.update(runner.gates(layer, cand))
        return over

    def job(plan: Sequence[int]) -> Callable[[], tuple[float, np.ndarray]]:
        def run() -> tuple[float, np.ndarray]:
            acc = runner.distortion(setting(plan))
            return runner.score(acc), acc.noise.copy()
        return run

    if not runner.segments or len(plans) < 2:
        return runner.run_jobs([job(p) for p in plans], progress), runner
    # Plans that agree on the layers before a cut share the activations there: some plans (roots) run whole and
    # keep those activations; every other plan starts from its root's at the latest cut before its first
    # layer that differs (layers taken in the order of the first node their settings change).
    order = sorted(range(len(layers)), key=lambda i: runner.layer_start(layers[i]))
    starts = [runner.layer_start(layers[i]) for i in order]
    keys = [tuple(p[i] for i in order) for p in plans]
    roots: list[int] = []
    parent: dict[int, tuple[int, Any]] = {}
    for k in sorted(range(len(plans)), key=lambda k: keys[k]):
        best: tuple[int, Any] | None = None
        for r in roots:
            m = next((i for i, (a, b) in enumerate(zip(keys[k], keys[r])) if a != b), len(order))
            seg = runner.segment_at(starts[m]) if m < len(order) else runner.segments[-1]
            if seg is not None and (best is None or seg[0] > best[1][0]):
                best = (r, seg)
        if best is None:
            roots.append(k)
        else:
            parent[k] = best
    results: list[Any] = [None] * len(plans)
    crossing: dict[int, list[dict[str, np.ndarray]]] = {}

    def root_job(k: int) -> Callable[[], tuple[float, np.ndarray]]:
        def run() -> tuple[float, np.ndarray]:
            acc, crossing[k] = runner.capture(setting(plans[k]))
            return runner.score(acc), acc.noise.copy()
        return run

    def child_job(k: int) -> Callable[[], tuple[float, np.ndarray]]:
        def run() -> tuple[float, np.ndarray]:
            r, seg = parent[k]
            acc = runner.distortion_from(setting(plans[k]), seg, crossing[r])
            return runner.score(acc), acc.noise.copy()
        return run

    children = [k for k in range(len(plans)) if k in parent]
    done = runner.run_jobs([root_job(k) for k in roots], progress, total=len(plans))
    for k, res in zip(roots, done):
        results[k] = res
    done = runner.run_jobs([child_job(k) for k in children], progress, done0=len(roots), total=len(plans))
    for k, res in zip(children, done):
        results[k] = res
    return results, runner
