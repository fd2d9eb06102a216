"""A process-level cache of collected calibration statistics, bounded in bytes.

The measured default (``compile --plan auto``) and the presets' algorithm guard compile several candidate plans
of one model on the same calibration samples in one process. Candidates that differ only in what runs after
calibration (``gptq``, ``bias_correct``) or in the range method read from the same statistics (``percentile``
on / off) collect exactly the same statistics: the same BN-folded graph, the same tensors exposed, the same
samples. :func:`collect` keeps what it collected here and gives it back instead of running onnxruntime again.

The key of one collection (:func:`collection_key`) is

* :func:`~qcompiler.core.activations.graph_key` of the graph (nodes, attributes, constant values, inputs and
  outputs: any rewrite of the graph or of a weight misses) and the graph inputs' names, dtypes and shapes;
* the samples: the content digest of every sample read (:meth:`CalibrationSource.sample_ids`: the bytes of each ``.npz`` of a
  folder, the bytes of a stacked ``.npz`` and the index), in order — a ``take`` or ``subset`` that reads the
  same samples is the same key, a file changed in place (timestamps or not) is a different one;
* the tensors run in onnxruntime, in order, and the group size (which tensors a session exposes can change
  onnxruntime's fusions, so values are only reused for the very same session).

Per tensor the entry holds its :class:`~qcompiler.calib.stats.TensorStats` with a histogram when one was
collected. The collector settings are the histogram (or not): a request for a histogram method is served only
by a histogram entry; a ``minmax`` request by either (without a histogram, ``update`` keeps exactly the same
``min`` / ``max`` / ``count`` / ``samples`` / ``nonfinite``, and ``zeros`` stays 0: :meth:`TensorStats.without_histogram`).
Entries are copied in and out (the calibrate pass merges into its statistics), so a hit gives statistics equal
field for field — and ranges bit for bit — to a new collection. In-memory and random sources are not cached.

Cap: ``$QCOMPILER_STATS_CACHE_MB`` (default 128; 0 turns the cache off); the least recently used collections
go first.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import threading
from collections.abc import Sequence

import numpy as np

from qcompiler.calib.feeds import InputSig
from qcompiler.calib.sources import CalibrationSource
from qcompiler.calib.stats import TensorStats

log = logging.getLogger("qcompiler.calib")

#: environment variable: the cache's cap in MiB (0: no cache)
CACHE_ENV = "QCOMPILER_STATS_CACHE_MB"
DEFAULT_MAX_MB = 128

Shapes = dict[str, tuple[tuple[int, ...], np.dtype]]


def default_max_bytes() -> int:
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        try:
            return max(0, int(float(env) * 2**20))
        except ValueError:
            log.warning("%s=%r is not a number; ignored", CACHE_ENV, env)
    return DEFAULT_MAX_MB * 2**20


def collection_key(gkey: str | None, sigs: Sequence[InputSig], source: CalibrationSource, run_names: Sequence[str],
                   group_size: int) -> str | None:
    """The key of one collection (see the module doc); ``None``: not cacheable."""
    if gkey is None:
        return None
    ids = source.sample_ids()
    if ids is None:
        return None
    h = hashlib.blake2b(digest_size=16)
    h.update(gkey.encode())
    h.update(repr([(s.name, str(s.dtype), tuple(s.shape)) for s in sigs]).encode())
    h.update(repr((list(run_names), group_size)).encode())
    for i in ids:
        h.update(b"|" + i.encode())
    return h.hexdigest()


class StatsCache:
    """``collection key -> ({tensor: TensorStats}, first-sample shapes)``, at most ``max_bytes`` of histograms."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = default_max_bytes() if max_bytes is None else max(0, int(max_bytes))
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._data: collections.OrderedDict[str, tuple[dict[str, TensorStats], Shapes]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def lookup(self, key: str | None, wanted: dict[str, bool], shapes: bool) -> tuple[dict[str, TensorStats],
                                                                                    Shapes] | None:
        """Copies of the statistics of ``wanted`` (name -> needs a histogram) when the entry holds every one
        (and, with ``shapes``, the first-sample shapes), else ``None``."""
        if key is None or self.max_bytes <= 0:
            return None
        with self._lock:
            entry = self._data.get(key)
            if entry is None or any(n not in entry[0] or (h and not entry[0][n].has_histogram)
                                    for n, h in wanted.items()) or (shapes and not entry[1]):
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            stats, shp = entry
            out = {n: stats[n].copy() if h else stats[n].without_histogram() for n, h in wanted.items()}
            return out, dict(shp)

    def store(self, key: str | None, stats: dict[str, TensorStats], shapes: Shapes | None) -> None:
        """Keep copies of ``stats`` (and ``shapes``) under ``key``, adding to what it holds (a tensor keeps its
        histogram entry); the least recently used collections go when over the cap."""
        if key is None or self.max_bytes <= 0:
            return
        with self._lock:
            old_stats, old_shapes = self._data.pop(key, ({}, {}))
            self.nbytes -= _nbytes(old_stats)
            merged = dict(old_stats)
            for n, st in stats.items():
                if n not in merged or (st.has_histogram and not merged[n].has_histogram):
                    merged[n] = st.copy()
            size = _nbytes(merged)
            if size > self.max_bytes:
                return
            self._data[key] = (merged, {**old_shapes, **(shapes or {})})
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, (gone, _s) = self._data.popitem(last=False)
                self.nbytes -= _nbytes(gone)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._data)


def _nbytes(stats: dict[str, TensorStats]) -> int:
    return sum(st.nbytes + 256 for st in stats.values())


_CACHE: StatsCache | None = None


def stats_cache() -> StatsCache:
    """The process's cache (created on first use, its cap read from ``$QCOMPILER_STATS_CACHE_MB`` then)."""
    global _CACHE
    if _CACHE is None:
        _CACHE = StatsCache()
    return _CACHE


def reset_stats_cache(max_bytes: int | None = None) -> StatsCache:
    """A new, empty process cache (``max_bytes``: its cap; default from the environment). For tests and tools."""
    global _CACHE
    _CACHE = StatsCache(max_bytes)
    return _CACHE
