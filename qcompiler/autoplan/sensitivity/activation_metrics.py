"""The metrics from float activations only, one float pass (no evaluation with quantized weights):
``act-stats`` (myQASR: the median |y| of each layer's output, times the candidate's relative error of the layer
output under the diagonal input second moments) and ``orthogonality`` (OMPQ: a layer little correlated with the
others carries information nothing else does; its importance, times the candidate's relative weight error)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qcompiler.autoplan.sensitivity.base import Metric, Scores
from qcompiler.autoplan.sensitivity.layers import LayerUnderTest
from qcompiler.autoplan.sensitivity.runner import Progress, SensitivityRunner

#: orthogonality: at most this many coordinates per sample and layer
ORM_FEATURES = 4096
#: act-stats: at most this many values per batch and layer for the median
MEDIAN_SAMPLES = 8192


def _rel_err(w: list[np.ndarray], q: list[np.ndarray]) -> float:
    num = sum(float(((a.astype(np.float64) - b) ** 2).sum()) for a, b in zip(w, q))
    den = sum(float((a.astype(np.float64) ** 2).sum()) for a in w)
    return num / max(den, 1e-300)


# ------------------------------------------------------------------------------------------- act-stats
def _channel_axis_of_input(layer: LayerUnderTest, ndim: int) -> int:
    op = layer.op_type
    if op in ("Conv", "ConvTranspose"):
        return 1
    if op == "Gemm" and int(layer.node.attrs.get("transA", 0)):
        return 0
    return ndim - 1


def _activation_stats(runner: SensitivityRunner, layers: Sequence[LayerUnderTest]
                      ) -> tuple[list[float], list[dict[str, np.ndarray]]]:
    medians: list[float] = []
    moments: list[dict[str, np.ndarray]] = []
    for layer in layers:
        out_name = layer.node.outputs[0].name
        in_name = layer.node.inputs[0].name
        picks = []
        sums: np.ndarray | None = None
        count = 0
        out_sums: np.ndarray | None = None
        out_count = 0
        for bi in range(len(runner.batches)):
            y = runner.float_value(bi, out_name)
            x = runner.float_value(bi, in_name)
            if y is not None:
                flat = np.abs(np.asarray(y, dtype=np.float32)).ravel()
                step = max(1, flat.size // MEDIAN_SAMPLES)
                picks.append(flat[::step])
                ya = np.asarray(y, dtype=np.float64)
                if ya.ndim >= 1:
                    ax = ya.ndim - 1
                    s = (ya ** 2).sum(axis=tuple(i for i in range(ya.ndim) if i != ax))
                    out_sums = s if out_sums is None or out_sums.shape != s.shape else out_sums + s
                    out_count += ya.size // max(ya.shape[ax], 1)
            if x is not None:
                xa = np.asarray(x, dtype=np.float64)
                if xa.ndim >= 1:
                    ax = _channel_axis_of_input(layer, xa.ndim)
                    s = (xa ** 2).sum(axis=tuple(i for i in range(xa.ndim) if i != ax))
                    sums = s if sums is None or sums.shape != s.shape else sums + s
                    count += xa.size // max(xa.shape[ax], 1)
        medians.append(float(np.median(np.concatenate(picks))) if picks else 0.0)
        m: dict[str, np.ndarray] = {}
        if sums is not None and count:
            m["input"] = sums / count
        if out_sums is not None and out_count:
            m["output"] = out_sums / out_count
        moments.append(m)
    return medians, moments


def _moment_weights(layer: LayerUnderTest, k: int, w: np.ndarray, m: dict[str, np.ndarray]) -> np.ndarray:
    """E[x²] of the input channel each weight element multiplies, broadcast to the weight's shape."""
    op = layer.op_type
    ones = np.ones(w.shape, dtype=np.float64)
    x2 = m.get("input")
    if op in ("LSTM", "GRU", "RNN"):
        x2 = m.get("input") if k == 0 else m.get("output")  # W reads X, R reads the hidden state
        if x2 is None or w.ndim != 3 or x2.shape[0] != w.shape[2]:
            return ones
        return ones * x2.reshape(1, 1, -1)
    if x2 is None:
        return ones
    try:
        if op == "Conv":
            group = int(layer.node.attrs.get("group", 1))
            cout, cin_g = w.shape[0], w.shape[1]
            if x2.shape[0] != cin_g * group:
                return ones
            g_of = np.arange(cout) // max(cout // group, 1)
            idx = g_of[:, None] * cin_g + np.arange(cin_g)[None, :]
            return ones * x2[idx].reshape(cout, cin_g, *([1] * (w.ndim - 2)))
        if op == "ConvTranspose":
            if x2.shape[0] != w.shape[0]:
                return ones
            return ones * x2.reshape(-1, *([1] * (w.ndim - 1)))
        if op == "Gemm":
            trans_b = int(layer.node.attrs.get("transB", 0))
            k_axis = 1 if trans_b else 0
            if x2.shape[0] != w.shape[k_axis]:
                return ones
            return ones * (x2.reshape(1, -1) if trans_b else x2.reshape(-1, 1))
        if op == "MatMul":
            if w.ndim < 2 or x2.shape[0] != w.shape[-2]:
                return ones
            return ones * x2.reshape(-1, 1)
    except (IndexError, ValueError):
        return ones
    return ones


# -------------------------------------------------------------------------------------- orthogonality
def _features(runner: SensitivityRunner, layer: LayerUnderTest) -> np.ndarray:
    """Rows = samples; columns = a fixed coordinate subset (uniform shapes) or channel means."""
    name = layer.node.outputs[0].name
    rows: list[np.ndarray] = []
    channel_axis = 1 if layer.op_type in ("Conv", "ConvTranspose") else -1
    for bi in range(len(runner.batches)):
        value = runner.float_value(bi, name)
        if value is None:
            raise RuntimeError(f"orthogonality: no float value of '{name}'")
        y = np.asarray(value, dtype=np.float64)
        per = runner.sample_rows[bi]
        parts = np.split(y, per, axis=0) if runner.batched and y.ndim >= 1 and y.shape[0] == per else [y]
        for part in parts:
            if runner.uniform_shapes:
                flat = part.ravel()
                step = max(1, flat.size // ORM_FEATURES)
                rows.append(flat[::step][:ORM_FEATURES])
            else:
                ax = channel_axis % part.ndim if part.ndim else 0
                rows.append(part.mean(axis=tuple(i for i in range(part.ndim) if i != ax)).ravel()
                            if part.ndim else part.ravel())
    width = min(r.size for r in rows)
    return np.stack([r[:width] for r in rows])


def _orthogonality(runner: SensitivityRunner, layers: Sequence[LayerUnderTest]) -> tuple[np.ndarray, np.ndarray]:
    grams = []
    for layer in layers:
        x = _features(runner, layer)
        g = x @ x.T
        norm = float(np.linalg.norm(g))
        grams.append(g / norm if norm > 0 else g)
    n = len(grams)
    orm = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            v = float(np.sum(grams[i] * grams[j]))  # tr(G_i G_j) for symmetric G
            orm[i, j] = orm[j, i] = v
    if n > 1:
        mean_other = (orm.sum(axis=1) - np.diag(orm)) / (n - 1)
    else:
        mean_other = np.zeros(n)
    theta = np.exp(-mean_other)
    return theta, orm


# ---------------------------------------------------------------------------------------------- metrics
class ActStats(Metric):
    """``act-stats``: layer statistic (the median |y| of its output, normalized by its mean over the layers) times
    the candidate's ``Σ ΔW² · E[x²] / Σ W² · E[x²]`` (summed over each weight's input-channel axis)."""

    name = "act-stats"

    def extra_outputs(self) -> list[str]:
        return [n for layer in self.layers for n in (layer.node.outputs[0].name, layer.node.inputs[0].name)]

    def measure(self, runner: SensitivityRunner, progress: Progress | None,
                context: Sequence[int] | None) -> Scores:
        layers = self.layers
        values = self.empty_values()
        medians, moments = _activation_stats(runner, layers)
        norm = float(np.mean([m for m in medians if m > 0]) or 1.0)
        for li, layer in enumerate(layers):
            ws = layer.weights()
            weights = [_moment_weights(layer, i, w, moments[li]) for i, w in enumerate(ws)]
            den = sum(float((w.astype(np.float64) ** 2 * m).sum()) for w, m in zip(ws, weights))
            for ci, cand in self.quantizing(layer, values[li]):
                q = self.quantized(layer, cand)
                num = sum(float(((w.astype(np.float64) - qq) ** 2 * m).sum()) for w, qq, m in zip(ws, q, weights))
                values[li, ci] = (medians[li] / norm) * num / max(den, 1e-300)
            if progress is not None:
                progress(li + 1, len(layers))
        return Scores(values, details={"median_abs_output": dict(zip([la.name for la in layers], medians))})


class Orthogonality(Metric):
    """``orthogonality``: importance θ_l = exp(−mean_{j≠l} ORM(l, j)) from the Gram matrices of the layers' output
    features on the samples, times the candidate's ``‖Q(W) − W‖² / ‖W‖²``."""

    name = "orthogonality"

    def extra_outputs(self) -> list[str]:
        return [layer.node.outputs[0].name for layer in self.layers]

    def measure(self, runner: SensitivityRunner, progress: Progress | None,
                context: Sequence[int] | None) -> Scores:
        layers = self.layers
        values = self.empty_values()
        theta, orm = _orthogonality(runner, layers)
        for li, layer in enumerate(layers):
            ws = layer.weights()
            for ci, cand in self.quantizing(layer, values[li]):
                values[li, ci] = theta[li] * _rel_err(ws, self.quantized(layer, cand))
            if progress is not None:
                progress(li + 1, len(layers))
        return Scores(values, details={"importance": dict(zip([la.name for la in layers], [float(t) for t in theta])),
                                       "orm_mean": float(np.mean(orm)) if orm.size else 0.0})
