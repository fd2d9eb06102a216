"""calib-select: pick N calibration samples that cover the activation distribution (``--calib-select N``).

Following the calibration-sample selection of EDA-DM (Liu et al. 2024), samples are chosen for **density**
(typical inputs, where most of the distribution lies) and **diversity** (spread over it, not N near-copies),
measured on a cheap feature of each sample:

1. *feature* (one vector per sample, the float graph run once over the whole pool, streaming):
   ``feature=ranges`` (default) — log10 max|t| of every activation tensor the plan quantizes, i.e. what the
   calibrated ranges are made of; ``feature=penultimate`` — the input of the last Conv / Gemm / MatMul,
   average-pooled over every axis but the channel one (axis 1 for Conv inputs, the last axis otherwise), as
   EDA-DM uses; or ``feature=TENSOR`` pooled the same way;
2. the vectors are standardized per dimension and, beyond 64 dimensions, projected on their 64 principal
   components;
3. *density*: a Gaussian kernel density estimate per sample (bandwidth: the median pairwise distance);
4. *greedy selection*: the densest sample first, then repeatedly the sample maximizing
   ``λ·density + (1 − λ)·diversity`` (λ = ``density_weight``): density scaled to [0, 1], diversity the distance
   to the nearest selected sample in units of twice the bandwidth, capped at 1 (so a lone far outlier counts
   no more than a whole unrepresented mode, and density breaks the tie).

``ctx.calib`` becomes the pool restricted to the chosen samples (kept in their original order), so every later
consumer of calibration data (smooth, calibrate, gptq, bias-correct) sees the selection. Memory: one feature
vector per pool sample. Deterministic. Needs real calibration data (a pool); the graph is not changed.

Stats: ``pool``, ``selected``; ``ctx.report["calib_select"]`` lists the chosen sample indices.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.pass_base import Pass, PassResult
from qcompiler.ir.graph import is_onnx_op

from ._stream import stream

log = logging.getLogger(__name__)

#: features are projected on at most this many principal components
MAX_DIMS = 64


@dataclass
class Options:
    n: int = 64  # samples to keep
    feature: str = "ranges"  # ranges | penultimate | the name of a tensor to average-pool
    density_weight: float = 0.5  # λ: weight of density against diversity

    def validate(self, pass_name: str = "calib-select") -> None:
        if self.n <= 0:
            raise UserError(f"pass '{pass_name}' option 'n': must be a positive integer, got {self.n}")
        if not 0.0 <= self.density_weight <= 1.0:
            raise UserError(f"pass '{pass_name}' option 'density-weight': must be in [0, 1], got "
                            f"{self.density_weight}")


class CalibSelectPass(Pass):
    """Choose N representative calibration samples (density + diversity of a per-sample activation feature)."""

    name = "calib-select"
    Options = Options
    produces = frozenset({"calib-selected"})

    def run(self, ctx: CompileContext) -> PassResult:
        opts: Options = self.options
        opts.validate(self.name)
        stats: Counter[str] = Counter()
        if ctx.calib is None or ctx.calib.synthetic:
            raise UserError("calib-select: needs real calibration data to choose from (--calib DIR|FILE.npz)")
        pool = len(ctx.calib)
        stats["pool"] = pool
        if "calib-selected" in ctx.properties or pool <= opts.n:
            stats["selected"] = min(pool, opts.n)
            if pool <= opts.n:
                log.info("calib-select: the pool has %d samples, no more than %d: all kept", pool, opts.n)
            return PassResult(False, stats)
        if opts.feature == "ranges":
            name = "ranges"
            feats = self._range_features(ctx)
        else:
            name, axis = self._feature(ctx)
            feats = self._features(ctx, name, axis)
        chosen = select(feats, opts.n, opts.density_weight)
        ctx.calib = ctx.calib.subset(chosen)
        stats["selected"] = len(chosen)
        ctx.report["calib_select"] = {"pool": pool, "selected": len(chosen), "feature": name,
                                      "indices": [int(i) for i in chosen]}
        return PassResult(False, stats)

    def _range_features(self, ctx: CompileContext) -> np.ndarray:
        """Per sample: log10 max|t| of every activation tensor the plan quantizes (what its ranges are made of)."""
        assert ctx.calib is not None
        names = sorted(ctx.activation_specs)
        if not names:
            raise UserError("calib-select: feature 'ranges' needs quantized activations (run it after resolve-plan "
                            "with a plan that quantizes activations), or give feature=penultimate")
        rows: list[np.ndarray] = []

        def consume(values: dict[str, np.ndarray]) -> None:
            rows.append(np.asarray([np.log10(float(np.abs(values[n]).max(initial=0.0)) + 1e-12) for n in names]))

        stream(ctx.graph, names, ctx.calib, consume)
        return np.stack(rows)

    def _feature(self, ctx: CompileContext) -> tuple[str, int]:
        tensors = ctx.graph.tensors()
        if self.options.feature != "penultimate":
            t = tensors.get(self.options.feature)
            if t is None or isinstance(t, gs.Constant):
                raise UserError(f"calib-select: option 'feature': no activation tensor named "
                                f"'{self.options.feature}' in the graph")
            reader = next((n for n in t.outputs if is_onnx_op(n, "Conv")), None)
            return t.name, 1 if reader is not None else -1
        for node in reversed(ctx.graph.nodes):
            if is_onnx_op(node, "Conv", "Gemm", "MatMul") and len(node.inputs) > 1 and \
                    isinstance(node.inputs[1], gs.Constant) and not isinstance(node.inputs[0], gs.Constant):
                return node.inputs[0].name, 1 if node.op == "Conv" else -1
        raise UserError("calib-select: the graph has no Conv / Gemm / MatMul to take features from; "
                        "give the pass option feature=TENSOR")

    def _features(self, ctx: CompileContext, name: str, axis: int) -> np.ndarray:
        assert ctx.calib is not None
        rows: list[np.ndarray] = []

        def consume(values: dict[str, np.ndarray]) -> None:
            v = np.asarray(values[name], dtype=np.float64)
            if v.ndim == 0:
                rows.append(v.reshape(1))
                return
            a = np.moveaxis(v, axis, 0) if v.ndim > 1 else v[:, None]
            rows.append(a.reshape(a.shape[0], -1).mean(axis=1))

        stream(ctx.graph, [name], ctx.calib, consume)
        width = {r.shape[0] for r in rows}
        if len(width) != 1:
            raise UserError(f"calib-select: feature tensor '{name}' has a varying channel count across samples")
        return np.stack(rows)


def _standardize(f: np.ndarray) -> np.ndarray:
    f = f - f.mean(axis=0)
    sd = f.std(axis=0)
    keep = sd > 1e-12 * max(float(sd.max(initial=0.0)), 1e-300)
    f = f[:, keep] / sd[keep] if np.any(keep) else np.zeros((f.shape[0], 1))
    if f.shape[1] > MAX_DIMS:
        u, sv, _ = np.linalg.svd(f, full_matrices=False)
        f = u[:, :MAX_DIMS] * sv[:MAX_DIMS]
    return f


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def select(features: np.ndarray, n: int, density_weight: float = 0.5, chunk: int = 1024) -> list[int]:
    """Indices (sorted) of ``n`` rows of ``features`` [P, D] chosen for density and diversity (see module doc)."""
    p = features.shape[0]
    if n >= p:
        return list(range(p))
    f = _standardize(np.asarray(features, dtype=np.float64))
    # bandwidth: median pairwise distance (on a deterministic subsample for large pools)
    sub = f[:: max(1, p // 512)]
    d_sub = np.sqrt(_sq_dists(sub, sub))
    iu = np.triu_indices(sub.shape[0], k=1)
    h = float(np.median(d_sub[iu])) if iu[0].size else 1.0
    h = h if h > 0 else 1.0
    density = np.zeros(p)
    for i in range(0, p, chunk):
        density[i:i + chunk] = np.exp(-_sq_dists(f[i:i + chunk], f) / (2.0 * h * h)).mean(axis=1)
    dn = (density - density.min()) / max(float(np.ptp(density)), 1e-300)
    chosen = [int(np.argmax(dn))]
    nearest = np.sqrt(_sq_dists(f, f[chosen[0]:chosen[0] + 1])[:, 0])
    taken = np.zeros(p, dtype=bool)
    taken[chosen[0]] = True
    while len(chosen) < n:
        div = np.minimum(nearest / (2.0 * h), 1.0)  # robust: a far outlier is no more "diverse" than a new mode
        score = density_weight * dn + (1.0 - density_weight) * div
        score[taken] = -np.inf
        j = int(np.argmax(score))
        chosen.append(j)
        taken[j] = True
        nearest = np.minimum(nearest, np.sqrt(_sq_dists(f, f[j:j + 1])[:, 0]))
    return sorted(chosen)
