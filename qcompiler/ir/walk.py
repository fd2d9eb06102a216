"""Walking models in a fixed order: every subgraph and every tensor of a ModelProto or a graphsurgeon graph.

* :func:`_iter_all_tensors` yields every tensor of a ModelProto (initializers, sparse initializers, node
  attributes, subgraph bodies, functions). Its order decides the layout of written external data files: keep it.
* :func:`tensor_names` / :func:`renamed_tensors`: every tensor name of a ModelProto, and a copy with some renamed.
* :func:`walk_graphs` / :func:`all_constants`: the same walks on a graphsurgeon graph (subgraphs outermost first).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto


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


def readers_by_name(graph: gs.Graph) -> dict[str, list[tuple[gs.Node, int]]]:
    """Tensor name -> (node, input index) of every node reading a non-constant tensor of that name, in ``graph``
    and in its subgraph bodies (which read an outer tensor by name)."""
    out: dict[str, list[tuple[gs.Node, int]]] = {}
    for g in walk_graphs(graph):
        for node in g.nodes:
            for i, t in enumerate(node.inputs):
                if t is not None and not isinstance(t, gs.Constant):
                    out.setdefault(t.name, []).append((node, i))
    return out


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
