"""Giving memory back: freeing the weights nothing reads any more, and returning freed heap to the system.

A memory-mapped weight is unmapped page by page (:func:`_advise_dontneed`), an in-memory one dropped; a graph
written to disk can release all of its weights at once (:func:`release_graph`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import mmap
import sys
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from qcompiler.ir.walk import all_constants


def _advise_dontneed(arr: Any) -> None:
    """Drop the resident pages of a memory-mapped array (they stay in the page cache, not in our RSS)."""
    base = arr
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    mm = getattr(base, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(ValueError, OSError):
            mm.madvise(mmap.MADV_DONTNEED)


def trim_memory() -> None:
    """Collect garbage (graphsurgeon graphs are node <-> tensor reference cycles) and give freed heap memory
    back to the operating system (glibc keeps freed arrays below its 32 MB mmap threshold otherwise)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim(0)


def release_graph(graph: gs.Graph, *, trim: bool = True) -> None:
    """Free the weights of a graph that is no longer needed (written to disk), even while some object (a pass
    keeping an index, say) still refers to it; then :func:`trim_memory` (unless ``trim`` is False: a full
    garbage collection costs tens of milliseconds, worth it only before memory-hungry work)."""
    for c in all_constants(graph):
        release_values(c)
    if trim:
        trim_memory()


def release_values(c: gs.Constant) -> None:
    """Free the values of a constant nothing reads any more (e.g. a float weight once its quantized form
    replaced it): a memory-mapped weight is unmapped, an in-memory one freed. The constant keeps its name
    and dtype, with an empty shape-(0,) array."""
    v = c._values
    dtype = v.dtype if not isinstance(v, LazyValues) else np.float32
    _advise_dontneed(v)
    try:
        c.values = np.zeros((0,), dtype=dtype)
    except TypeError:
        c.values = np.zeros((0,), dtype=np.float32)
