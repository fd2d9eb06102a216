"""How many onnxruntime runs to keep in flight: one rule for calibration, the streaming passes and validation.

Each run is single-threaded work that releases the GIL; on a machine with two cores, two runs in flight keep both
busy without onnxruntime's intra-op thread pool synchronizing, and more would only add memory. An environment
variable overrides the count for one stage (``QCOMPILER_CALIB_WORKERS``, ``QCOMPILER_VALIDATE_WORKERS``).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_count(env: str, cap: int = 2) -> int:
    """``$env`` when it holds an integer (at least 1), else the usable CPUs, at most ``cap``."""
    raw = os.environ.get(env, "").strip()
    if raw:
        try:
            return max(1, int(raw))
        except ValueError:
            log.warning("%s=%r is not an integer; ignored", env, raw)
    return max(1, min(cap, usable_cpus()))
