"""GPTQ's Hessian inputs (for :mod:`.gptq`): a layer's input as the rows of its reduction dimension.

``H = XᵀX`` per group, X the layer's input unfolded into rows of K (Conv: every window, K ordered (tap, channel);
MatMul / Gemm: every token). :func:`_cols` gives Xᵀ ``[groups, K, P]`` directly — one strided copy per tap whose
inner loop runs over contiguous output positions, a free view for a 1×1 Conv on one image, instead of the
``[groups, P, K]`` rows (:func:`_rows`) whose copies write K-strided: ``Xᵀ·(Xᵀ)ᵀ`` is numpy's ``syrk`` of the same
values, and OpenBLAS's packed panels make it bit for bit ``rowsᵀ·rows`` (measured on every zoo layer shape:
tests/test_gptq_speed.py), 1.5–1.9× faster on depthwise Convs. :func:`_rows` (with a row ``pick``) stays for
``max_rows``. :func:`_rows_key`: what decides a layer's rows besides its input's values (layers with equal keys
have equal Hessians).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from ._layers import Layer


class _Pick:
    """Which rows of a sample feed the Hessian: ``quota`` of them, drawn without replacement by a generator
    seeded with ``key`` (compile seed, sample, layer), in increasing order; all rows when there are no more."""

    def __init__(self, quota: int, key: tuple[int, ...]) -> None:
        self.quota = quota
        self.key = key

    def __call__(self, n: int) -> np.ndarray | None:
        if n <= self.quota:
            return None
        return np.sort(np.random.default_rng(list(self.key)).choice(n, self.quota, replace=False))


def _rows(lay: Layer, x: np.ndarray, pick: _Pick | None = None) -> np.ndarray:
    """The layer's input as rows of its reduction dimension, per group: [groups, positions, K] (K ordered
    (tap, in)); ``pick``: only the rows it chooses (before the patches are copied out)."""
    if lay.op == "Conv":
        return _im2col(lay.node, x, lay.groups, pick)
    k = lay.w.shape[lay.in_axis]
    rows = x.reshape(1, -1, k)
    idx = pick(rows.shape[1]) if pick is not None else None
    return rows if idx is None else rows[:, idx]


def _im2col(node: gs.Node, x: np.ndarray, groups: int, pick: _Pick | None = None) -> np.ndarray:
    """Conv input [N, C, *spatial] -> [groups, N·positions, taps·C/g] patches (zero padding as the Conv);
    ``pick``: only the positions (of the N·positions, in order) it chooses."""
    kshape, strides, dil, pads = _conv_geometry(node, tuple(x.shape[2:]))
    nd = len(kshape)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[d], pads[d + nd]) for d in range(nd)])
    n, c = x.shape[0], x.shape[1]
    cg = c // groups
    taps = int(np.prod(kshape))
    # every window as a view [N, C, *positions, *window], strided by the Conv's strides and dilations, then one
    # copy into [groups, N·positions, (tap, channel)]
    span = tuple((kshape[d] - 1) * dil[d] + 1 for d in range(nd))
    view = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(2, 2 + nd)))
    view = view[(slice(None), slice(None), *(slice(None, None, s) for s in strides),
                 *(slice(None, None, d) for d in dil))]  # [N, C, *outs, *kshape]
    outs = view.shape[2:2 + nd]
    idx = pick(n * int(np.prod(outs))) if pick is not None else None
    if idx is not None:  # gather the chosen windows only: [sel, C, *kshape] -> [groups, sel, (tap, channel)]
        coords = np.unravel_index(idx, (n, *outs))
        where: tuple[Any, ...] = (coords[0], slice(None), *coords[1:])
        sel = view[where]
        sel = sel.reshape(len(idx), groups, cg, taps).transpose(1, 0, 3, 2)
        return np.ascontiguousarray(sel).reshape(groups, len(idx), taps * cg)
    # channels last once ([groups, N, *padded, cg]: a small copy), then one strided slice per tap into
    # [groups, N, *outs, *kshape, cg] — each copy runs over contiguous channels, unlike one copy of the
    # transposed window view (same values, same order)
    xt = np.ascontiguousarray(xp.reshape(n, groups, cg, *xp.shape[2:]).transpose(1, 0, *range(3, 3 + nd), 2))
    out = np.empty((groups, n, *outs, *kshape, cg), dtype=xp.dtype)
    for tap in np.ndindex(*kshape):
        src = tuple(slice(tap[d] * dil[d], tap[d] * dil[d] + (outs[d] - 1) * strides[d] + 1, strides[d])
                    for d in range(nd))
        out[(slice(None), slice(None), *(slice(None),) * nd, *tap)] = xt[(slice(None), slice(None), *src)]
    p = n * int(np.prod(outs))
    return out.reshape(groups, p, taps * cg)


def _conv_geometry(node: gs.Node, x_spatial: tuple[int, ...] | None = None) -> tuple[tuple[int, ...], list[int],
                                                                                   list[int], list[int]]:
    """(kernel shape, strides, dilations, pads) of a Conv; ``auto_pad`` SAME_* / VALID resolved for an input of
    spatial shape ``x_spatial``."""
    w = np.asarray(node.inputs[1].values)
    kshape = tuple(int(v) for v in w.shape[2:])
    nd = len(kshape)
    strides = [int(v) for v in node.attrs.get("strides", [1] * nd)]
    dil = [int(v) for v in node.attrs.get("dilations", [1] * nd)]
    pads = [int(v) for v in node.attrs.get("pads", [0] * (2 * nd))]
    auto = node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("SAME_UPPER", "SAME_LOWER") and x_spatial is not None:
        pads = [0] * (2 * nd)
        for d in range(nd):
            out = -(-x_spatial[d] // strides[d])
            total = max((out - 1) * strides[d] + (kshape[d] - 1) * dil[d] + 1 - x_spatial[d], 0)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads[d], pads[d + nd] = lo, total - lo
    elif auto == "VALID":
        pads = [0] * (2 * nd)
    return kshape, strides, dil, pads


def _rows_key(lay: Layer) -> tuple[Any, ...]:
    """What decides the layer's rows besides the values of its input: input tensor, op kind, K, Conv geometry."""
    k = lay.w.shape[lay.in_axis]
    if lay.op != "Conv":
        return (lay.node.inputs[0].name, "rows", int(k))
    attrs = tuple(sorted((a, repr(lay.node.attrs[a])) for a in ("strides", "dilations", "pads", "auto_pad")
                         if a in lay.node.attrs))
    return (lay.node.inputs[0].name, "conv", tuple(int(d) for d in lay.w.shape[1:]), lay.groups, attrs)


def _cols(lay: Layer, x: np.ndarray) -> np.ndarray:
    """The transposed rows of :func:`_rows`: ``[groups, K, P]`` (K ordered (tap, in), P ordered (sample, position))."""
    if lay.op != "Conv":
        k = lay.w.shape[lay.in_axis]
        return x.reshape(1, -1, k).transpose(0, 2, 1)
    node, groups = lay.node, lay.groups
    kshape, strides, dil, pads = _conv_geometry(node, tuple(x.shape[2:]))
    nd = len(kshape)
    n, c = x.shape[0], x.shape[1]
    cg = c // groups
    if any(pads):
        x = np.pad(x, [(0, 0), (0, 0)] + [(pads[d], pads[d + nd]) for d in range(nd)])
    spatial = x.shape[2:]
    outs = tuple((spatial[d] - (kshape[d] - 1) * dil[d] - 1) // strides[d] + 1 for d in range(nd))
    p = n * int(np.prod(outs))
    xg = x.reshape(n, groups, cg, *spatial)
    if kshape == (1,) * nd and all(s == 1 for s in strides) and n == 1:
        return xg[0].reshape(groups, cg, p)  # a 1x1 Conv on one image: the input itself
    out = np.empty((groups, *kshape, cg, n, *outs), dtype=x.dtype)
    for tap in np.ndindex(*kshape):
        src = tuple(slice(tap[d] * dil[d], tap[d] * dil[d] + (outs[d] - 1) * strides[d] + 1, strides[d])
                    for d in range(nd))
        # [n, g, cg, *outs] -> [g, cg, n, *outs]
        out[(slice(None), *tap)] = xg[(slice(None), slice(None), slice(None), *src)].transpose(1, 2, 0,
                                                                                              *range(3, 3 + nd))
    return out.reshape(groups, int(np.prod(kshape)) * cg, p)


def _chunk_count(k: int, in_g: int, taps: int, block: int | None, max_width: int) -> int | None:
    """Into how many equal column chunks of at most ``max_width`` a layer of K = ``taps`` · ``in_g`` columns
    (ordered (tap, in)) is swept: 1 up to ``max_width``; above it, the fewest chunks made of whole taps (a Conv
    with several taps) or of whole weight blocks (block grids; single columns otherwise), so that a chunk's
    columns keep the layer's (tap, in) order and its block grid. ``None``: no such split."""
    if k <= max_width:
        return 1
    if taps > 1:
        units = taps  # whole taps: each chunk holds every input channel of its taps
    else:
        unit = block or 1
        if in_g % unit:
            return None
        units = in_g // unit
    for c in range(2, units + 1):
        if units % c == 0 and k // c <= max_width:
            return c
    return None
