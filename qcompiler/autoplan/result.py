"""What the auto planner works with and gives back: its options (:class:`PlanOptions`), the layers it decides
(:class:`LayerInfo`), the Pareto front's points (:class:`FrontPoint`) and the planned model
(:class:`AutoPlanResult`: plan, decisions, predicted and verified costs, budget check, report summary)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qcompiler.autoplan import knapsack
from qcompiler.autoplan.budget import DEFAULT_CANDIDATES, Budget, Candidate, fmt_unit, parse_candidates
from qcompiler.autoplan.sensitivity import SensitivityResult
from qcompiler.core.errors import UserError
from qcompiler.core.numbers import json_float
from qcompiler.plan import Plan, QuantSpec

Progress = Callable[[str, int, int], None]


@dataclass
class PlanOptions:
    budget: Budget
    candidates: list[Candidate] = field(default_factory=lambda: parse_candidates(DEFAULT_CANDIDATES))
    #: the candidates are the default list (not the user's): ones the target runs nowhere are left out, not refused
    default_candidates: bool = False
    metric: str = "pd"
    target: str = "ort"
    base_plan: str | Path | Plan | None = None
    samples: int = 8  # calibration samples for the sensitivity
    #: pd: when the distortions rest on fewer than MIN_ESS effective samples, measure again on up to this many
    max_samples: int = 64
    batch_size: int = 8
    workers: int | None = None
    solver: str = "dp"
    draws: int = 2  # hessian: Hutchinson draws per layer
    refine: int = 0  # pd: re-measure around the plan found and re-solve, up to this many times
    select: int = 8  # measure the plan and this many Pareto neighbours whole, keep the best (0: off)
    #: pd: rounds of measured exchanges around the selected plan (0: off): a few layers changed at a time, from
    #: sensitivities re-measured around the plan, each candidate exchange measured whole
    #: (see :func:`~qcompiler.autoplan.search._exchange`)
    exchange: int = 0
    seed: int = 0
    #: a trust region around the base plan: each layer leaving the base plan's own weight dtype costs the knapsack
    #: this quantile (in [0, 1)) of the layers' upgrade gains in sensitivity, so only the clearest changes are
    #: made (0: off; :func:`~qcompiler.autoplan.search.stay_penalty`)
    stay: float = 0.0
    resolution: int = knapsack.DEFAULT_RESOLUTION
    #: without ``base_plan``: start from the best shipped preset that fits the budget, measured on the held-back
    #: samples (:func:`~qcompiler.autoplan.baseline.auto_plan`); False: the default plan, as before
    presets: bool = True
    #: calibration samples held back (spread over them, at most a quarter) to measure plans on, compiled for real
    #: with the others; 0: nothing measured (no preset search, no guard against the uniform plan)
    holdout: int = 16
    #: held-back feeds to measure on instead (then every calibration sample calibrates)
    validate_data: str | Path | None = None
    #: the most a returned plan's onnxruntime latency may be over the float model's (one thread, best of 3 on the
    #: held-back samples; :mod:`qcompiler.autoplan.latency`); None: nothing timed
    max_latency_ratio: float | None = None


@dataclass
class LayerInfo:
    name: str
    op_type: str
    params: int
    macs: int
    allowed: list[str]  # candidate names allowed on this layer
    refused: dict[str, str]  # candidate -> target's reason
    base_weight: dict[str, Any]
    activation: QuantSpec | None


@dataclass
class FrontPoint:
    choice: list[int]
    bytes: float
    bitops: float
    avg_bits: float
    sensitivity: float
    predicted_sqnr_db: float | None
    measured_sqnr_db: float | None = None
    chosen: bool = False

    def counts(self, candidates: Sequence[str]) -> dict[str, int]:
        out = dict.fromkeys(candidates, 0)
        for ci in self.choice:
            out[candidates[ci]] += 1
        return out


@dataclass
class AutoPlanResult:
    """A planned model: the plan (text and parsed), per-layer decisions, predicted and verified costs."""

    text: str
    plan: Plan
    budget: Budget
    budget_value: float  # in the budget's unit (bytes / bits / bitops)
    unit: str
    layers: list[LayerInfo]
    candidates: list[str]
    choice: list[int]
    cost_table: dict[str, np.ndarray]  # "bytes" / "bitops" / "bits": [layers, candidates] (nan: not allowed)
    base: dict[str, float]  # per unit: the part of the total no layer decision changes
    sensitivity: SensitivityResult
    predicted: dict[str, Any]
    verified: dict[str, Any]
    front: list[FrontPoint]
    timings: dict[str, float]
    float_totals: dict[str, float]
    model: str
    target: str
    rules: list[list[dict[str, Any] | None]] = field(default_factory=list)
    rounds: int = 1
    #: the plan written, compiled for real and measured in onnxruntime on held-back samples: ``sqnr_db``,
    #: ``samples``, ``data`` (what they are), ``calib_samples`` (the compile's); empty when not measured
    measured: dict[str, Any] = field(default_factory=dict)
    #: the uniform plan the search started from and was compared with: ``name``, ``bytes``, ``sqnr_db``,
    #: ``fits``, and ``presets`` (each shipped preset's ``name`` / ``bytes`` / ``fits`` / ``sqnr_db``)
    baseline: dict[str, Any] = field(default_factory=dict)
    #: the plan returned is the uniform base plan (no mixed plan measured better; with 16-bit activations and a
    #: float16-scale move where those measured better on it); ``choice``, ``verified`` and the tables still
    #: describe the best mixed plan, whose text is ``search_text``
    uniform: bool = False
    search_text: str = ""
    #: the sensitivities over every candidate the planner's searches measured (their union), when several lists
    #: were searched (``sensitivity`` then covers this result's own list); the float16-scale step reads them
    union_sensitivity: SensitivityResult | None = None

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(self.candidates, 0)
        for ci in self.choice:
            out[self.candidates[ci]] += 1
        return out

    def check(self, cost_json: dict[str, Any]) -> None:
        """Raise :class:`UserError` when a compiled model's cost section (``CostReport.to_json()``) exceeds the
        budget (the planner verified the plan, so this only guards against a compile that differs)."""
        got = {"bytes": cost_json.get("total_bytes"), "bitops": cost_json.get("bitops"),
               "bits": self.predicted.get("avg_bits")}[self.unit]
        if self.unit == "bitops" and not cost_json.get("macs"):
            return  # shapes were not computed for this compile
        if got is not None and float(got) > self.budget_value:
            raise UserError(f"--budget: the compiled model takes {fmt_unit(float(got), self.unit)}, over the "
                            f"budget of {fmt_unit(self.budget_value, self.unit)}; nothing written")

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model, "target": self.target, "budget": self.budget.text, "budget_kind": self.budget.kind,
            "budget_value": self.budget_value, "unit": self.unit, "metric": self.sensitivity.metric,
            "candidates": list(self.candidates), "counts": self.counts(),
            "predicted": _jsonable(self.predicted), "verified": _jsonable(self.verified),
            "measured": _jsonable(self.measured), "baseline": _jsonable(self.baseline), "uniform": self.uniform,
            "front_points": len(self.front), "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "sensitivity": {"samples": self.sensitivity.samples, "batches": self.sensitivity.batches,
                            "evaluations": self.sensitivity.evaluations, **_jsonable(
                                {k: v for k, v in self.sensitivity.details.items() if not isinstance(v, dict)})},
            "layers": [{"name": la.name, "op_type": la.op_type, "params": la.params,
                        "choice": self.candidates[self.choice[i]],
                        "sensitivity": {c: _num(self.sensitivity.values[i, j]) for j, c in enumerate(self.candidates)},
                        "bytes": {c: _num(self.cost_table["bytes"][i, j]) for j, c in enumerate(self.candidates)}}
                       for i, la in enumerate(self.layers)],
        }


def _num(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return json_float(float(x), nonfinite="none")
    if isinstance(x, np.integer):
        return int(x)
    return x
