"""Inline an ``If`` whose condition is a constant (private helper of :mod:`qcompiler.passes.cleanup`).

``If(c)`` with ``c`` a constant computes its taken branch: the branch's nodes move into the enclosing graph at
the ``If``'s place, their branch-local tensors renamed ``{if name}/{name}`` (unique in the enclosing graph), and
each ``If`` output is produced by the branch's node that produced the matching branch output (its readers inside
the branch read it under the ``If`` output's name); a branch output that no branch node produces (an outer-scope
tensor, a constant, or a tensor already routed to another output) is copied by an ``Identity`` (removed later by
cleanup where possible). The ``If`` output tensors — and so graph outputs — keep their names.

graphsurgeon's own subgraph flattening (``fold_constants(flatten_subgraphs=True)``) left a dangling ``If`` output
on silero-vad's ``silero_vad.onnx`` frozen at ``sr=16000`` (onnxruntime: "Node input 'If_0_outputs_1' is not a
graph input, initializer, or output of a previous node"), so cleanup folds without it and inlines here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.ir.graph import GraphIndex


def constant_condition(node: gs.Node) -> bool | None:
    """The value of an ``If``'s condition when it is a one-element constant, else None."""
    if node.op != "If" or not node.inputs or not isinstance(node.inputs[0], gs.Constant):
        return None
    v = np.asarray(node.inputs[0].values)
    return bool(v.reshape(-1)[0]) if v.size == 1 else None


def inline_constant_ifs(graph: gs.Graph, tag: Any = None) -> int:
    """Inline every top-level ``If`` of ``graph`` whose condition is a constant; returns how many. ``tag``: called
    on every node created (the ``Identity`` copies)."""
    count = 0
    for node in list(graph.nodes):
        taken = constant_condition(node)
        if taken is None:
            continue
        branch = node.attrs.get("then_branch" if taken else "else_branch")
        if not isinstance(branch, gs.Graph) or len(branch.outputs) != len(node.outputs):
            continue
        _inline(graph, node, branch, tag)
        count += 1
    return count


def _inline(graph: gs.Graph, node: gs.Node, branch: gs.Graph, tag: Any) -> None:
    index = GraphIndex(graph)
    local: dict[int, gs.Tensor] = {}  # tensors the branch's nodes produce (branch-local)
    for n in branch.nodes:
        for t in n.outputs:
            local[id(t)] = t
    prefix = node.name or "If"
    for t in local.values():
        t.name = index.unique_name(f"{prefix}/{t.name}")
    created: list[gs.Node] = []
    routed: dict[int, gs.Tensor] = {}  # branch output -> the If output its producer now writes
    for b_out, if_out in zip(branch.outputs, node.outputs, strict=True):
        prod = b_out.inputs[0] if id(b_out) in local and b_out.inputs else None
        if prod is not None and id(b_out) not in routed:
            routed[id(b_out)] = if_out
            for reader in list(b_out.outputs):  # readers inside the branch read the If output instead
                for i, t in enumerate(reader.inputs):
                    if t is b_out:
                        reader.inputs[i] = if_out
            j = next(i for i, t in enumerate(prod.outputs) if t is b_out)
            if_out.dtype = if_out.dtype or b_out.dtype
            prod.outputs[j] = if_out
        else:
            copy = gs.Node("Identity", name=f"{prefix}/output_{len(created)}", inputs=[routed.get(id(b_out), b_out)],
                           outputs=[if_out])
            created.append(tag(copy) if tag is not None else copy)
    node.inputs.clear()
    node.outputs.clear()
    at = next(i for i, n in enumerate(graph.nodes) if n is node)
    graph.nodes[at:at + 1] = list(branch.nodes) + created
