"""Bit-packed weight formats of the ``packed`` target (domain ``ai.qcompiler``, version 1).

A weight of shape ``shape`` is flattened row-major (C order, in the float op's own weight layout: Conv
``[C_out, C_in/group, k…]``, MatMul ``[K, N]``, Gemm ``B`` as stored) and each element becomes a fixed-width
*field*; fields are packed little-endian into a bit stream — element ``i`` occupies stream bits
``[i·w, (i + 1)·w)``, stream bit ``b`` is bit ``b mod 8`` of byte ``b div 8``. For ``w`` dividing 8 that is
field ``i`` at bits ``[(i mod F)·w, (i mod F + 1)·w)`` of byte ``i div F`` (``F = 8 / w`` fields per byte); 3-bit
fields fill groups of 3 bytes (8 fields, 24 bits). The stream is padded with zero bits to whole groups of
``lcm(8, w)`` bits (padding is ignored).

==========  =====  ===========================================================================================
scheme      width  field → integer code (the op multiplies codes by the per-channel ``alpha``)
==========  =====  ===========================================================================================
binary      1      bit 1 → +1, bit 0 → −1                        (8 weights per byte)
ternary     2      f ∈ {0, 1, 2} → f − 1 ∈ {−1, 0, +1}          (4 weights per byte; 3 is invalid)
shift       4      f = (σ<0)·8 + e, e ∈ 0..7 → σ·2^e             (2 weights per byte; sign bit 3, exponent 0–2)
shift3      3      f = (σ<0)·4 + e, e ∈ 0..3 → σ·2^e             (8 weights per 3 bytes; 3-bit shift weights)
shift2      2      f = (σ<0)·2 + e, e ∈ 0..1 → σ·2^e             (4 weights per byte; 2-bit shift weights)
int3        3      f ∈ 0..7 → 2f − 7 ∈ {±1, ±3, ±5, ±7}          (8 weights per 3 bytes; uniform 3-bit weights)
int2        2      f ∈ 0..3 → 2f − 3 ∈ {±1, ±3}                  (4 weights per byte; uniform 2-bit weights)
==========  =====  ===========================================================================================

``shift`` holds codes of every shift width (``bits`` 2–4 of :mod:`qcompiler.quant.schemes`); ``shift3`` and ``shift2``
hold exactly the codes of 3- and 2-bit shift weights (±1…±8, ±1/±2) at their own width, which the lowering
uses for them. ``int3`` and ``int2`` hold the odd codes of the ``uniform`` scheme (mid-rise levels
(q + ½)·Δ, stored as c = 2q + 1 with scale Δ/2).

The integer codes are exactly those :mod:`qcompiler.quant.schemes` gives ``DequantizeLinear`` on the ``ort`` target
(binary ±1, ternary −1/0/+1, shift ±2^j), so both targets compute with identical weights.
"""

from __future__ import annotations

import math

import numpy as np

#: bits per weight of each packed scheme
FIELD_BITS = {"binary": 1, "ternary": 2, "shift": 4, "shift3": 3, "shift2": 2, "int3": 3, "int2": 2}
#: largest exponent a shift field holds (codes up to ±2^7); shift3 / shift2: 3 / 1
SHIFT_MAX_EXP = 7
#: exponent bits of the narrow shift formats
_NARROW_SHIFT = {"shift3": 2, "shift2": 1}
#: the uniform scheme's formats (odd codes c = 2f − (2^w − 1))
_UNIFORM = ("int3", "int2")


def scheme_format(scheme: str, bits: int) -> str:
    """The packed format of a low-bit weight scheme: shift by its bits (:func:`shift_format`), uniform
    ``int3`` / ``int2``, binary / ternary as named."""
    if scheme == "shift":
        return shift_format(bits)
    if scheme == "uniform":
        return f"int{int(bits)}"
    return scheme


def group_bits(width: int) -> int:
    """Bits of one packing group: ``lcm(8, width)`` (a byte for 1, 2, 4 and 8; 3 bytes for 3-bit fields)."""
    return 8 * width // math.gcd(8, width)


def packed_size(numel: int, scheme: str) -> int:
    """Bytes of a packed weight with ``numel`` elements (whole groups of :func:`group_bits`)."""
    g = group_bits(FIELD_BITS[scheme])
    return -(-numel * FIELD_BITS[scheme] // g) * (g // 8)


def shift_format(bits: int) -> str:
    """The packed format of ``bits``-bit shift weights: ``shift2`` / ``shift3`` at their width, ``shift`` (4)."""
    return {2: "shift2", 3: "shift3"}.get(int(bits), "shift")


def pack_fields(fields: np.ndarray, width: int) -> np.ndarray:
    """Pack unsigned ``width``-bit fields (flattened, C order) into uint8: a little-endian bit stream, padded
    with zero bits to whole groups of :func:`group_bits`."""
    f = np.asarray(fields, dtype=np.uint8).reshape(-1)
    if f.size and int(f.max()) >= (1 << width):
        raise ValueError(f"field value {int(f.max())} does not fit {width} bits")
    per = group_bits(width) // width
    pad = (-f.size) % per
    if pad:
        f = np.concatenate([f, np.zeros(pad, dtype=np.uint8)])
    bits = ((f[:, None] >> np.arange(width, dtype=np.uint8)[None, :]) & np.uint8(1)).reshape(-1)
    return np.packbits(bits, bitorder="little")


def unpack_fields(packed: np.ndarray, width: int, numel: int) -> np.ndarray:
    """Inverse of :func:`pack_fields`: the first ``numel`` fields (uint8)."""
    p = np.asarray(packed, dtype=np.uint8).reshape(-1)
    have = p.size * 8 // width
    if have < numel:
        raise ValueError(f"{p.size} packed bytes hold {have} fields, fewer than {numel}")
    bits = np.unpackbits(p, bitorder="little")[: numel * width].reshape(numel, width)
    return (bits << np.arange(width, dtype=np.uint8)[None, :]).sum(axis=1).astype(np.uint8)


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
    if scheme in _NARROW_SHIFT:
        eb = _NARROW_SHIFT[scheme]
        mag = np.abs(c)
        e = np.zeros(c.shape, dtype=np.int64)
        ok = mag > 0
        e[ok] = np.round(np.log2(mag[ok])).astype(np.int64)
        if not (np.all(ok) and np.all(np.left_shift(1, e) == mag) and int(e.max(initial=0)) < (1 << eb)):
            raise ValueError(f"{scheme} codes must be +-2^e with 0 <= e < {1 << eb}")
        return ((c < 0).astype(np.int64) * (1 << eb) + e).astype(np.uint8)
    if scheme in _UNIFORM:
        top = (1 << FIELD_BITS[scheme]) - 1
        if not (np.all(np.abs(c) <= top) and np.all(c % 2 == 1)):
            raise ValueError(f"{scheme} codes must be odd integers in [-{top}, {top}]")
        return ((c + top) // 2).astype(np.uint8)
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
    if scheme in _UNIFORM:
        return (2 * f - ((1 << FIELD_BITS[scheme]) - 1)).astype(np.int16)
    if scheme in _NARROW_SHIFT:
        eb = _NARROW_SHIFT[scheme]
        return ((1 - 2 * (f >> eb)) * (1 << (f & ((1 << eb) - 1)))).astype(np.int16)
    raise ValueError(f"unknown packed scheme {scheme!r}")


def pack(scheme: str, codes: np.ndarray) -> np.ndarray:
    """Integer codes (any shape) → packed uint8 bytes (1-D)."""
    return pack_fields(encode(scheme, codes), FIELD_BITS[scheme])


def unpack(scheme: str, packed: np.ndarray, shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """Packed bytes → integer codes of ``shape`` (int16)."""
    shape = tuple(int(d) for d in shape)
    numel = int(np.prod(shape, dtype=np.int64))
    return decode(scheme, unpack_fields(packed, FIELD_BITS[scheme], numel)).reshape(shape)
