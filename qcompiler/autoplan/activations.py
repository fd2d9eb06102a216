"""Activation precision the byte budget does not charge: 16-bit activations where the layer runs float anyway.

With ``int4`` (or lower-bit, or block-wise) weights onnxruntime has no integer kernel: such a layer runs as
``DequantizeLinear`` + the float op, and the 8-bit ``QuantizeLinear`` / ``DequantizeLinear`` pair on its input
only adds rounding error — it buys no integer arithmetic. :func:`wide_activations` lists the activation tensors
whose every quantized reader is such a layer (read 8-bit per tensor with a calibrated range, not a tensor the
target requantizes for an integer kernel, not produced by a layer with 8-bit weights), and :func:`widened` is
the plan with one rule per reader setting its activation to 16 bits (``uint8`` → ``uint16``, ``int8`` →
``int16``; opset 21's 16-bit ``QuantizeLinear``). The bytes grow by one zero-point byte per tensor; latency
does not change in kind (the same Q / DQ pair, the same float op), though 16-bit Q / DQ measured slower (docs). :func:`~qcompiler.autoplan.baseline.auto_plan`
compiles the widened plan for real, measures it on the held-back samples and keeps it only when it beats the
plan it started from by the guard's rule (:meth:`~qcompiler.autoplan.baseline.Measured.beats`) and fits the
budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qcompiler.autoplan.plans import _flow
from qcompiler.core.registry import get_target
from qcompiler.plan import Plan
from qcompiler.session import run_prefix

#: activation dtype -> its 16-bit version
WIDER = {"uint8": "uint16", "int8": "int16"}
#: weight dtypes with an integer kernel in onnxruntime (a layer with these keeps its 8-bit activations)
INTEGER_KERNEL_WEIGHTS = ("int8", "uint8")


@dataclass
class Widening:
    """The activation tensors widened to 16 bits and the rules doing it (one per reader node, graph order)."""

    tensors: list[str]
    rules: list[dict[str, object]]

    def __bool__(self) -> bool:
        return bool(self.rules)


def wide_activations(model_path: str | Path, plan: Plan, target: str = "ort") -> Widening:
    """The tensors of ``plan`` whose 8-bit activation quantization buys no integer kernel (module docstring)."""
    ctx = run_prefix(Path(model_path), plan, get_target(target))
    assert ctx.resolved is not None
    resolved = ctx.resolved.nodes
    by_name = {n.name: n for n in ctx.graph.nodes}
    readers: dict[str, list[str]] = {}
    for np_ in resolved.values():
        node = by_name.get(np_.node)
        if node is None or np_.activation is None:
            continue
        for i in np_.activation_inputs:
            if i < len(node.inputs):
                readers.setdefault(node.inputs[i].name, []).append(np_.node)

    def float_runner(name: str) -> bool:
        np_ = resolved.get(name)
        return (np_ is not None and np_.weight is not None and bool(np_.weight_inputs)
                and not (np_.weight.scheme == "int" and np_.weight.dtype in INTEGER_KERNEL_WEIGHTS))

    def eight_bit_weights(name: str) -> bool:
        np_ = resolved.get(name)
        return np_ is not None and np_.weight is not None and not float_runner(name)

    tensors: list[str] = []
    nodes: list[str] = []
    order = {n.name: k for k, n in enumerate(ctx.graph.nodes)}
    tmap = ctx.graph.tensors()
    for tname in sorted(ctx.activation_specs, key=lambda t: (min(order.get(r, 1 << 30) for r in readers.get(t, [t])),
                                                              t)):
        spec = ctx.activation_specs[tname]
        if (spec.dtype not in WIDER or spec.scheme != "int" or spec.granularity != "per_tensor"
                or spec.calibration == "dynamic" or tname in ctx.activation_all_consumers):
            continue
        who = readers.get(tname, [])
        if not who or not all(float_runner(r) for r in who):
            continue
        t = tmap.get(tname)
        producers = [p.name for p in getattr(t, "inputs", [])]
        if any(eight_bit_weights(p) for p in producers):
            continue
        if any(resolved[r].activation != spec for r in who):
            continue  # readers disagree already: left as they are
        tensors.append(tname)
        nodes += [r for r in who if r not in nodes]
    wide = {r: WIDER[ctx.activation_specs[t].dtype] for t in tensors for r in readers[t]}
    rules: list[dict[str, object]] = [{"match": {"name": r}, "activation": {"dtype": wide[r]}}
                                      for r in sorted(nodes, key=lambda n: order.get(n, 1 << 30))]
    return Widening(tensors, rules)


def widened(plan: Plan, widening: Widening, label: str) -> Plan:
    """``plan`` with the widening's rules after its own (a name rule setting only ``activation:``: the layer's
    weight rule still applies)."""
    d = plan.to_dict()
    d["rules"] = [*(d.get("rules") or []), *widening.rules]
    return Plan.from_dict(d, source=label)


def widened_text(text: str, widening: Widening, comment: str) -> str:
    """A plan file's text (its rules last, as :func:`~qcompiler.autoplan.plans.plan_yaml` writes them) with the
    widening's rules appended under a comment."""
    lines = text.rstrip("\n").splitlines()
    lines = ["rules:" if line == "rules: []" else line for line in lines]
    lines.append(f"  # {comment}")
    lines += [f"  - {_flow(r)}" for r in widening.rules]
    return "\n".join(lines) + "\n"
