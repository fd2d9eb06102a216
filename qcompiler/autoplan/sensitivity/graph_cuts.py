"""Cutting the float graph for partial evaluation: the tensors crossing a cut between two node positions, and the
nodes after it as a graph of its own fed those tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx_graphsurgeon as gs


def tail_graph(g: gs.Graph, p: int, front: dict[str, Any], outputs: Sequence[str]) -> gs.Graph:
    """The nodes of ``g`` from position ``p`` on as a graph whose inputs are the tensors ``front`` (name -> dtype)
    crossing the cut, and the graph inputs those nodes read; outputs ``outputs``. Constants share their values."""
    if any(isinstance(v, gs.Graph) for n in g.nodes[p:] for v in n.attrs.values()):
        sub = g.copy()  # subgraph attributes may read outer tensors: copy the whole graph, then cut it
        st = sub.tensors()
        for name, dtype in front.items():
            st[name].inputs.clear()
            st[name].dtype, st[name].shape = dtype, None
        sub.inputs = [st[n] for n in front] + list(sub.inputs)
        sub.outputs = [st[n] for n in outputs]
        # not into the bodies: a Loop body's unused iteration-count input is part of its signature
        return sub.cleanup(remove_unused_graph_inputs=True, recurse_subgraphs=False)
    tmap: dict[str, gs.Tensor] = {}

    def T(t: gs.Tensor) -> gs.Tensor:
        if not t.name:
            return gs.Variable.empty()
        got = tmap.get(t.name)
        if got is None:
            got = tmap[t.name] = t.copy()
            if t.name in front:
                got.dtype, got.shape = front[t.name], None
        return got

    nodes = [gs.Node(n.op, n.name, attrs=dict(n.attrs), inputs=[T(t) for t in n.inputs],
                     outputs=[T(t) for t in n.outputs], domain=n.domain) for n in g.nodes[p:]]
    ins = [tmap[n] for n in front if n in tmap] + [tmap[t.name] for t in g.inputs if t.name in tmap]
    return gs.Graph(nodes=nodes, inputs=ins, outputs=[tmap[n] for n in outputs], opset=g.opset,
                    import_domains=g.import_domains, functions=list(g.functions))


def frontier(g: gs.Graph, p: int) -> list[str]:
    """Tensors produced by the nodes before position ``p`` of ``g.nodes`` and read by a node at or after it."""
    pos = {id(n): i for i, n in enumerate(g.nodes)}
    out: dict[str, None] = {}
    for n in g.nodes[:p]:
        for t in n.outputs:
            if any(pos.get(id(c), -1) >= p for c in t.outputs):
                out[t.name] = None
    return list(out)
