"""Samples made from raw files, and how they become feeds.

An :class:`Item` is one raw sample (an image, an audio frame, a line of text, an ``.npy`` file) with a name for
previews and messages and a loader that returns its arrays per model input. A :class:`RawSource` is the sorted
list of items of one modality plus ``per_feed``, the number of items stacked into one feed (the model input's
fixed batch size when the items carry no batch axis, else 1).

:func:`model_inputs` reads the model's input signatures (through :mod:`qcompiler.ir`); :func:`select` picks the
items of ``--limit`` / ``--split`` (a seeded permutation of the sorted list, cut into disjoint parts, each kept in
name order); :func:`assemble` loads them into stacked arrays ``[N, *feed_shape]`` with every feed checked by
:func:`~qcompiler.calib.feeds.check_feed`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qcompiler.calib.feeds import InputSig, check_feed, fmt_shape, input_signatures
from qcompiler.core.errors import UserError
from qcompiler.ir.convert import import_graph
from qcompiler.ir.load import load_model

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Item:
    """One raw sample: ``name`` (e.g. ``cats/001.jpg``, ``a.wav#3``, ``lines.txt:7``) and ``load()``, its arrays
    keyed by model input, each either at the feed shape or without the batch axis."""

    name: str
    load: Callable[[], Arrays]


@dataclass
class RawSource:
    """The items of one modality, in sorted name order."""

    kind: str
    items: list[Item]
    description: str
    per_feed: int = 1
    files: list[Path] = field(default_factory=list)  # every file read (never overwritten)

    @property
    def feeds(self) -> int:
        return len(self.items) // self.per_feed


@dataclass
class Dataset:
    """Stacked arrays ``[N, *feed_shape]`` per model input, and the names of the items in each feed."""

    arrays: Arrays
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)


def model_inputs(path: Path) -> list[InputSig]:
    """The graph inputs of the model at ``path`` (name, dtype, dims)."""
    graph, _meta = import_graph(load_model(path), source=str(path))
    sigs = input_signatures(graph)
    if not sigs:
        raise UserError(f"{path}: the model has no graph inputs to make data for")
    return sigs


def batch_size(sig: InputSig, item_rank: int) -> int | None:
    """Items per feed for an input whose items have ``item_rank`` dims: None when the input has no batch axis
    (its rank is ``item_rank``), else its fixed batch size, or 1 when the batch dim is dynamic."""
    if not sig.known_rank or len(sig.shape) == item_rank:
        return None
    if len(sig.shape) != item_rank + 1:
        raise UserError(f"model input {sig.describe()} has rank {len(sig.shape)}; this data needs rank "
                        f"{item_rank} or {item_rank + 1} (with a batch axis)")
    b = sig.shape[0]
    return b if isinstance(b, int) and b > 0 else 1


def parse_split(text: str) -> list[tuple[str, int]]:
    """``calib:64,eval:48`` -> [("calib", 64), ("eval", 48)]."""
    out: list[tuple[str, int]] = []
    for part in text.split(","):
        name, sep, count = part.strip().partition(":")
        name = name.strip()
        if not sep or not name or not count.strip().isdigit() or int(count) <= 0:
            raise UserError(f"--split: '{part.strip()}' is not NAME:COUNT with a positive count "
                            f"(e.g. calib:64,eval:48)")
        if not name.replace("-", "").replace("_", "").isalnum():
            raise UserError(f"--split: split name '{name}' may use letters, digits, '-' and '_' only")
        if name in (n for n, _ in out):
            raise UserError(f"--split: split '{name}' is given twice")
        out.append((name, int(count)))
    return out


def select(n: int, *, limit: int | None = None, splits: Sequence[tuple[str, int]] = (), seed: int = 0,
           what: str = "samples") -> dict[str, list[int]]:
    """Indices (in ascending order) of the feeds for each output: ``{"": all}`` without limit / split;
    ``{"": sorted(perm[:limit])}`` with ``limit``; ``{name: sorted(part)}`` with ``splits`` — disjoint parts of
    one permutation of ``range(n)`` seeded with ``seed``, so the same files, seed and counts give the same
    split."""
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be positive, got {limit}")
    if not splits:
        if limit is None or limit >= n:
            return {"": list(range(n))}
        perm = np.random.default_rng(seed).permutation(n)
        return {"": sorted(int(i) for i in perm[:limit])}
    want = sum(c for _, c in splits)
    if limit is not None and want > limit:
        raise UserError(f"--split asks for {want} {what} in all but --limit is {limit}")
    if want > n:
        detail = ", ".join(f"{name} {c}" for name, c in splits)
        raise UserError(f"--split asks for {want} {what} ({detail}) but the data has {n}")
    perm = np.random.default_rng(seed).permutation(n)
    out: dict[str, list[int]] = {}
    start = 0
    for name, count in splits:
        out[name] = sorted(int(i) for i in perm[start:start + count])
        start += count
    return out


def assemble(source: RawSource, sigs: Sequence[InputSig], feeds: Sequence[int]) -> Dataset:
    """Load the items of ``feeds`` (feed indices into ``source``) and stack them into ``[N, *feed_shape]``
    arrays cast to the input dtypes (each feed passes the usual calibration checks)."""
    if not feeds:
        raise UserError(f"{source.description}: no samples to write")
    k = source.per_feed
    arrays: Arrays = {}
    names: list[str] = []
    for row, f in enumerate(feeds):
        group = source.items[f * k:(f + 1) * k]
        loaded = [it.load() for it in group]
        where = group[0].name if k == 1 else f"{group[0].name} .. {group[-1].name}"
        raw: dict[str, np.ndarray] = {}
        for key in loaded[0]:
            parts = [a[key] for a in loaded]
            sig = next((s for s in sigs if s.name == key), None)
            unbatched = sig is not None and sig.known_rank and parts[0].ndim == len(sig.shape) - 1
            if unbatched or k > 1:
                for p in parts[1:]:
                    if p.shape != parts[0].shape:
                        raise UserError(f"{where}: array '{key}' has shape {fmt_shape(p.shape)} but the "
                                        f"others of this feed have {fmt_shape(parts[0].shape)}")
                raw[key] = np.stack(parts)
            else:
                raw[key] = parts[0]
        feed = check_feed(raw, sigs, where)
        for key, arr in feed.items():
            if row == 0:
                arrays[key] = np.empty((len(feeds), *arr.shape), dtype=arr.dtype)
            elif arr.shape != arrays[key].shape[1:]:
                raise UserError(f"{where}: array '{key}' has shape {fmt_shape(arr.shape)} but the samples before "
                                f"it have {fmt_shape(arrays[key].shape[1:])}; one stacked .npz needs one shape")
            arrays[key][row] = arr
        names.extend(it.name for it in group)
    log.info("assembled %d feeds from %s", len(feeds), source.description)
    return Dataset(arrays, names)


@dataclass(frozen=True)
class InputSummary:
    """Preview of one stacked array."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    min: float
    mean: float
    max: float


def summarize(data: Dataset) -> list[InputSummary]:
    out = []
    for name, arr in data.arrays.items():
        a = arr if arr.size else np.zeros(1)
        out.append(InputSummary(name, tuple(arr.shape), str(arr.dtype), float(a.min()),
                                float(a.mean(dtype=np.float64)), float(a.max())))
    return out
