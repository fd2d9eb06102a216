"""The cost of a model: :func:`model_cost` (``qcompiler inspect --cost``) and :func:`compile_cost` (the cost
section of a compile) put the bytes, shapes and per-op analysis together into a :class:`CostReport`.

Part of the cost model (:mod:`qcompiler.report.cost`, whose docstring defines the numbers).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler import ir
from qcompiler.core import profile
from qcompiler.core.errors import UserError
from qcompiler.report.cost.analysis import MAC_OPS, PASS_THROUGH, _Analysis, _node_bits, _owners, _peak
from qcompiler.report.cost.bits import stored_bytes
from qcompiler.report.cost.shapes import (
    _feeds,
    _inferred_shapes,
    _input_feed_shapes,
    _runtime_shapes,
    _static_shapes,
)
from qcompiler.report.cost.table import CostReport, LayerCost

if TYPE_CHECKING:
    from qcompiler.ir.report_support import ModelProto


def model_cost(model: ModelProto | str | os.PathLike[str], *,
               feed_shapes: Mapping[str, Sequence[int]] | None = None,
               files: Sequence[str | os.PathLike[str]] | None = None,
               shapes: bool = True,
               known_shapes: Mapping[str, tuple[Sequence[int], Any]] | None = None) -> CostReport:
    """Cost report of ``model`` (a path or a loaded ``ModelProto``).

    ``feed_shapes``: shapes of (some) graph inputs, resolving their dynamic dims (others: 1).
    ``files``: the files the model is stored in (their sizes are the total; default: the path given, plus its
    external data files; for a ModelProto without files, its serialized size).
    ``shapes=False`` skips the shapes: bytes only (MACs, BitOps and the peak are then unknown).
    ``known_shapes``: name -> (shape, dtype) of tensors measured at these input shapes (the graph inputs'
    entries say which shapes: the others are used only when those agree with the shapes here), helping static
    shape inference so that the model need not be run.
    """
    path: Path | None = None
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        model = ir.load_model(path)
    with profile.step("import"):
        graph, _meta = ir.import_graph(model)
    graph.toposort()
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    notes: list[str] = []

    # ---- bytes --------------------------------------------------------------------------------------
    owned, unattributed = _owners(graph, order)
    file_list: list[Path] = [Path(f) for f in files] if files is not None else []
    if files is None and path is not None:
        file_list = [path, *_external_files(model)]
    if file_list:
        total = sum(f.stat().st_size for f in dict.fromkeys(file_list))
    else:
        total = len(ir.serialize(model))
        if ir.has_external_data(model):
            total += sum(stored_bytes(c.shape, c.dtype) for c in ir.all_constants(graph)
                         if isinstance(getattr(c, "_values", None), np.memmap))
            notes.append("external data counted from its tensors (no files given)")
    tensor_bytes = sum(owned.values()) + unattributed

    # ---- shapes -------------------------------------------------------------------------------------
    rt: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    shapes_from = "none"
    used: dict[str, list[int]] = {}
    given = dict(feed_shapes or {})
    if shapes:
        attempts: list[tuple[str, int, int | None]] = [("dynamic dims 1", 1, None)]
        if any(not isinstance(d, int) or d < 0 for t in graph.inputs if not isinstance(t, gs.Constant)
               and t.name not in given for d in (t.shape or [])):
            attempts.append(("dynamic spatial / sequence dims 32", 1, 32))
        errors = []
        for label, dyn, spatial in attempts:
            used = _input_feed_shapes(graph, given, dyn, spatial)
            try:
                if spatial is None:  # static inference first: no session when it gives every shape
                    with profile.step("shape inference"):
                        rt = _static_shapes(model, graph, used, known_shapes)
                    shapes_from = "shape inference"
                if not rt:
                    with profile.step("onnxruntime run for shapes"):
                        rt = _runtime_shapes(model, graph, _feeds(graph, used))
                    shapes_from = "onnxruntime"
                if spatial is not None:
                    notes.append(f"the run with dynamic dims 1 failed; shapes use {label} "
                                 "(give --shape NAME=DIMS for the real ones)")
                else:
                    dyn_dims = [f"{t.name}[{i}]" for t in graph.inputs if not isinstance(t, gs.Constant)
                                and t.name not in given for i, d in enumerate(t.shape or [])
                                if not isinstance(d, int) or d < 0]
                    if dyn_dims:
                        notes.append(f"dynamic dims set to 1: {', '.join(dyn_dims)} "
                                     "(give --shape NAME=DIMS for real ones)")
                break
            except UserError:
                raise
            except Exception as e:
                errors.append(f"{label}: {_first_line(e)}")
        if not rt:
            used = _input_feed_shapes(graph, given, 1, None)
            rt = _inferred_shapes(graph, used)
            shapes_from = "shape inference" if rt else "none"
            notes.append("onnxruntime could not run the model (" + "; ".join(errors) + "); "
                         + ("shapes from ONNX shape inference" if rt else "MACs and peak memory unknown"))

    ana = _Analysis(graph, rt)
    layers: list[LayerCost] = []
    for node in graph.nodes:
        if node.op in PASS_THROUGH or node.op == "Constant":
            continue
        nbytes = owned.get(node.name, 0)
        is_mac = node.op in MAC_OPS or (node.domain == "ai.qcompiler" and node.op.endswith(("Conv", "MatMul",
                                                                                               "Gemm")))
        if not nbytes and not is_mac:
            continue
        lc = LayerCost(name=node.name, op_type=node.op if node.domain in (None, "", "ai.onnx") else
                       f"{node.domain}.{node.op}", bytes=nbytes)
        if is_mac:
            lc.params = ana.params(node)
            macs = ana.macs(node) if shapes else None
            lc.macs = int(macs or 0)
            lc.shapes_known = macs is not None
            self_bits = _node_bits(node, ana)
            lc.weight_bits, lc.weight_format, lc.act_bits = self_bits
        layers.append(lc)
    if shapes and any(not lc.shapes_known for lc in layers):
        missing = [lc.name for lc in layers if not lc.shapes_known]
        notes.append(f"MACs unknown for {len(missing)} op(s): {', '.join(missing[:5])}"
                     + (" ..." if len(missing) > 5 else ""))
    peak, peak_at = (_peak(graph, ana) if rt else (None, None))
    return CostReport(layers=layers, total_bytes=int(total), tensor_bytes=int(tensor_bytes),
                      unattributed_bytes=int(unattributed), peak_activation_bytes=peak, peak_at=peak_at,
                      feed_shapes=used if shapes else {}, shapes_from=shapes_from,
                      files=[str(f) for f in dict.fromkeys(file_list)], notes=notes)


def _external_files(model: ModelProto) -> list[Path]:
    """The external data files of a model loaded with :func:`qcompiler.ir.load_model`."""
    return sorted(ir.external_files(model)) if ir.has_external_data(model) else []


def compile_cost(model: ModelProto, path: Path, calib: Any = None, *, shapes: bool = True,
                 known_shapes: Mapping[str, tuple[Sequence[int], Any]] | None = None) -> CostReport:
    """The cost section of a compile: ``model`` as written to ``path`` (plus ``path``.data when there is one),
    dynamic dims from the first calibration sample (``calib``: a CalibrationSource or ``None``);
    ``known_shapes``: the tensor shapes calibration measured on its first sample (see :func:`model_cost`)."""
    feed_shapes: dict[str, list[int]] | None = None
    if calib is not None and shapes:
        first = next(iter(calib), None)
        if first is not None:
            feed_shapes = {k: list(np.shape(v)) for k, v in first.items()}
    files = [f for f in (Path(path), Path(path).with_name(Path(path).name + ".data")) if f.exists()]
    return model_cost(model, feed_shapes=feed_shapes, files=files, shapes=shapes, known_shapes=known_shapes)


def _first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
