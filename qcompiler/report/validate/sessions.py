"""The onnxruntime side of validation: sessions of the float and quantized models (through
:func:`qcompiler.ir.session`), feeds adapted to their input types, and runs whose failures name the sample and
the model.

Part of :mod:`qcompiler.report.validate`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from qcompiler import ir
from qcompiler.core.errors import UserError
from qcompiler.report.validate.metrics import _is_float

log = logging.getLogger(__name__)

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


def _as_model(model: ModelLike) -> Any:
    if isinstance(model, (str, os.PathLike)):
        return ir.load_model(model)
    return model


def _label(model: ModelLike, default: str) -> str:
    return str(model) if isinstance(model, (str, os.PathLike)) else default


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


class Stream:
    """One model run as a stream (``validate(stream={IN: OUT})``): from the second sample on, input ``IN`` is fed
    the model's own output ``OUT`` of the sample before (a recurrent state carried across chunks), instead of the
    feed's. The graph-output runner advances it (samples strictly in order); the per-layer runner of the same
    model reads the inputs recorded for its sample."""

    def __init__(self, pairs: dict[str, str]) -> None:
        self.pairs = dict(pairs)
        self.carried: dict[str, np.ndarray] | None = None
        self.inputs_at: dict[int, dict[str, np.ndarray]] = {}

    def feed(self, sample: int, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if sample not in self.inputs_at:
            own = sample == 0 or self.carried is None
            self.inputs_at[sample] = {i: feed[i] for i in self.pairs if i in feed} if own else dict(self.carried or {})
            for k in [k for k in self.inputs_at if k < sample - 1]:
                del self.inputs_at[k]
        return {**feed, **self.inputs_at[sample]}

    def advance(self, outputs: dict[str, np.ndarray]) -> None:
        self.carried = {i: outputs[o] for i, o in self.pairs.items()}


class _Runner:
    """One onnxruntime session and the output names wanted from it."""

    def __init__(self, model: Any, extra: Sequence[str] = (), optimize: bool | str = True, threads: int = 0) -> None:
        self.extra = list(extra)
        self.sess = ir.session(ir.with_outputs(model, self.extra, keep_outputs=False) if self.extra else model,
                               optimize=optimize, threads=threads)
        self.dtypes = _input_dtypes(self.sess)
        self.output_types = {o.name: o.type for o in self.sess.get_outputs()}
        #: the outputs of the trial run (:func:`_try_runner`), kept for the first sample's turn
        self.first: dict[str, np.ndarray] | None = None
        #: streamed validation: the model's carried inputs, and whether this runner advances them
        self.stream: Stream | None = None
        self.advances = False

    def start_stream(self, pairs: Mapping[str, str]) -> None:
        """Run the samples from now on as one stream (:class:`Stream`), this runner advancing it."""
        self.stream, self.advances = Stream(dict(pairs)), True

    def run(self, feed: dict[str, np.ndarray], sample: int, names: Sequence[str]) -> dict[str, np.ndarray]:
        if self.stream is not None:
            feed = self.stream.feed(sample, feed)
        vals = self.sess.run(list(names), _adapt_feed(feed, self.dtypes, sample))
        out = dict(zip(names, vals))
        if self.stream is not None and self.advances:
            self.stream.advance(out)
        return out

    def take_first(self, names: Sequence[str]) -> Callable[[], dict[str, np.ndarray]]:
        """A job giving the kept outputs ``names`` of the trial run on sample 0 (released once taken): the same
        session on the same feed, so the values a second run would give, without running it."""
        first, self.first = self.first, None
        assert first is not None, "no trial run kept"

        def job() -> dict[str, np.ndarray]:
            return {n: first[n] for n in names}
        return job


def _try_runner(model: Any, names: Sequence[str], feed: dict[str, np.ndarray], threads: int = 0) -> _Runner | None:
    try:
        r = _Runner(model, names, threads=threads)
        r.first = r.run(feed, 0, names)
        return r
    except UserError:
        raise
    except Exception as e:
        log.debug("validate: exposing %d tensor(s) failed: %s", len(names), _first_line(e))
        return None


def tensor_outputs(output_types: Mapping[str, str], label: str) -> list[str]:
    """The graph outputs validation compares: tensors. A sequence or map output (the ``seq(map(...))`` of a
    ZipMap after a classifier) has no SQNR; it is left out, with one INFO line."""
    names = [n for n, t in output_types.items() if t.startswith("tensor(")]
    other = [f"'{n}' ({t})" for n, t in output_types.items() if not t.startswith("tensor(")]
    if other:
        log.info("validate: %s: not compared (not a tensor): %s", label, ", ".join(other))
    return names


def _float_runner(model: Any, label: str, threads: int = 0) -> _Runner:
    """The float model's plain session. onnxruntime refusing to load the float model is the input's fault (an op
    it has no kernel for: a training-only op, a custom domain): one line naming the model, not a crash."""
    try:
        return _Runner(model, threads=threads)
    except Exception as e:
        raise UserError(f"{label}: onnxruntime cannot run the float model, which validation compares against: "
                        f"{_first_line(e)} (--no-validate compiles without validating)") from None


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
