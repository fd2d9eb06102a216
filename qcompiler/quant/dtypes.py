"""The one table of quantized dtypes: name, numpy element type, code range and bits.

Every dtype a plan may name (:data:`DTYPES`), the integer code range and storage bits of each
(:data:`QDTYPES`), the bit widths the low-bit schemes take (:data:`SHIFT_BITS`, :data:`UNIFORM_BITS`) and the
storage types of scheme codes (:data:`CODE_STORAGE_BITS`) live here; plan validation, the quantizers, the
calibration and the cost model read them from this module instead of keeping their own copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class QDType:
    name: str
    np_dtype: Any
    qmin: float
    qmax: float
    is_float: bool = False
    bits: int = 8

    @property
    def signed(self) -> bool:
        return self.qmin < 0


QDTYPES: dict[str, QDType] = {
    "int8": QDType("int8", np.int8, -128, 127, bits=8),
    "uint8": QDType("uint8", np.uint8, 0, 255, bits=8),
    "int16": QDType("int16", np.int16, -32768, 32767, bits=16),
    "uint16": QDType("uint16", np.uint16, 0, 65535, bits=16),
    "int4": QDType("int4", ml_dtypes.int4, -8, 7, bits=4),
    "uint4": QDType("uint4", ml_dtypes.uint4, 0, 15, bits=4),
    "fp8e4m3": QDType("fp8e4m3", ml_dtypes.float8_e4m3fn, -448.0, 448.0, is_float=True, bits=8),
    "fp8e5m2": QDType("fp8e5m2", ml_dtypes.float8_e5m2, -57344.0, 57344.0, is_float=True, bits=8),
}

#: the dtypes a plan's ``dtype:`` may name, in the order error messages list them (``float``: keep float)
DTYPES = ("int8", "uint8", "int16", "uint16", "int4", "uint4", "fp8e4m3", "fp8e5m2", "float")
#: the fp8 dtypes
FP8_DTYPES = ("fp8e4m3", "fp8e5m2")
#: shift scheme: sign bit + bits-1 exponent bits (2**(bits-1) exponents, at most 8)
SHIFT_BITS = (2, 3, 4)
#: uniform scheme (mid-rise, 2^bits levels symmetric around zero: int3 / int2 candidates of the planner)
UNIFORM_BITS = (2, 3)
#: signed integer types that store low-bit scheme codes -> bits per element
CODE_STORAGE_BITS = {"int4": 4, "int8": 8, "int16": 16, "int32": 32}

#: numpy dtypes of quantized codes (the element types of :data:`QDTYPES`)
CODE_DTYPES = frozenset(np.dtype(d.np_dtype) for d in QDTYPES.values())


def is_code_dtype(dtype: Any) -> bool:
    """``dtype`` is the element type of quantized codes (int8 / uint8 / int16 / uint16 / int4 / uint4 / fp8)."""
    return dtype is not None and np.dtype(dtype) in CODE_DTYPES


def qdtype(name: str) -> QDType:
    try:
        return QDTYPES[name]
    except KeyError:
        raise ValueError(f"unknown quantized dtype {name!r}") from None


def int_bits(name: str) -> int | None:
    """Bit width of an integer dtype name (``int4`` -> 4); None for fp8, ``float`` and unknown names."""
    dt = QDTYPES.get(name)
    return None if dt is None or dt.is_float else dt.bits
