"""The two numeric helpers every report shares: signal-to-quantization-noise ratio and JSON-safe floats.

* :func:`sqnr_db` — ``10·log10(Σref² / Σ(ref−q)²)`` in float64, over one pair of arrays or summed over
  sequences of array pairs, over the finite values (:func:`energies`, :func:`mask_nonfinite`: a non-finite value
  both sides hold is left out, one only one side holds is an infinite error);
* :func:`json_float` — a float as strict JSON can hold it: rounded to decimals or significant digits, and the
  non-finite values spelled ``"inf"`` / ``"-inf"`` / ``"nan"`` (or ``None``);
* :func:`json_tree` — a report's nested dicts / lists made JSON-writable as they are (numpy scalars to Python
  numbers, paths to strings, non-finite floats spelled out), nothing rounded;
* :func:`c_contiguous` — an array in C order with its shape kept (``np.ascontiguousarray`` makes a 0-d array 1-d).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np


def _pairs(ref: Any, test: Any) -> Iterable[tuple[Any, Any]]:
    """One pair for two arrays (or array-likes of numbers); the zipped pairs for two lists / tuples / iterators of
    arrays."""
    if isinstance(ref, np.ndarray) or np.isscalar(ref):
        return [(ref, test)]
    if isinstance(ref, (list, tuple)) and ref and not isinstance(ref[0], (np.ndarray, list, tuple)):
        return [(ref, test)]  # a plain list of numbers: one array
    return zip(ref, test)


def sqnr_db(ref: Any, test: Any) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σref² / Σ(ref−test)²)`` in dB, computed in float64.

    ``ref`` / ``test``: two arrays, or two sequences of arrays compared pairwise with the sums taken over all
    pairs (arrays of different shapes may follow each other; a pair of different shapes gives ``nan``).
    Identical values give ``inf``; a zero reference with a nonzero error ``-inf``; a non-finite value in one
    array only ``-inf``, in both at the same place nothing (:func:`energies`). The sums
    are numpy sums of products (not BLAS dots: next to onnxruntime's spinning thread pool a multithreaded BLAS
    call is slow)."""
    sig = noise = 0.0
    for r, x in _pairs(ref, test):
        a = np.asarray(r, dtype=np.float64).ravel()
        b = np.asarray(x, dtype=np.float64).ravel()
        if a.shape != b.shape:
            return math.nan
        s, n = energies(a, b)
        sig += s
        noise += n
    if math.isnan(sig) or math.isnan(noise):
        return math.nan
    if noise == 0.0:
        return math.inf
    if sig == 0.0:
        return -math.inf
    return float(10.0 * np.log10(sig / noise))


def c_contiguous(a: Any) -> np.ndarray:
    """``a`` as a C-contiguous array of the same shape: itself when it is one, else a copy. Not
    ``np.ascontiguousarray``, which returns at least 1-d: a 0-d sample written or digested through it came back,
    or keyed, as shape ``(1,)`` (a bundle's check data then failed its own ``verify``)."""
    arr = np.asarray(a)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def energies(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """``(Σa², Σ(a−b)²)`` of two float64 arrays of one shape, over their finite values: a position where both hold
    the same non-finite value (the -inf of a masked log-softmax, NaN in both) is the reference reproduced and left
    out; one where only one does (or they differ) makes the error ``inf`` (:func:`mask_nonfinite`)."""
    with np.errstate(invalid="ignore", over="ignore"):
        d = a - b
        s, n = float(np.sum(a * a)), float(np.sum(d * d))
    if math.isfinite(s) and math.isfinite(n):  # a float32 value squared cannot overflow float64: all finite
        return s, n
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    _, _, mismatch = mask_nonfinite(a, b)
    d = a - b
    return float(np.sum(a * a)), math.inf if mismatch is not None else float(np.sum(d * d))


def mask_nonfinite(r: np.ndarray, x: np.ndarray) -> tuple[int, int, np.ndarray | None]:
    """In place on two float arrays of one shape (scratch copies: the float and the quantized values): every
    position where either is not finite is zeroed in both — no signal, no error — so sums see the finite values
    only. Returns (positions where both hold the same non-finite value — the -inf a masked log-softmax gives in
    both models, NaN in both —, positions where only one does or they differ, the mask of the latter or None).
    Callers make a mismatch an infinite error; a match is the float model's value reproduced."""
    bad = ~(np.isfinite(r) & np.isfinite(x))
    if not bad.any():
        return 0, 0, None
    same = bad & ((r == x) | (np.isnan(r) & np.isnan(x)))
    mismatch = bad & ~same
    r[bad] = 0.0
    x[bad] = 0.0
    n_mis = int(np.count_nonzero(mismatch))
    return int(np.count_nonzero(same)), n_mis, mismatch if n_mis else None


def json_float(x: float, digits: int | None = None, *, significant: int | None = None,
               nonfinite: Literal["string", "none"] = "string") -> float | str | None:
    """``x`` as strict JSON holds it: rounded to ``digits`` decimals, or to ``significant`` digits (``%g``), or
    as it is (``float(x)``) when neither is given. Non-finite values (which strict JSON has not) become the
    strings ``"inf"`` / ``"-inf"`` / ``"nan"``, or ``None`` with ``nonfinite="none"``."""
    if not math.isfinite(x):
        if nonfinite == "none":
            return None
        if math.isnan(x):
            return "nan"
        return "inf" if x > 0 else "-inf"
    if significant is not None:
        return float(f"{x:.{significant}g}")
    if digits is not None:
        return round(float(x), digits)
    return float(x)


def json_tree(x: Any) -> Any:
    """``x`` (dicts, lists, tuples, numbers, numpy scalars, paths) as strict JSON can hold it: keys as strings,
    numpy scalars as Python numbers, paths as strings, non-finite floats as ``"nan"`` / ``"inf"`` / ``"-inf"``;
    values are not rounded."""
    if isinstance(x, dict):
        return {str(k): json_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_tree(v) for v in x]
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return str(x)
    if hasattr(x, "item") and callable(x.item):
        return json_tree(x.item())
    if hasattr(x, "__fspath__"):
        return str(x)
    return x
