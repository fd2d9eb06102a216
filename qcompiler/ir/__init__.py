"""Loading, saving and converting models: the only module that touches ONNX protobuf objects.

Everything else in qcompiler works on an onnx-graphsurgeon :class:`gs.Graph`. This module

* loads a model file (checking the path, the protobuf, the ONNX checker, and any external data — whose
  ``location`` must stay inside the model's folder),
* imports it into graphsurgeon and exports it back, carrying the ``qcompiler.pass`` tag of every node a pass
  created as node ``metadata_props``,
* upgrades the opset when the quantized result needs it (and says so in the log),
* converts fp16 models to fp32 for the compiler's math and restores the fp16 interface afterwards,
* saves atomically (to a temporary folder beside the destination, then ``os.replace``), optionally with
  external data,
* builds onnxruntime sessions, including ones that expose intermediate tensors as extra outputs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from qcompiler.core.errors import UserError

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
TAG_KEY = "qcompiler.pass"
_TAG_ATTR = "_qcompiler_pass"
MIN_IR_FOR_TAGS = 10
# Largest tensor (in elements) we accept from a model before refusing it as absurd.
MAX_TENSOR_ELEMENTS = 2**34
#: Largest intermediate tensor (elements, from static shape inference at load) before the model is refused.
MAX_ACTIVATION_ELEMENTS = 2**32
#: Shape inference at load (for the check above) runs only on protos up to this size (it copies the proto).
INFER_MAX_PROTO_BYTES = 256 << 20
#: External tensors of at least this many bytes are memory-mapped at import; smaller ones are read.
MMAP_MIN_BYTES = 1 << 16
#: Tensors at least this large start at a multiple of ``EXTERNAL_ALIGN`` in written external data files
#: (so that onnxruntime and numpy can map them); smaller ones at a multiple of 64 bytes.
EXTERNAL_ALIGN = 1 << 16
EXTERNAL_ALIGN_MIN_BYTES = 1 << 20
#: ``external_data_threshold`` used when the input model had external data (or the output is too big).
DEFAULT_EXTERNAL_THRESHOLD = 1024
#: Graphs whose constants exceed this are written with external data even when not asked to (protobuf's
#: 2 GB limit, with room for the graph itself), and are given to onnxruntime through a temporary folder.
INLINE_LIMIT = 2**31 - 2**27
#: onnxruntime sessions of models with more parameter bytes than this run without weight pre-packing
#: (pre-packing keeps a second, re-laid-out copy of every MatMul/Conv weight).
NO_PREPACK_BYTES = 1 << 30
#: 4-bit (and 2-bit) types are packed two (four) per byte in raw data.
_PACKED_TYPES: dict[int, int] = {
    int(getattr(TensorProto, name)): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(TensorProto, name)
}


# --------------------------------------------------------------------------------------------- loading
def _check_path(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
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
    full = (base_dir / location).resolve()
    base = base_dir.resolve()
    if base != full and base not in full.parents:
        raise UserError(f"{where}: external data location '{location}' resolves outside the model folder; refused")
    if not full.is_file():
        raise UserError(f"{where}: external data file '{location}' not found next to the model")
    return full


def _external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _checked_external(t: TensorProto) -> tuple[str, int, int]:
    """(absolute file, offset, length) of an external tensor whose location :func:`load_model` resolved."""
    info = _external_info(t)
    loc = info.get("location", "")
    if not os.path.isabs(loc):
        raise UserError(f"tensor '{t.name}': external data location '{loc}' was not checked; load the model "
                        "with qcompiler.ir.load_model")
    return loc, int(info.get("offset", "0") or 0), int(info.get("length", "0") or 0)


def _iter_all_tensors(model: onnx.ModelProto) -> Iterable[TensorProto]:
    def from_graph(g: onnx.GraphProto) -> Iterable[TensorProto]:
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.TENSORS:
                    yield from a.tensors
                elif a.type == onnx.AttributeProto.GRAPH:
                    yield from from_graph(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        yield from from_graph(sub)

    yield from from_graph(model.graph)
    for fn in model.functions:
        for n in fn.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t


def _external_tensors(model: onnx.ModelProto) -> list[TensorProto]:
    return [t for t in _iter_all_tensors(model) if t.data_location == TensorProto.EXTERNAL]


def external_files(model: onnx.ModelProto) -> set[Path]:
    """The (resolved) files the external tensors of a model loaded by :func:`load_model` live in."""
    out = set()
    for t in _external_tensors(model):
        loc = _external_info(t).get("location", "")
        if os.path.isabs(loc):
            out.add(Path(loc))
    return out


def has_external_data(model: onnx.ModelProto) -> bool:
    """True when some tensor of ``model`` lives in an external data file."""
    return any(t.data_location == TensorProto.EXTERNAL for t in _iter_all_tensors(model))


def _elements(t: TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n


def _bits(data_type: int) -> int | None:
    """Bits per element of an ONNX tensor type in raw_data (None: not representable as raw bytes)."""
    if data_type in _PACKED_TYPES:
        return _PACKED_TYPES[data_type]
    if data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize) * 8
    except Exception:  # unknown / future types
        return None


def tensor_nbytes(t: TensorProto) -> int:
    """Bytes of a tensor's data (raw layout; packed 4-bit types count half a byte), without reading it."""
    bits = _bits(t.data_type)
    if bits is None:
        if t.data_location == TensorProto.EXTERNAL:
            return int(_external_info(t).get("length", "0") or 0)
        return sum(len(s) for s in t.string_data)
    return (_elements(t) * bits + 7) // 8


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
        del data
    except Exception as e:  # protobuf DecodeError and friends
        raise UserError(f"{p}: not an ONNX model (protobuf parse failed: {type(e).__name__})") from None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise UserError(f"{p}: not an ONNX model (no graph / ir_version / opset_import)")
    _check_tensor_sizes(model, p)
    _resolve_external_data(model, p)
    if check:
        check_model(model, where=str(p))
        _check_inferred_sizes(model, p)
    return model


def _check_inferred_sizes(model: onnx.ModelProto, path: Path) -> None:
    """Refuse a model whose (statically inferred) intermediate tensors are absurdly large — e.g. a
    ConstantOfShape of [2^20, 2^20] — before anything tries to allocate them. Skipped for protos above
    ``INFER_MAX_PROTO_BYTES`` (shape inference copies the whole proto)."""
    if model.ByteSize() > INFER_MAX_PROTO_BYTES:
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # inference is best effort here; the checker already ran
        return
    producers = {o: n.name or n.op_type for n in inferred.graph.node for o in n.output}
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
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


def check_model(model: onnx.ModelProto, *, where: str = "model", full: bool = False) -> None:
    """Run the ONNX checker (and strict shape inference when ``full``); raise :class:`UserError` on failure."""
    try:
        if model.ByteSize() < PROTOBUF_LIMIT:
            with _externals_hidden(model):
                onnx.checker.check_model(model)
            if full:
                onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:
        text = " ".join(str(e).split()) or type(e).__name__
        if len(text) > 300:
            text = text[:297] + "..."
        raise UserError(f"{where}: fails the ONNX checker: {text}") from None


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def upgrade_opset(model: onnx.ModelProto, target: int, reason: str) -> onnx.ModelProto:
    """Convert the default-domain opset to ``target`` (no-op when already there)."""
    current = opset_of(model)
    if current >= target:
        return model
    log.info("upgrading opset %d -> %d (%s)", current, target, reason)
    try:
        from onnx import version_converter

        upgraded = version_converter.convert_version(model, target)
    except Exception as e:
        raise UserError(f"model: cannot upgrade opset {current} -> {target} needed for {reason}: {e}") from None
    return upgraded


# ---------------------------------------------------------------------------------- graph conversion
@dataclass
class ModelMeta:
    """What export needs to give back that graphsurgeon does not carry."""

    ir_version: int
    opset: int
    producer_name: str = ""
    producer_version: str = ""
    metadata_props: dict[str, str] = field(default_factory=dict)
    io_dtypes: dict[str, Any] = field(default_factory=dict)  # original fp16 interface, name -> np.dtype
    source: str = ""


def import_graph(model: onnx.ModelProto, source: str = "") -> tuple[gs.Graph, ModelMeta]:
    """graphsurgeon graph of ``model`` plus the metadata export restores."""
    meta = ModelMeta(
        ir_version=int(model.ir_version),
        opset=opset_of(model),
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        metadata_props={p.key: p.value for p in model.metadata_props},
        source=source,
    )
    graph = gs.import_onnx(model)
    map_external_constants(graph)
    _numpy_variable_dtypes(graph)
    name_nodes(graph)
    return graph, meta


def _numpy_variable_dtypes(graph: gs.Graph) -> None:
    """graphsurgeon leaves bfloat16 / fp8 / 4-bit tensor types as ONNX type numbers; give them their numpy
    (ml_dtypes) dtype so that ``np.dtype(t.dtype)`` works everywhere (graphsurgeon exports those fine)."""
    for g in walk_graphs(graph):
        for t in g.tensors().values():
            if isinstance(t, gs.Variable) and isinstance(t.dtype, int) and getattr(t, "type", "tensor_type") == \
                    "tensor_type":
                with contextlib.suppress(Exception):
                    dt = np.dtype(helper.tensor_dtype_to_np_dtype(t.dtype))
                    if not dt.hasobject:
                        t.dtype = dt


# ------------------------------------------------------------------------------- external tensors, lazily
def walk_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """``graph`` and every subgraph nested in it (If / Loop / Scan bodies), outermost first."""
    stack = [graph]
    seen: set[int] = set()
    while stack:
        g = stack.pop(0)
        if id(g) in seen:
            continue
        seen.add(id(g))
        yield g
        for node in g.nodes:
            for v in node.attrs.values():
                if isinstance(v, gs.Graph):
                    stack.append(v)
                elif isinstance(v, (list, tuple)):
                    stack.extend(x for x in v if isinstance(x, gs.Graph))


def all_constants(graph: gs.Graph, *, attributes: bool = True) -> list[gs.Constant]:
    """Every distinct constant of ``graph`` and its subgraphs, in a deterministic order (graph order, then
    node order, then input/output order; tensors in node attributes last when ``attributes``)."""
    out: dict[int, gs.Constant] = {}
    attrs: dict[int, gs.Constant] = {}
    for g in walk_graphs(graph):
        for t in [*g.inputs, *g.outputs]:
            if isinstance(t, gs.Constant):
                out.setdefault(id(t), t)
        for node in g.nodes:
            for t in [*node.inputs, *node.outputs]:
                if isinstance(t, gs.Constant):
                    out.setdefault(id(t), t)
            if attributes:
                for v in node.attrs.values():
                    if isinstance(v, gs.Constant):
                        attrs.setdefault(id(v), v)
    return [*out.values(), *(c for k, c in attrs.items() if k not in out)]


def _lazy_external(c: gs.Constant) -> TensorProto | None:
    from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

    v = c._values
    if isinstance(v, LazyValues) and not isinstance(v, SparseValues) and isinstance(v.tensor, TensorProto):
        if v.tensor.data_location == TensorProto.EXTERNAL:
            return v.tensor
    return None


def external_array(t: TensorProto) -> np.ndarray:
    """The values of an external tensor resolved by :func:`load_model`: a read-only ``numpy.memmap`` over its
    byte range (no copy) when large, else read. Packed 4-bit types are read and unpacked."""
    loc, offset, length = _checked_external(t)
    shape = tuple(int(d) for d in t.dims)
    if t.data_type in _PACKED_TYPES or length < MMAP_MIN_BYTES:
        with open(loc, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise UserError(f"tensor '{t.name}': external data file '{loc}' is shorter than expected")
        tmp = TensorProto()
        tmp.data_type = t.data_type
        tmp.dims.extend(shape)
        tmp.raw_data = data
        return np.array(numpy_helper.to_array(tmp))
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")
    arr = np.memmap(loc, dtype=dtype, mode="r", offset=offset, shape=shape)
    return arr


def map_external_constants(graph: gs.Graph) -> int:
    """Give every constant still pointing at an external data file (graphsurgeon's lazy values) a memory-mapped
    array instead: nothing is read until a pass asks for the values, and the pages can be dropped again
    (:func:`release_values`). Lazy constants of bfloat16 / fp8 types get their numpy (ml_dtypes) dtype.
    Returns how many constants were mapped."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    n = 0
    for c in all_constants(graph):
        v = c._values
        if isinstance(v, LazyValues) and isinstance(v.dtype, int):
            # graphsurgeon leaves bfloat16 / fp8 as ONNX type numbers; their values load as ml_dtypes arrays
            with contextlib.suppress(Exception):
                v.dtype = np.dtype(helper.tensor_dtype_to_np_dtype(v.dtype))
        t = _lazy_external(c)
        if t is None:
            continue
        c.values = external_array(t)
        c.data_location = None  # graphsurgeon would otherwise mark the re-exported inline tensor external
        n += 1
    return n


def _advise_dontneed(arr: Any) -> None:
    """Drop the resident pages of a memory-mapped array (they stay in the page cache, not in our RSS)."""
    import mmap

    base = arr
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    mm = getattr(base, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(ValueError, OSError):
            mm.madvise(mmap.MADV_DONTNEED)


def trim_memory() -> None:
    """Collect garbage (graphsurgeon graphs are node <-> tensor reference cycles) and give freed heap memory
    back to the operating system (glibc keeps freed arrays below its 32 MB mmap threshold otherwise)."""
    import gc
    import sys

    gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes
        import ctypes.util

        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim(0)


def release_graph(graph: gs.Graph, *, trim: bool = True) -> None:
    """Free the weights of a graph that is no longer needed (written to disk), even while some object (a pass
    keeping an index, say) still refers to it; then :func:`trim_memory` (unless ``trim`` is False: a full
    garbage collection costs tens of milliseconds, worth it only before memory-hungry work)."""
    for c in all_constants(graph):
        release_values(c)
    if trim:
        trim_memory()


def release_values(c: gs.Constant) -> None:
    """Free the values of a constant nothing reads any more (e.g. a float weight once its quantized form
    replaced it): a memory-mapped weight is unmapped, an in-memory one freed. The constant keeps its name
    and dtype, with an empty shape-(0,) array."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    v = c._values
    dtype = v.dtype if not isinstance(v, LazyValues) else np.float32
    _advise_dontneed(v)
    try:
        c.values = np.zeros((0,), dtype=dtype)
    except TypeError:
        c.values = np.zeros((0,), dtype=np.float32)


def name_nodes(graph: gs.Graph) -> int:
    """Give every unnamed (or duplicate-named) node a deterministic unique name ``{op_type}_{index}``."""
    taken = {n.name for n in graph.nodes if n.name}
    seen: set[str] = set()
    count = 0
    for i, n in enumerate(graph.nodes):
        if n.name and n.name not in seen:
            seen.add(n.name)
            continue
        base = f"{n.op}_{i}"
        name, j = base, 1
        while name in taken or name in seen:
            name = f"{base}_{j}"
            j += 1
        n.name = name
        seen.add(name)
        taken.add(name)
        count += 1
    return count


def tag(node: gs.Node, pass_name: str) -> gs.Node:
    """Mark ``node`` as created by ``pass_name`` (exported as node metadata ``qcompiler.pass``)."""
    setattr(node, _TAG_ATTR, pass_name)
    return node


def tag_of(node: gs.Node) -> str | None:
    return getattr(node, _TAG_ATTR, None)


def export_model(graph: gs.Graph, meta: ModelMeta | None = None, *,
                 external: ExternalDataWriter | None = None, consume: bool = False) -> onnx.ModelProto:
    """Export ``graph`` to a ModelProto, restoring metadata and writing node tags. With ``external``, large
    constants are streamed to its data file and the ModelProto only references them. ``consume``: the caller
    discards ``graph`` afterwards, so it is cleaned up, sorted and (with ``external``) rewired to the written
    tensors in place instead of on a copy (copying a graph costs as much as exporting it)."""
    tags = {n.name: tag_of(n) for n in graph.nodes if tag_of(n)}
    g = graph if consume else graph.copy()
    g.cleanup(remove_unused_graph_inputs=False).toposort()
    if external is not None:
        external.externalize(g)
    model = _gs_export(g)
    # Intermediate shapes are re-inferred by every runtime; storing them only grows the file.
    del model.graph.value_info[:]
    if meta is not None:
        model.producer_name = "qcompiler"
        from qcompiler import __version__

        model.producer_version = __version__
        del model.metadata_props[:]
        for k, v in sorted(meta.metadata_props.items()):
            model.metadata_props.add(key=k, value=v)
        model.ir_version = max(meta.ir_version, int(model.ir_version) if model.ir_version else 0)
    if tags:
        model.ir_version = max(int(model.ir_version), MIN_IR_FOR_TAGS)
        for node in model.graph.node:
            t = tags.get(node.name)
            if t:
                node.metadata_props.add(key=TAG_KEY, value=t)
    # ai.onnx.ml and friends: keep the imports graphsurgeon found; make sure custom domains used are imported.
    domains = {imp.domain for imp in model.opset_import}
    for node in model.graph.node:
        if node.domain not in domains and node.domain not in ("", "ai.onnx"):
            model.opset_import.add(domain=node.domain, version=1)
            domains.add(node.domain)
    return model


def copy_graph(graph: gs.Graph) -> gs.Graph:
    """A deep, independent copy of ``graph`` (via protobuf, so constants are not shared)."""
    return gs.import_onnx(_gs_export(graph.copy()))


_SUBBYTE = {np.dtype(d) for d in (ml_dtypes.int4, ml_dtypes.uint4)}


def _gs_export(g: gs.Graph) -> onnx.ModelProto:
    """``gs.export_onnx`` of a graph *copy*; int4/uint4 constants are packed two per byte first (graphsurgeon
    writes one byte per element, which the ONNX checker and onnxruntime reject)."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    for t in g.tensors().values():
        if isinstance(t, gs.Constant) and not isinstance(t._values, LazyValues) and t.values.dtype in _SUBBYTE:
            t._values = LazyValues(numpy_helper.from_array(np.asarray(t.values), t.name))
    return gs.export_onnx(g, do_type_check=False)


# ----------------------------------------------------------------------------------------------- fp16
def _f32(dtype: Any) -> Any:
    return np.float32 if dtype is not None and np.dtype(dtype) == np.float16 else dtype


def to_float32(graph: gs.Graph) -> dict[str, Any]:
    """Rewrite an fp16 graph to fp32 in place. Returns the original dtypes of its inputs/outputs."""
    io = {t.name: t.dtype for t in [*graph.inputs, *graph.outputs]}
    if not any(d is not None and np.dtype(d) == np.float16 for d in io.values()) and not any(
        isinstance(t, gs.Constant) and t.values.dtype == np.float16 for t in graph.tensors().values()
    ):
        return {}
    f16 = int(TensorProto.FLOAT16)
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            if t.values.dtype == np.float16:
                t.values = np.asarray(t.values, dtype=np.float32)
        elif t.dtype is not None and np.dtype(t.dtype) == np.float16:
            t.dtype = np.float32
    for n in graph.nodes:
        if n.op == "Cast" and int(n.attrs.get("to", 0)) == f16:
            n.attrs["to"] = int(TensorProto.FLOAT)
        for k, v in list(n.attrs.items()):
            if isinstance(v, gs.Constant) and v.values.dtype == np.float16:
                n.attrs[k] = gs.Constant(v.name, np.asarray(v.values, dtype=np.float32))
    return {k: np.dtype(v) for k, v in io.items() if v is not None and np.dtype(v) == np.float16}


def _replace_in(seq: Any, old: Any, new: Any) -> None:
    for i, x in enumerate(list(seq)):
        if x is old:
            seq[i] = new


def restore_io_dtypes(graph: gs.Graph, io_dtypes: dict[str, Any], pass_name: str = "import") -> None:
    """Put the fp16 interface back: Cast at every fp16 graph input and output, keeping their names."""
    if not io_dtypes:
        return
    for i, inp in enumerate(list(graph.inputs)):
        if inp.name not in io_dtypes:
            continue
        inner = gs.Variable(inp.name + "_fp32", dtype=np.float32, shape=inp.shape)
        for consumer in list(inp.outputs):
            _replace_in(consumer.inputs, inp, inner)
        inp.dtype = np.float16
        graph.nodes.append(tag(gs.Node("Cast", name=inp.name + "_to_fp32", attrs={"to": int(TensorProto.FLOAT)},
                                       inputs=[inp], outputs=[inner]), pass_name))
        graph.inputs[i] = inp
    for i, out in enumerate(list(graph.outputs)):
        if out.name not in io_dtypes:
            continue
        inner = gs.Variable(out.name + "_fp32", dtype=np.float32, shape=out.shape)
        for producer in list(out.inputs):
            _replace_in(producer.outputs, out, inner)
        for consumer in list(out.outputs):
            _replace_in(consumer.inputs, out, inner)
        out.dtype = np.float16
        graph.nodes.append(tag(gs.Node("Cast", name=out.name + "_to_fp16", attrs={"to": int(TensorProto.FLOAT16)},
                                       inputs=[inner], outputs=[out]), pass_name))
        graph.outputs[i] = out


# ---------------------------------------------------------------------------------------------- saving
class ExternalDataWriter:
    """Streams the large tensors of a model to one external data file, one tensor at a time.

    Used on a graphsurgeon graph *copy* (:meth:`externalize`, called by :func:`export_model`): every constant of
    at least ``threshold`` bytes is written to ``path`` (offsets aligned, see ``EXTERNAL_ALIGN``) and replaced, in
    the copy, by a TensorProto that only references it, so the exported ModelProto stays small. Contiguous numpy
    arrays are written without a copy; a memory-mapped source gives its pages back once written. The file is
    created on the first tensor written (``wrote`` tells whether it was).
    """

    def __init__(self, path: str | os.PathLike[str], threshold: int = DEFAULT_EXTERNAL_THRESHOLD,
                 location: str | None = None) -> None:
        self.path = Path(path)
        self.location = location or self.path.name
        self.threshold = max(int(threshold), 0)
        self.offset = 0
        self.tensors = 0
        self._f: Any = None
        self._done: dict[int, tuple[int, int, int, list[int]]] = {}  # id(values) -> offset, length, type, dims

    @property
    def wrote(self) -> bool:
        return self._f is not None

    def __enter__(self) -> ExternalDataWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._f is not None and not self._f.closed:
            self._f.close()

    def _write(self, chunks: Iterable[Any], length: int) -> int:
        if self._f is None:
            self._f = open(self.path, "wb")  # closed in close()
        align = EXTERNAL_ALIGN if length >= EXTERNAL_ALIGN_MIN_BYTES else 64
        pad = (-self.offset) % align
        if pad:
            self._f.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        for chunk in chunks:
            self._f.write(chunk)
        self.offset += length
        self.tensors += 1
        return start

    def _reference(self, name: str, data_type: int, dims: Sequence[int], offset: int, length: int) -> TensorProto:
        t = TensorProto()
        t.name = name
        t.data_type = int(data_type)
        t.dims.extend(int(d) for d in dims)
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value=self.location)
        t.external_data.add(key="offset", value=str(offset))
        t.external_data.add(key="length", value=str(length))
        return t

    def add_tensor(self, t: TensorProto) -> TensorProto:
        """An external reference for the TensorProto ``t`` (raw data, or an already external resolved tensor)."""
        length = tensor_nbytes(t)
        if t.data_location == TensorProto.EXTERNAL:
            src, offset, length = _checked_external(t)

            def copy() -> Iterator[bytes]:
                with open(src, "rb") as f:
                    f.seek(offset)
                    left = length
                    while left > 0:
                        chunk = f.read(min(left, 64 << 20))
                        if not chunk:
                            raise UserError(f"tensor '{t.name}': external data file '{src}' is shorter than "
                                            "expected")
                        left -= len(chunk)
                        yield chunk

            start = self._write(copy(), length)
        elif t.HasField("raw_data"):
            data = t.raw_data
            start = self._write([data], len(data))
            length = len(data)
            del data
        else:
            arr = numpy_helper.to_array(t)
            ref = numpy_helper.from_array(arr, t.name)
            data = ref.raw_data
            start = self._write([data], len(data))
            length = len(data)
        return self._reference(t.name, t.data_type, list(t.dims), start, length)

    def add_array(self, name: str, arr: np.ndarray, export_dtype: Any = None) -> TensorProto | None:
        """An external reference for array ``arr`` (None when it cannot be stored as raw bytes: strings)."""
        if arr.dtype.hasobject or arr.dtype.kind in "USV":
            return None
        key = id(arr)
        if key in self._done and export_dtype is None:
            offset, length, data_type, dims = self._done[key]
            return self._reference(name, data_type, dims, offset, length)
        if export_dtype is not None and np.dtype(export_dtype) != arr.dtype:
            proto = gs.exporters.onnx_exporter.constant_to_onnx_tensor(gs.Constant(name, arr, export_dtype=export_dtype))
            return self.add_tensor(proto)
        data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        dims = [int(d) for d in arr.shape]
        if data_type in _PACKED_TYPES:
            raw = numpy_helper.from_array(np.asarray(arr), name).raw_data
            offset = self._write([raw], len(raw))
            length = len(raw)
        else:
            flat = np.ascontiguousarray(arr)
            if flat.dtype.byteorder == ">":
                flat = flat.astype(flat.dtype.newbyteorder("<"))
            length = int(flat.nbytes)
            offset = self._write([flat.reshape(-1).view(np.uint8)] if length else [], length)
            del flat
        _advise_dontneed(arr)
        self._done[key] = (offset, length, data_type, dims)
        return self._reference(name, data_type, dims, offset, length)

    def externalize(self, graph: gs.Graph) -> int:
        """Write the large constants of ``graph`` (a copy: its constants are swapped for references)."""
        from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

        n = 0
        for c in all_constants(graph, attributes=False):
            v = c._values
            if isinstance(v, SparseValues):
                continue
            if isinstance(v, LazyValues):
                t = v.tensor
                if not isinstance(t, TensorProto) or tensor_nbytes(t) < self.threshold or (
                        t.data_location != TensorProto.EXTERNAL and not t.HasField("raw_data")
                        and _bits(t.data_type) is None):
                    continue
                ref: TensorProto | None = self.add_tensor(t)
                ref.name = c.name  # type: ignore[union-attr]
            else:
                arr = np.asarray(v)
                if arr.nbytes < self.threshold:
                    continue
                ref = self.add_array(c.name, arr, c._export_dtype)
            if ref is None:
                continue
            c._values = LazyValues(ref)
            c.data_location = None
            n += 1
        return n


def constant_bytes(graph: gs.Graph) -> int:
    """Total bytes of the constants of ``graph`` and its subgraphs (without loading lazy values)."""
    return sum(int(getattr(c._values, "nbytes", 0) or 0) for c in all_constants(graph))


def write_model(graph: gs.Graph, meta: ModelMeta | None, path: str | os.PathLike[str], *,
                external_data_threshold: int | None = None, consume: bool = False) -> list[Path]:
    """Export ``graph`` and write it to ``path`` tensor by tensor (not atomic: write into a staging folder, see
    :func:`staging`). With ``external_data_threshold`` — or automatically when the constants exceed
    ``INLINE_LIMIT`` — tensors of at least that many bytes go to ``<name>.data`` beside it, streamed, so the
    model is never held twice in memory. ``consume``: see :func:`export_model`. Returns the files written
    (model first)."""
    dest = Path(path)
    threshold = external_data_threshold
    if threshold is None and constant_bytes(graph) >= INLINE_LIMIT:
        threshold = DEFAULT_EXTERNAL_THRESHOLD
    files = [dest]
    try:
        if threshold is not None:
            data = dest.with_name(dest.name + ".data")
            with ExternalDataWriter(data, threshold) as w:
                model = export_model(graph, meta, external=w, consume=consume)
            if w.wrote:
                files.append(data)
        else:
            model = export_model(graph, meta, consume=consume)
        _write_proto_file(model, dest)
    except OSError as e:  # disk full, permissions: the environment, not a bug
        raise UserError(f"{dest}: cannot write the model: {e.strerror or e}") from None
    return files


def _write_proto_file(model: onnx.ModelProto, dest: Path) -> None:
    size = model.ByteSize()
    if size >= PROTOBUF_LIMIT:
        raise UserError(f"{dest}: the model is {size} bytes without its external data, beyond the 2 GB protobuf "
                        "limit (give a smaller external data threshold)")
    with open(dest, "wb") as f:
        f.write(model.SerializeToString())


@contextlib.contextmanager
def staging(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder beside ``dest`` to write a model and its side files into. When the block succeeds,
    every file in it is moved (``os.replace``) into ``dest``'s folder; on any failure the folder is removed and
    nothing is left behind."""
    d = Path(dest)
    created = []  # folders made here, removed again when nothing gets written
    p = d.parent.absolute()
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=".qcompiler-", dir=d.parent))
    except OSError as e:
        for c in created:
            with contextlib.suppress(OSError):
                c.rmdir()
        raise UserError(f"{d}: cannot write the output here: {e.strerror or e}") from None
    ok = False
    try:
        yield tmpdir
        umask = os.umask(0)
        os.umask(umask)
        for f in sorted(tmpdir.iterdir()):
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        for f in sorted(tmpdir.iterdir()):
            os.replace(f, d.parent / f.name)
        ok = True
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if not ok:
            for c in created:
                with contextlib.suppress(OSError):
                    c.rmdir()


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data_threshold: int | None = None,
) -> list[Path]:
    """Write ``model`` atomically. With ``external_data_threshold`` (bytes) — or automatically when the
    model is over the 2 GB protobuf limit or has external data — tensors at least that large go to
    ``<name>.data`` beside it (external tensors of a loaded model are copied there, chunk by chunk).

    Returns the paths written. On failure nothing is left behind. ``model`` is not modified.
    """
    dest = Path(path)
    if external_data_threshold is None and (model.ByteSize() >= PROTOBUF_LIMIT or has_external_data(model)):
        external_data_threshold = DEFAULT_EXTERNAL_THRESHOLD
    written: list[Path] = []
    with staging(dest) as tmpdir:
        tmp_model = tmpdir / dest.name
        if external_data_threshold is None:
            _write_proto_file(model, tmp_model)
        else:
            out = onnx.ModelProto()
            out.CopyFrom(model)
            with ExternalDataWriter(tmpdir / (dest.name + ".data"), external_data_threshold) as w:
                for t in _iter_all_tensors(out):
                    if t.data_location != TensorProto.EXTERNAL and (
                            not t.HasField("raw_data") or tensor_nbytes(t) < w.threshold):
                        continue
                    ref = w.add_tensor(t)
                    t.ClearField("raw_data")
                    del t.external_data[:]
                    t.external_data.extend(ref.external_data)
                    t.data_location = TensorProto.EXTERNAL
            _write_proto_file(out, tmp_model)
            del out
        written = [dest.parent / f.name for f in sorted(tmpdir.iterdir())]
    return written


def serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


# ------------------------------------------------------------------------------------------ onnxruntime
def _value_info_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is a convenience here
        inferred = model
    g = inferred.graph
    return {vi.name: vi.type for vi in [*g.value_info, *g.input, *g.output]}


def _proto_graphs(g: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``g`` and every subgraph body nested in it (If / Loop / Scan attributes), depth first."""
    yield g
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _proto_graphs(a.g)
            for sg in a.graphs:
                yield from _proto_graphs(sg)


def tensor_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor name of ``model``: graph inputs, outputs, initializers, node inputs and outputs, subgraph
    bodies included."""
    out: set[str] = set()
    for g in _proto_graphs(model.graph):
        out.update(v.name for v in [*g.input, *g.output])
        out.update(t.name for t in g.initializer)
        for node in g.node:
            out.update(node.input)
            out.update(node.output)
    out.discard("")
    return out


def renamed_tensors(model: onnx.ModelProto, names: dict[str, str]) -> onnx.ModelProto:
    """A copy of ``model`` whose tensors named as keys of ``names`` take the values' names (graph, subgraphs,
    initializers, value_info; graph inputs and outputs too). Used to compare a ``compact-names`` model with its
    float model by the original names."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for g in _proto_graphs(out.graph):
        for seq in (g.input, g.output, g.value_info, g.initializer, g.sparse_initializer):
            for item in seq:
                holder = item.values if isinstance(item, onnx.SparseTensorProto) else item
                holder.name = names.get(holder.name, holder.name)
        for node in g.node:
            node.input[:] = [names.get(n, n) for n in node.input]
            node.output[:] = [names.get(n, n) for n in node.output]
    return out


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


def infer_shapes(model: onnx.ModelProto, input_shapes: dict[str, Sequence[int]],
                 known: dict[str, tuple[Sequence[int], Any]] | None = None
                 ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Static ONNX shape inference (with data propagation) of ``model``'s graph with its inputs fixed at
    ``input_shapes``: name -> (shape, numpy dtype) of every tensor whose shape comes out fully known. Declared
    intermediate and output shapes are dropped first, so only what follows from the inputs — and from
    ``known`` (name -> (shape, dtype) of tensors measured at these input shapes, e.g. by a calibration run) —
    counts. Tensors of types numpy lacks (int4, fp8, bfloat16) are left out. ``{}`` when inference fails or the
    proto is above ``INFER_MAX_PROTO_BYTES``."""
    if model.ByteSize() > INFER_MAX_PROTO_BYTES:
        return {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    known = dict(known or {})

    def set_shape(vi: onnx.ValueInfoProto, dims: Sequence[int]) -> None:
        shape = vi.type.tensor_type.shape
        shape.ClearField("dim")
        for d in dims:
            shape.dim.add().dim_value = int(d)

    for vi in g.input:
        if vi.name in input_shapes and vi.type.HasField("tensor_type"):
            set_shape(vi, input_shapes[vi.name])
    del g.value_info[:]
    for vi in g.output:
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")
            if vi.name in known:
                set_shape(vi, known[vi.name][0])
    declared = {vi.name for vi in [*g.input, *g.output]} | {t.name for t in g.initializer}
    for name, (dims, dtype) in known.items():
        if name not in declared:
            g.value_info.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                                              [int(d) for d in dims]))
    try:
        inferred = onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:  # best effort: the caller falls back to running the model
        log.info("shape inference failed: %s", " ".join(str(e).split())[:200])
        return {}
    del m
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    ig = inferred.graph
    for vi in [*ig.input, *ig.value_info, *ig.output]:
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tt is None or not tt.elem_type or not tt.HasField("shape"):
            continue
        dims = [int(d.dim_value) if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if any(d < 0 for d in dims):
            continue
        try:
            dt = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:  # an element type onnx cannot map
            continue
        if dt.type.__module__ != "numpy":
            continue
        out[vi.name] = (tuple(dims), dt)
    return out


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


def parameter_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all tensors of ``model`` (external ones included), without reading any."""
    return sum(tensor_nbytes(t) for t in _iter_all_tensors(model))


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
    (model + external data written tensor by tensor), never as one serialized copy in memory.
    """
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


def model_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Facts for ``qcompiler inspect``: opset, IO signatures, op histogram, parameter bytes."""
    g = model.graph
    init_names = {t.name for t in g.initializer}

    def sig(vi: onnx.ValueInfoProto) -> dict[str, Any]:
        tt = vi.type.tensor_type
        dims: list[Any] = []
        for d in tt.shape.dim:
            dims.append(d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?"))
        return {"name": vi.name, "dtype": helper.tensor_dtype_to_np_dtype(tt.elem_type).name
                if tt.elem_type else "?", "shape": dims}

    ops: dict[str, int] = {}
    for n in g.node:
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        ops[key] = ops.get(key, 0) + 1
    param_bytes = parameter_bytes(model)
    return {
        "ir_version": int(model.ir_version),
        "opset": {imp.domain or "ai.onnx": int(imp.version) for imp in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [sig(i) for i in g.input if i.name not in init_names],
        "outputs": [sig(o) for o in g.output],
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "nodes": len(g.node),
        "parameter_bytes": param_bytes,
    }


def dtype_name(elem_type: int) -> str:
    return str(helper.tensor_dtype_to_np_dtype(elem_type))


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]):  # type: ignore[no-untyped-def]
    """Context manager yielding a temp path; renamed to ``path`` only when the block succeeds."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".qcompiler-", suffix=dest.suffix, dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
