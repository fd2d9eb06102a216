"""Converting between ONNX protobuf and onnx-graphsurgeon, and between opsets.

:func:`import_graph` gives a graphsurgeon graph (external weights memory-mapped, nodes named) and the
:class:`ModelMeta` that :func:`export_model` restores; export writes the ``qcompiler.pass`` tag of every node a
pass created (:func:`tag`) as node ``metadata_props``. :func:`upgrade_opset` converts the default-domain opset
when the quantized result needs it (and says so in the log).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from qcompiler import __version__
from qcompiler.core.errors import UserError
from qcompiler.core.tags import RESCALED_KEY, TAG_KEY, rescaled_by, tag_of
from qcompiler.ir.external import ExternalDataWriter, map_external_constants
from qcompiler.ir.walk import _proto_graphs, walk_graphs

log = logging.getLogger("qcompiler.ir")  # the package's logger, as before ir was split into modules

MIN_IR_FOR_TAGS = 10
_SUBBYTE = {np.dtype(d) for d in (ml_dtypes.int4, ml_dtypes.uint4)}


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
    if not any(imp.domain in ("", "ai.onnx") for imp in model.opset_import):
        # no default-domain op to convert (an ai.onnx.ml-only model): the import is added, nothing else changes
        log.info("adding default-domain opset %d (%s)", target, reason)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        out.opset_import.append(helper.make_opsetid("", target))
        out.ir_version = max(out.ir_version, helper.find_min_ir_version_for(list(out.opset_import),
                                                                             ignore_unknown=True))
        return out
    log.info("upgrading opset %d -> %d (%s)", current, target, reason)
    try:
        from onnx import version_converter

        upgraded = version_converter.convert_version(model, target)
    except Exception as e:
        raise UserError(f"model: cannot upgrade opset {current} -> {target} needed for {reason}: {e}") from None
    if interface_changed(model, upgraded):
        raise UserError(f"model: upgrading opset {current} -> {target} (needed for {reason}) would change the graph's "
                        "inputs / outputs (onnx's converter drops Scan-8's batch axis, for one); upgrade the model "
                        "yourself, or use a plan that needs no newer opset")
    return upgraded


def _interface(model: onnx.ModelProto) -> list[tuple[str, str, list[int | None] | None]]:
    """The graph's inputs and outputs as callers see them, in order: name, type ("tensor:1", or the kind of a
    non-tensor type), dims (an int where fixed, None where symbolic or unknown; None for no shape)."""
    inits = {t.name for t in model.graph.initializer}
    out: list[tuple[str, str, list[int | None] | None]] = []
    for v in [*model.graph.input, *model.graph.output]:
        if v.name in inits:
            continue
        kind = v.type.WhichOneof("value") or ""
        if kind != "tensor_type":
            out.append((v.name, kind, None))
            continue
        tt = v.type.tensor_type
        dims = [int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim] \
            if tt.HasField("shape") else None
        out.append((v.name, f"tensor:{tt.elem_type}", dims))
    return out


def interface_changed(old: onnx.ModelProto, new: onnx.ModelProto) -> bool:
    """Whether ``new`` (a converted ``old``) takes or gives something else: other names, types or ranks, or a
    fixed dim with another value. A symbolic dim that shape inference made fixed is a refinement, not a change
    (onnx's converter infers shapes: NonMaxSuppression's ``[N, M]`` output becomes ``[N, 3]``)."""
    a, b = _interface(old), _interface(new)
    if [(n, t) for n, t, _ in a] != [(n, t) for n, t, _ in b]:
        return True
    for (_, _, da), (_, _, db) in zip(a, b):
        if da is None or db is None:
            continue
        if len(da) != len(db) or any(x is not None and y is not None and x != y for x, y in zip(da, db)):
            return True
    return False


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
    #: graph inputs / outputs of a type other than a tensor (a ZipMap's sequence of maps), name -> serialized
    #: TypeProto: graphsurgeon keeps no map type (it exported a tensor of type 0, which onnxruntime refuses)
    io_types: dict[str, bytes] = field(default_factory=dict)


#: model-local functions kept as calls: the bodies the compiler's own custom ops carry (the packed target's and
#: QONNX's), which a runtime with native kernels never runs
KEPT_FUNCTION_DOMAINS = frozenset({"ai.qcompiler", "qonnx.custom_op.general"})


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its own model-local functions inlined (onnx's inliner), except those of
    :data:`KEPT_FUNCTION_DOMAINS`: a function a model author (or an exporter's module-as-function option) wrapped
    around a MatMul / Conv hid that layer from every pass — it stayed float. The inlined nodes come unnamed;
    cleanup names them. The same model when it has no such function."""
    ids = [(f.domain, f.name) for f in model.functions if f.domain not in KEPT_FUNCTION_DOMAINS]
    if not ids:
        return model
    log.info("inlining %d model-local function(s): %s", len(ids), ", ".join(f"{d}.{n}" for d, n in ids))
    from onnx import inliner

    return inliner.inline_selected_functions(model, ids)


def _refuse_type_attributes(model: onnx.ModelProto, source: str) -> None:
    """graphsurgeon drops TypeProto-valued attributes on import (``Optional``'s ``type``): the exported node would
    lose it and the model break. Refused by name instead (ONNX's test ``test_if_opt``; no model of the zoo has
    one)."""
    types = (onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS)
    for g in _proto_graphs(model.graph):
        for n in g.node:
            for a in n.attribute:
                if a.type in types:
                    raise UserError(f"{source or 'model'}: node '{n.name or n.op_type}' ({n.op_type}) has the type-valued "
                                    f"attribute '{a.name}', which the graph editor (onnx-graphsurgeon) cannot carry: "
                                    "not supported")


def import_graph(model: onnx.ModelProto, source: str = "") -> tuple[gs.Graph, ModelMeta]:
    """graphsurgeon graph of ``model`` (its own model-local functions inlined: :func:`inline_functions`) plus the
    metadata export restores."""
    model = inline_functions(model)
    _refuse_type_attributes(model, source)
    meta = ModelMeta(
        ir_version=int(model.ir_version),
        opset=opset_of(model),
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        metadata_props={p.key: p.value for p in model.metadata_props},
        source=source,
        io_types={v.name: v.type.SerializeToString() for v in [*model.graph.input, *model.graph.output]
                  if v.type.WhichOneof("value") not in (None, "tensor_type")},
    )
    with _gs_errors_only():  # its "could not convert FLOAT8E4M3FN to NumPy" for fp8 / int4 constants we handle
        graph = gs.import_onnx(model)
    map_external_constants(graph)
    _numpy_variable_dtypes(graph)
    name_nodes(graph)
    return graph, meta


@contextlib.contextmanager
def _gs_errors_only() -> Iterator[None]:
    """graphsurgeon's own logger (it prints to the terminal, past the CLI's ``-q``) at errors only inside the block."""
    logger = gs.logger.G_LOGGER
    before = logger.severity
    logger.severity = logger.ERROR
    try:
        yield
    finally:
        logger.severity = before


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


def export_model(graph: gs.Graph, meta: ModelMeta | None = None, *,
                 external: ExternalDataWriter | None = None, consume: bool = False) -> onnx.ModelProto:
    """Export ``graph`` to a ModelProto, restoring metadata and writing node tags. With ``external``, large
    constants are streamed to its data file and the ModelProto only references them. ``consume``: the caller
    discards ``graph`` afterwards, so it is cleaned up, sorted and (with ``external``) rewired to the written
    tensors in place instead of on a copy (copying a graph costs as much as exporting it)."""
    tags = {n.name: tag_of(n) for n in graph.nodes if tag_of(n)}
    rescaled: dict[str, str] = {}  # node name -> the pass that rescaled one of its outputs
    for n in graph.nodes:
        marks = [m for m in map(rescaled_by, n.outputs) if m]
        if marks and n.name:
            rescaled[n.name] = marks[0]
    g = graph if consume else graph.copy()
    g.cleanup(remove_unused_graph_inputs=False).toposort()
    if external is not None:
        external.externalize(g)
    model = _gs_export(g)
    # Intermediate shapes are re-inferred by every runtime; storing them only grows the file.
    del model.graph.value_info[:]
    if meta is not None:
        model.producer_name = "qcompiler"
        model.producer_version = __version__
        del model.metadata_props[:]
        for k, v in sorted(meta.metadata_props.items()):
            model.metadata_props.add(key=k, value=v)
        model.ir_version = max(meta.ir_version, int(model.ir_version) if model.ir_version else 0)
        for v in [*model.graph.input, *model.graph.output]:
            if v.name in meta.io_types:
                v.type.ParseFromString(meta.io_types[v.name])
    if tags or rescaled:
        model.ir_version = max(int(model.ir_version), MIN_IR_FOR_TAGS)
        for node in model.graph.node:
            t = tags.get(node.name)
            if t:
                node.metadata_props.add(key=TAG_KEY, value=t)
            r = rescaled.get(node.name)
            if r:
                node.metadata_props.add(key=RESCALED_KEY, value=r)
    if 0 < model.ir_version < 4:
        _list_initializers_as_inputs(model.graph)
    # ai.onnx.ml and friends: keep the imports graphsurgeon found; make sure custom domains used are imported.
    domains = {imp.domain for imp in model.opset_import}
    for node in model.graph.node:
        if node.domain not in domains and node.domain not in ("", "ai.onnx"):
            model.opset_import.add(domain=node.domain, version=1)
            domains.add(node.domain)
    return model


def _list_initializers_as_inputs(graph: onnx.GraphProto) -> None:
    """IR versions < 4 require every initializer to be a graph input too (the exports of that era list them
    all); constants the passes created (folded shapes, pads, quantized weights) are appended as inputs, in
    initializer order, so the model keeps its IR version and stays valid."""
    listed = {i.name for i in graph.input}
    for t in graph.initializer:
        if t.name not in listed:
            graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            listed.add(t.name)


def copy_graph(graph: gs.Graph) -> gs.Graph:
    """A deep, independent copy of ``graph`` (via protobuf, so constants are not shared)."""
    with _gs_errors_only():
        return gs.import_onnx(_gs_export(graph.copy()))


def _gs_export(g: gs.Graph) -> onnx.ModelProto:
    """``gs.export_onnx`` of a graph *copy*; int4/uint4 constants are packed two per byte first (graphsurgeon
    writes one byte per element, which the ONNX checker and onnxruntime reject)."""
    for t in g.tensors().values():
        if isinstance(t, gs.Constant) and not isinstance(t._values, LazyValues) and t.values.dtype in _SUBBYTE:
            t._values = LazyValues(numpy_helper.from_array(np.asarray(t.values), t.name))
    # graphsurgeon writes the value info of tensor, sequence and sparse tensor types only (an optional's raised
    # UnboundLocalError): the others go out untyped, and export_model restores the graph's own inputs' and
    # outputs' types from the input model (ModelMeta.io_types); a subgraph's may stay untyped
    odd = [(t, t.dtype) for sub in walk_graphs(g) for t in [*sub.inputs, *sub.outputs]
           if isinstance(t, gs.Variable) and t.dtype is not None
           and (getattr(t, "type", "tensor_type") not in ("tensor_type", "sequence_type", "sparse_tensor_type")
                or isinstance(t.dtype, onnx.TypeProto))]  # (an optional's element type, as graphsurgeon imports it)
    for t, _ in odd:
        t.dtype = None
    try:
        return gs.export_onnx(g, do_type_check=False)
    finally:
        for t, dtype in odd:
            t.dtype = dtype


def rescaled_tensors(model: onnx.ModelProto) -> dict[str, str]:
    """Output name -> pass, for every output of a node of ``model``'s main graph that carries the
    ``qcompiler.rescaled`` mark (:func:`qcompiler.core.tags.mark_rescaled`): tensors whose values differ from the
    input model's same-named ones by design of that pass."""
    out: dict[str, str] = {}
    for node in model.graph.node:
        for p in node.metadata_props:
            if p.key == RESCALED_KEY:
                out.update((o, p.value) for o in node.output if o)
    return out
