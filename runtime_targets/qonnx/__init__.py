"""Target ``qonnx``: export to the QONNX dialect (FINN, hls4ml, Brevitas' exchange format).

QONNX marks quantization with custom ops of the domain ``qonnx.custom_op.general`` that read float tensors and
return float tensors (fake quantization with explicit bit widths)::

    Quant(x, scale, zeropt, bitwidth; signed, narrow, rounding_mode)
        y = (clip(round(x / scale + zeropt), lo, hi) − zeropt) · scale
        lo, hi = −2^(b−1) + narrow, 2^(b−1) − 1         (signed)
                 0, 2^b − 1 − narrow                    (unsigned)
    BipolarQuant(x, scale)       y = (x >= 0 ? +1 : −1) · scale

The lowering (``lower-qonnx-quant``, see ``quant_ops.py``) rewrites the generic QDQ graph:

* every ``QuantizeLinear -> DequantizeLinear`` pair on an activation becomes one ``Quant`` (bit width and
  signedness from the zero point's type, ``narrow=0``: QuantizeLinear's full range);
* every ``DequantizeLinear`` of constant integer codes (weights, int32 biases) becomes the dequantized float
  weight followed by ``Quant`` with the tightest bit width holding the codes (ternary codes {−1, 0, +1} →
  2 bits narrow; int8 symmetric → 8 bits narrow; shift codes ±2^p → the width of the largest), or by
  ``BipolarQuant`` when every code is ±1 (binary weights); per-channel scales become broadcastable tensors
  (``[C, 1, 1, 1]`` for a Conv weight);
* a binary activation (``activation: {scheme: binary}``: ``Where(x >= 0, β, −β)`` in the generic graph)
  becomes ``BipolarQuant(x, β)``.

The result equals the QDQ graph it came from: weights re-quantize to their own codes exactly, activations go
through the same round-half-to-even and clip. ``Trunc`` is not emitted (nothing in a QDQ graph truncates an
already quantized accumulator), nor ``FloatQuant`` (fp8 plans are refused).

Each op also gets a model-local ONNX function body (standard ops only), so stock onnxruntime runs the exported
model — the compile's validation step included. FINN / hls4ml / qonnx's executor use their own
implementation of the op and ignore the body; the ``strip_function_bodies`` compile option leaves them out.
"""

from __future__ import annotations

from typing import ClassVar

from qcompiler.runtime_targets import Target, layer_capabilities

DOMAIN = "qonnx.custom_op.general"

_INT = frozenset({"int8", "uint8", "int16", "uint16", "int4", "uint4"})
_GRAN = frozenset({"per_tensor", "per_channel"})
_SCHEMES = frozenset({"int", "binary", "ternary", "shift"})


class QonnxTarget(Target):
    name: ClassVar[str] = "qonnx"
    description: ClassVar[str] = ("QONNX dialect (Quant / BipolarQuant, domain qonnx.custom_op.general) for "
                                  "FINN and hls4ml; integer and binary/ternary/shift weights, binary activations; "
                                  "with ONNX function bodies so onnxruntime runs it too")
    lowering: ClassVar[tuple[str, ...]] = ("lower-qonnx-quant",)

    def __init__(self) -> None:
        # recurrent ops: weight-only (Quant on W and R feeding the float kernel)
        super().__init__(ops=layer_capabilities(_INT, _INT, _GRAN, _SCHEMES), other_activation_dtypes=_INT)

