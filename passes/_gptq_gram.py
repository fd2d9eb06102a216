"""GPTQ's Hessian of a stride-1 Conv from shifted products of its input, without unfolding it (for :mod:`.gptq`).

For a Conv of stride 1 the unfolded rows (:func:`._gptq_rows._cols`, K ordered (tap, channel)) repeat the input:
the block of ``H = XᵀX`` for taps ``t, t'`` is ``B(t, t') = Σ_{u ∈ box(t)} z[:, u] · z[:, u + δ]ᵀ`` with ``z`` the
zero-padded input, ``δ = (t' − t)·dilation`` and ``box(t)`` the input positions tap ``t`` reads (the output
positions shifted by ``t·dilation``). Every pair of taps with the same ``δ`` reads the same products over boxes that
differ only in a border of at most ``(k − 1)·dilation`` positions per dimension. So, per distinct ``δ`` (half of
them: ``B(t', t) = B(t, t')ᵀ``):

    F_δ = Σ_{all u} z[:, u] · z[:, u + δ]ᵀ     one GEMM of the flattened input with itself shifted by δ's offset
    B(t, t') = F_δ − Σ_{u ∉ box(t)} ...        the few border slabs subtracted, one dimension after the other

``z`` carries a zero margin of the kernel's span after every spatial dimension, so that a flattened shift never
pairs two nonzero values across a row (or image) boundary, and ``F_δ`` needs no copy: two strided views of one
array. Each sample's float32 ``F_δ`` and border slabs are summed in float64 per ``δ`` and per tap pair
(:class:`ConvGram`); ``H`` is assembled from those sums once, after the last sample. Arithmetic: a 3×3 Conv needs
13 ``cg × cg`` GEMMs over the positions where the unfolding needs one ``9cg × 9cg`` SYRK (about 3× fewer
multiply-adds) and no 9× copy of its input; a 1-D kernel of 3, 3 GEMMs for one ``3cg × 3cg`` SYRK. The values are
those of ``XᵀX`` in exact arithmetic; in float32 they differ from the unfolding's by rounding (sums in another
order, the borders subtracted: relative to the block's magnitude, a few float32 ulps; tests/test_gptq_gram.py
holds them to the float64 product of the rows). One thing rounding must not touch: GPTQ takes an input whose
``H_ii`` is exactly 0 as dead, and a subtraction leaves a residue where a tap reads only zeros of a channel that is
nonzero elsewhere (silero-vad's encoder.3 sees one position: its outer taps read only padding) — so which inputs a
tap ever reads nonzero is counted exactly (integer summed-area tables of the nonzeros) and the others' rows and
columns are set to 0. Used where it pays: stride 1, ``cg >= MIN_CHANNELS`` input channels per group, more than one
tap; every other Conv (strided, depthwise, 1×1) and MatMul / Gemm keep the unfolding.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from ._gptq_rows import _conv_geometry
from ._layers import Layer

#: the shifted products pay from this many input channels per group (below: small GEMMs, the unfolding is as fast)
MIN_CHANNELS = 16


def eligible(lay: Layer) -> bool:
    """Whether :class:`ConvGram` computes this layer's Hessian (stride-1 Conv, several taps, enough channels)."""
    if lay.op != "Conv":
        return False
    node = lay.node
    w = lay.w
    nd = w.ndim - 2
    if nd < 1 or int(np.prod(w.shape[2:])) < 2 or int(w.shape[1]) < MIN_CHANNELS:
        return False
    return all(int(s) == 1 for s in node.attrs.get("strides", [1] * nd))


class ConvGram:
    """The running sums behind one layer's ``H`` over the samples added so far: per distinct ``δ`` the float64 sum
    of the samples' float32 ``F_δ``, per tap pair with border slabs the float64 sum of the slabs. :meth:`total`
    assembles ``H`` once, at the end (a sample costs 13 ``cg × cg`` sums instead of one ``K × K``)."""

    def __init__(self, lay: Layer) -> None:
        self.lay = lay
        self.rows = 0
        self.full: dict[tuple[int, ...], np.ndarray] = {}
        self.border: dict[tuple[int, int], np.ndarray] = {}
        #: [groups, taps, cg]: whether the input channel was ever nonzero where the tap reads it (exactly: counts)
        self.alive: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        """Add the sample ``x`` ([N, C, *spatial], float32)."""
        kshape, _strides, dil, pads = _conv_geometry(self.lay.node, tuple(x.shape[2:]))
        nd = len(kshape)
        n, c = int(x.shape[0]), int(x.shape[1])
        groups = self.lay.groups
        cg = c // groups
        span = [(kshape[d] - 1) * dil[d] for d in range(nd)]
        padded = [int(x.shape[2 + d]) + pads[d] + pads[d + nd] for d in range(nd)]
        outs = [padded[d] - span[d] for d in range(nd)]
        if min(outs) <= 0:
            return
        self.rows += n * int(np.prod(outs))
        # z: [groups, cg, N, *padded + span] (a zero margin of the span after every dimension)
        z = np.zeros((groups, cg, n, *(padded[d] + span[d] for d in range(nd))), dtype=np.float32)
        inner = tuple(slice(pads[d], pads[d] + int(x.shape[2 + d])) for d in range(nd))
        z[(slice(None), slice(None), slice(None), *inner)] = x.reshape(n, groups, cg, *x.shape[2:]).transpose(
            1, 2, 0, *range(3, 3 + nd))
        flat = z.reshape(groups, cg, -1)
        step = [int(np.prod(z.shape[4 + d:], dtype=np.int64)) for d in range(nd)]  # flat stride of spatial dim d
        lo = [pads[d] for d in range(nd)]  # the data's box in z's spatial coordinates
        hi = [pads[d] + int(x.shape[2 + d]) - 1 for d in range(nd)]
        taps = list(itertools.product(*(range(k) for k in kshape)))
        alive = _alive(x, taps, [-pads[d] for d in range(nd)], dil, outs, groups)
        self.alive = alive if self.alive is None else self.alive | alive
        seen: set[tuple[int, ...]] = set()
        for a, ta in enumerate(taps):
            for b in range(a, len(taps)):
                tb = taps[b]
                delta = tuple((tb[d] - ta[d]) * dil[d] for d in range(nd))
                if delta not in seen:
                    seen.add(delta)
                    _add(self.full, delta, _shifted(flat, sum(delta[d] * step[d] for d in range(nd))))
                # the box tap ta reads, within the positions where both z[u] and z[u + δ] may be nonzero: what
                # F_δ sums over it does not read is peeled, one dimension after the other
                have = [(max(lo[d], lo[d] - delta[d]), min(hi[d], hi[d] - delta[d])) for d in range(nd)]
                want = [(max(have[d][0], ta[d] * dil[d]), min(have[d][1], ta[d] * dil[d] + outs[d] - 1))
                        for d in range(nd)]
                if any(w0 > w1 for w0, w1 in want):
                    want = [(have[d][0], have[d][0] - 1) if d == 0 else have[d] for d in range(nd)]  # all of it
                cur = list(have)
                for d in range(nd):
                    for s0, s1 in ((cur[d][0], want[d][0] - 1), (want[d][1] + 1, cur[d][1])):
                        if s0 <= s1:
                            _add(self.border, (a, b), _region(z, [*cur[:d], (s0, s1), *cur[d + 1:]], delta))
                    cur[d] = want[d]

    def total(self) -> np.ndarray:
        """``H`` ([groups, K, K], float64) over the samples added."""
        node = self.lay.node
        w = self.lay.w
        kshape = tuple(int(v) for v in w.shape[2:])
        nd = len(kshape)
        dil = [int(v) for v in node.attrs.get("dilations", [1] * nd)]
        groups, cg = self.lay.groups, int(w.shape[1])
        taps = list(itertools.product(*(range(k) for k in kshape)))
        h = np.zeros((groups, len(taps) * cg, len(taps) * cg))
        for a, ta in enumerate(taps):
            for b in range(a, len(taps)):
                delta = tuple((taps[b][d] - ta[d]) * dil[d] for d in range(nd))
                block = h[:, a * cg:(a + 1) * cg, b * cg:(b + 1) * cg]
                if delta in self.full:
                    block += self.full[delta]
                if (a, b) in self.border:
                    block -= self.border[(a, b)]
                if b == a:  # exactly symmetric (the slabs' products are not always computed as one SYRK)
                    block[...] = (block + block.transpose(0, 2, 1)) * 0.5
                else:
                    h[:, b * cg:(b + 1) * cg, a * cg:(a + 1) * cg] = block.transpose(0, 2, 1)
        if self.alive is not None:  # an input never seen nonzero: exactly zero in H, as the unfolding gives it
            for g, k in zip(*np.nonzero(~self.alive.reshape(groups, -1)), strict=True):
                h[g, k, :] = 0.0
                h[g, :, k] = 0.0
        return h


def _alive(x: np.ndarray, taps: list[tuple[int, ...]], start: list[int], dil: list[int], outs: list[int],
           groups: int) -> np.ndarray:
    """[groups, taps, cg]: whether channel c of ``x`` ([N, C, *spatial]) has a nonzero value among the positions
    tap t reads (data coordinates ``start + t·dil + [0, outs)``, clipped to the data): GPTQ takes an input whose
    ``H_ii`` is exactly 0 as dead, and the shifted products' subtractions leave rounding there. Every tap's box
    holds the boxes' intersection, so a channel nonzero there is alive wherever a tap reads anything (one
    comparison over the intersection); only the other channels are counted box by box, exactly (summed-area
    table of the nonzeros)."""
    nd = x.ndim - 2
    c = x.shape[1]
    boxes: list[tuple[list[int], list[int]] | None] = []
    for t in taps:
        lo = [min(max(start[d] + t[d] * dil[d], 0), x.shape[2 + d]) for d in range(nd)]
        hi = [min(max(start[d] + t[d] * dil[d] + outs[d], 0), x.shape[2 + d]) for d in range(nd)]
        boxes.append(None if any(h0 <= l0 for l0, h0 in zip(lo, hi, strict=True)) else (lo, hi))
    out = np.zeros((len(taps), c), dtype=bool)
    read = [b for b in boxes if b is not None]
    sure = np.zeros(c, dtype=bool)
    if read:
        ilo = [max(b[0][d] for b in read) for d in range(nd)]
        ihi = [min(b[1][d] for b in read) for d in range(nd)]
        if all(h0 > l0 for l0, h0 in zip(ilo, ihi, strict=True)):
            inner = x[(slice(None), slice(None), *(slice(ilo[d], ihi[d]) for d in range(nd)))]
            sure = np.any(inner != 0, axis=(0, *range(2, 2 + nd)))
    rest = np.flatnonzero(~sure)
    counted = _box_nonzero(x[:, rest], boxes) if rest.size and read else None
    for i, box in enumerate(boxes):
        if box is not None:
            out[i] = sure
            if counted is not None:
                out[i, rest] = counted[i]
    return out.reshape(len(taps), groups, c // groups).transpose(1, 0, 2)


def _box_nonzero(x: np.ndarray, boxes: list[tuple[list[int], list[int]] | None]) -> np.ndarray:
    """[boxes, C]: whether channel c of ``x`` ([N, C, *spatial]) has a nonzero value in each box (False for
    ``None``), by exact integer counts: a summed-area table of the nonzeros, inclusion-exclusion over the box's
    corners."""
    nd = x.ndim - 2
    c = x.shape[1]
    sat = np.count_nonzero(x, axis=0).astype(np.int64)  # [C, *spatial]
    sat = np.pad(sat, [(0, 0)] + [(1, 0)] * nd)
    for d in range(nd):
        sat = np.cumsum(sat, axis=1 + d)
    out = np.zeros((len(boxes), c), dtype=bool)
    for i, box in enumerate(boxes):
        if box is None:
            continue
        lo, hi = box
        count = np.zeros(c, dtype=np.int64)
        for corner in itertools.product((0, 1), repeat=nd):
            at: tuple[Any, ...] = (slice(None), *(hi[d] if corner[d] else lo[d] for d in range(nd)))
            sign = -1 if (nd - sum(corner)) % 2 else 1
            count += sign * sat[at]
        out[i] = count > 0
    return out


def _add(sums: dict, key: object, value: np.ndarray) -> None:
    """``sums[key] += value`` in float64 (the float32 values converted exactly)."""
    have = sums.get(key)
    if have is None:
        sums[key] = value.astype(np.float64)
    else:
        np.add(have, value, out=have)


def _shifted(flat: np.ndarray, off: int) -> np.ndarray:
    """``Σ_f flat[:, :, f] · flat[:, :, f + off]ᵀ`` over the flat positions where both exist: [groups, cg, cg]."""
    length = flat.shape[2] - off
    a = flat[:, :, :length]
    if off == 0:
        return np.stack([a[g] @ a[g].T for g in range(flat.shape[0])])
    b = flat[:, :, off:off + length]
    return np.stack([a[g] @ b[g].T for g in range(flat.shape[0])])


def _region(z: np.ndarray, region: list[tuple[int, int]], delta: tuple[int, ...]) -> np.ndarray:
    """``Σ_{u in region} z[:, :, u] · z[:, :, u + δ]ᵀ`` (all images): [groups, cg, cg]."""
    g, cg = z.shape[0], z.shape[1]
    here = tuple(slice(r0, r1 + 1) for r0, r1 in region)
    there = tuple(slice(r0 + dd, r1 + dd + 1) for (r0, r1), dd in zip(region, delta, strict=True))
    a = z[(slice(None), slice(None), slice(None), *here)].reshape(g, cg, -1)
    b = z[(slice(None), slice(None), slice(None), *there)].reshape(g, cg, -1)
    return np.matmul(a, b.transpose(0, 2, 1))
