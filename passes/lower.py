"""lower: run the current target's lowering passes (see ``runtime_targets/<target>/``).

Target-independent passes only emit standard ONNX; anything target-specific (onnxruntime contrib ops,
custom-domain ops) is introduced here, by the target's own passes. ``lower`` is a
:class:`~qcompiler.core.pass_base.Sequential` whose children the target chooses
(:meth:`Target.lowering_passes`): the pass manager times, verifies and dumps each of them like any pass, and
reports them as one ``lower`` record with statistics ``"<child>.<stat>"``.
"""

from __future__ import annotations

from qcompiler.core.context import CompileContext
from qcompiler.core.pass_base import Pass, Sequential


class LowerPass(Sequential):
    """Run the target's lowering passes (ort: MatMulNBits, DynamicQuantizeMatMul; ort-qop: its integer ops; ...)."""

    name = "lower"
    requires = frozenset({"qdq"})
    produces = frozenset({"lowered"})

    def children(self, ctx: CompileContext) -> list[Pass]:
        return ctx.target.lowering_passes()
