"""The SmoothQuant migration strength chosen by measurement (``smooth{alpha=auto}``): statistics and the search.

For one smoothed tensor X (channels on the last axis) read by the MatMul / Gemm layers L_1 … L_m:

* **Statistics, streaming** (:class:`SiteRows`): per channel the largest and second-largest maximum over the
  calibration samples and the sample holding the largest (likewise the minima), so the range of every sample
  *but one* is known in O(channels) memory; and at most ``rows`` rows of X in all — ``ceil(rows / samples)``
  of each sample, drawn without replacement by ``numpy.random.default_rng((compile seed, site, sample))``, in
  increasing order (every row of a sample that has no more). Memory is bounded by ``rows + samples`` rows
  whatever the number of samples, and the same data and seed give the same rows.
* **Candidates**: "off" (s = 1: no smoothing) and α in :data:`GRID` (0.0, 0.1, … 1.0), with
  ``s_j = max|X_j|^α / max|W_j|^(1−α)`` exactly as a fixed ``alpha`` computes it.
* **The measure** (:func:`choose`): each sample's rows are quantized as a compile *without that sample* would
  quantize them (leave one out): s' from the other samples' maxima, divided out, fake-quantized with the plan's
  activation spec on the per-tensor range of the other samples (``min_j lo_j/s'_j``, ``max_j hi_j/s'_j``: what
  ``minmax`` calibration measures on the smoothed graph — also taken for other methods and for per-tensor
  ``dynamic`` specs, whose ranges it approximates; a per-token spec quantizes each row on its own range, as it
  does at run time), and carried by s'/s onto the weights ``diag(s)·W_i``, each quantized once per
  candidate with its plan weight spec (per-channel / per-tensor / block, range method, scheme). The error is
  ``Σ_i ‖X̂·Ŵ_i − X·W_i‖² / ‖X·W_i‖²`` (each product's noise-to-signal ratio, so a wide layer does not drown a
  narrow one), in float32 on one BLAS thread (the same sums on every machine). Measured on the calibration
  samples themselves (ranges from all of them), the error cannot see that new data goes past the calibrated
  range, and α → 1 — every channel exactly at the range's edge — looked best where it lost 5 dB on new data;
  leaving the sample out counts that clipping (on the test fixtures the choice is then the best fixed α or
  within 0.1 dB of it).
* **The choice**: the candidate with the lowest error; a smoothing candidate must beat "off" by
  :data:`MIN_GAIN` (10 %, 0.46 dB) to be taken, so a tensor without outliers keeps s = 1 and the pass is never
  worse than off on this measure. Ties go to the earlier candidate (off, then the smaller α).

Why this grid: the error is a smooth function of α with one valley (SmoothQuant's Fig. 8 and every tensor
measured here), and the cost is linear in the number of candidates (each is m products of ``rows × K × N``).
A second run measures the smoothed graph: with s' = a'^β / w'^(1−β) on a' = a/s, w' = w·s the candidates are
the same family (s·s' is the first run's s at α = β), so "off" — the first run's choice — is the best again and
nothing changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from qcompiler import quant
from qcompiler.ir.axes import block_axis, per_channel_axis
from qcompiler.plan import QuantSpec
from qcompiler.quant import schemes

from ._layers import Layer

#: the α candidates (besides "off")
GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
#: a smoothing candidate must lower the error below (1 − MIN_GAIN) × the error of "off"
MIN_GAIN = 0.1
#: s is kept within [1/MAX_SCALE, MAX_SCALE] (as for a fixed alpha)
MAX_SCALE = 1e4


def scales(a: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = a_j^α / w_j^(1−α)`` clipped to [1/MAX_SCALE, MAX_SCALE]; 1 where a channel has no range."""
    ok = (a > 0) & (w > 0)
    s = np.ones_like(a)
    s[ok] = np.clip(a[ok] ** alpha / w[ok] ** (1.0 - alpha), 1.0 / MAX_SCALE, MAX_SCALE)
    return s


class _Top2:
    """Per channel, the largest value over the samples, the sample holding it, and the largest of the other
    samples: the maximum over every sample but any one, in O(channels) memory."""

    def __init__(self, v: np.ndarray, sample: int) -> None:
        self.first = v.copy()
        self.holder = np.full(v.shape, sample)
        self.second = np.full(v.shape, -np.inf)

    def add(self, v: np.ndarray, sample: int) -> None:
        beats = v > self.first
        self.second = np.where(beats, self.first, np.maximum(self.second, v))
        self.first = np.where(beats, v, self.first)
        self.holder = np.where(beats, sample, self.holder)

    def without(self, sample: int) -> np.ndarray:
        """The maximum over every sample but ``sample`` (-inf where there is no other)."""
        return np.where(self.holder == sample, self.second, self.first)


@dataclass
class SiteRows:
    """Streaming statistics of one smoothed tensor: per channel the two largest maxima and the two smallest
    minima over the samples (with the samples holding them), and a bounded, seeded subset of each sample's rows.
    Sample i's rows are measured with the s and the range of every *other* sample (leave one out), as new data
    meets ranges calibrated without it; with a single sample, its own."""

    key: tuple[int, int]  # (compile seed, site index)
    quota: int  # rows kept per sample
    hi: _Top2 | None = None
    neg_lo: _Top2 | None = None  # -min
    kept: list[np.ndarray] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)  # the sample of each kept block
    samples: int = 0

    def add(self, x: np.ndarray) -> None:
        rows = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        lo, hi = rows.min(axis=0).astype(np.float64), rows.max(axis=0).astype(np.float64)
        if self.hi is None or self.neg_lo is None:
            self.hi, self.neg_lo = _Top2(hi, self.samples), _Top2(-lo, self.samples)
        else:
            self.hi.add(hi, self.samples)
            self.neg_lo.add(-lo, self.samples)
        n = rows.shape[0]
        if n > self.quota:
            pick = np.sort(np.random.default_rng([*self.key, self.samples]).choice(n, self.quota, replace=False))
            rows = rows[pick]
        self.kept.append(np.array(rows, copy=True))
        self.owner.append(self.samples)
        self.samples += 1

    def ranges(self, sample: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (lo, hi) over every sample, or over every sample but ``sample``."""
        assert self.hi is not None and self.neg_lo is not None
        if sample is None or self.samples < 2:
            return -self.neg_lo.first, self.hi.first
        return -self.neg_lo.without(sample), self.hi.without(sample)

    @property
    def amax(self) -> np.ndarray:
        """max |X_j| per channel over every sample (float64): what the chosen s is computed from."""
        lo, hi = self.ranges()
        return np.maximum(np.abs(lo), np.abs(hi))

    def release(self) -> None:
        self.kept.clear()
        self.owner.clear()


def quota(rows: int, samples: int) -> int:
    """Rows kept per sample."""
    return max(1, math.ceil(rows / max(1, samples)))


def _fake_quant_activation(x: np.ndarray, lo: float, hi: float, spec: QuantSpec) -> np.ndarray:
    if spec.is_float:
        return x
    if spec.granularity == "per_token":  # each row on its own range, as at run time
        return quant.per_token_dequantize(x, spec.dtype, spec.symmetric)
    s, z = quant.qparams(lo, hi, spec.dtype, spec.symmetric)
    return quant.dequantize(quant.quantize(x, s, z, spec.dtype), s, z)


def _fake_quant_weight(lay: Layer, w: np.ndarray, spec: QuantSpec | None, opset: int) -> np.ndarray:
    if spec is None or spec.is_float:
        return w
    axis: int | None = None
    block: int | None = None
    if spec.granularity == "per_channel":
        axis = spec.axis if spec.axis is not None else per_channel_axis(lay.node, w.ndim)
    elif spec.granularity == "block":
        axis = spec.axis if spec.axis is not None else block_axis(lay.node, w.ndim)
        block = min(spec.block_size, w.shape[axis] + 1)
    if axis is not None and axis < 0:
        axis += w.ndim
    if schemes.uses_scheme_quantizer(spec):
        return schemes.quantize_for_spec(w, spec, axis, block, opset).qt.dequantize()
    return quant.quantize_weight(w, spec.dtype, spec.symmetric, axis, block, spec.range,
                                 spec.scale == "pow2", f16=spec.scale == "float16").dequantize()


def _as_kn(lay: Layer, w: np.ndarray) -> np.ndarray:
    """The weight as the [K, N] matrix the product X·W uses."""
    return w.T if lay.op == "Gemm" and int(lay.node.attrs.get("transB", 0)) else w


def choose(site: SiteRows, consumers: list[Layer], act: QuantSpec, weights: list[QuantSpec | None],
           opset: int) -> tuple[float | None, np.ndarray, dict[str, float]]:
    """(chosen α or ``None`` for off, its s, the error of every candidate by name: ``off``, ``0.0`` … ``1.0``)."""
    wr = np.max(np.stack([c.in_range() for c in consumers]), axis=0)
    a = site.amax
    x = np.concatenate(site.kept, axis=0)
    refs = [x @ _as_kn(c, c.w.astype(np.float32)) for c in consumers]
    power = [max(float(np.sum(np.square(r, dtype=np.float64))), 1e-30) for r in refs]
    loo = [site.ranges(i) for i in site.owner]
    cands: list[tuple[str, float | None]] = [("off", None), *((f"{al:.1f}", al) for al in GRID)]
    errors: dict[str, float] = {}
    for name, al in cands:
        s = np.ones_like(a) if al is None else scales(a, wr, al)
        parts = []
        for rows, (lo, hi) in zip(site.kept, loo):
            # this sample's rows as a compile without it would quantize them: s' and the range from the others;
            # s'/s carries them onto the weights diag(s)·W, quantized once per candidate
            s_i = np.ones_like(a) if al is None else scales(np.maximum(np.abs(lo), np.abs(hi)), wr, al)
            xq = _fake_quant_activation(rows * (1.0 / s_i).astype(np.float32), float(np.min(lo / s_i)),
                                        float(np.max(hi / s_i)), act)
            parts.append(xq * (s_i / s).astype(np.float32))
        xq = np.concatenate(parts, axis=0)
        err = 0.0
        for c, spec, ref, p in zip(consumers, weights, refs, power):
            w = c.scale_in(c.w.astype(np.float64), s).astype(np.float32)
            d = xq @ _as_kn(c, _fake_quant_weight(c, w, spec, opset)) - ref
            err += float(np.sum(np.square(d, dtype=np.float64))) / p
        errors[name] = err
    best = 0
    for i in range(1, len(cands)):
        if errors[cands[i][0]] < errors[cands[best][0]]:
            best = i
    if best and not errors[cands[best][0]] < (1.0 - MIN_GAIN) * errors["off"]:
        best = 0
    alpha = cands[best][1]
    return alpha, np.ones_like(a) if alpha is None else scales(a, wr, alpha), errors
