"""Content digests for the process caches' keys (statistics, Hessians, probe results, loaded models).

Digests here only key in-memory caches within one process: nothing written to a file depends on them. SHA-256
(the CPU's SHA extensions through OpenSSL) hashes about 1.5x faster than BLAKE2b on this project's machines
(benchmarks/RESULTS.md, session 15): a 97 MB model's constants or a 76 MB calibration folder are hashed several
times per measured-default compile. Arrays are hashed through the buffer protocol (no copy)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from qcompiler.core.numbers import c_contiguous


def hasher() -> Any:
    """A new incremental digest (``update`` / ``hexdigest``)."""
    return hashlib.sha256()


def of_bytes(data: bytes | memoryview) -> bytes:
    """The digest of ``data``."""
    return hashlib.sha256(data).digest()


def update_array(h: Any, a: np.ndarray) -> None:
    """Feed ``a``'s dtype, shape and values to ``h`` (a C-contiguous view of the values, not a copy; object
    arrays by their ``repr``)."""
    v = c_contiguous(a)
    h.update(f"{v.dtype.str}{v.shape}".encode())
    if v.dtype == object:
        h.update(repr(v.tolist()).encode())
    elif v.size:
        h.update(v.reshape(-1).view(np.uint8))
