r"""03 — A precision plan with rules: preview which rule wins per node, then compare it with the default.

The plan below makes every MatMul weight-only int4 (block 32; the ``ort`` target lowers those to
``com.microsoft.MatMulNBits``), keeps the attention output projection W8A8 (a ``name_regex`` rule beats an
``op_type`` rule), and keeps the last MLP projection float (an exact ``name`` rule beats both).

Anchor regexes: a rule also applies to the non-weight nodes it names. ``'^attn\.out\.'`` would match the bias
``Add`` after the projection too and quantize that Add's inputs (onnxruntime then runs ``QLinearMatMul`` with
a requantized output instead of ``MatMulIntegerToFloat``).

The preview is what ``qcompiler plan resolve MODEL PLAN`` prints; the compile writes the same resolution
beside the output as ``<OUT>.plan.yaml``.

Run::

    python docs/examples/03_plan_rules.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import onnx

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.core.context import CompileContext
from qcompiler.core.pass_manager import PassManager
from qcompiler.core.registry import build_pipeline
from qcompiler.plan import Plan
from qcompiler.runtime_targets import get_target

MODELS = Path(__file__).resolve().parents[2] / "models"

PLAN = r"""
version: 1
defaults:
  weight: {dtype: int8, granularity: per_channel, symmetric: true}
  activation: {dtype: uint8, granularity: per_tensor, symmetric: false, calibration: minmax}
rules:
  - match: {op_type: MatMul}                 # weight-only int4, block-wise along K
    weight: {dtype: int4, granularity: block, block_size: 32}
    activation: {dtype: float}
  - match: {name_regex: '^attn\.out\.matmul$'}  # ... but the attention output projection stays W8A8
    weight: {dtype: int8, granularity: per_channel}
    activation: {dtype: uint8}
  - match: {name: mlp.fc2.matmul}            # ... and the last projection stays float
    skip: true
"""


def preview(model: Path, plan: Plan) -> dict[str, str]:
    """node -> the rule that decided it, after cleanup and BatchNorm folding (what ``plan resolve`` shows)."""
    graph, meta = ir.import_graph(onnx.load(str(model)))
    ctx = CompileContext(graph=graph, meta=meta, plan=plan, target=get_target("ort"))
    PassManager(build_pipeline("cleanup,fold-batchnorm,cleanup,resolve-plan")).run(ctx)
    assert ctx.resolved is not None
    return {n.node: n.rules[-1] if n.rules else "defaults" for n in ctx.resolved.nodes.values()
            if n.op_type == "MatMul"}


def main(out_dir: Path) -> dict[str, Any]:
    model, calib = MODELS / "transformer_block.onnx", str(MODELS / "transformer_block.npz")
    plan_file = out_dir / "mixed.plan.yaml"
    plan_file.write_text(PLAN, encoding="utf-8")
    decided = preview(model, Plan.from_file(plan_file))
    for node, rule in decided.items():
        print(f"  {node:18s} {rule}")

    rows = {}
    for label, plan in (("default", None), ("mixed", str(plan_file))):
        res = compile_model(model, out_dir / f"transformer_block.{label}.onnx", CompileOptions(plan=plan, calib=calib))
        ops = ir.optimized_op_types(res.output)
        rows[label] = {"sqnr_db": res.validation.worst_output_sqnr(), "ratio": res.report["sizes"]["ratio"],
                       "MatMulNBits": ops.get("MatMulNBits", 0),
                       "MatMulIntegerToFloat": ops.get("MatMulIntegerToFloat", 0)}
    print(f"{'plan':8s} {'SQNR dB':>8s} {'bytes':>6s} {'MatMulNBits':>12s} {'MatMulIntegerToFloat':>21s}")
    for label, r in rows.items():
        print(f"{label:8s} {r['sqnr_db']:8.2f} {r['ratio']:6.3f} {r['MatMulNBits']:12d} {r['MatMulIntegerToFloat']:21d}")
    return {"rules": decided, **rows}


if __name__ == "__main__":
    summary = main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="qcompiler-ex03-")))
