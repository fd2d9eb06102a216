"""Graph-output validation against float outputs computed once: for tools that measure many quantized versions
of one model on the same feeds (the measured default's candidates, :mod:`qcompiler.recipe.measure`).

:func:`float_reference` runs the float model on the feeds once, exactly as :func:`~qcompiler.report.validate.
validate` runs it (a plain session at full optimization, feeds adapted to its input types); :func:`compare`
then runs only the quantized model (:func:`validate_against`) and accumulates the same metrics in the same sample order. The report is
the one ``validate(float_model, quant_model, feeds, per_layer=False)`` gives — every output's SQNR, cosine,
errors, worst slice and top-k, number for number — without running the float model again.

Part of :mod:`qcompiler.report.validate`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qcompiler import ir
from qcompiler.calib.statcache import first_digest
from qcompiler.core import digest, profile
from qcompiler.core.errors import UserError
from qcompiler.report.validate.compare import (
    _check_stream,
    _output_accumulators,
    _output_metrics,
    session_threads,
    update_outputs,
    validation_workers,
)
from qcompiler.report.validate.layers import _graph_facts, _GraphFacts
from qcompiler.report.validate.result import ValidationReport
from qcompiler.report.validate.sessions import (
    ModelLike,
    _as_model,
    _float_runner,
    _label,
    _run_checked,
    _Runner,
    tensor_outputs,
)


@dataclass(frozen=True)
class StreamSpec:
    """Scoring a stream (``--stream IN=OUT`` in the measured default and the presets' guard): every model runs the
    whole of ``feeds`` in order, each fed its own previous ``OUT`` as ``IN`` from the second sample on, and is
    scored on its outputs at the places ``at`` only (the held-back samples: the state it carries there went
    through the samples before, the inputs there were not calibrated on)."""

    pairs: Mapping[str, str]
    #: the whole stream, in order (re-iterable: a calibration source reads it from disk again per model)
    feeds: Any
    at: tuple[int, ...]


@dataclass
class Reference:
    """The float model's graph outputs on ``feeds`` (one dict per sample, in the session's output order)."""

    feeds: list[dict[str, np.ndarray]]
    outputs: list[dict[str, np.ndarray]]
    output_types: dict[str, str]
    label: str
    #: node output -> op type of the float graph (what validate reads to spot class-score outputs)
    producers: dict[str, str] = field(default_factory=dict)
    #: the intra-op threads of the float session that ran them (:func:`session_threads`)
    threads: int = 0
    #: where ``feeds`` sit among a caller's samples (the measured default's held-back calibration samples), for
    #: :func:`known_outputs`; empty: unknown
    indices: tuple[int, ...] = ()
    #: :func:`feed_digest` of each feed (what :func:`known_outputs` compares, also once ``feeds`` are dropped)
    feed_digests: tuple[str, ...] = ()
    #: the outputs are the float model's at ``stream.at`` of a streamed run (:class:`StreamSpec`); a quantized
    #: model is then run the same way (:func:`validate_against`)
    stream: StreamSpec | None = None

    def handed(self, indices: Sequence[int]) -> Reference:
        """A copy for :func:`known_outputs` only: the outputs, the feeds' digests and their places ``indices``, not
        the feeds themselves (less to hold while the caller compiles on)."""
        return dataclasses.replace(self, feeds=[], indices=tuple(indices))

    @property
    def names(self) -> list[str]:
        return list(self.output_types)


def float_reference(float_model: ModelLike, feeds: Sequence[dict[str, np.ndarray]],
                    stream: StreamSpec | None = None) -> Reference:
    """Run ``float_model`` on ``feeds`` once, as :func:`validate` does (up to :func:`validation_workers` runs side by
    side, each session on :func:`session_threads` intra-op threads); a failing run raises :class:`UserError`
    (the first failing sample's, in sample order). With ``stream``: the outputs at ``stream.at`` of one streamed
    run over ``stream.feeds`` (``feeds``: the feeds at those places, for their digests)."""
    label = _label(float_model, "float model")
    fmodel = _as_model(float_model)
    feeds = list(feeds)
    if not feeds:
        raise UserError("validate: no samples to run (empty data)")
    workers = 1 if stream is not None else min(validation_workers(), len(feeds))
    threads = session_threads(workers)
    with profile.step("sessions"):
        runner = _float_runner(fmodel, label, threads=threads)
    names = tensor_outputs(runner.output_types, label)
    if stream is not None:
        _check_stream(stream.pairs, runner, runner, names)
        outputs = list(_streamed(runner, stream, names, "float", label))
    else:
        outputs = _run_all(runner, feeds, names, label, workers)
    producers = _graph_facts(fmodel).producers if ir.parameter_bytes(fmodel) < ir.NO_PREPACK_BYTES else {}
    return Reference(feeds=feeds, outputs=outputs, output_types={n: runner.output_types[n] for n in names}, label=label,
                     producers=producers, threads=threads, feed_digests=tuple(feed_digest(f) for f in feeds),
                     stream=stream)


def _run_all(runner: _Runner, feeds: list[dict[str, np.ndarray]], names: list[str], label: str,
             workers: int) -> list[dict[str, np.ndarray]]:
    jobs = [functools.partial(_run_checked, runner, f, i, names, "float", label) for i, f in enumerate(feeds)]
    if workers > 1:  # side by side on one intra-op thread each, as validate runs them; read in sample order
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qcompiler-validate") as pool:
            return list(pool.map(lambda job: job(), jobs))
    return [job() for job in jobs]


def known_outputs(ref: Reference | None, model: str | os.PathLike[str], feeds: Any) -> dict[int, dict[str, np.ndarray]]:
    """What :func:`validate`'s ``float_outputs`` can take from ``ref`` for ``feeds``: ``{i: ref.outputs[j]}`` for
    ``i = ref.indices[j]`` (``ref``'s samples at their places in ``feeds``: the measured default's held-back
    calibration samples among the compile's validation samples, the first 64 calibration samples) where ``feeds``
    (a list) holds at ``i`` the very feed ``ref`` ran (same names, dtypes, shapes and values), ``ref`` ran the
    file ``model`` and its float session had the intra-op threads :func:`validate` gives its own; else nothing
    (validate then runs the float model on every sample, as without)."""
    if ref is None or ref.stream is not None or not isinstance(feeds, list) or ref.label != str(model) or \
            ref.threads != session_threads(validation_workers()) or len(ref.indices) != len(ref.feed_digests):
        return {}
    return {i: ref.outputs[j] for j, i in enumerate(ref.indices)
            if i < len(feeds) and feed_digest(feeds[i]) == ref.feed_digests[j]}


def feed_digest(feed: Mapping[str, Any]) -> str:
    """A digest of one feed: its input names, and each array's :func:`~qcompiler.calib.statcache.first_digest`
    (dtype, shape and bytes)."""
    h = digest.hasher()
    for name in sorted(feed):
        h.update(f"{name}\0{first_digest(np.asarray(feed[name]))}\0".encode())
    return h.hexdigest()


def validate_against(ref: Reference, quant_model: ModelLike, *, optimize: bool | str = True,
                     slice_axes: Mapping[str, int] | None = None, label: str | None = None,
                     keep: list[dict[str, Any]] | None = None) -> ValidationReport:
    """The graph-output report of ``quant_model`` against ``ref`` (``validate(..., per_layer=False)``'s numbers,
    the float model not run). The quantized runs go to up to :func:`validation_workers` threads (each session on
    :func:`session_threads` intra-op threads, as in :func:`validate`); their results are accumulated in sample
    order. ``label`` names the quantized model in messages (default: its path).
    ``keep``: a list the quantized model's outputs of each sample are appended to, in sample order (for a caller
    that scores them otherwise too, without running the model again). Raises as :func:`validate` does."""
    qlabel = label or _label(quant_model, "quantized model")
    qmodel = _as_model(quant_model)
    workers = 1 if ref.stream is not None else min(validation_workers(), len(ref.feeds))
    with profile.step("sessions"):
        q_plain = _Runner(qmodel, optimize=optimize, threads=session_threads(workers))
    out_names = ref.names
    missing = [n for n in out_names if n not in q_plain.output_types]
    if missing:
        raise UserError(f"{qlabel}: lacks graph output(s) {', '.join(repr(n) for n in missing)} of {ref.label}")
    for n in slice_axes or {}:
        if n not in out_names:
            raise UserError(f"--slice-axis {n}=...: no graph output '{n}' (outputs: {', '.join(out_names)})")
    if ref.stream is not None:  # the quantized model's own stream, scored at the same places
        with profile.step("graph outputs"):
            return compare_outputs(ref, _streamed(q_plain, ref.stream, out_names, "quant", qlabel), label=qlabel,
                                   slice_axes=slice_axes, keep=keep)
    run = functools.partial(_quant_run, q_plain, out_names, qlabel)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers),
                                               thread_name_prefix="qcompiler-validate") as pool:
        results = pool.map(run, range(len(ref.feeds)), ref.feeds) if workers > 1 else map(
            run, range(len(ref.feeds)), ref.feeds)
        with profile.step("graph outputs"):
            return compare_outputs(ref, results, label=qlabel, slice_axes=slice_axes, keep=keep)


def compare_outputs(ref: Reference, quant_outputs: Iterable[dict[str, Any]], *, label: str = "quantized model",
                    slice_axes: Mapping[str, int] | None = None,
                    keep: list[dict[str, Any]] | None = None) -> ValidationReport:
    """The graph-output report of quantized outputs already computed (one dict per sample of ``ref``, in its
    order) against ``ref``: :func:`validate_against`'s numbers without running anything (a caller scoring a
    subset of samples it ran, ``ref`` cut to the same samples). ``keep``: as in :func:`validate_against`."""
    out_names = ref.names
    facts = _GraphFacts(producers=ref.producers, inputs=set(), outputs=[], float_known={})
    out_acc, slice_acc, extra_acc = _output_accumulators(None, facts, ref.outputs[0], out_names, slice_axes or {},
                                                         ())
    for fo, qo in zip(ref.outputs, quant_outputs, strict=True):
        if keep is not None:
            keep.append(qo)
        update_outputs(out_names, fo, qo, out_acc, slice_acc, extra_acc)
    outputs = _output_metrics(out_names, out_acc, slice_acc, extra_acc, label, ref.label)
    return ValidationReport(outputs=outputs, layers=[], samples=len(ref.outputs), min_sqnr_db=None, passed=True)


def _quant_run(runner: _Runner, names: list[str], label: str, idx: int,
               feed: dict[str, np.ndarray]) -> dict[str, Any]:
    return _run_checked(runner, feed, idx, names, "quant", label)


def _streamed(runner: _Runner, spec: StreamSpec, names: list[str], which: str,
              label: str) -> Iterator[dict[str, np.ndarray]]:
    """``runner``'s outputs at ``spec.at``, running ``spec.feeds`` in order as one stream (up to the last place)."""
    runner.start_stream(spec.pairs)
    at, last = set(spec.at), max(spec.at, default=-1)
    for i, feed in enumerate(spec.feeds):
        if i > last:
            break
        out = _run_checked(runner, feed, i, names, which, label)
        if i in at:
            yield out
