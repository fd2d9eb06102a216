"""Calibration data and activation statistics.

The package, one module per job:

* :mod:`~qcompiler.calib.feeds`: graph input signatures and the checks every feed passes (names, rank, fixed
  and symbolic dims, dtype, NaN/Inf; safe casts), and :func:`session_feed` for onnxruntime.
* :mod:`~qcompiler.calib.sources`: :class:`CalibrationSource`, where calibration feeds come from (``--calib``):
  a folder of ``.npz`` files, one ``.npz`` with a leading sample axis (streamed), ``random`` (synthetic,
  seeded), or feeds in memory; :mod:`~qcompiler.calib.npz` reads the ``.npz`` files.
* :mod:`~qcompiler.calib.stats`: :class:`TensorStats`, streaming statistics of one tensor (min/max and a
  mergeable histogram) and :meth:`TensorStats.range`, the (lo, hi) for a :class:`QuantSpec` (``minmax``,
  ``percentile``, ``entropy`` or ``mse``).
* :mod:`~qcompiler.calib.collect`: :func:`collect`, the float graph run in onnxruntime over a source (worker
  threads, results in sample order) into the statistics of the requested tensors.
* :mod:`~qcompiler.calib.statcache`: the process-level cache of collected statistics that lets candidate
  compiles of one model (``--plan auto``, the algorithm guard) share a collection (:func:`stats_cache`).
* :mod:`~qcompiler.calib.dataflow`: data-free ranges (``--calib none``) from the BatchNormalization statistics
  that ``fold-batchnorm`` records (:class:`ChannelStats`, :func:`bn_statistics`, :func:`bn_ranges`).

This module re-exports the public names of its modules (``from qcompiler.calib import CalibrationSource``).
"""

from __future__ import annotations

from qcompiler.calib.collect import WORKERS_ENV, calibration_workers, collect, outputs_from_cache
from qcompiler.calib.dataflow import BN_SIGMAS, ChannelStats, bn_ranges, bn_statistics
from qcompiler.calib.feeds import Feed, InputSig, check_feed, input_signatures, session_feed
from qcompiler.calib.shared import FloatOutputs
from qcompiler.calib.sources import (
    HELD_BACK_MAX,
    RANDOM_INT_HIGH,
    RANDOM_MAX_ELEMENTS,
    RANDOM_SPATIAL,
    CalibrationSource,
    held_back_indices,
    random_shape,
    random_source,
    spread_indices,
)
from qcompiler.calib.statcache import (
    AUTO_HELD_SAMPLES,
    OUTPUTS_MAX_BYTES,
    StatsCache,
    first_digest,
    reset_stats_cache,
    stats_cache,
)
from qcompiler.calib.stats import HIST_BINS, TensorStats, needs_histogram

__all__ = [
    "AUTO_HELD_SAMPLES",
    "BN_SIGMAS",
    "HELD_BACK_MAX",
    "HIST_BINS",
    "OUTPUTS_MAX_BYTES",
    "RANDOM_INT_HIGH",
    "RANDOM_MAX_ELEMENTS",
    "RANDOM_SPATIAL",
    "WORKERS_ENV",
    "CalibrationSource",
    "ChannelStats",
    "Feed",
    "FloatOutputs",
    "InputSig",
    "StatsCache",
    "TensorStats",
    "bn_ranges",
    "bn_statistics",
    "calibration_workers",
    "check_feed",
    "collect",
    "first_digest",
    "held_back_indices",
    "input_signatures",
    "needs_histogram",
    "outputs_from_cache",
    "random_shape",
    "random_source",
    "reset_stats_cache",
    "session_feed",
    "spread_indices",
    "stats_cache",
]
