"""Bit-packed weight formats of the ``packed`` target (domain ``ai.qcompiler``, version 1).

A weight of shape ``shape`` is flattened row-major (C order, in the float op's own weight layout: Conv
``[C_out, C_in/group, k…]``, MatMul ``[K, N]``, Gemm ``B`` as stored) and each element becomes a fixed-width
*field*; fields are packed little-endian into bytes — element ``i`` occupies bits ``[(i mod F)·w, (i mod F + 1)·w)``
of byte ``i div F`` (``F = 8 / w`` fields per byte). The last byte is padded (padding decodes to 0 / is ignored).

==========  =====  ===========================================================================================
scheme      width  field → integer code (the op multiplies codes by the per-channel ``alpha``)
==========  =====  ===========================================================================================
binary      1      bit 1 → +1, bit 0 → −1                        (8 weights per byte)
ternary     2      f ∈ {0, 1, 2} → f − 1 ∈ {−1, 0, +1}          (4 weights per byte; 3 is invalid)
shift       4      f = (σ<0)·8 + e, e ∈ 0..7 → σ·2^e             (2 weights per byte; sign bit 3, exponent 0–2)
==========  =====  ===========================================================================================

The integer codes are exactly those :mod:`qcompiler.schemes` gives ``DequantizeLinear`` on the ``ort`` target
(binary ±1, ternary −1/0/+1, shift ±2^j), so both targets compute with identical weights.
"""

from __future__ import annotations

import numpy as np

#: bits per weight of each packed scheme
FIELD_BITS = {"binary": 1, "ternary": 2, "shift": 4}
#: largest exponent a shift field holds (codes up to ±2^7)
SHIFT_MAX_EXP = 7


def packed_size(numel: int, scheme: str) -> int:
    """Bytes of a packed weight with ``numel`` elements."""
    per = 8 // FIELD_BITS[scheme]
    return -(-numel // per)


def pack_fields(fields: np.ndarray, width: int) -> np.ndarray:
    """Pack unsigned ``width``-bit fields (flattened, C order) into uint8, little-endian within each byte."""
    f = np.asarray(fields, dtype=np.uint8).reshape(-1)
    if f.size and int(f.max()) >= (1 << width):
        raise ValueError(f"field value {int(f.max())} does not fit {width} bits")
    per = 8 // width
    pad = (-f.size) % per
    if pad:
        f = np.concatenate([f, np.zeros(pad, dtype=np.uint8)])
    rows = f.reshape(-1, per).astype(np.uint16)
    shifts = (np.arange(per, dtype=np.uint16) * width)[None, :]
    return (rows << shifts).sum(axis=1).astype(np.uint8)


def unpack_fields(packed: np.ndarray, width: int, numel: int) -> np.ndarray:
    """Inverse of :func:`pack_fields`: the first ``numel`` fields (uint8)."""
    p = np.asarray(packed, dtype=np.uint8).reshape(-1, 1)
    per = 8 // width
    shifts = (np.arange(per, dtype=np.uint8) * width)[None, :]
    f = (p >> shifts) & np.uint8((1 << width) - 1)
    out = f.reshape(-1)
    if out.size < numel:
        raise ValueError(f"{p.size} packed bytes hold {out.size} fields, fewer than {numel}")
    return out[:numel]


def encode(scheme: str, codes: np.ndarray) -> np.ndarray:
    """Integer codes → fields; raises ``ValueError`` for a code the scheme cannot hold."""
    c = np.asarray(codes).astype(np.int64)
    if scheme == "binary":
        if not np.all(np.abs(c) == 1):
            raise ValueError("binary codes must be -1 or +1")
        return (c > 0).astype(np.uint8)
    if scheme == "ternary":
        if not np.all(np.abs(c) <= 1):
            raise ValueError("ternary codes must be -1, 0 or +1")
        return (c + 1).astype(np.uint8)
    if scheme == "shift":
        mag = np.abs(c)
        e = np.zeros(c.shape, dtype=np.int64)
        ok = mag > 0
        e[ok] = np.round(np.log2(mag[ok])).astype(np.int64)
        if not (np.all(ok) and np.all(np.left_shift(1, e) == mag) and int(e.max(initial=0)) <= SHIFT_MAX_EXP):
            raise ValueError(f"shift codes must be +-2^e with 0 <= e <= {SHIFT_MAX_EXP}")
        return ((c < 0).astype(np.int64) * 8 + e).astype(np.uint8)
    raise ValueError(f"unknown packed scheme {scheme!r}")


def decode(scheme: str, fields: np.ndarray) -> np.ndarray:
    """Fields → integer codes (int16)."""
    f = np.asarray(fields).astype(np.int16)
    if scheme == "binary":
        return (2 * f - 1).astype(np.int16)
    if scheme == "ternary":
        return (f - 1).astype(np.int16)
    if scheme == "shift":
        return ((1 - 2 * (f >> 3)) * (1 << (f & 7))).astype(np.int16)
    raise ValueError(f"unknown packed scheme {scheme!r}")


def pack(scheme: str, codes: np.ndarray) -> np.ndarray:
    """Integer codes (any shape) → packed uint8 bytes (1-D)."""
    return pack_fields(encode(scheme, codes), FIELD_BITS[scheme])


def unpack(scheme: str, packed: np.ndarray, shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """Packed bytes → integer codes of ``shape`` (int16)."""
    shape = tuple(int(d) for d in shape)
    numel = int(np.prod(shape, dtype=np.int64))
    return decode(scheme, unpack_fields(packed, FIELD_BITS[scheme], numel)).reshape(shape)
