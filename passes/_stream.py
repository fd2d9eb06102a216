"""Streaming over calibration data for the PTQ algorithm passes (one sample in memory at a time).

:func:`stream` runs a graph in onnxruntime over a :class:`~qcompiler.calib.CalibrationSource` with some
intermediate tensors exposed and hands each sample's values to a callback, which folds them into running
statistics (per-channel maxima, sums, XᵀX, ...). Nothing is kept per sample, so memory does not grow with
the number of samples. :func:`source_for` picks the data a pass works on: the real calibration data, or
``None`` (with a warning: the pass then skips its data-driven work) when there is none or it is synthetic.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler import ir
from qcompiler.calib import CalibrationSource, calibration_workers, input_signatures
from qcompiler.core import profile
from qcompiler.core.activations import ActivationCache, graph_key
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.workers import usable_cpus

log = logging.getLogger(__name__)

def source_for(ctx: CompileContext, pass_name: str, samples: int | None = None) -> CalibrationSource | None:
    """The real calibration data (at most ``samples``); ``None`` and a warning when there is none (no ``--calib``,
    ``--calib none``) or it is synthetic (``--calib random``): statistics of random inputs would mislead."""
    if ctx.calib is not None and not ctx.calib.synthetic:
        return ctx.calib.take(samples)
    log.warning("%s: no real calibration data (give --calib DATA); its data-driven step is skipped", pass_name)
    return None


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS on one thread inside the block: its sums then do not depend on the machine's core count
    (OpenBLAS splits a product's reduction differently per thread count, which changes the float32 rounding),
    and callers parallelize over independent products themselves (:func:`layer_threads`). Without
    ``threadpoolctl`` the BLAS keeps its own threads."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency; keep working without it
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def layer_threads(n: int) -> int:
    """Worker threads for ``n`` independent per-layer products: one per core, at most ``n``."""
    return max(1, min(n, usable_cpus()))


#: passes that read ``ctx.activations`` (streaming the calibration samples through the float graph ``calibrate``
#: ran) and release it when done; calibrate keeps activations only when one of them follows
STREAMING_PASSES = frozenset({"gptq"})


def activation_cache_for(ctx: CompileContext) -> ActivationCache | None:
    """``ctx.activations`` when a pass that streams the same samples runs later, else ``None`` (nothing kept)."""
    return ctx.activations if STREAMING_PASSES.intersection(ctx.passes_after) else None


def release_activations(ctx: CompileContext) -> None:
    """Free the cached activations once no pass left would read them."""
    if not STREAMING_PASSES.intersection(ctx.passes_after):
        ctx.activations.clear()


def axis_max(x: np.ndarray, axis: int) -> np.ndarray:
    """max |x| per index of ``axis`` (float64)."""
    a = np.moveaxis(np.abs(np.asarray(x)), axis, 0)
    return a.reshape(a.shape[0], -1).max(axis=1).astype(np.float64)


def axis_mean(x: np.ndarray, axis: int) -> tuple[np.ndarray, int]:
    """(sum per index of ``axis`` as float64, number of elements summed per index)."""
    a = np.moveaxis(np.asarray(x), axis, 0)
    flat = a.reshape(a.shape[0], -1)
    return flat.sum(axis=1, dtype=np.float64), int(flat.shape[1])


def progress_of(ctx: CompileContext, stage: str) -> Callable[[int, int], None] | None:
    """``progress(done, total)`` reporting to ``ctx.progress`` as ``stage`` (None when nobody listens)."""
    report = ctx.progress
    if report is None:
        return None
    return lambda done, total: report(stage, done, total)


def stream(graph: gs.Graph, names: Sequence[str], source: CalibrationSource,
           consume: Callable[[dict[str, np.ndarray]], None], *, optimize: bool = True,
           progress: Callable[[int, int], None] | None = None, workers: int | None = None,
           cache: ActivationCache | None = None) -> int:
    """Run ``graph`` on every feed of ``source`` exposing tensors ``names``; call ``consume({name: value})`` per
    sample, in sample order, then ``progress(done, len(source))``. Graph inputs among ``names`` come from the
    feed. Returns the number of samples.

    As calibration does (:func:`qcompiler.calib.calibration_workers`): up to ``workers`` runs in flight on
    worker threads, each session run on one intra-op thread, while ``consume`` folds the previous sample in —
    the values and their order are the same for any ``workers``; at most ``workers + 1`` samples are held.

    ``cache``: samples whose tensors it holds for this very graph (calibration's runs) are not run again; the
    session is made only when a sample misses."""
    inputs = {s.name for s in input_signatures(graph)}
    run_names = [n for n in dict.fromkeys(names) if n not in inputs]
    workers = calibration_workers() if workers is None else max(1, int(workers))
    key = graph_key(graph) if cache is not None and run_names and cache.max_bytes > 0 else None
    sess: Any = None
    want: set[str] = set()

    def session() -> Any:
        nonlocal sess, want
        if sess is None:
            sess = ir.graph_session(graph, extra_outputs=run_names, optimize=optimize, threads=1)
            want = {i.name for i in sess.get_inputs()}
        return sess

    hits = [0]

    def cached(i: int) -> Future[list[np.ndarray]] | None:
        hit = cache.lookup(key, source.label(i), run_names) if cache is not None and key is not None else None
        if hit is None:
            return None
        hits[0] += 1
        done: Future[list[np.ndarray]] = Future()
        done.set_result([hit[n] for n in run_names])
        return done

    def run(i: int, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return list(sess.run(run_names, {k: v for k, v in feed.items() if k in want}))
        except Exception as e:  # onnxruntime raises its own exception types
            raise UserError(f"{source.label(i)}: onnxruntime failed on this calibration sample: "
                            f"{' '.join(str(e).split())[:300]}") from None

    n = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qcompiler-stream") as pool:
        pending: collections.deque[tuple[dict[str, np.ndarray], Future[list[np.ndarray]] | None]] = \
            collections.deque()

        def fold(feed: dict[str, np.ndarray], fut: Future[list[np.ndarray]] | None) -> None:
            nonlocal n
            values: dict[str, np.ndarray] = {k: feed[k] for k in names if k in inputs}
            if fut is not None:
                with profile.step("onnxruntime runs"):  # the wait for this sample's run
                    values.update(zip(run_names, fut.result()))
            with profile.step("statistics"):
                consume(values)
            n += 1
            if progress is not None:
                progress(n, max(len(source), n))

        try:
            for i, feed in enumerate(source):
                fut = None
                if run_names:
                    fut = cached(i)
                    if fut is None:
                        session()
                        fut = pool.submit(run, i, feed)
                pending.append((feed, fut))
                if len(pending) > workers:
                    fold(*pending.popleft())
            while pending:
                fold(*pending.popleft())
        finally:
            for _, fut in pending:
                if fut is not None:
                    fut.cancel()
    if key is not None:
        log.debug("stream: %d of %d samples from the activation cache", hits[0], n)
    return n
