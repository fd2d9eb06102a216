"""Low-bit weight schemes: binary, ternary, shift (DenseShift) and int with power-of-two scales.

Every scheme approximates a weight tensor W per output channel c (the plan's per-channel axis; per tensor when
the granularity is ``per_tensor``) by an integer *code* times a float *scale*::

    Ŵ[c, ...] = q[c, ...] · s[c]

so that ``DequantizeLinear(q, s, axis)`` reproduces Ŵ exactly and the runtime targets can store q compactly.

* **binary** (XNOR-Net binary-weight networks): q = sign(W) ∈ {−1, +1} with sign(0) = +1, and
  s = α = mean|W| over the channel — the closed-form minimizer of ‖W − α·sign(W)‖² (α is floored at 1e-12
  for an all-zero channel).
* **ternary** (TWN; the statistics-based ternary of "Binary and Ternary Natural Language Generation"):
  Δ = threshold · mean|W| (threshold 0.7 by default), q = sign(W)·[|W| > Δ] ∈ {−1, 0, +1},
  s = α = mean of |W| over the entries with |W| > Δ (the least-squares α for that support; 1.0 for a channel
  with no such entry, whose codes are all 0). The share of zero codes is the layer's *sparsity*.
* **shift** (DenseShift, zero-free low-bit shift weights): Ŵ = s·σ·2^(−k) with σ = sign(W) ∈ {−1, +1}
  (no zero: sign(0) = +1) and k ∈ {0, …, M − 1}, M = 2^(bits−1) exponents (``bits`` = 1 sign bit + bits − 1
  exponent bits; 4 by default: 8 exponents). s is the top of the per-channel exponent window
  {s, s/2, …, s/2^(M−1)}. Rounding is done in the log domain: k = clip(round(log2(s / |W|)), 0, M − 1)
  (|W| = 0 takes the smallest magnitude). The window — i.e. s — is chosen per channel to minimize the weight
  MSE: with ``scale: pow2``, s = 2^e and e is searched over every exponent from floor(log2 max|W|) − M to
  floor(log2 max|W|) + 1; otherwise s is searched on a grid of 97 values (32 per octave) over the three
  octaves below 2·max|W|, then on 33 points 16x finer around the best, each of those also tried with its
  least-squares value (s* = Σ|W|·2^(−k) / Σ 2^(−2k) for its codes, codes re-rounded for s*) — log rounding
  makes the MSE jump wherever a weight changes exponent, so a smooth search is not enough. The integer code is
  q = σ·2^(M−1−k) ∈ {±1, ±2, …, ±2^(M−1)} with scale s·2^(−(M−1)), so DequantizeLinear gives exactly ±2^p·s
  (multiplying by a power of two is exact in float).
* **int with** ``scale: pow2``: the affine int quantizer of :mod:`qcompiler.quant` (range from ``minmax`` or
  ``mse``), whose scale is then replaced per channel (or per tensor / block) by 2^floor(log2 s) or
  2^ceil(log2 s), whichever gives the smaller quantization MSE (MSQE) — not by rounding log2 s. Asymmetric
  specs get their zero point recomputed for each candidate scale.

Code storage for the ``ort`` target (:func:`code_dtype`): the narrowest signed type that holds the codes —
int4 when the opset is at least 21 (binary, ternary, 2-bit shift), else int8; shift codes of ±2^7 (bits 4)
need int16 (opset ≥ 21) or int32 (DequantizeLinear takes int32 from opset 10).

Binary *activations* (XNOR layers, ``activation: {scheme: binary}``): x̂ = β·sign(x) with sign(0) = +1 and
β = mean|x| over the calibration data (the minimizer of E(x − β·sign x)²), read from the calibration
histogram (:func:`binary_activation_scale`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from qcompiler import quant
from qcompiler.quant.dtypes import CODE_STORAGE_BITS, QDTYPES, SHIFT_BITS, UNIFORM_BITS, qdtype

if TYPE_CHECKING:
    from qcompiler.calib import TensorStats
    from qcompiler.plan import QuantSpec

log = logging.getLogger(__name__)

LOWBIT_SCHEMES = ("binary", "ternary", "shift", "uniform")
#: uniform: clipping ratios (of max|W|) searched per channel for the least weight MSE
UNIFORM_GRID = 64
MIN_ALPHA = quant.MIN_SCALE
#: float shift scale search: grid points over the three octaves below 2·max|W|
SHIFT_GRID = 97
#: then this many points across ±1 grid step around the best
SHIFT_REFINE = 33


# ------------------------------------------------------------------------------------------- helpers
def _other_axes(ndim: int, axis: int | None) -> tuple[int, ...]:
    return tuple(range(ndim)) if axis is None else tuple(i for i in range(ndim) if i != axis)


def _bcast(v: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Per-channel vector ``v`` as an array broadcastable against a tensor of rank ``ndim``."""
    v = np.asarray(v)
    if axis is None:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _channel_mean(x: np.ndarray, axis: int | None) -> np.ndarray:
    return np.asarray(x.mean(axis=_other_axes(x.ndim, axis), dtype=np.float64))


def _channel_sum(x: np.ndarray, axis: int | None) -> np.ndarray:
    return np.asarray(x.sum(axis=_other_axes(x.ndim, axis), dtype=np.float64))


def weight_sqnr_db(w: np.ndarray, w_hat: np.ndarray) -> float:
    return quant.sqnr_db(w, w_hat)


# ------------------------------------------------------------------------------------------- results
@dataclass
class SchemeWeight:
    """A weight in a low-bit scheme: integer codes times a per-channel (or per-tensor) scale.

    ``codes``: binary ±1, ternary −1/0/+1 (int8); shift ±2^j, j < 2^(bits−1) (int8; int16 for 4 bits);
    ``scale`` is float32 of shape [C] (per channel along ``axis``) or [] (per tensor).
    """

    scheme: str
    codes: np.ndarray
    scale: np.ndarray
    axis: int | None
    bits: int  # bits per weight in the packed form: binary 1, ternary 2, shift ``bits``
    extra: dict[str, Any] = field(default_factory=dict)  # threshold / delta (ternary), window (shift)

    def dequantize(self) -> np.ndarray:
        s = _bcast(self.scale.astype(np.float32), self.codes.ndim, self.axis)
        return (self.codes.astype(np.float32) * s).astype(np.float32)

    @property
    def sparsity(self) -> float:
        """Share of zero codes (only ternary has any)."""
        return float(np.count_nonzero(self.codes == 0)) / max(self.codes.size, 1)


def binary(w: np.ndarray, axis: int | None) -> SchemeWeight:
    """XNOR-Net binary weights: q = sign(W) (sign(0) = +1), α = mean|W| per channel."""
    w = np.asarray(w, dtype=np.float32)
    codes = np.where(w >= 0, 1, -1).astype(np.int8)
    alpha = np.maximum(_channel_mean(np.abs(w), axis), MIN_ALPHA).astype(np.float32)
    return SchemeWeight("binary", codes, alpha, axis, 1)


def ternary(w: np.ndarray, axis: int | None, threshold: float = 0.7) -> SchemeWeight:
    """TWN ternary weights: Δ = threshold·mean|W|, q = sign(W)·[|W| > Δ], α = mean|W| over |W| > Δ."""
    w = np.asarray(w, dtype=np.float32)
    a = np.abs(w).astype(np.float64)
    delta = threshold * _channel_mean(a, axis)
    keep = a > _bcast(delta, w.ndim, axis)
    codes = (np.sign(w) * keep).astype(np.int8)
    n = _channel_sum(keep.astype(np.float64), axis)
    total = _channel_sum(np.where(keep, a, 0.0), axis)
    alpha = np.where(n > 0, total / np.maximum(n, 1.0), 1.0)
    alpha = np.maximum(alpha, MIN_ALPHA).astype(np.float32)
    return SchemeWeight("ternary", codes, alpha, axis, 2, {"threshold": float(threshold),
                                                            "delta": delta.astype(np.float32)})


def uniform(w: np.ndarray, axis: int | None, bits: int = 3) -> SchemeWeight:
    """Mid-rise uniform weights (``int3`` / ``int2`` of the planner): Ŵ = (q + ½)·Δ, q ∈ [−L/2, L/2 − 1],
    L = 2^bits levels placed symmetrically around zero (none on it), per channel; integer codes c = 2q + 1 (odd,
    |c| ≤ L − 1) with scale Δ/2. Δ is chosen per channel for the least weight MSE: clipping ratios
    ``r·max|W|`` (r on :data:`UNIFORM_GRID` points in [0.1, 1]), then the least-squares scale for the best
    codes (Σ W·c / Σ c²), kept when it lowers the MSE."""
    if bits not in UNIFORM_BITS:
        raise ValueError(f"uniform weights take {', '.join(map(str, UNIFORM_BITS))} bits, got {bits}")
    w = np.asarray(w, dtype=np.float32)
    a = w.astype(np.float64)
    half = 1 << (bits - 1)
    axes = _other_axes(w.ndim, axis)
    amax = np.maximum(np.abs(a).max(axis=axes) if a.size else np.zeros(()), MIN_ALPHA)

    def codes_for(step: np.ndarray) -> np.ndarray:
        sb = _bcast(step, w.ndim, axis)
        return 2.0 * np.clip(np.floor(a / sb), -half, half - 1) + 1.0

    def mse(c: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return np.asarray(((a - c * _bcast(scale, w.ndim, axis)) ** 2).mean(axis=axes))

    best_err = np.full(np.shape(amax), np.inf)
    best = np.asarray(amax / half)
    for r in np.linspace(0.1, 1.0, UNIFORM_GRID):
        step = r * amax / half
        err = mse(codes_for(step), step / 2.0)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, step, best)
    c = codes_for(best)
    ls = _channel_sum(a * c, axis) / np.maximum(_channel_sum(c * c, axis), 1.0)
    ls = np.maximum(ls, MIN_ALPHA)
    c_ls = codes_for(2.0 * ls)
    take = mse(c_ls, ls) < best_err
    scale = np.where(take, ls, best / 2.0)
    codes = np.where(_bcast(take, w.ndim, axis), c_ls, c).astype(np.int8)
    return SchemeWeight("uniform", codes, np.maximum(scale, MIN_ALPHA).astype(np.float32), axis, int(bits),
                        {"levels": 1 << bits})


def shift_exponents(a: np.ndarray, s: np.ndarray, levels: int) -> np.ndarray:
    """Log-domain rounding: k = clip(round(log2(s / |w|)), 0, levels − 1) (|w| = 0 → levels − 1)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(a > 0, np.log2(s / np.where(a > 0, a, 1.0)), np.inf)
    return np.clip(np.rint(ratio), 0, levels - 1).astype(np.int64)


def _shift_mse(a: np.ndarray, s: np.ndarray, levels: int, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(per-channel MSE, k) of magnitudes ``a`` against s·2^(−k) with log-domain rounding (s broadcast)."""
    k = shift_exponents(a, s, levels)
    err = (a - s * np.exp2(-k.astype(np.float64))) ** 2
    return err.mean(axis=axes), k


def shift(w: np.ndarray, axis: int | None, bits: int = 4, pow2_scale: bool = False) -> SchemeWeight:
    """DenseShift weights: Ŵ = s·σ·2^(−k), σ ∈ {±1}, k ∈ [0, 2^(bits−1)), window top s per channel."""
    if bits not in SHIFT_BITS:
        raise ValueError(f"shift: bits must be one of {SHIFT_BITS}, got {bits}")
    w = np.asarray(w, dtype=np.float32)
    levels = 2 ** (bits - 1)
    a = np.abs(w).astype(np.float64)
    # the search runs on a [C, K] view: one row per channel (one row for per-tensor)
    a2 = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1) if axis is not None else a.reshape(1, -1)
    n = max(a2.shape[1], 1)
    # the search itself runs in float32 (4x less memory traffic); the final codes are rounded in float64
    a32 = a2.astype(np.float32)
    with np.errstate(divide="ignore"):
        la = np.log2(a32)  # -inf for zeros: they take the smallest magnitude
    powers = np.exp2(-np.arange(levels, dtype=np.float32))
    amax = a2.max(axis=1)
    amax = np.where(amax > 0, amax, 1.0)

    def mse(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-row MSE for window tops ``s`` [C] (log-domain rounding) and the magnitudes 2^(−k) used."""
        s32 = s.astype(np.float32)
        k = np.clip(np.rint(np.log2(s32)[:, None] - la), 0, levels - 1).astype(np.intp)
        p = powers[k]
        d = a32 - s32[:, None] * p
        return np.einsum("ij,ij->i", d, d, dtype=np.float64) / n, p

    # candidates: one s per channel each, as an array [n_cand, C]
    if pow2_scale:
        top = np.floor(np.log2(amax))
        cands = np.exp2(top[None, :] + np.arange(-levels, 2, dtype=np.float64)[:, None])
    else:
        f = np.exp2(1.0 - 3.0 * np.arange(SHIFT_GRID) / (SHIFT_GRID - 1))  # 2 .. 1/4
        cands = amax[None, :] * f[:, None]
    best_err = np.full(amax.shape, np.inf)
    best_s = amax.copy()

    def consider(s: np.ndarray, least_squares: bool) -> None:
        nonlocal best_err, best_s
        err, p = mse(s)
        trials = [(err, s)]
        if least_squares:  # least-squares s for these codes, codes re-rounded for it
            num = np.einsum("ij,ij->i", a32, p, dtype=np.float64)
            den = np.einsum("ij,ij->i", p, p, dtype=np.float64)
            s_ls = np.where(den > 0, num / np.where(den > 0, den, 1.0), s)
            s_ls = np.where(s_ls > 0, s_ls, s)
            trials.append((mse(s_ls)[0], s_ls))
        for e, sv in trials:
            better = e < best_err
            best_err = np.where(better, e, best_err)
            best_s = np.where(better, sv, best_s)

    for s in cands:
        consider(s, False)
    if not pow2_scale:
        # log rounding makes the MSE jump where a weight changes exponent: refine 16x finer around the best
        step = 3.0 / (SHIFT_GRID - 1)
        centre = best_s.copy()
        for j in np.linspace(-1.0, 1.0, SHIFT_REFINE):
            consider(centre * np.exp2(j * step), True)
    if axis is None:
        best_s = best_s.reshape(())
    s32 = best_s.astype(np.float32)  # the stored scale; codes are rounded against exactly this value
    if pow2_scale:
        s32 = np.exp2(np.rint(np.log2(s32.astype(np.float64)))).astype(np.float32)
    k = shift_exponents(a, _bcast(s32.astype(np.float64), w.ndim, axis), levels)
    sign = np.where(w >= 0, 1, -1)
    codes = (sign * (1 << (levels - 1 - k))).astype(np.int8 if levels < 8 else np.int16)  # +128 needs int16
    scale = (s32.astype(np.float64) * 2.0 ** (-(levels - 1))).astype(np.float32)
    return SchemeWeight("shift", codes, np.asarray(scale), axis, bits,
                        {"levels": levels, "window_top": np.asarray(s32), "pow2": bool(pow2_scale)})


def shift_window(sw: SchemeWeight) -> tuple[np.ndarray, np.ndarray]:
    """(sign σ, exponent offset k) of shift codes: code = σ·2^(M−1−k)."""
    levels = int(sw.extra["levels"])
    mag = np.abs(sw.codes.astype(np.int64))
    j = np.round(np.log2(mag)).astype(np.int64)
    return np.where(sw.codes > 0, 1, -1), (levels - 1) - j


# ----------------------------------------------------------------------------------------- int pow2
def _err_per(err2: np.ndarray, axis: int | None, block: int | None) -> np.ndarray:
    if axis is None:
        return np.asarray(err2.mean())
    if block:
        return quant._reduce_mean_blocks(err2, axis, block)
    return err2.mean(axis=_other_axes(err2.ndim, axis))


def int_pow2(w: np.ndarray, dtype: str, symmetric: bool, axis: int | None, block_size: int | None = None,
             range_method: str = "minmax") -> quant.QuantizedTensor:
    """Affine int quantization with power-of-two scales: 2^floor or 2^ceil of log2(s), by smaller MSE.

    The base scale comes from :func:`qcompiler.quant.quantize_weight` (its ``range_method``); each channel /
    block keeps the candidate with the smaller quantization MSE; asymmetric zero points are recomputed for
    each candidate (z = round(qmin − lo / s)) so the range stays covered.
    """
    w = np.asarray(w, dtype=np.float32)
    base = quant.quantize_weight(w, dtype, symmetric, axis, block_size, range_method)
    dt = quant.qdtype(dtype)
    e = np.log2(np.maximum(base.scale.astype(np.float64), quant.MIN_SCALE))
    lo_range = None
    if not symmetric and not dt.is_float:
        # lo of the base range, recovered from its scale and zero point: lo = (qmin − z)·s
        lo_range = (dt.qmin - base.zero_point.astype(np.float64)) * base.scale.astype(np.float64)
    best: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    for cand in (np.floor(e), np.ceil(e)):
        s = np.exp2(cand).astype(np.float32)
        if lo_range is not None:
            zp = np.clip(np.rint(dt.qmin - lo_range / s.astype(np.float64)), dt.qmin, dt.qmax)
            zp = zp.astype(np.int64).astype(dt.np_dtype)
        else:
            zp = base.zero_point
        deq = quant.dequantize(quant.quantize(w, s, zp, dtype, axis, block_size), s, zp, axis, block_size)
        err = _err_per((deq - w).astype(np.float64) ** 2, axis, block_size)
        if best is None:
            best = (err, s, np.asarray(zp))
        else:
            better = err < best[0]
            best = (np.where(better, err, best[0]), np.where(better, s, best[1]).astype(np.float32),
                    np.where(better, zp, best[2]).astype(np.asarray(zp).dtype))
    assert best is not None
    _, scale, zp = best
    scale = np.asarray(scale, dtype=np.float32).reshape(base.scale.shape)
    zp = np.asarray(zp).astype(base.zero_point.dtype).reshape(base.zero_point.shape)
    q = quant.quantize(w, scale, zp, dtype, axis, block_size)
    return quant.QuantizedTensor(q, scale, zp, axis, block_size, dtype)


def ceil_pow2(scale: np.ndarray) -> np.ndarray:
    """Smallest power of two ≥ each scale (the bias overflow guard may only raise a pow2 scale)."""
    s = np.maximum(np.asarray(scale, dtype=np.float64), quant.MIN_SCALE)
    return np.exp2(np.ceil(np.log2(s))).astype(np.float32)


def is_pow2(x: np.ndarray) -> bool:
    x = np.asarray(x, dtype=np.float64)
    m, _ = np.frexp(x)
    return bool(np.all((x > 0) & (m == 0.5)))


# -------------------------------------------------------------------------------------- code storage
def code_dtype(codes: np.ndarray, opset: int) -> str:
    """Narrowest signed integer type DequantizeLinear accepts at ``opset`` that holds ``codes`` exactly."""
    lo, hi = (int(codes.min()), int(codes.max())) if codes.size else (0, 0)
    if opset >= 21 and -8 <= lo and hi <= 7:
        return "int4"
    if -128 <= lo and hi <= 127:
        return "int8"
    if opset >= 21 and -32768 <= lo and hi <= 32767:
        return "int16"
    return "int32"


_CODE_NP = {"int4": ml_dtypes.int4, "int8": np.int8, "int16": np.int16, "int32": np.int32}


def storage_bits(dtype: str) -> int:
    return CODE_STORAGE_BITS.get(dtype, qdtype(dtype).bits if dtype in QDTYPES else 32)


def to_quantized_tensor(sw: SchemeWeight, opset: int) -> quant.QuantizedTensor:
    """The codes as a :class:`~qcompiler.quant.QuantizedTensor` for a DequantizeLinear (zero point 0)."""
    dtype = code_dtype(sw.codes, opset)
    q = sw.codes.astype(np.int64).astype(_CODE_NP[dtype])
    scale = np.asarray(sw.scale, dtype=np.float32)
    zp = np.zeros(scale.shape, dtype=_CODE_NP[dtype])
    return quant.QuantizedTensor(q, scale, zp, sw.axis, None, dtype)


# -------------------------------------------------------------------------------------------- dispatch
@dataclass
class SchemeResult:
    """What :func:`quantize_for_spec` gives ``insert-qdq``: the DequantizeLinear data and a report entry."""

    qt: quant.QuantizedTensor
    info: dict[str, Any]
    label: str  # statistics key suffix: binary / ternary / shift / int8_pow2 ...
    zeros: int = 0  # zero codes (ternary)


def uses_scheme_quantizer(spec: QuantSpec) -> bool:
    return spec.scheme != "int" or spec.scale == "pow2"


def quantize_for_spec(w: np.ndarray, spec: QuantSpec, axis: int | None, block_size: int | None,
                      opset: int) -> SchemeResult:
    """Quantize a weight for a spec whose scheme is not plain int (or whose scale is pow2)."""
    w = np.asarray(w, dtype=np.float32)
    if spec.scheme == "int":
        qi = int_pow2(w, spec.dtype, spec.symmetric, axis, block_size, spec.range)
        return SchemeResult(qi, {"scheme": "int", "dtype": spec.dtype, "scale": "pow2",
                                 "weight_sqnr_db": _r(weight_sqnr_db(w, qi.dequantize()))}, f"{spec.dtype}_pow2")
    if block_size is not None:
        raise ValueError(f"scheme {spec.scheme} has no block-wise form")
    if spec.scheme == "binary":
        sw = binary(w, axis)
    elif spec.scheme == "ternary":
        sw = ternary(w, axis, spec.threshold)
    elif spec.scheme == "shift":
        sw = shift(w, axis, spec.bits, pow2_scale=spec.scale == "pow2")
    elif spec.scheme == "uniform":
        sw = uniform(w, axis, spec.bits)
    else:
        raise ValueError(f"unknown weight scheme {spec.scheme!r}")
    if spec.scale == "pow2" and spec.scheme != "shift":
        sw.scale = pow2_alpha(w, sw)
    qt = to_quantized_tensor(sw, opset)
    info: dict[str, Any] = {"scheme": sw.scheme, "bits": sw.bits, "code_dtype": qt.dtype,
                            "weight_sqnr_db": _r(weight_sqnr_db(w, sw.dequantize())),
                            "channels": int(np.size(sw.scale))}
    zeros = 0
    if sw.scheme == "ternary":
        zeros = int(np.count_nonzero(sw.codes == 0))
        info["sparsity"] = round(sw.sparsity, 6)
        info["threshold"] = sw.extra["threshold"]
    if sw.scheme == "shift":
        info["exponents"] = int(sw.extra["levels"])
        info["pow2_scale"] = bool(sw.extra["pow2"])
    if spec.scale == "pow2":
        info["scale"] = "pow2"
    return SchemeResult(qt, info, sw.scheme, zeros)


def pow2_alpha(w: np.ndarray, sw: SchemeWeight) -> np.ndarray:
    """Binary / ternary with ``scale: pow2``: α → 2^floor or 2^ceil of log2 α, whichever has the smaller weight MSE."""
    e = np.log2(np.maximum(sw.scale.astype(np.float64), MIN_ALPHA))
    codes = sw.codes.astype(np.float64)
    lo, hi = np.exp2(np.floor(e)), np.exp2(np.ceil(e))
    err_lo = _channel_mean((w - codes * _bcast(lo, w.ndim, sw.axis)) ** 2, sw.axis)
    err_hi = _channel_mean((w - codes * _bcast(hi, w.ndim, sw.axis)) ** 2, sw.axis)
    return np.where(err_lo <= err_hi, lo, hi).astype(np.float32)


def _r(x: float) -> float | str:
    return round(x, 3) if math.isfinite(x) else str(x)


# ------------------------------------------------------------------------------------- activations
def binary_activation_scale(stats: TensorStats) -> float:
    """β = mean|x| over the calibration data, from the calibration histogram (bin centres).

    Without a histogram (calibration forced to ``minmax``) only the range is known; β = max|x| / 2 (the
    mean |x| of a uniform distribution on [−max|x|, max|x|]) is used and a warning logged.
    """
    if stats.count == 0 or stats.amax == 0.0:
        return 1.0
    hist = stats.hist
    if hist is None or stats.range_exp is None:
        log.warning("binary activation: no calibration histogram; beta = max|x| / 2 (use calibration: mse)")
        return float(stats.amax) / 2.0
    width = math.ldexp(1.0, stats.range_exp) / stats.bins
    centres = (np.arange(hist.size, dtype=np.float64) - stats.bins + 0.5) * width
    n = float(hist.sum())
    # exact zeros (counted, e.g. after a ReLU) sit in the bin [0, width) but contribute nothing to mean|x|
    total = float((np.abs(centres) * hist).sum()) - 0.5 * width * min(stats.zeros, int(hist[stats.bins]))
    beta = total / n if n else float(stats.amax) / 2.0
    return beta if beta > 0 else float(stats.amax) / 2.0
