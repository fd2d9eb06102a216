"""How far an evaluation's outputs are from the float ones: the kind of each graph output (a probability
distribution, a Bernoulli probability, or anything else), the accumulator of one evaluation's distortion, and
Kish's effective sample size of per-sample distortions."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

_SHAPE_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Identity", "Cast"})


def output_kind(name: str, graph: gs.Graph, ref: np.ndarray) -> tuple[str, int | None]:
    """("prob", axis) | ("bernoulli", None) | ("mse", None) for a graph output, from its reference values."""
    x = np.asarray(ref, dtype=np.float64)
    if x.size == 0 or not np.all(np.isfinite(x)):
        return "mse", None
    if x.min() >= -1e-6 and x.max() <= 1.0 + 1e-6:
        axes = list(range(x.ndim))[::-1]
        for ax in axes:
            if x.shape[ax] < 2:
                continue
            s = x.sum(axis=ax)
            if np.all(np.abs(s - 1.0) < 1e-3):
                return "prob", ax
        t = next((o for o in graph.outputs if o.name == name), None)
        seen = 0
        while t is not None and t.inputs and seen < 16:
            prod = t.inputs[0]
            if prod.op == "Sigmoid":
                return "bernoulli", None
            if prod.op not in _SHAPE_OPS:
                break
            t = prod.inputs[0] if prod.inputs else None
            seen += 1
    return "mse", None


class Distortion:
    """Distortion of the outputs of one evaluation against the float outputs, summed over batches."""

    __slots__ = ("count", "metric", "noise", "rows")

    def __init__(self, n_out: int) -> None:
        self.metric = np.zeros(n_out)
        self.count = np.zeros(n_out)
        self.noise = np.zeros(n_out)
        #: per output: the metric's contribution of each sample, in sample order (sums to ``metric``)
        self.rows: list[list[np.ndarray]] = [[] for _ in range(n_out)]


def effective_samples(contrib: np.ndarray) -> float:
    """Kish's effective sample size ``(Σ d)² / Σ d²`` of per-sample distortions ``d`` (n when they are all equal,
    1 when one sample carries everything): how many samples a distortion measurement really rests on."""
    d = np.abs(np.asarray(contrib, dtype=np.float64))
    s2 = float(d @ d)
    return float(d.sum()) ** 2 / s2 if s2 > 0 else float(d.size)
