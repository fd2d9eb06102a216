"""Tensor shapes for the cost model at batch 1: ``--shape`` parsing, the input shapes (dynamic dims resolved),
and the shapes of every tensor from ONNX shape inference or from one onnxruntime run.

Part of the cost model (:mod:`qcompiler.report.cost`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler import ir
from qcompiler.core.errors import UserError
from qcompiler.ir.report_support import shape_inferred_model

if TYPE_CHECKING:
    from qcompiler.ir.report_support import ModelProto

log = logging.getLogger(__name__)


def parse_shapes(items: Sequence[str]) -> dict[str, list[int]]:
    """``["x=1,3,48,320", "h=1x1x128"]`` -> {"x": [1, 3, 48, 320], "h": [1, 1, 128]}."""
    out: dict[str, list[int]] = {}
    for item in items:
        for part in [p for p in str(item).split(";") if p.strip()]:
            name, sep, dims = part.partition("=")
            if not sep or not name.strip():
                raise UserError(f"--shape: expected NAME=D0,D1,... got '{part}'")
            try:
                vals = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
            except ValueError:
                raise UserError(f"--shape: dimensions of '{name.strip()}' must be integers, got '{dims}'") from None
            if any(v < 0 for v in vals):
                raise UserError(f"--shape: dimensions of '{name.strip()}' must be >= 0, got '{dims}'")
            out[name.strip()] = vals
    return out


def _input_feed_shapes(graph: gs.Graph, given: Mapping[str, Sequence[int]], dynamic: int,
                       spatial: int | None) -> dict[str, list[int]]:
    names = {t.name for t in graph.inputs if not isinstance(t, gs.Constant)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise UserError(f"--shape: '{unknown[0]}' is not an input of the model (inputs: {', '.join(sorted(names))})")
    out: dict[str, list[int]] = {}
    for t in graph.inputs:
        if isinstance(t, gs.Constant):
            continue
        if t.name in given:
            shape = [int(d) for d in given[t.name]]
            declared = list(t.shape or [])
            if declared and len(declared) != len(shape):
                raise UserError(f"--shape: input '{t.name}' has rank {len(declared)}, got {len(shape)} dims")
            for i, (d, g) in enumerate(zip(declared, shape)):
                if isinstance(d, int) and d >= 0 and d != g:
                    raise UserError(f"--shape: input '{t.name}' dim {i} is fixed at {d}, got {g}")
            out[t.name] = shape
            continue
        shape = []
        rank = len(t.shape or [])
        for axis, d in enumerate(t.shape or []):
            if isinstance(d, int) and d >= 0:
                shape.append(int(d))
            elif spatial is not None and axis > 0 and rank >= 3 and not (rank == 4 and axis == 1):
                shape.append(spatial)
            else:
                shape.append(dynamic)
        out[t.name] = shape
    return out


def _feeds(graph: gs.Graph, shapes: Mapping[str, list[int]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for t in graph.inputs:
        if isinstance(t, gs.Constant) or t.name not in shapes:
            continue
        dtype = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
        shape = tuple(shapes[t.name])
        if dtype.kind == "f":
            feeds[t.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[t.name] = np.zeros(shape, dtype=dtype)
        else:
            feeds[t.name] = np.zeros(shape, dtype=dtype)
    return feeds


def _produced_names(graph: gs.Graph) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    for node in graph.nodes:
        for t in node.outputs:
            if t.name and t.name not in seen:
                seen.add(t.name)
                names.append(t.name)
    return names


def _static_shapes(model: ModelProto, graph: gs.Graph, shapes: Mapping[str, list[int]],
                   known: Mapping[str, tuple[Sequence[int], Any]] | None = None
                   ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """What :func:`_runtime_shapes` returns, from ONNX shape inference with the inputs at ``shapes`` (helped by
    the measured ``known`` shapes when they were measured at those input shapes) — or ``{}`` unless inference
    gives every tensor a node produces a full shape and a numpy dtype (then the model is run)."""
    seeds: dict[str, tuple[Sequence[int], Any]] = {}
    if known:
        inputs = [t for t in graph.inputs if not isinstance(t, gs.Constant)]
        if all(t.name in known and [int(d) for d in known[t.name][0]] == [int(d) for d in shapes.get(t.name, [])]
               for t in inputs):
            tensors = graph.tensors()
            seeds = {k: v for k, v in known.items() if k in tensors and not isinstance(tensors[k], gs.Constant)}
    inferred = ir.infer_shapes(model, {k: list(v) for k, v in shapes.items()}, seeds)
    if not inferred:
        return {}
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for name in _produced_names(graph):
        if name not in inferred:
            return {}
        out[name] = inferred[name]
    for t in graph.inputs:
        if isinstance(t, gs.Constant) or t.name not in shapes:
            continue
        out[t.name] = (tuple(int(d) for d in shapes[t.name]),
                       np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32))
    return out


def _runtime_shapes(model: ModelProto, graph: gs.Graph, feeds: dict[str, np.ndarray]
                    ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every tensor a node produces, from one onnxruntime run (raises on failure). The run
    is unoptimized (every tensor is an output anyway; optimizing the graph would only cost time) on one thread."""
    names = _produced_names(graph)
    sess = ir.session(ir.with_outputs(model, names, keep_outputs=False) if names else model, optimize=False,
                      threads=1)
    wanted = [o.name for o in sess.get_outputs()]
    vals = sess.run(wanted, feeds)
    out = {n: (tuple(int(d) for d in v.shape), np.asarray(v).dtype) for n, v in zip(wanted, vals)}
    for name, arr in feeds.items():
        out[name] = (tuple(arr.shape), arr.dtype)
    return out


def _inferred_shapes(graph: gs.Graph, shapes: Mapping[str, list[int]]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """ONNX shape inference with the inputs fixed at ``shapes``: only fully known shapes are returned."""
    g = graph.copy()
    for t in g.inputs:
        if t.name in shapes and not isinstance(t, gs.Constant):
            t.shape = list(shapes[t.name])
    for t in g.tensors().values():
        if isinstance(t, gs.Variable) and t not in g.inputs and t not in g.outputs:
            t.shape = None
    try:
        inferred = shape_inferred_model(g)
    except Exception as e:  # inference is a fallback; no shapes then
        log.info("cost: shape inference failed: %s", e)
        return {}
    g2, _ = ir.import_graph(inferred)
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for t in g2.tensors().values():
        if isinstance(t, gs.Constant) or t.shape is None or t.dtype is None:
            continue
        if all(isinstance(d, int) and d >= 0 for d in t.shape):
            out[t.name] = (tuple(int(d) for d in t.shape), np.dtype(t.dtype))
    return out
