"""Calibration's faster arithmetic (issue 15) gives the statistics and ranges of the code it replaced, bit for bit.

The references below are the replaced code, copied verbatim (session 10, commit 164df96): the histogram update's
index arithmetic and exact-zero count, and the ``mse`` range search with its error per bin and side computed
separately. Every field of :class:`TensorStats` and every error value of the search must be equal, not close: a
compiled model's bytes depend on them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qcompiler.calib.stats import _FP8, TensorStats, _cube, _dtype_bits, _rounding_integral
from qcompiler.plan import QuantSpec


# the per-bin error of the mse search as it was before calibration's edge table (the reference it is held to)
def _uniform_err(hist: np.ndarray, a: np.ndarray, b: np.ndarray, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Expected total squared error of the magnitudes counted in bins [a, b) (uniform inside each bin),
    quantized to a grid of step ``s`` and clipped at ``t``. ``s`` and ``t``: column vectors of candidates;
    returns one error per candidate."""
    s = np.maximum(s, np.finfo(np.float64).tiny)
    keep = hist > 0
    hist, a, b = hist[keep], a[keep], b[keep]
    w = b - a
    # rounding error over [a, min(b, t)] (empty when a >= t), clipping error over [max(a, t), b]
    rounding = _rounding_integral(np.minimum(b, t), s) - _rounding_integral(np.minimum(a, t), s)
    clipping = (_cube(np.maximum(b - t, 0.0)) - _cube(np.maximum(a - t, 0.0))) / 3.0
    return np.asarray(((rounding + clipping) / w) @ hist)


def _fields(st: TensorStats) -> tuple:
    return (st.min, st.max, st.count, st.samples, st.zeros, st.nonfinite, st.range_exp, st.bins,
            None if st.hist is None else st.hist.tobytes())


def _old_hist_part(st: TensorStats, a: np.ndarray) -> tuple[int, np.ndarray]:
    """(exact zeros, histogram increment) as the replaced ``update`` computed them, at ``st``'s current range."""
    zeros = int(a.size - np.count_nonzero(a))
    scale = np.asarray(math.ldexp(float(st.bins), -st.range_exp), dtype=a.dtype)
    t = a * scale
    np.floor(t, out=t)
    idx = t.astype(np.int64)
    idx += st.bins
    return zeros, np.bincount(idx, minlength=2 * st.bins)


def _old_update(st: TensorStats, x: np.ndarray) -> None:
    """The replaced ``TensorStats.update`` (min / max / finite filtering unchanged, its histogram part as before)."""
    hist = st.hist
    st.hist = None  # the shared min / max / count part only
    before = st.count
    st.update(x)
    st.hist = hist
    if hist is None or st.count == before:
        return
    a = np.asarray(x)
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64 if a.dtype.kind in "iu" and a.dtype.itemsize > 2 else np.float32)
    a = a.reshape(-1)
    a = a[np.isfinite(a)]
    mn, mx = float(a.min()), float(a.max())
    amax = max(-mn, mx)
    if amax > 0.0:
        exp = max(math.frexp(amax)[1], -64)
        if st.range_exp is None:
            st.range_exp = exp
        elif exp > st.range_exp:
            st._grow(exp)
    if st.range_exp is None:
        st.zeros += int(a.size - np.count_nonzero(a))
        hist[st.bins] += a.size
        return
    zeros, inc = _old_hist_part(st, a)
    st.zeros += zeros
    st.hist += inc


def _samples(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    for k in range(24):
        n = int(rng.integers(1, 50_000))
        kind = k % 8
        if kind == 0:
            x = rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 6)
        elif kind == 1:
            x = np.maximum(rng.standard_normal(n), 0.0)  # half exact zeros
        elif kind == 2:
            x = rng.standard_t(2, n)
        elif kind == 3:
            x = rng.integers(-4, 5, n) * 0.125  # exact multiples of the bin width: floor's edges
        elif kind == 4:
            x = -np.abs(rng.standard_normal(n)) * 1e-30  # tiny negatives: the lowest bin of their side
        elif kind == 5:
            x = np.concatenate([rng.standard_normal(n), [np.nan, np.inf, -0.0, 0.0, -np.inf]])
        elif kind == 6:
            x = np.zeros(n)
        else:
            x = rng.standard_normal(n) * 1e3  # grows the range: pairs of bins merge
        out.append(x.astype(np.float32 if k % 3 else np.float64))
    out.append(rng.integers(-100, 100, 1000).astype(np.int64))  # integer tensors (cast as before)
    out.append(rng.integers(0, 9, 100).astype(np.uint8))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_update_is_the_replaced_one_field_for_field(seed: int) -> None:
    new, old = TensorStats(histogram=True), TensorStats(histogram=True)
    for x in _samples(seed):
        new.update(x)
        _old_update(old, x)
        assert _fields(new) == _fields(old)
    assert new.zeros > 0 and new.nonfinite == 3 * 3 and int(new.hist.sum()) == new.count


def test_histogram_update_with_a_bin_count_above_float32s_integers_still_exact() -> None:
    """Past 2**23 bins per sign the offset is added to the integer indices, as before."""
    bins = 2 ** 24
    new, old = TensorStats(histogram=True, bins=bins), TensorStats(histogram=True, bins=bins)
    x = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    new.update(x)
    _old_update(old, x)
    assert _fields(new) == _fields(old)


def _old_mse_errors(st: TensorStats, spec: QuantSpec) -> tuple[float, np.ndarray, np.ndarray]:
    """The replaced ``_mse_alpha``: (alpha, the coarse search's errors, the fine search's errors)."""
    pos, neg = st._side_hists()
    w = st.bin_width
    a = np.arange(st.bins, dtype=np.float64) * w
    b = a + w
    amax = st.amax
    fp8 = _FP8.get(spec.dtype)
    bits = _dtype_bits(spec.dtype) or 8
    if spec.symmetric or fp8 is not None:
        hi_abs = lo_abs = amax
        steps = 2 ** (bits - 1) - 1
        span = amax
    else:
        hi_abs, lo_abs = max(st.max, 0.0), max(-st.min, 0.0)
        steps = 2 ** bits - 1
        span = hi_abs + lo_abs
    used = int(max(np.flatnonzero(pos)[-1] if pos.any() else 0, np.flatnonzero(neg)[-1] if neg.any() else 0)) + 1
    pos, neg, a, b = pos[:used], neg[:used], a[:used], b[:used]

    def err(alphas: np.ndarray) -> np.ndarray:
        al = alphas[:, None]
        step = al * span / steps
        return _uniform_err(pos, a, b, step, al * hi_abs) + _uniform_err(neg, a, b, step, al * lo_abs)

    coarse = np.linspace(0.01, 1.0, 100)
    e1 = err(coarse)
    k = int(np.argmin(e1))
    fine = np.linspace(float(coarse[max(k - 1, 0)]), float(coarse[min(k + 1, len(coarse) - 1)]), 41)
    e2 = err(fine)
    return float(fine[int(np.argmin(e2))]), e1, e2


def _stats(x: np.ndarray) -> TensorStats:
    st = TensorStats(histogram=True)
    for part in np.array_split(x.astype(np.float32), 3):
        st.update(part)
    return st


_SPECS = [QuantSpec(dtype=d, symmetric=s, calibration="mse")
          for d in ("uint8", "int8", "int4", "uint4", "int16") for s in (False, True)]


@pytest.mark.parametrize("seed", [0, 1])
def test_mse_search_errors_and_alpha_are_the_replaced_ones_bit_for_bit(seed: int, monkeypatch) -> None:
    rng = np.random.default_rng(seed)
    data = [rng.standard_normal(20_000) * 10.0 ** rng.uniform(-3, 3),  # two-sided, dense
            np.maximum(rng.standard_normal(20_000), 0.0) * 6.0,  # one-sided with exact zeros
            rng.standard_t(2, 20_000),  # heavy tails: a sparse histogram (gathered columns)
            rng.integers(-3, 6, 5_000) * 0.25,  # a few values: isolated bins
            -np.abs(rng.standard_normal(3_000)),  # negative only
            np.concatenate([rng.standard_normal(5_000), [1e4, -3e3]]),  # outliers far out
            rng.uniform(-1.0, 3.0, 20_000)]  # asymmetric, every bin used
    seen: list[np.ndarray] = []
    real_argmin = np.argmin
    import qcompiler.calib.stats as stats_module

    class _Spy:
        def __getattr__(self, name: str):
            return getattr(np, name)

        @staticmethod
        def argmin(v, *a, **k):
            seen.append(np.array(v, copy=True))
            return real_argmin(v, *a, **k)

    monkeypatch.setattr(stats_module, "np", _Spy())
    for x in data:
        st = _stats(x)
        for spec in _SPECS:
            seen.clear()
            got = st._mse_alpha(spec)
            want, e1, e2 = _old_mse_errors(st, spec)
            assert got == want
            assert len(seen) == 2 and seen[0].tobytes() == e1.tobytes() and seen[1].tobytes() == e2.tobytes()
            assert st.range(spec) == st.range(spec)


def test_mse_range_of_a_constant_and_one_sided_tensors() -> None:
    for x in (np.full(100, 2.5), np.full(100, -1.0), np.array([0.0, 0.0, 3.0])):
        st = _stats(x)
        for spec in _SPECS:
            want, _e1, _e2 = _old_mse_errors(st, spec)
            assert st._mse_alpha(spec) == want
