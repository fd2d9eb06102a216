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
from qcompiler.core import profile
from qcompiler.core.errors import UserError
from qcompiler.ir.report_support import shape_inferred_model
from qcompiler.report.cost.analysis import MAC_OPS

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
    gives every tensor a node produces a full shape and a numpy dtype (then the model is run).

    Where inference stops at a node whose output shape depends on computed values (a ``Resize`` to sizes, an
    ``Expand`` to a shape worked out from ``Shape`` through ``Cast`` / ``Div`` / ``Where``), those nodes alone are
    run (:func:`_evaluated_shapes`: the small subgraph computing them, ``Shape`` of a sized tensor taken as a
    constant) and inference goes on from their measured shapes, up to :data:`EVALUATION_ROUNDS` times."""
    seeds: dict[str, tuple[Sequence[int], Any]] = {}
    if known:
        inputs = [t for t in graph.inputs if not isinstance(t, gs.Constant)]
        if all(t.name in known and [int(d) for d in known[t.name][0]] == [int(d) for d in shapes.get(t.name, [])]
               for t in inputs):
            tensors = graph.tensors()
            seeds = {k: v for k, v in known.items() if k in tensors and not isinstance(tensors[k], gs.Constant)}
    names = _produced_names(graph)
    for _round in range(EVALUATION_ROUNDS + 1):
        inferred = ir.infer_shapes(model, {k: list(v) for k, v in shapes.items()}, seeds)
        if not inferred:
            return {}
        if all(name in inferred for name in names):
            break
        if _round == EVALUATION_ROUNDS:
            return {}
        with profile.step("partial evaluation"):
            measured = _evaluated_shapes(graph, {**inferred, **seeds}, shapes)
        if not measured:
            return {}
        seeds.update(measured)
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for name in names:
        out[name] = inferred[name]
    for t in graph.inputs:
        if isinstance(t, gs.Constant) or t.name not in shapes:
            continue
        out[t.name] = (tuple(int(d) for d in shapes[t.name]),
                       np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32))
    return out


#: rounds of :func:`_evaluated_shapes` (each followed by shape inference) before the whole model is run instead
EVALUATION_ROUNDS = 4
#: :func:`_evaluated_shapes` runs a subgraph of at most this many nodes, none of them a MAC op
EVALUATION_MAX_NODES = 256
#: and replaces an input by zeros of its size only up to this many elements
EVALUATION_MAX_ELEMENTS = 1 << 24
#: ops whose output shape follows from the shapes of their inputs and the values of all but the first (the
#: data): Reshape, Expand, Tile (shape / repeats), Resize / Upsample (scales / sizes), Slice (starts / ends /
#: axes / steps), Pad (pads), ConstantOfShape has no data input
VALUE_FREE_FIRST_INPUT = frozenset({"Reshape", "Expand", "Tile", "Resize", "Upsample", "Slice", "Pad"})


def _evaluated_shapes(graph: gs.Graph, sized: Mapping[str, tuple[Sequence[int], Any]],
                      shapes: Mapping[str, list[int]]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of the outputs of the nodes where shape inference stopped — every input sized
    (``sized``), an output not —, measured by running only what computes them: a subgraph of those nodes and
    the nodes computing their inputs, where each ``Shape`` of a sized tensor is the constant it evaluates to
    and the first input of an op whose output shape does not depend on that input's values
    (:data:`VALUE_FREE_FIRST_INPUT`: a ``Reshape``'s data, a ``Resize``'s image) is zeros of its size when
    computing it would need a MAC op. Graph inputs it still reads are fed as :func:`_runtime_shapes` feeds them
    (at ``shapes``). Outputs that still need a MAC op or more than :data:`EVALUATION_MAX_NODES` nodes are left
    for a later round (the next inference may size what they depend on); ``{}`` when no output is left or the
    subgraph fails to run. ``graph`` is not modified."""

    def ready(t: gs.Tensor) -> bool:
        return isinstance(t, gs.Constant) or not t.name or t.name in sized or t.name in shapes

    def known_dims(name: str) -> list[int] | None:
        dims = sized[name][0] if name in sized else shapes.get(name)
        return None if dims is None else [int(d) for d in dims]

    def shape_value(node: gs.Node) -> np.ndarray | None:
        if node.op != "Shape" or not node.inputs or len(node.outputs) != 1:
            return None
        dims = known_dims(node.inputs[0].name)
        return None if dims is None else np.array(dims[node.attrs.get("start", 0):node.attrs.get("end", None)],
                                                  dtype=np.int64)

    def closure(tensors: Sequence[gs.Tensor], into: dict[int, gs.Node]) -> bool:
        """Add the nodes computing ``tensors`` to ``into`` (stopping at constants, graph inputs and Shapes of
        sized tensors); False when they need a MAC op or ``into`` would pass the node limit."""
        stack = [n for t in tensors if isinstance(t, gs.Variable) for n in t.inputs]
        while stack:
            node = stack.pop()
            if id(node) in into:
                continue
            if node.op in MAC_OPS or len(into) >= EVALUATION_MAX_NODES:
                return False
            into[id(node)] = node
            if shape_value(node) is None:
                stack += [n for t in node.inputs if isinstance(t, gs.Variable) for n in t.inputs]
        return True

    picked: dict[int, gs.Node] = {}
    zeros: dict[int, gs.Constant] = {}  # node id -> the zeros standing for its first input
    wanted: list[gs.Tensor] = []
    for node in graph.nodes:
        todo = [t for t in node.outputs if t.name and t.name not in sized]
        if not todo or not all(ready(t) for t in node.inputs):
            continue
        trial = dict(picked)
        inputs = list(node.inputs)
        first = inputs[0] if inputs else None
        if node.op in VALUE_FREE_FIRST_INPUT and isinstance(first, gs.Variable) and first.name in sized \
                and not closure([first], dict(trial)):
            size, dtype = tuple(int(d) for d in sized[first.name][0]), np.dtype(sized[first.name][1])
            if int(np.prod(size, dtype=np.int64)) > EVALUATION_MAX_ELEMENTS:
                continue
            zeros[id(node)] = gs.Constant(f"{first.name}:zeros", np.zeros(size, dtype))
            inputs = inputs[1:]
        if len(trial) >= EVALUATION_MAX_NODES or not closure(inputs, trial):
            zeros.pop(id(node), None)
            continue
        trial[id(node)] = node
        picked = trial
        wanted += todo
    if not wanted:
        return {}
    sub = _subgraph(graph, [n for n in graph.nodes if id(n) in picked], wanted, zeros, shape_value)
    try:
        sess = ir.graph_session(sub, optimize=False, threads=1)
        feeds = _feeds(graph, dict(shapes))
        names = [o.name for o in sess.get_outputs()]
        vals = sess.run(names, {i.name: feeds[i.name] for i in sess.get_inputs()})
    except Exception as e:  # the whole model is run instead
        log.info("cost: partial evaluation for shapes failed: %s", " ".join(str(e).split())[:200])
        return {}
    return {n: (tuple(int(d) for d in np.shape(v)), np.asarray(v).dtype) for n, v in zip(names, vals)}


def _subgraph(graph: gs.Graph, nodes: list[gs.Node], outputs: list[gs.Tensor], zeros: Mapping[int, gs.Constant],
              shape_value: Any) -> gs.Graph:
    """A new graph of copies of ``nodes`` (in their order) computing ``outputs``: the outputs of a Shape
    ``shape_value`` evaluates become constants, a node in ``zeros`` reads that constant as its first input, graph
    inputs read stay inputs; ``graph``'s nodes and tensors are not touched."""
    made: dict[str, gs.Tensor] = {}
    graph_inputs = {t.name for t in graph.inputs}
    consts = {t.name: v for n in nodes if (v := shape_value(n)) is not None for t in n.outputs}

    def tensor(t: gs.Tensor) -> gs.Tensor:
        if not t.name:
            return gs.Variable.empty()
        if t.name not in made:
            if t.name in consts:
                made[t.name] = gs.Constant(t.name, consts[t.name])
            elif isinstance(t, gs.Constant):
                made[t.name] = gs.Constant(t.name, t.values)
            else:
                made[t.name] = gs.Variable(t.name, dtype=t.dtype if t.name in graph_inputs else None,
                                           shape=t.shape if t.name in graph_inputs else None)
        return made[t.name]

    copies = []
    for n in nodes:
        if n.op == "Shape" and n.outputs and n.outputs[0].name in consts:
            continue
        ins = [tensor(t) for t in n.inputs]
        if id(n) in zeros:
            ins[0] = zeros[id(n)]
        copies.append(gs.Node(n.op, n.name, dict(n.attrs), ins, [tensor(t) for t in n.outputs], domain=n.domain))
    sub_inputs = [made[t.name] for t in graph.inputs if t.name in made and isinstance(made[t.name], gs.Variable)]
    return gs.Graph(nodes=copies, inputs=sub_inputs, outputs=[tensor(t) for t in outputs], opset=graph.opset,
                    import_domains=graph.import_domains, functions=list(graph.functions))


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
