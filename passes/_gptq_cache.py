"""Process-level caches of GPTQ's Hessians and sweep results, bounded in bytes (for :mod:`.gptq`).

The measured default (``compile`` with data and no plan) and the presets' algorithm guard compile several plans
of one model in one process: a candidate on the first N - h calibration samples, the confirmation of the winner
on all N, then the final compile of the same plan on the same N samples; the guard compiles a preset as written
and without one algorithm or another. Wherever GPTQ runs on the same float graph and samples, each layer's
Hessian ``H = XᵀX`` is the same, and where the weights, grid and options are the same too, so is its sweep.

**Hessians.** An entry holds one layer's ``H`` (float64, ``[groups, K, K]``) and its row count over a list of
samples. The key is the graph (:func:`~qcompiler.core.activations.graph_key`: nodes, attributes, constant values,
inputs and outputs, so any rewrite of the graph or of a weight misses), the graph inputs' names, dtypes and
shapes, the layer (node, op, input tensor, weight shape, attributes: what decides its rows) and, with
``max_rows > 0``, the row quota, the compile seed and the layer's place (what decides which rows are drawn);
then the samples' content ids (:meth:`~qcompiler.calib.CalibrationSource.sample_ids`), in order. ``H`` is
accumulated one sample after the other (``h += float64(float32 XᵀX of the sample)``), so the sum over samples
0..m-1 followed by samples m..N-1 is the very sum over 0..N-1: an entry over the first m samples asked for is
served and only the rest is accumulated (**prefix merge**), bit for bit what a compile without the cache gets
(for a layer whose ``H`` comes from shifted products, :mod:`._gptq_gram`, the two parts are each assembled from
their sums: equal to the one sum up to float64 rounding, ~1e-16 relative; the same codes on every test and zoo
model).
With ``max_rows > 0`` the per-sample quota depends on the number of samples, so only an entry over exactly the
same samples is used. No entry is copied: the pass hands its arrays over once accumulated (read-only from
then on), an entry over all the samples asked for is lent read-only, and one over a prefix is taken out of the
cache for the pass to add the rest to (it stores the whole back): one ``H`` per layer in memory, never two.

**Sweeps.** An entry holds a layer's :class:`~qcompiler.quant.QuantizedTensor` and its two proxy losses, keyed
by the Hessian's key and samples, the weight's bytes, the weight's :class:`~qcompiler.plan.QuantSpec`, axis and
block, and the sweep's options (``block_size``, ``damp``, ``act_order``, the one-row-group batching): everything
the sweep reads. The final compile after a confirmation on the same samples then does no GPTQ work at all (and
no onnxruntime run: with every layer's Hessian cached the samples are not streamed).

An entry replaces the layer's entries over a prefix of its samples. Caps:
``$QCOMPILER_HESSIAN_CACHE_MB`` (default 4096: a ResNet-50's 54 Hessians take 0.93 GiB, a VGG-19's 2.7 GiB, and a
measured default or guard whose winner's Hessians were evicted builds them all again; entries are never copied,
so the cap bounds what stays in memory between compiles, not a second copy) and
``$QCOMPILER_GPTQ_SWEEP_CACHE_MB`` (default 512: a VGG-19's int8 codes take 143 MiB, its fc6's alone 103; at 64
the guard swept every layer again for each arm);
0 turns a cache off; the least recently used entries go first. Counters ``hits`` / ``partial_hits`` / ``misses`` as
:mod:`qcompiler.calib.statcache`'s.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qcompiler import quant
from qcompiler.calib import CalibrationSource, input_signatures
from qcompiler.core import digest
from qcompiler.core.activations import graph_key, mib_from_env

log = logging.getLogger(__name__)

#: environment variables: the caches' caps in MiB (0: no cache)
HESSIAN_ENV = "QCOMPILER_HESSIAN_CACHE_MB"
SWEEP_ENV = "QCOMPILER_GPTQ_SWEEP_CACHE_MB"
DEFAULT_HESSIAN_MB = 4096
DEFAULT_SWEEP_MB = 512


@dataclass
class Prefix:
    """What :meth:`HessianCache.lookup` found: ``H`` (read-only when the cache keeps it) and the row count over
    the first ``covered`` samples asked for (all of them, or a prefix)."""

    h: np.ndarray
    rows: int
    covered: int


class _Lru:
    """An LRU map bounded in bytes, with hit / partial / miss counters (thread-safe)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.nbytes = 0
        self.hits = 0
        self.partial_hits = 0
        self.misses = 0
        self._data: collections.OrderedDict[Any, tuple[Any, int]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _put(self, key: Any, value: Any, size: int) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            if size > self.max_bytes:
                return
            self._data[key] = (value, size)
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, (_v, gone) = self._data.popitem(last=False)
                self.nbytes -= gone

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._data)


class HessianCache(_Lru):
    """``(layer key, sample ids) -> (H, rows)``, at most ``max_bytes`` of Hessians in all."""

    def __init__(self, max_bytes: int | None = None) -> None:
        super().__init__(mib_from_env(HESSIAN_ENV, DEFAULT_HESSIAN_MB) if max_bytes is None else max_bytes)

    def lookup(self, key: str, ids: Sequence[str], *, prefix: bool = True) -> Prefix | None:
        """The layer's ``H`` over the samples ``ids`` — the cached array itself, read-only (a reader's: no copy) —,
        or with ``prefix`` over their longest cached prefix, taken out of the cache and writable (the caller
        accumulates the rest onto it, exact, and stores the whole: one ``H`` per layer in memory, never two);
        ``None`` when there is none."""
        if self.max_bytes <= 0:
            return None
        want = tuple(ids)
        with self._lock:
            best: tuple[str, tuple[str, ...]] | None = None
            for k in self._data:
                k_key, k_ids = k
                if k_key != key or len(k_ids) > len(want) or (len(k_ids) < len(want) and not prefix):
                    continue
                if (best is None or len(k_ids) > len(best[1])) and want[:len(k_ids)] == k_ids:
                    best = k
            if best is None:
                self.misses += 1
                return None
            if len(best[1]) == len(want):
                self._data.move_to_end(best)
                (h, rows), _size = self._data[best]
                self.hits += 1
                return Prefix(h, rows, len(best[1]))
            (h, rows), size = self._data.pop(best)
            self.nbytes -= size
            self.partial_hits += 1
        try:
            h.flags.writeable = True  # the cache no longer holds it: the caller's to add to
        except ValueError:  # not its own memory (a view): a copy then
            h = h.copy()
        return Prefix(h, rows, len(best[1]))

    def store(self, key: str, ids: Sequence[str], h: np.ndarray, rows: int) -> None:
        """Keep ``H`` itself (and its row count) over the samples ``ids``, made read-only (the caller is done
        writing it: no second K × K matrix per layer while the caller still holds its own), in place of the
        layer's entries over a prefix of them (the candidates' samples, once the confirmation has all of them:
        one ``H`` per layer stays in memory)."""
        if self.max_bytes <= 0:
            return
        h.flags.writeable = False
        want = tuple(ids)
        with self._lock:
            for k in [k for k in self._data if k[0] == key and len(k[1]) < len(want) and want[:len(k[1])] == k[1]]:
                self.nbytes -= self._data.pop(k)[1]
        self._put((key, want), (h, int(rows)), h.nbytes + 256)


Sweep = tuple[quant.QuantizedTensor, float, float]


class SweepCache(_Lru):
    """``sweep key -> (QuantizedTensor, proxy loss round-to-nearest, proxy loss GPTQ)``, bounded in bytes."""

    def __init__(self, max_bytes: int | None = None) -> None:
        super().__init__(mib_from_env(SWEEP_ENV, DEFAULT_SWEEP_MB) if max_bytes is None else max_bytes)

    def lookup(self, key: str) -> Sweep | None:
        if self.max_bytes <= 0:
            return None
        with self._lock:
            got = self._data.get(key)
            if got is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return _copy(got[0])

    def store(self, key: str, value: Sweep) -> None:
        if self.max_bytes > 0:
            qt = value[0]
            self._put(key, _copy(value), qt.q.nbytes + np.asarray(qt.scale).nbytes
                      + np.asarray(qt.zero_point).nbytes + 256)


def _copy(value: Sweep) -> Sweep:
    qt, l_rtn, l_gptq = value
    return (quant.QuantizedTensor(qt.q.copy(), np.array(qt.scale, copy=True), np.array(qt.zero_point, copy=True),
                                  qt.axis, qt.block_size, qt.dtype), l_rtn, l_gptq)


class Keys:
    """The cache keys of one GPTQ run: per layer, its Hessian's key (without the samples) and its weight's
    digest; the samples' ids; after :func:`cached_sweeps`, the layers' sweep keys."""

    def __init__(self, ids: list[str], layers: list[str], weights: list[str], prefix: bool) -> None:
        self.ids = ids
        self.layers = layers
        self.weights = weights
        self.prefix = prefix  # whether a prefix of the samples may be merged (exact)
        self.sweeps: list[str] = []

    @classmethod
    def of(cls, graph: Any, source: CalibrationSource, layers: Sequence[tuple[Any, np.ndarray]], max_rows: int,
           seed: int, chunks: Sequence[int] | None = None) -> Keys | None:
        """The keys of ``layers`` (node, weight) of ``graph`` over ``source``; ``chunks``: each layer's column
        chunks (its ``H`` is their diagonal blocks; 1: one ``H``); ``None`` when nothing may be
        cached (both caches off, a graph :func:`graph_key` does not fingerprint, data without sample ids)."""
        if hessian_cache().max_bytes <= 0 and sweep_cache().max_bytes <= 0:
            return None
        gkey = graph_key(graph)
        ids = source.sample_ids() if gkey is not None else None
        if gkey is None or ids is None:
            return None
        sigs = repr([(s.name, str(s.dtype), tuple(s.shape)) for s in input_signatures(graph)])
        keyed, weights = [], []
        for j, (node, w) in enumerate(layers):
            # what decides the layer's rows besides its input's values: node, op, input, weight shape, attributes
            # (Conv geometry); with a row quota also the number of samples, the seed and the layer's place
            lay = repr((node.name, node.op, node.inputs[0].name, tuple(int(d) for d in w.shape),
                        sorted((k, repr(v)) for k, v in node.attrs.items())))
            rows = f"|rows {max_rows} of {len(ids)} samples, seed {seed}, layer {j}" if max_rows else ""
            if chunks is not None and chunks[j] > 1:
                rows += f"|{chunks[j]} column chunks"
            keyed.append(_digest(gkey, sigs, lay, rows))
            hw = digest.hasher()
            digest.update_array(hw, w)
            weights.append(hw.hexdigest())
        return cls(list(ids), keyed, weights, prefix=not max_rows)


def cached_hessians(keys: Keys | None, need: Sequence[bool]) -> list[Prefix | None]:
    """Per layer, its ``H`` over the samples or their longest cached prefix when ``need``-ed and cached."""
    if keys is None:
        return [None] * len(need)
    cache = hessian_cache()
    got = [cache.lookup(k, keys.ids, prefix=keys.prefix) if nd else None for k, nd in zip(keys.layers, need)]
    log.debug("gptq: %d of %d needed Hessians from the cache over all %d samples, %d over their first ones",
              sum(1 for g in got if g is not None and g.covered == len(keys.ids)), sum(need), len(keys.ids),
              sum(1 for g in got if g is not None and g.covered < len(keys.ids)))
    return got


def store_hessians(keys: Keys | None, done: Sequence[tuple[int, np.ndarray, int]]) -> None:
    """Keep the Hessians ``(layer, H, rows)`` just accumulated over all the samples: the arrays themselves, made
    read-only (the pass only reads them from here on)."""
    if keys is not None:
        for j, h, rows in done:
            hessian_cache().store(keys.layers[j], keys.ids, h, rows)


def cached_sweeps(keys: Keys | None, whats: Sequence[str]) -> list[Sweep | None]:
    """Per layer, its sweep from the cache (``None``: to do); ``whats``: each layer's grid and options."""
    if keys is None:
        return [None] * len(whats)
    samples = repr(keys.ids)
    keys.sweeps = [_digest(lk, samples, wd, what) for lk, wd, what in zip(keys.layers, keys.weights, whats)]
    got = [sweep_cache().lookup(k) for k in keys.sweeps]
    log.debug("gptq: %d of %d layers' sweeps from the cache", sum(1 for g in got if g is not None), len(got))
    return got


def store_sweep(keys: Keys | None, j: int, value: Sweep) -> None:
    """Keep layer ``j``'s sweep (after :func:`cached_sweeps`)."""
    if keys is not None and keys.sweeps:
        sweep_cache().store(keys.sweeps[j], value)


def _digest(*parts: str) -> str:
    h = digest.hasher()
    for p in parts:
        h.update(p.encode())
        h.update(b"\x00")
    return h.hexdigest()


_HESSIANS: HessianCache | None = None
_SWEEPS: SweepCache | None = None


def hessian_cache() -> HessianCache:
    """The process's Hessian cache (created on first use, its cap read from ``$QCOMPILER_HESSIAN_CACHE_MB``)."""
    global _HESSIANS
    if _HESSIANS is None:
        _HESSIANS = HessianCache()
    return _HESSIANS


def sweep_cache() -> SweepCache:
    """The process's sweep cache (created on first use, its cap read from ``$QCOMPILER_GPTQ_SWEEP_CACHE_MB``)."""
    global _SWEEPS
    if _SWEEPS is None:
        _SWEEPS = SweepCache()
    return _SWEEPS


def reset_caches(hessian_bytes: int | None = None, sweep_bytes: int | None = None) -> tuple[HessianCache, SweepCache]:
    """New, empty process caches (caps in bytes; default from the environment). For tests and tools."""
    global _HESSIANS, _SWEEPS
    _HESSIANS = HessianCache(hessian_bytes)
    _SWEEPS = SweepCache(sweep_bytes)
    return _HESSIANS, _SWEEPS
