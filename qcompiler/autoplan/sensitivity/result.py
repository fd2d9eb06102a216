"""What a sensitivity measurement gives: the sensitivity of every (layer, candidate), the output noise each adds
where the metric predicts it, and the worst-output SQNR predicted for a whole plan from those noise powers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qcompiler.autoplan.sensitivity.runner import SensitivityRunner


@dataclass
class SensitivityResult:
    """``values[l, c]``: sensitivity of layer l under candidate c (NaN: candidate not allowed for the layer);
    ``noise[l, c, o]``: predicted output noise power Σ(y − ŷ)² added on output o (``pd`` / ``hessian`` only);
    ``signal[o]``: Σ y² of output o over the same samples."""

    metric: str
    layers: list[str]
    candidates: list[str]
    values: np.ndarray
    noise: np.ndarray | None
    signal: np.ndarray | None
    outputs: list[str]
    output_kinds: list[str]
    samples: int
    batches: int
    evaluations: int
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    #: ``pd`` measured around a plan (``context``): that plan's own noise per output; ``values`` / ``noise``
    #: are then the changes from it (the context's own choice 0)
    base_noise: np.ndarray | None = None
    #: the session the values were measured with (``pd``), kept for :func:`measure_plans`
    runner: SensitivityRunner | None = field(default=None, repr=False, compare=False)

    def predicted_sqnr_db(self, choice: Sequence[int]) -> float | None:
        """Worst-output SQNR predicted for a plan (candidate index per layer) by adding the noise powers."""
        if self.noise is None or self.signal is None:
            return None
        total = np.zeros(len(self.outputs)) if self.base_noise is None else self.base_noise.astype(np.float64).copy()
        picked = self.noise[np.arange(len(choice)), np.asarray(choice, dtype=np.int64)]
        for n in picked[np.all(np.isfinite(picked), axis=1)]:
            total += n
        worst = math.inf
        for o in range(len(self.outputs)):
            if total[o] <= 0:
                continue
            worst = min(worst, 10.0 * math.log10(max(float(self.signal[o]), 1e-300) / float(total[o])))
        return worst

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric, "samples": self.samples, "batches": self.batches,
            "evaluations": self.evaluations, "seconds": round(self.seconds, 3),
            "outputs": [{"name": n, "kind": k} for n, k in zip(self.outputs, self.output_kinds)],
            "layers": {name: {c: (None if not np.isfinite(self.values[li, ci]) else float(self.values[li, ci]))
                              for ci, c in enumerate(self.candidates)} for li, name in enumerate(self.layers)},
        }
