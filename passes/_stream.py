"""Streaming over calibration data for the PTQ algorithm passes (one sample in memory at a time).

:func:`stream` runs a graph in onnxruntime over a :class:`~qcompiler.calibration.CalibrationSource` with some
intermediate tensors exposed and hands each sample's values to a callback, which folds them into running
statistics (per-channel maxima, sums, XᵀX, ...). Nothing is kept per sample, so memory does not grow with
the number of samples. :func:`source_for` picks the data a pass works on: the calibration data, or seeded
random inputs (with a warning) when there is none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler import ir
from qcompiler.calibration import CalibrationSource, input_signatures
from qcompiler.context import CompileContext
from qcompiler.errors import UserError

log = logging.getLogger(__name__)

#: random samples used by a data-hungry pass when there is no calibration data
RANDOM_SAMPLES = 16


def source_for(ctx: CompileContext, pass_name: str, samples: int | None = None) -> CalibrationSource:
    """The calibration data (at most ``samples``), else seeded random inputs and a warning."""
    if ctx.calib is not None:
        return ctx.calib.take(samples)
    n = samples or RANDOM_SAMPLES
    log.warning("%s: no calibration data; using %d random samples (statistics are synthetic)", pass_name, n)
    return CalibrationSource.from_arg("random", input_signatures(ctx.graph), seed=ctx.seed, num_random=n)


def axis_max(x: np.ndarray, axis: int) -> np.ndarray:
    """max |x| per index of ``axis`` (float64)."""
    a = np.moveaxis(np.abs(np.asarray(x)), axis, 0)
    return a.reshape(a.shape[0], -1).max(axis=1).astype(np.float64)


def axis_mean(x: np.ndarray, axis: int) -> tuple[np.ndarray, int]:
    """(sum per index of ``axis`` as float64, number of elements summed per index)."""
    a = np.moveaxis(np.asarray(x), axis, 0)
    flat = a.reshape(a.shape[0], -1)
    return flat.sum(axis=1, dtype=np.float64), int(flat.shape[1])


def stream(graph: gs.Graph, names: Sequence[str], source: CalibrationSource,
           consume: Callable[[dict[str, np.ndarray]], None], *, optimize: bool = True) -> int:
    """Run ``graph`` on every feed of ``source`` exposing tensors ``names``; call ``consume({name: value})`` per
    sample. Graph inputs among ``names`` come from the feed. Returns the number of samples."""
    inputs = {s.name for s in input_signatures(graph)}
    run_names = [n for n in dict.fromkeys(names) if n not in inputs]
    sess = ir.graph_session(graph, extra_outputs=run_names, optimize=optimize) if run_names else None
    want = {i.name for i in sess.get_inputs()} if sess is not None else set()
    n = 0
    for i, feed in enumerate(source):
        values: dict[str, np.ndarray] = {k: feed[k] for k in names if k in inputs}
        if sess is not None:
            try:
                outs = sess.run(run_names, {k: v for k, v in feed.items() if k in want})
            except Exception as e:  # onnxruntime raises its own exception types
                raise UserError(f"{source.label(i)}: onnxruntime failed on this calibration sample: "
                                f"{' '.join(str(e).split())[:300]}") from None
            values.update(zip(run_names, outs))
        consume(values)
        n += 1
    return n
