"""Weight layers seen as matrices with channels: the common ground of the PTQ algorithm passes.

A *layer* is a Conv, Gemm or MatMul whose weight (input 1) is a constant, plus its bias: Conv input 2, Gemm's C,
or a constant per-channel ``Add`` right after a MatMul / Conv (as Paddle and many exporters write it). For such a
layer this module answers, in numpy:

* which weight axis holds the output channels and which the input channels (Conv ``W[Cout, Cin/g, k…]``,
  grouped included; Gemm ``B[K, N]`` or ``B[N, K]`` with ``transB``; MatMul ``W[K, N]``);
* the channel axis of the activations: 1 for Conv (NCHW), the last one for Gemm / MatMul;
* per-channel weight ranges and rescaling of output channels (weight rows + bias) and input channels;
* adding a per-output-channel delta to the bias (creating the bias when there is none);
* the weight as a 2-D matrix ``[out, reduction]`` per group (GPTQ's layout) and back.

Every mutation goes through :class:`Layer` so the passes never rewrite a weight shared outside their match:
:func:`find_layer` with ``exclusive=True`` returns only layers whose weight and bias are read by nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core import tags
from qcompiler.ir.graph import GraphIndex, is_onnx_op, optional_input

LAYER_OPS = ("Conv", "Gemm", "MatMul")


def _exclusive(t: gs.Tensor, node: gs.Node, index: GraphIndex) -> bool:
    """``t`` is a constant whose every reader is ``node`` (a node may read it more than once)."""
    return (isinstance(t, gs.Constant) and bool(t.outputs) and all(o is node for o in t.outputs)
            and not index.is_graph_io(t))


def _float_const(t: gs.Tensor | None) -> bool:
    return isinstance(t, gs.Constant) and np.issubdtype(np.asarray(t.values).dtype, np.floating)


@dataclass
class Layer:
    """A weight op, its constant weight and its bias (``bias_node`` is the separate Add carrying it, if any)."""

    node: gs.Node
    weight: gs.Constant
    bias: gs.Constant | None
    bias_node: gs.Node | None
    index: GraphIndex

    # ------------------------------------------------------------------------------------------- shapes
    @property
    def op(self) -> str:
        return str(self.node.op)

    @property
    def w(self) -> np.ndarray:
        return np.asarray(self.weight.values)

    @property
    def groups(self) -> int:
        return int(self.node.attrs.get("group", 1)) if self.op == "Conv" else 1

    @property
    def out_axis(self) -> int:
        """Axis of the weight holding the output channels."""
        if self.op == "Conv":
            return 0
        if self.op == "Gemm":
            return 0 if int(self.node.attrs.get("transB", 0)) else 1
        return 1

    @property
    def in_axis(self) -> int:
        """Axis of the weight holding the (per-group) input channels."""
        if self.op == "Conv":
            return 1
        return 1 - self.out_axis

    @property
    def n_out(self) -> int:
        return int(self.w.shape[self.out_axis])

    @property
    def n_in(self) -> int:
        return int(self.w.shape[self.in_axis]) * self.groups

    @property
    def act_axis(self) -> int:
        """Channel axis of this layer's input and output activations (-1: last)."""
        return 1 if self.op == "Conv" else -1

    @property
    def output(self) -> gs.Tensor:
        """The layer's output after its bias (the bias Add's output when the bias is separate)."""
        return (self.bias_node or self.node).outputs[0]

    def bias_values(self) -> np.ndarray:
        """The bias as float64 [n_out] (zeros when there is none)."""
        if self.bias is None:
            return np.zeros(self.n_out)
        b = np.asarray(self.bias.values, dtype=np.float64)
        return np.broadcast_to(b.reshape(-1) if b.size == self.n_out else b, (self.n_out,)).astype(np.float64)

    # --------------------------------------------------------------------------------- weight as matrix
    def grouped(self, w: np.ndarray) -> np.ndarray:
        """``w`` viewed as ``[groups, out per group, in per group, taps]`` (taps: Conv kernel positions)."""
        if self.op == "Conv":
            g = self.groups
            return w.reshape(g, w.shape[0] // g, w.shape[1], -1)
        m = w if self.out_axis == 0 else w.T
        return m.reshape(1, m.shape[0], m.shape[1], 1)

    def ungrouped(self, gw: np.ndarray, like: np.ndarray) -> np.ndarray:
        if self.op == "Conv":
            return gw.reshape(like.shape)
        m = gw.reshape(gw.shape[1], gw.shape[2])
        return m if self.out_axis == 0 else m.T

    def out_range(self, w: np.ndarray | None = None) -> np.ndarray:
        """max |W| per output channel, float64 [n_out]."""
        gw = np.abs(self.grouped(self.w if w is None else w)).astype(np.float64)
        return gw.max(axis=(2, 3)).reshape(-1)

    def in_range(self, w: np.ndarray | None = None) -> np.ndarray:
        """max |W| per input channel (over every output channel reading it), float64 [n_in]."""
        gw = np.abs(self.grouped(self.w if w is None else w)).astype(np.float64)
        return gw.max(axis=(1, 3)).reshape(-1)

    def scale_out(self, w: np.ndarray, s: np.ndarray) -> np.ndarray:
        """``w`` with output channel c multiplied by s[c] (the bias is scaled by :meth:`scale_bias`)."""
        gw = self.grouped(w)
        return self.ungrouped(gw * s.reshape(gw.shape[0], gw.shape[1], 1, 1), w)

    def scale_in(self, w: np.ndarray, s: np.ndarray) -> np.ndarray:
        """``w`` with input channel i multiplied by s[i]."""
        gw = self.grouped(w)
        return self.ungrouped(gw * s.reshape(gw.shape[0], 1, gw.shape[2], 1), w)

    def in_sum(self, w: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Σ_i,taps W[c, i, tap]·x[i] per output channel c: the output of a constant input x[n_in] (no padding)."""
        gw = self.grouped(w).sum(axis=3)  # [g, out_g, in_g]
        return np.einsum("goi,gi->go", gw, x.reshape(gw.shape[0], gw.shape[2])).reshape(-1)

    # ---------------------------------------------------------------------------------------- mutation
    def set_weight(self, w: np.ndarray) -> None:
        self.weight.values = np.asarray(w).astype(self.w.dtype)

    def set_bias(self, b: np.ndarray, tag: str) -> None:
        """Write bias values [n_out] (float64), creating the bias (Conv input 2, Gemm C, or an Add after a
        MatMul, tagged ``tag``) when the layer has none."""
        dtype = self.w.dtype
        if self.bias is not None:
            old = np.asarray(self.bias.values)
            self.bias.values = b.reshape(old.shape if old.size == b.size else (-1,)).astype(old.dtype)
            return
        name = self.index.unique_name(f"{self.node.name or self.weight.name}.bias")
        const = gs.Constant(name, b.astype(dtype))
        if self.op in ("Conv", "Gemm"):
            while len(self.node.inputs) < 2:
                self.node.inputs.append(gs.Variable.empty())
            if len(self.node.inputs) == 2:
                self.node.inputs.append(const)
            else:
                self.node.inputs[2] = const
            if self.op == "Gemm":
                self.node.attrs["beta"] = 1.0
        else:  # MatMul: Y = MatMul(...) becomes Y' = MatMul(...); Y = Add(Y', b) (Y keeps its name and readers)
            y = self.node.outputs[0]
            mid = gs.Variable(self.index.unique_name(f"{y.name}.nobias"), dtype=y.dtype, shape=y.shape)
            self.node.outputs[0] = mid
            add = gs.Node("Add", self.index.unique_name(f"{self.node.name or 'MatMul'}.bias_add"),
                          inputs=[mid, const], outputs=[y])
            tags.tag(add, tag)
            self.index.graph.nodes.append(add)
            self.bias_node = add
        self.bias = const

    def bias_writable(self) -> bool:
        """The bias can be rescaled / shifted per channel without touching anything outside the layer."""
        if self.bias is None:
            if self.op == "Gemm":
                return float(self.node.attrs.get("alpha", 1.0)) == 1.0
            return True
        b = np.asarray(self.bias.values)
        if self.op == "Gemm" and float(self.node.attrs.get("beta", 1.0)) != 1.0:
            return False
        return b.size == self.n_out


def find_layer(node: gs.Node, index: GraphIndex, *, exclusive: bool = True) -> Layer | None:
    """The :class:`Layer` of ``node`` (None when it is not a Conv / Gemm / MatMul with a constant float weight
    and a per-channel bias, or — with ``exclusive`` — when its weight or bias is read by anything else)."""
    if not is_onnx_op(node, *LAYER_OPS) or len(node.inputs) < 2 or not node.outputs:
        return None
    w_t = node.inputs[1]
    if not _float_const(w_t):
        return None
    assert isinstance(w_t, gs.Constant)
    w = np.asarray(w_t.values)
    if node.op == "Conv":
        g = int(node.attrs.get("group", 1))
        if w.ndim < 3 or g < 1 or w.shape[0] % g:
            return None
    elif node.op == "Gemm":
        if w.ndim != 2 or int(node.attrs.get("transA", 0)):
            return None
    elif w.ndim != 2:
        return None
    if exclusive and not _exclusive(w_t, node, index):
        return None
    n_out = w.shape[0] if node.op == "Conv" or (node.op == "Gemm" and int(node.attrs.get("transB", 0))) else w.shape[1]
    bias: gs.Constant | None = None
    bias_node: gs.Node | None = None
    if node.op in ("Conv", "Gemm"):
        b_t = optional_input(node, 2)
        if b_t is not None:
            if not _float_const(b_t):
                return None
            assert isinstance(b_t, gs.Constant)
            if np.asarray(b_t.values).size != n_out and node.op == "Conv":
                return None
            if exclusive and not _exclusive(b_t, node, index):
                return None
            bias = b_t
    if bias is None and node.op in ("Conv", "MatMul"):
        bias_node, bias = _bias_add(node, n_out, index, exclusive)
    return Layer(node, w_t, bias, bias_node, index)


def _bias_add(node: gs.Node, n_out: int, index: GraphIndex,
              exclusive: bool) -> tuple[gs.Node | None, gs.Constant | None]:
    """A constant per-channel Add that alone reads ``node``'s output: (Add, constant) or (None, None)."""
    y = node.outputs[0]
    if len(y.outputs) != 1 or index.is_graph_output(y):
        return None, None
    add = y.outputs[0]
    if not is_onnx_op(add, "Add") or len(add.inputs) != 2:
        return None, None
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    if other is y or not _float_const(other):
        return None, None
    assert isinstance(other, gs.Constant)
    shape = tuple(np.asarray(other.values).shape)
    if node.op == "Conv":
        rank = len(np.asarray(node.inputs[1].values).shape)
        ok = shape in ((n_out,) + (1,) * (rank - 2), (1, n_out) + (1,) * (rank - 2))
    else:
        ok = len(shape) >= 1 and shape[-1] == n_out and int(np.prod(shape)) == n_out
    if not ok or (exclusive and not _exclusive(other, add, index)):
        return None, None
    return add, other
