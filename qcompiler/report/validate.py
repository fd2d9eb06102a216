"""Compare a float model with its quantized version in onnxruntime (CPU), per graph output and per layer.

Both models run on the same feeds. For every graph output, and for every intermediate tensor that both
graphs produce under the same name, error metrics accumulate **streaming** over the samples: only running
sums are kept (Σref², Σq², Σref·q, Σ(ref−q)², Σ|ref−q|, max|ref−q|, element and agreement counts), so
memory does not grow with the number of samples.

* ``sqnr_db`` = 10·log10(Σref² / Σ(ref−q)²) over all samples and elements. Identical tensors give
  ``inf``; a zero reference with a non-zero error gives ``-inf``; NaN anywhere gives ``nan``.
* ``cosine`` = Σref·q / (√Σref² · √Σq²) over the flattened concatenation of all samples (1.0 when both are
  all zero, 0.0 when only one is).
* ``max_abs`` / ``mean_abs``: largest and mean absolute difference.
* ``top1_agreement``: for float outputs that look like class scores (rank ≥ 2, last dimension between 2 and
  100 000): the fraction of positions (every index of all axes but the last, over all samples) where the
  argmax over the last axis agrees. ``None`` otherwise.
* ``exact_match``: for integer / bool tensors, the fraction of elements exactly equal (their SQNR is computed
  over the values cast to float). ``None`` for float tensors.

Graph outputs are measured on plain sessions of both models (no intermediate outputs exposed), so
onnxruntime applies the same fusions (e.g. QDQ → integer kernels) as in deployment and a model compared
with itself gives exactly ``inf``. Per-layer metrics come from a second pair of sessions exposing the
intermediate tensors (which may disable some fusions); each sample then runs four times in all.
Comparisons are done in float64 whatever the model's float type (fp16 models included).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qcompiler import ir
from qcompiler.core.errors import UserError

if TYPE_CHECKING:
    from qcompiler.calib import CalibrationSource

log = logging.getLogger(__name__)

#: At most this many intermediate tensors are compared (the first ones in graph order).
MAX_LAYERS = 2000
#: Range of the last dimension for which a float output is treated as class scores (top-1 agreement).
TOP1_MIN_CLASSES = 2
TOP1_MAX_CLASSES = 100_000
#: Ops whose outputs in the quantized graph are quantization plumbing, not layers.
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
#: Producer ops whose outputs are never worth comparing.
_SKIP_OPS = frozenset({"Constant"})

_ORT_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16,
    "tensor(int32)": np.int32,
    "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}
_FLOAT_ORT_TYPES = frozenset({"tensor(float)", "tensor(float16)", "tensor(double)"})

ModelLike = Any  # onnx.ModelProto | str | os.PathLike[str]


# ------------------------------------------------------------------------------------------- report
@dataclass
class TensorMetrics:
    """Error of one tensor of the quantized model against the float model, over all samples."""

    name: str
    sqnr_db: float
    cosine: float
    max_abs: float
    mean_abs: float
    top1_agreement: float | None
    elements: int
    exact_match: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sqnr_db": _json_float(self.sqnr_db, 3),
            "cosine": _json_float(self.cosine, 8),
            "max_abs": _json_sig(self.max_abs),
            "mean_abs": _json_sig(self.mean_abs),
            "top1_agreement": None if self.top1_agreement is None else _json_float(self.top1_agreement, 6),
            "exact_match": None if self.exact_match is None else _json_float(self.exact_match, 6),
            "elements": int(self.elements),
        }


def _json_float(x: float, digits: int) -> float | str:
    """A rounded float, or the strings ``"inf"`` / ``"-inf"`` / ``"nan"`` (strict JSON has none of those)."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return round(float(x), digits)


def _json_sig(x: float) -> float | str:
    if not math.isfinite(x):
        return _json_float(x, 0)
    return float(f"{x:.6g}")


def _sort_key(m: TensorMetrics) -> float:
    """Worst first: NaN (broken) before everything, then increasing SQNR."""
    return -math.inf if math.isnan(m.sqnr_db) else m.sqnr_db


@dataclass
class ValidationReport:
    """Result of :func:`validate`.

    ``outputs``: one entry per graph output (in the float model's order). ``layers``: intermediate tensors
    present in both graphs, worst SQNR first. ``passed``: every output's SQNR ≥ ``min_sqnr_db`` (always
    ``True`` when no threshold was given; a NaN SQNR never passes).
    """

    outputs: list[TensorMetrics]
    layers: list[TensorMetrics]
    samples: int
    min_sqnr_db: float | None = None
    passed: bool = True
    skipped_layers: list[str] = field(default_factory=list)
    layer_samples: int | None = None  # samples the per-layer metrics cover (None: all of them)

    def worst_output_sqnr(self) -> float:
        """Lowest output SQNR in dB (NaN if any output is NaN; ``inf`` when all are identical)."""
        if not self.outputs:
            return math.inf
        if any(math.isnan(m.sqnr_db) for m in self.outputs):
            return math.nan
        return min(m.sqnr_db for m in self.outputs)

    def to_json(self) -> dict[str, Any]:
        """JSON-serializable summary. Non-finite floats are the strings ``"inf"``, ``"-inf"``, ``"nan"``
        (an infinite SQNR means the tensors are identical); SQNR is rounded to 0.001 dB, cosine to 8
        decimals, absolute errors to 6 significant digits."""
        return {
            "samples": int(self.samples),
            "min_sqnr_db": None if self.min_sqnr_db is None else float(self.min_sqnr_db),
            "passed": bool(self.passed),
            "worst_output_sqnr_db": _json_float(self.worst_output_sqnr(), 3),
            "outputs": [m.to_json() for m in self.outputs],
            "layers": [m.to_json() for m in self.layers],
            "skipped_layers": list(self.skipped_layers),
            "layer_samples": int(self.layer_samples) if self.layer_samples is not None else int(self.samples),
        }

    def table(self, max_layers: int = 15) -> str:
        """Plain-text tables: every graph output, then the ``max_layers`` worst layers, then the verdict."""
        lines = [f"validation over {self.samples} sample(s)", "", "outputs:"]
        lines += _format_rows(self.outputs)
        if self.layers and max_layers > 0:
            shown = self.layers[:max_layers]
            over = (f", over the first {self.layer_samples} sample(s)"
                    if self.layer_samples is not None and self.layer_samples < self.samples else "")
            lines += ["", f"worst layers ({len(shown)} of {len(self.layers)}{over}):"]
            lines += _format_rows(shown)
        lines.append("")
        worst = _fmt_db(self.worst_output_sqnr())
        if self.min_sqnr_db is None:
            lines.append(f"worst output SQNR {worst} dB (no threshold)")
        else:
            verdict = "PASS" if self.passed else "FAIL"
            lines.append(f"{verdict}: worst output SQNR {worst} dB, threshold {self.min_sqnr_db:g} dB")
        return "\n".join(lines)


def _fmt_db(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else str(x)


def _short(name: str, width: int = 48) -> str:
    if len(name) <= width:
        return name
    keep = width - 3
    return name[: keep // 2] + "..." + name[len(name) - (keep - keep // 2):]


def _format_rows(rows: Sequence[TensorMetrics]) -> list[str]:
    header = ("tensor", "SQNR dB", "cosine", "max|d|", "mean|d|", "top1/exact", "elements")
    body = []
    for m in rows:
        agree = m.top1_agreement if m.top1_agreement is not None else m.exact_match
        body.append((
            _short(m.name),
            _fmt_db(m.sqnr_db),
            f"{m.cosine:.6f}",
            f"{m.max_abs:.4g}",
            f"{m.mean_abs:.4g}",
            "-" if agree is None else f"{100.0 * agree:.2f}%",
            str(m.elements),
        ))
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    out = []
    for r in [header, *body]:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        out.append("  " + "  ".join(cells).rstrip())
    return out


# --------------------------------------------------------------------------------------- accumulator
def _is_float(dtype: Any) -> bool:
    return bool(np.issubdtype(dtype, np.floating))


class _Accumulator:
    """Running sums for one tensor; holds scalars only, never a sample's values."""

    __slots__ = ("abs_sum", "bad", "dot", "exact_hits", "exact_n", "max_abs", "n", "name", "noise2", "q2",
                 "ref2", "top1_hits", "top1_n")

    def __init__(self, name: str) -> None:
        self.name = name
        self.ref2 = 0.0
        self.q2 = 0.0
        self.dot = 0.0
        self.noise2 = 0.0
        self.abs_sum = 0.0
        self.max_abs = 0.0
        self.n = 0
        self.top1_hits = 0
        self.top1_n = 0
        self.exact_hits = 0
        self.exact_n = 0
        self.bad: str | None = None

    def update(self, ref: np.ndarray, q: np.ndarray) -> None:
        if self.bad is not None:
            return
        ref = np.asarray(ref)
        q = np.asarray(q)
        if ref.shape != q.shape:
            self.bad = f"float shape {list(ref.shape)} vs quantized shape {list(q.shape)}"
            return
        both_float = _is_float(ref.dtype) and _is_float(q.dtype)
        if not both_float:
            self.exact_hits += int(np.count_nonzero(ref == q))
            self.exact_n += int(ref.size)
        r = ref.astype(np.float64, copy=False).ravel()
        x = q.astype(np.float64, copy=False).ravel()
        d = r - x
        # np.sum of products, not BLAS dot: next to onnxruntime's spinning thread pool a multithreaded BLAS
        # call costs ~30 ms each (measured 7x slower validation on PP-OCR).
        self.ref2 += float(np.sum(r * r))
        self.q2 += float(np.sum(x * x))
        self.dot += float(np.sum(r * x))
        self.noise2 += float(np.sum(d * d))
        if d.size:
            ad = np.abs(d)
            self.abs_sum += float(ad.sum())
            self.max_abs = float(np.max([self.max_abs, float(ad.max())]))
        self.n += int(d.size)
        del r, x, d
        if both_float and ref.ndim >= 2 and TOP1_MIN_CLASSES <= ref.shape[-1] <= TOP1_MAX_CLASSES:
            a = np.argmax(ref.astype(np.float32, copy=False), axis=-1)
            b = np.argmax(q.astype(np.float32, copy=False), axis=-1)
            self.top1_hits += int(np.count_nonzero(a == b))
            self.top1_n += int(a.size)

    def metrics(self) -> TensorMetrics:
        ref2, q2, noise2 = self.ref2, self.q2, self.noise2
        if any(math.isnan(v) for v in (ref2, q2, noise2, self.dot)):
            sqnr = math.nan
        elif noise2 == 0.0:
            sqnr = math.inf
        elif ref2 == 0.0:
            sqnr = -math.inf
        elif math.isinf(noise2):
            sqnr = -math.inf if not math.isinf(ref2) else math.nan
        else:
            sqnr = 10.0 * math.log10(ref2 / noise2) if not math.isinf(ref2) else math.inf
        denom = math.sqrt(ref2) * math.sqrt(q2)
        if math.isnan(denom) or math.isnan(self.dot):
            cosine = math.nan
        elif denom == 0.0:
            cosine = 1.0 if ref2 == 0.0 and q2 == 0.0 else 0.0
        else:
            cosine = max(-1.0, min(1.0, self.dot / denom))
        return TensorMetrics(
            name=self.name,
            sqnr_db=sqnr,
            cosine=cosine,
            max_abs=self.max_abs,
            mean_abs=self.abs_sum / self.n if self.n else 0.0,
            top1_agreement=self.top1_hits / self.top1_n if self.top1_n else None,
            elements=self.n,
            exact_match=self.exact_hits / self.exact_n if self.exact_n else None,
        )


# ------------------------------------------------------------------------------------------ sessions
def _as_model(model: ModelLike) -> Any:
    if isinstance(model, (str, os.PathLike)):
        return ir.load_model(model)
    return model


def _label(model: ModelLike, default: str) -> str:
    return str(model) if isinstance(model, (str, os.PathLike)) else default


@dataclass
class _GraphFacts:
    producers: dict[str, str]  # node output name -> op type, in graph order
    inputs: set[str]
    outputs: list[str]
    float_known: dict[str, bool]  # name -> is float, where graphsurgeon knows the dtype


def _graph_facts(model: Any) -> _GraphFacts:
    graph, _meta = ir.import_graph(model)
    producers: dict[str, str] = {}
    float_known: dict[str, bool] = {}
    for node in graph.nodes:
        for t in node.outputs:
            if not t.name or t.name in producers:
                continue
            producers[t.name] = node.op
            dtype = getattr(t, "dtype", None)
            if dtype is not None:
                try:
                    float_known[t.name] = _is_float(np.dtype(dtype))
                except TypeError:
                    pass
    return _GraphFacts(producers=producers, inputs={t.name for t in graph.inputs},
                       outputs=[t.name for t in graph.outputs], float_known=float_known)


def _layer_candidates(ff: _GraphFacts, qf: _GraphFacts, layer_names: Sequence[str] | None) -> list[str]:
    excluded = ff.inputs | qf.inputs | set(ff.outputs) | set(qf.outputs)
    if layer_names is not None:
        wanted = list(dict.fromkeys(layer_names))
        missing = [n for n in wanted if n not in ff.producers or n not in qf.producers]
        if missing:
            log.warning("validate: %d requested layer tensor(s) not produced in both models, skipped: %s",
                        len(missing), ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
        names = [n for n in wanted if n in ff.producers and n in qf.producers and n not in excluded]
    else:
        names = [
            n for n, op in ff.producers.items()
            if n in qf.producers and n not in excluded
            and op not in _SKIP_OPS and op not in QDQ_OPS and qf.producers[n] not in _SKIP_OPS
        ]  # a DequantizeLinear may carry a layer's name in the quantized graph (target ort-qop): its value
    names = [n for n in names if ff.float_known.get(n, True) and qf.float_known.get(n, True)]
    if len(names) > MAX_LAYERS:
        log.warning("validate: %d layer tensors in common; comparing only the first %d", len(names), MAX_LAYERS)
        names = names[:MAX_LAYERS]
    return names


def _input_dtypes(sess: Any) -> dict[str, Any]:
    return {i.name: _ORT_TYPES.get(i.type) for i in sess.get_inputs()}


def _adapt_feed(feed: dict[str, np.ndarray], dtypes: dict[str, Any], sample: int) -> dict[str, np.ndarray]:
    """The arrays a session needs, cast to its input types where the kind agrees (fp16 ↔ fp32, int32 ↔ int64)."""
    out: dict[str, np.ndarray] = {}
    for name, want in dtypes.items():
        if name not in feed:
            raise UserError(f"sample {sample}: no array for model input '{name}' "
                            f"(got {', '.join(sorted(feed)) or 'nothing'})")
        arr = np.asarray(feed[name])
        if want is not None and arr.dtype != want:
            same_kind = (_is_float(arr.dtype) and _is_float(want)) or (
                np.issubdtype(arr.dtype, np.integer) and np.issubdtype(want, np.integer))
            if same_kind:
                arr = arr.astype(want)
        out[name] = arr
    return out


def _first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return lines[0] if lines else type(e).__name__


class _Runner:
    """One onnxruntime session and the output names wanted from it."""

    def __init__(self, model: Any, extra: Sequence[str] = (), optimize: bool | str = True) -> None:
        self.extra = list(extra)
        self.sess = ir.session(ir.with_outputs(model, self.extra, keep_outputs=False) if self.extra else model,
                               optimize=optimize)
        self.dtypes = _input_dtypes(self.sess)
        self.output_types = {o.name: o.type for o in self.sess.get_outputs()}

    def run(self, feed: dict[str, np.ndarray], sample: int, names: Sequence[str]) -> dict[str, np.ndarray]:
        vals = self.sess.run(list(names), _adapt_feed(feed, self.dtypes, sample))
        return dict(zip(names, vals))


def _try_runner(model: Any, names: Sequence[str], feed: dict[str, np.ndarray]) -> _Runner | None:
    try:
        r = _Runner(model, names)
        r.run(feed, 0, names)
        return r
    except UserError:
        raise
    except Exception as e:
        log.debug("validate: exposing %d tensor(s) failed: %s", len(names), _first_line(e))
        return None


def _working_subset(model: Any, names: list[str], feed: dict[str, np.ndarray]) -> list[str]:
    """The names that can be exposed as extra outputs (bisecting the ones onnxruntime refuses)."""
    if not names:
        return []
    if _try_runner(model, names, feed) is not None:
        return names
    if len(names) == 1:
        log.warning("validate: cannot expose tensor '%s' as an output; skipped", names[0])
        return []
    mid = len(names) // 2
    return _working_subset(model, names[:mid], feed) + _working_subset(model, names[mid:], feed)


def _run_checked(runner: _Runner, feed: dict[str, np.ndarray], sample: int, names: Sequence[str],
                 which: str, label: str) -> dict[str, np.ndarray]:
    try:
        return runner.run(feed, sample, names)
    except UserError:
        raise
    except Exception as e:
        if which == "float":
            raise UserError(f"{label}: onnxruntime failed on sample {sample}: {_first_line(e)}") from None
        raise RuntimeError(f"quantized model {label} failed in onnxruntime on sample {sample} "
                           f"(the float model ran): {_first_line(e)}") from e


# ------------------------------------------------------------------------------------------ validate
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
) -> ValidationReport:
    """Run both models on ``feeds`` and measure the quantized one against the float one.

    ``float_model`` / ``quant_model``: a path or an ``onnx.ModelProto``. ``feeds``: any iterable of
    ``{input name: array}`` (consumed once, one sample at a time). ``layer_names`` limits the per-layer
    comparison to those tensors; ``layer_samples`` limits it to the first N samples (the outputs still use all
    of them). ``names``: quantized-model tensor name -> float-model name, for a model whose names
    ``compact-names`` shortened (its ``OUT.names.json`` ``tensors``); layers are compared and reported by the
    float names. ``optimize`` is the onnxruntime optimization level of the quantized model's
    output run: True (full, what an onnxruntime deployment runs) or "basic" (a reference run for a graph meant
    for another runtime, free of onnxruntime's fusions). Raises :class:`UserError` for bad feeds or models whose outputs do not
    match; :class:`RuntimeError` when only the quantized model fails to run.
    """
    flabel = _label(float_model, "float model")
    qlabel = _label(quant_model, "quantized model")
    fmodel = _as_model(float_model)
    qmodel = _as_model(quant_model)
    if names and per_layer:
        qmodel = ir.renamed_tensors(qmodel, dict(names))

    f_plain = _Runner(fmodel)
    q_plain = _Runner(qmodel, optimize=optimize)
    out_names = list(f_plain.output_types)
    missing = [n for n in out_names if n not in q_plain.output_types]
    if missing:
        raise UserError(f"{qlabel}: lacks graph output(s) {', '.join(repr(n) for n in missing)} "
                        f"of {flabel}")
    extra_q = [n for n in q_plain.output_types if n not in f_plain.output_types]
    if extra_q:
        log.warning("validate: %s has extra output(s) not compared: %s", qlabel, ", ".join(extra_q))

    it = iter(feeds)
    first = next(it, None)
    if first is None:
        raise UserError("validate: no samples to run (empty data)")

    layers: list[str] = []
    skipped: list[str] = []
    if per_layer:
        ff, qf = _graph_facts(fmodel), _graph_facts(qmodel)
        layers = _layer_candidates(ff, qf, layer_names)

    # Check the plain sessions run at all before blaming any exposed tensor.
    f_first = _run_checked(f_plain, first, 0, out_names, "float", flabel)
    q_first = _run_checked(q_plain, first, 0, out_names, "quant", qlabel)

    f_ext: _Runner | None = None
    q_ext: _Runner | None = None
    if layers:
        f_ext = _try_runner(fmodel, layers, first)
        q_ext = _try_runner(qmodel, layers, first)
        if f_ext is None or q_ext is None:
            log.info("validate: onnxruntime refused some intermediate outputs; finding which")
            ok = _working_subset(fmodel, layers, first) if f_ext is None else layers
            ok = _working_subset(qmodel, ok, first) if q_ext is None else ok
            skipped += [n for n in layers if n not in set(ok)]
            layers = ok
            f_ext = _try_runner(fmodel, layers, first) if layers else None
            q_ext = _try_runner(qmodel, layers, first) if layers else None
            if layers and (f_ext is None or q_ext is None):
                log.warning("validate: cannot expose intermediate tensors together; per-layer metrics skipped")
                skipped += layers
                layers, f_ext, q_ext = [], None, None
    if f_ext is not None and q_ext is not None:
        keep = [n for n in layers
                if f_ext.output_types.get(n) in _FLOAT_ORT_TYPES and q_ext.output_types.get(n) in _FLOAT_ORT_TYPES]
        layers = keep
    else:
        layers = []
    if not layers:
        f_ext = q_ext = None

    out_acc = {n: _Accumulator(n) for n in out_names}
    layer_acc = {n: _Accumulator(n) for n in layers}
    samples = 0
    for idx, feed in enumerate(itertools.chain([first], it)):
        if idx == 0:
            fo, qo = f_first, q_first
        else:
            fo = _run_checked(f_plain, feed, idx, out_names, "float", flabel)
            qo = _run_checked(q_plain, feed, idx, out_names, "quant", qlabel)
        for n in out_names:
            out_acc[n].update(fo[n], qo[n])
        del fo, qo
        if f_ext is not None and q_ext is not None and (layer_samples is None or idx < layer_samples):
            try:
                fl = f_ext.run(feed, idx, layers)
                ql = q_ext.run(feed, idx, layers)
            except UserError:
                raise
            except Exception as e:
                log.warning("validate: per-layer run failed on sample %d (%s); per-layer metrics dropped",
                            idx, _first_line(e))
                skipped += layers
                layers, layer_acc, f_ext, q_ext = [], {}, None, None
            else:
                for n in layers:
                    layer_acc[n].update(fl[n], ql[n])
                del fl, ql
        samples += 1
        if samples % 100 == 0:
            log.info("validate: %d samples", samples)

    outputs = []
    for n in out_names:
        acc = out_acc[n]
        if acc.bad is not None:
            raise UserError(f"{qlabel}: output '{n}' does not match {flabel}: {acc.bad}")
        outputs.append(acc.metrics())
    layer_metrics = []
    for n in layers:
        acc = layer_acc[n]
        if acc.bad is not None:
            log.debug("validate: layer '%s' skipped: %s", n, acc.bad)
            skipped.append(n)
            continue
        layer_metrics.append(acc.metrics())
    layer_metrics.sort(key=_sort_key)

    passed = True
    if min_sqnr_db is not None:
        passed = all(m.sqnr_db >= min_sqnr_db for m in outputs)  # NaN compares False
    report = ValidationReport(outputs=outputs, layers=layer_metrics, samples=samples, min_sqnr_db=min_sqnr_db,
                              layer_samples=min(layer_samples, samples) if layer_samples is not None else None,
                              passed=passed, skipped_layers=skipped)
    log.info("validate: %d samples, %d outputs, %d layers, worst output SQNR %s dB%s", samples, len(outputs),
             len(layer_metrics), _fmt_db(report.worst_output_sqnr()),
             "" if min_sqnr_db is None else (" (pass)" if passed else " (FAIL)"))
    return report


def load_names(path: str | os.PathLike[str]) -> dict[str, str]:
    """The tensor map (new name -> original) of a ``compact-names`` side file ``OUT.names.json``; raises
    :class:`UserError` naming the file when it is missing or not such a file."""
    import json

    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: not a names file ({type(e).__name__}: {e})") from None
    tensors = data.get("tensors") if isinstance(data, dict) else None
    if (not isinstance(data, dict) or data.get("version") != 1 or not isinstance(tensors, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in tensors.items())):
        raise UserError(f"{p}: not a names file (expected {{\"version\": 1, \"tensors\": {{new: old}}, ...}}, "
                        "as `qcompiler compile --compact-names` writes)")
    return dict(tensors)


# ---------------------------------------------------------------------------------------------- feeds
def load_feeds(path: str | os.PathLike[str], model: ModelLike) -> CalibrationSource:
    """Feeds for ``model`` from ``path`` (the CLI's ``--data``), in the calibration data formats (the same
    reader as ``--calib``, :mod:`qcompiler.calib`):

    * a single ``.npz`` whose arrays are keyed by input name, each ``[N, *feed_shape]`` (same ``N``);
    * a folder of ``.npz`` files, one feed each (arrays of the feed shape), in sorted name order.

    The result is re-iterable, has a ``len`` and streams one sample at a time; arrays come cast to the input
    dtypes. Pickled arrays are refused. Raises :class:`UserError` naming the file and array for a missing
    path, an array that is not an input, a missing input, a wrong rank / shape / dtype, or no samples —
    these are checked here from the .npy headers; NaN / Inf values are found (and raised) while iterating.
    """
    from qcompiler.calib import CalibrationSource, input_signatures

    p = Path(path)
    if not p.exists():  # checked here so that no calibration keyword (e.g. 'random') is taken for data
        raise UserError(f"{p}: no such file or folder")
    graph, _meta = ir.import_graph(_as_model(model))
    return CalibrationSource.from_arg(p, input_signatures(graph))
