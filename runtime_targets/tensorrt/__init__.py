"""Target ``tensorrt``: explicit-quantization QDQ the way TensorRT's ONNX parser and optimizer expect it.

TensorRT quantizes symmetrically: every Q/DQ zero point is 0, activations are per tensor, weights per tensor or
per output channel. What this target emits (numerics checked in onnxruntime CPU; no TensorRT needed to build):

* **int8**: ``QuantizeLinear -> DequantizeLinear`` (int8, zero point 0) on the activation inputs of
  Conv / ConvTranspose / Gemm / MatMul; weights as int8 initializers read through ``DequantizeLinear`` (no
  QuantizeLinear on a weight) with per-channel scales on the output-channel axis (Conv 0, ConvTranspose 1,
  Gemm 0 with ``transB=1`` else 1, MatMul the last axis). **The default plan's uint8 asymmetric activations
  are mapped to int8 symmetric** (same calibration method, range ±max) when the plan is checked — the
  ``.plan.yaml`` beside the output shows the mapped spec; uint8 or asymmetric *weights* are refused.
* **fp8 e4m3**: the same placement with ``float8e4m3fn`` activations and weights (both, per tensor / per
  channel). fp8 e5m2 is refused.
* **int4** block-wise *weight-only* ``DequantizeLinear`` (``block_size`` along the reduction axis, zero point 0)
  feeding MatMul / Gemm with float activations — TensorRT reads the standard op (no ``MatMulNBits``).
* **biases** stay float: TensorRT adds the bias in the fused kernel's epilogue and has no int32
  DequantizeLinear, so the generic int32 bias ``DequantizeLinear`` is folded back to float32 (``float_bias.py``).
* **residual Add** (``residual_add.py`` and :meth:`TensorRTTarget.output_tensors`): following TensorRT's Q/DQ
  placement recommendations ("quantize the residual input"), the Add fed directly by a quantized Conv / Gemm /
  MatMul gets Q/DQ on its *other* input (the skip branch), and none on the Conv-side input, so TensorRT fuses
  the Add (and a following ReLU) into the Conv's epilogue and reads the residual as int8 / fp8.

Refused before any rewrite, with node and reason: int16 / uint16 / int4 activations, uint8 or asymmetric weights,
binary / ternary / shift schemes, block-wise int8 / fp8, int4 not block-wise or not weight-only, an explicit
weight ``axis`` (TensorRT wants the output-channel axis), a weight and activation of different types on one op,
weight-only Conv, and quantized weights of ops TensorRT has no Q/DQ form for (LSTM, GRU, RNN).
``rules.py`` states the output rules and checks them on every compiled graph.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import onnx_graphsurgeon as gs

from qcompiler.runtime_targets import OpCapability, Target

if TYPE_CHECKING:
    from qcompiler.core.context import CompileContext
    from qcompiler.plan import NodePlan, QuantSpec, ResolvedPlan

log = logging.getLogger(__name__)

_ACT = frozenset({"int8", "fp8e4m3"})
_W_CONV = frozenset({"int8", "fp8e4m3"})
_W_GEMM = frozenset({"int8", "fp8e4m3", "int4"})
_G_CONV = frozenset({"per_tensor", "per_channel"})
_G_GEMM = frozenset({"per_tensor", "per_channel", "block"})

#: weighted ops whose epilogue can absorb a following Add
FUSING_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def symmetric_int8(spec: QuantSpec) -> QuantSpec:
    """The activation spec TensorRT runs for ``spec``: uint8 / asymmetric int8 become int8 symmetric."""
    if spec.scheme == "int" and spec.dtype in ("uint8", "int8") and (spec.dtype == "uint8" or not spec.symmetric):
        return replace(spec, dtype="int8", symmetric=True)
    return spec


class TensorRTTarget(Target):
    name: ClassVar[str] = "tensorrt"
    description: ClassVar[str] = ("TensorRT explicit quantization: int8 / fp8-e4m3 symmetric Q/DQ on Conv/Gemm/"
                                  "MatMul inputs, per-channel weights on the output axis, residual-Add placement, "
                                  "int4 block weight-only DequantizeLinear; uint8 activations mapped to int8")
    lowering: ClassVar[tuple[str, ...]] = ("trt-float-bias", "trt-residual-add", "trt-check-rules")

    def __init__(self) -> None:
        super().__init__(
            ops={
                "Conv": OpCapability(_W_CONV, _ACT, _G_CONV),
                "ConvTranspose": OpCapability(_W_CONV, _ACT, _G_CONV),
                "Gemm": OpCapability(_W_GEMM, _ACT, _G_GEMM),
                "MatMul": OpCapability(_W_GEMM, _ACT, _G_GEMM),
            },
            other_activation_dtypes=_ACT,
        )

    def capabilities(self) -> dict[str, Any]:
        caps = super().capabilities()
        caps["notes"] = ["zero points are 0 (symmetric only); uint8/asymmetric activations are mapped to int8",
                         "int4 weights: block-wise, weight-only, MatMul/Gemm",
                         "Conv/ConvTranspose: weight and activation both int8 or both fp8e4m3"]
        return caps

    # ------------------------------------------------------------------------------------------ checking
    def check(self, resolved: ResolvedPlan) -> None:
        """Map uint8 / asymmetric activations to int8 symmetric in ``resolved``, then refuse what TensorRT
        cannot run (first offending node, with the reason)."""
        mapped = 0
        for np_ in resolved.nodes.values():
            if np_.activation is not None:
                spec = symmetric_int8(np_.activation)
                if spec is not np_.activation:
                    np_.activation = spec
                    mapped += 1
        if mapped:
            log.info("tensorrt: %d node(s) with uint8/asymmetric activations mapped to int8 symmetric", mapped)
        super().check(resolved)

    def check_node(self, np_: NodePlan) -> None:
        w, a = np_.weight, np_.activation
        if w is not None and w.scheme == "int":
            if w.dtype == "uint8" or (w.dtype in ("int8", "int4") and not w.symmetric):
                raise self._refuse(np_, f"weights must be symmetric signed with zero point 0 (got {w.dtype}, "
                                        f"symmetric={w.symmetric}); set weight {{dtype: int8, symmetric: true}}")
            if w.axis is not None:
                raise self._refuse(np_, f"explicit weight axis {w.axis}: TensorRT quantizes weights along the "
                                        "output-channel axis; leave 'axis' unset")
        super().check_node(np_)
        if w is None:
            if a is not None and np_.op_type in ("Conv", "ConvTranspose") and np_.weight_inputs:
                raise self._refuse(np_, "a quantized activation with a float weight: TensorRT runs a Conv in "
                                        "int8/fp8 only with both inputs quantized")
            return
        if w.dtype == "int4":
            if w.granularity != "block":
                raise self._refuse(np_, f"int4 weights are block-wise on TensorRT (got {w.granularity}); "
                                        "set granularity: block")
            if a is not None:
                raise self._refuse(np_, "int4 weights are weight-only on TensorRT; set activation {dtype: float}")
            return
        if w.granularity == "block":
            raise self._refuse(np_, f"block-wise scales are for int4 weight-only layers, not {w.dtype}")
        if a is None:
            if np_.op_type in ("Conv", "ConvTranspose"):
                raise self._refuse(np_, "weight-only Conv: TensorRT runs a quantized Conv with both inputs "
                                        "quantized; quantize the activation too or keep the node float")
            if w.dtype != "int8":
                raise self._refuse(np_, f"{w.dtype} weight-only layers are not supported (int8 or int4 only)")
            return
        if (w.dtype == "fp8e4m3") != (a.dtype == "fp8e4m3"):
            raise self._refuse(np_, f"weight {w.dtype} with activation {a.dtype}: TensorRT needs both inputs "
                                    "int8 or both fp8e4m3")

    # ------------------------------------------------------------------------------------------ placement
    def output_tensors(self, ctx: CompileContext) -> dict[str, QuantSpec]:
        """The skip-branch input of every residual Add fed by a quantized Conv/Gemm/MatMul (its spec)."""
        assert ctx.resolved is not None
        out: dict[str, QuantSpec] = {}
        for add, main, residual in residual_adds(ctx.graph, ctx.resolved):
            np_ = ctx.resolved.nodes[main.name]
            assert np_.activation is not None
            out.setdefault(residual.name, np_.activation)
            log.debug("tensorrt: residual Add '%s': Q/DQ on '%s', Conv side '%s' stays float", add.name,
                      residual.name, main.name)
        return out



def depths(graph: gs.Graph) -> dict[int, int]:
    """Longest path (in nodes) from the graph inputs to each node, over the topological order."""
    depth: dict[int, int] = {}
    for node in graph.nodes:
        d = 0
        for t in node.inputs:
            if t.inputs:
                d = max(d, depth.get(id(t.inputs[0]), 0))
        depth[id(node)] = d + 1
    return depth


def residual_adds(graph: gs.Graph, resolved: ResolvedPlan) -> list[tuple[gs.Node, gs.Node, gs.Tensor]]:
    """(Add, the quantized weighted op feeding it directly, the Add's other input) for every residual Add.

    A residual Add has two non-constant inputs, at least one produced directly by a Conv/ConvTranspose/Gemm/
    MatMul whose weight and activation the plan quantizes. When both are, the deeper one (longest path from
    the inputs) is the main branch, the other is the skip branch.
    """
    def fusing(t: gs.Tensor) -> gs.Node | None:
        node = t.inputs[0] if t.inputs else None
        if node is None or node.op not in FUSING_OPS or node.domain not in (None, "", "ai.onnx"):
            return None
        np_ = resolved.nodes.get(node.name)
        if np_ is None or np_.weight is None or np_.activation is None or len(t.outputs) != 1:
            return None
        return node

    found: list[tuple[gs.Node, gs.Node, gs.Tensor]] = []
    depth: dict[int, int] | None = None
    for node in graph.nodes:
        if node.op != "Add" or node.domain not in (None, "", "ai.onnx") or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        if isinstance(a, gs.Constant) or isinstance(b, gs.Constant) or a is b:
            continue
        fa, fb = fusing(a), fusing(b)
        if fa is None and fb is None:
            continue
        if fa is not None and fb is not None:
            depth = depth if depth is not None else depths(graph)
            main, residual = (fa, b) if depth[id(fa)] >= depth[id(fb)] else (fb, a)
        elif fa is not None:
            main, residual = fa, b
        else:
            assert fb is not None
            main, residual = fb, a
        found.append((node, main, residual))
    return found
