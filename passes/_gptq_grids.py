"""GPTQ's weight grids (private helper of :mod:`qcompiler.passes.gptq`): the (axis, block) a plan spec quantizes
along, the fixed round-to-nearest grid GPTQ keeps the scales of, rounding to a per-row grid, block-wise grids
chosen as the sweep reaches each block, and the proxy loss tr(ΔW·H·ΔWᵀ).
"""

from __future__ import annotations

import numpy as np

from qcompiler import quant
from qcompiler.core.errors import UserError
from qcompiler.plan import QuantSpec

from ._layers import Layer


def _axes(lay: Layer, spec: QuantSpec) -> tuple[int | None, int | None]:
    """(axis, block) as insert-qdq uses them: per-channel on the output axis, blocks along the reduction axis."""
    if spec.granularity == "per_tensor":
        return None, None
    if spec.axis is not None:
        want = lay.out_axis if spec.granularity == "per_channel" else lay.in_axis
        ax = spec.axis % lay.w.ndim
        if ax != want:
            return None, None
    if spec.granularity == "per_channel":
        return lay.out_axis, None
    return lay.in_axis, int(spec.block_size)


def _fixed_grid(w: np.ndarray, spec: QuantSpec, axis: int | None, node: str) -> quant.QuantizedTensor:
    """Round-to-nearest of ``w`` on the plan's grid, whose scales (and zero points) GPTQ keeps: with ``scale:
    float16`` the scales rounded up to float16, as insert-qdq stores them."""
    try:
        return quant.quantize_weight(w, spec.dtype, spec.symmetric, axis, None, spec.range,
                                     f16=spec.scale == "float16")
    except quant.Float16ScaleError as e:
        raise UserError(f"gptq: {f'node {node!r}: ' if node else ''}scale float16: {e}; use scale float for this "
                        "layer") from None


def _proxy(w: np.ndarray, wq: np.ndarray, h: np.ndarray) -> float:
    """tr(ΔW·H·ΔWᵀ) = mean ‖ΔW·x‖² over the calibration rows."""
    d = wq - w
    return float(np.sum((d @ h) * d))


def _rows_of_scale(per_channel: tuple[np.ndarray, np.ndarray], lay: Layer, g: int,
                   out_g: int) -> tuple[np.ndarray, np.ndarray]:
    scale, zp = per_channel
    s = np.asarray(scale, dtype=np.float64).reshape(-1)
    z = np.asarray(zp).astype(np.int64).reshape(-1)
    if s.size == 1:
        return np.full(out_g, s[0]), np.full(out_g, z[0])
    return s[g * out_g:(g + 1) * out_g], z[g * out_g:(g + 1) * out_g]


class _Grid:
    """Rounding to a fixed per-row grid (scale, zero point) of a QuantSpec's dtype."""

    def __init__(self, spec: QuantSpec, scale: np.ndarray, zp: np.ndarray) -> None:
        dt = quant.qdtype(spec.dtype)
        self.qmin, self.qmax = dt.qmin, dt.qmax
        self.scale = np.asarray(scale, dtype=np.float32).astype(np.float64)
        self.zp = np.asarray(zp).astype(np.int64)
        self.s32 = self.scale.astype(np.float32)

    def round(self, col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.rint(col.astype(np.float32) / self.s32).astype(np.int64)
        q += self.zp
        np.maximum(q, self.qmin, out=q)  # np.clip without its Python-level argument checks
        np.minimum(q, self.qmax, out=q)
        return q, ((q - self.zp).astype(np.float32) * self.s32).astype(np.float64)

    def round_matrix(self, m: np.ndarray) -> np.ndarray:
        s32 = self.scale.astype(np.float32)[:, None]
        z = self.zp[:, None]
        q = np.clip(np.rint(m.astype(np.float32) / s32).astype(np.int64) + z, self.qmin, self.qmax)
        return ((q - z).astype(np.float32) * s32).astype(np.float64)


class _BlockGrid:
    """Block-wise grids: columns (tap, in) fall in blocks of ``block`` input channels at one tap; a block's
    (scale, zero point) per row is chosen when the sweep reaches its first column, from the current weights."""

    def __init__(self, spec: QuantSpec, block: int, in_g: int, taps: int, rows: int) -> None:
        self.spec = spec
        self.block = block
        self.in_g = in_g
        self.nb = -(-in_g // block)
        self.scales = np.zeros((rows, taps * self.nb), dtype=np.float32)
        self.zps = np.zeros((rows, taps * self.nb), dtype=np.int64)
        self._grids: dict[int, _Grid] = {}

    def _id(self, col: int) -> tuple[int, int, int]:
        tap, c = divmod(col, self.in_g)
        b = c // self.block
        return tap * self.nb + b, tap * self.in_g + b * self.block, tap * self.in_g + min((b + 1) * self.block, self.in_g)

    def start(self, col: int, w1: np.ndarray, w: np.ndarray, i1: int, i: int) -> None:
        bid, lo, hi = self._id(col)
        if bid in self._grids:
            return
        # current values of the block's columns: inside the lazy block from w1, beyond it from w
        width = w1.shape[1]
        cols = []
        for c in range(lo, hi):
            cols.append(w1[:, c - i1] if i1 <= c < i1 + width else w[:, c])
        vals = np.stack(cols, axis=1).astype(np.float32)
        ref = _fixed_grid(vals, self.spec, 0, "")
        s, z = np.asarray(ref.scale).reshape(-1), np.asarray(ref.zero_point).astype(np.int64).reshape(-1)
        self.scales[:, bid] = s
        self.zps[:, bid] = z
        self._grids[bid] = _Grid(self.spec, s, z)

    def grid(self, col: int) -> _Grid:
        return self._grids[self._id(col)[0]]
