"""Multiple-choice knapsack: one option per group, minimal total value under a cost budget.

The mixed-precision allocation problem: every quantizable layer (a *group*) must take exactly one candidate
(an *option*) with a cost c[g][o] ≥ 0 (bytes, BitOps or weight bits) and a value v[g][o] (its predicted
sensitivity); find the choice minimizing Σ v subject to Σ c ≤ budget.

* :func:`solve` — exact dynamic programming over a discretized budget. Each group's cheapest option is
  taken as the base (Σ of those must fit), the remaining "upgrade" costs are rounded **up** to units of
  ``u = ceil(slack / resolution)`` (``u = 1`` when the costs are integers and the slack is at most
  ``resolution``: then the DP is exact), and ``dp[g][b]`` = least value of groups 0..g within b units,
  ``O(groups · options · resolution)``. Rounding up means every returned choice fits the true budget; the
  price is at most ``groups · u`` of unused budget.
* :func:`pareto_front` — the same DP over the whole cost range, read back at every budget where the optimum
  improves: the (cost, value) Pareto front, one choice per point (dominated points removed on true costs).
* :func:`lagrangian` — Lagrangian relaxation: for a multiplier λ every group independently takes
  ``argmin v + λ·c``; λ is bisected to the smallest value whose choice fits. Gives the optimum among the
  points on the lower convex hull of the front (no discretization; may leave budget unused).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: default number of budget units of the DP
DEFAULT_RESOLUTION = 1 << 15


@dataclass
class Solution:
    choice: list[int]  # option index per group
    cost: float  # true total cost
    value: float  # total value


def _check(costs: Sequence[Sequence[float]], values: Sequence[Sequence[float]]) -> tuple[list[np.ndarray],
                                                                                          list[np.ndarray]]:
    if len(costs) != len(values):
        raise ValueError(f"costs has {len(costs)} groups, values {len(values)}")
    c_out, v_out = [], []
    for g, (c, v) in enumerate(zip(costs, values)):
        c_arr = np.asarray(c, dtype=np.float64).reshape(-1)
        v_arr = np.asarray(v, dtype=np.float64).reshape(-1)
        if c_arr.size == 0 or c_arr.size != v_arr.size:
            raise ValueError(f"group {g}: needs as many costs as values, at least one")
        if not np.all(np.isfinite(c_arr)) or np.any(c_arr < 0):
            raise ValueError(f"group {g}: costs must be finite and >= 0")
        if np.any(np.isnan(v_arr)):
            raise ValueError(f"group {g}: values must not be NaN")
        c_out.append(c_arr)
        v_out.append(v_arr)
    return c_out, v_out


def _total(choice: Sequence[int], arrs: list[np.ndarray]) -> float:
    return float(sum(float(a[i]) for a, i in zip(arrs, choice)))


def _slack(budget: float) -> float:
    """Rounding allowed when comparing a sum of costs with the budget: sums of fractional costs (block scales,
    estimates) in another order differ in the last bits, ~1e-8 at 1e7 bytes (a 13 MB encoder's cheapest plan
    measured 1.1e-8 over a budget equal to it, and was refused)."""
    return 1e-9 * max(1.0, abs(float(budget)))


def _units(costs: list[np.ndarray], span: float, resolution: int) -> tuple[list[np.ndarray], float, int]:
    """Upgrade costs (above each group's cheapest option) in integer units, rounded up; (units, u, B)."""
    extra = [c - c.min() for c in costs]
    integral = all(np.all(e == np.round(e)) for e in extra)
    if integral and span <= resolution:
        u = 1.0
    else:
        u = max(span / resolution, 1e-12)
        if integral:
            u = float(math.ceil(u))
    units = [np.ceil(e / u - 1e-9).astype(np.int64) for e in extra]
    b = math.floor(span / u + 1e-9)
    return units, u, b


def _dp(units: list[np.ndarray], values: list[np.ndarray], b_max: int) -> tuple[np.ndarray, np.ndarray]:
    """dp over groups; returns (final dp row [b_max+1], choices [groups, b_max+1] int16)."""
    dp = np.zeros(b_max + 1, dtype=np.float64)
    choices = np.zeros((len(units), b_max + 1), dtype=np.int16)
    for g, (w, v) in enumerate(zip(units, values)):
        new = np.full(b_max + 1, np.inf)
        arg = np.zeros(b_max + 1, dtype=np.int16)
        for o in range(w.size):
            wo = int(w[o])
            if wo > b_max:
                continue
            cand = np.full(b_max + 1, np.inf)
            cand[wo:] = dp[: b_max + 1 - wo] + v[o]
            better = cand < new
            new = np.where(better, cand, new)
            arg = np.where(better, o, arg).astype(np.int16)
        dp = new
        choices[g] = arg
    return dp, choices


def _backtrack(choices: np.ndarray, units: list[np.ndarray], b: int) -> list[int]:
    out = [0] * len(units)
    for g in range(len(units) - 1, -1, -1):
        o = int(choices[g, b])
        out[g] = o
        b -= int(units[g][o])
    return out


def solve(costs: Sequence[Sequence[float]], values: Sequence[Sequence[float]], budget: float, *,
          resolution: int = DEFAULT_RESOLUTION) -> Solution | None:
    """The least-value choice with Σ cost ≤ ``budget`` (``None`` when even the cheapest choice does not fit).

    Exact when all costs are integers and the budget above the cheapest choice is at most ``resolution``;
    otherwise optimal for the costs rounded up to ``(budget − cheapest) / resolution``.
    """
    c, v = _check(costs, values)
    base = float(sum(x.min() for x in c))
    if base > budget + _slack(budget):
        return None
    span = max(0.0, float(budget - base))
    units, _u, b_max = _units(c, span, resolution)
    dp, choices = _dp(units, v, b_max)
    if not np.isfinite(dp[b_max]):  # pragma: no cover - the cheapest options always fit
        return None
    choice = _backtrack(choices, units, b_max)
    return Solution(choice, _total(choice, c), _total(choice, v))


def pareto_front(costs: Sequence[Sequence[float]], values: Sequence[Sequence[float]], *,
                 resolution: int = DEFAULT_RESOLUTION, max_cost: float | None = None) -> list[Solution]:
    """Pareto-optimal choices, cheapest first: each point is the DP optimum at some budget, and no point has
    both a higher (true) cost and a higher-or-equal value than another."""
    c, v = _check(costs, values)
    base = float(sum(x.min() for x in c))
    top = float(sum(x.max() for x in c)) if max_cost is None else float(max_cost)
    if top < base:
        return []
    units, _u, b_max = _units(c, top - base, resolution)
    dp, choices = _dp(units, v, b_max)
    points: list[Solution] = []
    prev = math.inf
    for b in range(b_max + 1):
        val = float(dp[b])
        if not math.isfinite(val):
            continue
        if math.isinf(prev) or val < prev - 1e-12 * abs(prev):
            choice = _backtrack(choices, units, b)
            points.append(Solution(choice, _total(choice, c), _total(choice, v)))
            prev = val
    points.sort(key=lambda s: (s.cost, s.value))
    front: list[Solution] = []
    for s in points:
        if front and s.value >= front[-1].value:
            continue
        if front and s.cost == front[-1].cost:
            front[-1] = s
            continue
        front.append(s)
    return front


def lagrangian(costs: Sequence[Sequence[float]], values: Sequence[Sequence[float]], budget: float, *,
               iterations: int = 100) -> Solution | None:
    """Lagrangian relaxation: the choice minimizing Σ (v + λ·c) for the smallest λ ≥ 0 that fits the budget."""
    c, v = _check(costs, values)

    def pick(lam: float) -> list[int]:
        # ties: prefer the cheaper option so that a larger λ never costs more
        return [int(np.lexsort((ci, vi + lam * ci))[0]) for ci, vi in zip(c, v)]

    choice = pick(0.0)
    if _total(choice, c) <= budget:
        return Solution(choice, _total(choice, c), _total(choice, v))
    cheapest = [int(np.lexsort((vi, ci))[0]) for ci, vi in zip(c, v)]
    if _total(cheapest, c) > budget + _slack(budget):
        return None
    lo, hi = 0.0, 1.0
    while _total(pick(hi), c) > budget:
        hi *= 2.0
        if hi > 1e300:  # pragma: no cover - values are finite, so some λ separates
            choice = cheapest
            return Solution(choice, _total(choice, c), _total(choice, v))
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if _total(pick(mid), c) <= budget:
            hi = mid
        else:
            lo = mid
    choice = pick(hi)
    return Solution(choice, _total(choice, c), _total(choice, v))
