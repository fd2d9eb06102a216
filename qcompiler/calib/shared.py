"""Calibration sources shared by the compiles nested in one top-level compile.

The measured default and the presets' algorithm guard compile several candidate plans of one model on the same
``--calib`` data inside one ``compile`` (and the compile then calibrates once more); each of those compiles, and
the recipe's own read of the held-back samples, made a new :class:`~qcompiler.calib.sources.CalibrationSource`
of the same folder: the up-front check of every file (zip directory, ``.npy`` headers) and, for the statistics
cache key, the content digest of every file (:meth:`~qcompiler.calib.sources.CalibrationSource.sample_ids`) —
0.02 s a compile for silero-vad's 64 files, five times for ``--preset w8a8``.

:func:`sharing_sources` opens a scope (the outermost ``compile_plan`` opens one for its whole run, nested
compiles join it); inside it :func:`shared_source` gives the same source object for the same argument, input
signatures and sample limit — its layout check and digests done once. The scope ends with the top-level compile:
a later compile (or a file changed between two compiles) reads and digests the files again, as before. Random
data (``random``) is not shared (seeded, cheap); outside a scope :func:`shared_source` is ``from_arg``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from qcompiler.calib.feeds import InputSig
from qcompiler.calib.sources import CalibrationSource

__all__ = ["FloatOutputs", "shared_source", "sharing_sources"]

_SCOPE: contextvars.ContextVar[dict[Any, CalibrationSource] | None] = contextvars.ContextVar(
    "qcompiler_shared_sources", default=None)


@contextlib.contextmanager
def sharing_sources() -> Iterator[None]:
    """Share calibration sources in this block (a no-op inside an open scope: the outermost one decides)."""
    if _SCOPE.get() is not None:
        yield
        return
    token = _SCOPE.set({})
    try:
        yield
    finally:
        _SCOPE.reset(token)


def shared_source(arg: str | Path, inputs: Sequence[InputSig], *, seed: int = 0,
                  limit: int | None = None) -> CalibrationSource:
    """``CalibrationSource.from_arg(arg, inputs, seed=seed, limit=limit)``, the same object again for the same
    ``arg`` / ``inputs`` / ``limit`` inside a :func:`sharing_sources` scope (``seed`` only matters for
    ``random``, which is never shared)."""
    scope = _SCOPE.get()
    if scope is None or str(arg) in ("random", "none"):
        return CalibrationSource.from_arg(arg, list(inputs), seed=seed, limit=limit)
    key = (str(arg), tuple((s.name, str(s.dtype), tuple(s.shape), s.known_rank) for s in inputs), limit)
    src = scope.get(key)
    if src is None:
        src = scope[key] = CalibrationSource.from_arg(arg, list(inputs), seed=seed, limit=limit)
    return src


class FloatOutputs:
    """The float graph's outputs on the first ``limit`` samples of a calibration, as its onnxruntime runs gave
    them (:func:`~qcompiler.calib.collect.collect` with ``outputs=``): the compile's validation takes them as its
    float reference for those samples instead of running the float model on them again. Filled by the samples a
    collection runs itself and, on a statistics-cache hit, by the samples whose outputs the cache kept from a
    collection with the same session (:meth:`~qcompiler.calib.statcache.StatsCache.sample_outputs`); kept up to
    ``max_bytes``, in sample order; ``values``: sample index -> {graph output name: array} (not every index need be
    there). ``share``: the collection also keeps what it ran in the statistics cache for a later compile on the same
    graph and samples (the measured default's candidates, whose fit samples' outputs the final compile's validation
    takes)."""

    def __init__(self, limit: int, max_bytes: int, *, share: bool = False) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self.share = share
        self.values: dict[int, dict[str, Any]] = {}
        self.nbytes = 0
        self.full = False  # over max_bytes: what is kept stays, nothing more

    def put(self, i: int, outputs: dict[str, Any]) -> None:
        if self.full or i in self.values or not 0 <= i < self.limit:
            return
        n = sum(int(getattr(v, "nbytes", 0)) for v in outputs.values())
        if self.nbytes + n > self.max_bytes:
            self.full = True
            return
        self.values[i] = outputs
        self.nbytes += n
