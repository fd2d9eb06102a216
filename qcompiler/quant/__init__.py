"""Quantization arithmetic: dtypes, scales and zero points, rounding, weight quantizers.

Affine integer quantization of a real x with scale s > 0 and zero point z::

    q = clip(round_half_even(x / s) + z, qmin, qmax)        x̂ = (q − z) · s

(``round_half_even`` is what ONNX QuantizeLinear does, so codes computed here equal onnxruntime's.)
Symmetric signed: z = 0, s = max|x| / qmax. Asymmetric: the range is widened to contain 0 (so 0 is exact),
s = (hi − lo) / (qmax − qmin), z = round(qmin − lo / s). fp8: s = max|x| / fp8_max, q = cast_fp8(x / s)
(round to nearest even, saturating).

Granularity: per tensor (one s), per channel (one s per index of ``axis``), block-wise (one s per
``block_size`` consecutive elements along ``axis``, as DequantizeLinear's ``block_size`` attribute reads it).

Float16 scales (a plan's ``scale: float16``, weights only): each scale is stored as float16, the smallest
float16 ≥ the float32 scale (:func:`float16_scale`: rounding up never clips more than the float32 scale would;
in float16's normal range it raises a scale by at most 2^-10 relative, below it the subnormals keep it > 0), and the
codes are computed with that rounded scale, so ``(q − z) · float32(s16)`` is what the graph's
``Cast(s16 → float) → DequantizeLinear`` computes. A scale above float16's largest value (65504) is refused
(:class:`Float16ScaleError`).

Bias of Conv/Gemm: int32 codes with s_b = s_x · s_w (per output channel), z = 0. When |b| / s_b would not fit
in int32 (tiny scales), the weight scale of that channel is raised until it fits — the overflow guard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from qcompiler.quant.dtypes import (
    CODE_DTYPES,
    DTYPES,
    QDTYPES,
    SHIFT_BITS,
    UNIFORM_BITS,
    QDType,
    int_bits,
    is_code_dtype,
    qdtype,
)

__all__ = [
    "CODE_DTYPES",
    "DTYPES",
    "FLOAT16_MAX",
    "INT32_LIMIT",
    "MIN_SCALE",
    "PER_TOKEN_MIN_SCALE",
    "PER_TOKEN_SUFFIXES",
    "QDTYPES",
    "SHIFT_BITS",
    "UNIFORM_BITS",
    "Float16ScaleError",
    "QDType",
    "QuantizedTensor",
    "dequantize",
    "expand_scale",
    "float16_scale",
    "int_bits",
    "is_code_dtype",
    "per_token_codes",
    "per_token_dequantize",
    "per_token_qparams",
    "pow2_scale",
    "qdtype",
    "qparams",
    "quantize",
    "quantize_bias",
    "quantize_weight",
    "sqnr_db",
]

INT32_LIMIT = 2**31 - 1
MIN_SCALE = 1e-12


#: the largest finite float16: a ``scale: float16`` above it is refused
FLOAT16_MAX = 65504.0


class Float16ScaleError(ValueError):
    """A scale that float16 cannot hold (above :data:`FLOAT16_MAX`); the caller names the weight."""


def float16_scale(scale: Any) -> np.ndarray:
    """The smallest float16 ≥ each (positive, float32) scale, returned as float32 (exactly representable in
    float16, so storing it as float16 and casting back gives the same bits). Raises :class:`Float16ScaleError`
    when a scale exceeds :data:`FLOAT16_MAX`."""
    s = np.asarray(scale, dtype=np.float32)
    big = float(np.max(s, initial=0.0))
    if big > FLOAT16_MAX:
        raise Float16ScaleError(f"scale {big:.6g} is beyond float16's largest value {FLOAT16_MAX:g}")
    h = np.array(s.astype(np.float16), ndmin=1)  # round to nearest (even), then up where that went below
    low = h.astype(np.float32) < s.reshape(h.shape)
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h.astype(np.float32).reshape(s.shape)


def _bshape(ndim: int, axis: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = -1
    return shape


def qparams(lo: Any, hi: Any, dtype: str, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (in the quantized dtype) for ranges [lo, hi] (scalars or vectors)."""
    dt = qdtype(dtype)
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    lo = np.where(np.isfinite(lo), lo, 0.0)
    hi = np.where(np.isfinite(hi), hi, 0.0)
    if dt.is_float:
        absmax = np.maximum(-lo, hi)
        scale = absmax / dt.qmax
        zp = np.zeros(scale.shape, dtype=np.float32)
    elif symmetric:
        absmax = np.maximum(-lo, hi)
        if dt.signed:
            scale = absmax / dt.qmax
            zp = np.zeros(scale.shape)
        else:
            scale = 2.0 * absmax / (dt.qmax - dt.qmin)
            zp = np.full(scale.shape, (dt.qmax + dt.qmin + 1) // 2)
    else:
        scale = (hi - lo) / (dt.qmax - dt.qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.rint(dt.qmin - lo / safe), dt.qmin, dt.qmax)
    scale = np.where(scale > 0, np.maximum(scale, MIN_SCALE), 1.0).astype(np.float32)
    if dt.is_float:
        zp_arr = np.asarray(zp, dtype=np.float32).astype(dt.np_dtype)
    else:
        zp_arr = np.asarray(zp).astype(np.int64).astype(dt.np_dtype)
    return scale, zp_arr


def expand_scale(scale: np.ndarray, shape: tuple[int, ...], axis: int | None, block_size: int | None) -> np.ndarray:
    """Broadcastable version of a per-tensor / per-axis / block scale (or zero point) for a tensor of ``shape``."""
    s = np.asarray(scale)
    if s.ndim == 0 or (s.size == 1 and axis is None):
        return s.reshape(())
    assert axis is not None
    if block_size:
        s = np.repeat(s, block_size, axis=axis)
        return np.take(s, np.arange(shape[axis]), axis=axis)
    return s.reshape(_bshape(len(shape), axis))


def quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, dtype: str, axis: int | None = None,
             block_size: int | None = None) -> np.ndarray:
    """QuantizeLinear in numpy (bit-exact with ONNX for int dtypes: round half to even, saturate)."""
    dt = qdtype(dtype)
    s = expand_scale(scale, x.shape, axis, block_size).astype(np.float32)
    if dt.is_float:
        y = np.clip(x.astype(np.float32) / s, dt.qmin, dt.qmax)
        return y.astype(dt.np_dtype)
    z = expand_scale(np.asarray(zp).astype(np.int64), x.shape, axis, block_size)
    q = np.rint(x.astype(np.float32) / s) + z
    return np.clip(q, dt.qmin, dt.qmax).astype(np.int64).astype(dt.np_dtype)


def dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None = None,
               block_size: int | None = None) -> np.ndarray:
    """DequantizeLinear in numpy."""
    s = expand_scale(scale, q.shape, axis, block_size).astype(np.float32)
    if q.dtype in (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)):
        return q.astype(np.float32) * s
    z = expand_scale(np.asarray(zp).astype(np.int64), q.shape, axis, block_size)
    return ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)


def _reduce_minmax(w: np.ndarray, axis: int | None, block_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    if axis is None:
        return np.asarray(w.min()), np.asarray(w.max())
    if block_size:
        n = w.shape[axis]
        nb = -(-n // block_size)
        pad = nb * block_size - n
        wm = np.moveaxis(w, axis, 0)
        if pad:
            wm = np.concatenate([wm, np.zeros((pad, *wm.shape[1:]), dtype=wm.dtype)], axis=0)
        wm = wm.reshape(nb, block_size, *wm.shape[1:])
        lo, hi = wm.min(axis=1), wm.max(axis=1)
        return np.moveaxis(lo, 0, axis), np.moveaxis(hi, 0, axis)
    other = tuple(i for i in range(w.ndim) if i != axis)
    return w.min(axis=other), w.max(axis=other)


@dataclass
class QuantizedTensor:
    """Codes plus the parameters DequantizeLinear needs."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    block_size: int | None
    dtype: str

    def dequantize(self) -> np.ndarray:
        return dequantize(self.q, self.scale, self.zero_point, self.axis, self.block_size)


def _mse_search(w: np.ndarray, lo: np.ndarray, hi: np.ndarray, dtype: str, symmetric: bool, axis: int | None,
                block_size: int | None, steps: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Shrink each channel's range by the factor (from 1.0 down to 0.3) minimizing its quantization MSE."""
    best_err = None
    best_lo, best_hi = lo, hi
    other = None if axis is None else tuple(i for i in range(w.ndim) if i != axis)
    for f in np.linspace(1.0, 0.3, steps):
        clo, chi = lo * f, hi * f
        scale, zp = qparams(clo, chi, dtype, symmetric)
        err2 = (dequantize(quantize(w, scale, zp, dtype, axis, block_size), scale, zp, axis, block_size) - w) ** 2
        if axis is None:
            err = np.asarray(err2.mean())
        elif block_size:
            sq = err2
            err = _reduce_mean_blocks(sq, axis, block_size)
        else:
            err = err2.mean(axis=other)
        if best_err is None:
            best_err, best_lo, best_hi = err, clo, chi
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_lo = np.where(better, clo, best_lo)
            best_hi = np.where(better, chi, best_hi)
    return best_lo, best_hi


def _reduce_mean_blocks(x: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    n = x.shape[axis]
    nb = -(-n // block_size)
    pad = nb * block_size - n
    xm = np.moveaxis(x, axis, 0)
    if pad:
        xm = np.concatenate([xm, np.zeros((pad, *xm.shape[1:]), dtype=xm.dtype)], axis=0)
    xm = xm.reshape(nb, block_size, *xm.shape[1:]).mean(axis=1)
    return np.moveaxis(xm, 0, axis)


def quantize_weight(w: np.ndarray, dtype: str, symmetric: bool, axis: int | None, block_size: int | None = None,
                    range_method: str = "minmax", pow2: bool = False, f16: bool = False) -> QuantizedTensor:
    """Quantize a constant weight; ``axis`` None = per tensor; ``block_size`` with ``axis`` = block-wise.
    ``f16``: the scales rounded up to float16 (:func:`float16_scale`) before the codes are computed (the MSE
    range search compares the float32 candidates; the chosen one is rounded)."""
    w = np.asarray(w, dtype=np.float32)
    lo, hi = _reduce_minmax(w, axis, block_size)
    if range_method == "mse":
        lo, hi = _mse_search(w, lo, hi, dtype, symmetric, axis, block_size)
    scale, zp = qparams(lo, hi, dtype, symmetric)
    if pow2:
        scale = pow2_scale(w, scale, zp, dtype, axis, block_size)
    if f16:
        scale = float16_scale(scale)
    q = quantize(w, scale, zp, dtype, axis, block_size)
    return QuantizedTensor(q, scale, zp, axis, block_size, dtype)


def pow2_scale(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, dtype: str, axis: int | None,
               block_size: int | None) -> np.ndarray:
    """Power-of-two scale: floor or ceil of log2(scale), whichever gives the smaller quantization MSE."""
    e = np.log2(np.maximum(scale.astype(np.float64), MIN_SCALE))
    lo_s = np.exp2(np.floor(e)).astype(np.float32)
    hi_s = np.exp2(np.ceil(e)).astype(np.float32)

    def err(s: np.ndarray) -> np.ndarray:
        d = (dequantize(quantize(w, s, zp, dtype, axis, block_size), s, zp, axis, block_size) - w) ** 2
        if axis is None:
            return np.asarray(d.mean())
        if block_size:
            return _reduce_mean_blocks(d, axis, block_size)
        return d.mean(axis=tuple(i for i in range(w.ndim) if i != axis))

    return np.where(err(lo_s) <= err(hi_s), lo_s, hi_s).astype(np.float32)


def quantize_bias(b: np.ndarray, x_scale: float, w_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int32 bias codes with scale x_scale * w_scale. Returns (codes, bias_scale, needed_w_scale).

    ``needed_w_scale`` is ``w_scale`` raised where |b| / (x_scale * w_scale) would overflow int32 (the caller
    requantizes the weight with it when it differs).
    """
    b = np.asarray(b, dtype=np.float64)
    limit = INT32_LIMIT // 2  # keep headroom for the accumulator
    need = np.abs(b) / (float(x_scale) * limit)
    ws: np.ndarray
    if np.size(w_scale) == 1:
        ws = np.asarray(max(float(np.asarray(w_scale).reshape(())), float(need.max(initial=0.0))), dtype=np.float32)
    else:
        ws = np.asarray(w_scale, dtype=np.float64).reshape(b.shape)
        ws = np.where(ws < need, need, ws).astype(np.float32)
    bscale = (np.float32(x_scale) * ws).astype(np.float32)
    codes = np.clip(np.rint(b / bscale.astype(np.float64)), -INT32_LIMIT, INT32_LIMIT).astype(np.int32)
    return codes, bscale, ws


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """10·log10(Σref² / Σ(ref−test)²); inf when identical."""
    ref = np.asarray(ref, dtype=np.float64)
    noise = float(((ref - np.asarray(test, dtype=np.float64)) ** 2).sum())
    sig = float((ref**2).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(sig, 1e-300) / noise)


# ------------------------------------------------------------------------------------ per-token (run time)
#: the smallest run-time per-token scale (an all-zero row: codes = zero point, dequantized exactly to 0)
PER_TOKEN_MIN_SCALE = np.float32(1e-12)
#: how insert-qdq names the codes, the row scale and the zero point of a per-token form (suffixes of the tensor's
#: name), which a target's lowering reads back
PER_TOKEN_SUFFIXES = (":pt_q", ":pt_s", ":pt_zp")


def per_token_qparams(x: np.ndarray, dtype: str, symmetric: bool,
                      per_row: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Run-time scale and zero point of each row of ``x`` (every axis but the last; ``per_row=False``: the whole
    tensor), float32 with a trailing axis of 1, computed with the float32 operations the graph runs (so the codes
    are bit for bit onnxruntime's): asymmetric ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)``,
    ``s = max((hi − lo) / (qmax − qmin), PER_TOKEN_MIN_SCALE)``, ``z = clip(round(qmin − lo / s), qmin, qmax)``
    (DynamicQuantizeLinear's convention, per row); symmetric ``s = max(max|x| / qmax, …)``, no zero point."""
    dt = qdtype(dtype)
    x = np.asarray(x, dtype=np.float32)
    axis = -1 if per_row else None
    if symmetric:
        absmax = np.abs(x).max(axis=axis, keepdims=True)
        return np.maximum(absmax / np.float32(dt.qmax), PER_TOKEN_MIN_SCALE).astype(np.float32), None
    lo = np.minimum(x.min(axis=axis, keepdims=True), np.float32(0))
    hi = np.maximum(x.max(axis=axis, keepdims=True), np.float32(0))
    s = np.maximum((hi - lo) / np.float32(dt.qmax - dt.qmin), PER_TOKEN_MIN_SCALE).astype(np.float32)
    z = np.clip(np.rint(np.float32(dt.qmin) - lo / s), dt.qmin, dt.qmax).astype(np.float32)
    return s, z


def per_token_codes(x: np.ndarray, dtype: str, symmetric: bool, per_row: bool = True) -> np.ndarray:
    """The integer codes of :func:`per_token_qparams`: ``clip(round(x / s) + z, qmin, qmax)``."""
    dt = qdtype(dtype)
    x = np.asarray(x, dtype=np.float32)
    s, z = per_token_qparams(x, dtype, symmetric, per_row)
    q = np.rint(x / s)
    if z is not None:
        q = q + z
    return np.clip(q, dt.qmin, dt.qmax).astype(dt.np_dtype)


def per_token_dequantize(x: np.ndarray, dtype: str, symmetric: bool, per_row: bool = True) -> np.ndarray:
    """``x`` quantized per token and back: ``(q − z) · s`` (float32)."""
    s, z = per_token_qparams(x, dtype, symmetric, per_row)
    q = per_token_codes(x, dtype, symmetric, per_row).astype(np.float32)
    return ((q - z) * s if z is not None else q * s).astype(np.float32)
