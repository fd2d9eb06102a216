"""A process-level cache of collected calibration statistics, bounded in bytes.

The measured default (``compile --plan auto``) and the presets' algorithm guard compile several candidate plans
of one model on the same calibration samples in one process. Candidates that differ only in what runs after
calibration (``gptq``, ``bias_correct``) or in the range method read from the same statistics (``percentile``
on / off) collect exactly the same statistics: the same BN-folded graph, the same tensors exposed, the same
samples. :func:`~qcompiler.calib.collect.collect` keeps what it collected here and gives it back instead of
running onnxruntime again.

An entry is keyed by

* the collection (:func:`collection_base`): :func:`~qcompiler.core.activations.graph_key` of the graph (nodes,
  attributes, constant values, inputs and outputs: any rewrite of the graph or of a weight misses), the graph
  inputs' names, dtypes and shapes, and the tensors run in onnxruntime, in order, with the group size (which
  tensors a session exposes can change onnxruntime's fusions, so values are reused only for the very same
  session);
* the samples: the content digest of every sample read (:meth:`~qcompiler.calib.sources.CalibrationSource.
  sample_ids`: the bytes of each ``.npz`` of a folder, the bytes of a stacked ``.npz`` and the index), in
  order — a ``take`` or ``subset`` reading the same samples is the same key, a file changed in place
  (timestamps or not) another one.

A collection over samples of which an entry holds a part (the candidates calibrate on the N - h "fit" samples,
every k-th held back, the confirmation and the final compile on all N) is served that part and collects only the
rest; the two merge exactly, in any order (:meth:`TensorStats.merge`: min / max and counts are order-free, and
histogram bins are power-of-two cells whose doubling merges pairs exactly, so the bins are what one pass over the
samples in file order gives). The part must be the wanted samples' first one and those after it in order (a
subsequence starting at the first sample: the first-sample shapes are that sample's).

A collection that misses may also be served by an entry of a collection on the same graph, inputs and samples
that ran more tensors, among them every tensor wanted (:meth:`StatsCache.superset`; the measured default's plain
default plan exposes every tensor its w8a8 and dynamic-matmul candidates collect on PP-OCR rec and the ViT). Since
onnxruntime fuses by what a session exposes, that is not assumed: each entry keeps a digest of its tensors' values
on its first sample (:func:`first_digest`), and :func:`~qcompiler.calib.collect.collect` runs its own session on
the first sample and takes the entry's statistics only when every tensor's digest matches (one run instead of N;
on a mismatch it collects as without, with that session).

Per tensor an entry holds its :class:`~qcompiler.calib.stats.TensorStats`, with a histogram when one was
collected. The collector settings are the histogram (or not): a request for a histogram method is served only
by a histogram entry; a ``minmax`` request by either (without a histogram, ``update`` keeps exactly the same
``min`` / ``max`` / ``count`` / ``samples`` / ``nonfinite``, and ``zeros`` stays 0:
:meth:`TensorStats.without_histogram`). Entries are copied in and out (the calibrate pass merges into its
statistics), so a hit gives statistics equal field for field — and ranges bit for bit — to a new collection.
In-memory and random sources are not cached.

Besides statistics, the cache keeps the graph outputs of calibration auto's held-out part that a ``for_auto``
collection ran (:meth:`StatsCache.keep_outputs`, keyed by the graph and the samples, at most
:data:`OUTPUTS_MAX_BYTES`): the ``calibration: auto`` candidate's method trials take them as their float reference
once their own float session gives the first held-out sample's outputs bit for bit as kept (the calibrate pass).

It also keeps, per sample, the graph outputs a collection's own runs gave (:meth:`StatsCache.keep_sample_outputs`,
keyed by the collection (:func:`collection_base`: the very same session) and the sample's content id, at most
:data:`OUTPUTS_MAX_BYTES` in all, least recently used first out): the measured default's candidates calibrate on
the N - h fit samples and keep their outputs there; the final compile, served its statistics from the cache, finds
them (:meth:`StatsCache.sample_outputs`, by content id: its sample ``i`` gets exactly sample ``i``'s outputs) and
hands them to its validation as its own calibration runs would have (the same session: the same values, bit for
bit), instead of the float model running on those samples again. A compile whose calibration runs nothing (no
activation calibrated statically: a weight-only winner) takes those of another collection on the same graph
(:func:`graph_base`; another session: the same function up to float rounding, which validation checks).

Cap: ``$QCOMPILER_STATS_CACHE_MB`` (default 128; 0 turns the cache off, kept outputs too); the least recently used
entries go first.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from qcompiler.calib.feeds import InputSig
from qcompiler.calib.stats import TensorStats
from qcompiler.core import digest
from qcompiler.core.activations import mib_from_env

log = logging.getLogger("qcompiler.calib")

#: environment variable: the cache's cap in MiB (0: no cache)
CACHE_ENV = "QCOMPILER_STATS_CACHE_MB"
DEFAULT_MAX_MB = 128

Shapes = dict[str, tuple[tuple[int, ...], np.dtype]]


def default_max_bytes() -> int:
    return mib_from_env(CACHE_ENV, DEFAULT_MAX_MB)


def collection_base(gkey: str | None, sigs: Sequence[InputSig], run_names: Sequence[str],
                    group_size: int) -> str | None:
    """The key of a collection without its samples (graph, inputs, session; see the module doc); ``None``:
    not cacheable."""
    if gkey is None:
        return None
    h = digest.hasher()
    h.update(gkey.encode())
    h.update(repr([(s.name, str(s.dtype), tuple(s.shape)) for s in sigs]).encode())
    h.update(repr((list(run_names), group_size)).encode())
    return h.hexdigest()


def graph_base(gkey: str | None, sigs: Sequence[InputSig]) -> str | None:
    """The key of a collection's graph and inputs, whatever tensors it runs (:meth:`StatsCache.superset`)."""
    return None if gkey is None else collection_base(gkey, sigs, ["<graph>"], 0)


def first_digest(value: np.ndarray) -> str:
    """A digest of one tensor's values (dtype, shape, bytes): two sessions that give the same digest on a sample
    computed the tensor alike there."""
    h = digest.hasher()
    digest.update_array(h, np.asarray(value))
    return h.hexdigest()


@dataclass
class Hit:
    """What :meth:`StatsCache.lookup` found: copies of the statistics of ``covered`` of the samples asked for
    (all of them, or a part starting at the first), their first-sample shapes, and the positions of the samples
    asked for that they do not cover (``rest``, ascending; empty: all covered)."""

    stats: dict[str, TensorStats]
    shapes: Shapes
    covered: int
    rest: list[int] = field(default_factory=list)
    #: tensor -> digest of its values on the first sample (:func:`first_digest`), as the entry's session gave them
    digests: dict[str, str] = field(default_factory=dict)


class StatsCache:
    """``(collection base, sample ids) -> ({tensor: TensorStats}, first-sample shapes)``, at most ``max_bytes``
    of statistics in all."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = default_max_bytes() if max_bytes is None else max(0, int(max_bytes))
        self.nbytes = 0
        self.hits = 0
        self.partial_hits = 0
        self.misses = 0
        self._data: collections.OrderedDict[tuple[str, tuple[str, ...]], tuple[dict[str, TensorStats], Shapes]] = \
            collections.OrderedDict()
        #: entry -> (its graph's key without the tensors run, :func:`graph_base`; first-sample digests by tensor)
        self._meta: dict[tuple[str, tuple[str, ...]], tuple[str | None, dict[str, str]]] = {}
        self.superset_hits = 0
        self._lock = threading.Lock()
        #: (graph base, sample ids) -> the graph outputs of those samples as a collection's runs gave them
        #: (:meth:`keep_outputs`), least recently used first; at most :data:`OUTPUTS_MAX_BYTES` in all
        self._outputs: collections.OrderedDict[tuple[str, tuple[str, ...]], tuple[list[dict[str, np.ndarray]], int]] = \
            collections.OrderedDict()
        self.outputs_nbytes = 0
        self.outputs_hits = 0
        #: (collection base, sample id) -> that sample's graph outputs as the collection's session gave them
        #: (:meth:`keep_sample_outputs`), least recently used first; at most :data:`OUTPUTS_MAX_BYTES` in all
        self._samples: collections.OrderedDict[tuple[str, str], tuple[dict[str, np.ndarray], int, str | None]] = \
            collections.OrderedDict()
        #: (graph base, sample id) -> the collections (bases) that kept that sample's outputs on that graph
        self._by_graph: dict[tuple[str, str], list[str]] = {}
        self.samples_nbytes = 0
        self.sample_hits = 0

    def keep_outputs(self, graph: str | None, ids: Sequence[str] | None, values: Sequence[dict[str, np.ndarray]],
                     max_bytes: int | None = None) -> None:
        """Keep the graph outputs of the samples ``ids`` (``values[i]``: sample ``ids[i]``'s {output: array}, as a
        collection's session on the graph ``graph`` (:func:`graph_base`) gave them) for :meth:`take_outputs`; the
        least recently kept go past ``max_bytes`` (default :data:`OUTPUTS_MAX_BYTES`) in all. Not kept when the
        statistics cache is off."""
        if graph is None or ids is None or self.max_bytes <= 0 or len(values) != len(ids) or not values:
            return
        cap = OUTPUTS_MAX_BYTES if max_bytes is None else max_bytes
        size = sum(int(np.asarray(v).nbytes) for d in values for v in d.values())
        if size > cap:
            return
        key = (graph, tuple(ids))
        with self._lock:
            _old, old_size = self._outputs.pop(key, ([], 0))
            self.outputs_nbytes -= old_size
            self._outputs[key] = (list(values), size)
            self.outputs_nbytes += size
            while self.outputs_nbytes > cap:
                _k, (_v, gone) = self._outputs.popitem(last=False)
                self.outputs_nbytes -= gone

    def take_outputs(self, graph: str | None, ids: Sequence[str] | None) -> list[dict[str, np.ndarray]] | None:
        """The graph outputs :meth:`keep_outputs` kept for exactly the samples ``ids`` on the graph ``graph``
        (``None``: none kept), taken out of the cache (one reader: the ``calibration: auto`` candidate of the
        measured default; their memory goes with it). Whoever takes them as another session's outputs checks a
        sample first: they are what the keeping collection's session computed."""
        if graph is None or ids is None or self.max_bytes <= 0:
            return None
        with self._lock:
            got = self._outputs.pop((graph, tuple(ids)), None)
            if got is None:
                return None
            self.outputs_nbytes -= got[1]
            self.outputs_hits += 1
            return list(got[0])

    def keep_sample_outputs(self, base: str | None, ids: Sequence[str] | None,
                            values: Mapping[int, Mapping[str, np.ndarray]], max_bytes: int | None = None, *,
                            graph: str | None = None) -> None:
        """Keep ``values`` (position in ``ids`` -> that sample's {graph output: array}, as the session of the
        collection ``base`` (:func:`collection_base`) on the graph ``graph`` (:func:`graph_base`) gave them) under
        each sample's id, for :meth:`sample_outputs`; the least recently used samples go past ``max_bytes`` (default
        :data:`OUTPUTS_MAX_BYTES`) in all. The arrays are kept as given (not copied: the caller gives up writing
        them). Not kept when the statistics cache is off."""
        if base is None or ids is None or self.max_bytes <= 0:
            return
        cap = OUTPUTS_MAX_BYTES if max_bytes is None else max_bytes
        with self._lock:
            for i in sorted(values):
                if not 0 <= i < len(ids):
                    continue
                outs = dict(values[i])
                size = sum(int(np.asarray(v).nbytes) for v in outs.values())
                if size > cap:
                    continue
                key = (base, ids[i])
                self._drop_sample(key)
                if graph is not None:  # another session's equal values on this graph: one copy in memory
                    outs = self._same_as_kept(graph, ids[i], outs)
                self._samples[key] = (outs, size, graph)
                self.samples_nbytes += size
                if graph is not None:
                    self._by_graph.setdefault((graph, ids[i]), []).append(base)
                while self.samples_nbytes > cap:
                    self._drop_sample(next(iter(self._samples)))

    def _same_as_kept(self, graph: str, sid: str, outs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``outs`` with each array another collection on ``graph`` kept for sample ``sid`` with equal dtype, shape
        and bytes replaced by that array (the same values, held once)."""
        others = self._by_graph.get((graph, sid))
        if not others:
            return outs
        kept = self._samples.get((others[-1], sid))
        if kept is None:
            return outs
        same = {}
        for name, v in outs.items():
            k = kept[0].get(name)
            a = np.asarray(v)
            same[name] = k if k is not None and k.dtype == a.dtype and k.shape == a.shape and \
                k.tobytes() == a.tobytes() else v
        return same

    def _drop_sample(self, key: tuple[str, str]) -> None:
        got = self._samples.pop(key, None)
        if got is None:
            return
        self.samples_nbytes -= got[1]
        if got[2] is not None:
            bases = self._by_graph.get((got[2], key[1]), [])
            if key[0] in bases:
                bases.remove(key[0])
            if not bases:
                self._by_graph.pop((got[2], key[1]), None)

    def sample_outputs(self, base: str | None, ids: Sequence[str] | None, positions: Sequence[int] | None = None,
                       *, graph: str | None = None) -> dict[int, dict[str, np.ndarray]]:
        """The graph outputs :meth:`keep_sample_outputs` kept for the samples ``ids`` (of ``positions`` only, when
        given): position in ``ids`` -> {output: array}, for the samples it holds (left in the cache: a later compile
        of the same graph and samples finds them again). Those the collection ``base`` kept (the very same session:
        the values its own runs give, bit for bit) first; with ``graph`` (:func:`graph_base`), for the other
        samples, those another collection on that graph kept (another session: the same function up to float
        rounding; ``base`` may then be ``None``)."""
        if (base is None and graph is None) or ids is None or self.max_bytes <= 0:
            return {}
        got: dict[int, dict[str, np.ndarray]] = {}
        with self._lock:
            for i in (range(len(ids)) if positions is None else positions):
                key = (base or "", ids[i])
                entry = self._samples.get(key) if base is not None else None
                if entry is None and graph is not None:
                    others = self._by_graph.get((graph, ids[i]))
                    if others:
                        key = (others[-1], ids[i])
                        entry = self._samples.get(key)
                if entry is None:
                    continue
                self._samples.move_to_end(key)
                got[i] = dict(entry[0])
            self.sample_hits += len(got)
        return got

    def lookup(self, base: str | None, ids: Sequence[str] | None, wanted: dict[str, bool], shapes: bool, *,
               prefix: bool = True) -> Hit | None:
        """Copies of the statistics of ``wanted`` (name -> needs a histogram) over the samples ``ids``, or with
        ``prefix`` over the largest cached part of them that starts at their first sample (a prefix, or the
        first and others after it in order; the caller collects :attr:`Hit.rest` and merges: exact), when an
        entry holds every tensor wanted (and, with ``shapes``, the first-sample shapes); else ``None``."""
        if base is None or ids is None or self.max_bytes <= 0:
            return None
        want = tuple(ids)
        with self._lock:
            best: tuple[str, tuple[str, ...]] | None = None
            best_rest: list[int] = []
            for key, (stats, shp) in self._data.items():
                k_base, k_ids = key
                if k_base != base or len(k_ids) > len(want) or (len(k_ids) < len(want) and not prefix):
                    continue
                if best is not None and len(k_ids) <= len(best[1]):
                    continue
                if (shapes and not shp) or any(
                        n not in stats or (h and not stats[n].has_histogram) for n, h in wanted.items()):
                    continue
                rest = _uncovered(want, k_ids)
                if rest is None:
                    continue
                best, best_rest = key, rest
            if best is None:
                self.misses += 1
                return None
            self._data.move_to_end(best)
            stats, shp = self._data[best]
            if len(best[1]) == len(want):
                self.hits += 1
            else:
                self.partial_hits += 1
            out = {n: stats[n].copy() if h else stats[n].without_histogram() for n, h in wanted.items()}
            return Hit(out, dict(shp), len(best[1]), best_rest)

    def superset(self, graph: str | None, ids: Sequence[str] | None, wanted: dict[str, bool],
                 run: Sequence[str], shapes: bool) -> Hit | None:
        """Copies of the statistics of ``wanted`` over exactly the samples ``ids`` from an entry of another
        collection on the same graph and inputs (``graph``: :func:`graph_base`) that ran more tensors: one that holds
        every tensor wanted (with a histogram where wanted), the first-sample digests of the tensors ``run`` and,
        with ``shapes``, the first-sample shapes; the caller checks the digests against its own session's first
        run before taking them (:func:`~qcompiler.calib.collect.collect`). ``None``: no such entry."""
        if graph is None or ids is None or self.max_bytes <= 0:
            return None
        want = tuple(ids)
        with self._lock:
            for key, (stats, shp) in reversed(self._data.items()):
                g, digests = self._meta.get(key, (None, {}))
                if g != graph or key[1] != want or (shapes and not shp) or any(n not in digests for n in run) or any(
                        n not in stats or (h and not stats[n].has_histogram) for n, h in wanted.items()):
                    continue
                self._data.move_to_end(key)
                self.superset_hits += 1
                out = {n: stats[n].copy() if h else stats[n].without_histogram() for n, h in wanted.items()}
                return Hit(out, dict(shp), len(want), [], {n: digests[n] for n in run})
        return None

    def store(self, base: str | None, ids: Sequence[str] | None, stats: dict[str, TensorStats],
              shapes: Shapes | None, *, graph: str | None = None, digests: dict[str, str] | None = None) -> None:
        """Keep copies of ``stats`` (and ``shapes``) over the samples ``ids``, adding to what the entry holds (a
        tensor keeps its histogram entry); the least recently used entries go when over the cap. ``graph`` /
        ``digests``: the collection's :func:`graph_base` and its tensors' first-sample digests, for
        :meth:`superset`."""
        if base is None or ids is None or self.max_bytes <= 0:
            return
        key = (base, tuple(ids))
        with self._lock:
            if graph is not None:
                _g, old = self._meta.get(key, (graph, {}))
                self._meta[key] = (graph, {**old, **(digests or {})})
            old_stats, old_shapes = self._data.pop(key, ({}, {}))
            self.nbytes -= _nbytes(old_stats)
            merged = dict(old_stats)
            for n, st in stats.items():
                if n not in merged or (st.has_histogram and not merged[n].has_histogram):
                    merged[n] = st.copy()
            size = _nbytes(merged)
            if size > self.max_bytes:
                self._meta.pop(key, None)
                return
            self._data[key] = (merged, {**old_shapes, **(shapes or {})})
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                gone_key, (gone, _s) = self._data.popitem(last=False)
                self._meta.pop(gone_key, None)
                self.nbytes -= _nbytes(gone)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._meta.clear()
            self.nbytes = 0
            self._outputs.clear()
            self.outputs_nbytes = 0
            self._samples.clear()
            self._by_graph.clear()
            self.samples_nbytes = 0

    def __len__(self) -> int:
        return len(self._data)


def _uncovered(want: tuple[str, ...], have: tuple[str, ...]) -> list[int] | None:
    """The positions of ``want`` not matched when ``have`` is matched in order against it (greedily, first
    sample to first sample), or ``None`` when ``have`` is not such a subsequence of ``want`` starting at its
    first sample."""
    if not have or not want or have[0] != want[0]:
        return None
    rest: list[int] = []
    j = 0
    for i, sid in enumerate(want):
        if j < len(have) and sid == have[j]:
            j += 1
        else:
            rest.append(i)
    return rest if j == len(have) else None


def _nbytes(stats: dict[str, TensorStats]) -> int:
    return sum(st.nbytes + 256 for st in stats.values())


_CACHE: StatsCache | None = None

#: the most bytes of graph outputs :meth:`StatsCache.keep_outputs` holds (calibration auto's held-out float
#: reference: PP-OCR rec's 12 samples take 6.4 MB, det's 4.9 MB)
OUTPUTS_MAX_BYTES = 64 << 20

#: calibration auto's default hold-out (the calibrate pass's ``auto_samples``): ``min(AUTO_HELD_SAMPLES, N / 4)``
#: of its N samples, the last ones
AUTO_HELD_SAMPLES = 16


def auto_parts(n: int) -> list[range]:
    """The two parts (first ``N - h``, last ``h``) calibration auto collects separately over ``n`` samples; one part
    when it holds none back (fewer than 4)."""
    h = min(AUTO_HELD_SAMPLES, n // 4)
    return [range(n)] if h <= 0 else [range(n - h), range(n - h, n)]


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
