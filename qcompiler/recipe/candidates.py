"""The candidate plans the measured default tries, and the ablations of the algorithm guard.

Every candidate is an ordinary :class:`~qcompiler.plan.Plan` built from a plan dictionary (``Plan.to_dict``), so
the winner written with ``--recipe-out`` is a plan file like any other. Order matters: ``--effort`` keeps the
first candidates of :func:`recipe_candidates` (the plain default plan always first; :func:`effort_cap`). The order
is what measured best on the model zoo (benchmarks/RESULTS.md, "Measured default"): the w8a8 preset as written
(PP-OCR cls / rec), calibration auto (silero-vad), dynamic MatMul / Gemm inputs (transformers) — the candidates of
``--effort low``, the default — then GPTQ, SmoothQuant, bias correction (PP-OCR det's winner was range-auto +
GPTQ + bias correction), percentile ranges. The candidates that keep activations float where the default plan
runs integer kernels (weights only, after the low ones; w8a8-dynamic, last) are offered only when the user asks
for a latency / size constraint or ``--effort high`` (``float_activations``): by accuracy alone they would win
almost everywhere by giving up the integer kernels.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from qcompiler.plan import Plan, ablations, load_plan

#: candidates per effort, the combination slot included: low, normal, high (None: all). Low: the plain default
#: plan, w8a8, range-auto (and dynamic-matmul on a model with MatMul / Gemm: :func:`effort_cap`) + combination
EFFORT_CANDIDATES = {"low": 4, "normal": 8, "high": None}
MATMUL_OPS = ("MatMul", "Gemm")
#: SmoothQuant as the measured default tries it: alpha per smoothed tensor from a grid, by measured error
SMOOTH_AUTO = {"alpha": "auto"}


def effort_cap(effort: str, has_matmul: bool, float_activations: bool = False) -> int | None:
    """How many candidates ``effort`` measures, the combination slot included (None: all): at low, one more for
    dynamic-matmul on a model with MatMul / Gemm and one more for weights-only when it is offered."""
    cap = EFFORT_CANDIDATES[effort]
    if effort != "low" or cap is None:
        return cap
    return cap + int(has_matmul) + int(float_activations)


@dataclass
class Candidate:
    """One recipe to measure: a name for the tables, what it changes, and its plan."""

    name: str
    change: str
    plan: Plan
    #: it changes which tensors are quantized (the graph's kernels), not only values
    structural: bool = False
    #: it keeps activations float where the default plan quantizes them (gives up integer kernels): offered only
    #: with a latency / size constraint or --effort high
    float_activations: bool = False


def plan_from(d: dict[str, Any], name: str) -> Plan:
    return Plan.from_dict(copy.deepcopy(d), source=f"<recipe {name}>")


def _with_algorithm(d: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(d)
    algos = dict(out.get("algorithms") or {})
    algos[name] = value
    out["algorithms"] = algos
    return out


def _with_activation(d: dict[str, Any], **keys: Any) -> dict[str, Any]:
    out = copy.deepcopy(d)
    act = dict(out["defaults"]["activation"])
    act.update(keys)
    if act.get("calibration") != "percentile":
        act.pop("percentile", None)
    out["defaults"]["activation"] = act
    return out


def _with_dynamic_matmul(d: dict[str, Any], granularity: str = "per_tensor") -> dict[str, Any]:
    out = copy.deepcopy(d)
    out["rules"] = [*out.get("rules", []),
                    {"match": {"op_type": list(MATMUL_OPS)},
                     "activation": {"dtype": "uint8", "granularity": granularity, "symmetric": False,
                                    "calibration": "dynamic"}}]
    return out


def recipe_candidates(base: Plan, op_types: set[str], *, float_activations: bool = False) -> list[Candidate]:
    """The single-change candidates, most promising first (see the module doc). ``op_types``: the model's ops;
    ``float_activations``: also those that keep activations float (weights only, after the candidates of
    ``--effort low``; w8a8-dynamic, last)."""
    d = base.to_dict()
    has_matmul = bool(op_types & set(MATMUL_OPS))
    shipped = load_plan("w8a8")
    shipped.guard = "off"
    out = [Candidate("default", "the plain default plan (baseline)", plan_from(d, "default")),
           Candidate("w8a8", "the w8a8 preset as written (percentile ranges, int8 GPTQ, float-read Conv outputs "
                             "not requantized)", shipped, True),
           Candidate("range-auto", "activation ranges: calibration auto (minmax / percentile / entropy / mse)",
                     plan_from(_with_activation(d, calibration="auto"), "range-auto"))]
    if has_matmul:
        out.append(Candidate("dynamic-matmul", "MatMul / Gemm inputs quantized at run time (w8a8-dynamic style)",
                             plan_from(_with_dynamic_matmul(d), "dynamic-matmul"), True))
    if float_activations:
        out.append(Candidate("weights-only", "activations float, int8 weights (no activation rounding, no integer "
                                             "kernels)", plan_from(_with_activation(d, dtype="float"),
                                                                   "weights-only"), True, True))
    out.append(Candidate("gptq", "GPTQ chooses the int8 weight codes", plan_from(
        _with_algorithm(d, "gptq", {"max_bits": 8}), "gptq")))
    if has_matmul:
        out.append(Candidate("smooth", "SmoothQuant, its alpha chosen per tensor by measurement",
                             plan_from(_with_algorithm(d, "smooth", SMOOTH_AUTO), "smooth")))
        out.append(Candidate("per-token-matmul", "MatMul / Gemm inputs quantized at run time, one scale per row "
                                                 "(token)", plan_from(_with_dynamic_matmul(d, "per_token"),
                                                                      "per-token-matmul"), True))
    out.append(Candidate("bias-correct", "bias correction on", plan_from(
        _with_algorithm(d, "bias_correct", True), "bias-correct")))
    out.append(Candidate("percentile", "activation ranges: 99.99th percentile", plan_from(
        _with_activation(d, calibration="percentile", percentile=99.99), "percentile")))
    if float_activations and has_matmul:
        out.append(Candidate("w8a8-dynamic", "the w8a8-dynamic preset (only MatMul / Gemm inputs quantized, at "
                                             "run time)", plan_from(_dynamic_only(d), "w8a8-dynamic"), True, True))
    return out


def _dynamic_only(d: dict[str, Any]) -> dict[str, Any]:
    return _with_dynamic_matmul(_with_activation(d, dtype="float", granularity="per_tensor"))


def combined(base: Plan, winners: list[Candidate]) -> Candidate | None:
    """The default plan with every single change that measured better than the default at once (range method
    and algorithm toggles; the activation-kind changes — dynamic, weights-only — are alternatives, not added)."""
    d = base.to_dict()
    names = []
    for c in winners:
        if c.name == "range-auto":
            d = _with_activation(d, calibration="auto")
        elif c.name == "percentile" and "range-auto" not in names:
            d = _with_activation(d, calibration="percentile", percentile=99.99)
        elif c.name in ("gptq", "bias-correct", "smooth"):
            key = c.name.replace("-", "_")
            d = _with_algorithm(d, key, {"max_bits": 8} if key == "gptq" else SMOOTH_AUTO if key == "smooth" else True)
        else:
            continue
        names.append(c.name)
    if len(names) < 2:
        return None
    name = "+".join(names)
    return Candidate(name, "the better single changes together", plan_from(d, name))


def keep_float(best: Candidate, nodes: list[str]) -> Candidate:
    """``best`` with ``nodes`` (the most sensitive quantized layers) kept float."""
    d = best.plan.to_dict()
    d["rules"] = [*d.get("rules", []), *({"match": {"name": n}, "skip": True} for n in nodes)]
    name = f"{best.name}+float{len(nodes)}"
    return Candidate(name, f"{best.name} with its {len(nodes)} most sensitive layer(s) float: {', '.join(nodes)}",
                     plan_from(d, name), True)


# ----------------------------------------------------------------------------------------------- the guard
def without(plan: Plan, names: list[str], label: str) -> Plan:
    """``plan`` with the guarded algorithms ``names`` off and no guard (:func:`qcompiler.plan.ablations.without`),
    its source named as the recipe's plans are."""
    return ablations.without(plan, names, f"<recipe {label}>")


def dynamic_upgrades(plan: Plan) -> list[Candidate]:
    """What the guard also measures in a plan of the w8a8-dynamic kind (activations float by default, MatMul /
    Gemm inputs quantized at run time with one scale per tensor, no SmoothQuant): the same plan with one scale
    per row (token), and that with SmoothQuant (alpha by measurement). Empty for any other plan."""
    d = plan.to_dict()
    rules = d.get("rules") or []
    dynamic = [r for r in rules if isinstance(r.get("activation"), dict)
               and r["activation"].get("calibration") == "dynamic"
               and r["activation"].get("granularity", "per_tensor") == "per_tensor"]
    if plan.activation_defaults.get("dtype") != "float" or not dynamic or "smooth" in plan.algorithms:
        return []
    d.setdefault("algorithms", {}).pop("guard", None)
    d["rules"] = [{**r, "activation": {**r["activation"], "granularity": "per_token"}} if r in dynamic else r
                  for r in rules]
    if not d["algorithms"]:
        d.pop("algorithms")
    per_token = Candidate("with-per_token", "MatMul / Gemm inputs: one run-time scale per row (token)",
                          plan_from(d, f"{plan.source} + per_token"), True)
    both = Candidate("with-per_token+smooth", "per-token scales and SmoothQuant (alpha by measurement)",
                     plan_from(_with_algorithm(d, "smooth", SMOOTH_AUTO), f"{plan.source} + per_token + smooth"),
                     True)
    return [per_token, both]


def unguarded(plan: Plan) -> Plan:
    """``plan`` as written, the guard option removed (what the guard measures as 'with')."""
    return without(plan, [], "as written")


def same_precision_as_default(plan: Plan) -> bool:
    """Whether ``plan`` quantizes like the default plan (8-bit integer weights, 8-bit integer activations), so that
    the plain default plan is a fair floor for it."""
    w, a = plan.weight_defaults, plan.activation_defaults
    return str(w.get("dtype")) in ("int8", "uint8") and str(a.get("dtype")) in ("int8", "uint8") and all(
        str({**w, **r.weight}.get("dtype")) in ("int8", "uint8") for r in plan.rules)
