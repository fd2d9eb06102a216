"""Target ``ort``: onnxruntime (CPU provider), the default.

Standard ONNX QuantizeLinear/DequantizeLinear only, placed the way onnxruntime's CPU provider fuses them into
integer kernels:

* ``DQ(x) , DQ(w) [, DQ(b)] -> Conv -> [Relu] -> Q``   becomes ``QLinearConv`` (so the output of a quantized
  Conv / ConvTranspose — after a ReLU/Clip that follows it alone — is quantized too; onnxruntime drops the
  ReLU when the zero point sits at the bottom of the range);
* ``DQ(x), DQ(w) -> MatMul``                          becomes ``MatMulIntegerToFloat`` (float output, no Q);
* ``DQ(x), DQ(w), DQ(b) -> Gemm``                     becomes ``QGemm``;
* int4 block-wise weight-only MatMul is lowered to ``com.microsoft.MatMulNBits`` (see ``matmulnbits.py``);
* depthwise convolutions keep float activations unless a plan rule sets them (``OrtTarget.refine``);
* with the plan option ``targets: {ort: {requantize_conv_outputs: false}}`` a Conv / ConvTranspose runs as
  QLinearConv only where a quantized op reads its output anyway; one whose output only float ops read (a
  hard-swish, a residual Add, a graph output) keeps float activations instead of having its output rounded to
  8 bits for the integer kernel (``OrtTarget.refine``; the ``w8a8`` preset sets it);
* a constant Add after a float-kernel Conv / ConvTranspose (its data input not dequantized) goes into its float
  bias where the plan turned ``fold-bias`` off (``float_bias.py``);
* the weights of float kernels (weight-only Conv / ConvTranspose / Gemm, LSTM / GRU / RNN) are dequantized with
  Cast/Mul, which onnxruntime folds when the session loads, instead of a DequantizeLinear it would run at
  every inference (``load_time_dequant.py``);
* MatMul / Gemm activations with ``calibration: dynamic`` (``DynamicQuantizeLinear -> DequantizeLinear``) and their
  int8 weight (and bias) become ``com.microsoft.DynamicQuantizeMatMul``, onnxruntime's dynamic quantization kernel
  (``dynamic_matmul.py``: onnxruntime would fuse a plain MatMul itself, but turns a 2-D MatMul + bias Add into a
  float Gemm first, and fuses no Gemm);
* MatMul inputs with ``granularity: per_token`` (run-time scales per row, standard ONNX ops) and an int8 weight
  become ``MatMulInteger`` on the codes, scaled per row and per column (``per_token_matmul.py``);
* quantized Gather tables (embeddings) are dequantized at session load (float-speed lookups), or with the plan
  option ``targets: {ort: {gather_block_quantized: true}}`` become ``com.microsoft.GatherBlockQuantized``
  (``gather_block_quantized.py``);
* fp8 activations after a ReLU/Clip get that activation re-applied after their DequantizeLinear
  (``fp8_guard.py``: onnxruntime's Relu->Q fusion is wrong for fp8).

fp8 (opset 19) and int4/int16 (opset 21) Q/DQ run in onnxruntime CPU as reference kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from qcompiler.runtime_targets import Target, layer_capabilities

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from qcompiler.core.context import CompileContext
    from qcompiler.plan import NodePlan, QuantSpec, ResolvedPlan

_INT_W = frozenset({"int8", "uint8", "int16", "uint16", "int4", "uint4", "fp8e4m3", "fp8e5m2"})
_INT_A = frozenset({"int8", "uint8", "int16", "uint16", "fp8e4m3", "fp8e5m2"})
_ALL_G = frozenset({"per_tensor", "per_channel", "block"})
#: int plus the low-bit weight schemes (qcompiler.quant.schemes: codes + DequantizeLinear); binary is also an
#: activation scheme (Where(x >= 0, beta, -beta))
_SCHEMES = frozenset({"int", "binary", "ternary", "shift"})

#: ops after a Conv that onnxruntime folds into QLinearConv when a Q follows them
_FUSABLE_ACTIVATIONS = ("Relu", "Clip")


class OrtTarget(Target):
    name: ClassVar[str] = "ort"
    validation_optimization: ClassVar[str] = "all"
    description: ClassVar[str] = "onnxruntime CPU: standard QDQ placed for its integer kernels; MatMulNBits for int4"
    #: a MatMul / Gemm reading DynamicQuantizeLinear -> DequantizeLinear is written as onnxruntime's
    #: DynamicQuantizeMatMul (``ort-dynamic-matmul``); a Conv would only run in float on the dequantized values
    dynamic_activation_ops: ClassVar[frozenset[str]] = frozenset({"MatMul", "Gemm"})
    lowering: ClassVar[tuple[str, ...]] = ("lower-matmulnbits", "ort-dynamic-matmul", "ort-per-token-matmul",
                                          "ort-fp8-relu-guard",
                                          "ort-gather-block-quantized", "ort-float-bias", "ort-load-time-dequant")
    #: ``scale: float16`` weights: a float16 scale initializer and ``Cast(to float)`` before the DequantizeLinear
    #: (onnxruntime folds the Cast at load, so its QDQ fusions see a constant float32 scale)
    weight_scales: ClassVar[frozenset[str]] = frozenset({"float", "pow2", "float16"})
    options: ClassVar[dict[str, tuple[Any, str]]] = {
        "requantize_conv_outputs": (True, "quantize a Conv's output for QLinearConv even where only float ops read "
                                          "it (false: such a Conv keeps float activations)"),
        "gather_block_quantized": (False, "quantized Gather tables as com.microsoft.GatherBlockQuantized (table "
                                          "quantized in memory; slower lookups) instead of dequantized at load"),
    }

    def __init__(self) -> None:
        # recurrent ops: weight-only (their weights dequantized at load for the float kernel)
        super().__init__(ops=layer_capabilities(_INT_W, _INT_A, _ALL_G, _SCHEMES), other_activation_dtypes=_INT_A)

    @staticmethod
    def _qlinear_convs(resolved: ResolvedPlan, graph: gs.Graph) -> list[tuple[NodePlan, Any]]:
        """(node plan, the tensor its QLinearConv would output) of every Conv / ConvTranspose planned with int8
        weights and activations: its output after a ReLU / Clip that follows it alone."""
        out: list[tuple[NodePlan, Any]] = []
        graph_outputs = {t.name for t in graph.outputs}
        by_name = {n.name: n for n in graph.nodes}
        for np_ in resolved.nodes.values():
            if np_.op_type not in ("Conv", "ConvTranspose") or np_.weight is None or np_.activation is None:
                continue
            if np_.activation.dtype not in ("uint8", "int8") or np_.weight.dtype not in ("int8", "uint8"):
                continue
            if np_.activation.scheme != "int" or np_.weight.scheme == "shift":
                continue  # no QLinearConv for binary activations or int16/int32 shift codes
            node = by_name.get(np_.node)
            if node is None or not node.outputs:
                continue
            t: Any = node.outputs[0]
            while len(t.outputs) == 1 and t.outputs[0].op in _FUSABLE_ACTIVATIONS and t.name not in graph_outputs:
                t = t.outputs[0].outputs[0]
            out.append((np_, t))
        return out

    def output_tensors(self, ctx: CompileContext) -> dict[str, QuantSpec]:
        """Quantize the output of each quantized Conv/ConvTranspose (after a lone ReLU/Clip) for QLinearConv."""
        assert ctx.resolved is not None
        out: dict[str, QuantSpec] = {}
        graph_outputs = {t.name for t in ctx.graph.outputs}
        for np_, t in self._qlinear_convs(ctx.resolved, ctx.graph):
            if t.name in graph_outputs or not t.outputs:
                continue
            assert np_.activation is not None
            out.setdefault(t.name, np_.activation)
        return out

    def refine(self, resolved: ResolvedPlan, graph: gs.Graph) -> int:
        """Depthwise convolutions (``group`` = input channels > 1) keep float activations — their int weights are
        dequantized once at load (``ort-load-time-dequant``) — unless a plan rule sets their ``activation``:
        onnxruntime's CPU int8 depthwise kernel (QLinearConv) is slower than its float one (NCHWc) and brings a
        quantize / dequantize pair around each such conv (PP-OCR cls: 1.39x -> 0.95x the float model's latency,
        output SQNR 35 -> 42 dB; benchmarks/RESULTS.md)."""
        by_name = {n.name: n for n in graph.nodes}
        changed = 0
        for np_ in resolved.nodes.values():
            if np_.op_type != "Conv" or np_.activation is None or np_.weight is None or np_.activation_ruled:
                continue
            node = by_name.get(np_.node)
            if node is None or len(node.inputs) < 2 or int(node.attrs.get("group", 1)) <= 1:
                continue
            shape: tuple[int, ...] = tuple(getattr(getattr(node.inputs[1], "values", None), "shape", ()))
            if len(shape) < 3 or shape[1] != 1:
                continue
            np_.activation, np_.activation_inputs = None, ()
            np_.reason = ("activation float: target ort computes depthwise Conv in float (faster than its int8 "
                          "kernel); weight int codes dequantized at load")
            changed += 1
        if not resolved.target_options.get("requantize_conv_outputs", True):
            changed += self._float_unread_convs(resolved, graph)
        return changed

    def _float_unread_convs(self, resolved: ResolvedPlan, graph: gs.Graph) -> int:
        """``requantize_conv_outputs: false``: a Conv whose QLinearConv output no op of the plan reads as a
        quantized activation keeps float activations (its output would otherwise be rounded to 8 bits for the
        kernel alone, an error the plan never asked for). Decided once, on the plan as its rules and the
        target's depthwise default left it: a Conv kept in int8 because the next Conv reads its output quantized
        stays so even when that next Conv goes float here (no cascade: on a plain Conv→ReLU→Conv chain that
        feeds a float op, a cascade would turn the whole chain float, the speed of int8 with it)."""
        by_name = {n.name: n for n in graph.nodes}
        read: set[str] = set()  # tensors some quantized node reads as a quantized activation
        for np_ in resolved.nodes.values():
            if np_.activation is not None:
                read.update(by_name[np_.node].inputs[i].name for i in np_.activation_inputs)
        changed = 0
        for np_, t in self._qlinear_convs(resolved, graph):
            if np_.activation_ruled or t.name in read:  # a rule that set the activation is obeyed
                continue
            np_.activation, np_.activation_inputs = None, ()
            np_.reason = ("activation float: only float ops read this Conv's output (targets.ort."
                          "requantize_conv_outputs: false); weight int codes dequantized at load")
            changed += 1
        return changed

