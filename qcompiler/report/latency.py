"""Latency in onnxruntime, the one measurement the measured default (``compile --max-latency-ratio``,
:mod:`qcompiler.recipe`) and the planner (``plan --max-latency-ratio``, :mod:`qcompiler.autoplan`) share: a model
run on a few feeds in one session with one thread, the best of :data:`LATENCY_REPEATS` timed passes after a
warm-up pass (which also gives the outputs). A latency *ratio* is a quantized model's seconds over the float
model's, both timed this way on the same feeds on the same machine."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qcompiler import ir
from qcompiler.core.errors import UserError

#: latency: the best of this many timed passes over the feeds
LATENCY_REPEATS = 3


def check_ratio(ratio: float | None) -> None:
    """``--max-latency-ratio`` (``compile`` and ``plan``): a ratio that is not a positive finite number is refused
    (one line)."""
    if ratio is not None and not (math.isfinite(ratio) and ratio > 0):
        raise UserError(f"--max-latency-ratio: {ratio:g} is not a positive number (a latency over the float "
                        "model's, e.g. 1.0: not slower than float)")


def run_timed(model: Path | Any, feeds: Sequence[dict[str, np.ndarray]],
              repeats: int = LATENCY_REPEATS) -> tuple[list[dict[str, np.ndarray]], float]:
    """The outputs of ``model`` on ``feeds`` and the best of ``repeats`` timed passes (seconds; ``inf`` with
    none)."""
    # loaded first: a session from the path cannot read small external tensors (a Reshape's shape) that the
    # loader resolves; without the load-time checks: the caller loaded (and checked) it already
    sess = ir.session(ir.load_model(model, check=False) if isinstance(model, (str, Path)) else model, threads=1)
    names = [o.name for o in sess.get_outputs()]
    outputs = [dict(zip(names, sess.run(names, f), strict=True)) for f in feeds]  # also the warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for f in feeds:
            sess.run(names, f)
        best = min(best, time.perf_counter() - t0)
    return outputs, best
