"""Data-free activation ranges from BatchNormalization statistics.

:class:`ChannelStats` models a BN output per channel (mean, std); ``fold-batchnorm`` records them
(:func:`bn_statistics`) and :func:`bn_ranges` propagates them through elementwise ops and pooling, evaluated in
numpy on a grid of values per channel, to the ranges ``--calib none`` uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs


@dataclass
class ChannelStats:
    """A per-channel normal model of a tensor whose channels lie on axis 1: mean and standard deviation [C].

    A BatchNormalization output ``y = γ·(x − μ)/√(σ² + ε) + β`` has, per channel, mean β and standard deviation
    |γ|·σ/√(σ² + ε) when its input follows its running statistics. ``fold-batchnorm`` records these before the
    BN disappears (:func:`bn_statistics`); data-free calibration (``--calib none``) and the bias absorption of
    ``equalize`` read them, and passes that rescale a channel keep them up to date.
    """

    mean: np.ndarray  # float64 [C]
    std: np.ndarray  # float64 [C]

    def interval(self, k: float) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (mean − k·std, mean + k·std)."""
        return self.mean - k * self.std, self.mean + k * self.std


#: data-free ranges of BN outputs: mean ± BN_SIGMAS·std per channel (6: clipping hurts more than rounding)
BN_SIGMAS = 6.0

def bn_statistics(ctx: Any) -> dict[str, ChannelStats]:
    """Tensor name -> :class:`ChannelStats` of BatchNormalization outputs recorded in ``ctx.bn_stats`` (a
    CompileContext) by ``fold-batchnorm``; the folded producer keeps the BN's output name, so the key stays valid
    after folding."""
    stats: dict[str, ChannelStats] = ctx.bn_stats
    return stats


#: elementwise functions the data-free range propagation evaluates (numpy, on a grid of input values)
def _hardsigmoid(x: np.ndarray, node: gs.Node) -> np.ndarray:
    alpha = float(node.attrs.get("alpha", 0.2))
    beta = float(node.attrs.get("beta", 0.5))
    return np.clip(alpha * x + beta, 0.0, 1.0)


def _clip_fn(x: np.ndarray, node: gs.Node) -> np.ndarray:
    lo, hi = -np.inf, np.inf
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        lo, hi = float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    vals = [t.values if isinstance(t, gs.Constant) else None for t in node.inputs[1:3]]
    if len(vals) > 0 and vals[0] is not None and np.size(vals[0]) == 1:
        lo = float(np.asarray(vals[0]).reshape(()))
    if len(vals) > 1 and vals[1] is not None and np.size(vals[1]) == 1:
        hi = float(np.asarray(vals[1]).reshape(()))
    return np.clip(x, lo, hi)


_UNARY: dict[str, Callable[[np.ndarray, gs.Node], np.ndarray]] = {
    "Relu": lambda x, n: np.maximum(x, 0.0),
    "LeakyRelu": lambda x, n: np.where(x >= 0, x, float(n.attrs.get("alpha", 0.01)) * x),
    "Clip": _clip_fn,
    "Sigmoid": lambda x, n: 1.0 / (1.0 + np.exp(-x)),
    "Tanh": lambda x, n: np.tanh(x),
    "HardSigmoid": _hardsigmoid,
    "HardSwish": lambda x, n: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "Identity": lambda x, n: x,
    # pooling keeps every output inside the range of its inputs
    "MaxPool": lambda x, n: x,
    "AveragePool": lambda x, n: x,
    "GlobalAveragePool": lambda x, n: x,
    "GlobalMaxPool": lambda x, n: x,
}
_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
}


def bn_ranges(graph: gs.Graph, names: Sequence[str], stats: dict[str, ChannelStats], k: float,
              grid: int = 257) -> dict[str, tuple[float, float]]:
    """Data-free ranges: for each tensor of ``names`` computed from one BN output (statistics in ``stats``) by
    elementwise ops and pooling only — ReLU/Clip/sigmoids/hard-swish, Add/Sub/Mul/Div with scalar or per-channel
    constants, or with another function of the same BN output (as in a decomposed hard-swish
    ``x·clip(x + 3, 0, 6)/6``) — the (lo, hi) over ``mean ± k·std`` per channel: the ops are evaluated on a grid
    of ``grid`` values per channel. Tensors not of that form are left out."""
    tensors = graph.tensors()
    out: dict[str, tuple[float, float]] = {}
    for name in names:
        t = tensors.get(name)
        if t is None:
            continue
        res = _eval_from_bn(t, stats, k, grid, depth=12)
        if res is None:
            continue
        vals = res[1]
        finite = vals[np.isfinite(vals)]
        if finite.size:
            out[name] = (float(finite.min()), float(finite.max()))
    return out


def _eval_from_bn(t: gs.Tensor, stats: dict[str, ChannelStats], k: float, grid: int,
                  depth: int) -> tuple[str, np.ndarray] | None:
    """(root BN tensor, values [C, grid]) of ``t`` as a function of the BN output on its per-channel grid."""
    st = stats.get(t.name)
    if st is not None:
        lo, hi = st.interval(k)
        frac = np.linspace(0.0, 1.0, grid)
        return t.name, lo[:, None] + (hi - lo)[:, None] * frac[None, :]
    if depth <= 0 or not t.inputs:
        return None
    node = t.inputs[0]
    if node.domain not in (None, "", "ai.onnx") or not node.inputs:
        return None
    if node.op in _UNARY and node.outputs[0] is t:
        inner = _eval_from_bn(node.inputs[0], stats, k, grid, depth - 1)
        if inner is None:
            return None
        return inner[0], _UNARY[node.op](inner[1], node)
    if node.op in _BINARY and len(node.inputs) == 2:
        parts: list[tuple[str, np.ndarray] | np.ndarray] = []
        for x in node.inputs:
            if isinstance(x, gs.Constant):
                parts.append(np.asarray(x.values, dtype=np.float64))
            else:
                r = _eval_from_bn(x, stats, k, grid, depth - 1)
                if r is None:
                    return None
                parts.append(r)
        roots = {p[0] for p in parts if isinstance(p, tuple)}
        if len(roots) != 1:
            return None
        c = next(p[1] for p in parts if isinstance(p, tuple)).shape[0]
        args = []
        for p in parts:
            if isinstance(p, tuple):
                args.append(p[1])
            elif p.size == 1:
                args.append(p.reshape(1, 1))
            elif p.size == c and p.ndim >= 2 and (p.shape[0] == c or (p.shape[0] == 1 and p.shape[1] == c)):
                args.append(p.reshape(c, 1))  # [C, 1, ...] / [1, C, 1, ...]: one value per channel of axis 1
            else:
                return None
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return roots.pop(), _BINARY[node.op](args[0], args[1])
    return None
