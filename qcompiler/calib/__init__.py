"""Calibration data and activation statistics.

Three parts:

* :class:`CalibrationSource`: where calibration feeds come from (``--calib``). One of

  - a folder of ``.npz`` files, one feed per file (one array per graph input, keyed by input name, at the
    exact shape fed to the model); files are taken in sorted name order, other files are ignored;
  - a single ``.npz`` file whose arrays carry a leading sample axis ``[N, *feed_shape]``; it is streamed
    (each member is read sequentially from the zip, one sample at a time, stored or compressed alike);
  - the word ``random``: synthetic, seeded data (see :func:`random_source`). The word always means this; a
    folder that happens to be called ``random`` is given as ``./random``.

  Every feed is validated against the graph inputs (names, rank, fixed dims, dtype, NaN/Inf) and cast to the
  input dtype where that is safe (float64 -> float32, float32 -> float16, int32 -> int64, ...; integer data for
  a float input is refused). Each problem is a one-line :class:`UserError` naming the file and the array.

* :class:`TensorStats`: streaming statistics of one tensor (min/max, and a fixed-size, mergeable histogram
  when the calibration method needs one) and :meth:`TensorStats.range`, the (lo, hi) a quantizer should use
  for a :class:`QuantSpec` (``minmax``, ``percentile``, ``entropy`` or ``mse``).

* :func:`collect`: runs the float graph in onnxruntime over a source, one sample per run (up to
  ``QCOMPILER_CALIB_WORKERS`` runs in flight on worker threads, default: the usable CPUs, at most 2, each run on
  one intra-op thread), and returns the statistics of the requested tensors, updated in sample order, so the
  result does not depend on the number of workers. The library never prints; progress goes to a callback.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import logging
import math
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler import ir
from qcompiler.core.errors import UserError
from qcompiler.plan import QuantSpec

log = logging.getLogger(__name__)

#: Histogram bins per sign: the histogram covers [-R, R] with 2 * HIST_BINS bins (R a power of two larger
#: than max|x|, so the data always spans at least HIST_BINS / 2 = 2048 bins of |x|).
HIST_BINS = 4096
#: Smallest histogram half-range (keeps the bin scale finite in float32 for denormal-only tensors).
_MIN_RANGE_EXP = -64
#: Random sources: size given to dynamic spatial / sequence dims (rank >= 3, any axis but the first).
RANDOM_SPATIAL = 32
#: Random sources: integer inputs get uniform integers in [0, RANDOM_INT_HIGH).
RANDOM_INT_HIGH = 8
#: Random sources: an input larger than this (elements per sample) is refused instead of exhausting memory.
RANDOM_MAX_ELEMENTS = 1 << 28

Feed = dict[str, np.ndarray]


# ============================================================================================ signatures
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


def _fmt_shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _check_array_meta(where: str, key: str, shape: tuple[int, ...], dtype: np.dtype, sig: InputSig) -> None:
    """Rank, fixed dims and dtype of one array against its input (no data needed)."""
    if dtype.hasobject:
        raise UserError(f"{where}: array '{key}' holds Python objects; only numeric arrays are accepted")
    if sig.known_rank:
        if len(shape) != len(sig.shape):
            raise UserError(f"{where}: array '{key}' has shape {_fmt_shape(shape)} (rank {len(shape)}) but model "
                            f"input {sig.describe()} has rank {len(sig.shape)}")
        for axis, (got, want) in enumerate(zip(shape, sig.shape)):
            if isinstance(want, int) and got != want:
                raise UserError(f"{where}: array '{key}' has shape {_fmt_shape(shape)}; dim {axis} is {got} but "
                                f"model input {sig.describe()} needs {want}")
    _check_castable(where, key, dtype, sig)


def _check_castable(where: str, key: str, src: np.dtype, sig: InputSig) -> None:
    dst = sig.dtype
    if src == dst:
        return
    ok = (dst.kind == "f" and src.kind == "f") or (dst.kind in "iu" and src.kind in "iub") or (
        dst.kind == "b" and src.kind == "b")
    if not ok:
        hint = " (integer data for a float input is refused: convert it explicitly)" if (
            dst.kind == "f" and src.kind in "iub") else ""
        raise UserError(f"{where}: array '{key}' is {src} but model input '{sig.name}' is {dst}; "
                        f"cannot be cast safely{hint}")


def _conform(where: str, key: str, arr: np.ndarray, sig: InputSig) -> np.ndarray:
    """Check values (NaN/Inf, integer range) and cast ``arr`` to the input dtype."""
    dst = sig.dtype
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
            raise UserError(f"{where}: array '{key}' contains NaN or Inf (first at index {bad})")
        if arr.dtype != dst:
            with np.errstate(over="ignore"):
                out = arr.astype(dst)
            if not np.isfinite(out).all():
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


def _check_keys(where: str, keys: Sequence[str], inputs: Sequence[InputSig]) -> None:
    names = [s.name for s in inputs]
    for k in keys:
        if k not in names:
            raise UserError(f"{where}: array '{k}' is not an input of the model (inputs: {', '.join(names)})")
    for n in names:
        if n not in keys:
            have = ", ".join(keys) if keys else "none"
            raise UserError(f"{where}: no array for model input '{n}' (arrays: {have})")


def _check_symbolic(where: str, shapes: dict[str, tuple[int, ...]], inputs: Sequence[InputSig]) -> None:
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
    _check_keys(where, list(feed), inputs)
    out: Feed = {}
    for sig in inputs:
        arr = np.asarray(feed[sig.name])
        _check_array_meta(where, sig.name, tuple(arr.shape), arr.dtype, sig)
        out[sig.name] = _conform(where, sig.name, arr, sig)
    _check_symbolic(where, {k: tuple(v.shape) for k, v in out.items()}, inputs)
    return out


# ============================================================================================== sources
class CalibrationSource:
    """Iterable of feeds: dict[input_name -> np.ndarray] at the exact shape fed to the model.

    Re-iterable; streams (loads one sample at a time). ``synthetic`` is True for random data (reports must say
    the ranges are synthetic); ``description`` says where the data comes from, e.g. ``calib/ (64 .npz files)``.
    """

    synthetic: bool = False
    description: str = ""

    def __init__(self, inputs: Sequence[InputSig], description: str, *, synthetic: bool = False,
                 limit: int | None = None) -> None:
        self.inputs = list(inputs)
        self.description = description
        self.synthetic = synthetic
        self._limit = limit

    # ---------------------------------------------------------------------------------- to implement
    def _count(self) -> int:
        raise NotImplementedError

    def _feeds(self) -> Iterator[Feed]:
        raise NotImplementedError

    def label(self, i: int) -> str:
        """Human name of sample ``i`` for error messages (e.g. ``calib/003.npz``)."""
        return f"{self.description}: sample {i}"

    # ------------------------------------------------------------------------------------ public API
    def __len__(self) -> int:
        n = self._count()
        return n if self._limit is None else min(n, self._limit)

    def __iter__(self) -> Iterator[Feed]:
        n = len(self)
        if n == 0:
            return
        gen = self._feeds()
        try:
            for i, feed in enumerate(gen):
                yield feed
                if i + 1 >= n:
                    return
        finally:
            close = getattr(gen, "close", None)
            if close is not None:
                close()

    def take(self, n: int | None) -> CalibrationSource:
        """This source limited to its first ``n`` samples (``None``: unchanged)."""
        if n is None:
            return self
        if n <= 0:
            raise UserError(f"calibration: the number of samples must be positive, got {n}")
        return _Limited(self, n)

    def subset(self, indices: Sequence[int]) -> CalibrationSource:
        """This source restricted to the samples at ``indices`` (0-based, read in order, streaming)."""
        return _Subset(self, indices)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description!r} ({len(self)} samples)>"

    @classmethod
    def from_arg(cls, arg: str | Path, inputs: list[InputSig], *, seed: int = 0, num_random: int = 16,
                 limit: int | None = None) -> CalibrationSource:
        """A source from the ``--calib`` argument: a folder of .npz, one leading-axis .npz, or ``random``."""
        if limit is not None and limit <= 0:
            raise UserError(f"calibration: the number of samples must be positive, got {limit}")
        s = str(arg)
        if s == "random":
            n = num_random if limit is None else min(num_random, limit)
            return random_source(inputs, n, seed)
        p = Path(arg)
        if not p.exists():
            if p.suffix == "" and "/" not in s and "\\" not in s:
                raise UserError(f"calibration: '{s}' is neither an existing path nor a known source "
                                f"(give a folder of .npz files, an .npz file, or 'random')")
            raise UserError(f"{p}: no such calibration file or folder")
        if p.is_dir():
            return _FolderSource(p, inputs, limit=limit)
        if p.suffix.lower() != ".npz":
            raise UserError(f"{p}: calibration data must be a folder of .npz files or one .npz file")
        return _StackedNpzSource(p, inputs, limit=limit)

    @classmethod
    def from_feeds(cls, feeds: Sequence[dict[str, Any]], inputs: list[InputSig],
                   description: str = "in-memory feeds") -> CalibrationSource:
        """A source over feeds already in memory (validated now)."""
        return _ListSource(feeds, inputs, description)


class _Limited(CalibrationSource):
    def __init__(self, base: CalibrationSource, n: int) -> None:
        super().__init__(base.inputs, base.description, synthetic=base.synthetic, limit=n)
        self.base = base

    def _count(self) -> int:
        return len(self.base)

    def _feeds(self) -> Iterator[Feed]:
        return iter(self.base)

    def label(self, i: int) -> str:
        return self.base.label(i)


class _Subset(CalibrationSource):
    def __init__(self, base: CalibrationSource, indices: Sequence[int]) -> None:
        n = len(base)
        idx = sorted({int(i) for i in indices})
        if not idx:
            raise UserError("calibration: an empty selection of samples")
        if idx[0] < 0 or idx[-1] >= n:
            raise UserError(f"calibration: sample index {idx[-1] if idx[-1] >= n else idx[0]} is outside "
                            f"{base.description} ({n} samples)")
        super().__init__(base.inputs, f"{base.description}, {len(idx)} selected", synthetic=base.synthetic)
        self.base = base
        self.indices = idx

    def _count(self) -> int:
        return len(self.indices)

    def label(self, i: int) -> str:
        return self.base.label(self.indices[i])

    def _feeds(self) -> Iterator[Feed]:
        want = iter(self.indices)
        nxt = next(want, None)
        for j, feed in enumerate(self.base):
            if nxt is None:
                return
            if j == nxt:
                yield feed
                nxt = next(want, None)


class _ListSource(CalibrationSource):
    def __init__(self, feeds: Sequence[dict[str, Any]], inputs: list[InputSig], description: str) -> None:
        super().__init__(inputs, f"{description} ({len(feeds)} samples)")
        self.name = description
        self.feeds = [check_feed(f, inputs, f"{description}: sample {i}") for i, f in enumerate(feeds)]

    def _count(self) -> int:
        return len(self.feeds)

    def label(self, i: int) -> str:
        return f"{self.name}: sample {i}"

    def _feeds(self) -> Iterator[Feed]:
        return iter(self.feeds)


# ------------------------------------------------------------------------------------------ npz reading
def _npz_members(path: Path, zf: zipfile.ZipFile) -> dict[str, str]:
    """Array name -> zip member name."""
    out: dict[str, str] = {}
    for m in zf.namelist():
        if m.endswith("/"):
            continue
        key = m[:-4] if m.endswith(".npy") else m
        out[key] = m
    if not out:
        raise UserError(f"{path}: the .npz holds no arrays")
    return out


def _read_header(fp: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """(shape, fortran_order, dtype) from an .npy stream; None for a header version we do not stream."""
    fmt = np.lib.format
    version = fmt.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(fp)
    else:
        return None
    return tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype)


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{path}: not a valid .npz file ({type(e).__name__}: {e})") from None


def _member_meta(path: Path, zf: zipfile.ZipFile, key: str, member: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        with zf.open(member) as fp:
            head = _read_header(fp)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path}: array '{key}' is not a valid .npy member ({e})") from None
    if head is None:  # unusual header version: load it to learn its metadata
        arr = _load_member(path, key)
        return tuple(arr.shape), arr.dtype
    if head[2].hasobject:
        raise UserError(f"{path}: array '{key}' holds Python objects (pickled); refused")
    return head[0], head[2]


def _member_layout(path: Path, zf: zipfile.ZipFile, key: str, member: str
                   ) -> tuple[tuple[int, ...], np.dtype, bytes | None]:
    """(shape, dtype, raw header bytes) of an .npy member; the raw header is None when the array is not stored
    plainly (Fortran order, a header version other than 1.0 / 2.0, an unreadable header)."""
    try:
        with zf.open(member) as fp:
            pre = fp.read(8)
            if len(pre) == 8 and pre[:6] == b"\x93NUMPY" and pre[6] in (1, 2):
                size = fp.read(2 if pre[6] == 1 else 4)
                raw = pre + size + fp.read(int.from_bytes(size, "little"))
                head = _read_header(io.BytesIO(raw))
                if head is not None and not head[2].hasobject:
                    return head[0], head[2], (None if head[1] else raw)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, SyntaxError):
        pass
    shape, dtype = _member_meta(path, zf, key, member)  # the usual checks and messages
    return shape, dtype, None


def _load_member(path: Path, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            return np.asarray(z[key])
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise UserError(f"{path}: array '{key}' holds Python objects (pickled); refused") from None
        raise UserError(f"{path}: array '{key}' cannot be read ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise UserError(f"{path}: array '{key}' cannot be read ({type(e).__name__}: {e})") from None


class _FolderSource(CalibrationSource):
    """A folder of .npz files, one feed each, in sorted name order."""

    def __init__(self, folder: Path, inputs: list[InputSig], *, limit: int | None = None) -> None:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".npz")
        if not files:
            raise UserError(f"{folder}: no .npz files in the calibration folder")
        super().__init__(inputs, f"{folder}/ ({len(files)} .npz files)", limit=limit)
        self.folder = folder
        self.files = files
        by_name = {s.name: s for s in inputs}
        #: per file: array name -> (zip member, raw .npy header, shape, dtype) for reading without np.load
        self._layout: dict[Path, dict[str, tuple[str, bytes, tuple[int, ...], np.dtype]]] = {}
        # Cheap up-front check of every file used: the zip directory and the .npy headers, no data.
        for f in files[: len(self)]:
            with _open_zip(f) as zf:
                members = _npz_members(f, zf)
                _check_keys(str(f), list(members), inputs)
                shapes: dict[str, tuple[int, ...]] = {}
                layout: dict[str, tuple[str, bytes, tuple[int, ...], np.dtype]] | None = {}
                for key, member in members.items():
                    shape, dtype, raw = _member_layout(f, zf, key, member)
                    _check_array_meta(str(f), key, shape, dtype, by_name[key])
                    shapes[key] = shape
                    if layout is not None and raw is not None:
                        layout[key] = (member, raw, shape, dtype)
                    else:
                        layout = None  # an unusual member: this file is read with np.load
                _check_symbolic(str(f), shapes, inputs)
                if layout is not None:
                    self._layout[f] = layout

    def _count(self) -> int:
        return len(self.files)

    def label(self, i: int) -> str:
        return str(self.files[i])

    def _feeds(self) -> Iterator[Feed]:
        for f in self.files:
            if not f.is_file():
                raise UserError(f"{f}: calibration file disappeared while reading")
            fast = self._read_direct(f)
            if fast is not None:
                yield check_feed(fast, self.inputs, str(f))
                continue
            try:
                z = np.load(f, allow_pickle=False)
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
                raise UserError(f"{f}: not a valid .npz file ({type(e).__name__}: {e})") from None
            with z:
                raw: dict[str, Any] = {}
                for key in z.files:
                    try:
                        raw[key] = z[key]
                    except ValueError as e:
                        raise UserError(f"{f}: array '{key}' cannot be loaded ({e})") from None
                    except (OSError, zipfile.BadZipFile, EOFError) as e:
                        raise UserError(f"{f}: array '{key}' cannot be read ({type(e).__name__})") from None
            yield check_feed(raw, self.inputs, str(f))


    def _read_direct(self, f: Path) -> dict[str, np.ndarray] | None:
        """The arrays of ``f`` read straight from its zip members at the layout the up-front check recorded
        (the same bytes np.load would return, without parsing every header again); None when ``f`` has no
        recorded layout or changed since (its headers differ): the caller then uses np.load."""
        layout = self._layout.get(f)
        if layout is None:
            return None
        out: dict[str, np.ndarray] = {}
        try:
            with zipfile.ZipFile(f) as zf:
                for key, (member, raw, shape, dtype) in layout.items():
                    with zf.open(member) as fp:
                        if fp.read(len(raw)) != raw:
                            return None
                        arr = np.empty(shape, dtype=dtype)
                        reader: Any = fp  # a zipfile.ZipExtFile: io.BufferedIOBase, so readinto
                        if arr.nbytes and (reader.readinto(arr.data.cast("B")) != arr.nbytes or fp.read(1)):
                            return None
                        out[key] = arr
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            return None  # np.load reports what is wrong
        return out


class _StackedNpzSource(CalibrationSource):
    """One .npz whose arrays are ``[N, *feed_shape]``; streamed sample by sample from the zip members."""

    def __init__(self, path: Path, inputs: list[InputSig], *, limit: int | None = None) -> None:
        self.path = path
        by_name = {s.name: s for s in inputs}
        with _open_zip(path) as zf:
            self.members = _npz_members(path, zf)
            _check_keys(str(path), list(self.members), inputs)
            self.meta: dict[str, tuple[tuple[int, ...], np.dtype]] = {
                k: _member_meta(path, zf, k, m) for k, m in self.members.items()}
        counts: dict[str, int] = {}
        for key, (shape, dtype) in self.meta.items():
            sig = by_name[key]
            if len(shape) == 0:
                raise UserError(f"{path}: array '{key}' is a scalar; expected [N, *feed_shape] with a leading "
                                f"sample axis")
            if sig.known_rank and len(shape) != len(sig.shape) + 1:
                raise UserError(f"{path}: array '{key}' has shape {_fmt_shape(shape)} (rank {len(shape)}) but "
                                f"a single .npz needs a leading sample axis: rank {len(sig.shape) + 1} "
                                f"[N, *shape of input {sig.describe()}]")
            _check_array_meta(str(path), key, shape[1:], dtype, sig)
            counts[key] = shape[0]
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"'{k}' has {v}" for k, v in counts.items())
            raise UserError(f"{path}: arrays disagree on the number of samples (leading axis): {detail}")
        self.n = next(iter(counts.values()))
        if self.n == 0:
            raise UserError(f"{path}: arrays hold 0 samples (leading axis is 0)")
        _check_symbolic(str(path), {k: s[1:] for k, (s, _) in self.meta.items()}, inputs)
        super().__init__(inputs, f"{path} ({self.n} samples)", limit=limit)

    def _count(self) -> int:
        return self.n

    def label(self, i: int) -> str:
        return f"{self.path}: sample {i}"

    def _readers(self, zf: zipfile.ZipFile, stack: list[Any]) -> dict[str, Callable[[int], np.ndarray]]:
        readers: dict[str, Callable[[int], np.ndarray]] = {}
        for key, member in self.members.items():
            fp = zf.open(member)
            stack.append(fp)
            head = _read_header(fp)
            if head is None or head[1]:  # unusual header or Fortran order: load this member whole
                arr = _load_member(self.path, key)
                readers[key] = arr.__getitem__
                continue
            shape, _, dtype = head
            per = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
            nbytes = per * dtype.itemsize

            def read(i: int, fp: Any = fp, shape: tuple[int, ...] = shape, dtype: np.dtype = dtype,
                     nbytes: int = nbytes, key: str = key) -> np.ndarray:
                data = fp.read(nbytes)
                if len(data) != nbytes:
                    raise UserError(f"{self.path}: array '{key}' is truncated at sample {i}")
                return np.frombuffer(data, dtype=dtype).reshape(shape[1:])

            readers[key] = read
        return readers

    def _feeds(self) -> Iterator[Feed]:
        stack: list[Any] = []
        with _open_zip(self.path) as zf:
            try:
                readers = self._readers(zf, stack)
                for i in range(len(self)):
                    try:
                        raw = {k: r(i) for k, r in readers.items()}
                    except (OSError, zipfile.BadZipFile, EOFError) as e:
                        raise UserError(f"{self.path}: sample {i} cannot be read ({type(e).__name__}: {e})") from None
                    yield check_feed(raw, self.inputs, f"{self.path}: sample {i}")
            finally:
                for fp in stack:
                    fp.close()


class _RandomSource(CalibrationSource):
    def __init__(self, inputs: list[InputSig], n: int, seed: int) -> None:
        super().__init__(inputs, f"random ({n} samples, seed {seed})", synthetic=True)
        self.n = n
        self.seed = seed
        self.shapes = {s.name: random_shape(s) for s in inputs}
        for s in inputs:
            size = math.prod(self.shapes[s.name])
            if size > RANDOM_MAX_ELEMENTS:
                raise UserError(f"calibration: model input {s.describe()} needs {size} elements per random sample, "
                                f"beyond the {RANDOM_MAX_ELEMENTS} limit; give --calib DATA")

    def _count(self) -> int:
        return self.n

    def label(self, i: int) -> str:
        return f"random sample {i} (seed {self.seed})"

    def _feeds(self) -> Iterator[Feed]:
        rng = np.random.default_rng(self.seed)
        for _ in range(self.n):
            feed: Feed = {}
            for s in self.inputs:
                shape = self.shapes[s.name]
                if s.dtype.kind == "f":
                    feed[s.name] = rng.standard_normal(shape, dtype=np.float32).astype(s.dtype)
                elif s.dtype.kind == "b":
                    feed[s.name] = rng.random(shape) < 0.5
                elif s.dtype.kind in "iu":
                    feed[s.name] = rng.integers(0, RANDOM_INT_HIGH, size=shape).astype(s.dtype)
                else:
                    raise UserError(f"calibration: cannot make random data for input {s.describe()}; "
                                    f"give calibration files")
            yield feed


def random_shape(sig: InputSig) -> tuple[int, ...]:
    """The shape random data gets: fixed dims as declared; dynamic dims 1, except the non-leading dynamic
    dims of inputs of rank >= 3 (image H/W, sequence length), which get ``RANDOM_SPATIAL`` (32). An input of
    unknown rank gets shape [1]."""
    if not sig.known_rank:
        return (1,)
    rank = len(sig.shape)
    out = []
    for axis, d in enumerate(sig.shape):
        if isinstance(d, int):
            out.append(d)
        elif axis > 0 and rank >= 3 and not (rank == 4 and axis == 1):
            out.append(RANDOM_SPATIAL)
        else:
            out.append(1)
    return tuple(out)


def random_source(inputs: Sequence[InputSig], n: int, seed: int) -> CalibrationSource:
    """Data-free calibration: ``n`` seeded samples. Float inputs: standard normal; integer inputs: uniform in
    [0, 8); bool: fair coin. Shapes from :func:`random_shape` (dynamic batch 1, dynamic H/W/sequence 32)."""
    if n <= 0:
        raise UserError(f"calibration: the number of random samples must be positive, got {n}")
    return _RandomSource(list(inputs), n, seed)


# ============================================================================================ statistics
def _dtype_bits(dtype: str) -> int | None:
    """Integer bit width of a QuantSpec dtype; None for fp8 / float."""
    return {"int8": 8, "uint8": 8, "int16": 16, "uint16": 16, "int4": 4, "uint4": 4}.get(dtype)


_FP8 = {"fp8e4m3": (3, 448.0, -6), "fp8e5m2": (2, 57344.0, -14)}  # mantissa bits, max, min normal exponent


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
        self.zeros += int(a.size - np.count_nonzero(a))
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
        idx = t.astype(np.int64)
        idx += self.bins  # in [0, 2·bins): the range 2**range_exp is strictly larger than max|x|
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

        def err(alphas: np.ndarray) -> np.ndarray:
            al = alphas[:, None]
            if fp8 is not None:
                t = al * amax
                return _fp8_err(pos, a, b, t, fp8) + _fp8_err(neg, a, b, t, fp8)
            step = al * span / steps
            return _uniform_err(pos, a, b, step, al * hi_abs) + _uniform_err(neg, a, b, step, al * lo_abs)

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


# ============================================================================================== collect
def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def collect(graph: gs.Graph, specs: dict[str, QuantSpec], source: CalibrationSource, *,
            progress: Callable[[int, int], None] | None = None,
            batch_tensors: int | None = None, workers: int | None = None,
            shapes: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None) -> dict[str, TensorStats]:
    """Statistics of the tensors named in ``specs`` over the feeds of ``source``.

    Runs ``graph`` (float) in onnxruntime with those tensors exposed as extra outputs, one sample at a time;
    graph inputs are read from the feed and constants from their values. ``batch_tensors`` splits the tensors
    into groups of that size, one session and one pass over the data per group (less memory, more time).
    ``progress(done, total)`` is called after each sample run, in sample order. ``workers`` onnxruntime runs
    are in flight at once (default :func:`calibration_workers`), each on one intra-op thread, while this thread
    reads the next feeds and updates the statistics; the updates are applied in sample order, so the result
    is the same for any ``workers`` (at most ``workers + 1`` samples' tensors are held). ``shapes``, when given,
    is filled with the (shape, dtype) of the graph inputs, the graph outputs and the collected tensors on the
    first sample (what the cost model can reuse instead of running the model again). A feed onnxruntime rejects raises
    :class:`UserError` naming the sample; a tensor name that is not in the graph raises ``ValueError``.
    """
    tensors = graph.tensors()
    missing = [n for n in specs if n not in tensors]
    if missing:
        raise ValueError(f"collect: tensor '{missing[0]}' is not in the graph")
    stats = {name: TensorStats.for_spec(spec) for name, spec in specs.items()}
    if not specs:
        return stats
    sigs = input_signatures(graph)
    input_names = {s.name for s in sigs}
    run_names: list[str] = []
    for name in specs:
        t = tensors[name]
        if isinstance(t, gs.Constant):
            stats[name].update(np.asarray(t.values))
        elif name not in input_names:
            if not t.inputs:
                raise ValueError(f"collect: tensor '{name}' has no producer and is not a graph input")
            run_names.append(name)
    from_feed = [n for n in specs if n in input_names]
    if not run_names and not from_feed:
        return stats
    if batch_tensors is not None and batch_tensors <= 0:
        raise ValueError(f"batch_tensors must be positive, got {batch_tensors}")
    size = batch_tensors or max(len(run_names), 1)
    groups = [run_names[i:i + size] for i in range(0, len(run_names), size)] or [[]]
    n = len(source)
    total = n * len(groups)
    done = 0
    workers = calibration_workers() if workers is None else max(1, int(workers))
    for gi, group in enumerate(groups):
        # One intra-op thread per run (a sample per run, up to `workers` runs in flight): measured 1.3-2.3x faster
        # per sample than onnxruntime's default pool on the 2-core CI machines, which also fights numpy for cores.
        sess = ir.graph_session(graph, extra_outputs=group, threads=1) if group else None
        extra = [t.name for t in graph.outputs if t.name not in group] if shapes is not None and gi == 0 else []
        for i, feed, outs in _run_samples(sess, group, source, sigs, workers, extra):
            if gi == 0:
                for name in from_feed:
                    stats[name].update(feed[name])
            if shapes is not None and i == 0:
                if gi == 0:
                    shapes.update({k: (tuple(v.shape), v.dtype) for k, v in feed.items()})
                if outs is not None:
                    shapes.update({k: (tuple(v.shape), v.dtype) for k, v in zip([*group, *extra], outs)})
                    outs = outs[:len(group)]
            if outs is not None:
                for name, val in zip(group, outs):
                    stats[name].update(val)
                del outs
            done += 1
            if progress is not None:
                progress(done, total)
    for name, st in stats.items():
        if st.nonfinite:
            log.warning("calibration: tensor '%s' produced %d NaN/Inf values (ignored in its range)", name,
                        st.nonfinite)
    return stats


#: environment variable overriding the number of concurrent calibration runs (1: strictly sequential)
WORKERS_ENV = "QCOMPILER_CALIB_WORKERS"


def calibration_workers() -> int:
    """Concurrent onnxruntime runs during calibration: ``$QCOMPILER_CALIB_WORKERS`` when set, else the CPUs this
    process may use, at most 2 (on 2 cores two single-threaded runs keep both busy without the thread pool's
    synchronization; more would only add memory)."""
    env = os.environ.get(WORKERS_ENV, "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            log.warning("%s=%r is not an integer; ignored", WORKERS_ENV, env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(2, cpus))


def _run_samples(sess: Any, group: list[str], source: CalibrationSource, sigs: Sequence[InputSig],
                 workers: int, first_extra: Sequence[str] = ()) -> Iterator[tuple[int, Feed, list[np.ndarray] | None]]:
    """(index, feed, outputs of ``group``) for every sample of ``source``, in order (the first sample also
    fetches ``first_extra``, after those of ``group``); with ``workers`` > 1 the runs of the next samples
    proceed on worker threads (onnxruntime releases the GIL) while the caller consumes this one. ``sess``
    None: no run (outputs None). A run that fails raises :class:`UserError` naming its sample."""
    if sess is None:
        for i, feed in enumerate(source):
            yield i, feed, None
        return
    want = {inp.name: inp.type for inp in sess.get_inputs()}

    def run(i: int, feed: Feed) -> list[np.ndarray]:
        try:
            return list(sess.run([*group, *first_extra] if i == 0 else group, session_feed(feed, sigs, want)))
        except Exception as e:  # onnxruntime raises its own exception types
            raise UserError(f"{source.label(i)}: onnxruntime failed on this calibration sample: "
                            f"{_one_line(e)}") from None

    if workers <= 1:
        for i, feed in enumerate(source):
            yield i, feed, run(i, feed)
        return
    pending: collections.deque[tuple[int, Feed, concurrent.futures.Future[list[np.ndarray]]]] = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qcompiler-calib") as pool:
        feeds = enumerate(source)
        try:
            while True:
                try:
                    i, feed = next(feeds)
                except StopIteration:
                    break
                except BaseException:  # a bad feed: the samples before it come (and fail) first, as in order
                    while pending:
                        j, f, fut = pending.popleft()
                        yield j, f, fut.result()
                    raise
                pending.append((i, feed, pool.submit(run, i, feed)))
                if len(pending) > workers:
                    j, f, fut = pending.popleft()
                    yield j, f, fut.result()
            while pending:
                j, f, fut = pending.popleft()
                yield j, f, fut.result()
        finally:
            for _, _, fut in pending:
                fut.cancel()
            pending.clear()


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


# ============================================================================================ data-free
@dataclass
class ChannelStats:
    """A per-channel normal model of a tensor whose channels lie on axis 1: mean and standard deviation [C].

    A BatchNormalization output ``y = γ·(x − μ)/√(σ² + ε) + β`` has, per channel, mean β and standard deviation
    |γ|·σ/√(σ² + ε) when its input follows its running statistics. ``fold-batchnorm`` records these before the
    BN disappears (:func:`bn_statistics`); data-free calibration (``--calib none``) and the bias absorption of
    ``equalize`` read them, and passes that rescale a channel keep them up to date.
    """

    mean: np.ndarray  # float64 [C]
    std: np.ndarray  # float64 [C]

    def interval(self, k: float) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (mean − k·std, mean + k·std)."""
        return self.mean - k * self.std, self.mean + k * self.std


#: data-free ranges of BN outputs: mean ± BN_SIGMAS·std per channel (6: clipping hurts more than rounding)
BN_SIGMAS = 6.0

def bn_statistics(ctx: Any) -> dict[str, ChannelStats]:
    """Tensor name -> :class:`ChannelStats` of BatchNormalization outputs recorded in ``ctx.bn_stats`` (a
    CompileContext) by ``fold-batchnorm``; the folded producer keeps the BN's output name, so the key stays valid
    after folding."""
    stats: dict[str, ChannelStats] = ctx.bn_stats
    return stats


#: elementwise functions the data-free range propagation evaluates (numpy, on a grid of input values)
def _hardsigmoid(x: np.ndarray, node: gs.Node) -> np.ndarray:
    alpha = float(node.attrs.get("alpha", 0.2))
    beta = float(node.attrs.get("beta", 0.5))
    return np.clip(alpha * x + beta, 0.0, 1.0)


def _clip_fn(x: np.ndarray, node: gs.Node) -> np.ndarray:
    lo, hi = -np.inf, np.inf
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        lo, hi = float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    vals = [t.values if isinstance(t, gs.Constant) else None for t in node.inputs[1:3]]
    if len(vals) > 0 and vals[0] is not None and np.size(vals[0]) == 1:
        lo = float(np.asarray(vals[0]).reshape(()))
    if len(vals) > 1 and vals[1] is not None and np.size(vals[1]) == 1:
        hi = float(np.asarray(vals[1]).reshape(()))
    return np.clip(x, lo, hi)


_UNARY: dict[str, Callable[[np.ndarray, gs.Node], np.ndarray]] = {
    "Relu": lambda x, n: np.maximum(x, 0.0),
    "LeakyRelu": lambda x, n: np.where(x >= 0, x, float(n.attrs.get("alpha", 0.01)) * x),
    "Clip": _clip_fn,
    "Sigmoid": lambda x, n: 1.0 / (1.0 + np.exp(-x)),
    "Tanh": lambda x, n: np.tanh(x),
    "HardSigmoid": _hardsigmoid,
    "HardSwish": lambda x, n: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "Identity": lambda x, n: x,
    # pooling keeps every output inside the range of its inputs
    "MaxPool": lambda x, n: x,
    "AveragePool": lambda x, n: x,
    "GlobalAveragePool": lambda x, n: x,
    "GlobalMaxPool": lambda x, n: x,
}
_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
}


def bn_ranges(graph: gs.Graph, names: Sequence[str], stats: dict[str, ChannelStats], k: float,
              grid: int = 257) -> dict[str, tuple[float, float]]:
    """Data-free ranges: for each tensor of ``names`` computed from one BN output (statistics in ``stats``) by
    elementwise ops and pooling only — ReLU/Clip/sigmoids/hard-swish, Add/Sub/Mul/Div with scalar or per-channel
    constants, or with another function of the same BN output (as in a decomposed hard-swish
    ``x·clip(x + 3, 0, 6)/6``) — the (lo, hi) over ``mean ± k·std`` per channel: the ops are evaluated on a grid
    of ``grid`` values per channel. Tensors not of that form are left out."""
    tensors = graph.tensors()
    out: dict[str, tuple[float, float]] = {}
    for name in names:
        t = tensors.get(name)
        if t is None:
            continue
        res = _eval_from_bn(t, stats, k, grid, depth=12)
        if res is None:
            continue
        vals = res[1]
        finite = vals[np.isfinite(vals)]
        if finite.size:
            out[name] = (float(finite.min()), float(finite.max()))
    return out


def _eval_from_bn(t: gs.Tensor, stats: dict[str, ChannelStats], k: float, grid: int,
                  depth: int) -> tuple[str, np.ndarray] | None:
    """(root BN tensor, values [C, grid]) of ``t`` as a function of the BN output on its per-channel grid."""
    st = stats.get(t.name)
    if st is not None:
        lo, hi = st.interval(k)
        frac = np.linspace(0.0, 1.0, grid)
        return t.name, lo[:, None] + (hi - lo)[:, None] * frac[None, :]
    if depth <= 0 or not t.inputs:
        return None
    node = t.inputs[0]
    if node.domain not in (None, "", "ai.onnx") or not node.inputs:
        return None
    if node.op in _UNARY and node.outputs[0] is t:
        inner = _eval_from_bn(node.inputs[0], stats, k, grid, depth - 1)
        if inner is None:
            return None
        return inner[0], _UNARY[node.op](inner[1], node)
    if node.op in _BINARY and len(node.inputs) == 2:
        parts: list[tuple[str, np.ndarray] | np.ndarray] = []
        for x in node.inputs:
            if isinstance(x, gs.Constant):
                parts.append(np.asarray(x.values, dtype=np.float64))
            else:
                r = _eval_from_bn(x, stats, k, grid, depth - 1)
                if r is None:
                    return None
                parts.append(r)
        roots = {p[0] for p in parts if isinstance(p, tuple)}
        if len(roots) != 1:
            return None
        c = next(p[1] for p in parts if isinstance(p, tuple)).shape[0]
        args = []
        for p in parts:
            if isinstance(p, tuple):
                args.append(p[1])
            elif p.size == 1:
                args.append(p.reshape(1, 1))
            elif p.size == c and p.ndim >= 2 and (p.shape[0] == c or (p.shape[0] == 1 and p.shape[1] == c)):
                args.append(p.reshape(c, 1))  # [C, 1, ...] / [1, C, 1, ...]: one value per channel of axis 1
            else:
                return None
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return roots.pop(), _BINARY[node.op](args[0], args[1])
    return None
