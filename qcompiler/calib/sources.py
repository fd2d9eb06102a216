"""Calibration sources: where calibration feeds come from (``--calib``).

:class:`CalibrationSource` is one of

* a folder of ``.npz`` files, one feed per file (one array per graph input, keyed by input name, at the exact
  shape fed to the model); files are taken in sorted name order, other files are ignored;
* a single ``.npz`` file whose arrays carry a leading sample axis ``[N, *feed_shape]``; it is streamed (each
  member is read sequentially from the zip, one sample at a time, stored or compressed alike);
* the word ``random``: synthetic, seeded data (see :func:`random_source`). The word always means this; a
  folder that happens to be called ``random`` is given as ``./random``;
* feeds already in memory (:meth:`CalibrationSource.from_feeds`),

limited to its first samples (:meth:`~CalibrationSource.take`) or to chosen ones
(:meth:`~CalibrationSource.subset`). Every feed passes :func:`~qcompiler.calib.feeds.check_feed`.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from qcompiler.calib.feeds import (
    Feed,
    InputSig,
    check_array_meta,
    check_feed,
    check_keys,
    check_symbolic,
    fmt_shape,
)
from qcompiler.calib.npz import (
    ZIP_ERRORS,
    check_member_size,
    load_member,
    member_layout,
    member_meta,
    member_nbytes,
    npz_members,
    open_zip,
    read_header,
)
from qcompiler.core import digest
from qcompiler.core.errors import UserError
from qcompiler.core.files import regular_file
from qcompiler.core.workers import usable_cpus

#: Random sources: size given to dynamic spatial / sequence dims (rank >= 3, any axis but the first).
RANDOM_SPATIAL = 32
#: Random sources: integer inputs get uniform integers in [0, RANDOM_INT_HIGH).
RANDOM_INT_HIGH = 8
#: Random sources: an input larger than this (elements per sample) is refused instead of exhausting memory.
RANDOM_MAX_ELEMENTS = 1 << 28


#: the most calibration samples the measured default and the presets' guard hold back (:func:`held_back_indices`)
HELD_BACK_MAX = 16


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

    def sample_ids(self) -> list[str] | None:
        """A content identity per sample, in order (the same samples read from the same bytes: the same ids;
        a file changed in place: other ids); ``None`` when the source has none (random, in memory). It reads
        every file used once (a digest), so it costs about one pass over the data without the model runs."""
        return None

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

    def parent_positions(self) -> tuple[int, list[int]]:
        """(the number of samples of the data this source selects from, the position there of each of its samples):
        a :meth:`subset` (the measured default's candidates calibrate on ``CompileOptions.calib_indices``) keeps
        its base's; any other source is its own data (``take`` starts a new one)."""
        n = len(self)
        return n, list(range(n))

    def held_back_last(self) -> CalibrationSource:
        """This source with the samples the measured default holds back of its data (:func:`held_back_indices` of
        :meth:`parent_positions`) read after the others, each part in order: GPTQ sums its Hessians in this order,
        so that the sum over all N samples continues, bit for bit, the sum over the candidates' N - h (a float
        sum depends on its order). Itself when nothing moves."""
        n, pos = self.parent_positions()
        held = set(held_back_indices(n))
        last = [i for i, p in enumerate(pos) if p in held]
        if not last or len(last) == len(pos) or last == list(range(len(pos) - len(last), len(pos))):
            return self
        return _Chain([self.subset([i for i, p in enumerate(pos) if p not in held]), self.subset(last)])

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
        regular_file(p, what="calibration data (a folder of .npz files or one .npz file)", allow_dir=True)
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

    def sample_ids(self) -> list[str] | None:
        ids = self.base.sample_ids()
        return None if ids is None else ids[:len(self)]


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

    def sample_ids(self) -> list[str] | None:
        ids = self.base.sample_ids()
        return None if ids is None else [ids[i] for i in self.indices]

    def parent_positions(self) -> tuple[int, list[int]]:
        n, pos = self.base.parent_positions()
        return n, [pos[i] for i in self.indices]

    def _feeds(self) -> Iterator[Feed]:
        want = iter(self.indices)
        nxt = next(want, None)
        for j, feed in enumerate(self.base):
            if nxt is None:
                return
            if j == nxt:
                yield feed
                nxt = next(want, None)


class _Chain(CalibrationSource):
    """Sources read one after the other (:meth:`CalibrationSource.held_back_last`)."""

    def __init__(self, parts: Sequence[CalibrationSource]) -> None:
        super().__init__(parts[0].inputs, parts[0].description, synthetic=any(p.synthetic for p in parts))
        self.parts = list(parts)

    def _count(self) -> int:
        return sum(len(p) for p in self.parts)

    def _where(self, i: int) -> tuple[CalibrationSource, int]:
        for p in self.parts:
            if i < len(p):
                return p, i
            i -= len(p)
        raise IndexError(i)

    def label(self, i: int) -> str:
        part, j = self._where(i)
        return part.label(j)

    def sample_ids(self) -> list[str] | None:
        ids = [p.sample_ids() for p in self.parts]
        return None if any(x is None for x in ids) else [i for x in ids if x is not None for i in x]

    def parent_positions(self) -> tuple[int, list[int]]:
        got = [p.parent_positions() for p in self.parts]
        return got[0][0], [q for _n, pos in got for q in pos]

    def _feeds(self) -> Iterator[Feed]:
        for p in self.parts:
            yield from p


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


class _FolderSource(CalibrationSource):
    """A folder of .npz files, one feed each, in sorted name order."""

    def __init__(self, folder: Path, inputs: list[InputSig], *, limit: int | None = None) -> None:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".npz")
        if not files:
            raise UserError(f"{folder}: no .npz files in the calibration folder")
        super().__init__(inputs, f"{folder}/ ({len(files)} .npz files)", limit=limit)
        self.folder = folder
        self.files = files
        self._ids: list[str] | None = None
        by_name = {s.name: s for s in inputs}
        #: per file: array name -> (zip member, raw .npy header, shape, dtype) for reading without np.load
        self._layout: dict[Path, dict[str, tuple[str, bytes, tuple[int, ...], np.dtype]]] = {}
        # Cheap up-front check of every file used: the zip directory and the .npy headers, no data.
        for f in files[: len(self)]:
            with open_zip(f) as zf:
                members = npz_members(f, zf)
                check_keys(str(f), list(members), inputs)
                shapes: dict[str, tuple[int, ...]] = {}
                layout: dict[str, tuple[str, bytes, tuple[int, ...], np.dtype]] | None = {}
                for key, member in members.items():
                    shape, dtype, raw = member_layout(f, zf, key, member)
                    check_array_meta(str(f), key, shape, dtype, by_name[key])
                    check_member_size(f, key, shape, dtype, member_nbytes(zf, member))
                    shapes[key] = shape
                    if layout is not None and raw is not None:
                        layout[key] = (member, raw, shape, dtype)
                    else:
                        layout = None  # an unusual member: this file is read with np.load
                check_symbolic(str(f), shapes, inputs)
                if layout is not None:
                    self._layout[f] = layout

    def _count(self) -> int:
        return len(self.files)

    def label(self, i: int) -> str:
        return str(self.files[i])

    def sample_ids(self) -> list[str] | None:
        # read once per source: a compile's calibrate and gptq passes both key their caches on them
        if self._ids is None:
            files = self.files[:len(self)]
            # hashlib and file reads release the GIL: the files are digested on every core, in their order
            with ThreadPoolExecutor(max_workers=max(1, min(len(files), usable_cpus()))) as pool:
                self._ids = [f"{f.name}:{d}" for f, d in zip(files, pool.map(file_digest, files), strict=True)]
        return list(self._ids)

    def _feeds(self) -> Iterator[Feed]:
        for f in self.files:
            if not f.is_file():
                raise UserError(f"{f}: calibration file disappeared while reading")
            fast = self._read_direct(f)
            if fast is not None:
                yield check_feed(fast, self.inputs, str(f))
                continue
            regular_file(f, what="an .npz file")
            try:
                z = np.load(f, allow_pickle=False)
            except (SyntaxError, TypeError, *ZIP_ERRORS) as e:
                raise UserError(f"{f}: not a valid .npz file ({type(e).__name__}: {e})") from None
            with z:
                raw: dict[str, Any] = {}
                for key in z.files:
                    try:
                        raw[key] = z[key]
                    except ValueError as e:
                        raise UserError(f"{f}: array '{key}' cannot be loaded ({e})") from None
                    except (SyntaxError, TypeError, *ZIP_ERRORS) as e:
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
        except ZIP_ERRORS:
            return None  # np.load reports what is wrong
        return out


class _StackedNpzSource(CalibrationSource):
    """One .npz whose arrays are ``[N, *feed_shape]``; streamed sample by sample from the zip members."""

    def __init__(self, path: Path, inputs: list[InputSig], *, limit: int | None = None) -> None:
        self.path = path
        self._digest: str | None = None
        by_name = {s.name: s for s in inputs}
        with open_zip(path) as zf:
            self.members = npz_members(path, zf)
            check_keys(str(path), list(self.members), inputs)
            self.meta: dict[str, tuple[tuple[int, ...], np.dtype]] = {
                k: member_meta(path, zf, k, m) for k, m in self.members.items()}
            stored = {k: member_nbytes(zf, m) for k, m in self.members.items()}
        counts: dict[str, int] = {}
        for key, (shape, dtype) in self.meta.items():
            sig = by_name[key]
            if len(shape) == 0:
                raise UserError(f"{path}: array '{key}' is a scalar; expected [N, *feed_shape] with a leading "
                                f"sample axis")
            if sig.known_rank and len(shape) != len(sig.shape) + 1:
                raise UserError(f"{path}: array '{key}' has shape {fmt_shape(shape)} (rank {len(shape)}) but "
                                f"a single .npz needs a leading sample axis: rank {len(sig.shape) + 1} "
                                f"[N, *shape of input {sig.describe()}]")
            check_array_meta(str(path), key, shape[1:], dtype, sig)
            check_member_size(path, key, shape, dtype, stored[key])
            counts[key] = shape[0]
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"'{k}' has {v}" for k, v in counts.items())
            raise UserError(f"{path}: arrays disagree on the number of samples (leading axis): {detail}")
        self.n = next(iter(counts.values()))
        if self.n == 0:
            raise UserError(f"{path}: arrays hold 0 samples (leading axis is 0)")
        check_symbolic(str(path), {k: s[1:] for k, (s, _) in self.meta.items()}, inputs)
        super().__init__(inputs, f"{path} ({self.n} samples)", limit=limit)

    def _count(self) -> int:
        return self.n

    def label(self, i: int) -> str:
        return f"{self.path}: sample {i}"

    def sample_ids(self) -> list[str] | None:
        if self._digest is None:  # read once per source (see the folder source's)
            self._digest = file_digest(self.path)
        return [f"{self._digest}:{i}" for i in range(len(self))]

    def _readers(self, zf: zipfile.ZipFile, stack: list[Any]) -> dict[str, Callable[[int], np.ndarray]]:
        readers: dict[str, Callable[[int], np.ndarray]] = {}
        for key, member in self.members.items():
            fp = zf.open(member)
            stack.append(fp)
            head = read_header(fp, str(self.path), key)
            if head is None or head[1]:  # unusual header or Fortran order: load this member whole
                arr = load_member(self.path, key)
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
        with open_zip(self.path) as zf:
            try:
                readers = self._readers(zf, stack)
                for i in range(len(self)):
                    try:
                        raw = {k: r(i) for k, r in readers.items()}
                    except ZIP_ERRORS as e:
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


def spread_indices(n: int, h: int) -> list[int]:
    """``h`` of ``n`` sample indices spread over them: every k-th with ``k = n // h``, the last of each run of k
    (indices k-1, 2k-1, ...; 16 of 64: every 4th). The measured default, the presets' guard and the planner hold
    these back to measure on: data stored in order (a folder sorted by class, a recording in time order, a
    confident classifier's few uncertain inputs in one part) is then measured on a part of each, not on the last
    kind only. Empty when ``h < 1``."""
    if h < 1 or n < 1:
        return []
    k = max(1, n // h)
    return [(i + 1) * k - 1 for i in range(min(h, n))]


def held_back_indices(n: int) -> list[int]:
    """The samples the measured default and the presets' guard hold back of ``n`` to measure on:
    ``h = min(HELD_BACK_MAX, n // 4)`` of them, :func:`spread_indices`; none below 4 samples."""
    return spread_indices(n, min(HELD_BACK_MAX, n // 4))


def file_digest(path: Path) -> str:
    """The content digest of a file (a calibration sample's identity, :meth:`CalibrationSource.sample_ids`)."""
    h = digest.hasher()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise UserError(f"{path}: calibration file cannot be read ({e.strerror or type(e).__name__})") from None
    return h.hexdigest()


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
