"""Loading a model file, with every check before anything is used: the path, the protobuf, tensor sizes,
the ONNX checker, and the external data — whose ``location`` must stay inside the model's folder. Never writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from qcompiler.core import digest
from qcompiler.core.errors import UserError
from qcompiler.core.files import regular_file
from qcompiler.ir.convert import interface_changed, opset_of
from qcompiler.ir.external import MMAP_MIN_BYTES
from qcompiler.ir.facts import _bits, _elements, _external_info
from qcompiler.ir.shapes import INFER_MAX_PROTO_BYTES, structure_copy
from qcompiler.ir.walk import _external_tensors, _iter_all_tensors, _proto_graphs

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
#: models (by path and content digest) whose load-time checks passed in this process, most recent last: loading
#: the same bytes again — the candidate compiles of ``--plan auto`` and ``plan --budget`` load their input dozens of
#: times — skips the checker, shape inference and the onnxruntime trial session (1.7 s a load on a 97 MB ViT).
#: Models with external data are always checked (their data files are not part of the digest).
_CHECKED: dict[tuple[str, bytes], None] = {}
_CHECKED_MAX = 64
# Largest tensor (in elements) we accept from a model before refusing it as absurd.
MAX_TENSOR_ELEMENTS = 2**34
#: Largest intermediate tensor (elements, from static shape inference at load) before the model is refused.
MAX_ACTIVATION_ELEMENTS = 2**32


def _check_path(path: Path) -> None:
    """A regular file (symlinks resolved: no FIFO, device or socket), not empty."""
    st = regular_file(path, what="an .onnx file")
    if st.st_size == 0:
        raise UserError(f"{path}: empty file, expected an ONNX model")


def _safe_external_path(base_dir: Path, location: str, where: str) -> Path:
    """Resolve an external-data ``location``; refuse absolute paths, ``..`` and symlink escapes."""
    if not location:
        raise UserError(f"{where}: external data with an empty location")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
        raise UserError(f"{where}: external data location '{location}' is absolute; refused")
    parts = Path(location.replace("\\", "/")).parts
    if ".." in parts:
        raise UserError(f"{where}: external data location '{location}' contains '..'; refused")
    try:
        full = (base_dir / location).resolve()
        base = base_dir.resolve()
        if base != full and base not in full.parents:
            raise UserError(f"{where}: external data location '{location}' resolves outside the model folder; "
                            "refused")
        if not full.exists() or full.is_dir():
            raise UserError(f"{where}: external data file '{location}' not found next to the model")
    except (OSError, ValueError) as e:  # a name over the file system's limit (ENAMETOOLONG), a NUL byte
        shown = repr(location[:60] + ("..." if len(location) > 60 else ""))
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"{where}: external data location {shown} ({len(location)} characters) cannot be "
                        f"opened: {reason}") from None
    try:
        regular_file(full, what="an external data file")
    except UserError as e:  # a FIFO, a device: name the tensor too
        raise UserError(f"{where}: {e}") from None
    return full


def _parse_int(value: str, what: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{where}: external data {what} '{value}' is not an integer") from None


def _resolve_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Check every external tensor (location inside the model folder, byte range inside the file, length
    matching the shape) and record its resolved absolute location. Only tensors under ``MMAP_MIN_BYTES`` are read
    (into ``raw_data``, so that shape inference sees shape tensors); the others are memory-mapped tensor by tensor
    when the graph is imported (:func:`import_graph`)."""
    base_dir = path.parent
    for t in _external_tensors(model):
        info = _external_info(t)
        where = f"{path}: tensor '{t.name}'"
        full = _safe_external_path(base_dir, info.get("location", ""), where)
        bits = _bits(t.data_type)
        if bits is None:
            raise UserError(f"{where}: tensors of type {t.data_type} cannot be stored as external data")
        need = (_elements(t) * bits + 7) // 8
        offset = _parse_int(info.get("offset", "0") or "0", "offset", where)
        size = full.stat().st_size
        length = _parse_int(info["length"], "length", where) if info.get("length") else need
        if offset < 0 or length < 0 or offset + length > size:
            raise UserError(f"{where}: external data range [{offset}, {offset + length}) exceeds file "
                            f"'{full.name}' ({size} bytes)")
        if length != need:
            raise UserError(f"{where}: external data length {length} does not match its shape "
                            f"{list(t.dims)} ({need} bytes)")
        del t.external_data[:]
        if length < MMAP_MIN_BYTES:  # small (shapes, biases): read now, so shape inference sees them
            with open(full, "rb") as f:
                f.seek(offset)
                t.raw_data = f.read(length)
            t.data_location = TensorProto.DEFAULT
            continue
        t.external_data.add(key="location", value=str(full))
        t.external_data.add(key="offset", value=str(offset))
        t.external_data.add(key="length", value=str(length))


def _check_tensor_sizes(model: onnx.ModelProto, path: Path) -> None:
    for t in _iter_all_tensors(model):
        n = 1
        for d in t.dims:
            if d < 0:
                raise UserError(f"{path}: tensor '{t.name}' has a negative dimension {d}")
            n *= d
        if n > MAX_TENSOR_ELEMENTS:
            raise UserError(f"{path}: tensor '{t.name}' declares {n} elements, beyond the {MAX_TENSOR_ELEMENTS} limit")


def load_model(path: str | os.PathLike[str], *, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model. Never writes anything. Raises :class:`UserError`.

    Tensors stored as external data are **not** read: their locations are checked (inside the model's folder,
    no ``..``, no absolute path, no symlink leading out; byte range inside the file) and replaced, in the
    returned ModelProto only, by the resolved absolute path. :func:`import_graph` memory-maps them tensor by
    tensor, :func:`session` hands them to onnxruntime by folder and :func:`save_model` copies them.
    """
    return load_model_keyed(path, check=check)[0]


def load_model_keyed(path: str | os.PathLike[str], *,
                     check: bool = True) -> tuple[onnx.ModelProto, tuple[str, bytes] | None]:
    """:func:`load_model`, and the model's identity: its resolved path and the digest of the file's bytes, which
    are the whole model when it has no external data (``None`` with external data, whose files are not
    digested, and without ``check``)."""
    p = Path(path)
    _check_path(p)
    if p.stat().st_size > PROTOBUF_LIMIT:
        raise UserError(f"{p}: {p.stat().st_size} bytes is beyond the 2 GB protobuf limit of an .onnx file "
                        "(large models keep their weights in external data files)")
    try:
        with open(p, "rb") as f:
            data = f.read()
        model = onnx.ModelProto()
        model.ParseFromString(data)
        key = (str(p.resolve()), digest.of_bytes(data)) if check else None
    except Exception as e:  # protobuf DecodeError and friends
        raise UserError(f"{p}: not an ONNX model (protobuf parse failed: {type(e).__name__})") from None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise UserError(f"{p}: not an ONNX model (no graph / ir_version / opset_import)")
    _check_text(model, p)
    _check_tensor_sizes(model, p)
    upgraded = _upgrade_to_floor(model, p)
    if upgraded is not None:
        model, data = upgraded, b""  # the checks below serialize the upgraded proto, not the file's bytes
    inline = not _external_tensors(model)
    _resolve_external_data(model, p)  # small external tensors become inline: the proto differs from the file
    if check and (key not in _CHECKED or _external_tensors(model)):
        # Without external data the file's bytes are the model (nothing above changed it): the checker,
        # shape inference and onnxruntime take them as they are, instead of three serializations and three
        # ByteSize() walks of the proto (each ~0.18 s on the 97 MB ViT: 1.1 of its 2.1 s load).
        blob = data if inline and data else None
        check_model(model, where=str(p), serialized=blob)
        _check_inferred_sizes(model, p, serialized=blob)
        _check_runtime(model, p, serialized=blob)
        del blob
        if key is not None and not _external_tensors(model):
            _CHECKED[key] = None
            while len(_CHECKED) > _CHECKED_MAX:
                del _CHECKED[next(iter(_CHECKED))]
    del data
    return model, key if inline else None


#: the oldest default-domain opset compiled as it is; older models are upgraded to it when loaded
MIN_OPSET = 11


def _upgrade_to_floor(model: onnx.ModelProto, path: Path) -> onnx.ModelProto | None:
    """``model`` converted to :data:`MIN_OPSET` when its default-domain opset is older (None when it is not, or
    when onnx's converter cannot: then the model stays as it is). onnxruntime has no kernels for several ops of
    opsets 1-6 (AveragePool-1, BatchNormalization-6, Add-6 with ``broadcast``, ...): such a model compiled, but its
    float reference (validation, the measured default) could not run. Everything that loads the model — the
    compile, its calibration, validation and the measured default's float reference — sees the same upgraded
    graph; the file is not touched."""
    old = opset_of(model)
    if old >= MIN_OPSET or not any(i.domain in ("", "ai.onnx") for i in model.opset_import):
        return None
    if old < 7:
        model = _per_channel_prelu_slopes(model)
    try:
        from onnx import version_converter

        out = version_converter.convert_version(model, MIN_OPSET)
    except Exception as e:  # an op without an adapter: compiled at its own opset, as before
        log.warning("%s: opset %d kept (upgrading to %d failed: %s)", path, old, MIN_OPSET,
                    " ".join(str(e).split())[:200])
        return None
    if interface_changed(model, out):  # Scan-8 -> 9 drops the batch axis of its inputs: not the same model
        log.warning("%s: opset %d kept (upgrading to %d would change the graph's inputs / outputs)", path, old,
                    MIN_OPSET)
        return None
    # the converter keeps the IR version; an IR-3 file's new initializers (Pad's pads, ...) must then be graph
    # inputs: the IR version of the new opset lifts that
    out.ir_version = max(out.ir_version, onnx.helper.find_min_ir_version_for(list(out.opset_import), ignore_unknown=True))
    log.info("%s: opset %d upgraded to %d when loaded (onnxruntime lacks kernels for several older op versions)",
             path, old, MIN_OPSET)
    return out


def _per_channel_prelu_slopes(model: onnx.ModelProto) -> onnx.ModelProto:
    """PRelu before opset 7 applies a ``[C]`` slope per channel (axis 1: PyTorch's ``PReLU(C)`` exports, whose
    recorded outputs say so); opset 7's broadcasting aligns ``[C]`` with the last axis instead, and onnx's converter
    leaves the slope as it is (onnxruntime then fails on the upgraded model, or computes something else). A
    constant ``[C]`` slope of a PRelu whose input has rank r >= 3 and C channels becomes ``[C, 1, ...]`` (r - 2
    ones) — a copy of the model; the same model when there is none."""
    prelus = [n for n in model.graph.node if n.op_type == "PRelu" and n.domain in ("", "ai.onnx") and len(n.input) == 2]
    inits = {t.name: t for t in model.graph.initializer}
    if not any(n.input[1] in inits and len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1
               for n in prelus):
        return model
    try:
        inferred = onnx.shape_inference.infer_shapes(structure_copy(model), strict_mode=False)
    except Exception:  # best effort: the converter then sees the slope as it was
        return model
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.input, *inferred.graph.value_info]
              if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    readers: dict[str, int] = {}
    for n in out.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    by_name = {t.name: t for t in out.graph.initializer}
    for n in out.graph.node:
        if n.op_type != "PRelu" or n.domain not in ("", "ai.onnx") or len(n.input) != 2 or n.input[1] not in by_name:
            continue
        slope, x = by_name[n.input[1]], shapes.get(n.input[0])
        c = slope.dims[0] if len(slope.dims) == 1 else 0
        if c <= 1 or x is None or len(x) < 3 or x[1] not in (c, None):
            continue
        values = onnx.numpy_helper.to_array(slope).reshape([c] + [1] * (len(x) - 2))
        name = slope.name if readers.get(slope.name, 0) == 1 else f"{slope.name}:per_channel_{n.output[0]}"
        new = onnx.numpy_helper.from_array(values, name)
        if name == slope.name:
            slope.CopyFrom(new)
            for v in out.graph.input:  # IR < 4: the initializer is listed as a graph input with its shape
                if v.name == name:
                    v.CopyFrom(onnx.helper.make_tensor_value_info(name, new.data_type, list(values.shape)))
        else:
            out.graph.initializer.append(new)
            n.input[1] = name
    return out


def _check_text(model: onnx.ModelProto, path: Path) -> None:
    """Every string field (graph / node / tensor names, attributes' names, metadata) must be UTF-8 text:
    protobuf hands invalid UTF-8 back as bytes, which every later step would trip over."""
    stack: list[Any] = [model]
    while stack:
        msg = stack.pop()
        for fd, value in msg.ListFields():
            if fd.type == fd.TYPE_STRING:
                for v in ((value,) if isinstance(value, (str, bytes)) else value):
                    if not isinstance(v, str):
                        raise UserError(f"{path}: {msg.DESCRIPTOR.name}.{fd.name} {bytes(v)[:60]!r} is not valid "
                                        "UTF-8 text")
            elif fd.type == fd.TYPE_MESSAGE:
                if hasattr(value, "ListFields"):
                    stack.append(value)
                else:
                    stack.extend(value)


#: models whose serialized proto is larger than this are not test-loaded into onnxruntime at load time
RUNTIME_CHECK_MAX_BYTES = 256 << 20
#: onnxruntime's refusals that are not the model's fault: an op it has no kernel / schema for (a custom domain
#: another runtime provides); the target in use decides about those
_RUNTIME_UNSUPPORTED = ("is not a registered function/op", "NOT_IMPLEMENTED", "Could not find an implementation")


def _check_runtime(model: onnx.ModelProto, path: Path, serialized: bytes | None = None) -> None:
    """Refuse a model the ONNX checker accepts but onnxruntime rejects as invalid (duplicate node names, an
    initializer whose type contradicts its graph input, If branches with different output counts, an opset
    from the future): loaded without optimizations, the model must make a session. Skipped for models with
    external data or above :data:`RUNTIME_CHECK_MAX_BYTES` (their sessions are built when needed).
    ``serialized``: the model's bytes when the caller has them."""
    if _external_tensors(model) or (len(serialized) if serialized is not None else model.ByteSize()) \
            > RUNTIME_CHECK_MAX_BYTES:
        return
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(serialized if serialized is not None else model.SerializeToString(), so,
                             providers=["CPUExecutionProvider"])
    except Exception as e:
        text = " ".join(str(e).split())
        if any(k in text for k in _RUNTIME_UNSUPPORTED):
            return
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = re.sub(r"^\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ", "", first)
        first = re.sub(r"^/\S+:\d+ [^(]*\(.*?\) ", "", first)  # onnxruntime's source location and function
        if len(first) > 300:
            first = first[:297] + "..."
        raise UserError(f"{path}: onnxruntime refuses the model: {first}") from None


def _check_inferred_sizes(model: onnx.ModelProto, path: Path, serialized: bytes | None = None) -> None:
    """Refuse a model whose (statically inferred) intermediate tensors are absurdly large — e.g. a
    ConstantOfShape of [2^20, 2^20] — before anything tries to allocate them. Skipped for protos above
    ``INFER_MAX_PROTO_BYTES``. ``serialized``: the model's bytes when the caller has them (only their size is read:
    inference runs on :func:`~qcompiler.ir.shapes.structure_copy`, the graph without its weights' values)."""
    if (len(serialized) if serialized is not None else model.ByteSize()) > INFER_MAX_PROTO_BYTES:
        return
    try:  # on the graph without its weights' values: the same shapes, without copying the weights
        inferred = onnx.shape_inference.infer_shapes(structure_copy(model), check_type=False, strict_mode=False,
                                                     data_prop=True)
    except Exception:  # inference is best effort here; the checker already ran
        return
    graphs = list(_proto_graphs(inferred.graph))  # subgraph bodies (If / Loop / Scan) included
    producers = {o: n.name or n.op_type for g in graphs for n in g.node for o in n.output}
    for vi in [v for g in graphs for v in [*g.value_info, *g.output]]:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        n = 1
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                if d.dim_value < 0:
                    n = 0
                    break
                n *= int(d.dim_value)
        if n > MAX_ACTIVATION_ELEMENTS:
            node = producers.get(vi.name, "?")
            raise UserError(f"{path}: tensor '{vi.name}' (output of node '{node}') would have {n} elements, beyond "
                            f"the {MAX_ACTIVATION_ELEMENTS} limit")


@contextlib.contextmanager
def _externals_hidden(model: onnx.ModelProto) -> Iterator[None]:
    """Temporarily turn every external tensor into an empty inline one (the ONNX checker would look for
    external files relative to the working directory); everything is restored afterwards."""
    saved = []
    for t in _external_tensors(model):
        saved.append((t, list(t.dims), [(e.key, e.value) for e in t.external_data]))
        del t.dims[:]
        t.dims.append(0)
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT
    try:
        yield
    finally:
        for t, dims, entries in saved:
            del t.dims[:]
            t.dims.extend(dims)
            for k, v in entries:
                t.external_data.add(key=k, value=v)
            t.data_location = TensorProto.EXTERNAL


def check_model(model: onnx.ModelProto, *, where: str = "model", full: bool = False,
                serialized: bytes | None = None) -> None:
    """Run the ONNX checker (and strict shape inference when ``full``); raise :class:`UserError` on failure.
    ``serialized``: the bytes of ``model`` (one without external data) when the caller has them: checked as
    they are, without serializing the proto again."""
    try:
        if serialized is not None:
            if len(serialized) < PROTOBUF_LIMIT:
                onnx.checker.check_model(serialized)
                if full:
                    onnx.shape_inference.infer_shapes(serialized, check_type=True, strict_mode=True)
        elif model.ByteSize() < PROTOBUF_LIMIT:
            with _externals_hidden(model):
                onnx.checker.check_model(model)
            if full:
                onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:
        text = " ".join(str(e).split()) or type(e).__name__
        if len(text) > 300:
            text = text[:297] + "..."
        raise UserError(f"{where}: fails the ONNX checker: {text}") from None
