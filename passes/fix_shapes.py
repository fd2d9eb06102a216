"""fix-shapes: fix the dynamic dimensions of graph inputs (``--input-shape input=1,576``) and fold what then
follows from shapes alone.

A model exported with dynamic axes computes shapes at run time (``Shape`` → ``Gather`` → ``Equal``) and may branch
on them: silero-vad's ``silero_vad.onnx`` keeps its LSTM inside ``If`` nodes conditioned on the shapes of its
input chunk and state, so even at a fixed sample rate (``--freeze-input sr=16000``) the LSTM is no top-level node
a plan can quantize. Given ``NAME=D0,D1,...`` the input is declared with those dimensions, the ``cleanup`` pass
(from the registry) folds what already folds, then, in rounds:

1. static shape inference (ONNX's, with data propagation) from the fixed inputs;
2. every top-level ``Shape`` / ``Size`` node whose input's shape came out fully known is replaced by its value:

       s = Shape(x)[start:end]  ->  s = const(dims(x)[start:end])      n = Size(x)  ->  n = const(prod(dims(x)))

3. the ``cleanup`` pass (from the registry) folds what now depends only on constants, and inlines each ``If``
   whose condition became a constant (the branch taken becomes top-level nodes);

until a round folds no ``Shape`` / ``Size`` (at most :data:`MAX_ROUNDS`). The compiled model computes the float
model's function at those input shapes only, and declares them: feeding another shape is an onnxruntime error,
not a silent misuse. Graph input / output names are unchanged.

Option ``shapes``: ``NAME=D0,D1,...`` items separated by ``;``, the dimensions separated by ``,`` or ``x`` (in
pipeline text ``x``, as a comma separates options there: ``fix-shapes{shapes=input=1x576;state=2x1x128}``).
An unknown input, a wrong rank, a dimension that contradicts a static one the model declares, or a dimension
below 1 is a ``UserError`` naming it. A second run finds nothing left to fold.

Stats: ``fixed`` (inputs), ``shapes_folded`` (Shape / Size nodes replaced), ``rounds``, and cleanup's own stats
(``inlined_ifs``, ``folded_constants``, ...), summed.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler import ir
from qcompiler.core.pass_base import GraphPass, PassResult
from qcompiler.core.registry import registry
from qcompiler.ir.graph import GraphIndex, graph_input
from qcompiler.plan.checks import check_shape_fits, parse_shapes

log = logging.getLogger(__name__)

#: rounds of inference, Shape folding and cleanup (each inlined branch may hold Shapes of its own)
MAX_ROUNDS = 8


@dataclass
class FixShapesOptions:
    shapes: tuple[str, ...] = ()  # NAME=D0,D1,... items


class FixShapesPass(GraphPass):
    """Declare graph inputs with fixed dimensions; fold the Shape / Size nodes (and the Ifs) that then fold."""

    name = "fix-shapes"
    Options = FixShapesOptions
    produces = frozenset({"shapes-fixed"})

    def canonical(self) -> str:
        """Pipeline text with the dimensions joined by ``x`` (a comma separates options there): it parses back."""
        items = [f"{name}={'x'.join(map(str, dims))}" for name, dims in parse_shapes(self.options.shapes)]
        return f"{self.name}{{shapes={';'.join(items)}}}" if items else self.name

    def run_graph(self, graph: gs.Graph) -> PassResult:
        opts: FixShapesOptions = self.options
        stats: Counter[str] = Counter()
        shapes = parse_shapes(opts.shapes)
        if not shapes:
            return PassResult(False, stats)
        for name, dims in shapes:
            x = graph_input(graph, name, f"--input-shape {name}=...")
            check_shape_fits(name, dims, x.shape)
            if x.shape is None or list(x.shape) != list(dims):
                x.shape = list(dims)
                stats["fixed"] += 1
        cleanup = registry().get("cleanup")()
        assert isinstance(cleanup, GraphPass), "cleanup is a graph pass"
        stats.update(cleanup.run_graph(graph).stats)  # what folds already (an If on a frozen input)
        for _ in range(MAX_ROUNDS):
            folded = _fold_shapes(graph)
            if not folded:
                break
            stats["shapes_folded"] += folded
            stats["rounds"] += 1
            stats.update(cleanup.run_graph(graph).stats)
        stats = Counter({k: v for k, v in stats.items() if v})
        if stats:
            log.info("fix-shapes: %d input(s) fixed, %d Shape / Size node(s) folded, %d If(s) inlined",
                     stats["fixed"], stats["shapes_folded"], stats["inlined_ifs"])
        return PassResult(bool(stats), stats)


def _fold_shapes(graph: gs.Graph) -> int:
    """Replace every top-level Shape / Size node whose input has a fully known shape (static inference from the
    graph inputs' declared shapes) by a constant; the number replaced."""
    todo = [n for n in graph.nodes if n.op in ("Shape", "Size") and n.inputs and n.outputs
            and not isinstance(n.inputs[0], gs.Constant)]
    if not todo:
        return 0
    inputs: dict[str, Sequence[int]] = {
        t.name: [int(d) for d in t.shape] for t in graph.inputs
        if t.shape is not None and all(isinstance(d, (int, np.integer)) and int(d) > 0 for d in t.shape)}
    known = ir.infer_shapes(ir.export_model(graph), inputs)
    readers = ir.readers_by_name(graph)  # subgraph bodies read the outer tensor by name
    index = GraphIndex(graph)
    folded = 0
    for node in todo:
        src, out = node.inputs[0], node.outputs[0]
        if src.name not in known or any(t is out for t in graph.outputs):
            continue
        dims = list(known[src.name][0])
        if node.op == "Shape":
            start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
            value = np.array(dims[start:None if end is None else int(end)], dtype=np.int64)
        else:
            value = np.array(math.prod(dims), dtype=np.int64)
        const = gs.Constant(index.unique_name(f"{out.name}:fixed"), value)
        for reader, i in readers.get(out.name, []):
            reader.inputs[i] = const
        folded += 1
    if folded:
        graph.cleanup(remove_unused_graph_inputs=False)
    return folded
