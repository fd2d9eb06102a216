"""The algorithm guard's ablations of a plan: what a preset's guard (``algorithms: {guard: measure}``,
:mod:`qcompiler.recipe`) measures, and the planner's preset variants (:mod:`qcompiler.autoplan`) — one rule for
both.

:func:`guarded_algorithms` names each algorithm a plan turns on (``plan.algorithms``: ``gptq``, ``bias_correct``,
``smooth``, ``equalize``, ``fold_bias``, …), ``percentile`` when its default activations use percentile clipping
and ``per_token`` when a rule's activations use per-token run-time scales; :func:`without` is the plan with some
of them off (``percentile`` → ``minmax`` ranges, ``per_token`` → one scale per tensor, ``fold_bias`` said
``false``: the default pipeline runs it) and the guard option removed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from qcompiler.plan.schema import Plan

__all__ = ["guarded_algorithms", "unguarded", "without"]


def guarded_algorithms(plan: Plan) -> list[str]:
    """What the algorithm guard measures in ``plan``: each algorithm it turns on, ``percentile`` clipping when
    its default activations use it, and ``per_token`` run-time scales when a rule's activations use them."""
    names = sorted(plan.algorithms)
    act = plan.activation_defaults
    if act.get("calibration") == "percentile" and act.get("dtype") != "float":
        names.append("percentile")
    if any(_per_token(r.get("activation")) for r in plan.to_dict().get("rules") or []):
        names.append("per_token")
    return names


def without(plan: Plan, names: Sequence[str], label: str) -> Plan:
    """``plan`` with the guarded algorithms ``names`` off and no guard (``label``: the new plan's source)."""
    d = copy.deepcopy(plan.to_dict())
    algos = dict(d.get("algorithms") or {})
    algos.pop("guard", None)
    for n in names:
        if n == "percentile":
            act = dict(d["defaults"]["activation"])
            act["calibration"] = "minmax"
            act.pop("percentile", None)
            d["defaults"]["activation"] = act
        elif n == "per_token":
            d["rules"] = [{**r, "activation": {**r["activation"], "granularity": "per_tensor"}}
                          if _per_token(r.get("activation")) else r for r in d.get("rules") or []]
        elif n == "fold_bias":
            algos[n] = False  # the default pipeline runs fold-bias: off must be said
        else:
            algos.pop(n, None)
    if algos:
        d["algorithms"] = algos
    else:
        d.pop("algorithms", None)
    return Plan.from_dict(d, source=label)


def unguarded(plan: Plan) -> Plan:
    """``plan`` as written, the guard option removed (what the guard measures as 'with')."""
    return without(plan, [], "as written")


def _per_token(act: Any) -> bool:
    return isinstance(act, dict) and act.get("granularity") == "per_token"
