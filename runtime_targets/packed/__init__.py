"""Target ``packed``: bit-packed custom ops (domain ``ai.qcompiler``, version 1) for low-bit layers.

Layers whose plan gives the weights a low-bit scheme become custom ops with bit-packed weights and one float
scale per output channel (:mod:`.packing` has the byte layout, :mod:`.ops` the numpy reference semantics):

==============================================  =====================  ==============================
op                                              weights                replaces
==============================================  =====================  ==============================
``BinaryConv`` / ``BinaryGemm`` / ``BinaryMatMul``     1 bit, 8 per byte      Conv / Gemm / MatMul
``TernaryConv`` / ``TernaryGemm`` / ``TernaryMatMul``  2 bits, 4 per byte     Conv / Gemm / MatMul
``ShiftConv`` / ``ShiftGemm`` / ``ShiftMatMul``        sign + 3-bit exponent  Conv / Gemm / MatMul
``Shift3Conv`` / ``Shift3Gemm`` / ``Shift3MatMul``     sign + 2-bit exponent  Conv / Gemm / MatMul (shift, bits 3)
``Shift2Conv`` / ``Shift2Gemm`` / ``Shift2MatMul``     sign + 1-bit exponent  Conv / Gemm / MatMul (shift, bits 2)
``Int3Conv`` / ``Int3Gemm`` / ``Int3MatMul``           3 bits, 8 per 3 bytes  Conv / Gemm / MatMul (uniform, bits 3)
``Int2Conv`` / ``Int2Gemm`` / ``Int2MatMul``           2 bits, 4 per byte     Conv / Gemm / MatMul (uniform, bits 2)
==============================================  =====================  ==============================

Each op is written with a model-local ONNX function body (:mod:`.functions`), so stock onnxruntime runs the
model unchanged; ``--strip-function-bodies`` leaves the bodies out for a runtime with native kernels. Layers
the plan keeps int8 (e.g. the first and last) are lowered exactly as for ``ort`` (standard QDQ). A low-bit
scheme on an op without a packed form (ConvTranspose, LSTM, ...) is refused before any rewrite.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from qcompiler.quant.schemes import LOWBIT_SCHEMES
from qcompiler.runtime_targets import OpCapability
from qcompiler.runtime_targets.ort import OrtTarget
from qcompiler.runtime_targets.packed.functions import DOMAIN, DOMAIN_VERSION, INPUTS, MIN_OPSET, OPS
from qcompiler.runtime_targets.packed.packing import FIELD_BITS

if TYPE_CHECKING:
    from qcompiler.core.context import CompileContext
    from qcompiler.plan import NodePlan, QuantSpec

__all__ = ["DOMAIN", "DOMAIN_VERSION", "OPS", "PackedTarget"]

#: ops that have a packed (custom-op) form
PACKED_OPS = ("Conv", "Gemm", "MatMul")


class PackedTarget(OrtTarget):
    #: no ``scale: float16`` (its lowering reads constant float32 scales)
    weight_scales: ClassVar[frozenset[str]] = frozenset({"float", "pow2"})
    name: ClassVar[str] = "packed"
    description: ClassVar[str] = (f"bit-packed {DOMAIN} ops (Binary/Ternary/Shift/Int3/Int2 Conv, Gemm, MatMul) with ONNX "
                                  "function bodies for stock onnxruntime; other layers as for ort")
    lowering: ClassVar[tuple[str, ...]] = ("lower-packed", *OrtTarget.lowering)

    def __init__(self) -> None:
        super().__init__()
        schemes = frozenset({"int", *LOWBIT_SCHEMES})
        for op, cap in list(self.ops.items()):
            self.ops[op] = OpCapability(cap.weight_dtypes, cap.activation_dtypes, cap.granularities,
                                        schemes if op in PACKED_OPS else frozenset({"int"}))

    def capabilities(self) -> dict[str, Any]:
        caps = super().capabilities()
        caps["custom_ops"] = {
            "domain": DOMAIN,
            "version": DOMAIN_VERSION,
            "min_opset": MIN_OPSET,
            "ops": {op: {"scheme": scheme, "replaces": float_op, "bits_per_weight": FIELD_BITS[scheme],
                         "inputs": list(INPUTS[float_op])} for op, (scheme, float_op) in sorted(OPS.items())},
        }
        return caps

    def check_node(self, np_: NodePlan) -> None:
        w = np_.weight
        if w is not None and w.scheme in LOWBIT_SCHEMES and np_.op_type not in PACKED_OPS:
            raise self._refuse(np_, f"weight scheme '{w.scheme}' has no packed op for {np_.op_type} (packed ops "
                                    f"exist for {', '.join(PACKED_OPS)}); keep it int or use --target ort")
        if w is not None and w.scheme in LOWBIT_SCHEMES and w.axis is not None:
            raise self._refuse(np_, "packed ops scale the output channels; a weight 'axis' override is not "
                                    "supported")
        super().check_node(np_)

    def output_tensors(self, ctx: CompileContext) -> dict[str, QuantSpec]:
        """As for ``ort``, but never the output of a low-bit layer (a packed op is no QLinearConv)."""
        assert ctx.resolved is not None
        out = super().output_tensors(ctx)
        lowbit = {n.node for n in ctx.resolved.nodes.values()
                  if n.weight is not None and n.weight.scheme in LOWBIT_SCHEMES}
        if not lowbit:
            return out
        by_name = {n.name: n for n in ctx.graph.nodes}
        skip: set[str] = set()
        for name in lowbit:
            node = by_name.get(name)
            t: Any = node.outputs[0] if node is not None and node.outputs else None
            while t is not None:
                skip.add(t.name)
                t = t.outputs[0].outputs[0] if len(t.outputs) == 1 and t.outputs[0].op in ("Relu", "Clip") \
                    and t.outputs[0].outputs else None
        return {k: v for k, v in out.items() if k not in skip}
