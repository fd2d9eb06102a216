"""01 — Compile a model with the Python API and look at what onnxruntime runs.

Compiles ``models/conv_bn_relu.onnx`` (Conv-BN-ReLU stack, a residual Add, a depthwise conv and a Gemm head)
with the default target (``ort``) and the plain default plan (``plan="default"``: int8 per-channel weights, uint8
per-tensor activations; with no plan the measured default would choose among a few candidate recipes),
calibrated on the fixture's 32 samples. Prints what each pass did, the parameter bytes before
and after, the validation against the float model, and the ops onnxruntime actually runs after its graph
optimizations (``QLinearConv`` / ``QGemm``: the integer kernels).

The same from the command line::

    qcompiler compile models/conv_bn_relu.onnx -o out/conv_bn_relu.int8.onnx --plan default --calib models/conv_bn_relu.npz

Run::

    python docs/examples/01_compile_a_fixture.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model

MODELS = Path(__file__).resolve().parents[2] / "models"


def main(out_dir: Path) -> dict[str, Any]:
    out = out_dir / "conv_bn_relu.int8.onnx"
    result = compile_model(MODELS / "conv_bn_relu.onnx", out,
                           CompileOptions(plan="default", calib=str(MODELS / "conv_bn_relu.npz")))

    print(f"pipeline: {result.pipeline}")
    for r in result.records:
        stats = ", ".join(f"{k}={v}" for k, v in sorted(r.stats.items()) if v)
        print(f"  {r.name:15s} {'modified ' if r.modified else 'unchanged'} {r.seconds * 1e3:7.1f} ms  {stats}")

    sizes = result.report["sizes"]
    print(f"parameter bytes: {sizes['float_parameter_bytes']} -> {sizes['quantized_parameter_bytes']} "
          f"({sizes['ratio']:.3f}x)")

    print(result.validation.table(max_layers=3))

    ops = ir.optimized_op_types(out)  # the graph onnxruntime runs after its own fusions
    print("onnxruntime runs:", ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())))
    return {"sqnr_db": result.validation.worst_output_sqnr(), "ratio": sizes["ratio"], "ops": ops,
            "files": [str(f) for f in result.files]}


if __name__ == "__main__":
    summary = main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="qcompiler-ex01-")))
