"""freeze-inputs: specialize the model for fixed values of some graph inputs (``--freeze-input sr=16000``).

A model that branches on a mode input — silero-vad's ``silero_vad.onnx`` runs ``If(sr == 16000)`` and keeps every
Conv and its LSTM inside the branches — has nothing at its top level to quantize (a plan's rules see top-level
nodes). Given ``NAME=VALUE``, every reader of graph input ``NAME`` (inside subgraph bodies too) reads a constant
instead:

    x  ->  c = full(shape(x), VALUE, dtype(x))

so the ``cleanup`` pass after it folds what depends only on constants — the ``If`` whose condition is now known
is replaced by the branch it takes (cleanup's inlining, :mod:`qcompiler.passes._inline_if`) and that branch's
layers become top-level nodes the plan quantizes. The graph input itself stays declared (the compiled model takes the same
feeds; the frozen one is ignored), so graph input / output names are unchanged. The compiled model computes the
float model's function at that value only: validation runs the float model on the feeds as given, so a sample
that feeds another value shows as an error, not silently.

``VALUE`` is one number (``true`` / ``false`` for bool inputs), broadcast to the input's declared shape, which must
be static (a scalar ``[]`` or fixed dims); an integer input takes an integer. Option ``inputs``: ``NAME=VALUE``
items separated by ``;`` (pipeline text ``freeze-inputs{inputs=sr=16000;mode=1}``). An unknown input, a dynamic
shape or a value that does not fit the type is a ``UserError`` naming it. A second run finds no reader left.

Stats: ``frozen`` (inputs), ``readers`` (nodes rewired, subgraph nodes included).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core.errors import UserError
from qcompiler.core.pass_base import GraphPass, PassResult
from qcompiler.ir import readers_by_name
from qcompiler.ir.graph import GraphIndex, graph_input
from qcompiler.plan.checks import parse_pairs

log = logging.getLogger(__name__)


@dataclass
class FreezeInputsOptions:
    inputs: tuple[str, ...] = ()  # NAME=VALUE items


class FreezeInputsPass(GraphPass):
    """Replace graph inputs by constants of given values, so branches on them fold away."""

    name = "freeze-inputs"
    Options = FreezeInputsOptions
    produces = frozenset({"inputs-frozen"})

    def run_graph(self, graph: gs.Graph) -> PassResult:
        opts: FreezeInputsOptions = self.options
        stats: Counter[str] = Counter()
        for name, text in parse_items(opts.inputs):
            x = graph_input(graph, name, f"--freeze-input {name}={text}")
            readers = readers_by_name(graph).get(name, [])  # subgraph bodies read the input by name
            if not readers:
                continue
            const = gs.Constant(GraphIndex(graph).unique_name(f"{name}:frozen"), frozen_value(x, name, text))
            for node, i in readers:
                node.inputs[i] = const
            stats["frozen"] += 1
            stats["readers"] += len(readers)
            log.info("freeze-inputs: input '%s' frozen at %s (%d reader(s))", name, text, len(readers))
        return PassResult(bool(stats["frozen"]), stats)


def parse_items(items: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """``("sr=16000", ...)`` -> ``[("sr", "16000"), ...]``; a ``UserError`` naming a malformed item."""
    return parse_pairs(items, "--freeze-input", "NAME=VALUE (e.g. sr=16000)")


def frozen_value(x: gs.Variable, name: str, text: str) -> np.ndarray:
    """``text`` as an array of input ``x``'s dtype, broadcast to its declared (static) shape."""
    where = f"--freeze-input {name}={text}"
    if x.dtype is None:
        raise UserError(f"{where}: the input's element type is not declared")
    dtype = np.dtype(x.dtype)
    shape = list(x.shape) if x.shape is not None else None
    if shape is None or any(not isinstance(d, (int, np.integer)) or int(d) < 0 for d in shape):
        raise UserError(f"{where}: the input's shape {shape} is not static (a scalar or fixed dims are needed)")
    low = text.lower()
    if dtype == np.bool_:
        if low not in ("true", "false", "1", "0"):
            raise UserError(f"{where}: a bool input takes true / false")
        value: Any = low in ("true", "1")
    else:
        try:
            number = float(text)
        except ValueError:
            raise UserError(f"{where}: not a number") from None
        if dtype.kind in "iu":
            if not math.isfinite(number) or number != int(number):
                raise UserError(f"{where}: input '{name}' is {dtype.name}: give an integer")
            info = np.iinfo(dtype)
            if not info.min <= int(number) <= info.max:
                raise UserError(f"{where}: out of the range of {dtype.name}")
            value = int(number)
        elif dtype.kind == "f":
            value = number
        else:
            raise UserError(f"{where}: inputs of type {dtype.name} cannot be frozen")
    return np.full([int(d) for d in shape], value, dtype=dtype)
