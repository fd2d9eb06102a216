"""What users see of an output, measured streaming: the worst slice along its channel / feature axis, top-k
agreement of probability / logit outputs, and the named slices of ``--check`` / the plan's ``checks:``.

**Slice axis** (:func:`default_slice_axis`, overridden per output by ``--slice-axis OUTPUT=AXIS``): rank 2
``[N, F]`` -> the last axis (features / classes); rank 3 ``[N, C, A]`` -> axis 1 when ``C <= A`` (a detector head
``[1, 84, 8400]``: box coordinates and class scores are channels), else the last axis (``[N, A, C]``,
``[N, T, D]``); rank ≥ 4 ``[N, C, H, W]`` -> axis 1; rank 1 -> axis 0; scalars have no slices. Each index of that
axis is one slice; per slice only Σref², Σ(ref−q)² and max|ref−q| are kept, so memory does not grow with the
samples. The worst slice is the one of lowest SQNR among the slices that carry signal in the float model: a slice
exactly zero there has none to measure against, and on a **class-score output** (top-k below) whose float values
all lie in [0, 1] neither has a class whose float probability never reaches :data:`PROB_FLOOR` (0.001) on any
sample — a 214-way file-type softmax ranked its never-predicted ``pcap`` class (p <= 2.3e-5, errors ~2e-5) as
the worst slice at 1.6 dB while the classes it does predict measured 24.5 dB. Such *silent* slices are left out
of the ranking and counted (``silent``); their error still counts in the whole-output SQNR and ``max_abs``.

**Top-k agreement** (k = 1, and 5 when the class axis has ≥ 5 entries), over the last axis, for outputs that are
class scores: produced by Softmax / LogSoftmax / Sigmoid, or whose float values on the first sample lie in
[0, 1] and sum to 1 along the last axis, or named by a check. It is the fraction of positions where the float
model's top-1 class is among the quantized model's top-k classes — except on a Sigmoid output of rank ≥ 4 (a
probability map ``[N, C, H, W]``: its last axis is a spatial one, not classes).

**Mask agreement** of probability maps (outputs produced by Sigmoid): the positions above :data:`MASK_LEVEL` (0.5)
in the float and in the quantized output, their IoU Σ|F ∩ Q| / Σ|F ∪ Q| over all samples and the fraction of
positions deciding alike — what a text or object mask thresholded downstream sees. ``--check 'OUT iou@0.3>=0.9'``
gates on the IoU at a level of the user's.

Part of :mod:`qcompiler.report.validate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from qcompiler.core.errors import UserError
from qcompiler.core.numbers import json_float
from qcompiler.plan.checks import Check
from qcompiler.report.validate.metrics import TensorMetrics, _Accumulator, _is_float, _sqnr, mask_nonfinite

#: Ops whose outputs are class scores (top-k agreement is reported for them).
SCORE_OPS = frozenset({"Softmax", "LogSoftmax", "Sigmoid"})
#: Tolerance on "sums to 1" when detecting probability outputs from their values.
PROB_SUM_TOL = 1e-3
#: Decision level of the mask agreement reported for Sigmoid outputs (``--check 'OUT iou@LEVEL>=X'`` for another).
MASK_LEVEL = 0.5
#: A class of a class-score output in [0, 1] whose float probability stays below this on every sample is silent:
#: left out of the worst-slice ranking (nothing a user sees of it can change; its error still counts whole).
PROB_FLOOR = 1e-3


def default_slice_axis(shape: tuple[int, ...]) -> int | None:
    """The channel / feature axis of an output of this shape (module docstring); ``None`` for a scalar."""
    rank = len(shape)
    if rank == 0:
        return None
    if rank == 1:
        return 0
    if rank == 2:
        return 1
    if rank == 3:
        return 1 if shape[1] <= shape[2] else 2
    return 1


def looks_like_probabilities(ref: np.ndarray) -> bool:
    """Float values in [0, 1] summing to 1 (within :data:`PROB_SUM_TOL`) along a last axis of ≥ 2 entries."""
    if not _is_float(ref.dtype) or ref.ndim < 1 or ref.shape[-1] < 2 or ref.size == 0:
        return False
    r = ref.astype(np.float64, copy=False)
    if not np.all(np.isfinite(r)) or r.min() < -PROB_SUM_TOL or r.max() > 1.0 + PROB_SUM_TOL:
        return False
    return bool(np.all(np.abs(r.sum(axis=-1) - 1.0) <= PROB_SUM_TOL))


@dataclass
class SliceMetrics:
    """The worst slice of an output along ``axis``: its ``index``, SQNR and largest absolute error, out of
    ``slices`` (``silent``: slices without signal in the float model — exactly zero, or a class never reaching
    :data:`PROB_FLOOR` — left out of the ranking)."""

    axis: int
    index: int | None
    sqnr_db: float
    max_abs: float
    slices: int
    silent: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"axis": self.axis, "index": self.index, "sqnr_db": json_float(self.sqnr_db, 3),
                "max_abs": json_float(self.max_abs, significant=6), "slices": self.slices, "silent": self.silent}


class _SliceAccumulator:
    """Per slice along ``axis``: Σref², Σ(ref−q)², max|ref−q| and max ref; ``classes``: the axis holds the classes
    of a class-score output (:data:`PROB_FLOOR` applies when every float value lies in [0, 1])."""

    __slots__ = ("axis", "bad", "classes", "lo", "max_abs", "noise2", "peak", "ref2")

    def __init__(self, axis: int, classes: bool = False) -> None:
        self.axis = axis
        self.classes = classes
        self.ref2: np.ndarray | None = None
        self.noise2: np.ndarray | None = None
        self.max_abs: np.ndarray | None = None
        self.peak: np.ndarray | None = None  # per slice: the largest float value
        self.lo = math.inf  # the smallest float value of the output
        self.bad: str | None = None

    def update(self, ref: np.ndarray, q: np.ndarray) -> None:
        if self.bad is not None or ref.shape != q.shape:
            return
        n = ref.shape[self.axis]
        if n == 0:  # an empty output (a zero-size split): no slice to measure
            return
        r = np.moveaxis(ref.astype(np.float64, copy=False), self.axis, 0).reshape(n, -1)
        x = np.moveaxis(q.astype(np.float64, copy=False), self.axis, 0).reshape(n, -1)
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: redone below
            d = r - x
            ref2 = np.sum(r * r, axis=1)
            noise2 = np.sum(d * d, axis=1)
        if not (np.isfinite(ref2).all() and np.isfinite(noise2).all()):  # non-finite values: as the whole tensor's
            r, x = np.array(r), np.array(x)  # copies (a float64 input's reshape may be a view of it)
            _, _, mismatch = mask_nonfinite(r, x)  # same in both: left out; in one only: an infinite error
            if mismatch is not None:
                x[mismatch] = math.inf
            d = r - x
            ref2 = np.sum(r * r, axis=1)
            noise2 = np.sum(d * d, axis=1)
        empty = not d.shape[1]
        mx = np.zeros(n) if empty else np.max(np.abs(d), axis=1)
        peak = np.full(n, -math.inf) if empty else np.max(r, axis=1)
        if not empty:
            self.lo = min(self.lo, float(np.min(r)))
        if self.ref2 is None:
            self.ref2, self.noise2, self.max_abs, self.peak = ref2, noise2, mx, peak
        elif self.ref2.shape[0] != n:
            self.bad = f"axis {self.axis} changes length between samples ({self.ref2.shape[0]} vs {n})"
        else:
            assert self.noise2 is not None and self.max_abs is not None and self.peak is not None
            self.ref2 += ref2
            self.noise2 += noise2
            self.max_abs = np.maximum(self.max_abs, mx)
            self.peak = np.maximum(self.peak, peak)

    def _silent(self) -> np.ndarray:
        """Which slices carry no signal: exactly zero in the float model, or (class scores in [0, 1]) a class
        whose float probability never reaches :data:`PROB_FLOOR` (values in [0, 1] within float32 rounding:
        :data:`PROB_SUM_TOL`)."""
        assert self.ref2 is not None and self.peak is not None
        silent = self.ref2 == 0.0
        if self.classes and self.lo >= -PROB_SUM_TOL and float(np.max(self.peak)) <= 1.0 + PROB_SUM_TOL:
            silent |= self.peak < PROB_FLOOR
        return silent

    def metrics(self) -> SliceMetrics | None:
        if self.bad is not None or self.ref2 is None or self.noise2 is None or self.max_abs is None:
            return None
        n = int(self.ref2.shape[0])
        sq = [_sqnr(float(a), float(b)) for a, b in zip(self.ref2, self.noise2)]
        silent = self._silent()
        ranked = [i for i in range(n) if not silent[i]] or list(range(n))
        if not ranked:
            return SliceMetrics(axis=self.axis, index=None, sqnr_db=math.inf, max_abs=0.0, slices=0)
        worst = min(ranked, key=lambda i: (-math.inf if math.isnan(sq[i]) else sq[i], i))
        return SliceMetrics(axis=self.axis, index=worst, sqnr_db=sq[worst], max_abs=float(self.max_abs[worst]),
                            slices=n, silent=int(np.count_nonzero(silent)) if len(ranked) < n else 0)


def stable_rank(v: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Where entry ``idx`` (shape ``[..., 1]``) of each row of ``v`` (last axis) lands in
    ``np.argsort(v, axis=-1, kind="stable")``, without sorting (linear, not n log n: a 6625-class CTC head's top-k
    took 19 ms a sample sorted): the entries smaller than it plus the equal ones before it; a NaN (sorted last,
    NaNs in index order) lands after every number and the NaNs before it. Returns shape ``[...]``."""
    x = np.take_along_axis(v, idx, axis=-1)
    before = np.arange(v.shape[-1]) < idx
    pos = np.count_nonzero(v < x, axis=-1) + np.count_nonzero((v == x) & before, axis=-1)
    nan = np.isnan(x[..., 0])
    if nan.any():
        vn = np.isnan(v)
        pos = np.where(nan, np.count_nonzero(~vn, axis=-1) + np.count_nonzero(vn & before, axis=-1), pos)
    return np.asarray(pos)


@dataclass
class MaskMetrics:
    """Agreement of the decisions ``value > level`` of a probability map: ``iou`` = Σ|F ∩ Q| / Σ|F ∪ Q| over all
    samples (F, Q: the positions above ``level`` in the float / quantized output; 1.0 when both are empty
    everywhere), ``agreement`` the fraction of positions deciding alike, ``positives`` the fraction of positions
    above ``level`` in the float output."""

    level: float
    iou: float
    agreement: float
    positives: float

    def to_json(self) -> dict[str, Any]:
        return {"level": self.level, "iou": json_float(self.iou, 6), "agreement": json_float(self.agreement, 6),
                "positives": json_float(self.positives, 6)}


class _MaskAccumulator:
    """Thresholded-mask agreement at ``level`` (:class:`MaskMetrics`), counted streaming."""

    __slots__ = ("agree", "inter", "level", "n", "pos", "union")

    def __init__(self, level: float) -> None:
        self.level = level
        self.inter = self.union = self.agree = self.pos = self.n = 0

    def update(self, ref: np.ndarray, q: np.ndarray) -> None:
        if ref.shape != q.shape:
            return
        a, b = np.asarray(ref) > self.level, np.asarray(q) > self.level
        self.inter += int(np.count_nonzero(a & b))
        self.union += int(np.count_nonzero(a | b))
        self.agree += int(a.size - np.count_nonzero(a ^ b))
        self.pos += int(np.count_nonzero(a))
        self.n += int(a.size)

    def result(self) -> MaskMetrics | None:
        if not self.n:
            return None
        return MaskMetrics(level=self.level, iou=self.inter / self.union if self.union else 1.0,
                           agreement=self.agree / self.n, positives=self.pos / self.n)

    def apply(self, m: TensorMetrics) -> None:
        m.mask = self.result()


class _TopKAccumulator:
    """Top-k agreement over the last axis: float top-1 among the quantized top-k, counted per position."""

    __slots__ = ("hits", "ks", "n")

    def __init__(self, classes: int) -> None:
        self.ks = [1, 5] if classes >= 5 else [1]
        self.hits = dict.fromkeys(self.ks, 0)
        self.n = 0

    def update(self, ref: np.ndarray, q: np.ndarray) -> None:
        if ref.shape != q.shape or ref.ndim < 1:
            return
        top_f = np.argmax(ref, axis=-1)[..., None]
        pos = stable_rank(-q.astype(np.float64, copy=False), top_f)
        for k in self.ks:
            self.hits[k] += int(np.count_nonzero(pos < k))
        self.n += int(top_f.size)

    def result(self) -> dict[int, float] | None:
        return {k: self.hits[k] / self.n for k in self.ks} if self.n else None

    def apply(self, m: TensorMetrics) -> None:
        m.topk = self.result()


@dataclass
class CheckResult:
    """One check measured: the ``value`` of its metric over the slice (``None`` when it cannot be computed) and
    whether it met the threshold; ``metrics``: all metrics of the slice."""

    check: Check
    value: float | None
    passed: bool
    metrics: TensorMetrics

    def to_json(self) -> dict[str, Any]:
        v = self.value
        return {**self.check.to_json(), "value": None if v is None else json_float(v, significant=6),
                "passed": bool(self.passed), "sqnr_db": json_float(self.metrics.sqnr_db, 3),
                "cosine": json_float(self.metrics.cosine, 8),
                "max_abs": json_float(self.metrics.max_abs, significant=6),
                "elements": int(self.metrics.elements)}

    def line(self) -> str:
        shown = "-" if self.value is None else f"{self.value:.4g}"
        return f"{'pass' if self.passed else 'FAIL'}: {self.check.describe()}: measured {shown}"


class _CheckAccumulator:
    """A check's slice of one output, accumulated like a whole tensor (plus top-1 over its last axis)."""

    __slots__ = ("acc", "check", "mask", "top1_hits", "top1_n")

    def __init__(self, check: Check) -> None:
        self.check = check
        self.acc = _Accumulator(check.describe())
        self.top1_hits = 0
        self.top1_n = 0
        self.mask = _MaskAccumulator(check.level) if check.metric == "iou" else None

    def select(self, a: np.ndarray) -> np.ndarray:
        try:
            part = a[self.check.index] if self.check.index else a
        except IndexError as e:
            raise UserError(f"{self.check.where}: slice [{self.check.slice_text}] does not fit output "
                            f"'{self.check.output}' of shape {list(a.shape)}: {e}") from None
        part = np.asarray(part)
        if part.size == 0:
            raise UserError(f"{self.check.where}: slice [{self.check.slice_text}] of output '{self.check.output}' "
                            f"(shape {list(a.shape)}) is empty")
        return part

    def update(self, ref: np.ndarray, q: np.ndarray) -> None:
        r, x = self.select(np.asarray(ref)), self.select(np.asarray(q))
        self.acc.update(r, x)
        if self.mask is not None:
            self.mask.update(r, x)
        if self.check.metric == "top1":
            if r.ndim < 1 or r.shape[-1] < 2:
                raise UserError(f"{self.check.where}: top1 needs a last axis of at least 2 entries; the slice has "
                                f"shape {list(r.shape)}")
            if r.shape == x.shape:
                self.top1_hits += int(np.count_nonzero(np.argmax(r, axis=-1) == np.argmax(x, axis=-1)))
                self.top1_n += int(np.prod(r.shape[:-1], dtype=np.int64))

    def result(self) -> CheckResult:
        m = self.acc.metrics()
        value: float | None
        if self.check.metric == "sqnr":
            value = m.sqnr_db
        elif self.check.metric == "cos":
            value = m.cosine
        elif self.check.metric == "maxerr":
            value = m.max_abs
        elif self.mask is not None:
            mask = self.mask.result()
            value = None if mask is None else mask.iou
        else:
            value = 100.0 * self.top1_hits / self.top1_n if self.top1_n else None
        if self.acc.bad is not None:
            value = None
        return CheckResult(check=self.check, value=value, passed=self.check.passes(value), metrics=m)
