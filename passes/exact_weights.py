"""exact-weights: put the float weights back behind a lowered quantized graph (a diagnostic, the measured
default's ceiling).

``insert-qdq{exact-weights=true}`` quantizes weights, biases and activations as planned and records, for every
weight it quantized, the float values its ``DequantizeLinear`` output ``W'`` stands for
(:attr:`CompileContext.exact_weights`: ``W'`` name -> ``W``). The target lowers that graph as usual (which
activations run into integer kernels, which weights are dequantized at load: decisions that depend on the
weights being quantized). This pass, last, rewires every reader of a recorded ``W'`` to a constant holding
``W`` and lets cleanup drop the codes, scales and dequantization nodes nobody reads any more::

    Wq --DequantizeLinear(s, z)--> W' --> Conv           becomes           W (float const) --> Conv
    Wq --Cast--> Mul(s) --> W' --> Conv   (load-time)    becomes           W (float const) --> Conv

so the model computes ``f(x̂; W)`` where the compiled model computes ``f(x̂; Ŵ)``: every activation rounded
where and as the compiled model rounds it (``x̂``), every weight exact (``Ŵ = W``), biases as quantized. An
integer kernel onnxruntime would fuse (QLinearConv: int8 ``x̂`` and ``Ŵ``, int32 accumulation, requantized
output) computes ``Q(Σ x̂·Ŵ + b̂)`` exactly as its float reference does, so the difference between the two
models' outputs is the weights' rounding alone. A weight-rounding algorithm (GPTQ, which chooses ``Ŵ`` to
minimize ``‖(W − Ŵ)·X‖`` on float inputs) cannot make the compiled model closer to the float model than this one
beyond the interaction of the two errors; :mod:`qcompiler.recipe` skips a GPTQ candidate whose ceiling measures
below the plain default plan.

A recorded weight a lowering folded into an op that reads its codes directly (MatMulNBits, a fused integer
op, GatherBlockQuantized) has no ``W'`` left to rewire: the pass refuses (``UserError`` naming it) rather than
return a model that is not the ceiling. Without records the pass changes nothing; a second run finds nothing.
Graph inputs and outputs keep their names. Stats: ``weights_restored``.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.pass_base import Pass, PassResult

log = logging.getLogger(__name__)


class ExactWeightsPass(Pass):
    """Rewire the readers of each quantized weight recorded by ``insert-qdq{exact-weights=true}`` to its float
    values."""

    name = "exact-weights"
    requires = frozenset({"qdq"})

    def run(self, ctx: CompileContext) -> PassResult:
        recorded = ctx.exact_weights
        stats: Counter[str] = Counter()
        if not recorded:
            return PassResult(modified=False, stats=stats)
        graph = ctx.graph
        tensors = graph.tensors()
        consts: dict[str, gs.Constant] = {}
        missing = []
        for name, values in recorded.items():
            t = tensors.get(name)
            if t is None or not t.outputs:
                missing.append(name)
                continue
            const = consts.get(name)
            if const is None:
                const = consts[name] = gs.Constant(f"{name}:exact", np.asarray(values, dtype=np.float32))
            for reader in list(t.outputs):
                for i, x in enumerate(reader.inputs):
                    if x is t:
                        reader.inputs[i] = const
            stats["weights_restored"] += 1
        if missing:
            raise UserError(f"exact-weights: {len(missing)} quantized weight(s) were lowered into ops reading their "
                            f"codes (first: '{missing[0]}'); no float weight to put back")
        ctx.exact_weights = {}
        graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(modified=stats["weights_restored"] > 0, stats=stats)
