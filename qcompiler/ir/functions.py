"""ONNX functions (model-local FunctionProtos) for custom ops: the building blocks, so targets only describe them.

A target whose custom ops have no kernel in stock onnxruntime (``packed``, ``qonnx``) writes a function body
for each op into the model (``graph.functions``; exported by :func:`qcompiler.ir.export_model` through
graphsurgeon) and onnxruntime inlines it. The target says *what* the body computes, op by op, with a
:class:`FunctionBody`; this module owns the ONNX-level details: attribute references and their ONNX types,
element-type codes for ``Cast``, ``Constant`` nodes that read an attribute, the :class:`gs.Function` itself, and
adding missing bodies to a graph.

Node and tensor names inside a body are local to it. Two naming styles exist, both deterministic (the
written model must not change from one build to the next):

* counted (default): every new name is ``<base>_<n>`` with one counter for the body;
* prefixed (``prefix="q"``): outputs ``q_<op>_<i>``, nodes ``q_<Op>_<i>`` with ``i`` the node's position, and
  constants named as given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, List  # noqa: UP035 - graphsurgeon maps typing.List[int] to INTS

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

#: ``Cast`` ``to`` code of float32
FLOAT = int(TensorProto.FLOAT)
#: the Python type graphsurgeon writes as an INTS attribute (for :func:`attribute_ref`)
INTS: Any = List[int]  # noqa: UP006


def attribute_ref(name: str, typ: Any) -> gs.Node.AttributeRef:
    """A node attribute that takes the value of the calling node's attribute ``name`` (of Python type ``typ``:
    ``int``, ``float``, ``str`` or :data:`INTS`)."""
    return gs.Node.AttributeRef(name, typ)


class FunctionBody:
    """Collects the nodes of one function body with unique local names (see the module doc for the styles)."""

    def __init__(self, opset: int, prefix: str | None = None) -> None:
        self.opset = opset
        self.prefix = prefix
        self.nodes: list[gs.Node] = []
        self.n = 0

    def _name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, base: str, value: Any) -> gs.Constant:
        """A constant input (counted: named ``<base>_<n>``, the value as given; prefixed: named ``base``, the
        value as float32)."""
        if self.prefix is not None:
            return gs.Constant(base, np.asarray(value, dtype=np.float32))
        return gs.Constant(self._name(base), np.asarray(value))

    def op(self, op: str, inputs: Iterable[Any], attrs: dict[str, Any] | None = None,
           out: gs.Variable | None = None) -> gs.Variable:
        """Append node ``op(inputs; attrs)``; returns its output (``out`` when given: a formal output)."""
        if self.prefix is not None:
            i = len(self.nodes)
            y = out if out is not None else gs.Variable(f"{self.prefix}_{op.lower()}_{i}")
            name = f"{self.prefix}_{op}_{i}"
        else:
            y = out if out is not None else gs.Variable(self._name(op.lower()))
            name = self._name(op)
        self.nodes.append(gs.Node(op, name, attrs=dict(attrs or {}), inputs=list(inputs), outputs=[y]))
        return y

    def attr_const(self, attr: str, kind: str, typ: Any) -> gs.Variable:
        """A ``Constant`` whose ``kind`` (``value_int``, ``value_float``, ``value_ints``) is the calling node's
        attribute ``attr``."""
        return self.op("Constant", [], {kind: attribute_ref(attr, typ)})

    def cast_float(self, x: gs.Tensor) -> gs.Variable:
        return self.op("Cast", [x], {"to": FLOAT})

    def function(self, name: str, domain: str, inputs: list[gs.Variable], outputs: list[gs.Variable], *,
                 attrs: dict[str, Any] | None = None, doc_string: str | None = None) -> gs.Function:
        """The body as a function ``domain.name`` for the body's opset; ``attrs``: attribute -> default
        (``None``: required)."""
        extra: dict[str, Any] = {"doc_string": doc_string} if doc_string is not None else {}
        return gs.Function(name, domain=domain, nodes=self.nodes, inputs=inputs, outputs=outputs, opset=self.opset,
                           attrs=attrs, **extra)


def add_functions(graph: gs.Graph, domain: str, ops: Iterable[str], build: Callable[[str, int], gs.Function],
                  opset: int) -> int:
    """Add ``build(op, opset)`` to ``graph.functions`` for each of ``ops`` (sorted) whose body is not there yet;
    returns how many were added."""
    have = {(f.domain, f.name) for f in graph.functions}
    added = 0
    for op in sorted(ops):
        if (domain, op) not in have:
            graph.functions.append(build(op, opset))
            added += 1
    return added
