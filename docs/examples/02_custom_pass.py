"""02 — A custom *analysis* pass: predict the weight quantization error of every planned node.

``WeightSqnrPass`` (pipeline name ``weight-sqnr``) runs after ``resolve-plan``: for every node the plan
quantizes it rounds the float weight exactly as ``insert-qdq`` will (``qcompiler.quant.quantize_weight`` with
the node's resolved spec and per-channel / block axis) and reports the weight SQNR in dB, worst first, in the
compile report (``report["weight_sqnr"]``). It changes nothing (``modified=False``), so it can sit anywhere
between ``resolve-plan`` and ``insert-qdq``.

It is loaded the way users load plugins — ``plugins=["docs/examples/02_custom_pass.py:WeightSqnrPass"]``,
``--plugin`` on the command line — and named in the pipeline text with an option::

    qcompiler compile models/transformer_block.onnx -o q.onnx --calib models/transformer_block.npz \\
        --plugin docs/examples/02_custom_pass.py:WeightSqnrPass \\
        --pipeline "cleanup,fold-batchnorm,cleanup,resolve-plan,weight-sqnr{top=3},calibrate,insert-qdq,lower"

Run::

    python docs/examples/02_custom_pass.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler import quant
from qcompiler.api import CompileOptions, compile_model
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.pass_base import Pass, PassResult
from qcompiler.ir.axes import block_axis, per_channel_axis

MODELS = Path(__file__).resolve().parents[2] / "models"


@dataclass
class Options:
    top: int = 5  # how many of the worst nodes to log

    def validate(self, pass_name: str) -> None:  # called after the pipeline text is parsed
        if self.top < 1:
            raise UserError(f"pass '{pass_name}' option 'top': must be >= 1, got {self.top}")


class WeightSqnrPass(Pass):
    """Report the weight quantization SQNR (dB) of every node the plan quantizes (an analysis)."""

    name = "weight-sqnr"
    Options = Options
    requires = frozenset({"plan-resolved"})

    def run(self, ctx: CompileContext) -> PassResult:
        assert ctx.resolved is not None
        nodes = {n.name: n for n in ctx.graph.nodes}
        rows = []
        for plan in ctx.resolved.quantized():
            node, spec = nodes[plan.node], plan.weight
            if spec is None or plan.weight_input is None or not isinstance(node.inputs[1], gs.Constant):
                continue
            w = np.asarray(node.inputs[plan.weight_input].values, dtype=np.float32)
            axis = block = None
            if spec.granularity == "per_channel":
                axis = per_channel_axis(node, w.ndim) if spec.axis is None else spec.axis
            elif spec.granularity == "block":
                axis, block = (block_axis(node, w.ndim) if spec.axis is None else spec.axis), spec.block_size
            qt = quant.quantize_weight(w, spec.dtype, spec.symmetric, axis, block, spec.range)
            rows.append((plan.node, spec.dtype, round(quant.sqnr_db(w, qt.dequantize()), 3)))
        rows.sort(key=lambda r: r[2])
        ctx.report["weight_sqnr"] = [{"node": n, "dtype": d, "sqnr_db": s} for n, d, s in rows]
        for n, d, s in rows[: self.options.top]:
            print(f"  weight SQNR {s:7.2f} dB  {d:6s} {n}")  # an example script; library passes log instead
        return PassResult(modified=False, stats=Counter(nodes_measured=len(rows)))


def main(out_dir: Path) -> dict[str, Any]:
    pipeline = "cleanup,fold-batchnorm,cleanup,resolve-plan,weight-sqnr{top=3},calibrate,insert-qdq,lower"
    result = compile_model(MODELS / "transformer_block.onnx", out_dir / "transformer_block.int8.onnx",
                           CompileOptions(calib=str(MODELS / "transformer_block.npz"), pipeline=pipeline,
                                          plugins=[f"{Path(__file__).resolve()}:WeightSqnrPass"]))
    print(f"pipeline: {result.pipeline}")
    print(f"output SQNR: {result.validation.worst_output_sqnr():.2f} dB")
    return {"weight_sqnr": result.report["weight_sqnr"], "output": str(result.output),
            "sqnr_db": result.validation.worst_output_sqnr()}


if __name__ == "__main__":
    summary = main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="qcompiler-ex02-")))
