"""fold-bias: fold a per-channel constant ``Add`` after a Conv / ConvTranspose / Gemm into the op's bias.

Exporters (Paddle's squeeze-excitation blocks, for one) often write ``Y = Conv(X, W) + c`` with ``c`` of shape
``[1, C, 1, 1]`` instead of using the Conv's bias input. Folded, ``Y = Conv(X, W, b + c)`` computes the same
(``b`` the existing bias, 0 when absent); the difference for quantization is that the op's output is then the
biased value, so the integer kernel (QLinearConv / QGemm) adds the bias in int32 and no extra quantization of
the un-biased intermediate is needed. Gemm: ``C' = β·C + c`` (broadcast to [N]) and β becomes 1.

Applies when the op's output is read only by the Add (and is not a graph output), the Add's other input is a
float constant read by nothing else holding one value per output channel (``[C]``, ``[C, 1, …]``,
``[1, C, 1, …]`` for Conv; ``[N]`` or ``[1, N]`` for Gemm) or one value for all (``[]``, ``[1]``, ``[1, 1, …]``
with no more dimensions than the output: the scalar ``Add`` that ``fold-scale`` leaves behind a folded scalar
``Mul`` in PP-OCRv4's learnable affine blocks; not one a Clip alone reads: ``x + 3 → Clip(0, 6)`` starts a
hard-sigmoid spelled out, which ``fuse-activations`` fuses into one op), and the op's bias (if any) is a constant
only it reads. The op takes over the Add's output tensor, so names downstream are unchanged. A second run finds
nothing to fold.

Stats: ``folded_conv``, ``folded_convtranspose``, ``folded_gemm``, ``kept_activation_add``.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core.pass_base import GraphPass, PassResult
from qcompiler.ir.graph import (
    GraphIndex,
    absorb_bias_add,
    along_axis,
    constant_operand_reader,
    exclusive_constant,
    is_onnx_op,
    optional_input,
    out_channels,
    remove_nodes,
)

log = logging.getLogger(__name__)


class FoldBiasPass(GraphPass):
    """Fold a per-channel constant Add after Conv / ConvTranspose / Gemm into the op's bias input."""

    name = "fold-bias"
    keeps_function = True  # outputs unchanged up to float rounding (calibration after it runs the float model)
    graph_only = True  # the graph and its options only: done once per model in a measured compile (core.prepared)

    def run_graph(self, graph: gs.Graph) -> PassResult:
        index = GraphIndex(graph)
        stats: Counter[str] = Counter()
        doomed: list[gs.Node] = []
        for node in list(graph.nodes):
            w = node.inputs[1] if is_onnx_op(node, "Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 1 else None
            if not isinstance(w, gs.Constant) or len(node.outputs) != 1:
                continue
            shape = tuple(np.asarray(w.values).shape)
            n_out = _out_channels(node, shape)
            found = constant_operand_reader(node.outputs[0], "Add", index)
            if n_out is None or found is None:
                continue
            add, c_t = found
            c = np.asarray(c_t.values)
            if not np.issubdtype(c.dtype, np.floating) or not _per_channel(tuple(c.shape), n_out, node.op, len(shape)):
                continue
            if c.size == 1 and n_out != 1 and _starts_activation(add):
                stats["kept_activation_add"] += 1  # x + 3 → Clip(0, 6): fuse-activations' hard-sigmoid
                continue
            b_t = optional_input(node, 2)
            if b_t is not None and not (isinstance(b_t, gs.Constant) and exclusive_constant(b_t, node, index)):
                continue
            b = np.zeros(n_out) if b_t is None else np.asarray(b_t.values, dtype=np.float64)
            if node.op == "Gemm":
                beta = float(node.attrs.get("beta", 1.0))
                try:
                    b = np.broadcast_to(b * beta, (n_out,))
                except ValueError:
                    continue
                node.attrs["beta"] = 1.0
            elif b.size != n_out:
                continue
            absorb_bias_add(node, add, b, c, np.asarray(w.values).dtype, index)
            doomed.append(add)
            stats[f"folded_{node.op.lower()}"] += 1
        remove_nodes(graph, doomed)
        return PassResult(bool(doomed), stats)


def _out_channels(node: gs.Node, shape: tuple[int, ...]) -> int | None:
    """Output channels of the Conv / ConvTranspose (a weight of rank ≥ 3) or Gemm (2-D ``B``, ``A`` not
    transposed) with weight ``shape``; ``None`` for other layouts."""
    if node.op in ("Conv", "ConvTranspose"):
        return out_channels(node, shape) if len(shape) >= 3 else None
    if len(shape) != 2 or int(node.attrs.get("transA", 0)):
        return None
    return out_channels(node, shape)


def _starts_activation(add: gs.Node) -> bool:
    """The Add's output goes to a Clip alone: the ``x + 3 → Clip(0, 6)`` head of a hard-sigmoid spelled out,
    which ``fuse-activations`` turns into one HardSigmoid only while the Add is there."""
    out = add.outputs[0]
    return len(out.outputs) == 1 and is_onnx_op(out.outputs[0], "Clip")


def _per_channel(shape: tuple[int, ...], n: int, op: str, rank: int) -> bool:
    """One value per output channel, broadcasting over the output's axis 1 (Conv) / last axis (Gemm), or one
    value for all, adding no dimension to the output (rank ``rank``; a Gemm's is 2)."""
    return along_axis(shape, n, 2, 1) if op == "Gemm" else along_axis(shape, n, rank, 1)
