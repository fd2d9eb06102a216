"""Cost model of an ONNX model: bytes per layer and in total, BitOps per layer, peak activation memory.

What ``qcompiler inspect --cost MODEL`` prints, the compile summary and the JSON report carry, and the
mixed-precision planner (:mod:`qcompiler.autoplan`) budgets with.

**Bytes.** Every tensor stored in the model (initializers and ``Constant`` node values) counts with its bytes
*as stored*: ``ceil(elements × bits / 8)`` with the element type's storage width — 4 bits for int4 / uint4
(packed two per byte, as ONNX stores them), the item size otherwise. Each stored tensor is attributed to the
op that consumes it, following ``DequantizeLinear`` / ``QuantizeLinear`` chains and the ``ort`` target's load-time
dequantization ``Mul(Cast(codes) [− z], s)`` (the int8 codes, scale and zero point of a quantized weight belong
to the Conv reading the dequantized weight; an activation's scale and zero
point to the op reading the dequantized activation); a tensor read by several ops goes to the first one in
topological order. The model total is the **measured** size of what is stored: the ``.onnx`` file plus its
external data files (for a model in memory: its serialized size), i.e. tensor bytes plus the protobuf graph
structure (``overhead_bytes`` = total − tensor bytes).

**MACs and BitOps.** Shapes are those of the model at batch 1 (dynamic dimensions resolved from
``feed_shapes``, else 1): from ONNX shape inference when it sizes every tensor (helped by ``known_shapes``,
tensors measured at the same input shapes — a compile passes those of its first calibration sample), else
from one onnxruntime run of the model with every intermediate tensor exposed (when that run fails the graph
is re-run with dynamic spatial / sequence dims of 32, and as a last resort partial ONNX shape inference is used).
MACs per op: Conv ``|Y| · C_in/g · Πk``; ConvTranspose ``|X| · C_out/g · Πk``; Gemm / MatMul ``|Y| · K``;
MatMulNBits ``|Y| · K``; LSTM / GRU / RNN ``dirs · T · B · G·H · (I + H)`` (G = 4 / 3 / 1 gates).
``BitOps = MACs × weight bits × activation bits``. A weight's bits are read from the graph: a float constant
is 32 (fp16: 16); a DequantizeLinear's codes give their integer width (QDTYPES), except codes that only take
the values {−1, +1} (binary: 1 bit), {−1, 0, +1} (ternary: 2 bits) or nonzero powers of two ±2^j (shift:
1 + ceil(log2 #exponents) bits); an activation's bits are the QuantizeLinear output width feeding its
DequantizeLinear, else its float width. Plans give the same numbers up front: :func:`spec_bits`.

**Peak activation memory** (batch 1): liveness over the topological order — a tensor is live from the step
that produces it (graph inputs: from the start) to its last reader (graph outputs: to the end); the peak is
the largest sum of live tensors at any step (inputs and outputs of the running op both count). Weights are
not activations. Quantized graphs are counted as an integer runtime executes them: a tensor read only by
QuantizeLinear is stored at the quantized width, and a DequantizeLinear of an activation is an alias of its
quantized input (no float copy).
"""

from qcompiler.report.cost.analysis import MAC_OPS, PASS_THROUGH
from qcompiler.report.cost.bits import FLOAT_BITS, code_bits, dtype_bits, spec_bits, stored_bytes
from qcompiler.report.cost.measure import compile_cost, model_cost
from qcompiler.report.cost.shapes import parse_shapes
from qcompiler.report.cost.table import CostReport, LayerCost, format_bytes, format_count

__all__ = ["FLOAT_BITS", "MAC_OPS", "PASS_THROUGH", "CostReport", "LayerCost", "code_bits", "compile_cost",
           "dtype_bits", "format_bytes", "format_count", "model_cost", "parse_shapes", "spec_bits", "stored_bytes"]
