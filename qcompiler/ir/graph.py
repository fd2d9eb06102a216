"""graphsurgeon-level graph helpers, shared by passes and runtime targets (graphsurgeon + numpy, no protobuf).

graphsurgeon keeps producer/consumer links on every tensor (``tensor.inputs`` are the producing nodes,
``tensor.outputs`` the consuming ones, subgraph nodes that read an outer tensor included), so lookups are
O(1). What it lacks — "is this a graph output?", fresh unique names, removing many nodes at once — is
here, built once per pass run by :class:`GraphIndex` so that passes stay linear in the graph size.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from qcompiler.core.errors import UserError

__all__ = [
    "GraphIndex",
    "const_values",
    "exclusive_constant",
    "float16_scale_source",
    "infer_rank",
    "is_empty",
    "is_onnx_op",
    "is_topologically_sorted",
    "known_rank",
    "optional_input",
    "producer",
    "remove_nodes",
    "replace_input",
    "rewire_consumers",
    "scale_values",
    "sole_consumer",
    "stored_scale",
]


def is_onnx_op(node: gs.Node, *ops: str) -> bool:
    """True when ``node`` is a default-domain (ai.onnx) node, of one of ``ops`` when given."""
    return node.domain in (None, "", "ai.onnx") and (not ops or node.op in ops)


def producer(t: gs.Tensor) -> gs.Node | None:
    """The node producing ``t`` (``None`` for graph inputs, constants and dangling tensors)."""
    return t.inputs[0] if len(t.inputs) else None


def is_empty(t: gs.Tensor | None) -> bool:
    """True for an omitted optional input (graphsurgeon's nameless Variable)."""
    return t is None or (isinstance(t, gs.Variable) and not t.name)


def optional_input(node: gs.Node, i: int) -> gs.Tensor | None:
    """``node.inputs[i]``, or ``None`` when absent or omitted."""
    if i >= len(node.inputs):
        return None
    t = node.inputs[i]
    return None if is_empty(t) else t


def const_values(t: gs.Tensor | None) -> np.ndarray | None:
    """The values of a constant tensor (initializer), else ``None``."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    return None


def float16_scale_source(t: gs.Tensor | None) -> gs.Constant | None:
    """The float16 constant behind ``t`` when ``t`` is ``Cast(to float)`` of one (``insert-qdq``'s ``scale:
    float16``: the stored scale, cast to float32 in the graph), else ``None``."""
    node = producer(t) if isinstance(t, gs.Variable) else None
    if node is None or not is_onnx_op(node, "Cast") or len(node.inputs) != 1 or int(node.attrs.get("to", 0)) != 1:
        return None
    src = node.inputs[0]
    return src if isinstance(src, gs.Constant) and np.asarray(src.values).dtype == np.float16 else None


def stored_scale(t: gs.Tensor | None) -> np.ndarray | None:
    """The values of a scale stored in the file: a constant's, or those of a float16 constant cast to float
    (:func:`float16_scale_source`; as float32, the cast is exact); else ``None``."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    s16 = float16_scale_source(t)
    return None if s16 is None else np.asarray(s16.values).astype(np.float32)


def scale_values(t: gs.Tensor | None) -> np.ndarray | None:
    """Values of a quantization scale: a stored one (:func:`stored_scale`), or the float32 product ``Mul(a, b)``
    of two stored float32 ones (``insert-qdq`` computes an int32 bias's scale s_w · s_x that way), computed as the
    runtime does; else ``None``."""
    stored = stored_scale(t)
    if stored is not None:
        return stored
    node = producer(t) if t is not None else None
    if node is None or not is_onnx_op(node, "Mul") or len(node.inputs) != 2:
        return None
    a, b = (stored_scale(x) for x in node.inputs)
    if a is None or b is None or a.dtype != np.float32 or b.dtype != np.float32:
        return None
    return np.asarray(a * b, dtype=np.float32)


def known_rank(t: gs.Tensor | None) -> int | None:
    """Rank of ``t`` when its shape (or constant value) says so."""
    if t is None:
        return None
    if isinstance(t, gs.Constant):
        return int(np.asarray(t.values).ndim)
    shape = getattr(t, "shape", None)
    return len(shape) if shape is not None else None


# ops whose output has the rank of their first input
_SAME_RANK = frozenset({
    "Abs", "BatchNormalization", "Cast", "Ceil", "Clip", "Dropout", "Elu", "Erf", "Exp", "Floor", "Gelu",
    "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization", "LayerNormalization", "LeakyRelu", "Log",
    "LogSoftmax", "LpNormalization", "Mish", "Neg", "PRelu", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid",
    "Sign", "Softmax", "Softplus", "Softsign", "Sqrt", "Tanh", "ThresholdedRelu", "AveragePool", "MaxPool",
    "Conv", "ConvTranspose", "GlobalAveragePool", "GlobalMaxPool", "LRN", "Resize", "Upsample", "Pad",
})
_BROADCAST = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Where"})


def infer_rank(t: gs.Tensor | None, depth: int = 8) -> int | None:
    """Rank of ``t`` from its shape, else walked back through a few rank-preserving producers."""
    r = known_rank(t)
    if r is not None or t is None or depth <= 0:
        return r
    node = producer(t)
    if node is None or node.domain not in (None, "", "ai.onnx") or not node.inputs:
        return None
    op = node.op
    if op in ("Gemm", "Flatten"):
        return 2
    if op in ("Conv", "ConvTranspose") and len(node.inputs) > 1:
        r = known_rank(node.inputs[1])  # the weight's rank is the output's
        if r is not None:
            return r
    if op in _SAME_RANK:
        return infer_rank(node.inputs[0], depth - 1)
    if op in _BROADCAST or op == "MatMul":
        ranks = [infer_rank(x, depth - 1) for x in node.inputs]
        if any(x is None for x in ranks):
            return None
        known = [x for x in ranks if x is not None]
        if op == "MatMul" and min(known) < 2:
            return None
        return max(known)
    return None


#: ops whose output has the element type of their first input (data movement, arithmetic, normalization, pooling)
_SAME_TYPE_AS_FIRST = frozenset({
    "Identity", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Tile", "Slice", "Gather",
    "GatherElements", "GatherND", "Concat", "Split", "Pad", "Resize", "DepthToSpace", "SpaceToDepth",
    "MatMul", "Gemm", "Conv", "ConvTranspose", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean",
    "Neg", "Abs", "Sqrt", "Exp", "Log", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Elu", "Selu", "Gelu", "Erf",
    "HardSigmoid", "HardSwish", "Softplus", "Clip", "Softmax", "LogSoftmax", "LayerNormalization",
    "BatchNormalization", "InstanceNormalization", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Reciprocal", "Floor", "Ceil", "Round",
})


def infer_dtype(t: gs.Tensor | None, depth: int = 16) -> np.dtype | None:
    """Element type of ``t``: its own, a constant's values', a Cast's ``to``, else walked back through a few
    producers whose output has their first input's type (``Where``: its second). None when unknown (graphsurgeon
    knows graph inputs' and inferred tensors' types; intermediate ones are often unset)."""
    if t is None:
        return None
    if isinstance(t, gs.Constant):
        return np.dtype(t.values.dtype)
    if t.dtype is not None:
        try:
            return np.dtype(t.dtype)
        except TypeError:
            return None
    node = producer(t)
    if node is None or depth <= 0 or node.domain not in (None, "", "ai.onnx") or not node.inputs:
        return None
    if node.op == "Cast" and "to" in node.attrs:
        try:
            return np.dtype(helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
        except (KeyError, TypeError, ValueError):
            return None
    if node.op == "Where" and len(node.inputs) > 1:
        return infer_dtype(node.inputs[1], depth - 1)
    if node.op in _SAME_TYPE_AS_FIRST:
        return infer_dtype(node.inputs[0], depth - 1)
    return None


def replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make ``node`` read ``new`` wherever it read ``old``."""
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new


def rewire_consumers(old: gs.Tensor, new: gs.Tensor) -> int:
    """Every consumer of ``old`` reads ``new`` instead; returns how many nodes changed."""
    users = list({id(n): n for n in old.outputs}.values())  # a node reading old twice is listed twice
    for node in users:
        replace_input(node, old, new)
    return len(users)


def remove_nodes(graph: gs.Graph, nodes: Iterable[gs.Node]) -> int:
    """Detach ``nodes`` from their tensors and drop them from ``graph.nodes`` in one linear sweep."""
    doomed = {id(n): n for n in nodes}
    if not doomed:
        return 0
    for n in doomed.values():
        n.inputs.clear()
        n.outputs.clear()
    graph.nodes = [n for n in graph.nodes if id(n) not in doomed]
    return len(doomed)


def is_topologically_sorted(graph: gs.Graph) -> bool:
    """True when every node comes after the producers of its inputs (top level; linear time)."""
    seen: set[int] = set()
    for node in graph.nodes:
        for t in node.inputs:
            src = producer(t)
            if src is not None and id(src) not in seen and src is not node:
                return False
        seen.add(id(node))
    return True


class GraphIndex:
    """Facts about a graph gathered once: its IO tensors and every name in use.

    Build it at the start of a pass; call :meth:`unique_name` for every tensor or node the pass creates
    (the index remembers the names it hands out).
    """

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self._outputs = {id(t) for t in graph.outputs}
        self._inputs = {id(t) for t in graph.inputs}
        names: set[str] = {t.name for t in [*graph.inputs, *graph.outputs]}
        for n in graph.nodes:
            if n.name:
                names.add(n.name)
            names.update(t.name for t in n.inputs)
            names.update(t.name for t in n.outputs)
        self._names = names

    def is_graph_output(self, t: gs.Tensor) -> bool:
        return id(t) in self._outputs

    def is_graph_input(self, t: gs.Tensor) -> bool:
        return id(t) in self._inputs

    def is_graph_io(self, t: gs.Tensor) -> bool:
        return id(t) in self._outputs or id(t) in self._inputs

    def has_name(self, name: str) -> bool:
        return name in self._names

    def reserve(self, name: str) -> None:
        self._names.add(name)

    def unique_name(self, base: str) -> str:
        """``base`` if unused, else ``base_1``, ``base_2``, ... (deterministic); the name is reserved."""
        name, k = base, 0
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name


def sole_consumer(t: gs.Tensor, node: gs.Node, index: GraphIndex) -> bool:
    """True when ``node`` is the only reader of ``t`` (read once) and ``t`` is not a graph output."""
    return len(t.outputs) == 1 and t.outputs[0] is node and not index.is_graph_output(t)


def along_axis(shape: Iterable[int], size: int, rank: int, axis: int) -> bool:
    """A constant of ``shape`` broadcasts against a rank-``rank`` tensor along ``axis`` only — one value per
    index of that axis (``size`` of them) or one value for all — and adds no dimension (a per-channel scale or
    bias: ``[C, 1, 1]``, ``[1, C, 1, 1]``, ``[1]`` against ``[N, C, H, W]`` with axis 1)."""
    dims = tuple(int(d) for d in shape)
    if len(dims) > rank:
        return False
    aligned = (1,) * (rank - len(dims)) + dims
    return all(d == 1 or (i == axis and d == size) for i, d in enumerate(aligned))


def out_channels(node: gs.Node, shape: tuple[int, ...]) -> int:
    """The output channels of a Conv / ConvTranspose / Gemm / MatMul whose weight (input 1) has ``shape``: Conv
    ``[Cout, Cin/g, k…]``, ConvTranspose ``[Cin, Cout/g, k…]`` (times its groups), Gemm ``B`` ``[N, K]`` with
    ``transB`` else ``[K, N]``, MatMul ``[K, N]``."""
    if node.op == "Conv" or (node.op == "Gemm" and int(node.attrs.get("transB", 0))):
        return int(shape[0])
    if node.op == "ConvTranspose":
        return int(shape[1]) * int(node.attrs.get("group", 1))
    return int(shape[1])


def constant_operand_reader(t: gs.Tensor, op: str, index: GraphIndex) -> tuple[gs.Node, gs.Constant] | None:
    """The binary ``op`` node (an ``Add``, a ``Mul``) that alone reads ``t`` — once; ``t`` no graph output — and the
    constant it takes as its other input, one only that node reads; ``None`` otherwise."""
    if len(t.outputs) != 1 or index.is_graph_output(t):
        return None
    reader = t.outputs[0]
    if not is_onnx_op(reader, op) or len(reader.inputs) != 2 or reader.inputs[0] is reader.inputs[1]:
        return None
    c = reader.inputs[1] if reader.inputs[0] is t else reader.inputs[0]
    if not (isinstance(c, gs.Constant) and exclusive_constant(c, reader, index)):
        return None
    return reader, c


def absorb_bias_add(node: gs.Node, add: gs.Node, bias: np.ndarray, c: np.ndarray, dtype: np.dtype,
                    index: GraphIndex) -> None:
    """``node`` (a Conv / ConvTranspose / Gemm with ``n`` output channels whose output ``add`` alone read) gets
    ``bias + c`` (``bias`` [n] float64, ``c`` the Add's constant: one value per channel or one for all) as a new
    input 2 of ``dtype``, and takes over the Add's output tensor, so names downstream are unchanged; ``add`` is
    left without outputs for the caller to remove."""
    n = bias.size
    new_b = bias.reshape(n) + np.broadcast_to(np.asarray(c, np.float64).reshape(-1), (n,))
    const = gs.Constant(index.unique_name(f"{node.name or node.outputs[0].name}.bias"), new_b.astype(dtype))
    while len(node.inputs) < 2:
        node.inputs.append(gs.Variable.empty())
    if len(node.inputs) == 2:
        node.inputs.append(const)
    else:
        node.inputs[2] = const
    out = add.outputs[0]
    add.outputs.clear()
    node.outputs[0] = out


def exclusive_constant(t: gs.Tensor, node: gs.Node, index: GraphIndex) -> bool:
    """True when ``t`` is a constant read only by ``node`` (so rewriting it affects nothing else)."""
    return isinstance(t, gs.Constant) and sole_consumer(t, node, index) and not index.is_graph_input(t)


def graph_input(graph: gs.Graph, name: str, where: str) -> gs.Variable:
    """Graph input ``name`` of ``graph``; a ``UserError`` starting with ``where`` (the flag at fault) when the model
    has none, listing the inputs it has."""
    for t in graph.inputs:
        if t.name == name:
            return t
    raise UserError(f"{where}: the model has no graph input '{name}' (inputs: "
                    f"{', '.join(t.name for t in graph.inputs) or 'none'})")
