"""A per-compile cache of float activations by calibration sample, bounded in bytes.

Calibration runs the float graph on every calibration sample with the activation tensors exposed; the PTQ
passes after it (``gptq``, ``smooth``, ``equalize``, ...) stream the same samples through the same graph again
for the tensors they need. :class:`ActivationCache` keeps the values calibration (or an earlier stream) already
computed — keyed by a fingerprint of the graph (:func:`graph_key`: nodes, attributes, constant values, inputs
and outputs, so any rewrite of the graph or of a weight misses), the sample's label and the tensor name — up to
``max_bytes`` in all. Beyond the cap nothing more is kept and the later passes run onnxruntime for the samples
the cache does not hold: memory stays bounded whatever the number of samples (calibration keeps streaming).
A hit gives the very arrays onnxruntime returned (read-only views), so results are the same with or without it.

Cap: ``$QCOMPILER_ACTIVATION_CACHE_MB`` (default 256; 0 turns the cache off).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core import digest

log = logging.getLogger(__name__)

#: environment variable: the cache's cap in MiB (0: no cache)
CACHE_ENV = "QCOMPILER_ACTIVATION_CACHE_MB"
DEFAULT_MAX_MB = 256
#: graphs with more constant bytes than this are not fingerprinted, so nothing of theirs is cached (hashing costs
#: about 0.3 s per 575 MB here; below 2 GiB that is far less than the GPTQ sweeps and calibration runs a cache
#: saves: a VGG-19's guard swept every layer again for each arm at the old 512 MiB)
MAX_FINGERPRINT_BYTES = 2 * 2**30


def mib_from_env(var: str, default_mb: int) -> int:
    """A cache cap in bytes from environment variable ``var`` (MiB; 0 turns the cache off), else ``default_mb``."""
    env = os.environ.get(var, "").strip()
    if env:
        try:
            return max(0, int(float(env) * 2**20))
        except ValueError:
            log.warning("%s=%r is not a number; ignored", var, env)
    return default_mb * 2**20


def default_max_bytes() -> int:
    return mib_from_env(CACHE_ENV, DEFAULT_MAX_MB)


def graph_key(graph: gs.Graph) -> str | None:
    """Fingerprint of everything that decides the float values of ``graph``'s tensors (tensor-valued attributes,
    such as a ``ConstantOfShape``'s value, by their bytes); ``None`` (do not cache) for graphs with subgraphs or
    more than :data:`MAX_FINGERPRINT_BYTES` of constants."""
    h = digest.hasher()
    seen: set[str] = set()
    total = 0

    def tensor(t: gs.Tensor) -> None:
        nonlocal total
        h.update(f"|{t.name}:{type(t).__name__}".encode())
        if isinstance(t, gs.Constant) and t.name not in seen:
            seen.add(t.name)
            v = np.asarray(t.values)  # (update_array hashes a C-contiguous view, 0-d kept 0-d)
            total += v.nbytes
            if total > MAX_FINGERPRINT_BYTES:
                raise _Uncacheable
            digest.update_array(h, v)

    def attr(name: str, a: object) -> None:
        nonlocal total
        if isinstance(a, gs.Tensor):  # a tensor-valued attribute (ConstantOfShape's value): its bytes, not a repr
            v = np.asarray(a.values) if isinstance(a, gs.Constant) else None
            if v is None:
                raise _Uncacheable
            total += v.nbytes
            if total > MAX_FINGERPRINT_BYTES:
                raise _Uncacheable
            h.update(f"@{name}=".encode())
            digest.update_array(h, v)
        else:
            h.update(f"@{name}={a!r}".encode())

    try:
        for t in graph.inputs:
            tensor(t)
        for node in graph.nodes:
            for a in node.attrs.values():
                if isinstance(a, gs.Graph) or (isinstance(a, (list, tuple)) and any(
                        isinstance(x, (gs.Graph, gs.Tensor)) for x in a)):
                    return None
            h.update(f"#{node.op}|{node.domain}|{node.name}".encode())
            for name in sorted(node.attrs):
                attr(name, node.attrs[name])
            for t in (*node.inputs, *node.outputs):
                tensor(t)
        for t in graph.outputs:
            tensor(t)
    except _Uncacheable:
        return None
    return h.hexdigest()


class _Uncacheable(Exception):
    """Raised inside :func:`graph_key`: the graph is not fingerprinted (too many constant bytes, or an attribute
    whose value cannot be read)."""


class ActivationCache:
    """``(graph key, sample label) -> {tensor name: array}``, at most ``max_bytes`` of arrays in all."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = default_max_bytes() if max_bytes is None else max(0, int(max_bytes))
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._full = False
        self._data: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()

    def store(self, key: str | None, sample: str, values: Mapping[str, np.ndarray]) -> bool:
        """Keep ``values`` of one sample (all of them, or none when they do not fit); True when kept."""
        if key is None or self.max_bytes <= 0:
            return False
        with self._lock:
            have = self._data.setdefault((key, sample), {})
            new = {k: v for k, v in values.items() if k not in have}
            size = sum(int(np.asarray(v).nbytes) for v in new.values())
            if self.nbytes + size > self.max_bytes:
                if not self._full:
                    self._full = True
                    log.debug("activation cache: full at %d bytes; later samples run again", self.nbytes)
                if not have:
                    del self._data[(key, sample)]
                return False
            for k, v in new.items():
                ro = np.asarray(v).view()
                ro.flags.writeable = False
                have[k] = ro
            self.nbytes += size
            return True

    def lookup(self, key: str | None, sample: str, names: Sequence[str]) -> dict[str, np.ndarray] | None:
        """The values of ``names`` for the sample when every one is held, else ``None``."""
        if key is None or not self._data:
            return None
        with self._lock:
            have = self._data.get((key, sample))
            if have is None or any(n not in have for n in names):
                self.misses += 1
                return None
            self.hits += 1
            return {n: have[n] for n in names}

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.nbytes = 0
            self._full = False
