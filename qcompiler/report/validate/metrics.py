"""Error metrics of one tensor, quantized against float: :class:`TensorMetrics` and the streaming
:class:`_Accumulator` that builds it from running sums over the samples (SQNR, cosine, absolute errors, top-1
agreement, exact match).

Part of :mod:`qcompiler.report.validate` (whose docstring defines the metrics).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from qcompiler.core.numbers import json_float, mask_nonfinite

#: Range of the last dimension for which a float output is treated as class scores (top-1 agreement).
TOP1_MIN_CLASSES = 2
TOP1_MAX_CLASSES = 100_000


@dataclass
class TensorMetrics:
    """Error of one tensor of the quantized model against the float model, over all samples."""

    name: str
    sqnr_db: float
    cosine: float
    max_abs: float
    mean_abs: float
    top1_agreement: float | None
    elements: int
    exact_match: float | None = None
    #: graph outputs: the worst slice along the channel / feature axis (a ``slices.SliceMetrics``), else None
    worst_slice: Any = None
    #: graph outputs that are class scores: k -> top-k agreement (see ``slices``), else None
    topk: dict[int, float] | None = None
    #: graph outputs that are probability maps (Sigmoid): the thresholded-mask agreement (``slices.MaskMetrics``)
    mask: Any = None
    #: values both models gave as the same non-finite number (-inf of a masked log-softmax, NaN of sqrt(-1)): left
    #: out of the sums (:func:`mask_nonfinite`); and those only one model gave (or differently): each makes the
    #: SQNR -inf and the largest error inf
    nonfinite_matched: int = 0
    nonfinite_mismatched: int = 0

    def worst_sqnr(self) -> float:
        """The lower of the whole-tensor SQNR and the worst slice's (NaN if either is NaN)."""
        ws = self.worst_slice.sqnr_db if self.worst_slice is not None else math.inf
        if math.isnan(self.sqnr_db) or math.isnan(ws):
            return math.nan
        return min(self.sqnr_db, ws)

    def to_json(self) -> dict[str, Any]:
        d = self._base_json()
        if self.worst_slice is not None:
            d["worst_slice"] = self.worst_slice.to_json()
        if self.topk is not None:
            d["topk_agreement"] = {str(k): json_float(v, 6) for k, v in sorted(self.topk.items())}
        if self.mask is not None:
            d["mask"] = self.mask.to_json()
        return d

    def _base_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sqnr_db": json_float(self.sqnr_db, 3),
            "cosine": json_float(self.cosine, 8),
            "max_abs": json_float(self.max_abs, significant=6),
            "mean_abs": json_float(self.mean_abs, significant=6),
            "top1_agreement": None if self.top1_agreement is None else json_float(self.top1_agreement, 6),
            "exact_match": None if self.exact_match is None else json_float(self.exact_match, 6),
            "elements": int(self.elements),
            **({"nonfinite_matched": int(self.nonfinite_matched)} if self.nonfinite_matched else {}),
            **({"nonfinite_mismatched": int(self.nonfinite_mismatched)} if self.nonfinite_mismatched else {}),
        }


def _sort_key(m: TensorMetrics) -> float:
    """Worst first: NaN (broken) before everything, then increasing SQNR."""
    return -math.inf if math.isnan(m.sqnr_db) else m.sqnr_db


def _is_float(dtype: Any) -> bool:
    return bool(np.issubdtype(dtype, np.floating))


def _sqnr(ref2: float, noise2: float) -> float:
    """10·log10(ref2 / noise2) with the module's conventions (identical: inf; zero signal: -inf; NaN: nan)."""
    if math.isnan(ref2) or math.isnan(noise2):
        return math.nan
    if noise2 == 0.0:
        return math.inf
    if ref2 == 0.0:
        return -math.inf
    if math.isinf(noise2):
        return -math.inf if not math.isinf(ref2) else math.nan
    return 10.0 * math.log10(ref2 / noise2) if not math.isinf(ref2) else math.inf


def _sums(r: np.ndarray, x: np.ndarray, t: np.ndarray, d: np.ndarray) -> tuple[float, ...]:
    """One sample's (Σr², Σx², Σrx, Σ(r−x)², Σ|r−x|, max|r−x|) of two flat float64 arrays; ``t`` / ``d``: scratch
    of their size. np.add.reduce of products, not BLAS dot: next to onnxruntime's spinning thread pool a
    multithreaded BLAS call costs ~30 ms each (measured 7x slower validation on PP-OCR); and the sums stay
    pairwise."""
    ref2 = float(np.add.reduce(np.multiply(r, r, out=t)))
    q2 = float(np.add.reduce(np.multiply(x, x, out=t)))
    dot = float(np.add.reduce(np.multiply(r, x, out=t)))
    np.subtract(r, x, out=d)
    noise2 = float(np.add.reduce(np.multiply(d, d, out=t)))
    if not d.size:
        return ref2, q2, dot, noise2, 0.0, 0.0
    ad = np.abs(d, out=d)
    return ref2, q2, dot, noise2, float(np.add.reduce(ad)), float(ad.max())


class Workspace(threading.local):
    """Float64 scratch buffers reused across :meth:`_Accumulator.update` calls, separate for each thread.

    A fresh float64 copy of every layer tensor (and four temporaries of its size) per update cost more than
    the arithmetic: on PP-OCR det, 2 000 per-layer updates took 1.4 s, most of it in allocating and
    first-touching new pages. Buffers grow to the largest tensor seen and live as long as the workspace."""

    def __init__(self) -> None:
        self.buffers: dict[int, np.ndarray] = {}

    def buffer(self, slot: int, n: int) -> np.ndarray:
        """A float64 array of ``n`` elements (contents undefined)."""
        buf = self.buffers.get(slot)
        if buf is None or buf.size < n:
            buf = self.buffers[slot] = np.empty(n, dtype=np.float64)
        return buf[:n]

    def float64(self, slot: int, a: np.ndarray) -> np.ndarray:
        """``a`` flattened (C order) as float64: ``a`` itself when it is one already and contiguous, else a
        copy into buffer ``slot``."""
        if a.dtype == np.float64 and a.flags.c_contiguous:
            return a.reshape(-1)
        out = self.buffer(slot, int(a.size))
        np.copyto(out.reshape(a.shape), a, casting="unsafe")
        return out


#: the highest rank whose last axis can hold classes: [N, C] scores, [N, T, C] sequences; a rank-4 tensor is a
#: map ([N, C, H, W]), whose last axis is spatial (an argmax over a map's columns means nothing)
TOP1_MAX_RANK = 3
#: the ops whose output is class scores inside a graph (a layer gets top-1 agreement only when one produced it)
CLASS_SCORE_OPS = frozenset({"Softmax", "LogSoftmax"})


def top1_rank(producer: str | None, graph_output: bool) -> int:
    """The ``top1_max_rank`` of a tensor's accumulator: graph outputs up to :data:`TOP1_MAX_RANK` (classifier
    logits count: a graph output of rank 2 is usually one), layers only when a :data:`CLASS_SCORE_OPS` op made
    them (a feature map's or a hidden state's argmax is no decision anyone takes)."""
    return TOP1_MAX_RANK if graph_output or producer in CLASS_SCORE_OPS else 0


class _Accumulator:
    """Running sums for one tensor; holds scalars only, never a sample's values."""

    __slots__ = ("abs_sum", "bad", "dot", "exact_hits", "exact_n", "max_abs", "mismatched", "n", "name", "noise2",
                 "nonfinite", "q2", "ref2", "top1_hits", "top1_max_rank", "top1_n")

    def __init__(self, name: str, top1_max_rank: int = 1 << 30) -> None:
        """``top1_max_rank``: top-1 agreement over the last axis only for tensors of at most this rank (0: none;
        :func:`top1_rank` for a graph output or a layer)."""
        self.name = name
        self.top1_max_rank = top1_max_rank
        self.ref2 = 0.0
        self.q2 = 0.0
        self.dot = 0.0
        self.noise2 = 0.0
        self.abs_sum = 0.0
        self.max_abs = 0.0
        self.n = 0
        self.top1_hits = 0
        self.top1_n = 0
        self.exact_hits = 0
        self.exact_n = 0
        self.nonfinite = 0
        self.mismatched = 0
        self.bad: str | None = None

    def update(self, ref: np.ndarray, q: np.ndarray, ws: Workspace | None = None) -> None:
        """Add one sample. ``ws``: float64 scratch buffers to reuse (one per thread; the sums are the same
        with or without, bit for bit: the same products summed by the same ``np.add.reduce``)."""
        if self.bad is not None:
            return
        ref = np.asarray(ref)
        q = np.asarray(q)
        if ref.shape != q.shape:
            self.bad = f"float shape {list(ref.shape)} vs quantized shape {list(q.shape)}"
            return
        both_float = _is_float(ref.dtype) and _is_float(q.dtype)
        if not both_float:
            self.exact_hits += int(np.count_nonzero(ref == q))
            self.exact_n += int(ref.size)
        ws = ws if ws is not None else Workspace()
        n = int(ref.size)
        r = ws.float64(0, ref)
        x = ws.float64(1, q)
        t = ws.buffer(2, n)
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: the check below redoes such a sample
            sums = _sums(r, x, t, ws.buffer(3, n))
        if not all(math.isfinite(v) for v in sums):  # a float32 value squared cannot overflow float64: non-finite
            r, x = np.copy(r), np.copy(x)  # values (ws.float64 may hand back the caller's own array: copies)
            matched, mismatched, _ = mask_nonfinite(r, x)
            self.nonfinite += matched
            self.mismatched += mismatched
            sums = _sums(r, x, t, ws.buffer(3, n))
        self.ref2 += sums[0]
        self.q2 += sums[1]
        self.dot += sums[2]
        self.noise2 += sums[3]
        self.abs_sum += sums[4]
        self.max_abs = float(np.max([self.max_abs, sums[5]]))
        self.n += n
        del r, x, t
        if both_float and 2 <= ref.ndim <= self.top1_max_rank and \
                TOP1_MIN_CLASSES <= ref.shape[-1] <= TOP1_MAX_CLASSES:
            a = np.argmax(ref.astype(np.float32, copy=False), axis=-1)
            b = np.argmax(q.astype(np.float32, copy=False), axis=-1)
            self.top1_hits += int(np.count_nonzero(a == b))
            self.top1_n += int(a.size)

    def metrics(self) -> TensorMetrics:
        ref2, q2, noise2 = self.ref2, self.q2, self.noise2
        sqnr = math.nan if math.isnan(q2) or math.isnan(self.dot) else _sqnr(ref2, noise2)
        if self.mismatched:  # a value only one model made non-finite: an infinite error
            sqnr = -math.inf
        denom = math.sqrt(ref2) * math.sqrt(q2)
        if math.isnan(denom) or math.isnan(self.dot):
            cosine = math.nan
        elif denom == 0.0:
            cosine = 1.0 if ref2 == 0.0 and q2 == 0.0 else 0.0
        else:
            cosine = max(-1.0, min(1.0, self.dot / denom))
        return TensorMetrics(
            name=self.name,
            sqnr_db=sqnr,
            cosine=cosine,
            max_abs=math.inf if self.mismatched else self.max_abs,
            mean_abs=self.abs_sum / self.n if self.n else 0.0,
            top1_agreement=self.top1_hits / self.top1_n if self.top1_n else None,
            elements=self.n,
            exact_match=self.exact_hits / self.exact_n if self.exact_n else None,
            nonfinite_matched=self.nonfinite,
            nonfinite_mismatched=self.mismatched,
        )
