"""fold-scale: fold a constant per-channel ``Mul`` after a Conv / ConvTranspose / Gemm / MatMul into its weights.

Exporters write frozen normalization and learnable affine blocks as elementwise ops after the layer:
torchvision's ``FrozenBatchNorm2d`` and Caffe's ``Scale`` layer (the BVLC / Caffe2 DenseNet and Inception-v2
exports) as ``Conv → Mul(s) → Add(t)``, PaddlePaddle's learnable affine blocks (PP-LCNetV3, the backbone of
PP-OCRv4's recognizer: 28 of them) as a scalar ``Mul`` and ``Add``. The op is linear in its weight and bias, so
for ``s`` with one value per output channel (or one value for all),

    (W ⊛ X + B) · s  =  (W · s) ⊛ X + B · s          W'[c] = W[c] · s[c],  B'[c] = B[c] · s[c]

and with a constant ``Add`` in between,

    ((W ⊛ X + B) + t) · s  =  (W · s) ⊛ X + B · s + t · s          the Add stays, its constant becomes t · s.

Where output channel c lives in the weight:

    Conv           W [Cout, Cin/g, k...]    W[c]
    ConvTranspose  W [Cin, Cout/g, k...]    channel c = g·(Cout/g) + j  ->  W[g·Cin/g:(g+1)·Cin/g, j]
    Gemm           transB=0: B [K, N] column c; transB=1: B [N, K] row c;  C' = C · s (alpha, beta kept)
    MatMul         W [K, N] (a 2-D constant second input) column c; no bias

The ``Mul`` disappears and the op (or the ``Add``) takes over its output tensor, so downstream names and graph
outputs are unchanged; a following constant ``Add`` is then a bias ``fold-bias`` folds. Where an ``Add`` sits
between, the op's own output keeps its name but now holds ``s · Y``: it is marked rescaled
(:func:`qcompiler.core.tags.mark_rescaled`), so per-layer validation does not compare it with the float
model's ``Y``. The math runs in float64 and is cast back to each constant's dtype: the outputs equal the
input model's up to float rounding. Several ``Mul``s in a row are folded in one run (a second run finds
nothing).

BatchNormalization statistics that ``fold-batchnorm`` recorded (:func:`qcompiler.calib.bn_statistics`: data-free
calibration reads them) follow the values: those of the tensor the ``Mul`` read move to its output's name, and those
of an op output rescaled across an ``Add`` are rescaled, as ``mean · s`` and ``std · |s|``.

Applies only when: the op's weight (and bias / C, when present) is a float constant only the op reads, the
``Mul``'s (and ``Add``'s) other input is a float constant only it reads, each tensor along the chain is read by
the next op alone and is not a graph output, and ``s`` broadcasts along the output-channel axis only (axis 1 of
a Conv's output, the last axis of a Gemm's / MatMul's; no more dimensions than the output has: a MatMul whose
data input has no known rank takes a 1-D ``s`` only). A ``Mul`` by a non-finite ``s`` is left alone.

Stats: ``folded_conv``, ``folded_convtranspose``, ``folded_gemm``, ``folded_matmul`` (Muls folded),
``through_add`` (of them, across a constant Add), ``skipped_nonfinite``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.calib import ChannelStats, bn_statistics
from qcompiler.core.context import CompileContext
from qcompiler.core.pass_base import Pass, PassResult
from qcompiler.ir.graph import (
    GraphIndex,
    along_axis,
    constant_operand_reader,
    exclusive_constant,
    is_onnx_op,
    optional_input,
    out_channels,
    remove_nodes,
)

log = logging.getLogger(__name__)

_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class _Chain:
    """One match: ``node`` → [``add`` (constant ``t``)] → ``mul`` (constant ``s``)."""

    mul: gs.Node
    scale: gs.Constant
    add: gs.Node | None = None
    shift: gs.Constant | None = None


class FoldScalePass(Pass):
    """Fold a constant per-channel Mul after Conv / ConvTranspose / Gemm / MatMul into the op's weights."""

    name = "fold-scale"
    keeps_function = True  # outputs unchanged up to float rounding (calibration after it runs the float model)
    graph_only = True  # the graph, its options and bn_stats only: done once per model in a measured compile

    def run(self, ctx: CompileContext) -> PassResult:
        graph = ctx.graph
        bn = bn_statistics(ctx)
        index = GraphIndex(graph)
        stats: Counter[str] = Counter()
        doomed: list[gs.Node] = []
        for node in list(graph.nodes):
            if not is_onnx_op(node, *_OPS) or len(node.outputs) != 1 or not self._weights_ok(node, index):
                continue
            while (chain := self._match(node, index, stats)) is not None:
                last = chain.add if chain.add is not None else node  # takes over the Mul's output
                fed = last.outputs[0].name  # the tensor the Mul read
                s = self._fold(node, chain)
                _rescale(bn, fed, last.outputs[0].name, s)
                if chain.add is not None:  # the op's own output keeps its name, now holding s · Y
                    _rescale(bn, node.outputs[0].name, node.outputs[0].name, s)
                doomed.append(chain.mul)
                stats[f"folded_{node.op.lower()}"] += 1
                if chain.add is not None:
                    stats["through_add"] += 1
        remove_nodes(graph, doomed)
        return PassResult(bool(doomed), stats)

    # ------------------------------------------------------------------------------------------ matching
    @staticmethod
    def _weights_ok(node: gs.Node, index: GraphIndex) -> bool:
        w = node.inputs[1] if len(node.inputs) > 1 else None
        if not (isinstance(w, gs.Constant) and exclusive_constant(w, node, index)):
            return False
        wv = np.asarray(w.values)
        if not np.issubdtype(wv.dtype, np.floating):
            return False
        if node.op in ("Conv", "ConvTranspose") and wv.ndim < 3:
            return False
        if node.op in ("Gemm", "MatMul") and wv.ndim != 2:
            return False
        if node.op == "MatMul":
            return len(node.inputs) == 2
        b = optional_input(node, 2)
        return b is None or (isinstance(b, gs.Constant) and exclusive_constant(b, node, index)
                             and np.issubdtype(np.asarray(b.values).dtype, np.floating))

    def _match(self, node: gs.Node, index: GraphIndex, stats: Counter[str]) -> _Chain | None:
        t = node.outputs[0]
        add = shift = None
        found = constant_operand_reader(t, "Add", index)
        if found is not None:
            add, shift = found
            if not _floating(shift):
                return None
            t = add.outputs[0]
        found = constant_operand_reader(t, "Mul", index)
        if found is None:
            return None
        mul, scale = found
        if not _floating(scale) or not _along_channels(np.asarray(scale.values).shape, node):
            return None
        if not np.isfinite(np.asarray(scale.values)).all():
            stats["skipped_nonfinite"] += 1
            return None
        return _Chain(mul, scale, add, shift)

    # ----------------------------------------------------------------------------------------- rewriting
    def _fold(self, node: gs.Node, chain: _Chain) -> np.ndarray:
        """Rewrite one match; returns ``s`` per output channel [C]."""
        m = np.asarray(chain.scale.values).astype(np.float64)
        n = _out_channels(node)
        s = np.broadcast_to(m.reshape(-1), (n,))  # m holds 1 or n values (_along_channels)
        w_t = node.inputs[1]
        assert isinstance(w_t, gs.Constant)
        w = np.asarray(w_t.values)
        w_t.values = (w.astype(np.float64) * _weight_shape(s, node, w)).astype(w.dtype)
        b_t = optional_input(node, 2)
        if isinstance(b_t, gs.Constant):  # Conv / ConvTranspose bias [C], Gemm C (broadcast to [M, N])
            b = np.asarray(b_t.values)
            b_t.values = (b.astype(np.float64) * (s if b.ndim <= 1 else s.reshape(1, n))).astype(b.dtype)
        if chain.add is not None and chain.shift is not None:
            t = np.asarray(chain.shift.values)
            chain.shift.values = (t.astype(np.float64) * m).astype(t.dtype)
            self.mark_rescaled(node.outputs[0])
        last = chain.add if chain.add is not None else node
        out = chain.mul.outputs[0]
        chain.mul.outputs.clear()
        last.outputs[0] = out
        log.debug("folded %s into %s %s", chain.mul.name, node.op, node.name)
        return np.asarray(s)


def _rescale(bn: dict[str, ChannelStats], old: str, new: str, s: np.ndarray) -> None:
    """BN statistics of tensor ``old`` (if any) become those of ``new`` = ``s · old``, per channel; dropped when
    their channel count is not ``s``'s."""
    st = bn.pop(old, None)
    if st is None:
        return
    if st.mean.size == s.size:
        bn[new] = ChannelStats(mean=st.mean * s.reshape(st.mean.shape), std=st.std * np.abs(s).reshape(st.std.shape))
    else:
        log.debug("BN statistics of %s (%d channels) dropped: scaled per %d channels", old, st.mean.size, s.size)


def _floating(c: gs.Constant) -> bool:
    return bool(np.issubdtype(np.asarray(c.values).dtype, np.floating))


def _out_channels(node: gs.Node) -> int:
    return out_channels(node, tuple(np.asarray(node.inputs[1].values).shape))


def _along_channels(shape: tuple[int, ...], node: gs.Node) -> bool:
    """``shape`` broadcasts along the output-channel axis of ``node``'s output only, adding no dimension."""
    n = _out_channels(node)
    if node.op in ("Conv", "ConvTranspose"):
        rank, axis = np.asarray(node.inputs[1].values).ndim, 1
    elif node.op == "Gemm":
        rank, axis = 2, 1
    else:
        x_shape = node.inputs[0].shape
        rank = 1 if x_shape is None else max(len(x_shape), 1)
        axis = rank - 1
    return along_axis(shape, n, rank, axis)


def _weight_shape(s: np.ndarray, node: gs.Node, w: np.ndarray) -> np.ndarray:
    """``s`` [C] shaped to scale output channel c of weight ``w`` (broadcasting against ``w`` as stored)."""
    if node.op == "Conv":
        return s.reshape((-1,) + (1,) * (w.ndim - 1))
    if node.op == "ConvTranspose":
        g = int(node.attrs.get("group", 1))
        cin, cout_g = w.shape[0], w.shape[1]
        per_group = s.reshape(g, 1, cout_g, *(1,) * (w.ndim - 2))
        return np.broadcast_to(per_group, (g, cin // g, cout_g, *(1,) * (w.ndim - 2))).reshape(
            (cin, cout_g) + (1,) * (w.ndim - 2))
    if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
        return s.reshape(-1, 1)
    return s.reshape(1, -1)
