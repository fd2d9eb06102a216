"""The comparison itself: :func:`validate` runs the float and the quantized model on the same feeds and
accumulates the error of every graph output and every common layer tensor.

Part of :mod:`qcompiler.report.validate` (whose docstring defines the metrics).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from typing import Any

import numpy as np

from qcompiler import ir
from qcompiler.core import profile
from qcompiler.core.errors import UserError
from qcompiler.core.workers import usable_cpus, worker_count
from qcompiler.plan.checks import Check
from qcompiler.report.validate.layers import (
    _graph_facts,
    _GraphFacts,
    _layer_candidates,
    _working_subset,
    rescaled_layers,
)
from qcompiler.report.validate.metrics import Workspace, _Accumulator, _sort_key, top1_rank
from qcompiler.report.validate.pipeline import Job, Pipeline, Results, layer_lookahead, lookahead, nbytes
from qcompiler.report.validate.result import LayerInfo, ValidationReport, _fmt_db
from qcompiler.report.validate.sessions import (
    _FLOAT_ORT_TYPES,
    ModelLike,
    _as_model,
    _first_line,
    _float_runner,
    _label,
    _run_checked,
    _Runner,
    _try_runner,
    tensor_outputs,
)
from qcompiler.report.validate.slices import (
    MASK_LEVEL,
    SCORE_OPS,
    CheckResult,
    _CheckAccumulator,
    _MaskAccumulator,
    _SliceAccumulator,
    _TopKAccumulator,
    default_slice_axis,
    looks_like_probabilities,
)

log = logging.getLogger(__name__)


def validate(
    float_model: ModelLike,
    quant_model: ModelLike,
    feeds: Iterable[dict[str, np.ndarray]],
    *,
    per_layer: bool = True,
    min_sqnr_db: float | None = None,
    layer_names: Sequence[str] | None = None,
    optimize: bool | str = True,
    layer_samples: int | None = None,
    names: Mapping[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    checks: Sequence[Check] = (),
    slice_axes: Mapping[str, int] | None = None,
    layer_bytes: int | None = None,
    float_outputs: Mapping[int, Mapping[str, np.ndarray]] | None = None,
    calib_outputs: Mapping[int, Mapping[str, np.ndarray]] | None = None,
    stream: Mapping[str, str] | None = None,
    float_label: str | None = None,
) -> ValidationReport:
    """Run both models on ``feeds`` and measure the quantized one against the float one.

    ``float_model`` / ``quant_model``: a path or an ``onnx.ModelProto``. ``feeds``: any iterable of
    ``{input name: array}`` (consumed once, one sample at a time). ``layer_names`` limits the per-layer
    comparison to those tensors; ``layer_samples`` limits it to the first N samples (the outputs still use all
    of them), and ``layer_bytes`` to as many first samples as fit their exposed tensors (float + quantized, as
    measured on sample 0) into that many bytes, at least one (a large model's layers: the ViT's 659 take
    0.7 GiB a sample). ``names``: quantized-model tensor name -> float-model name, for a model whose names
    ``compact-names`` shortened (its ``OUT.names.json`` ``tensors``); layers are compared and reported by the
    float names. ``optimize`` is the onnxruntime optimization level of the quantized model's
    output run: True (full, what an onnxruntime deployment runs) or "basic" (a reference run for a graph meant
    for another runtime, free of onnxruntime's fusions). Raises :class:`UserError` for bad feeds or models whose outputs do not
    match; :class:`RuntimeError` when only the quantized model fails to run. ``progress(done, total)`` is
    called after each sample (``total``: ``len(feeds)`` when it has one, else 0).

    Every float graph output also gets its worst slice along its channel / feature axis (``slice_axes``: output
    name -> axis, overriding :func:`~qcompiler.report.validate.slices.default_slice_axis`) and, for class-score
    outputs, top-k agreement. ``checks``: thresholds on named output slices (``--check``, the plan's
    ``checks:``); ``passed`` needs every check met and, with ``min_sqnr_db``, every output's whole-tensor and
    worst-slice SQNR at least ``min_sqnr_db``.

    ``float_label``: how errors name the float model (default: its path, or "float model" for a ModelProto).

    ``float_outputs``: sample index -> the float model's graph outputs on that sample, as this call would compute
    them (the same model, session settings and feed: :func:`~qcompiler.report.validate.reference.known_outputs`
    of a :func:`~qcompiler.report.validate.reference.float_reference` run earlier); those samples' float output
    runs are not made again (their per-layer runs are). The report is the same number for number.
    ``calib_outputs``: sample index -> the float graph outputs already computed on that sample by the compile's
    calibration runs (:class:`~qcompiler.calib.shared.FloatOutputs`: the same graph after constant and
    BatchNormalization folding). They are checked on one sample: the first that ``float_outputs`` has too (the
    measured default's held-back samples: no float run for the check), else sample 0, which the float model runs;
    when the given outputs there equal the float model's within :data:`REUSE_RTOL` of each output's largest
    magnitude (float rounding of an equivalent graph), they stand in for the float model's run on the samples they
    cover that ``float_outputs`` does not (``report.float_from_calibration`` counts them); else every sample runs as
    without them.

    ``stream``: ``{input: graph output}`` — the samples are one stream, in order: from the second on, each model's
    ``input`` is its own ``output`` of the sample before (a recurrent state), not the feed's; runs are sequential and
    ``float_outputs`` / ``calib_outputs`` are not used (every float output is the float model's streamed run).
    """
    flabel = float_label or _label(float_model, "float model")
    qlabel = _label(quant_model, "quantized model")
    fmodel = _as_model(float_model)
    qmodel = _as_model(quant_model)
    if names and per_layer:
        qmodel = ir.renamed_tensors(qmodel, dict(names))

    workers = 1 if stream else validation_workers()  # a stream runs its samples strictly in order
    if stream:  # every float output is the float model's own streamed run: nothing computed elsewhere stands in
        float_outputs = calib_outputs = None
    threads = session_threads(workers)
    with profile.step("sessions"):
        f_plain = _float_runner(fmodel, flabel, threads=threads)
        q_plain = _Runner(qmodel, optimize=optimize, threads=threads)
    out_names = tensor_outputs(f_plain.output_types, flabel)
    if stream:
        _check_stream(stream, f_plain, q_plain, out_names)
        f_plain.start_stream(stream)
        q_plain.start_stream(stream)
    missing = [n for n in out_names if n not in q_plain.output_types]
    if missing:
        raise UserError(f"{qlabel}: lacks graph output(s) {', '.join(repr(n) for n in missing)} "
                        f"of {flabel}")
    for c in checks:
        if c.output not in out_names:
            raise UserError(f"{c.where}: no graph output '{c.output}' (outputs: {', '.join(out_names)})")
    for n in slice_axes or {}:
        if n not in out_names:
            raise UserError(f"--slice-axis {n}=...: no graph output '{n}' (outputs: {', '.join(out_names)})")
    extra_q = [n for n in q_plain.output_types if n not in f_plain.output_types]
    if extra_q:
        log.warning("validate: %s has extra output(s) not compared: %s", qlabel, ", ".join(extra_q))

    total = len(feeds) if isinstance(feeds, Sized) else 0
    it = iter(feeds)
    first = next(it, None)
    if first is None:
        raise UserError("validate: no samples to run (empty data)")

    layers: list[str] = []
    rearranged: dict[str, str] = {}
    skipped: list[str] = []
    ff: _GraphFacts | None = None
    qf: _GraphFacts | None = None
    f_ext: _Runner | None = None
    q_ext: _Runner | None = None
    samples = 0
    ws = Workspace()  # float64 scratch buffers, one set per thread, dropped with this call

    given: Mapping[int, Mapping[str, np.ndarray]] = {}  # calib_outputs, once sample 0 showed them equivalent
    reused = [0]
    known = {i: dict(o) for i, o in (float_outputs or {}).items() if all(n in o for n in out_names)}
    # calib_outputs are checked against the float model's outputs on one sample: one whose float outputs are known
    # (the measured default's held-back samples) when they cover one — no float run for it —, else sample 0, below
    checked = next((i for i in sorted(known) if calib_outputs and i in calib_outputs), None)
    if checked is not None and calib_outputs and _equivalent(calib_outputs[checked], known[checked], out_names):
        given = calib_outputs

    def float_job(idx: int, feed: dict[str, np.ndarray]) -> Job:
        if idx in known:  # computed already by the caller (the same model, settings and feed): not run again
            return functools.partial(known.pop, idx)
        if idx in given:  # calibration's run of an equivalent graph (sample 0 checked)
            reused[0] += 1
            return functools.partial(_given, given[idx], out_names)
        return functools.partial(_run_checked, f_plain, feed, idx, out_names, "float", flabel)

    def output_jobs(idx: int, feed: dict[str, np.ndarray]) -> list[Job]:
        if idx == 0:  # run before the others, to check the plain sessions run at all
            return []
        return [float_job(idx, feed), functools.partial(_run_checked, q_plain, feed, idx, out_names, "quant", qlabel)]

    def layer_jobs(idx: int, feed: dict[str, np.ndarray]) -> list[Job] | None:
        if f_ext is None or q_ext is None or (layer_samples is not None and idx >= layer_samples):
            return None
        if idx == 0:  # the exposing sessions ran sample 0 when they were tried: their outputs are kept
            return [f_ext.take_first(layers), q_ext.take_first(layers)]
        return [functools.partial(f_ext.run, feed, idx, layers), functools.partial(q_ext.run, feed, idx, layers)]

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qcompiler-validate") \
        if workers > 1 else None
    try:
        # Check the plain sessions run at all before blaming any exposed tensor (float first, then quantized).
        firsts = Results([float_job(0, first),
                          functools.partial(_run_checked, q_plain, first, 0, out_names, "quant", qlabel)], pool)
        if per_layer:
            ff, qf = _graph_facts(fmodel), _graph_facts(qmodel)
            # layer_samples=0: no sample is compared per layer, so no layer is listed (and no exposing session)
            layers = _layer_candidates(ff, qf, layer_names, rearranged) if layer_samples is None or \
                layer_samples > 0 else []
        f_first, q_first = firsts.get(0), firsts.get(1)
        del firsts
        if checked is None and calib_outputs and _equivalent(calib_outputs.get(0), f_first, out_names):
            given = calib_outputs
        # The next samples' output runs start now, while the per-layer sessions are built; then one sample
        # runs ahead of the one measured while per-layer runs go on, more for outputs of a few MiB.
        ahead = 0 if pool is None else lookahead(f_first, q_first)
        pipe = Pipeline(pool, first, it, output_jobs, layer_jobs)
        pipe.fill(ahead)
        with profile.step("per-layer sessions"):
            layers, f_ext, q_ext = _layer_runners(fmodel, qmodel, layers, first, skipped, threads)
        if f_ext is not None and q_ext is not None:  # the plain runners' streams: their inputs per sample
            f_ext.stream, q_ext.stream = f_plain.stream, q_plain.stream
        del first
        layer_ahead = 0
        if f_ext is not None and q_ext is not None:
            layer_ahead = layer_lookahead(ahead, f_ext.first, q_ext.first)
            if layer_bytes is not None:
                layer_samples = bounded_layer_samples(layer_samples, layer_bytes, nbytes(f_ext.first, q_ext.first))

        out_acc, slice_acc, extra_acc = _output_accumulators(fmodel, ff, f_first, out_names, slice_axes or {},
                                                             checks)
        check_acc = [_CheckAccumulator(c) for c in checks]
        producers = ff.producers if ff is not None else {}
        layer_acc = {n: _Accumulator(n, top1_rank(producers.get(n), False)) for n in layers}
        while True:
            layers_next = f_ext is not None and (layer_samples is None or samples + 1 < layer_samples)
            cur = pipe.next(layer_ahead if layers_next else ahead)
            if cur is None:
                break
            idx = cur.idx
            assert cur.outputs is not None
            with profile.step("graph outputs"):
                fo, qo = (f_first, q_first) if idx == 0 else (cur.outputs.get(0), cur.outputs.get(1))
            fl = ql = None
            if cur.layers is not None and f_ext is not None:
                with profile.step("layers"):
                    try:
                        fl, ql = cur.layers.get(0), cur.layers.get(1)
                    except UserError:
                        raise
                    except Exception as e:
                        log.warning("validate: per-layer run failed on sample %d (%s); per-layer metrics dropped",
                                    idx, _first_line(e))
                        skipped += layers
                        layers, layer_acc, f_ext, q_ext = [], {}, None, None
            # the layers' sums accumulate on the pool while this thread does the outputs'; each accumulator
            # still takes its samples in order (this sample's updates end before the next sample's begin)
            chunks = _update_layers(pool, workers, ws, layer_acc, layers, fl, ql) \
                if fl is not None and ql is not None else []
            with profile.step("graph outputs"):
                update_outputs(out_names, fo, qo, out_acc, slice_acc, extra_acc, ws)
                for ca in check_acc:
                    ca.update(fo[ca.check.output], qo[ca.check.output])
                del fo, qo
            if chunks:
                with profile.step("layers"):
                    for chunk in chunks:
                        chunk.result()
            del cur, fl, ql, chunks
            samples += 1
            if progress is not None:
                progress(samples, max(total, samples))
            if samples % 100 == 0:
                log.info("validate: %d samples", samples)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    outputs = _output_metrics(out_names, out_acc, slice_acc, extra_acc, qlabel, flabel)
    check_results: list[CheckResult] = [ca.result() for ca in check_acc]
    layer_metrics = []
    for n in layers:
        acc = layer_acc[n]
        if acc.bad is not None:
            log.debug("validate: layer '%s' skipped: %s", n, acc.bad)
            skipped.append(n)
            continue
        layer_metrics.append(acc.metrics())
    order = [m.name for m in layer_metrics]  # graph order (the float model's)
    info = {}
    if ff is not None and qf is not None:
        for m in layer_metrics:
            node, op = qf.layer_nodes.get(m.name, ("", ff.producers.get(m.name, "")))
            info[m.name] = LayerInfo(node=node, op_type=op)
    layer_metrics.sort(key=_sort_key)

    passed = all(r.passed for r in check_results)
    if min_sqnr_db is not None:
        passed = passed and all(m.worst_sqnr() >= min_sqnr_db for m in outputs)  # NaN compares False
    report = ValidationReport(outputs=outputs, layers=layer_metrics, samples=samples, min_sqnr_db=min_sqnr_db,
                              layer_samples=min(layer_samples, samples) if layer_samples is not None else None,
                              passed=passed, skipped_layers=skipped, layer_order=order, layer_info=info,
                              checks=check_results, float_from_calibration=reused[0],
                              rescaled_layers=rescaled_layers(ff, qf) if ff is not None and qf is not None
                              and layer_samples != 0 else {}, stream=dict(stream or {}),
                              rearranged_layers=rearranged)
    if reused[0]:
        log.info("validate: the float reference of %d sample(s) from calibration's runs", reused[0])
    log.info("validate: %d samples, %d outputs, %d layers, worst output SQNR %s dB%s", samples, len(outputs),
             len(layer_metrics), _fmt_db(report.worst_output_sqnr()),
             "" if min_sqnr_db is None else (" (pass)" if passed else " (FAIL)"))
    return report


#: given float outputs stand in for the float model's runs when sample 0's differ from its run by at most this,
#: relative to each output's largest magnitude: the rounding of an equivalent graph (BatchNormalization and
#: constants folded: up to 7.7e-7 absolute on the ViT), not a changed function (fp16 arithmetic, a pruned graph)
REUSE_RTOL = 1e-5


def _equivalent(given: Mapping[str, np.ndarray] | None, first: Mapping[str, np.ndarray], names: Sequence[str]) -> bool:
    """Whether ``given`` (sample 0's outputs computed elsewhere) match the float model's own run ``first`` on every
    output: same shape and dtype, equal (non-float) or within :data:`REUSE_RTOL` (float, all finite)."""
    if given is None:
        return False
    for n in names:
        a, b = given.get(n), first[n]
        if a is None:
            return False
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if b.dtype.kind != "f":
            if not np.array_equal(a, b):
                return False
            continue
        if not b.size:
            continue
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            return False
        diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
        if diff > REUSE_RTOL * float(np.max(np.abs(b.astype(np.float64)))):
            return False
    return True


def _given(values: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    return {n: values[n] for n in names}


def bounded_layer_samples(layer_samples: int | None, layer_bytes: int, per_sample: int) -> int | None:
    """The per-layer samples within ``layer_bytes`` of exposed tensors at ``per_sample`` bytes a sample (at least
    one), and at most ``layer_samples`` (None: no other bound)."""
    fit = max(1, layer_bytes // max(1, per_sample))
    if layer_samples is not None and layer_samples <= fit:
        return layer_samples
    log.info("validate: per-layer metrics over the first %d sample(s): %.0f MiB of layer tensors a sample, "
             "%.0f MiB at most", fit, per_sample / 2**20, layer_bytes / 2**20)
    return fit


def _output_accumulators(fmodel: Any, ff: _GraphFacts | None, first: Mapping[str, Any], out_names: list[str],
                         slice_axes: Mapping[str, int], checks: Sequence[Check],
                         ) -> tuple[dict[str, _Accumulator], dict[str, _SliceAccumulator], dict[str, list[Any]]]:
    """Per graph output: its whole-tensor accumulator; per float graph output also its worst-slice accumulator
    (along the ``slice_axes`` override or the default axis) and what else is measured of it (see
    :mod:`~qcompiler.report.validate.slices`): the top-k accumulator of class scores, the mask accumulator of
    probability maps (each with ``update(ref, q)`` and ``apply(m)``)."""
    out_acc = {n: _Accumulator(n, top1_rank(None, True)) for n in out_names}
    producers: Mapping[str, str] = {}
    if ff is not None:
        producers = ff.producers
    elif ir.parameter_bytes(fmodel) < ir.NO_PREPACK_BYTES:  # large models: detected from the values only
        producers = _graph_facts(fmodel).producers
    named = {c.output for c in checks}
    slices: dict[str, _SliceAccumulator] = {}
    extra: dict[str, list[Any]] = {}
    for n in out_names:
        ref = np.asarray(first[n])
        if not np.issubdtype(ref.dtype, np.floating):
            continue
        if n in slice_axes:
            axis = slice_axes[n]
            if not -ref.ndim <= axis < ref.ndim:
                raise UserError(f"--slice-axis {n}={axis}: output '{n}' has rank {ref.ndim} "
                                f"(shape {list(ref.shape)})")
            axis %= ref.ndim
        else:
            default = default_slice_axis(tuple(ref.shape))
            if default is None:
                continue
            axis = default
        sigmoid_map = producers.get(n) == "Sigmoid" and ref.ndim >= 4  # [N, C, H, W]: the last axis is spatial
        scores = ref.ndim >= 1 and ref.shape[-1] >= 2 and not sigmoid_map and (
            producers.get(n) in SCORE_OPS or n in named or looks_like_probabilities(ref))
        slices[n] = _SliceAccumulator(axis, classes=scores and axis == ref.ndim - 1)
        if scores:
            extra.setdefault(n, []).append(_TopKAccumulator(int(ref.shape[-1])))
        if producers.get(n) == "Sigmoid":
            extra.setdefault(n, []).append(_MaskAccumulator(MASK_LEVEL))
    return out_acc, slices, extra


#: environment variable overriding the number of concurrent onnxruntime runs of validation (1: sequential)
WORKERS_ENV = "QCOMPILER_VALIDATE_WORKERS"


def validation_workers() -> int:
    """Concurrent runs while validating (``$QCOMPILER_VALIDATE_WORKERS``, else the usable CPUs, at most 2): the
    float and the quantized model of a sample run side by side (onnxruntime releases the GIL)."""
    return worker_count(WORKERS_ENV)


def _update_layers(pool: concurrent.futures.ThreadPoolExecutor | None, parts: int, ws: Workspace,
                   layer_acc: dict[str, _Accumulator], layers: list[str], fl: Mapping[str, np.ndarray],
                   ql: Mapping[str, np.ndarray]) -> list[concurrent.futures.Future[None]]:
    """Add one sample to every layer's accumulator: on the pool in interleaved slices (futures returned,
    to be waited for before the next sample), or here when there is no pool."""

    def update(names: Sequence[str]) -> None:
        for n in names:
            layer_acc[n].update(fl[n], ql[n], ws)

    if pool is None:
        update(layers)
        return []
    return [pool.submit(update, layers[i::parts]) for i in range(max(1, parts))]


def session_threads(workers: int) -> int:
    """onnxruntime intra-op threads of each validation session: the usable CPUs shared among the ``workers``
    runs in flight (1 each on two cores), or onnxruntime's default (0) when runs go one at a time.

    Two concurrent runs each with a thread pool as wide as the machine wake threads on every small op: on
    silero-vad (an LSTM of many small ops) a run took 2.8 ms with the default pool and 2.1 ms on one thread
    (quantized: 0.8 vs 0.4 ms)."""
    return max(1, usable_cpus() // workers) if workers > 1 else 0


def _check_stream(stream: Mapping[str, str], f_plain: _Runner, q_plain: _Runner, out_names: list[str]) -> None:
    """Each ``IN -> OUT`` pair names an input of both models and a graph output (a UserError naming it if not)."""
    for i, o in stream.items():
        where = f"--stream {i}={o}"
        if i not in f_plain.dtypes or i not in q_plain.dtypes:
            raise UserError(f"{where}: no model input '{i}' (inputs: {', '.join(f_plain.dtypes)})")
        if o not in out_names:
            raise UserError(f"{where}: no graph output '{o}' (outputs: {', '.join(out_names)})")


def _layer_runners(fmodel: Any, qmodel: Any, layers: list[str], first: dict[str, np.ndarray],
                   skipped: list[str], threads: int = 0) -> tuple[list[str], _Runner | None, _Runner | None]:
    """Sessions exposing the ``layers`` tensors in both models (tensors onnxruntime refuses to expose, or that are
    not float in both, are dropped; those refused go to ``skipped``): (layers kept, float runner, quant runner)."""
    f_ext: _Runner | None = None
    q_ext: _Runner | None = None
    if layers:
        f_ext = _try_runner(fmodel, layers, first, threads)
        q_ext = _try_runner(qmodel, layers, first, threads)
        if f_ext is None or q_ext is None:
            log.info("validate: onnxruntime refused some intermediate outputs; finding which")
            ok = _working_subset(fmodel, layers, first) if f_ext is None else layers
            ok = _working_subset(qmodel, ok, first) if q_ext is None else ok
            skipped += [n for n in layers if n not in set(ok)]
            layers = ok
            f_ext = _try_runner(fmodel, layers, first, threads) if layers else None
            q_ext = _try_runner(qmodel, layers, first, threads) if layers else None
            if layers and (f_ext is None or q_ext is None):
                log.warning("validate: cannot expose intermediate tensors together; per-layer metrics skipped")
                skipped += layers
                layers, f_ext, q_ext = [], None, None
    if f_ext is None or q_ext is None:
        return [], None, None
    layers = [n for n in layers
              if f_ext.output_types.get(n) in _FLOAT_ORT_TYPES and q_ext.output_types.get(n) in _FLOAT_ORT_TYPES]
    return (layers, f_ext, q_ext) if layers else ([], None, None)


def update_outputs(out_names: Sequence[str], fo: Mapping[str, Any], qo: Mapping[str, Any],
                   out_acc: Mapping[str, _Accumulator], slice_acc: Mapping[str, _SliceAccumulator],
                   extra_acc: Mapping[str, Sequence[Any]], ws: Workspace | None = None) -> None:
    """One sample's graph outputs (float ``fo``, quantized ``qo``) into their accumulators: whole tensor, worst
    slice, and the top-k / mask ones (:func:`_output_accumulators`)."""
    for n in out_names:
        out_acc[n].update(fo[n], qo[n], ws)
        if n in slice_acc:
            slice_acc[n].update(np.asarray(fo[n]), np.asarray(qo[n]))
        for a in extra_acc.get(n, ()):
            a.update(np.asarray(fo[n]), np.asarray(qo[n]))


def _output_metrics(out_names: Sequence[str], out_acc: Mapping[str, Any], slice_acc: Mapping[str, Any],
                    extra_acc: Mapping[str, Sequence[Any]], qlabel: str, flabel: str) -> list[Any]:
    """Each graph output's metrics from its accumulators (worst slice, top-k and mask agreement where measured);
    an output whose shape or type did not match the float model's is the user's error, named."""
    outputs = []
    for n in out_names:
        acc = out_acc[n]
        if acc.bad is not None:
            raise UserError(f"{qlabel}: output '{n}' does not match {flabel}: {acc.bad}")
        m = acc.metrics()
        if n in slice_acc:
            m.worst_slice = slice_acc[n].metrics()
        for a in extra_acc.get(n, ()):
            a.apply(m)
        outputs.append(m)
    return outputs
