"""Plan text: the rule that gives a layer a candidate (:func:`layer_rules`) and the YAML of a whole plan
(:func:`plan_text`: header, base plan, one commented rule per layer), for the plan written, the probes and
the points of the Pareto front (:func:`text_for_choice`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from qcompiler import __version__
from qcompiler.autoplan.budget import Candidate, fmt_unit
from qcompiler.autoplan.prepare import Prepared, spec_dict
from qcompiler.autoplan.result import AutoPlanResult, PlanOptions
from qcompiler.autoplan.sensitivity import SensitivityResult
from qcompiler.plan import Plan, QuantSpec
from qcompiler.report import cost

#: :func:`_flow`'s texts by the ``repr`` of what was dumped (builtin scalars, strings, lists and dicts: equal
#: reprs, equal values in the same key order): the plans of one planner run repeat the same rules thousands of
#: times (every probe, search and verification writes one per layer)
_FLOWN: dict[str, str] = {}
_FLOWN_MAX = 1 << 14


def _flow(d: Any) -> str:
    key = repr(d)
    text = _FLOWN.get(key)
    if text is None:
        text = yaml.safe_dump(d, default_flow_style=True, width=100000, sort_keys=False).strip()
        if len(_FLOWN) >= _FLOWN_MAX:
            _FLOWN.clear()
        _FLOWN[key] = text
    return text


def _rule_keys(cand: Candidate, spec: QuantSpec | None, base_w: dict[str, Any]) -> dict[str, Any]:
    """The weight keys a layer's rule must set so that the plan resolves to ``spec``."""
    if spec is None:
        return {}
    d = spec_dict(spec)
    primary = set(cand.keys())
    return {k: v for k, v in d.items() if (k in primary and (k != "scheme" or v != "int" or base_w.get(k) != v))
            or base_w.get(k) != v}


def _fmt_value(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.3g}"


def layer_rules(prep: Prepared, candidates: Sequence[Candidate]) -> list[list[dict[str, Any] | None]]:
    """``rules[l][c]``: the plan rule giving layer l candidate c (``None`` where the target refuses it)."""
    out: list[list[dict[str, Any] | None]] = []
    for li, la in enumerate(prep.layers):
        row: list[dict[str, Any] | None] = []
        for cand in candidates:
            if cand.name not in la.allowed:
                row.append(None)
                continue
            rule: dict[str, Any] = {"match": {"name": la.name}}
            spec = prep.specs[li][cand.name]
            if cand.is_float or spec is None:
                rule["skip"] = True
            else:
                rule["weight"] = _rule_keys(cand, spec, la.base_weight) or {"dtype": spec.dtype}
            row.append(rule)
        out.append(row)
    return out


def plan_text(prep: Prepared, rules: list[dict[str, Any]], header: Sequence[str],
              comments: Sequence[str] | None = None) -> str:
    """YAML of a plan on top of ``prep``'s base plan (:func:`plan_yaml`)."""
    return plan_yaml(prep.base, rules, header, comments)


def plan_yaml(base_plan: Plan, rules: Sequence[dict[str, Any]], header: Sequence[str],
              comments: Sequence[str] | None = None) -> str:
    """YAML of a plan: header comments, the base plan's defaults / algorithms / target options / rules, then
    ``rules`` (one per layer, each after its comment line)."""
    base = base_plan.to_dict()
    # the planner measured its plan with the algorithms as written: a preset's guard (qcompiler.recipe) would
    # change them again when the plan is compiled
    algorithms = {k: v for k, v in (base.get("algorithms") or {}).items() if k != "guard"}
    base["algorithms"] = algorithms
    lines = [f"# {h}" if h else "#" for h in header]
    lines.append(f"version: {base['version']}")
    lines.append("defaults:")
    lines.append(f"  weight: {_flow(base['defaults']['weight'])}")
    lines.append(f"  activation: {_flow(base['defaults']['activation'])}")
    if base.get("algorithms"):
        lines.append(f"algorithms: {_flow(base['algorithms'])}")
    if base.get("targets"):
        lines.append(f"targets: {_flow(base['targets'])}")
    lines.append("rules:" if base["rules"] or rules else "rules: []")
    if base["rules"]:
        lines.append("  # rules of the base plan")
        for r in base["rules"]:
            lines.append(f"  - {_flow(r)}")
    for i, rule in enumerate(rules):
        if comments is not None:
            lines.append(f"  # {comments[i]}")
        lines.append(f"  - {_flow(rule)}")
    return "\n".join(lines) + "\n"


def rule_comments(prep: Prepared, names: Sequence[str], choice: Sequence[int], sens: SensitivityResult,
              table: dict[str, np.ndarray]) -> list[str]:
    out = []
    for li, la in enumerate(prep.layers):
        parts = []
        for cj, cname in enumerate(names):
            if cname not in la.allowed:
                continue
            b = table["bytes"][li, cj]
            parts.append(f"{'*' if cj == choice[li] else ''}{cname} s={_fmt_value(sens.values[li, cj])} "
                         f"{round(float(b)) if np.isfinite(b) else '?'}B")
        out.append(f"{la.name} ({la.op_type}, {la.params} params): " + ", ".join(parts))
    return out


def probe_text(prep: Prepared, rules: list[list[dict[str, Any] | None]], ci: int) -> str:
    """A probe plan: every layer at candidate ``ci`` where the target allows it, float elsewhere."""
    chosen = [row[ci] if row[ci] is not None else {"match": {"name": prep.layers[li].name}, "skip": True}
              for li, row in enumerate(rules)]
    return plan_text(prep, [r for r in chosen if r is not None], [])


def plan_header(src: Path, opts: PlanOptions, budget_value: float, unit: str, predicted: dict[str, Any],
            names: Sequence[str], choice: Sequence[int]) -> list[str]:
    counts = dict.fromkeys(names, 0)
    for ci in choice:
        counts[names[ci]] += 1
    sq = predicted.get("sqnr_db")
    return [
        f"Mixed-precision plan written by `qcompiler plan` (qcompiler {__version__}).",
        f"model: {src.name}   target: {opts.target}   metric: {opts.metric}   candidates: {', '.join(names)}",
        f"budget: {opts.budget.text} = {fmt_unit(budget_value, unit)}"
        + ("  (model file bytes, as `qcompiler inspect --cost` counts them)" if unit == "bytes" else ""),
        f"predicted (additive model, not measured): {round(predicted['bytes'])} bytes, "
        f"{cost.format_count(predicted['bitops'])} BitOps, {predicted['avg_bits']:.3f} avg weight bits"
        + (f", output SQNR {sq:.2f} dB" if sq is not None and math.isfinite(sq) else "")
        + (f" (pd, whole plan fake-quantized on other calibration samples: {predicted['joint_sqnr_db']:.2f} dB)"
           if predicted.get("joint_sqnr_db") is not None and math.isfinite(predicted["joint_sqnr_db"]) else ""),
        "layers: " + ", ".join(f"{n} x{c}" for n, c in counts.items() if c),
        "Each rule's comment: the layer's sensitivity s (predicted output distortion when only that layer is",
        "quantized: mean KL for probability outputs, relative MSE otherwise) and stored bytes B per candidate;",
        "* marks the choice. Edit freely; `qcompiler compile MODEL --plan THIS_FILE` compiles it.",
        "",
    ]


def text_for_choice(result: AutoPlanResult, choice: Sequence[int]) -> str:
    """The result's plan text with each layer's rule switched to ``choice`` (comments unchanged)."""
    text = result.search_text or result.text
    swap: dict[str, str] = {}
    for li, (old, new) in enumerate(zip(result.choice, choice)):
        a, b = result.rules[li][old], result.rules[li][new]
        if a is None or b is None:
            raise ValueError(f"layer {result.layers[li].name}: candidate not allowed")
        swap[f"  - {_flow(a)}"] = f"  - {_flow(b)}"
    return "\n".join(swap.get(line, line) for line in text.splitlines()) + "\n"
