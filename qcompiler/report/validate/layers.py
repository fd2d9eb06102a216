"""Per-layer exposure: which intermediate tensors both graphs produce under the same name and are worth
comparing, and which of them onnxruntime accepts as extra outputs.

Part of :mod:`qcompiler.report.validate`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qcompiler import ir
from qcompiler.report.validate.metrics import _is_float
from qcompiler.report.validate.sessions import _try_runner

log = logging.getLogger(__name__)

#: At most this many intermediate tensors are compared (the first ones in graph order).
MAX_LAYERS = 2000
#: Ops whose outputs in the quantized graph are quantization plumbing, not layers.
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
#: Producer ops whose outputs are never worth comparing.
_SKIP_OPS = frozenset({"Constant"})
#: Ops whose output holds their first input's elements, only rearranged (the same values, the same count): such an
#: output is compared per layer only when its input is not (its SQNR, cosine and errors would be the input's, a
#: table row repeated and onnxruntime made to expose one more tensor)
MOVE_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


@dataclass
class _GraphFacts:
    producers: dict[str, str]  # node output name -> op type, in graph order
    inputs: set[str]
    outputs: list[str]
    float_known: dict[str, bool]  # name -> is float, where graphsurgeon knows the dtype
    #: name -> (node name, op type) of the layer that computes it: its producer, or for a tensor a
    #: Quantize/DequantizeLinear produces, the node before that quantization plumbing
    layer_nodes: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: name -> pass, for tensors whose producer a pass marked as rescaled on purpose
    #: (:func:`qcompiler.core.tags.mark_rescaled`): another quantity than the other graph's same-named tensor
    rescaled: dict[str, str] = field(default_factory=dict)
    #: name -> the tensor a :data:`MOVE_OPS` node rearranges into it (its first input)
    moved_from: dict[str, str] = field(default_factory=dict)


def _graph_facts(model: Any) -> _GraphFacts:
    graph, _meta = ir.import_graph(model)
    producers: dict[str, str] = {}
    float_known: dict[str, bool] = {}
    made_by: dict[str, Any] = {}
    for node in graph.nodes:
        for t in node.outputs:
            if not t.name or t.name in producers:
                continue
            producers[t.name] = node.op
            made_by[t.name] = node
            dtype = getattr(t, "dtype", None)
            if dtype is not None:
                try:
                    float_known[t.name] = _is_float(np.dtype(dtype))
                except TypeError:
                    pass
    return _GraphFacts(producers=producers, inputs={t.name for t in graph.inputs},
                       outputs=[t.name for t in graph.outputs], float_known=float_known,
                       layer_nodes={name: _layer_node(made_by, name) for name in made_by},
                       rescaled=ir.rescaled_tensors(model),
                       moved_from={name: node.inputs[0].name for name, node in made_by.items()
                                   if node.op in MOVE_OPS and node.inputs})


def _layer_node(made_by: dict[str, Any], name: str) -> tuple[str, str]:
    """(node name, op) of the layer computing tensor ``name``, looking through Quantize/DequantizeLinear."""
    node = made_by[name]
    for _ in range(8):  # DQ <- Q <- layer (a few hops at most)
        if node.op not in QDQ_OPS or not node.inputs or node.inputs[0].name not in made_by:
            break
        node = made_by[node.inputs[0].name]
    return str(node.name or ""), str(node.op)


def _layer_candidates(ff: _GraphFacts, qf: _GraphFacts, layer_names: Sequence[str] | None,
                      rearranged: dict[str, str] | None = None) -> list[str]:
    """The tensors to compare: produced in both graphs under the same name, not graph inputs / outputs, not
    quantization plumbing or constants, float in both, and not rescaled on purpose in the quantized graph (those
    are reported apart: :func:`rescaled_layers`); unless ``layer_names`` names them, not a rearrangement of
    another one (:func:`rearranged_layers`, added to ``rearranged``)."""
    excluded = ff.inputs | qf.inputs | set(ff.outputs) | set(qf.outputs) | set(qf.rescaled)
    if layer_names is not None:
        wanted = list(dict.fromkeys(layer_names))
        rescaled = [n for n in wanted if n in qf.rescaled]
        if rescaled:
            log.warning("validate: %d requested layer tensor(s) hold other values than the float model's by design "
                        "(rescaled by a pass), not compared: %s", len(rescaled), ", ".join(rescaled[:10]))
        missing = [n for n in wanted if n not in ff.producers or n not in qf.producers]
        if missing:
            log.warning("validate: %d requested layer tensor(s) not produced in both models, skipped: %s",
                        len(missing), ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
        names = [n for n in wanted if n in ff.producers and n in qf.producers and n not in excluded]
    else:
        names = [
            n for n, op in ff.producers.items()
            if n in qf.producers and n not in excluded
            and op not in _SKIP_OPS and op not in QDQ_OPS and qf.producers[n] not in _SKIP_OPS
        ]  # a DequantizeLinear may carry a layer's name in the quantized graph (target ort-qop): its value
    names = [n for n in names if ff.float_known.get(n, True) and qf.float_known.get(n, True)]
    if layer_names is None:
        same = rearranged_layers(ff, qf, names)
        names = [n for n in names if n not in same]
        if rearranged is not None:
            rearranged.update(same)
    if len(names) > MAX_LAYERS:
        log.warning("validate: %d layer tensors in common; comparing only the first %d", len(names), MAX_LAYERS)
        names = names[:MAX_LAYERS]
    return names


def rearranged_layers(ff: _GraphFacts, qf: _GraphFacts, names: Sequence[str]) -> dict[str, str]:
    """Tensor -> the compared tensor whose elements it holds rearranged, for the ``names`` (graph order) that a
    :data:`MOVE_OPS` node makes in both graphs from the same tensor, itself among ``names`` (or rearranged from one:
    a Transpose then a Reshape). Their metrics would be that tensor's (the same element pairs); not compared."""
    listed = set(names)
    out: dict[str, str] = {}
    for n in names:
        src = ff.moved_from.get(n)
        if src is not None and src in listed and qf.moved_from.get(n) == src:
            out[n] = out.get(src, src)
    return out


def rescaled_layers(ff: _GraphFacts, qf: _GraphFacts) -> dict[str, str]:
    """Tensor -> pass, for the tensors both graphs produce that a pass rescaled on purpose in the quantized graph
    (graph order of the float model): left out of the per-layer comparison."""
    return {n: qf.rescaled[n] for n in ff.producers if n in qf.rescaled and n in qf.producers}


def _working_subset(model: Any, names: list[str], feed: dict[str, np.ndarray]) -> list[str]:
    """The names that can be exposed as extra outputs (bisecting the ones onnxruntime refuses)."""
    if not names:
        return []
    if _try_runner(model, names, feed) is not None:
        return names
    if len(names) == 1:
        log.warning("validate: cannot expose tensor '%s' as an output; skipped", names[0])
        return []
    mid = len(names) // 2
    return _working_subset(model, names[:mid], feed) + _working_subset(model, names[mid:], feed)
