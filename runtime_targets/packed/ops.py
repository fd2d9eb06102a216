"""numpy reference implementations of the ``ai.qcompiler`` ops (what a native kernel must compute).

Every op computes, in float32 and in this order (so that a bit-exact comparison is meaningful)::

    Y = Op(X', codes) · scale · s [+ bias]        X' = X, s = 1              when input_scale == 0
                                                  X' = sign(X) (±1), s = input_scale  otherwise (sign(0) = +1)

with ``codes`` the integer weights unpacked from the packed bytes (:mod:`.packing`). ``Op`` is Conv (N-d,
groups, strides, pads / auto_pad, dilations), Gemm (alpha, transA, transB; the bias is ``beta · C``, added last)
or MatMul.

Binary weights with a binary input (XNOR layers) take the **popcount path**: X' and the codes are turned into
bits (1 = +1), packed 8 per byte along the reduction axis, and each dot product is
``n − 2·popcount((x_bits XOR w_bits) AND valid)`` (``np.bitwise_count``), where ``valid`` masks the zero
padding of a convolution and ``n`` counts the valid taps — integer-exact. Every other case uses a float32
im2col + matmul.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from qcompiler.runtime_targets.packed.functions import OPS
from qcompiler.runtime_targets.packed.packing import unpack


# ------------------------------------------------------------------------------------------------ conv
def _conv_geometry(x_shape: Sequence[int], k_shape: Sequence[int], attrs: dict[str, Any]
                   ) -> tuple[list[int], list[int], list[int]]:
    nd = len(k_shape)
    strides = list(attrs.get("strides") or [1] * nd)
    dilations = list(attrs.get("dilations") or [1] * nd)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for i in range(nd):
            size = int(x_shape[2 + i])
            out = -(-size // strides[i])
            eff = (k_shape[i] - 1) * dilations[i] + 1
            total = max(0, (out - 1) * strides[i] + eff - size)
            small, big = total // 2, total - total // 2
            pads_b.append(small if auto_pad == "SAME_UPPER" else big)
            pads_e.append(big if auto_pad == "SAME_UPPER" else small)
        pads = pads_b + pads_e
    elif auto_pad == "VALID":
        pads = [0] * (2 * nd)
    else:
        pads = list(attrs.get("pads") or [0] * (2 * nd))
    return strides, pads, dilations


def _windows(x: np.ndarray, k_shape: Sequence[int], strides: list[int], pads: list[int], dilations: list[int]
             ) -> np.ndarray:
    """[N, C, O1.., k1..] view of every receptive field (zero padded)."""
    nd = len(k_shape)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    eff = [(k_shape[i] - 1) * dilations[i] + 1 for i in range(nd)]
    win = sliding_window_view(xp, eff, axis=tuple(range(2, 2 + nd)))
    sl = (slice(None), slice(None), *(slice(None, None, s) for s in strides), *(slice(None, None, d) for d in dilations))
    return win[sl]


def _im2col(x: np.ndarray, k_shape: Sequence[int], strides: list[int], pads: list[int], dilations: list[int]
            ) -> tuple[np.ndarray, tuple[int, ...]]:
    """[N, P, C·prod(k)] patches (C, then kernel offsets, as the weight is laid out) and the output dims."""
    nd = len(k_shape)
    win = _windows(x, k_shape, strides, pads, dilations)
    n, c = win.shape[:2]
    out_dims = tuple(win.shape[2:2 + nd])
    order = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    cols = np.ascontiguousarray(win.transpose(order)).reshape(n, int(np.prod(out_dims)), c * int(np.prod(k_shape)))
    return cols, out_dims


def _popcount_dot(xb: np.ndarray, wb: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """Σ x·w over ±1 operands given as bits (1 = +1): n − 2·popcount((x XOR w) AND valid).

    ``xb`` [..., P, K] bool, ``wb`` [M, K] bool, ``valid`` [P, K] bool or None -> int64 [..., P, M].
    """
    k = xb.shape[-1]
    xp = np.packbits(xb, axis=-1, bitorder="little")
    wp = np.packbits(wb, axis=-1, bitorder="little")
    diff = np.bitwise_xor(xp[..., :, None, :], wp)  # [..., P, M, Kb]
    if valid is None:
        pop = np.bitwise_count(diff).sum(axis=-1, dtype=np.int64)
        return k - 2 * pop
    vp = np.packbits(valid, axis=-1, bitorder="little")
    pop = np.bitwise_count(diff & vp[:, None, :]).sum(axis=-1, dtype=np.int64)
    n_valid = valid.sum(axis=-1, dtype=np.int64)[:, None]
    return n_valid - 2 * pop


def conv(x: np.ndarray, codes: np.ndarray, attrs: dict[str, Any], *, xnor: bool = False) -> np.ndarray:
    """Conv of ``x`` (float32; ±1 when ``xnor``) with integer ``codes`` [C_out, C_in/g, k…] -> float32.

    ``xnor``: both operands ±1 — computed with XOR + popcount on packed bits (exact integers)."""
    x = np.asarray(x, dtype=np.float32)
    k_shape = list(codes.shape[2:])
    group = int(attrs.get("group", 1) or 1)
    strides, pads, dilations = _conv_geometry(x.shape, k_shape, attrs)
    c_out, c_in_g = codes.shape[:2]
    n = x.shape[0]
    outs = []
    valid = None
    if xnor:
        ones = np.ones((1, 1, *x.shape[2:]), dtype=np.uint8)
        vcols, _ = _im2col(ones, k_shape, strides, pads, dilations)  # [1, P, prod(k)]
        valid_k = vcols[0].astype(bool)
        valid = np.tile(valid_k, (1, c_in_g))  # [P, C_in_g·prod(k)] in (C, k) order
    cout_g = c_out // group
    for g in range(group):
        xg = x[:, g * c_in_g:(g + 1) * c_in_g]
        cols, out_dims = _im2col(xg, k_shape, strides, pads, dilations)  # [N, P, K]
        wg = codes[g * cout_g:(g + 1) * cout_g].reshape(cout_g, -1)
        if xnor:
            yg = _popcount_dot(cols >= 0, wg > 0, valid).astype(np.float32)
        else:
            yg = np.matmul(cols, wg.astype(np.float32).T)
        outs.append(yg)  # [N, P, cout_g]
    y = np.concatenate(outs, axis=-1)  # [N, P, C_out]
    return np.ascontiguousarray(y.transpose(0, 2, 1)).reshape(n, c_out, *out_dims).astype(np.float32)


# ---------------------------------------------------------------------------------------------- matmul
def matmul(a: np.ndarray, codes: np.ndarray, *, xnor: bool = False) -> np.ndarray:
    """MatMul of ``a`` [..., K] with integer ``codes`` [K, N] (or batched [..., K, N]) -> float32."""
    a = np.asarray(a, dtype=np.float32)
    if xnor and codes.ndim == 2:
        lead = a.shape[:-1]
        ab = (a >= 0).reshape(-1, a.shape[-1])
        y = _popcount_dot(ab, (codes > 0).T, None)  # [rows, N]
        return y.astype(np.float32).reshape(*lead, codes.shape[1])
    return np.matmul(a, codes.astype(np.float32)).astype(np.float32)


def gemm(a: np.ndarray, codes: np.ndarray, attrs: dict[str, Any], *, xnor: bool = False) -> np.ndarray:
    """alpha · A'·B' of Gemm (no bias) with integer ``codes`` as B."""
    a = np.asarray(a, dtype=np.float32)
    if int(attrs.get("transA", 0)):
        a = a.T
    b = codes.T if int(attrs.get("transB", 0)) else codes
    y = matmul(a, np.ascontiguousarray(b), xnor=xnor)
    alpha = np.float32(attrs.get("alpha", 1.0))
    return y if alpha == 1 else (y * alpha).astype(np.float32)


# --------------------------------------------------------------------------------------------- the ops
def sign_pm1(x: np.ndarray) -> np.ndarray:
    """±1 with sign(0) = +1 (float32)."""
    return np.where(np.asarray(x) < 0, np.float32(-1), np.float32(1)).astype(np.float32)


def run(op_type: str, inputs: Sequence[np.ndarray | None], attrs: dict[str, Any]) -> np.ndarray:
    """Reference output of ``ai.qcompiler`` op ``op_type`` for ``inputs`` (as in the node) and ``attrs``."""
    if op_type not in OPS:
        raise KeyError(f"unknown ai.qcompiler op {op_type!r}")
    scheme, float_op = OPS[op_type]
    x, packed, scale = inputs[0], inputs[1], inputs[2]
    assert x is not None and packed is not None and scale is not None
    shape = [int(d) for d in attrs["shape"]]
    codes = unpack(scheme, np.asarray(packed), shape)
    s_in = float(attrs.get("input_scale", 0.0))
    binary_in = s_in > 0
    x_in = sign_pm1(x) if binary_in else np.asarray(x, dtype=np.float32)
    xnor = binary_in and scheme == "binary"
    if float_op == "Conv":
        y = conv(x_in, codes, attrs, xnor=xnor)
    elif float_op == "Gemm":
        y = gemm(x_in, codes, attrs, xnor=xnor)
    else:
        y = matmul(x_in, codes, xnor=xnor)
    y = (y * np.asarray(scale, dtype=np.float32)).astype(np.float32)
    y = (y * np.float32(s_in if binary_in else 1.0)).astype(np.float32)
    if float_op == "Conv":
        b = inputs[3]
        assert b is not None
        y = (y + np.asarray(b, dtype=np.float32).reshape(np.shape(scale))).astype(np.float32)
    elif float_op == "Gemm":
        c = inputs[3]
        assert c is not None
        y = (y + np.asarray(c, dtype=np.float32) * np.float32(attrs.get("beta", 1.0))).astype(np.float32)
    return y


def weight(op_type: str, packed: np.ndarray, scale: np.ndarray, shape: Sequence[int], axis: int) -> np.ndarray:
    """The float weight an op computes with: codes · scale, the scale running along ``axis`` of the weight
    (Conv 0, MatMul the last, Gemm 0 with transB else 1)."""
    scheme, _ = OPS[op_type]
    codes = unpack(scheme, packed, tuple(shape)).astype(np.float32)
    s = np.asarray(scale, dtype=np.float32).reshape(-1)
    bshape = [1] * codes.ndim
    bshape[axis] = -1
    return codes * (s.reshape(bshape) if s.size > 1 else s.reshape(()))
