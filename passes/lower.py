"""lower: run the current target's lowering passes (see ``runtime_targets/<target>/``).

Target-independent passes only emit standard ONNX; anything target-specific (onnxruntime contrib ops,
custom-domain ops) is introduced here, by the target's own passes.
"""

from __future__ import annotations

from collections import Counter

from qcompiler.core.context import CompileContext
from qcompiler.core.pass_base import Pass, PassResult


class LowerPass(Pass):
    """Run the target's lowering passes (ort: MatMulNBits, DynamicQuantizeMatMul; ort-qop: its integer ops; ...)."""

    name = "lower"
    requires = frozenset({"qdq"})
    produces = frozenset({"lowered"})

    def run(self, ctx: CompileContext) -> PassResult:
        stats: Counter[str] = Counter()
        modified = False
        for p in ctx.target.lowering_passes():
            r = p.run(ctx)
            modified |= r.modified
            for k, v in r.stats.items():
                stats[f"{p.name}.{k}"] += v
        return PassResult(modified=modified, stats=stats)
