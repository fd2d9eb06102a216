"""Resolving a plan on a graph: for every node, what is quantized and which rule said so.

:func:`resolve` starts each node from the plan's ``defaults``, applies every matching rule (op_type rules first,
then name_regex rules, then exact-name rules, each in file order, each overriding only the keys it sets) and
records the outcome as a :class:`NodePlan`; the :class:`ResolvedPlan` holds them all (``qcompiler plan
resolve`` prints it). Only the compute ops with a constant weight (:data:`~qcompiler.plan.spec.WEIGHT_OPS`) and
the recurrent ops are quantized by default, and the constant table of a Gather (an embedding, weight-only) from
:data:`~qcompiler.plan.spec.TABLE_MIN_BYTES` up; other ops when a rule names them.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_graphsurgeon as gs
import yaml

from qcompiler.core.errors import UserError
from qcompiler.ir.graph import infer_dtype
from qcompiler.plan.presets import is_preset
from qcompiler.plan.spec import (
    PLAN_VERSION,
    RECURRENT_OPS,
    TABLE_MIN_BYTES,
    TABLE_OPS,
    WEIGHT_OPS,
    QuantSpec,
    activation_spec,
    make_spec,
)

if TYPE_CHECKING:
    from qcompiler.plan.schema import Plan

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ resolved plan
@dataclass
class NodePlan:
    """The decision for one node."""

    node: str
    op_type: str
    weight: QuantSpec | None  # None: weight stays float (or the op has none)
    activation: QuantSpec | None  # None: activations stay float
    rules: list[str] = field(default_factory=list)  # descriptions of matching rules, in application order
    weight_inputs: tuple[int, ...] = ()  # indices of the constant weight inputs
    activation_inputs: tuple[int, ...] = ()  # indices of activation inputs to quantize
    reason: str = ""
    #: a matching rule set ``activation:`` (a target's own defaults, e.g. ``ort`` keeping depthwise convs'
    #: activations float, give way to it)
    activation_ruled: bool = False

    @property
    def quantized(self) -> bool:
        return self.weight is not None or self.activation is not None

    @property
    def weight_input(self) -> int | None:
        return self.weight_inputs[0] if self.weight_inputs else None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"node": self.node, "op_type": self.op_type,
                             "rule": self.rules[-1] if self.rules else "defaults"}
        if len(self.rules) > 1:
            d["matched"] = list(self.rules)
        if self.weight is not None:
            d["weight"] = self.weight.to_dict()
        if self.activation is not None:
            d["activation"] = self.activation.to_dict()
        if not self.quantized:
            d["float"] = self.reason or "kept float"
        elif self.reason:
            d["note"] = self.reason
        return d


@dataclass
class ResolvedPlan:
    nodes: dict[str, NodePlan]
    unmatched_rules: list[str] = field(default_factory=list)
    source: str = ""
    #: the options of the plan's ``targets:`` section for the target in use (set by ``resolve-plan``)
    target_options: dict[str, Any] = field(default_factory=dict)

    def quantized(self) -> list[NodePlan]:
        return [n for n in self.nodes.values() if n.quantized]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "plan": self.source,
            "summary": {"nodes": len(self.nodes), "quantized": len(self.quantized()),
                        "unmatched_rules": list(self.unmatched_rules)},
            **({"target_options": dict(self.target_options)} if self.target_options else {}),
            "nodes": [n.to_dict() for n in self.nodes.values()],
        }

    def to_yaml(self) -> str:
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml: ~10x faster on big graphs
        return yaml.dump(self.to_dict(), Dumper=dumper, sort_keys=False, width=120)


def _is_const(t: Any) -> bool:
    return isinstance(t, gs.Constant)


#: the float types a tensor is quantized from: float32 (an fp16 model's tensors are float32 by the time the plan
#: is resolved; kept for a graph that was not converted). Not float64: QuantizeLinear takes no double input, and a
#: dequantized weight is float32 where a double MatMul needs double (ONNX's double FlexAttention test broke)
QUANTIZABLE_FLOATS = (np.dtype(np.float32), np.dtype(np.float16))


def _float_tensor(t: Any) -> bool:
    if isinstance(t, gs.Constant):
        return t.values.dtype in QUANTIZABLE_FLOATS
    dt = infer_dtype(t)  # its own, else through the producers that keep their input's type
    if dt is None:
        return True  # unknown: assume float activations (shape inference may not have run)
    return dt in QUANTIZABLE_FLOATS


def _table(node: gs.Node) -> bool:
    """A Gather along axis 0 of a constant 2-D float table (an embedding lookup)."""
    if node.op not in TABLE_OPS or len(node.inputs) < 2 or int(node.attrs.get("axis", 0)) != 0:
        return False
    t = node.inputs[0]
    return _is_const(t) and _float_tensor(t) and t.values.ndim == 2


def weight_input_index(node: gs.Node) -> int | None:
    """Index of the constant weight input of a weight op (0: the table of a Gather), or None."""
    if _table(node):
        return 0
    if node.op in WEIGHT_OPS + RECURRENT_OPS and len(node.inputs) >= 2:
        w = node.inputs[1]
        if _is_const(w) and _float_tensor(w) and w.values.ndim >= 2:
            return 1
    return None


def weight_input_indices(node: gs.Node) -> tuple[int, ...]:
    """All constant weight inputs: (1,) for Conv/Gemm/MatMul; W and R (1, 2) for LSTM/GRU/RNN."""
    first = weight_input_index(node)
    if first is None:
        return ()
    if node.op in RECURRENT_OPS:
        return tuple(i for i in (1, 2) if i < len(node.inputs) and _is_const(node.inputs[i])
                     and _float_tensor(node.inputs[i]))
    return (first,)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    out.update(over)
    # switching to a scheme / dtype that doesn't use a knob from the defaults is fine: knobs are ignored
    return out


def _check_axis(spec: QuantSpec, node: gs.Node, inputs: tuple[int, ...], where: str) -> None:
    """A per-channel / block ``axis`` must be an axis of every weight it applies to (``-rank <= axis < rank``)."""
    if spec.axis is None or spec.granularity not in ("per_channel", "block"):
        return
    for i in inputs:
        w = node.inputs[i]
        rank = len(w.shape)
        if not -rank <= spec.axis < rank:
            raise UserError(f"{where}: axis {spec.axis} is outside weight '{w.name}' of node '{node.name}' "
                            f"({node.op}, rank {rank}: axis must be in [{-rank}, {rank - 1}])")


#: ops a rule may name whose every float input is quantized (others: the first, or two for MatMul-like)
_ACT_OPS_ALL_INPUTS = {"Add", "Mul", "Sub", "Div", "Concat", "MatMul", "Gemm", "Sum", "Max", "Min"}


def resolve(plan: Plan, graph: gs.Graph, *, warn: bool = True) -> ResolvedPlan:
    """Decide, for every node, what gets quantized and which rule said so."""
    ordered = sorted(plan.rules, key=lambda r: (r.precedence, r.index))
    used: set[int] = set()
    nodes: dict[str, NodePlan] = {}
    for node in graph.nodes:
        matching = [r for r in ordered if r.matches(node)]
        for r in matching:
            used.add(r.index)
        w = dict(plan.weight_defaults)
        a = dict(plan.activation_defaults)
        skip = False
        for r in matching:
            w = _merge(w, r.weight)
            a = _merge(a, r.activation)
            if r.skip is not None:
                skip = r.skip
        where = matching[-1].describe() if matching else f"{plan.source}: defaults"
        wi = weight_input_index(node)
        np_ = NodePlan(node=node.name, op_type=node.op, weight=None, activation=None,
                       rules=[r.describe() for r in matching], weight_inputs=weight_input_indices(node),
                       activation_ruled=any(r.activation for r in matching))
        named = bool(matching)
        if skip:
            np_.reason = "skip: true"
        elif (wi is not None and node.op in TABLE_OPS and not any(r.weight for r in matching)
              and node.inputs[wi].values.nbytes < TABLE_MIN_BYTES):
            np_.weight_inputs = ()
            np_.reason = f"table under {TABLE_MIN_BYTES // 1024} KiB (float unless a rule sets its weight)"
        elif wi is not None:
            wspec = make_spec(w, f"{where}.weight")
            aspec = activation_spec(a, f"{where}.activation")
            np_.weight = None if wspec.is_float else wspec
            if np_.weight is not None:
                _check_axis(np_.weight, node, np_.weight_inputs,
                            f"{where}.weight" if where.startswith(plan.source) else f"{plan.source}: {where}.weight")
            act_idx = tuple(i for i, t in enumerate(node.inputs[:1]) if not _is_const(t) and _float_tensor(t))
            if node.op in RECURRENT_OPS and not any(r.activation for r in matching):
                act_idx = ()  # weight-only unless a rule asks for the activation
            if not aspec.is_float and act_idx:
                np_.activation = aspec
                np_.activation_inputs = act_idx
        elif node.op in WEIGHT_OPS and node.op in ("MatMul", "Gemm") and not named:
            np_.reason = "activation x activation (float unless a rule names it)"
        elif node.op in WEIGHT_OPS and not named:
            np_.reason = "weight is not a constant"
        elif named and any(r.activation or r.skip is False or r.weight for r in matching):
            aspec = activation_spec(a, f"{where}.activation")
            act_idx = tuple(i for i, t in enumerate(node.inputs)
                            if t is not None and not _is_const(t) and bool(getattr(t, "name", "")) and _float_tensor(t))
            if node.op in ("MatMul", "Gemm", "Conv", "ConvTranspose"):
                act_idx = act_idx[:2]
            elif node.op not in _ACT_OPS_ALL_INPUTS:
                act_idx = act_idx[:1]
            if not aspec.is_float and act_idx:
                np_.activation = aspec
                np_.activation_inputs = act_idx
            else:
                np_.reason = "no float activation input"
        else:
            np_.reason = "not a weight op (float unless a rule names it)"
        nodes[node.name] = np_
    unmatched = [r.describe() for r in plan.rules if r.index not in used]
    # A shipped preset is written for many models (w4a16's embedding-table rule, say): a rule of it that finds
    # nothing in this one is expected, so it is logged, not warned about; the resolved plan lists it either way.
    quiet = is_preset(plan.source)
    for d in unmatched if warn else ():
        (log.info if quiet else log.warning)("%s: %s matches no node", plan.source, d)
    return ResolvedPlan(nodes=nodes, unmatched_rules=unmatched, source=plan.source)

