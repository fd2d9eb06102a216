"""Choosing among measured candidates under the user's constraints, and the algorithm guard of the presets."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from qcompiler.autoplan.budget import Budget
from qcompiler.core.errors import UserError
from qcompiler.plan import Plan
from qcompiler.recipe.measure import Measured
from qcompiler.report import validate as qv

log = logging.getLogger("qcompiler.recipe")

OPTIMIZE = ("accuracy", "latency", "size")
EFFORTS = ("low", "normal", "high")


@dataclass
class Constraints:
    optimize: str = "accuracy"
    max_latency_ratio: float | None = None
    budget: Budget | None = None
    float_bytes: int = 0
    min_sqnr_db: float | None = None
    max_drop: float | None = None

    @property
    def timed(self) -> bool:
        """Whether the choice depends on measured latency (``--optimize latency``, ``--max-latency-ratio``): only
        then is latency measured, and only then may two compiles of the same inputs choose differently."""
        return self.optimize == "latency" or self.max_latency_ratio is not None

    def byte_limit(self) -> float | None:
        if self.budget is None:
            return None
        if self.budget.kind == "bytes":
            return self.budget.value
        if self.budget.kind == "fraction":
            return self.budget.value * self.float_bytes
        raise UserError(f"--budget {self.budget.text}: with --plan auto the budget is bytes (4MB) or a fraction of "
                        "the float model's bytes (25%)")

    def describe(self) -> list[str]:
        out = []
        if self.max_latency_ratio is not None:
            out.append(f"latency <= {self.max_latency_ratio}x float")
        if self.budget is not None:
            out.append(f"bytes <= {self.budget.text}")
        if self.min_sqnr_db is not None:
            out.append(f"SQNR >= {self.min_sqnr_db} dB")
        if self.max_drop is not None:
            out.append(f"metric drop <= {self.max_drop}")
        return out


def _accuracy(m: Measured) -> float:
    return m.metric if m.metric is not None else m.sqnr_db


def why_not(m: Measured, base: Measured, c: Constraints, float_metric: float | None) -> str | None:
    """Why candidate ``m`` may not win (None: it may)."""
    if m.error:
        return m.error
    if _accuracy(m) < _accuracy(base):
        return "below the default plan"
    if c.min_sqnr_db is not None and m.sqnr_db < c.min_sqnr_db:
        return f"SQNR below {c.min_sqnr_db} dB"
    if c.max_latency_ratio is not None and m.latency_ratio > c.max_latency_ratio:
        return f"latency {m.latency_ratio:.2f}x > {c.max_latency_ratio}x"
    limit = c.byte_limit()
    if limit is not None and m.bytes > limit:
        return f"{m.bytes} bytes > {int(limit)}"
    if c.max_drop is not None and float_metric is not None and m.metric is not None \
            and float_metric - m.metric > c.max_drop:
        return f"metric drop {float_metric - m.metric:.4g} > {c.max_drop}"
    return None


def pick(measured: list[Measured], c: Constraints, float_metric: float | None) -> tuple[Measured, str]:
    """The winner and why. ``measured[0]`` is the default plan: nothing below it on the held-back samples wins.
    Without a latency constraint only measured values that do not depend on timing decide (accuracy, bytes, the
    task metric): same inputs, same winner."""
    base = measured[0]
    ok = [m for m in measured if why_not(m, base, c, float_metric) is None]
    if not ok:
        reasons = "; ".join(f"{m.name}: {why_not(m, base, c, float_metric)}" for m in measured)
        raise UserError(f"the measured default: no candidate meets {', '.join(c.describe()) or 'the constraints'} "
                        f"at or above the default plan ({reasons}); nothing written")
    what = "task metric" if base.metric is not None else "SQNR"
    if c.optimize == "latency":
        best = min(ok, key=lambda m: (m.latency_ratio, -_accuracy(m)))
        why = f"fastest ({best.latency_ratio:.2f}x float) of {len(ok)} candidate(s) at or above the default plan's {what}"
    elif c.optimize == "size":
        best = min(ok, key=lambda m: (m.bytes, -_accuracy(m)))
        why = f"smallest ({best.bytes} bytes) of {len(ok)} candidate(s) at or above the default plan's {what}"
    else:
        best = max(ok, key=lambda m: (_accuracy(m), m.sqnr_db))  # max keeps the first of equals
        why = (f"highest {what} ({_accuracy(best):.4g}) of {len(ok)} candidate(s) meeting the constraints; "
               f"default plan {_accuracy(base):.4g}")
    return best, why


@dataclass
class RecipeResult:
    """What the measured default (or the guard) hands the compile: the plan, its YAML, the report section."""

    plan: Plan
    text: str
    mode: str
    candidates: list[Measured] = field(default_factory=list)
    winner: str = ""
    reason: str = ""
    held_samples: int = 0
    dropped: list[str] = field(default_factory=list)
    constraints: Constraints | None = None
    notes: list[str] = field(default_factory=list)
    #: the float model's outputs on the held-back samples the candidates were scored against, with those samples'
    #: places among the calibration samples (``None``: not kept): the compile's validation takes them instead of
    #: running the float model on those samples again (``qv.known_outputs``)
    reference: qv.Reference | None = None

    def summary(self) -> dict[str, Any]:
        return {"mode": self.mode, "winner": self.winner, "reason": self.reason, "held_samples": self.held_samples,
                "latency_measured": bool(self.constraints and self.constraints.timed),
                "candidates": [m.to_json() for m in self.candidates], "dropped": list(self.dropped),
                "constraints": self.constraints.describe() if self.constraints else [],
                **({"notes": self.notes} if self.notes else {})}

    def check(self, cost_json: dict[str, Any]) -> None:
        if self.constraints is None:
            return
        limit = self.constraints.byte_limit()
        total = cost_json.get("total_bytes")
        if limit is not None and total is not None and total > limit:
            raise UserError(f"--budget {self.constraints.budget.text if self.constraints.budget else ''}: the "
                            f"model written is {total} bytes; nothing written")


def plan_text(plan: Plan, header: str) -> str:
    """``plan`` as an ordinary plan YAML (``compile --plan FILE`` reproduces the compile)."""
    body = yaml.safe_dump(plan.to_dict(), sort_keys=False, default_flow_style=None, width=120)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body


def fmt_db(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else str(x)
