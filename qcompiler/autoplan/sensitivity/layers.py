"""The layers under test and what a candidate makes of them: the float weight ``insert-qdq`` would give a layer
(:func:`fake_quantize`) and the activation ranges ``calibrate`` would give its input and the outputs the target
quantizes (:func:`activation_qparams`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler import quant
from qcompiler.calib import CalibrationSource, collect, input_signatures
from qcompiler.ir.axes import block_axis, per_channel_axis
from qcompiler.plan import QuantSpec
from qcompiler.quant import schemes


@dataclass
class LayerUnderTest:
    """A quantizable layer: its node in the float graph, the weight inputs, and the spec of each candidate
    allowed for it (``None`` = keep float)."""

    name: str
    node: gs.Node
    weight_inputs: tuple[int, ...]
    specs: dict[str, QuantSpec | None]
    activation: QuantSpec | None = None  # how the plan quantizes the layer's input (pd quantizes it too)
    #: candidate -> (tensor, spec): an output the target quantizes as well when the layer takes that candidate
    #: (e.g. the ort target's QLinearConv output for int8 Conv), with all its readers
    output_quant: dict[str, tuple[str, QuantSpec]] = field(default_factory=dict)

    @property
    def op_type(self) -> str:
        return str(self.node.op)

    def weights(self) -> list[np.ndarray]:
        return [np.asarray(self.node.inputs[i].values, dtype=np.float32) for i in self.weight_inputs]

    @property
    def params(self) -> int:
        return int(sum(np.prod(self.node.inputs[i].shape) for i in self.weight_inputs))


# ------------------------------------------------------------------------------------------ fake quant
def _axes(node: gs.Node, ndim: int, spec: QuantSpec) -> tuple[int | None, int | None]:
    axis: int | None = None
    block: int | None = None
    if spec.granularity == "per_channel":
        axis = spec.axis if spec.axis is not None else per_channel_axis(node, ndim)
    elif spec.granularity == "block":
        axis = spec.axis if spec.axis is not None else block_axis(node, ndim)
        block = spec.block_size
    if axis is not None and axis < 0:
        axis += ndim
    return axis, block


def fake_quantize(node: gs.Node, values: np.ndarray, spec: QuantSpec, opset: int = 21) -> np.ndarray:
    """The float weight ``insert-qdq`` would give ``node`` for ``spec`` (dequantized codes), as float32."""
    w = np.asarray(values, dtype=np.float32)
    axis, block = _axes(node, w.ndim, spec)
    if spec.scheme != "int" or spec.scale == "pow2":
        return schemes.quantize_for_spec(w, spec, axis, block, opset).qt.dequantize().astype(np.float32)
    return quant.quantize_weight(w, spec.dtype, spec.symmetric, axis, block, spec.range,
                                 f16=spec.scale == "float16").dequantize()


def quantized_weights(layer: LayerUnderTest, cand: str, opset: int = 21) -> list[np.ndarray]:
    """The layer's weights fake-quantized for candidate ``cand`` (one that quantizes it)."""
    spec = layer.specs[cand]
    assert spec is not None
    return [fake_quantize(layer.node, w, spec, opset) for w in layer.weights()]


# ---------------------------------------------------------------------------------- activation ranges
def activation_qparams(graph: gs.Graph, layers: Sequence[LayerUnderTest], feeds: Sequence[dict[str, np.ndarray]],
                       opset: int, source: Any = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Scale and zero point (tensor name -> (s, z)) of each layer's input activation and of the outputs the
    target quantizes, calibrated on ``feeds`` as ``calibrate`` would. Only activation dtypes QuantizeLinear takes
    at the graph's opset; others stay float here."""

    def usable(a: QuantSpec | None) -> bool:
        if a is None or a.is_float or a.scheme != "int":
            return False
        if a.dtype.startswith("fp8"):
            return int(graph.opset) >= 19
        return a.dtype in ("int8", "uint8") or int(graph.opset) >= 21

    specs: dict[str, QuantSpec] = {}
    inputs = {t.name for t in graph.inputs}
    for layer in layers:
        x = layer.node.inputs[0] if layer.node.inputs else None
        if usable(layer.activation) and x is not None and not isinstance(x, gs.Constant):
            assert layer.activation is not None
            specs.setdefault(x.name, layer.activation)
        for t_name, spec in layer.output_quant.values():
            if usable(spec) and t_name not in inputs:
                specs.setdefault(t_name, spec)
    if not specs:
        return {}
    if source is None:
        source = CalibrationSource.from_feeds(list(feeds), input_signatures(graph), "sensitivity samples")
    stats = collect(graph, specs, source)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, spec in specs.items():
        if name in stats:
            lo, hi = stats[name].range(spec)
            out[name] = quant.qparams(lo, hi, spec.dtype, spec.symmetric)
    return out
