"""compact-names: give every internal tensor and node a short name, and keep the map to the old names aside.

A quantized model of a small network is as much names as weights: PP-OCR's angle classifier (134k parameters)
compiled W8A8 spends ~35 kB of its ~200 kB on tensor and node names (``backbone.stages.0.0._se.conv1.w:q``).
This pass renames, in graph order, every tensor that is neither a graph input nor a graph output (initializers
included, subgraph bodies too) and every node to the shortest free names of the alphabet ``[0-9a-zA-Z]``
(``0`` … ``Z``, ``10`` …), skipping the graph's input and output names, which never change. Nothing else changes:
the same nodes, the same tensors, the same bytes of data, the same numbers (onnxruntime does not read names),
and the ``qcompiler.pass`` tags stay.

The map back (new name → the name in the compiled graph before this pass, composed with an earlier run's map)
is kept in the compile context and written beside the output as ``OUT.names.json``
(``{"version": 1, "tensors": {...}, "nodes": {...}}``); the compile's validation and ``qcompiler validate``
use it to compare layers by their original names, and the compile report's cost section names layers by them.

It runs after the target's lowering (requires ``lowered``): nothing after it reads names. A second run finds
every name already the one it would give and changes nothing.

Stats: ``tensors_renamed``, ``nodes_renamed``, ``name_bytes_saved`` (UTF-8 bytes of names, before − after).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator

import onnx_graphsurgeon as gs

from qcompiler import ir
from qcompiler.core.context import CompileContext
from qcompiler.core.pass_base import Pass, PassResult

log = logging.getLogger(__name__)

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
NAMES_SUFFIX = ".names.json"


def short_names(skip: set[str]) -> Iterator[str]:
    """``0``, ``1``, … ``Z``, ``10``, ``11``, … (base 62 with no leading-zero restriction on one digit), without
    the names in ``skip``."""
    n = 0
    while True:
        k, s = n, ""
        while True:
            s = ALPHABET[k % 62] + s
            k //= 62
            if k == 0:
                break
        n += 1
        if s not in skip:
            yield s


def _walk(graph: gs.Graph) -> Iterator[tuple[list[gs.Node], list[gs.Tensor]]]:
    """Per graph (the main graph, then every subgraph body, :func:`qcompiler.ir.walk_graphs`' order): its nodes
    and its tensors in order of first appearance (graph inputs, node inputs and outputs, graph outputs)."""
    for g in ir.walk_graphs(graph):
        tensors = [*g.inputs, *(t for n in g.nodes for t in [*n.inputs, *n.outputs]), *g.outputs]
        yield list(g.nodes), list({id(t): t for t in tensors}.values())


class CompactNamesPass(Pass):
    """Shortest names for every internal tensor and node (graph I/O kept); the map back goes to OUT.names.json."""

    name = "compact-names"
    requires = frozenset({"lowered"})

    def run(self, ctx: CompileContext) -> PassResult:
        graph = ctx.graph
        keep = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
        tensor_names = short_names(keep)
        node_names = short_names(set())
        new_tensors: dict[str, str] = {}  # old name -> new name (a name shared by scopes maps once)
        stats: Counter[str] = Counter()
        tensor_map: dict[str, str] = {}
        node_map: dict[str, str] = {}
        for nodes, tensors in _walk(graph):
            for t in tensors:
                if not t.name or t.name in keep:
                    continue
                new = new_tensors.get(t.name)
                if new is None:
                    new = new_tensors[t.name] = next(tensor_names)
                if new != t.name:
                    stats["tensors_renamed"] += 1
                    stats["name_bytes_saved"] += len(t.name.encode()) - len(new.encode())
                tensor_map[new] = t.name
                t.name = new
            for node in nodes:
                new = next(node_names)
                if new != node.name:
                    stats["nodes_renamed"] += 1
                    stats["name_bytes_saved"] += len((node.name or "").encode()) - len(new.encode())
                node_map[new] = node.name or ""
                node.name = new
        # compose with an earlier run's map, so the side file always leads back to the compiled graph's names
        old_t = ctx.renamed.get("tensors", {})
        old_n = ctx.renamed.get("nodes", {})
        ctx.renamed = {"tensors": {k: old_t.get(v, v) for k, v in tensor_map.items()},
                       "nodes": {k: old_n.get(v, v) for k, v in node_map.items()}}
        if ctx.calib_shapes:  # the compile's cost report sizes tensors by name
            ctx.calib_shapes = {new_tensors.get(k, k): v for k, v in ctx.calib_shapes.items()}
        ctx.side_outputs[NAMES_SUFFIX] = json.dumps({"version": 1, **ctx.renamed}, indent=1, sort_keys=True) + "\n"
        modified = bool(stats["tensors_renamed"] or stats["nodes_renamed"])
        if modified:
            log.info("compact-names: %d tensors and %d nodes renamed, %d bytes of names saved",
                     stats["tensors_renamed"], stats["nodes_renamed"], stats["name_bytes_saved"])
        return PassResult(modified=modified, stats=stats)
