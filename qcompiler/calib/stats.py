"""Activation statistics and the calibration range methods.

:class:`TensorStats` holds the streaming statistics of one tensor (min/max, and a fixed-size, mergeable
histogram when the calibration method needs one, :func:`needs_histogram`); :meth:`TensorStats.range` is the
(lo, hi) a quantizer should use for a :class:`QuantSpec`: ``minmax``, ``percentile``, ``entropy`` (KL
divergence) or ``mse`` (expected rounding + clipping error, uniform integer grids and fp8).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from qcompiler.plan import QuantSpec

log = logging.getLogger("qcompiler.calib")  # the package's logger: messages read as they did before the split

#: Histogram bins per sign: the histogram covers [-R, R] with 2 * HIST_BINS bins (R a power of two larger
#: than max|x|, so the data always spans at least HIST_BINS / 2 = 2048 bins of |x|).
HIST_BINS = 4096
#: Smallest histogram half-range (keeps the bin scale finite in float32 for denormal-only tensors).
_MIN_RANGE_EXP = -64


def _dtype_bits(dtype: str) -> int | None:
    """Integer bit width of a QuantSpec dtype; None for fp8 / float."""
    return {"int8": 8, "uint8": 8, "int16": 16, "uint16": 16, "int4": 4, "uint4": 4}.get(dtype)


_FP8 = {"fp8e4m3": (3, 448.0, -6), "fp8e5m2": (2, 57344.0, -14)}  # mantissa bits, max, min normal exponent


#: up to this many bins per sign, ``floor(x·bins/R) + bins`` is computed exactly in float32 (integers below 2**24)
_FLOAT_OFFSET_BINS = 2 ** 23

_MIN = np.minimum.reduce
_MAX = np.maximum.reduce


class TensorStats:
    """Running statistics of one tensor over calibration samples.

    Always: ``min``, ``max`` (0.0 until data arrives), ``count`` (finite elements seen), ``samples`` (updates)
    and ``nonfinite`` (NaN/Inf elements, ignored). With ``histogram=True`` also ``zeros`` (exact zeros, which
    only the histogram methods use: it stays 0 without a histogram) and a fixed-size histogram of 2 * ``bins`` bins over [-R, R], R a power of two > max|x|. When a batch exceeds R, R doubles
    (adjacent bin pairs merge), so histograms of different ranges merge exactly. Memory does not depend on the
    number of samples.
    """

    def __init__(self, histogram: bool = False, bins: int = HIST_BINS) -> None:
        if bins < 2 or bins % 2:
            raise ValueError(f"bins must be even and >= 2, got {bins}")
        self.bins = bins
        self.min = 0.0
        self.max = 0.0
        self.count = 0
        self.samples = 0
        self.zeros = 0
        self.nonfinite = 0
        self.hist: np.ndarray | None = np.zeros(2 * bins, dtype=np.int64) if histogram else None
        self.range_exp: int | None = None  # R = 2**range_exp; None until a nonzero value arrives

    @classmethod
    def for_spec(cls, spec: QuantSpec) -> TensorStats:
        """Stats object with a histogram only when ``spec``'s calibration needs one."""
        return cls(histogram=needs_histogram(spec))

    # ------------------------------------------------------------------------------------- properties
    @property
    def has_histogram(self) -> bool:
        return self.hist is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by internal arrays (constant over updates)."""
        return 0 if self.hist is None else int(self.hist.nbytes)

    @property
    def amax(self) -> float:
        return max(abs(self.min), abs(self.max))

    @property
    def bin_width(self) -> float:
        return 0.0 if self.range_exp is None else math.ldexp(1.0, self.range_exp) / self.bins

    def to_dict(self) -> dict[str, Any]:
        return {"min": self.min, "max": self.max, "count": self.count, "samples": self.samples}

    def __repr__(self) -> str:
        return (f"<TensorStats min={self.min:.6g} max={self.max:.6g} count={self.count} samples={self.samples}"
                f"{' hist' if self.hist is not None else ''}>")

    def copy(self) -> TensorStats:
        """An independent copy (the histogram copied)."""
        out = TensorStats.__new__(TensorStats)
        out.__dict__.update(self.__dict__)
        if self.hist is not None:
            out.hist = self.hist.copy()
        return out

    def without_histogram(self) -> TensorStats:
        """These statistics as collected without a histogram (for ``minmax``): ``update`` keeps ``min``, ``max``,
        ``count``, ``samples`` and ``nonfinite`` the same either way, while ``zeros`` and the histogram range
        are only kept with a histogram."""
        out = TensorStats(histogram=False, bins=self.bins)
        out.min, out.max, out.count, out.samples, out.nonfinite = (self.min, self.max, self.count, self.samples,
                                                                   self.nonfinite)
        return out

    # ----------------------------------------------------------------------------------------- update
    def update(self, x: np.ndarray) -> None:
        """Add one sample's values of the tensor."""
        a = np.asarray(x)
        if a.dtype not in (np.float32, np.float64):
            a = a.astype(np.float64 if a.dtype.kind in "iu" and a.dtype.itemsize > 2 else np.float32)
        self.samples += 1
        if a.size == 0:
            return
        # ufunc reductions directly (ndarray.min / max add a Python-level dispatch per call: calibration makes
        # one call per tensor per sample); NaN propagates through both, so a finite result means a finite tensor
        mn, mx = float(_MIN(a, axis=None)), float(_MAX(a, axis=None))
        if not (math.isfinite(mn) and math.isfinite(mx)):
            a = a.reshape(-1)
            finite = np.isfinite(a)
            n_bad = int(a.size - np.count_nonzero(finite))
            self.nonfinite += n_bad
            a = a[finite]
            if a.size == 0:
                return
            mn, mx = float(a.min()), float(a.max())
        if self.count == 0:
            self.min, self.max = mn, mx
        else:
            self.min, self.max = min(self.min, mn), max(self.max, mx)
        self.count += int(a.size)
        if self.hist is None:  # minmax: the exact zeros only matter to the histogram methods
            return
        a = a.reshape(-1)
        # exact zeros (and -0.0): a comparison and a count of booleans, 5x faster than count_nonzero on floats
        self.zeros += int(np.count_nonzero(a == 0))
        amax = max(-mn, mx)
        if amax > 0.0:
            exp = max(math.frexp(amax)[1], _MIN_RANGE_EXP)  # 2**exp > amax
            if self.range_exp is None:
                self.range_exp = exp
            elif exp > self.range_exp:
                self._grow(exp)
        if self.range_exp is None:  # all zeros so far
            self.hist[self.bins] += a.size
            return
        scale = np.asarray(math.ldexp(float(self.bins), -self.range_exp), dtype=a.dtype)  # power of two: exact
        t = a * scale
        np.floor(t, out=t)
        # in [0, 2·bins): the range 2**range_exp is strictly larger than max|x|; floor(t) is an integer of magnitude
        # <= bins, so adding bins in floating point is exact (and cheaper than on the int64 indices)
        if self.bins <= _FLOAT_OFFSET_BINS:
            t += self.bins
            idx = t.astype(np.intp)
        else:
            idx = t.astype(np.int64)
            idx += self.bins
        self.hist += np.bincount(idx, minlength=2 * self.bins)

    def _grow(self, exp: int) -> None:
        """Widen the histogram range to 2**exp by repeated doubling (pairs of bins merge: exact)."""
        assert self.hist is not None and self.range_exp is not None
        b = self.bins
        while self.range_exp < exp:
            merged = self.hist.reshape(-1, 2).sum(axis=1)
            new = np.zeros_like(self.hist)
            new[b // 2: b // 2 + b] = merged
            self.hist = new
            self.range_exp += 1

    def merge(self, other: TensorStats) -> None:
        """Add ``other``'s statistics to this one (exact for min/max and the histogram)."""
        if (self.hist is None) != (other.hist is None) or self.bins != other.bins:
            raise ValueError("cannot merge TensorStats with different histogram settings")
        self.samples += other.samples
        self.nonfinite += other.nonfinite
        if other.count == 0:
            return
        if self.count == 0:
            self.min, self.max = other.min, other.max
        else:
            self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.count += other.count
        self.zeros += other.zeros
        if self.hist is None or other.hist is None:
            return
        ohist = other.hist
        if other.range_exp is not None:
            if self.range_exp is None:
                # everything here is zeros (in the center bin); adopting other's range keeps them there
                self.range_exp = other.range_exp
            elif other.range_exp > self.range_exp:
                self._grow(other.range_exp)
            elif other.range_exp < self.range_exp:
                tmp = TensorStats(histogram=True, bins=self.bins)
                tmp.hist = other.hist.copy()
                tmp.range_exp = other.range_exp
                tmp._grow(self.range_exp)
                ohist = tmp.hist  # type: ignore[assignment]
        self.hist += ohist

    # ------------------------------------------------------------------------------------------ range
    def range(self, spec: QuantSpec) -> tuple[float, float]:
        """The (lo, hi) the quantizer should use for ``spec`` (raw range: it does not force 0 inside).

        * ``minmax``: (min, max).
        * ``percentile``: symmetric -> (-T, T), T = ``spec.percentile`` of |x|; asymmetric -> the
          (100 - p)th and p-th percentiles of x.
        * ``entropy``: TensorRT-style KL-divergence search for the clip threshold T of |x| with 2^(bits-1)
          quantized levels (2^bits for asymmetric one-signed data).
        * ``mse``: the clip minimizing the expected squared error (rounding + clipping) for ``spec.dtype``.
        * ``auto``: what the calibrate pass chose (it rewrites the spec); read before that, ``minmax``.

        Clipping methods return (-T, T) for symmetric specs and (max(min, -T), min(max, T)) otherwise. An empty
        or all-zero tensor gives (0.0, 0.0); a constant c gives (c, c) (or (-|c|, |c|)). 16-bit entropy and
        float specs fall back to minmax. A histogram method on stats collected without a histogram falls back
        to minmax with a warning.
        """
        if self.count == 0:
            return 0.0, 0.0
        method = spec.calibration
        if method in ("auto", "dynamic"):  # auto: the calibrate pass replaces it by the method it measured
            method = "minmax"               # best; dynamic: quantized at run time, nothing calibrated
        if method == "minmax" or spec.is_float:
            return self.min, self.max
        if method not in ("percentile", "entropy", "mse"):
            raise ValueError(f"unknown calibration method '{method}'")
        if self.hist is None:
            log.warning("calibration '%s' needs a histogram but these stats have none; using minmax", method)
            return self.min, self.max
        if self.range_exp is None:  # all values are exactly 0
            return 0.0, 0.0
        if method == "percentile":
            return self._percentile_range(spec)
        if method == "entropy":
            one_sided = not spec.symmetric and (self.min >= 0.0 or self.max <= 0.0)
            t = min(self._entropy_threshold(spec, one_sided), self.amax)
            if spec.symmetric:
                return -t, t
            return max(self.min, -t), min(self.max, t)
        alpha = self._mse_alpha(spec)
        if spec.symmetric or spec.dtype in _FP8:
            t = alpha * self.amax
            return -t, t
        lo = alpha * self.min if self.min < 0.0 else self.min
        hi = alpha * self.max if self.max > 0.0 else self.max
        return lo, hi

    # helpers -------------------------------------------------------------------------------------------
    def _edges_lo(self) -> float:
        return -math.ldexp(1.0, self.range_exp or 0)

    def _abs_hist(self) -> np.ndarray:
        """Histogram of |x|: ``bins`` bins over [0, R]."""
        assert self.hist is not None
        b = self.bins
        return self.hist[b:] + self.hist[:b][::-1]

    def _quantile(self, hist: np.ndarray, lo_edge: float, q: float) -> float:
        """Value below which a fraction ``q`` of the histogram mass lies (linear inside the bin)."""
        total = int(hist.sum())
        target = q * total
        cum = np.cumsum(hist)
        j = int(np.searchsorted(cum, target, side="left"))
        j = min(j, len(hist) - 1)
        before = float(cum[j - 1]) if j > 0 else 0.0
        inside = float(hist[j])
        frac = (target - before) / inside if inside > 0 else 0.0
        return lo_edge + (j + min(max(frac, 0.0), 1.0)) * self.bin_width

    def _percentile_range(self, spec: QuantSpec) -> tuple[float, float]:
        p = float(spec.percentile)
        if spec.symmetric:
            t = self._quantile(self._abs_hist(), 0.0, p / 100.0)
            t = min(t, self.amax)
            return -t, t
        assert self.hist is not None
        lo = self._quantile(self.hist, self._edges_lo(), (100.0 - p) / 100.0)
        hi = self._quantile(self.hist, self._edges_lo(), p / 100.0)
        lo = min(max(lo, self.min), self.max)
        hi = min(max(hi, self.min), self.max)
        return lo, max(lo, hi)

    def _levels(self, spec: QuantSpec, one_sided: bool) -> int:
        bits = _dtype_bits(spec.dtype) or 8  # fp8: 8-bit budget
        return 2 ** bits if one_sided else 2 ** (bits - 1)

    def _entropy_threshold(self, spec: QuantSpec, one_sided: bool) -> float:
        hist = self._abs_hist().astype(np.float64)
        # Exact zeros (half of a ReLU output) are represented exactly by any range; left in, their spike in the
        # first bin dominates the divergence and drives the threshold far too low.
        hist[0] = max(hist[0] - self.zeros, 0.0)
        nz = np.flatnonzero(hist)
        if nz.size == 0:
            return self.amax
        n = int(nz[-1]) + 1
        levels = self._levels(spec, one_sided)
        if n <= levels:
            return self.amax
        hist = hist[:n]
        suffix = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # suffix[i] = sum(hist[i:])

        # KL(p || q) for a candidate threshold i (in bins) in O(levels) from prefix sums: p is hist[:i] with the
        # clipped tail added to bin i-1; q spreads each quantized level's mass evenly over its nonzero bins
        # (levels k: bins [floor(k·i/L), floor((k+1)·i/L))). With P, S_k, N_k the masses / level sums / nonzero
        # counts, ps = Σ P, qs = Σ S_k:  KL = (Σ P log P)/ps − log ps − Σ_k S'_k log(S_k / (N_k·qs)) / ps, where
        # S'_k adds the tail to the last level and an empty-q level with mass gets q = 1e-12 (as TensorRT does).
        c_h = np.concatenate([[0.0], np.cumsum(hist)])
        c_hl = np.concatenate([[0.0], np.cumsum(np.where(hist > 0, hist * np.log(np.where(hist > 0, hist, 1.0)),
                                                        0.0))])
        c_nz = np.concatenate([[0], np.cumsum(hist > 0)])

        def kls(cands: Sequence[int]) -> np.ndarray:
            ii = np.asarray(cands, dtype=np.int64)
            edges = (np.arange(levels + 1)[None, :] * ii[:, None]) // levels  # [C, L+1]
            s_k = c_h[edges[:, 1:]] - c_h[edges[:, :-1]]
            n_k = (c_nz[edges[:, 1:]] - c_nz[edges[:, :-1]]).astype(np.float64)
            tail = suffix[ii]
            last = hist[ii - 1]
            n_k[:, -1] += (last == 0) & (tail > 0)
            p_last = last + tail
            plogp = c_hl[ii - 1] + np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0)), 0.0)
            ps = c_h[ii] + tail
            qs = c_h[ii]
            s_prime = s_k.copy()
            s_prime[:, -1] += tail
            with np.errstate(divide="ignore", invalid="ignore"):
                per = np.where(n_k > 0, s_k / np.where(n_k > 0, n_k, 1.0), 0.0)
                logq = np.where(per > 0, np.log(np.where(per > 0, per, 1.0)) - np.log(np.where(qs > 0, qs, 1.0))[:, None],
                                np.log(1e-12))
                cross = np.where(n_k > 0, s_prime * logq, 0.0).sum(axis=1)
                kl = plogp / ps - np.log(ps) - cross / ps
            return np.where(qs > 0, kl, np.inf)

        step = max(1, (n - levels) // 256)
        cands = list(range(levels, n + 1, step))
        if cands[-1] != n:
            cands.append(n)
        scores = kls(cands)
        best = cands[int(np.argmin(scores))]
        if step > 1:
            fine = list(range(max(levels, best - step + 1), min(n, best + step - 1) + 1))
            best = fine[int(np.argmin(kls(fine)))]
        return best * self.bin_width

    def _side_hists(self) -> tuple[np.ndarray, np.ndarray]:
        """Magnitude histograms of the positive and negative sides, without the exact zeros."""
        assert self.hist is not None
        b = self.bins
        pos = self.hist[b:].astype(np.float64)
        neg = self.hist[:b][::-1].astype(np.float64)
        pos[0] = max(pos[0] - self.zeros, 0.0)  # zeros land in [0, w) and are represented exactly
        return pos, neg

    def _mse_alpha(self, spec: QuantSpec) -> float:
        """Fraction of the data range (amax for symmetric, min and max for asymmetric) to clip at."""
        pos, neg = self._side_hists()
        w = self.bin_width
        a = np.arange(self.bins, dtype=np.float64) * w
        b = a + w
        amax = self.amax
        fp8 = _FP8.get(spec.dtype)
        bits = _dtype_bits(spec.dtype) or 8
        if spec.symmetric or fp8 is not None:
            hi_abs = lo_abs = amax
            steps = 2 ** (bits - 1) - 1
            span = amax
        else:
            hi_abs = max(self.max, 0.0)
            lo_abs = max(-self.min, 0.0)
            steps = 2 ** bits - 1
            span = hi_abs + lo_abs

        # only bins holding data matter: trim both sides to the last nonzero bin
        used = int(max(np.flatnonzero(pos)[-1] if pos.any() else 0, np.flatnonzero(neg)[-1] if neg.any() else 0)) + 1
        pos, neg, a, b = pos[:used], neg[:used], a[:used], b[:used]
        kept = [np.flatnonzero(pos), np.flatnonzero(neg)]
        counts = [pos[kept[0]], neg[kept[1]]]
        # one clip for both sides (a symmetric range): their error terms are read from one table
        tables = [_EdgeTable(kept, w)] if hi_abs == lo_abs else [_EdgeTable(kept[:1], w), _EdgeTable(kept[1:], w)]

        def err(alphas: np.ndarray) -> np.ndarray:
            al = alphas[:, None]
            if fp8 is not None:
                t = al * amax
                return _fp8_err(pos, a, b, t, fp8) + _fp8_err(neg, a, b, t, fp8)
            step = al * span / steps
            if len(tables) == 1:
                e_pos, e_neg = tables[0].errors(counts, step, al * hi_abs)
            else:
                e_pos, = tables[0].errors(counts[:1], step, al * hi_abs)
                e_neg, = tables[1].errors(counts[1:], step, al * lo_abs)
            return e_pos + e_neg

        coarse = np.linspace(0.01, 1.0, 100)
        k = int(np.argmin(err(coarse)))
        fine = np.linspace(float(coarse[max(k - 1, 0)]), float(coarse[min(k + 1, len(coarse) - 1)]), 41)
        return float(fine[int(np.argmin(err(fine)))])


def _cube(v: np.ndarray) -> np.ndarray:
    return v * v * v


def _rounding_integral(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """F(x) = ∫_0^x (t - s·round(t/s))² dt for x >= 0 (grid of step s through 0); broadcasts."""
    h = s / 2.0
    u = x + h
    n = np.floor(u / s)
    r = u - n * s - h
    return n * (_cube(s) / 12.0) + _cube(r) / 3.0


class _EdgeTable:
    """The uniform grid's expected squared error terms (rounding to step ``s`` inside ``[0, t]``, clipping above ``t``;
    a bin's values uniform inside it) for the nonzero bins of one or two magnitude histograms on the same
    grid (bin ``k`` = [k·w, (k+1)·w)) and the same candidate steps ``s`` and clips ``t``, value for value as
    the per-bin formula computes them (the same floating-point operations on the same numbers: the replaced
    per-bin code is tests/test_calib_exactness.py's reference), with
    :func:`_rounding_integral` and the clipping cube evaluated once per bin edge instead of twice per bin and side:
    a bin's upper edge ``(k+1)·w`` is the next bin's lower edge ``k·w + w`` bit for bit (``w`` a power of two), and
    the positive and negative sides of a symmetric range share their clips. The edges are found once per search
    (``kept``: each side's nonzero bins), the terms once per set of candidates."""

    def __init__(self, kept: Sequence[np.ndarray], w: float) -> None:
        bins = kept[0] if len(kept) == 1 else np.union1d(kept[0], kept[1])
        nodes = np.union1d(bins, bins + 1)  # the edges of those bins, in bin-width units
        self.edges = nodes.astype(np.float64) * w
        self.cols = [np.searchsorted(nodes, k) for k in kept]  # a bin's column: its lower edge
        self.w = w

    def errors(self, counts: Sequence[np.ndarray], s: np.ndarray, t: np.ndarray) -> list[np.ndarray]:
        """Per side (``counts``: its nonzero bins' counts, in the order of ``kept``), the expected squared error
        per candidate."""
        s = np.maximum(s, np.finfo(np.float64).tiny)
        f = _rounding_integral(np.minimum(self.edges, t), s)
        g = _cube(np.maximum(self.edges - t, 0.0))
        # column j: the terms of [edges[j], edges[j + 1]), a bin wherever edges[j] is one (else unused)
        d = ((f[:, 1:] - f[:, :-1]) + (g[:, 1:] - g[:, :-1]) / 3.0) / self.w
        # row-major, as the replaced code's terms were: ``np.take`` along axis 1 gives that (an index ``d[:, cols]``
        # comes out column-major, which BLAS sums in another order) and is 15x faster than the index and a copy
        return [np.asarray(np.take(d, cols, axis=1) @ c) for c, cols in zip(counts, self.cols, strict=True)]


def _fp8_err(hist: np.ndarray, a: np.ndarray, b: np.ndarray, t: np.ndarray,
             fmt: tuple[int, float, int]) -> np.ndarray:
    """Expected squared error of an fp8 format scaled so that ``t`` maps to its max (bin-center model, relative
    rounding step); ``t`` a column vector of candidates."""
    mbits, fmax, emin = fmt
    c = (a + b) / 2.0
    scale = fmax / np.maximum(t, np.finfo(np.float64).tiny)
    e = np.floor(np.log2(np.maximum(c * scale, 2.0 ** emin)))
    step = np.exp2(e - mbits) / scale
    per = np.where(c > t, (c - t) ** 2, step * step / 12.0)
    return np.asarray(per @ hist)


def needs_histogram(spec: QuantSpec) -> bool:
    return spec.calibration in ("percentile", "entropy", "mse", "auto") and not spec.is_float
