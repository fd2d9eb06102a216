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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from qcompiler.errors import UserError

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
TAG_KEY = "qcompiler.pass"
_TAG_ATTR = "_qcompiler_pass"
MIN_IR_FOR_TAGS = 10
# Largest tensor (in elements) we accept from a model before refusing it as absurd.
MAX_TENSOR_ELEMENTS = 2**34


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


def _iter_all_tensors(model: onnx.ModelProto) -> Iterable[TensorProto]:
    def from_graph(g: onnx.GraphProto) -> Iterable[TensorProto]:
        yield from g.initializer
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.GRAPH:
                    yield from from_graph(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        yield from from_graph(sub)

    yield from from_graph(model.graph)


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    base_dir = path.parent
    for t in _iter_all_tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = _external_info(t)
        where = f"{path}: tensor '{t.name}'"
        full = _safe_external_path(base_dir, info.get("location", ""), where)
        offset = int(info.get("offset", "0") or 0)
        size = full.stat().st_size
        length = int(info["length"]) if info.get("length") else size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise UserError(f"{where}: external data range [{offset}, {offset + length}) exceeds file '{full.name}'")
        with open(full, "rb") as f:
            f.seek(offset)
            t.raw_data = f.read(length)
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT


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
    """Load an ONNX model with its external data. Never writes anything. Raises :class:`UserError`."""
    p = Path(path)
    _check_path(p)
    try:
        with open(p, "rb") as f:
            data = f.read()
        model = onnx.ModelProto()
        model.ParseFromString(data)
    except Exception as e:  # protobuf DecodeError and friends
        raise UserError(f"{p}: not an ONNX model (protobuf parse failed: {type(e).__name__})") from None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise UserError(f"{p}: not an ONNX model (no graph / ir_version / opset_import)")
    _check_tensor_sizes(model, p)
    _load_external_data(model, p)
    if check:
        check_model(model, where=str(p))
    return model


def check_model(model: onnx.ModelProto, *, where: str = "model", full: bool = False) -> None:
    """Run the ONNX checker (and strict shape inference when ``full``); raise :class:`UserError` on failure."""
    try:
        if model.ByteSize() < PROTOBUF_LIMIT:
            onnx.checker.check_model(model)
            if full:
                onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:
        msg = str(e).strip().splitlines()
        first = next((m for m in msg if m.strip()), type(e).__name__)
        raise UserError(f"{where}: fails the ONNX checker: {first.strip()}") from None


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
    name_nodes(graph)
    return graph, meta


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


def export_model(graph: gs.Graph, meta: ModelMeta | None = None) -> onnx.ModelProto:
    """Export ``graph`` to a ModelProto, restoring metadata and writing node tags."""
    tags = {n.name: tag_of(n) for n in graph.nodes if tag_of(n)}
    g = graph.copy()
    g.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(g, do_type_check=False)
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
    return gs.import_onnx(gs.export_onnx(graph.copy(), do_type_check=False))


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
def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data_threshold: int | None = None,
) -> list[Path]:
    """Write ``model`` atomically. With ``external_data_threshold`` (bytes) — or automatically when the
    model is over the 2 GB protobuf limit — tensors at least that large go to ``<name>.data`` beside it.

    Returns the paths written. On failure nothing is left behind.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if external_data_threshold is None and model.ByteSize() >= PROTOBUF_LIMIT:
        external_data_threshold = 1024
    tmpdir = Path(tempfile.mkdtemp(prefix=".qcompiler-", dir=dest.parent))
    written: list[Path] = []
    try:
        tmp_model = tmpdir / dest.name
        data_name = dest.name + ".data"
        if external_data_threshold is not None:
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=external_data_threshold, convert_attribute=False)
        else:
            onnx.save_model(model, str(tmp_model))
        for f in sorted(tmpdir.iterdir()):
            target = dest.parent / f.name
            os.replace(f, target)
            written.append(target)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
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


def session(model: onnx.ModelProto | bytes | str | os.PathLike[str], *, threads: int = 0,
            optimize: bool = True, optimized_path: str | None = None) -> Any:
    """An onnxruntime CPU InferenceSession for a ModelProto, serialized bytes or a file path."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    src: Any = model
    if isinstance(model, onnx.ModelProto):
        src = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        src = str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def graph_session(graph: gs.Graph, extra_outputs: Sequence[str] = (), **kw: Any) -> Any:
    """Session for a graphsurgeon graph, optionally exposing ``extra_outputs`` tensors."""
    model = gs.export_onnx(graph.copy(), do_type_check=False)
    if extra_outputs:
        model = with_outputs(model, extra_outputs)
    return session(model, **kw)


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
    param_bytes = 0
    for t in _iter_all_tensors(model):
        param_bytes += len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes
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
