"""onnxruntime sessions: of a ModelProto, bytes or file, or of a graphsurgeon graph, optionally exposing
intermediate tensors as extra outputs; and the op histogram of the graph onnxruntime actually runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from qcompiler.core.errors import UserError
from qcompiler.ir.convert import _gs_export, export_model
from qcompiler.ir.external import DEFAULT_EXTERNAL_THRESHOLD, ExternalDataWriter
from qcompiler.ir.facts import _external_info, constant_bytes, parameter_bytes
from qcompiler.ir.save import _write_proto_file
from qcompiler.ir.shapes import _value_info_types
from qcompiler.ir.walk import _external_tensors

#: onnxruntime sessions of models with more parameter bytes than this run without weight pre-packing
#: (pre-packing keeps a second, re-laid-out copy of every MatMul/Conv weight).
NO_PREPACK_BYTES = 1 << 30


def with_outputs(model: onnx.ModelProto, names: Sequence[str], *, keep_outputs: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs the tensors ``names`` (intermediate values)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = [o.name for o in out.graph.output]
    if not keep_outputs:
        del out.graph.output[:]
        existing = []
    types = _value_info_types(out)
    for name in names:
        if name in existing:
            continue
        vi = onnx.ValueInfoProto()
        vi.name = name
        if name in types and types[name].HasField("tensor_type"):
            vi.type.CopyFrom(types[name])
            vi.type.tensor_type.ClearField("shape")
        else:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
        out.graph.output.append(vi)
        existing.append(name)
    return out


#: onnxruntime's default logger severity (warning): what :func:`quiet_default_logger` restores
_ORT_DEFAULT_SEVERITY = 2


@contextmanager
def quiet_default_logger() -> Iterator[None]:
    """Sessions created inside the block by code that sets no ``log_severity_level`` of its own (graphsurgeon's
    ``fold_constants``) log errors only: onnxruntime's optimizer warnings on a model being folded
    ("UnsqueezeElimination cannot remove node ...") are noise on the user's terminal. Afterwards the default
    logger is back at onnxruntime's default (warning)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)


def session(model: onnx.ModelProto | bytes | str | os.PathLike[str], *, threads: int = 0,
            optimize: bool | str = True, optimized_path: str | None = None) -> Any:
    """An onnxruntime CPU InferenceSession for a ModelProto, serialized bytes or a file path.

    ``optimize``: True/"all" (onnxruntime's full CPU graph optimizations, what a deployment runs), "basic"
    (semantics-preserving rewrites only: a reference run for graphs meant for another runtime), False (none).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # qcompiler's own sessions (calibration, validation, sensitivity) alternate onnxruntime runs with numpy
    # work; spinning worker threads steal the cores numpy needs (measured: calibration 1.7-2x slower on 2 cores).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif optimize == "basic":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    src: Any = model
    if isinstance(model, onnx.ModelProto):
        src, folder = _session_bytes(model)
        if folder is not None:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        big = parameter_bytes(model) >= NO_PREPACK_BYTES
    elif isinstance(model, (str, os.PathLike)):
        src = str(model)
        big = _file_parameter_bytes(Path(src)) >= NO_PREPACK_BYTES
    else:
        big = len(model) >= NO_PREPACK_BYTES
    if big:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _session_bytes(model: onnx.ModelProto) -> tuple[bytes, str | None]:
    """Serialized ``model`` for onnxruntime; external tensors (resolved, absolute locations) are given relative
    to their common folder, which onnxruntime is told to read them from."""
    ext = _external_tensors(model)
    if not ext:
        return model.SerializeToString(), None
    locs = []
    for t in ext:
        loc = _external_info(t).get("location", "")
        if not os.path.isabs(loc):
            raise UserError(f"tensor '{t.name}': external data location '{loc}' was not checked; load the model "
                            "with qcompiler.ir.load_model")
        locs.append(loc)
    folder = os.path.commonpath([os.path.dirname(loc) for loc in locs])
    saved = []
    for t, loc in zip(ext, locs):
        for e in t.external_data:
            if e.key == "location":
                saved.append((e, loc))
                e.value = os.path.relpath(loc, folder)
    try:
        return model.SerializeToString(), folder
    finally:
        for e, loc in saved:
            e.value = loc


def _file_parameter_bytes(path: Path) -> int:
    try:
        size = path.stat().st_size
        if size > (64 << 20):
            return size
        return parameter_bytes(onnx.load(str(path), load_external_data=False))
    except Exception:  # only a hint for the session options
        return 0


def graph_session(graph: gs.Graph, extra_outputs: Sequence[str] = (), **kw: Any) -> Any:
    """Session for a graphsurgeon graph, optionally exposing ``extra_outputs`` tensors.

    A graph with more than ``NO_PREPACK_BYTES`` of constants goes to onnxruntime through a temporary folder
    (model + external data written tensor by tensor), never as one serialized copy in memory. onnxruntime having
    no kernel for one of the graph's ops at its types (bfloat16 arithmetic on the CPU, an op of a newer opset) is
    a :class:`UserError` naming the node: calibration and the algorithms run the model's own ops.
    """
    try:
        return _graph_session(graph, extra_outputs, **kw)
    except Exception as e:
        text = " ".join(str(e).split())
        if "Could not find an implementation for" not in text:
            raise
        what = text[text.index("Could not find an implementation for"):]
        raise UserError(f"onnxruntime (CPU) cannot run this model: {what[:240]}") from None


def _graph_session(graph: gs.Graph, extra_outputs: Sequence[str] = (), **kw: Any) -> Any:
    if constant_bytes(graph) < NO_PREPACK_BYTES:
        model = _gs_export(graph.copy())
        if extra_outputs:
            model = with_outputs(model, extra_outputs)
        return session(model, **kw)
    tmp = Path(tempfile.mkdtemp(prefix="qcompiler-session-"))
    try:
        path = tmp / "model.onnx"
        with ExternalDataWriter(tmp / "model.onnx.data", DEFAULT_EXTERNAL_THRESHOLD) as w:
            model = export_model(graph, None, external=w)
        if extra_outputs:
            model = with_outputs(model, extra_outputs)
        _write_proto_file(model, path)
        del model
        return session(path, **kw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def optimized_op_types(model: onnx.ModelProto | str | os.PathLike[str]) -> dict[str, int]:
    """Op histogram of the graph onnxruntime actually runs (after its CPU graph optimizations)."""
    with tempfile.TemporaryDirectory() as td:
        opt = os.path.join(td, "optimized.onnx")
        session(model, optimized_path=opt)
        m = onnx.load(opt, load_external_data=False)
    hist: dict[str, int] = {}
    for n in m.graph.node:
        hist[n.op_type] = hist.get(n.op_type, 0) + 1
    return hist
