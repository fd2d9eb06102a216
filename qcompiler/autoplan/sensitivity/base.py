"""The interface every sensitivity metric implements: a :class:`Metric` says how the runner is to be built (graph
cuts, activation quantization, intermediate tensors to expose) and scores every (layer, candidate) over it; the
:class:`Scores` it returns become a :class:`~qcompiler.autoplan.sensitivity.result.SensitivityResult`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from qcompiler.autoplan.sensitivity.layers import LayerUnderTest, quantized_weights
from qcompiler.autoplan.sensitivity.runner import Progress, SensitivityRunner


@dataclass
class Scores:
    """What a metric measured: ``values[l, c]`` (NaN: candidate not allowed), the output noise power
    ``noise[l, c, o]`` where it predicts it, the context plan's own noise (``base_noise``) and metric details."""

    values: np.ndarray
    noise: np.ndarray | None = None
    base_noise: np.ndarray | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Metric:
    """A sensitivity metric over the layers ``layers`` and candidates ``candidates``. ``opset``: the graph's
    opset (fake quantization); ``draws`` / ``seed``: the random draws of a metric that samples (``hessian``)."""

    #: the name ``--metric`` gives it (a key of ``METRICS``)
    name: ClassVar[str] = ""
    #: many evaluations: the runner cuts the graph for partial evaluation (``PARTIAL_CUTS``)
    partial: ClassVar[bool] = False
    #: a layer's input activation is quantized with its weights (the activation ranges are calibrated first)
    quantizes_activations: ClassVar[bool] = False
    #: it can measure around a plan (``context``) instead of the float model
    takes_context: ClassVar[bool] = False
    #: the result keeps the runner (whole plans are measured on the same session afterwards)
    keeps_runner: ClassVar[bool] = False

    def __init__(self, layers: Sequence[LayerUnderTest], candidates: Sequence[str], *, opset: int = 21,
                 draws: int = 2, seed: int = 0) -> None:
        self.layers = list(layers)
        self.candidates = list(candidates)
        self.opset = opset
        self.draws = draws
        self.seed = seed

    def extra_outputs(self) -> list[str]:
        """Intermediate tensors whose float values the metric reads from the runner."""
        return []

    def measure(self, runner: SensitivityRunner, progress: Progress | None,
                context: Sequence[int] | None) -> Scores:
        """Score every (layer, candidate) on ``runner`` (around the plan ``context`` when given)."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------- shared
    def quantized(self, layer: LayerUnderTest, cand: str) -> list[np.ndarray]:
        """``layer``'s weights fake-quantized for ``cand`` (a candidate that quantizes it)."""
        return quantized_weights(layer, cand, self.opset)

    def empty_values(self) -> np.ndarray:
        return np.full((len(self.layers), len(self.candidates)), np.nan)

    def empty_noise(self, runner: SensitivityRunner) -> np.ndarray:
        return np.full((len(self.layers), len(self.candidates), len(runner.output_names)), np.nan)

    def quantizing(self, layer: LayerUnderTest, values_row: np.ndarray,
                   noise_row: np.ndarray | None = None) -> Iterator[tuple[int, str]]:
        """(index, candidate) of each candidate that quantizes ``layer``. A candidate that keeps it float scores 0
        (in ``values_row`` and ``noise_row``); one the layer does not take is skipped (its entries stay NaN)."""
        for ci, cand in enumerate(self.candidates):
            if cand not in layer.specs:
                continue
            if layer.specs[cand] is None:
                values_row[ci] = 0.0
                if noise_row is not None:
                    noise_row[ci] = 0.0
                continue
            yield ci, cand
