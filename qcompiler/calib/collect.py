"""Collecting activation statistics: the float graph run in onnxruntime over a calibration source.

:func:`collect` runs one sample per run (up to ``QCOMPILER_CALIB_WORKERS`` runs in flight on worker threads,
default: the usable CPUs, at most 2, each run on one intra-op thread), and returns the statistics of the
requested tensors, updated in sample order, so the result does not depend on the number of workers. The
library never prints; progress goes to a callback.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.calib.feeds import Feed, InputSig, input_signatures, session_feed
from qcompiler.calib.shared import FloatOutputs
from qcompiler.calib.sources import CalibrationSource
from qcompiler.calib.statcache import (
    OUTPUTS_MAX_BYTES,
    Hit,
    auto_parts,
    collection_base,
    first_digest,
    graph_base,
    stats_cache,
)
from qcompiler.calib.stats import TensorStats
from qcompiler.core import profile
from qcompiler.core.activations import ActivationCache, graph_key
from qcompiler.core.errors import UserError
from qcompiler.core.workers import worker_count
from qcompiler.ir import graph_session
from qcompiler.plan import QuantSpec

log = logging.getLogger("qcompiler.calib")  # the package's logger: messages read as they did before the split


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def collect(graph: gs.Graph, specs: dict[str, QuantSpec], source: CalibrationSource, *,
            progress: Callable[[int, int], None] | None = None,
            batch_tensors: int | None = None, workers: int | None = None,
            shapes: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None,
            cache: ActivationCache | None = None, outputs: FloatOutputs | None = None,
            for_auto: bool = False) -> dict[str, TensorStats]:
    """Statistics of the tensors named in ``specs`` over the feeds of ``source``.

    Runs ``graph`` (float) in onnxruntime with those tensors exposed as extra outputs, one sample at a time;
    graph inputs are read from the feed and constants from their values. ``batch_tensors`` splits the tensors
    into groups of that size, one session and one pass over the data per group (less memory, more time).
    ``progress(done, total)`` is called after each sample run, in sample order. ``workers`` onnxruntime runs
    are in flight at once (default :func:`calibration_workers`), each on one intra-op thread, while this thread
    reads the next feeds and updates the statistics; the updates are applied in sample order, so the result
    is the same for any ``workers`` (at most ``workers + 1`` samples' tensors are held). ``shapes``, when given,
    is filled with the (shape, dtype) of the graph inputs, the graph outputs and the collected tensors on the
    first sample (what the cost model can reuse instead of running the model again). ``cache``, when given,
    keeps each sample's collected tensors (up to its byte cap; real data and one group only) for the passes
    that stream the same samples through the same graph later. What it collects is also kept in the process's
    statistics cache (:mod:`qcompiler.calib.statcache`), and a collection of the same graph, tensors and
    samples is served from there (equal statistics, no run). ``for_auto``: a collection that misses that cache
    and has tensors collected without a histogram (``minmax``) collects histograms for every tensor instead, in
    the two parts a later ``calibration: auto`` over the same samples asks for (:func:`~qcompiler.calib.statcache.
    auto_parts`: the first ``N - h`` and the last ``h``), and keeps both parts and their exact merge in the
    statistics cache; it returns what it was asked for (``minmax`` tensors :meth:`~qcompiler.calib.stats.
    TensorStats.without_histogram`, equal field for field to a collection without one): the measured default's
    plain default plan candidate asks for it (``CompileOptions.collect_for_auto``), whose samples and tensors its
    ``calibration: auto`` candidate collects again. A feed onnxruntime rejects raises
    :class:`UserError` naming the sample; a tensor name that is not in the graph raises ``ValueError``.
    ``outputs``, when given, gets the graph outputs of the first samples (:class:`~qcompiler.calib.shared.
    FloatOutputs`: the compile's validation reference): of the samples this collection runs itself, and of the
    samples the statistics cache serves where it kept their outputs — every sample's when a ``for_auto``
    collection kept them for exactly these samples (calibration auto's held-out part: :meth:`~qcompiler.calib.
    statcache.StatsCache.keep_outputs`; that collection's session's values, for a caller that checks a sample
    against its own session), else sample by sample those a collection with this very session (same graph,
    inputs and tensors run: the same values, bit for bit) kept with ``outputs.share`` (:meth:`~qcompiler.calib.
    statcache.StatsCache.keep_sample_outputs`, matched by content id: this collection's sample ``i`` gets sample
    ``i``'s), or failing that another collection on the same graph kept (another session: the same function up to
    float rounding, which validation checks on one sample). With ``outputs.share`` the outputs of the samples this
    collection runs are kept there too.
    """
    tensors = graph.tensors()
    missing = [n for n in specs if n not in tensors]
    if missing:
        raise ValueError(f"collect: tensor '{missing[0]}' is not in the graph")
    stats = {name: TensorStats.for_spec(spec) for name, spec in specs.items()}
    if not specs:
        return stats
    sigs = input_signatures(graph)
    input_names = {s.name for s in sigs}
    run_names: list[str] = []
    for name in specs:
        t = tensors[name]
        if isinstance(t, gs.Constant):
            stats[name].update(np.asarray(t.values))
        elif name not in input_names:
            if not t.inputs:
                raise ValueError(f"collect: tensor '{name}' has no producer and is not a graph input")
            run_names.append(name)
    from_feed = [n for n in specs if n in input_names]
    if not run_names and not from_feed:
        return stats
    if batch_tensors is not None and batch_tensors <= 0:
        raise ValueError(f"batch_tensors must be positive, got {batch_tensors}")
    size = batch_tensors or max(len(run_names), 1)
    groups = [run_names[i:i + size] for i in range(0, len(run_names), size)] or [[]]
    n = len(source)
    total = n * len(groups)
    workers = calibration_workers() if workers is None else max(1, int(workers))
    keep = cache is not None and len(groups) == 1 and not source.synthetic and cache.max_bytes > 0
    scache = stats_cache()
    with profile.step("statistics cache key"):
        gkey = graph_key(graph) if keep or (scache.max_bytes > 0 and not source.synthetic) else None
        # the same graph and session over the same samples (or a part of them) already collected in this
        # process: another candidate plan of the measured default or the guard
        base = collection_base(gkey, sigs, run_names, size)
        ids = source.sample_ids() if base is not None else None
    key = gkey if keep else None
    wanted = {name: stats[name].has_histogram for name in [*run_names, *from_feed]}
    hit = scache.lookup(base, ids, wanted, shapes is not None, prefix=len(groups) == 1)
    gbase = graph_base(gkey, sigs)
    digests: dict[str, str] = {}
    sessions: dict[int, Any] = {}
    if hit is None and SERVE_SUBSETS and len(groups) == 1 and run_names and not for_auto:
        hit = _from_superset(graph, run_names, source, sigs, wanted, shapes, gbase, ids, sessions, digests)
        if hit is not None:  # kept under this collection's own key too (its next compile on all N: a part)
            scache.store(base, ids, hit.stats, {**hit.shapes} if shapes is not None else None, graph=gbase,
                         digests=digests)
    if hit is not None:
        stats.update(hit.stats)
        if shapes is not None:
            shapes.update(hit.shapes)
        if progress is not None:  # as the runs would have reported it
            for done in range(1, hit.covered * len(groups) + 1):
                progress(done, total)
        log.debug("calibration: %d tensor(s) over %d of %d sample(s) from the statistics cache", len(wanted),
                  hit.covered, n)
    # the graph outputs of the samples the cache serves, when a collection kept them: this collection's own
    # calibration auto part (exact ids), else sample by sample those of a collection with this very session (the
    # same values as its own runs), or failing that of another collection on this graph (validation checks them)
    found: dict[int, dict[str, np.ndarray]] = {}
    if outputs is not None and hit is not None:
        if hit.covered == n:
            found = dict(enumerate(scache.take_outputs(gbase, ids) or []))
        if not found:
            served = set(range(n)) - set(hit.rest)
            found = scache.sample_outputs(base, ids, [i for i in range(min(n, outputs.limit)) if i in served],
                                          graph=gbase)
    if hit is None and ids is not None and len(groups) == 1 and for_auto and \
            not all(wanted.values()) and len(auto_parts(n)) > 1:
        _collect_for_auto(graph, groups, from_feed, source, sigs, workers, stats, wanted, progress, shapes,
                          cache if key is not None else None, key, base, ids, gbase, outputs)
    elif hit is None or hit.covered < n:
        rest = source if hit is None else source.subset(hit.rest)
        got = {name: TensorStats.for_spec(specs[name]) for name in wanted}
        later = progress if hit is None or progress is None else (
            lambda done, _total: progress(hit.covered + done, total))
        # the rest's graph outputs from the same runs, at their places among this collection's samples
        ran = outputs if hit is None or outputs is None else FloatOutputs(
            sum(1 for i in hit.rest if i < outputs.limit), outputs.max_bytes)
        _run_groups(graph, groups, from_feed, rest, sigs, workers, got, later, len(rest) * len(groups),
                    shapes if hit is None else None, cache if key is not None else None, key, sessions,
                    digests if hit is None else None, ran)
        if hit is None:
            stats.update(got)
        else:
            for name in wanted:
                stats[name].merge(got[name])  # exact: the statistics of one pass over every sample
            if ran is not None:
                found.update({hit.rest[j]: v for j, v in ran.values.items()})
        if outputs is not None and outputs.share and ran is not None:
            scache.keep_sample_outputs(base, ids, ran.values if hit is None else
                                       {hit.rest[j]: v for j, v in ran.values.items()}, graph=gbase)
        scache.store(base, ids, {name: stats[name] for name in wanted}, shapes, graph=gbase if hit is None else None,
                     digests=digests)
    if outputs is not None:
        for i in sorted(found):  # in sample order, as one collection's runs would have given them
            outputs.put(i, found[i])
    _warn_nonfinite(stats)
    return stats


def outputs_from_cache(graph: gs.Graph, source: CalibrationSource, outputs: FloatOutputs) -> None:
    """Fill ``outputs`` with the graph outputs the statistics cache kept for ``source``'s samples from collections
    on ``graph`` (:meth:`~qcompiler.calib.statcache.StatsCache.sample_outputs` by graph: another session, the same
    function up to float rounding), for a calibration that runs nothing itself (no activation calibrated
    statically: a weight-only plan) whose compile validates on those samples."""
    scache = stats_cache()
    if source.synthetic or scache.max_bytes <= 0 or not scache.samples_nbytes:
        return
    with profile.step("statistics cache key"):
        gbase = graph_base(graph_key(graph), input_signatures(graph))
        ids = source.sample_ids()
    found = scache.sample_outputs(None, ids, range(min(len(source), outputs.limit)), graph=gbase)
    for i in sorted(found):
        outputs.put(i, found[i])


def _collect_for_auto(graph: gs.Graph, groups: list[list[str]], from_feed: list[str], source: CalibrationSource,
                      sigs: Sequence[InputSig], workers: int, stats: dict[str, TensorStats], wanted: dict[str, bool],
                      progress: Callable[[int, int], None] | None,
                      shapes: dict[str, tuple[tuple[int, ...], np.dtype]] | None, cache: ActivationCache | None,
                      key: str | None, base: str | None, ids: Sequence[str], gbase: str | None = None,
                      outputs: FloatOutputs | None = None) -> None:
    """:func:`collect` with ``for_auto``: histograms for every tensor of
    ``wanted``, collected over calibration auto's two parts of ``source`` (each kept in the statistics cache) and
    merged (exact: the statistics of one pass in order; kept too); ``stats`` gets what was asked for, ``outputs``
    the graph outputs of the first samples (kept in the statistics cache too when it says ``share``)."""
    scache = stats_cache()
    n = len(source)
    merged: dict[str, TensorStats] = {}
    first_shapes: dict[str, tuple[tuple[int, ...], np.dtype]] | None = {} if shapes is not None else None
    sessions: dict[int, Any] = {}  # one session for both parts: the same graph and outputs
    first: dict[str, str] = {}
    parts = auto_parts(n)
    for part in parts:
        got = {name: TensorStats(histogram=True) for name in wanted}
        later = None if progress is None else (lambda done, total, at=part.start: progress(at + done, n))
        digests: dict[str, str] = {}
        # the held-out part's graph outputs too (the same runs): calibration auto's float reference for its trials
        held = FloatOutputs(len(part), OUTPUTS_MAX_BYTES) if part is parts[-1] and len(parts) > 1 else None
        # the first samples' graph outputs for the compile's validation (and a later compile's), from the same runs
        mine = held if held is not None or outputs is None else FloatOutputs(
            max(0, min(len(part), outputs.limit - part.start)), outputs.max_bytes)
        _run_groups(graph, groups, from_feed, source.subset(part), sigs, workers, got, later, len(part),
                    first_shapes if part.start == 0 else None, cache, key, sessions, digests, mine)
        if held is not None and len(held.values) == len(part):
            scache.keep_outputs(gbase, [ids[i] for i in part], [held.values[i] for i in range(len(part))])
        if outputs is not None and mine is not None:
            placed = {part.start + j: v for j, v in sorted(mine.values.items()) if part.start + j < outputs.limit}
            for i, v in placed.items():
                outputs.put(i, v)
            if outputs.share:
                scache.keep_sample_outputs(base, ids, placed, graph=gbase)
        first = first or digests
        scache.store(base, [ids[i] for i in part], got, first_shapes if part.start == 0 else None, graph=gbase,
                     digests=digests)
        if not merged:
            merged = {name: st.copy() for name, st in got.items()}
        else:
            for name, st in got.items():
                merged[name].merge(st)
    scache.store(base, ids, merged, first_shapes, graph=gbase, digests=first)
    if shapes is not None and first_shapes is not None:
        shapes.update(first_shapes)
    stats.update({name: st if wanted[name] else st.without_histogram() for name, st in merged.items()})


def _from_superset(graph: gs.Graph, run_names: list[str], source: CalibrationSource, sigs: Sequence[InputSig],
                   wanted: dict[str, bool], shapes: dict[str, tuple[tuple[int, ...], np.dtype]] | None,
                   gbase: str | None, ids: Sequence[str] | None, sessions: dict[int, Any],
                   digests: dict[str, str]) -> Hit | None:
    """The statistics of ``wanted`` from a cached collection on the same graph, inputs and samples that ran more
    tensors (the measured default's plain default plan, whose tensors hold another candidate's), when this
    collection's own session gives, on the first sample, every tensor of ``run_names`` bit for bit as that
    collection's session did (digests): onnxruntime fuses by what a session exposes, so that is checked, not
    assumed. The session built for the check is left in ``sessions`` (the caller's collection uses it when the check
    fails); ``digests`` gets its first-sample digests."""
    sup = stats_cache().superset(gbase, ids, wanted, run_names, shapes is not None)
    if sup is None:
        return None
    with profile.step("statistics from a larger collection"):
        sess = sessions[0] = graph_session(graph, extra_outputs=run_names, threads=1)
        _, _, outs = next(_run_samples(sess, run_names, source.take(1), sigs, 1))
        assert outs is not None
        digests.update({name: first_digest(val) for name, val in zip(run_names, outs)})
        if any(digests[name] != sup.digests[name] for name in run_names):
            log.debug("calibration: a larger collection's first-sample values differ from this session's; collecting")
            return None
    keep = {s.name for s in sigs} | set(run_names) | {t.name for t in graph.outputs}
    log.debug("calibration: %d tensor(s) from a larger collection on the same graph and samples", len(wanted))
    return Hit(sup.stats, {k: v for k, v in sup.shapes.items() if k in keep}, sup.covered)


def _run_groups(graph: gs.Graph, groups: list[list[str]], from_feed: list[str], source: CalibrationSource,
                sigs: Sequence[InputSig], workers: int, stats: dict[str, TensorStats],
                progress: Callable[[int, int], None] | None, total: int,
                shapes: dict[str, tuple[tuple[int, ...], np.dtype]] | None, cache: ActivationCache | None,
                key: str | None, sessions: dict[int, Any] | None = None,
                digests: dict[str, str] | None = None, outputs: FloatOutputs | None = None) -> None:
    """The onnxruntime runs of :func:`collect`: every group of tensors over every sample of ``source``, into
    ``stats`` (and ``shapes``, ``cache``, ``outputs``, as :func:`collect` says). ``sessions``: group index -> its
    session, kept there for another call over the same graph and groups (built on first use). ``digests``: filled
    with the first group's tensors' :func:`~qcompiler.calib.statcache.first_digest` on the first sample."""
    done = 0
    for gi, group in enumerate(groups):
        # One intra-op thread per run (a sample per run, up to `workers` runs in flight): measured 1.3-2.3x faster
        # per sample than onnxruntime's default pool on the 2-core CI machines, which also fights numpy for cores.
        sess = (sessions or {}).get(gi)
        if sess is None and group:
            sess = graph_session(graph, extra_outputs=group, threads=1)
            if sessions is not None:
                sessions[gi] = sess
        extra = [t.name for t in graph.outputs if t.name not in group] if shapes is not None and gi == 0 else []
        # the graph outputs of the first samples, for validation (the same session: the same fusions, the same
        # values of the collected tensors)
        keep = outputs if outputs is not None and gi == 0 and sess is not None and graph.outputs else None
        out_names = [t.name for t in graph.outputs] if keep is not None else []
        every = [n for n in out_names if n not in group]
        until = min(keep.limit, len(source)) if keep is not None else 0
        for i, feed, outs in _run_samples(sess, group, source, sigs, workers, extra, every, until):
            if keep is not None and outs is not None and i < until:
                got = dict(zip([*group, *every], outs))
                # copies: a value onnxruntime returned may pin its memory arena's chunk while it is kept
                keep.put(i, {n: np.array(got[n], copy=True) for n in out_names})
                if shapes is not None and i == 0:
                    shapes.update({k: (tuple(v.shape), v.dtype) for k, v in got.items()})
                outs = outs[:len(group)]
            if gi == 0:
                for name in from_feed:
                    stats[name].update(feed[name])
            if shapes is not None and i == 0:
                if gi == 0:
                    shapes.update({k: (tuple(v.shape), v.dtype) for k, v in feed.items()})
                if outs is not None:
                    shapes.update({k: (tuple(v.shape), v.dtype) for k, v in zip([*group, *extra], outs)})
                    outs = outs[:len(group)]
            if outs is not None:
                if digests is not None and gi == 0 and i == 0:
                    digests.update({name: first_digest(val) for name, val in zip(group, outs)})
                for name, val in zip(group, outs):
                    stats[name].update(val)
                if key is not None and cache is not None:
                    cache.store(key, source.label(i), dict(zip(group, outs)))
                del outs
            done += 1
            if progress is not None:
                progress(done, total)


def _warn_nonfinite(stats: dict[str, TensorStats]) -> None:
    for name, st in stats.items():
        if st.nonfinite:
            log.warning("calibration: tensor '%s' produced %d NaN/Inf values (ignored in its range)", name,
                        st.nonfinite)


#: serve a collection from a cached one on the same graph and samples that ran more tensors, after checking its
#: first sample (:func:`_from_superset`); False: collect (the statistics are the same either way)
SERVE_SUBSETS = True

#: environment variable overriding the number of concurrent calibration runs (1: strictly sequential)
WORKERS_ENV = "QCOMPILER_CALIB_WORKERS"


def calibration_workers() -> int:
    """Concurrent onnxruntime runs during calibration: ``$QCOMPILER_CALIB_WORKERS`` when set, else the CPUs this
    process may use, at most 2 (on 2 cores two single-threaded runs keep both busy without the thread pool's
    synchronization; more would only add memory)."""
    return worker_count(WORKERS_ENV)


def _run_samples(sess: Any, group: list[str], source: CalibrationSource, sigs: Sequence[InputSig],
                 workers: int, first_extra: Sequence[str] = (), extra: Sequence[str] = (),
                 extra_until: int = 0) -> Iterator[tuple[int, Feed, list[np.ndarray] | None]]:
    """(index, feed, outputs of ``group``) for every sample of ``source``, in order (the first sample also
    fetches ``first_extra``, after those of ``group``); with ``workers`` > 1 the runs of the next samples
    proceed on worker threads (onnxruntime releases the GIL) while the caller consumes this one. ``sess``
    None: no run (outputs None). A run that fails raises :class:`UserError` naming its sample."""
    if sess is None:
        for i, feed in enumerate(source):
            yield i, feed, None
        return
    want = {inp.name: inp.type for inp in sess.get_inputs()}

    def run(i: int, feed: Feed) -> list[np.ndarray]:
        try:
            names = [*group, *extra] if i < extra_until else [*group, *first_extra] if i == 0 else group
            return list(sess.run(names, session_feed(feed, sigs, want)))
        except Exception as e:  # onnxruntime raises its own exception types
            raise UserError(f"{source.label(i)}: onnxruntime failed on this calibration sample: "
                            f"{_one_line(e)}") from None

    if workers <= 1:
        for i, feed in enumerate(source):
            yield i, feed, run(i, feed)
        return
    pending: collections.deque[tuple[int, Feed, concurrent.futures.Future[list[np.ndarray]]]] = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qcompiler-calib") as pool:
        feeds = enumerate(source)
        try:
            while True:
                try:
                    i, feed = next(feeds)
                except StopIteration:
                    break
                except BaseException:  # a bad feed: the samples before it come (and fail) first, as in order
                    while pending:
                        j, f, fut = pending.popleft()
                        yield j, f, fut.result()
                    raise
                pending.append((i, feed, pool.submit(run, i, feed)))
                if len(pending) > workers:
                    j, f, fut = pending.popleft()
                    yield j, f, fut.result()
            while pending:
                j, f, fut = pending.popleft()
                yield j, f, fut.result()
        finally:
            for _, _, fut in pending:
                fut.cancel()
            pending.clear()
