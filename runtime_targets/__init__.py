"""Runtime targets: what a runtime can execute, how the generic QDQ graph is lowered for it.

A target (one folder per target, e.g. ``runtime_targets/ort/``) declares

* its capabilities — the weight / activation dtypes, granularities and schemes it runs, per op;
* :meth:`Target.check`: refuse a resolved plan it cannot run *before any rewrite*, naming node and reason;
* :meth:`Target.output_tensors`: extra activation tensors to quantize so its integer kernels fuse
  (e.g. the output of a Conv, after its ReLU, for onnxruntime's QLinearConv);
* :meth:`Target.refine`: its own defaults for nodes no plan rule decided (``ort``: depthwise convolutions
  keep float activations, their int weights dequantized at load);
* ``options``: the options a plan may set for it (``targets: {ort: {requantize_conv_outputs: false}}``),
  checked by :meth:`Target.check_options` when the plan is resolved;
* ``lowering``: the names of its lowering passes (registered passes, each in a module of the target's
  folder), which :meth:`Target.lowering_passes` instantiates for the generic ``lower`` pass to run;
* ``default_pipeline``: the pipeline ``qcompiler compile`` runs when none is given.

Third-party targets register through the entry-point group ``qcompiler.targets``.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar

from qcompiler.core.config import TARGET_MESSAGES, check_settings, settings_of_table
from qcompiler.core.errors import UserError
from qcompiler.core.registry import registry
from qcompiler.plan import RECURRENT_OPS, TABLE_OPS, WEIGHT_OPS

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from qcompiler.core.context import CompileContext
    from qcompiler.core.pass_base import Pass
    from qcompiler.plan import NodePlan, QuantSpec, ResolvedPlan

log = logging.getLogger(__name__)

DEFAULT_PIPELINE = "cleanup,fold-batchnorm,fold-scale,fold-bias,fuse-activations,cleanup,resolve-plan,calibrate,insert-qdq,lower"


@dataclass(frozen=True)
class OpCapability:
    """What a target runs for one op."""

    weight_dtypes: frozenset[str] = frozenset()
    activation_dtypes: frozenset[str] = frozenset()
    granularities: frozenset[str] = frozenset({"per_tensor", "per_channel"})
    schemes: frozenset[str] = frozenset({"int"})

    def to_json(self) -> dict[str, Any]:
        return {"weight_dtypes": sorted(self.weight_dtypes), "activation_dtypes": sorted(self.activation_dtypes),
                "granularities": sorted(self.granularities), "schemes": sorted(self.schemes)}


#: what an embedding table may be quantized to: integer codes, one scale per row or per block of a row
_TABLE_DTYPES = frozenset({"int8", "uint8", "int4", "uint4"})
_TABLE_GRANULARITIES = frozenset({"per_tensor", "per_channel", "block"})


def layer_capabilities(weights: frozenset[str], activations: frozenset[str], granularities: frozenset[str],
                       schemes: frozenset[str] = frozenset({"int"})) -> dict[str, OpCapability]:
    """The capability table of a target that runs the plan's weight ops (Conv, ConvTranspose, Gemm, MatMul) with
    these weight / activation dtypes, granularities and weight schemes, and the recurrent ops (LSTM, GRU, RNN)
    weight-only (dequantized weights feeding the float kernel; ``int`` scheme)."""
    table = {op: OpCapability(weights, activations, granularities, schemes) for op in WEIGHT_OPS}
    table.update({op: OpCapability(weights, frozenset(), granularities) for op in RECURRENT_OPS})
    # embedding tables: weight-only (DequantizeLinear -> Gather, or the target's own lookup kernel)
    table.update({op: OpCapability(weights & _TABLE_DTYPES, frozenset(), granularities & _TABLE_GRANULARITIES)
                  for op in TABLE_OPS})
    return table


def _misfused_block_matmul(op_type: str, w: QuantSpec, a: QuantSpec) -> bool:
    """A MatMul with 8-bit block-wise integer weights and an 8-bit integer activation quantized per tensor
    (calibrated or at run time): onnxruntime's CPU provider fuses its DequantizeLinear pair into
    ``MatMulIntegerToFloat`` without looking at the weight's ``block_size`` and the kernel fails on the block
    scales (onnxruntime 1.32; every target here is validated in it). Per-token activations are lowered to
    ``MatMulInteger`` with their own scaling, 4 / 16-bit weights are not fused, Gemm and Conv are not affected."""
    return (op_type == "MatMul" and w.scheme == "int" and w.granularity == "block" and w.dtype in ("int8", "uint8")
            and a.scheme == "int" and a.dtype in ("int8", "uint8") and a.granularity == "per_tensor")


@dataclass
class Target:
    """Base class of runtime targets."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    default_pipeline: ClassVar[str] = DEFAULT_PIPELINE
    #: onnxruntime optimization level for validating this target's output: "all" for onnxruntime itself;
    #: "basic" (no fusions, a semantic reference) for graphs meant for another runtime
    validation_optimization: ClassVar[str] = "basic"
    ops: dict[str, OpCapability] = field(default_factory=dict)
    #: activation dtypes allowed on ops not listed in ``ops`` (quantized because a rule named them)
    other_activation_dtypes: frozenset[str] = frozenset()
    #: options a plan's ``targets: {<name>: {...}}`` section may set: option -> (default, one-line doc); the
    #: value must have the default's type
    options: ClassVar[dict[str, tuple[Any, str]]] = {}
    #: ops whose activations this target runs quantized at run time (``calibration: dynamic``)
    dynamic_activation_ops: ClassVar[frozenset[str]] = frozenset()
    #: names of the registered passes ``lower`` runs for this target, in order
    lowering: ClassVar[tuple[str, ...]] = ()
    #: the weight ``scale:`` values this target runs (``float16``: float16 scale initializers cast to float in the
    #: graph before DequantizeLinear — only targets whose lowering reads such a scale)
    weight_scales: ClassVar[frozenset[str]] = frozenset({"float", "pow2"})

    def check_options(self, plan_options: dict[str, dict[str, Any]], source: str) -> dict[str, Any]:
        """This target's options from a plan's ``targets:`` section, defaults filled in. Raises
        :class:`UserError` naming the plan for an unknown target name, or an unknown option / wrong type in this
        target's own section (other targets' sections are theirs to check)."""
        known = targets()
        for name in plan_options:
            if name not in known:
                raise UserError(f"{source}: targets.{name}: unknown target (known: {', '.join(sorted(known))})")
        checked = check_settings(plan_options.get(self.name, {}), settings_of_table(self.options),
                                 f"{source}: targets.{self.name}", TARGET_MESSAGES)
        return {**{k: d for k, (d, _) in self.options.items()}, **checked}

    # ------------------------------------------------------------------------------------ capabilities
    def capabilities(self) -> dict[str, Any]:
        return {"ops": {k: v.to_json() for k, v in sorted(self.ops.items())},
                "other_ops_activation_dtypes": sorted(self.other_activation_dtypes),
                "dynamic_activation_ops": sorted(self.dynamic_activation_ops)}

    def _refuse(self, np_: NodePlan, reason: str) -> UserError:
        rule = np_.rules[-1] if np_.rules else "plan defaults"
        return UserError(f"target '{self.name}': node '{np_.node}' ({np_.op_type}, {rule}): {reason}")

    def check_node(self, np_: NodePlan) -> None:
        cap = self.ops.get(np_.op_type)
        w, a = np_.weight, np_.activation
        if w is not None:
            if cap is None:
                raise self._refuse(np_, f"weights of {np_.op_type} cannot be quantized on this target")
            if w.scheme not in cap.schemes:
                raise self._refuse(np_, f"weight scheme '{w.scheme}' is not supported "
                                        f"(supported: {', '.join(sorted(cap.schemes))})")
            if w.scheme == "int" and w.dtype not in cap.weight_dtypes:
                raise self._refuse(np_, f"weight dtype {w.dtype} is not supported "
                                        f"(supported: {', '.join(sorted(cap.weight_dtypes))})")
            if w.granularity not in cap.granularities:
                raise self._refuse(np_, f"weight granularity {w.granularity} is not supported for {np_.op_type}")
            if w.scale not in self.weight_scales:
                runs = sorted(n for n, t in targets().items() if w.scale in t.weight_scales)
                raise self._refuse(np_, f"weight scale {w.scale} is not supported on this target"
                                        + (f" (targets running it: {', '.join(runs)})" if runs else ""))
        if w is not None and a is not None and _misfused_block_matmul(np_.op_type, w, a):
            raise self._refuse(np_, f"{w.dtype} block-wise weights next to an activation quantized per tensor "
                                    "(8-bit): onnxruntime fuses the pair into MatMulIntegerToFloat, which takes one "
                                    "weight scale per tensor or per column, and fails when the model runs; use "
                                    "granularity per_channel, per_token activations, or a float activation "
                                    "(weight-only)")
        if a is not None:
            allowed = cap.activation_dtypes if cap is not None else self.other_activation_dtypes
            if a.scheme not in ("int", *(cap.schemes if cap else ())):
                raise self._refuse(np_, f"activation scheme '{a.scheme}' is not supported")
            if a.scheme == "int" and a.dtype not in allowed:
                raise self._refuse(np_, f"activation dtype {a.dtype} is not supported "
                                        f"(supported: {', '.join(sorted(allowed)) or 'none'})")
            if a.granularity == "per_token" and np_.op_type not in self.dynamic_activation_ops:
                raise self._refuse(np_, "activation granularity per_token (run-time scales per row) is not supported"
                                        + (f" (only for {', '.join(sorted(self.dynamic_activation_ops))})"
                                           if self.dynamic_activation_ops else ""))
            if a.granularity not in ("per_tensor", "per_token"):
                raise self._refuse(np_, f"activation granularity {a.granularity} is not supported "
                                        "(activations are quantized per tensor)")
            if a.calibration == "dynamic" and np_.op_type not in self.dynamic_activation_ops:
                if not self.dynamic_activation_ops:
                    raise self._refuse(np_, "this target does not run activations quantized at run time "
                                            "(calibration dynamic); calibrate them (minmax, ...)")
                ops = ", ".join(sorted(self.dynamic_activation_ops))
                raise self._refuse(np_, f"activations quantized at run time (calibration dynamic) run on this "
                                        f"target for {ops} only; calibrate this one (minmax, ...) or keep it float")

    def check(self, resolved: ResolvedPlan) -> None:
        """Raise :class:`UserError` for the first node this target cannot run as planned. A Gather table the
        plan's defaults (no rule) quantize stays float on a target without a table capability."""
        for np_ in resolved.nodes.values():
            if np_.op_type in TABLE_OPS and np_.weight is not None and not np_.rules and (
                    np_.op_type not in self.ops or np_.weight.dtype not in self.ops[np_.op_type].weight_dtypes):
                np_.weight, np_.weight_inputs = None, ()
                np_.reason = f"target '{self.name}' keeps Gather tables float"
                continue
            if np_.quantized:
                self.check_node(np_)

    def output_tensors(self, ctx: CompileContext) -> dict[str, QuantSpec]:
        """Extra activation tensors to quantize (default: none)."""
        return {}

    def refine(self, resolved: ResolvedPlan, graph: gs.Graph) -> int:
        """The target's own defaults, applied by ``resolve-plan`` after :meth:`check` to nodes no plan rule
        decided (e.g. ``ort`` computes depthwise convolutions in float); returns how many nodes changed.
        Default: none."""
        return 0

    def lowering_passes(self) -> list[Pass]:
        """Fresh instances of the :attr:`lowering` passes (the children of ``lower``)."""
        reg = registry()
        return [reg.get(name)() for name in self.lowering]

    def min_opset(self) -> int:
        return 13

    def describe_graph(self, graph: gs.Graph) -> dict[str, Any]:  # pragma: no cover - optional hook
        return {}


_TARGETS: dict[str, type[Target]] | None = None
#: the built-in targets, (module, class): found by name like plug-ins (each imports this module)
_BUILTIN = (("ort", "OrtTarget"), ("qonnx", "QonnxTarget"), ("tensorrt", "TensorRTTarget"),
            ("packed", "PackedTarget"), ("ort_qop", "OrtQOperatorTarget"))


def targets() -> dict[str, type[Target]]:
    """Built-in targets plus the entry-point group ``qcompiler.targets``."""
    global _TARGETS
    if _TARGETS is None:
        found: dict[str, type[Target]] = {}
        for module, cls_name in _BUILTIN:
            cls = getattr(importlib.import_module(f"{__name__}.{module}"), cls_name)
            found[cls.name] = cls
        for ep in entry_points(group="qcompiler.targets"):
            try:
                cls = ep.load()
            except Exception as e:
                log.warning("target entry point %s failed to load: %s", ep.value, e)
                continue
            found.setdefault(cls.name, cls)
        _TARGETS = found
    return _TARGETS


def get_target(name: str) -> Target:
    t = targets().get(name)
    if t is None:
        raise UserError(f"--target: unknown target '{name}' (known: {', '.join(sorted(targets()))})")
    return t()
