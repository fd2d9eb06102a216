"""Normalize a graph so later passes see one canonical form: constant weights, no no-op nodes, sorted, named.

Steps, in order (each counted in the stats):

1. ``constants_to_initializers``: every ``Constant`` node (``value``, ``value_float(s)``, ``value_int(s)``)
   becomes an initializer of the same name — Paddle-style exports keep all their weights in Constant nodes,
   and the weight-rewriting passes only trust initializers. A Constant node that directly produces a graph
   output is kept (a graph output must stay a node output).
2. ``dead_nodes_removed``: nodes that do not contribute to any graph output are dropped.
3. ``folded_constants``: nodes whose inputs are all constants are evaluated (graphsurgeon's
   ``fold_constants``, i.e. onnxruntime on CPU) and replaced by their results. Excluded: results larger
   than ``fold_limit_mib`` (no bloated files), Quantize/DequantizeLinear and ``Cast`` of stored integer / fp8
   codes (an int8 weight must stay int8),
   random ops (determinism), ops producing a sequence or optional value (graphsurgeon holds folded values as
   arrays) and nodes producing a graph output. Shape folding is off unless
   ``fold_shapes=true``. The count is the number of nodes the folding made redundant.
   An ``If`` whose condition is (now) a constant is replaced by the branch it takes (``inlined_ifs``;
   :mod:`qcompiler.passes._inline_if`, graphsurgeon's own flattening is off: it left a dangling output on
   silero-vad), and folding runs again on what the branch brought.
4. ``identities_removed``: ``Identity(x) -> y`` disappears; readers of ``y`` read ``x``. When ``y`` is a
   graph output, ``x``'s producer is made to produce ``y`` instead (the graph output keeps its name);
   when that is impossible (``x`` is a graph input, a constant or another graph output) the Identity stays.
5. ``reordered_nodes`` (1 when it was needed): topological sort, only when the order is not already a
   topological one (a valid order is kept, so node order stays what the model author wrote).
6. ``named_nodes``: every unnamed node gets ``{op_type}_{index}`` (index in the sorted node list, made
   unique); ``renamed_duplicates``: a node reusing an earlier node's name gets ``{name}_{index}``.
   Plan rules match node names, so names must exist and be unique.

Graph inputs and outputs are never removed or renamed. A second run changes nothing.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core.pass_base import GraphPass, PassResult
from qcompiler.ir.graph import (
    GraphIndex,
    is_onnx_op,
    is_topologically_sorted,
    producer,
    remove_nodes,
    rewire_consumers,
)
from qcompiler.ir.sessions import quiet_default_logger
from qcompiler.quant import is_code_dtype

from ._inline_if import inline_constant_ifs

log = logging.getLogger(__name__)

#: rounds of If inlining and folding (a branch may hold an If whose condition folding then makes constant)
MAX_INLINE_ROUNDS = 8

_NO_FOLD_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
    # sequence / optional values: graphsurgeon's folding holds a folded value as an array (a sequence would be a
    # list: it failed on the list's missing ``nbytes``), so their producers stay and nothing after them folds
    "SequenceEmpty", "SequenceConstruct", "SequenceInsert", "SequenceErase", "SplitToSequence", "SequenceMap",
    "Optional",
})


@dataclass
class CleanupOptions:
    fold_constants: bool = True
    fold_shapes: bool = False
    fold_limit_mib: int = 64


class CleanupPass(GraphPass):
    """Constant nodes to initializers, constant folding, Identity and dead-node removal, toposort, node names."""

    name = "cleanup"
    keeps_function = True  # outputs unchanged up to float rounding (calibration after it runs the float model)
    graph_only = True  # the graph and its options only: done once per model in a measured compile (core.prepared)
    Options = CleanupOptions
    produces = frozenset({"clean"})

    def run_graph(self, graph: gs.Graph) -> PassResult:
        opts: CleanupOptions = self.options
        stats: Counter[str] = Counter()
        index = GraphIndex(graph)

        n = _constants_to_initializers(graph, index)
        stats["constants_to_initializers"] += n

        before = len(graph.nodes)
        graph.cleanup(remove_unused_graph_inputs=False)
        stats["dead_nodes_removed"] += before - len(graph.nodes)

        if opts.fold_constants and _has_foldable(graph, opts):
            stats["folded_constants"] += _fold_constants(graph, index, opts)
        for _ in range(MAX_INLINE_ROUNDS):  # an If on a now-constant condition: its branch, then fold again
            inlined = inline_constant_ifs(graph, self.tag)
            if not inlined:
                break
            stats["inlined_ifs"] += inlined
            index = GraphIndex(graph)
            if opts.fold_constants and _has_foldable(graph, opts):
                stats["folded_constants"] += _fold_constants(graph, index, opts)

        removed = _remove_identities(graph, index)
        stats["identities_removed"] += removed
        if removed:
            before = len(graph.nodes)
            graph.cleanup(remove_unused_graph_inputs=False)
            stats["dead_nodes_removed"] += before - len(graph.nodes)

        if not is_topologically_sorted(graph):  # a valid order is kept as it is
            graph.toposort()
            stats["reordered_nodes"] += 1

        named, dups = _name_nodes(graph)
        stats["named_nodes"] += named
        stats["renamed_duplicates"] += dups

        stats = Counter({k: v for k, v in stats.items() if v})
        return PassResult(modified=bool(stats), stats=stats)


# ------------------------------------------------------------------------------------------------- steps
def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    if len(node.attrs) != 1:
        return None
    (key, val), = node.attrs.items()
    if key == "value" and isinstance(val, gs.Constant):
        arr = np.asarray(val.values)
    elif key in ("value_float", "value_floats"):
        arr = np.asarray(val, dtype=np.float32)
    elif key in ("value_int", "value_ints"):
        arr = np.asarray(val, dtype=np.int64)
    else:  # strings, sparse tensors, attribute references: left as nodes
        return None
    return None if arr.dtype.kind in "OUS" else arr


def _constants_to_initializers(graph: gs.Graph, index: GraphIndex) -> int:
    done: list[gs.Node] = []
    for node in graph.nodes:
        if not is_onnx_op(node, "Constant") or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        if index.is_graph_output(out):
            continue
        arr = _constant_node_value(node)
        if arr is None:
            continue
        out.inputs.clear()
        out.to_constant(arr)
        done.append(node)
    remove_nodes(graph, done)
    return len(done)


def _dequantizing_cast(node: gs.Node) -> bool:
    """``Cast`` of stored quantized codes (int8 / int16 / int4 / fp8 ...): a dequantization (e.g. the ``ort``
    target's load-time dequantized weights) that must stay in the file as codes, like a DequantizeLinear.
    Shape arithmetic in int32 / int64 still folds."""
    return (node.op == "Cast" and bool(node.inputs) and isinstance(node.inputs[0], gs.Constant)
            and is_code_dtype(node.inputs[0].dtype))


def _has_foldable(graph: gs.Graph, opts: CleanupOptions) -> bool:
    """Cheap linear pre-check, so that graphsurgeon's folding (which copies the graph) runs only when useful."""
    for node in graph.nodes:
        if node.op in _NO_FOLD_OPS or node.op == "Constant" or _dequantizing_cast(node):
            continue
        if opts.fold_shapes and node.op in ("Shape", "Size"):
            return True
        if all(isinstance(t, gs.Constant) or not t.name for t in node.inputs):
            return True
    return False


def _fold_constants(graph: gs.Graph, index: GraphIndex, opts: CleanupOptions) -> int:
    # graphsurgeon lowers every Constant node, graph outputs included: hide those few from it.
    hidden = [(nd, list(nd.outputs)) for nd in graph.nodes
              if nd.op == "Constant" and any(index.is_graph_output(t) for t in nd.outputs)]
    for nd, _ in hidden:
        nd.outputs.clear()

    # graphsurgeon calls this on nodes of a copy of the graph: compare names, not tensor objects
    output_names = {t.name for t in graph.outputs}

    def exclude(node: gs.Node) -> bool:
        return (node.op in _NO_FOLD_OPS or _dequantizing_cast(node)
                or any(t.name in output_names for t in node.outputs))

    try:
        with quiet_default_logger():  # graphsurgeon's own session: onnxruntime's optimizer warnings are noise here
            graph.fold_constants(fold_shapes=opts.fold_shapes, size_threshold=opts.fold_limit_mib << 20,
                                 should_exclude_node=exclude, error_ok=True, flatten_subgraphs=False)
    finally:
        for nd, outs in hidden:
            nd.outputs.extend(outs)
    before = len(graph.nodes)
    graph.cleanup(remove_unused_graph_inputs=False)
    return before - len(graph.nodes)


def _remove_identities(graph: gs.Graph, index: GraphIndex) -> int:
    removed: list[gs.Node] = []
    for node in graph.nodes:
        if not is_onnx_op(node, "Identity") or len(node.inputs) != 1 or len(node.outputs) != 1:
            continue
        x, y = node.inputs[0], node.outputs[0]
        if not index.is_graph_output(y):
            node.inputs.clear()
            node.outputs.clear()
            rewire_consumers(y, x)
            removed.append(node)
            continue
        # y is a graph output: x's producer must produce y instead
        src = producer(x)
        if src is None or isinstance(x, gs.Constant) or index.is_graph_io(x) or len(x.inputs) != 1:
            continue
        node.inputs.clear()
        node.outputs.clear()
        for i, t in enumerate(src.outputs):
            if t is x:
                src.outputs[i] = y
        rewire_consumers(x, y)
        if y.dtype is None:
            y.dtype = x.dtype
        if y.shape is None:
            y.shape = x.shape
        removed.append(node)
    remove_nodes(graph, removed)
    if removed:
        log.debug("removed %d Identity nodes", len(removed))
    return len(removed)


def _name_nodes(graph: gs.Graph) -> tuple[int, int]:
    taken = {nd.name for nd in graph.nodes if nd.name}
    seen: set[str] = set()
    named = dups = 0
    for i, nd in enumerate(graph.nodes):
        if nd.name and nd.name not in seen:
            seen.add(nd.name)
            continue
        base = f"{nd.op}_{i}" if not nd.name else f"{nd.name}_{i}"
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        if nd.name:
            dups += 1
        else:
            named += 1
        nd.name = name
        taken.add(name)
        seen.add(name)
    return named, dups
