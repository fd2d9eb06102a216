"""Bits and bytes of stored values: storage width of a dtype, stored bytes of a tensor, the bits a quantization
spec stands for and the effective bits of integer weight codes (binary / ternary / shift / int).

Part of the cost model (:mod:`qcompiler.report.cost`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from qcompiler.quant import QDTYPES

if TYPE_CHECKING:
    from qcompiler.plan import QuantSpec

FLOAT_BITS = 32
# sub-byte code types from the one dtype table (int4 / uint4), plus fp4 where ml_dtypes has it
_SUBBYTE = {np.dtype(d.np_dtype): d.bits for d in QDTYPES.values() if d.bits < 8}
for _name in ("float4_e2m1fn",):
    if hasattr(ml_dtypes, _name):
        _SUBBYTE[np.dtype(getattr(ml_dtypes, _name))] = 4


def dtype_bits(dtype: Any) -> int:
    """Storage bits of one element of a numpy / ml_dtypes dtype (int4 / uint4: 4)."""
    dt = np.dtype(dtype)
    return _SUBBYTE.get(dt, dt.itemsize * 8)


def stored_bytes(shape: Sequence[Any], dtype: Any) -> int:
    """Bytes a tensor of ``shape`` and ``dtype`` takes as stored in an ONNX file (4-bit types packed)."""
    n = 1
    for d in shape:
        n *= int(d)
    return (n * dtype_bits(dtype) + 7) // 8


def spec_bits(spec: QuantSpec | None) -> int:
    """Bits per element a (weight or activation) spec stands for: float 32; int dtypes from QDTYPES;
    schemes binary 1, ternary 2, shift and uniform ``bits``."""
    if spec is None or spec.is_float:
        return FLOAT_BITS
    if spec.scheme == "binary":
        return 1
    if spec.scheme == "ternary":
        return 2
    if spec.scheme in ("shift", "uniform"):
        return int(spec.bits)
    return QDTYPES[spec.dtype].bits


def code_bits(codes: np.ndarray, zero_point: np.ndarray | None, dtype_width: int) -> tuple[int, str]:
    """Effective bits of integer weight codes (and the scheme they reveal): binary, ternary, shift or int."""
    q = np.asarray(codes).astype(np.int64)
    if zero_point is not None and np.size(zero_point) and np.any(np.asarray(zero_point).astype(np.int64)):
        return dtype_width, "int"
    if q.size == 0:
        return dtype_width, "int"
    lo, hi = int(q.min()), int(q.max())
    if lo >= -1 and hi <= 1:
        if not np.any(q == 0) and lo == -1 and hi == 1:
            return 1, "binary"
        if lo == -1 and hi == 1:
            return 2, "ternary"
        return dtype_width, "int"
    mag = np.abs(q)
    if np.all(mag > 0):
        # nonzero powers of two only: sign + exponent window
        is_pow2 = np.all((mag & (mag - 1)) == 0)
        if is_pow2:
            exps = np.unique(np.round(np.log2(mag)).astype(np.int64))
            window = int(exps.max() - exps.min() + 1)
            bits = 1 + max(1, math.ceil(math.log2(window))) if window > 1 else 2
            return min(bits, dtype_width), "shift"
    return dtype_width, "int"
