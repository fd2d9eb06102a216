"""Graph input signatures and the checks every calibration feed passes.

:func:`input_signatures` reads the graph inputs (name, dtype, dims: fixed, symbolic or unknown);
:func:`check_feed` validates one feed against them (names, rank, fixed dims, shared symbolic dims, dtype,
NaN/Inf) and casts it to the input dtype where that is safe (float64 -> float32, float32 -> float16,
int32 -> int64, ...; integer data for a float input is refused). Each problem is a one-line :class:`UserError`
naming the file and the array. :func:`session_feed` casts a checked feed to the float dtypes an onnxruntime
session expects.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core.errors import UserError
from qcompiler.plan.checks import check_shape_fits

Feed = dict[str, np.ndarray]

#: a calibration / validation array's dynamic (or undeclared) dim may be at most this long ...
MAX_DYNAMIC_DIM = 1 << 24
#: ... and one feed array at most this many elements (1 GiB of float32): data is never larger than the
#: feeds the model's input shapes describe, with dynamic dims bounded generously
MAX_FEED_ELEMENTS = 1 << 28


@dataclass
class InputSig:
    """A graph input: name, numpy dtype and shape (dims: int, or a symbolic name / None when dynamic)."""

    name: str
    dtype: np.dtype
    shape: list[int | str | None]
    known_rank: bool = True  # False: the model does not declare the input's shape (any rank accepted)

    def describe(self) -> str:
        if not self.known_rank:
            return f"{self.name}: {self.dtype} [?]"
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype} [{dims}]"


def input_signatures(graph: gs.Graph) -> list[InputSig]:
    """Signatures of the graph inputs (constants/initializers are not inputs). Unknown dtype -> float32."""
    sigs: list[InputSig] = []
    for t in graph.inputs:
        if isinstance(t, gs.Constant):
            continue
        try:
            dtype = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
        except TypeError:
            dtype = np.dtype(np.float32)
        if t.shape is None:
            sigs.append(InputSig(t.name, dtype, [], known_rank=False))
            continue
        dims: list[int | str | None] = []
        for d in t.shape:
            if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
                dims.append(int(d) if int(d) >= 0 else None)
            elif isinstance(d, str) and d and d != "?" and not d.startswith("unk__"):
                dims.append(d)  # "?" (Paddle) and "unk__N" (shape inference) mean "any", not a shared name
            else:
                dims.append(None)
        sigs.append(InputSig(t.name, dtype, dims))
    return sigs


def with_shapes(inputs: Sequence[InputSig], shapes: Sequence[tuple[str, Sequence[int]]]) -> list[InputSig]:
    """``inputs`` with the dimensions ``--input-shape`` fixes (``(name, dims)``): data is then checked against
    them (a calibration sample of another shape is refused, naming it, before any work)."""
    fixed = {name: [int(d) for d in dims] for name, dims in shapes}
    out = []
    for s in inputs:
        if s.name in fixed:  # the flag's own mistakes (rank, a static dim contradicted) named before the data's
            check_shape_fits(s.name, fixed[s.name], s.shape if s.known_rank else None)
            s = dataclasses.replace(s, shape=list(fixed[s.name]), known_rank=True)
        out.append(s)
    return out


def fmt_shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def check_array_meta(where: str, key: str, shape: tuple[int, ...], dtype: np.dtype, sig: InputSig) -> None:
    """Rank, fixed dims and dtype of one array against its input (no data needed)."""
    if dtype.hasobject:
        raise UserError(f"{where}: array '{key}' holds Python objects; only numeric arrays are accepted")
    check_array_size(where, key, shape, sig)
    if sig.known_rank:
        if len(shape) != len(sig.shape):
            raise UserError(f"{where}: array '{key}' has shape {fmt_shape(shape)} (rank {len(shape)}) but model "
                            f"input {sig.describe()} has rank {len(sig.shape)}")
        for axis, (got, want) in enumerate(zip(shape, sig.shape)):
            if isinstance(want, int) and got != want:
                raise UserError(f"{where}: array '{key}' has shape {fmt_shape(shape)}; dim {axis} is {got} but "
                                f"model input {sig.describe()} needs {want}")
    _check_castable(where, key, dtype, sig)


def check_array_size(where: str, key: str, shape: tuple[int, ...], sig: InputSig) -> None:
    """An array is never larger than the feed its input describes: each dynamic dim at most
    :data:`MAX_DYNAMIC_DIM`, the whole at most :data:`MAX_FEED_ELEMENTS` elements (checked from the header,
    before anything is allocated)."""
    for axis, got in enumerate(shape):
        want = sig.shape[axis] if sig.known_rank and axis < len(sig.shape) else None
        if not isinstance(want, int) and got > MAX_DYNAMIC_DIM:
            raise UserError(f"{where}: array '{key}' has shape {fmt_shape(shape)}; dim {axis} ({got}) is beyond "
                            f"the {MAX_DYNAMIC_DIM} limit for a dynamic dim of model input {sig.describe()}")
    n = math.prod(int(d) for d in shape)
    if n > MAX_FEED_ELEMENTS:
        raise UserError(f"{where}: array '{key}' has shape {fmt_shape(shape)} ({n} elements), beyond the "
                        f"{MAX_FEED_ELEMENTS} elements a feed of model input {sig.describe()} may have")


def _is_float(dt: np.dtype) -> bool:
    """numpy's float types and ml_dtypes' (bfloat16, float8_*: numpy kind 'V')."""
    if dt.kind != "V":
        return dt.kind == "f"
    try:
        ml_dtypes.finfo(dt)
    except (TypeError, ValueError):
        return False
    return True


def _raw_bits_of(src: np.dtype, dst: np.dtype) -> bool:
    """``np.savez`` stores a bfloat16 / float8 array as raw bytes (``|V2`` / ``|V1``): read as the model input's
    type when that is one of ml_dtypes' floats of the same width."""
    return src.kind == "V" and dst.kind == "V" and _is_float(dst) and src.itemsize == dst.itemsize


def _check_castable(where: str, key: str, src: np.dtype, sig: InputSig) -> None:
    dst = sig.dtype
    if src == dst or _raw_bits_of(src, dst):
        return
    ok = (_is_float(dst) and _is_float(src)) or (dst.kind in "iu" and src.kind in "iub") or (
        dst.kind == "b" and src.kind == "b")
    if not ok:
        hint = " (integer data for a float input is refused: convert it explicitly)" if (
            dst.kind == "f" and src.kind in "iub") else ""
        raise UserError(f"{where}: array '{key}' is {src} but model input '{sig.name}' is {dst}; "
                        f"cannot be cast safely{hint}")


def _conform(where: str, key: str, arr: np.ndarray, sig: InputSig) -> np.ndarray:
    """Check values (NaN, integer range) and cast ``arr`` to the input dtype. ±Inf is data (attention masks
    of transformer exports hold -inf); calibration statistics count it apart, so ranges stay finite."""
    dst = sig.dtype
    if _raw_bits_of(arr.dtype, dst):
        arr = arr.view(dst)
    if _is_float(arr.dtype):
        finite = bool(np.isfinite(arr).all())
        if not finite and np.isnan(arr).any():
            bad = tuple(int(i) for i in np.argwhere(np.isnan(arr))[0])
            raise UserError(f"{where}: array '{key}' contains NaN (first at index {bad})")
        if arr.dtype != dst:
            with np.errstate(over="ignore"):
                out = arr.astype(dst)
            ok = bool(np.isfinite(out).all()) if finite else (
                np.count_nonzero(np.isinf(out)) == np.count_nonzero(np.isinf(arr)))
            if not ok:
                raise UserError(f"{where}: array '{key}' has values beyond the range of {dst} (model input "
                                f"'{sig.name}')")
            return out
        return arr
    if arr.dtype != dst and dst.kind in "iu" and not np.can_cast(arr.dtype, dst) and arr.size:
        info = np.iinfo(dst)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            raise UserError(f"{where}: array '{key}' has values in [{lo}, {hi}], outside {dst} (model input "
                            f"'{sig.name}')")
    return arr.astype(dst) if arr.dtype != dst else arr


def check_keys(where: str, keys: Sequence[str], inputs: Sequence[InputSig]) -> None:
    names = [s.name for s in inputs]
    for k in keys:
        if k not in names:
            raise UserError(f"{where}: array '{k}' is not an input of the model (inputs: {', '.join(names)})")
    for n in names:
        if n not in keys:
            have = ", ".join(keys) if keys else "none"
            raise UserError(f"{where}: no array for model input '{n}' (arrays: {have})")


def check_symbolic(where: str, shapes: dict[str, tuple[int, ...]], inputs: Sequence[InputSig]) -> None:
    """Inputs sharing a symbolic dim name (e.g. ``N``) must agree on its value within one feed."""
    seen: dict[str, tuple[int, str]] = {}
    for sig in inputs:
        if not sig.known_rank or sig.name not in shapes:
            continue
        for d, got in zip(sig.shape, shapes[sig.name]):
            if isinstance(d, str):
                if d in seen and seen[d][0] != got:
                    raise UserError(f"{where}: array '{sig.name}' has {d}={got} but array '{seen[d][1]}' has "
                                    f"{d}={seen[d][0]}")
                seen.setdefault(d, (int(got), sig.name))


def check_feed(feed: dict[str, Any], inputs: Sequence[InputSig], where: str) -> Feed:
    """Validate one feed against ``inputs`` and return it cast to the input dtypes. Raises :class:`UserError`."""
    check_keys(where, list(feed), inputs)
    out: Feed = {}
    for sig in inputs:
        arr = np.asarray(feed[sig.name])
        check_array_meta(where, sig.name, tuple(arr.shape), arr.dtype, sig)
        out[sig.name] = _conform(where, sig.name, arr, sig)
    check_symbolic(where, {k: tuple(v.shape) for k, v in out.items()}, inputs)
    return out


_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def session_feed(feed: Feed, sigs: Sequence[InputSig], want: dict[str, str]) -> Feed:
    """Cast float feeds to the dtype the session expects (e.g. fp16 data for a graph converted to fp32)."""
    out: Feed = {}
    for name, arr in feed.items():
        target = _ORT_FLOAT.get(want.get(name, ""))
        if target is not None and arr.dtype.kind == "f" and arr.dtype != target:
            arr = arr.astype(target)
        if name in want:
            out[name] = arr
    return out
