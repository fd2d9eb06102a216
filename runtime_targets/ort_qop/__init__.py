"""Target ``ort-qop``: onnxruntime's own integer operators (its "QOperator" format) written into the file.

The graph is planned, calibrated and quantized exactly as for ``ort`` (same plan defaults, same QDQ placement,
same int32 biases); its lowering (``lower-qoperator``) then does ahead of time what onnxruntime's CPU provider
does when it loads a QDQ model: each quantized Conv becomes ``QLinearConv``, a MatMul ``QLinearMatMul`` (int8
output) or ``com.microsoft.MatMulIntegerToFloat`` (float output), a Gemm ``com.microsoft.QGemm``. The
weight DequantizeLinear nodes, the bias scales and the QuantizeLinear → DequantizeLinear pairs between two
integer ops disappear from the file; QuantizeLinear / DequantizeLinear stay only where float ops meet integer
ones.

Use it for an onnxruntime build or execution provider that runs the integer operators but does not fuse QDQ
(or to see exactly which kernels run), and where a smaller graph matters: fewer nodes, fewer tensors. Numerics
are those of the ``ort`` target under onnxruntime's optimizations, code for code.

Capabilities are the integer kernels': int8 / uint8 weights (per tensor or per output channel, one zero point
per weight) and int8 / uint8 activations per tensor on Conv, MatMul, Gemm; int4 / uint4 block-wise weight-only
MatMul as ``com.microsoft.MatMulNBits`` (as for ``ort``); LSTM / GRU / RNN weight-only int8 (dequantized when
the session loads). A group the kernels cannot take (a Conv whose output no QuantizeLinear reads alone, a ReLU
that the output quantization does not make redundant, ConvTranspose) stays standard QDQ, which onnxruntime
runs as before; the pass's statistics count each by reason. As on ``ort``, a constant Add after a float-kernel
Conv goes into its float bias where the plan turned fold-bias off (``ort-float-bias``, before the integer ops are
written: PP-OCRv4 rec under ``w8a8`` 16.5 → 15.2 ms, the same output).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from qcompiler.runtime_targets import OpCapability, layer_capabilities
from qcompiler.runtime_targets.ort import OrtTarget

if TYPE_CHECKING:
    from qcompiler.plan import NodePlan

_INT8 = frozenset({"int8", "uint8"})
_INT8_INT4 = frozenset({"int8", "uint8", "int4", "uint4"})
_PT_PC = frozenset({"per_tensor", "per_channel"})


class OrtQOperatorTarget(OrtTarget):
    #: no ``scale: float16`` (its lowering reads constant float32 scales)
    weight_scales: ClassVar[frozenset[str]] = frozenset({"float", "pow2"})
    name: ClassVar[str] = "ort-qop"
    description: ClassVar[str] = ("onnxruntime integer ops in the file (QOperator format): QLinearConv, QLinearMatMul, "
                                  "MatMulIntegerToFloat, QGemm; MatMulNBits for int4")
    lowering: ClassVar[tuple[str, ...]] = ("lower-matmulnbits", "ort-dynamic-matmul", "ort-float-bias",
                                          "lower-qoperator", "ort-load-time-dequant")

    def __init__(self) -> None:
        super().__init__()
        self.ops = layer_capabilities(_INT8, _INT8, _PT_PC)
        self.ops["MatMul"] = OpCapability(_INT8_INT4, _INT8, frozenset({*_PT_PC, "block"}))  # + MatMulNBits
        self.other_activation_dtypes = _INT8

    def check_node(self, np_: NodePlan) -> None:
        w = np_.weight
        if w is not None and w.dtype in ("int4", "uint4") and np_.activation is not None:
            raise self._refuse(np_, f"{w.dtype} weights run only weight-only (MatMulNBits, float activations) on "
                                    "this target; no integer kernel takes them with quantized activations")
        if w is not None and w.granularity == "block" and w.dtype not in ("int4", "uint4"):
            raise self._refuse(np_, "block-wise scales are supported for int4 / uint4 weight-only MatMul only")
        super().check_node(np_)

